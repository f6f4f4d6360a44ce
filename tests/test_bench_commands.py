"""``python -m zimage_bench parity`` and ``throughput`` end to end on CPU at tiny shapes, including deliberate numeric
faults
that must make them exit non-zero."""

from __future__ import annotations

import sys
import types

import pytest
import torch

from zimage_bench import parity, report, throughput
from zimage_bench.__main__ import main as bench_main
from zimage_core.components import build_random_pipeline
from zimage_core.hooks import StackHook
from zimage_core.model import ZImageTransformer

TINY = "64x64/b1/turbo2,64x64/b2/base2"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_random_pipeline(tmp_path_factory.mktemp("bench") / "random", seed=1)


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _args(folder, out, *extra):
    return ["--model", str(folder), "--shapes", TINY, "--out", str(out), "--no-plots", *extra]


def test_parity_passes_and_writes_rows(folder, tmp_path, capsys):
    assert parity.main(_args(folder, tmp_path)) == 0
    text = capsys.readouterr().out
    assert "| 64x64/b2/base2 | ours-torch | ok |" in text and "parity all passed" in text
    rows = report.read_jsonl(tmp_path / "rows.jsonl")
    done = [r for r in rows if r["status"] == "ok"]
    assert len(done) == 2 and all(r["rel_l2"] <= 1e-4 for r in done)
    assert all(len(r["per_step_rel_l2"]) == r["steps"] for r in done)
    assert all(r["model_kind"] == "random" and r["env"]["torch"] for r in done)
    assert {r["config"] for r in rows if r["status"] == "skipped"} == (
        set() if torch.cuda.is_available() else {"ours-triton"}
    )
    assert (tmp_path / "table.md").read_text().startswith("## parity")


def test_parity_fails_on_an_injected_fault(folder, tmp_path, capsys):
    assert parity.main(_args(folder, tmp_path, "--inject-fault", "1e-3")) == 1
    assert "parity FAILED" in capsys.readouterr().out
    rows = [r for r in report.read_jsonl(tmp_path / "rows.jsonl") if r["status"] != "skipped"]
    assert rows and all(r["status"] == "parity_failed" and r["injected_fault"] == 1e-3 for r in rows)


def test_parity_fails_when_one_of_our_ops_is_wrong(folder, tmp_path, monkeypatch):
    """A fault inside our model (not through the harness's flag): the final layer's output is off by 0.1%."""
    orig = ZImageTransformer.forward_with_context

    def faulty(self, *a, **k):
        return [o * 1.001 for o in orig(self, *a, **k)]

    monkeypatch.setattr(ZImageTransformer, "forward_with_context", faulty)
    assert parity.main(_args(folder, tmp_path)) == 1


def test_throughput_times_only_configs_that_passed(folder, tmp_path, capsys):
    assert throughput.main(_args(folder, tmp_path, "--repeats", "2")) == 0
    text = capsys.readouterr().out
    rows = report.read_jsonl(tmp_path / "rows.jsonl")
    ok = [r for r in rows if r["status"] == "ok"]
    caches = (
        "ours-fbcache",
        "ours-teacache",
        "ours-dbcache",
    )  # zimage_core.cache: lossy configs that run and are timed
    assert {(r["case"], r["config"]) for r in ok} == {
        (c, k) for c in TINY.split(",") for k in ("diffusers-eager", "ours-torch", "ours-batched", *caches)
    }
    assert all(r["lossy"] for r in ok if r["config"] in caches)
    for r in ok:
        assert r["e2e_ms"]["n"] == 2 and r["e2e_ms"]["min"] <= r["e2e_ms"]["median"] <= r["e2e_ms"]["max"]
        assert r["forward_ms"]["n"] >= 2 and r["step_ms"]["median"] > 0 and r["images_per_s"] > 0
        assert r["first_call_s"] > 0 and r["telemetry"]["rss_mb_max"] > 0
        assert r["env"]["git_sha"] is None or len(r["env"]["git_sha"]) == 40
        assert r["repro"].startswith("python -m zimage_bench throughput")
    ours = next(r for r in ok if r["config"] == "ours-torch" and r["batch"] == 2)
    assert ours["forward_batch"] == 2 and ours["forwards_per_request"] == 2 * 2  # 2 results × 2 steps, CFG batched
    batched = next(r for r in ok if r["config"] == "ours-batched" and r["batch"] == 2)
    assert batched["forward_batch"] == 4 and batched["forwards_per_request"] == 2  # one batched run of 2 steps
    eager = next(r for r in ok if r["config"] == "diffusers-eager" and r["batch"] == 2)
    assert eager["forward_batch"] == 4 and eager["forwards_per_request"] == 2 and eager["speedup"] == 1.0
    assert "| 64x64/b1/turbo2 | ours-torch |" in text


def test_throughput_does_not_time_a_config_that_failed_parity(folder, tmp_path, capsys):
    code = throughput.main(
        _args(folder, tmp_path, "--repeats", "1", "--inject-fault", "1e-2", "--configs", "diffusers-eager,ours-torch")
    )
    assert code == 1
    text = capsys.readouterr().out
    rows = report.read_jsonl(tmp_path / "rows.jsonl")
    bad = [r for r in rows if r["config"] == "ours-torch"]
    assert bad and all(r["status"] == "parity_failed" and "e2e_ms" not in r for r in bad)
    assert "| 64x64/b1/turbo2 | ours-torch |" not in text and "PARITY FAILED" in text
    assert all(r["status"] == "ok" for r in rows if r["config"] == "diffusers-eager")


def test_a_lossy_cache_config_runs_through_the_assumed_interface(folder, tmp_path, monkeypatch):
    """A stand-in zimage_core.cache whose cache never skips: the harness must run it, report it as lossy with its PSNR
    (near-lossless here: only summation order differs) and time it."""

    class State(StackHook):  # the identity hook: every layer runs
        def observe(self, denoise):
            return denoise

        def end_step(self, i):
            pass

        def summary(self):
            return {"hits": 0}

    class CacheConfig:
        @classmethod
        def for_method(cls, method, threshold=None):
            return cls()

        def new_state(self, num_steps=None, start_step=0):
            return State()

    mod = types.ModuleType("zimage_core.cache")
    mod.CacheConfig = CacheConfig
    monkeypatch.setitem(sys.modules, "zimage_core.cache", mod)
    args = _args(folder, tmp_path, "--repeats", "1", "--configs", "diffusers-eager,ours-cache", "--caches", "fbcache")
    assert throughput.main(args) == 0
    rows = [r for r in report.read_jsonl(tmp_path / "rows.jsonl") if r["config"] == "ours-fbcache"]
    assert rows and all(r["status"] == "ok" and r["lossy"] and report.as_float(r["psnr_db"]) > 100 for r in rows)
    assert all(r["cache_stats"] == [{"hits": 0}] * r["batch"] for r in rows)


def test_synthetic_tiny_path_and_dispatcher(tmp_path, capsys):
    """The code path of the real-dims GPU mode (random diffusers transformer shared with ours), at a tiny config."""
    code = bench_main(["parity", "--model", "synthetic-tiny", "--shapes", "64x64/b1/turbo2", "--out", str(tmp_path)])
    assert code == 0
    rows = [r for r in report.read_jsonl(tmp_path / "rows.jsonl") if r["status"] == "ok"]
    assert rows[0]["model_kind"] == "synthetic-tiny" and rows[0]["notes"]


@pytest.mark.gpu
def test_gpu_mode_end_to_end_at_a_tiny_config(tmp_path):
    """On CUDA: bf16, CUDA-event timers, NVML telemetry, peak memory and the Triton configuration, at a tiny config."""
    common = ["--model", "synthetic-tiny", "--shapes", "64x64/b1/turbo2,64x64/b2/base2", "--no-plots"]
    assert parity.main([*common, "--out", str(tmp_path / "p"), "--configs", "ours-torch,ours-triton"]) == 0
    configs = "diffusers-eager,diffusers-compile,ours-torch,ours-triton"
    assert throughput.main([*common, "--out", str(tmp_path / "t"), "--configs", configs, "--repeats", "2"]) == 0
    rows = [r for r in report.read_jsonl(tmp_path / "t" / "rows.jsonl") if r["status"] == "ok"]
    assert {r["config"] for r in rows} == set(configs.split(","))
    for r in rows:
        assert r["dtype"] == "bfloat16" and r["env"]["gpu"] and r["peak_mem_gb"] > 0
        assert r["e2e_ms"]["median"] > 0 and r["forward_ms"]["n"] >= 2
        if "nvml" not in r["env"]:
            assert r["env"]["driver"] and r["telemetry"]["samples"] >= 1
