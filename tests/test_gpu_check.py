"""scripts/gpu_check.sh: its --dry-run on CPU walks the same steps as the GPU run, so the script cannot rot unseen.

The dry run's figures mean nothing (tiny shapes, CPU); what is checked is the control flow: every step runs (the GPU
tier answers "no CUDA" and is recorded as skipped), the files stay within the GPU machine's limit of 8 and carry the
environment, and a step that overruns its budget is killed and reported as a timeout, not waited for.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import gpu_check  # noqa: E402


@pytest.mark.slow
def test_dry_run_walks_every_step_within_the_file_limit(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "OMP_NUM_THREADS": "1"}
    res = subprocess.run(
        [str(REPO / "scripts" / "gpu_check.sh"), "--dry-run"], capture_output=True, text=True, env=env, timeout=600
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert all(p.is_file() for p in out.iterdir())  # no folders: the GPU machine returns plain files
    assert len(files) <= 8 and set(files) <= set(gpu_check.FILES), files
    assert {"env.json", "summary.md", "steps.log", "gpu_tests.log", "kernels.jsonl", "throughput.jsonl"} <= set(files)

    env_json = json.loads((out / "env.json").read_text())
    for key in ("device", "torch", "triton", "diffusers", "git_sha", "timestamp", "mode"):
        assert key in env_json, key
    assert env_json["mode"].startswith("dry-run")

    summary = (out / "summary.md").read_text()
    status = {line.split("|")[1].strip(): line.split("|")[2].strip() for line in summary.splitlines()[6:10]}
    assert status == {"gpu-tests": "skipped", "kernels": "ok", "fa3": "ok", "throughput": "ok"}, summary
    assert "no CUDA device" in (out / "gpu_tests.log").read_text()

    kernel_rows = [json.loads(line) for line in (out / "kernels.jsonl").read_text().splitlines()]
    checked = [r for r in kernel_rows if r["refcheck"] is not None]
    assert {r["op"] for r in checked} == {"gated_residual", "qk_norm_rope", "attention"}  # attention: the fa3 step
    assert all(r["refcheck"]["passed"] for r in checked)
    thr = [json.loads(line) for line in (out / "throughput.jsonl").read_text().splitlines()]
    assert {r["config"] for r in thr} == {"diffusers-eager", "ours-torch"}
    assert all(r["status"] == "ok" and r["step_ms"]["median"] > 0 for r in thr)


def test_a_step_over_its_budget_is_killed_and_reported(tmp_path):
    log_path = tmp_path / "log"
    with open(log_path, "w") as log:
        t0 = time.monotonic()
        # the child sleeps in a grandchild too: the whole process group must go
        cmd = ["bash", "-c", "sleep 30 & sleep 30"]
        r = gpu_check.run_step("slow", cmd, 1.0, log, dict(os.environ))
        assert time.monotonic() - t0 < 15
    assert r["status"] == "timeout" and r["rc"] is None
    with open(log_path, "w") as log:
        assert (
            gpu_check.run_step("skip", ["bash", "-c", "exit 77"], 10, log, dict(os.environ), skip_codes=(77,))["status"]
            == "skipped"
        )
        assert gpu_check.run_step("fail", ["bash", "-c", "exit 3"], 10, log, dict(os.environ))["status"] == "failed"
    assert "slow" not in log_path.read_text()  # reopened with "w"
    assert "===== fail: failed (rc 3)" in log_path.read_text()


def test_without_cuda_the_real_run_refuses_with_77(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_check, "environment", lambda py: {"cuda_available": False, "timestamp": "x"})
    assert gpu_check.main(["--out", str(tmp_path)]) == 77
    assert not any(tmp_path.iterdir())


def test_missing_packages_come_from_local_wheels_only(tmp_path, monkeypatch):
    """With diffusers importable nothing is installed; without it and without wheels, nothing either (no network)."""
    calls = []
    monkeypatch.setattr(gpu_check.subprocess, "run", lambda *a, **k: calls.append(a) or None)
    monkeypatch.setattr(gpu_check, "_run_text", lambda *a, **k: "ok")
    assert gpu_check.ensure_wheels(sys.executable, open(tmp_path / "log", "w")) is None
    monkeypatch.setattr(gpu_check, "_run_text", lambda *a, **k: None)  # diffusers missing
    monkeypatch.setattr(gpu_check, "REPO", tmp_path)  # no .whl/ there
    assert gpu_check.ensure_wheels(sys.executable, open(tmp_path / "log", "w")) is None
    (tmp_path / ".whl").mkdir()
    (tmp_path / ".whl" / "diffusers-0.42.1-py3-none-any.whl").write_bytes(b"")
    site = gpu_check.ensure_wheels(sys.executable, open(tmp_path / "log", "w"))
    assert site and len(calls) == 1
    cmd = calls[0][0]
    assert "--no-index" in cmd and "--target" in cmd and cmd[-1].endswith("diffusers-0.42.1-py3-none-any.whl")


def test_the_gpu_commands_are_valid_for_the_bench_parsers(tmp_path):
    """The real (non-dry) run cannot be executed here; its commands must at least be what the benches accept."""
    from zimage_bench import kernels as bench_kernels
    from zimage_bench.pipelines import ALL_CONFIGS
    from zimage_bench.shapes import resolve

    steps = {name: cmd for name, cmd, _ in gpu_check.steps("python3", tmp_path, False, 8)}
    assert steps["gpu-tests"][1:4] == ["scripts/run_tier.py", "gpu", "-q"]
    k = bench_kernels.parse_args(steps["kernels"][4:])
    assert (k.cases, k.dtype, k.out) == ("zimage", "bf16", str(tmp_path / "kernels.jsonl"))
    fa3 = bench_kernels.parse_args(steps["fa3"][4:])
    assert fa3.append and fa3.out == k.out and fa3.ops == ["attention"] and (fa3.cases, fa3.dtype) == ("zimage", "bf16")
    assert "triton-fa3" in fa3.providers and "triton-fa3" in bench_kernels.OPT_IN_PROVIDERS
    thr = steps["throughput"]
    shape = resolve(thr[thr.index("--shapes") + 1], "cuda")[0]
    assert (shape.width, shape.height, shape.cfg, shape.steps) == (1024, 1024, True, 8)
    assert set(thr[thr.index("--configs") + 1].split(",")) <= set(ALL_CONFIGS)
    assert thr[thr.index("--model") + 1] == "synthetic"
    assert sum(gpu_check.BUDGETS.values()) <= 560  # with start-up and env, under the GPU machine's 10 minutes


def test_environment_records_the_versions_and_tritons_assembler():
    """env.json says which torch/Triton/transformers/kernels ran, and which ptxas Triton picks for the device (here
    sm_90): read against importlib.metadata and Triton's own backend, for whatever set this interpreter has."""
    import importlib.metadata as md

    import torch
    import triton
    from triton.backends.nvidia.compiler import get_ptxas

    env = gpu_check.environment(sys.executable)
    assert env["torch"] == torch.__version__ and env["triton"] == triton.__version__, env
    for dist in ("torch", "triton", "diffusers", "transformers", "kernels", "zimage-fast"):
        try:
            want = md.version(dist)
        except md.PackageNotFoundError:
            want = None
        assert env["distributions"][dist] == want, (dist, env["distributions"])
    assert env["triton_ptxas"]["ptxas"] == get_ptxas(90).path, env["triton_ptxas"]
    assert env["triton_ptxas"]["gpu_name"] == "sm_90a"
