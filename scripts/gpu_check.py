#!/usr/bin/env python3
"""Everything the project claims about a GPU, checked in one call of at most ~10 minutes: ``scripts/gpu_check.sh``.

Steps (each under its own wall-clock budget, killed at the budget; a failed or timed-out step does not stop the
next one):

1. ``env``        device, driver, CUDA, torch / triton / diffusers / transformers / kernels versions, the ptxas
                  Triton selects for the device, git sha                                       -> env.json
2. ``gpu-tests``  the GPU test tier (bf16 kernels at Z-Image shapes against fp64, torch.compile and CUDA-graph
                  capture of a forward and of a sampling step, determinism)                    -> gpu_tests.log, .xml
3. ``kernels``    ``python -m zimage_bench kernels`` at Z-Image's shapes: ours against torch SDPA's flash / cuDNN /
                  efficient backends (and FlashAttention when importable), elementwise ops in GB/s -> kernels.jsonl
3b. ``fa3``       the opt-in FA3-structured Gluon attention (zimage_kernels/attention_fa3.py) against the default TMA
                  kernel at the same shapes, appended to kernels.jsonl
4. ``throughput`` ``python -m zimage_bench throughput`` at the real transformer dims with random weights, 1024², CFG:
                  ms per step and per image, ours against diffusers' pipeline, peak memory; the ``ours-fp8`` row
                  (e4m3 W8A8, docs/fp8.md): its forward time next to ``ours-triton`` (bf16) and its image PSNR
                  against diffusers (random weights)                                 -> throughput.jsonl/.md
5. ``summary.md`` one table of the steps (status, seconds, exit code) and the tail of every log.

At most 8 files are written (the GPU machine returns no more): into ``$OUT`` when that is set, else into
``zimage_bench/results/<UTC date>-<device>/`` ready to commit. Nothing is installed from the network; a missing Python
package (diffusers on a bare CUDA image) is installed from local wheels in ``.whl/`` when that folder exists (see
docs/kernels.md, "GPU check").

``--dry-run`` runs the same steps on CPU at tiny shapes (the test tier is asked for and answers "no CUDA", the
kernels bench runs the small cases with the eager providers, the throughput bench the tiny synthetic model), so the
control flow is exercised by the normal CPU test tier (tests/test_gpu_check.py).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MAX_FILES = 8  # the GPU machine sends back at most 8 files
# Wall-clock budgets (seconds) on the GPU; their sum stays under 10 minutes with room for start-up.
BUDGETS = {"gpu-tests": 175, "kernels": 120, "fa3": 55, "throughput": 210}  # throughput includes the FP8 row
DRY_BUDGETS = {"gpu-tests": 60, "kernels": 120, "fa3": 60, "throughput": 240}
FILES = (
    "env.json",
    "gpu_tests.log",
    "gpu_tests.xml",
    "kernels.jsonl",
    "throughput.jsonl",
    "throughput.md",
    "steps.log",
    "summary.md",
)
assert len(FILES) <= MAX_FILES


def _run_text(cmd: list[str], timeout: float = 20) -> str | None:
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return res.stdout.strip() if res.returncode == 0 else None


def environment(py: str) -> dict:
    """Versions and device, read by the interpreter the steps use (it may differ from the one running this)."""
    probe = (
        "import importlib.metadata as md, json, platform, torch\n"
        "d = {'python': platform.python_version(), 'torch': torch.__version__, 'cuda': torch.version.cuda,\n"
        "     'cuda_available': torch.cuda.is_available()}\n"
        "for name in ('triton', 'diffusers', 'transformers', 'flash_attn'):\n"
        "    try:\n"
        "        d[name] = __import__(name).__version__\n"
        "    except Exception as e:\n"
        "        d[name] = None\n"
        "# installed distributions (Hugging Face's kernels, which current transformers needs; our own package)\n"
        "d['distributions'] = {}\n"
        "for dist in ('torch', 'triton', 'diffusers', 'transformers', 'kernels', 'accelerate', 'zimage-fast'):\n"
        "    try:\n"
        "        d['distributions'][dist] = md.version(dist)\n"
        "    except md.PackageNotFoundError:\n"
        "        d['distributions'][dist] = None\n"
        "arch = 90\n"
        "if torch.cuda.is_available():\n"
        "    p = torch.cuda.get_device_properties(0)\n"
        "    d.update(device=p.name, capability=f'{p.major}.{p.minor}', sms=p.multi_processor_count,\n"
        "             memory_gib=round(p.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version())\n"
        "    arch = p.major * 10 + p.minor\n"
        "else:\n"
        "    d['device'] = 'cpu: ' + (platform.processor() or platform.machine())\n"
        "try:  # the assembler this Triton selects for the device (sm_90 on a CPU host), and the Gluon names in use\n"
        "    from zimage_kernels import _gluon, compiled\n"
        "    d['triton_ptxas'] = compiled.nvidia_tools(arch)\n"
        "    d['gluon'] = {'tma_load': _gluon.TMA_LOAD_NAME, 'tma_store': _gluon.TMA_STORE_NAME}\n"
        "except Exception as e:\n"
        "    d['triton_ptxas'] = f'{type(e).__name__}: {e}'[:300]\n"
        "print(json.dumps(d))\n"
    )
    out = _run_text([py, "-c", probe], timeout=120)
    env = json.loads(out) if out else {"probe": "failed"}
    query = "--query-gpu=name,driver_version,clocks.max.sm,power.limit"
    smi = _run_text(["nvidia-smi", query, "--format=csv,noheader"])
    env["nvidia_smi"] = smi
    if smi:
        env["driver"] = smi.split(",")[1].strip()
    env["git_sha"] = os.environ.get("ZIMAGE_GIT_SHA") or _run_text(["git", "rev-parse", "HEAD"])
    env["git_dirty"] = bool(_run_text(["git", "status", "--porcelain", "--untracked-files=no"]))
    env["host"] = platform.node()
    env["cpu_count"] = os.cpu_count()
    env["timestamp"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    env["python_executable"] = py
    return env


def run_step(name: str, cmd: list[str], budget: float, log, env: dict, ok_codes=(0,), skip_codes=()) -> dict:
    """Run one step in its own process group, append its output to ``log``, kill the group at ``budget`` s."""
    log.write(f"\n===== {name}: {' '.join(cmd)}  (budget {budget:.0f} s)\n")
    log.flush()
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rc = proc.wait(timeout=budget)
        status = "ok" if rc in ok_codes else ("skipped" if rc in skip_codes else "failed")
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        rc, status = None, "timeout"
    secs = time.monotonic() - t0
    log.write(f"===== {name}: {status} (rc {rc}) in {secs:.1f} s\n")
    log.flush()
    return {"step": name, "status": status, "rc": rc, "seconds": round(secs, 1), "command": " ".join(cmd)}


def default_out(env: dict) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", str(env.get("device", "unknown")).lower()).strip("-")[:40]
    return REPO / "zimage_bench" / "results" / f"{env['timestamp'][:10]}-{slug}"


def ensure_wheels(py: str, log) -> str | None:
    """Install missing Python packages from local wheels (``.whl/``) into a private folder; never the network.
    Returns that folder (to put first on PYTHONPATH), or None when nothing was missing or no wheel is there."""
    missing = _run_text([py, "-c", "import diffusers"]) is None
    wheels = sorted((REPO / ".whl").glob("*.whl"))
    if not missing or not wheels:
        return None
    target = Path(os.environ.get("TMPDIR", "/tmp")) / "zimage-site"
    cmd = [py, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile", "--upgrade"]
    cmd += ["--target", str(target), *map(str, wheels)]
    log.write(f"===== wheels: {' '.join(cmd)}\n")
    log.flush()
    subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, timeout=120)
    return str(target)


def steps(py: str, out: Path, dry: bool, steps_per_image: int) -> list[tuple[str, list[str], dict]]:
    """(name, command, extra run_step kwargs) of the steps after ``env``."""
    tier = [py, "scripts/run_tier.py", "gpu", "-q", "-x" if dry else "-rfE", "--durations=15", "-p", "no:cacheprovider"]
    tier += [f"--junitxml={out / 'gpu_tests.xml'}"]
    tier_log = {"log_file": "gpu_tests.log", "skip_codes": (77,)}
    if dry:
        kernels = [py, "-m", "zimage_bench", "kernels", "--cases", "small", "--ops", "gated_residual", "qk_norm_rope"]
        kernels += ["--providers", "eager", "--quick", "--out", str(out / "kernels.jsonl")]
        shape, model, configs = "64x64/b1/base2", "synthetic-tiny", "diffusers-eager,ours-torch"
        thr_extra = ["--repeats", "1", "--vae", "small", "--threads", "1"]
    else:
        kernels = [py, "-m", "zimage_bench", "kernels", "--cases", "zimage", "--dtype", "bf16", "--quick"]
        kernels += ["--out", str(out / "kernels.jsonl")]
        shape, model = f"1024x1024/b1/base{steps_per_image}", "synthetic"
        configs = "diffusers-eager,ours-triton,ours-fp8"  # FP8 W8A8 next to bf16 in one run: time and PSNR
        # random weights: the FP8 row's PSNR is reported, not held to the lossy-config floor (it would go untimed)
        thr_extra = ["--repeats", "2", "--min-psnr", "0"]
    # The opt-in FA3 Gluon kernel in a step of its own (a hang or failure there costs only its budget), its rows
    # appended to kernels.jsonl next to the default TMA kernel's.
    fa3 = [
        py,
        "-m",
        "zimage_bench",
        "kernels",
        "--cases",
        "small" if dry else "zimage",
        "--ops",
        "attention",
        "--quick",
    ]
    fa3 += ["--dtype", "fp32" if dry else "bf16", "--providers", "eager" if dry else "triton-fa3", "triton-tma"]
    fa3 += ["--append", "--out", str(out / "kernels.jsonl")]
    thr_dir = out / "_throughput"
    throughput = [py, "-m", "zimage_bench", "throughput", "--model", model, "--shapes", shape, "--configs", configs]
    throughput += [*thr_extra, "--no-plots", "--out", str(thr_dir)]
    return [
        ("gpu-tests", tier, tier_log),
        ("kernels", kernels, {}),
        ("fa3", fa3, {}),
        ("throughput", throughput, {"thr_dir": thr_dir}),
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dry-run", action="store_true", help="the same steps on CPU at tiny shapes (CI)")
    ap.add_argument(
        "--out", default=None, help="output folder (default: $OUT, else zimage_bench/results/<date>-<device>/)"
    )
    ap.add_argument("--python", default=None, help="interpreter for the steps (default: this one)")
    ap.add_argument("--steps", type=int, default=8, help="sampling steps of the 1024² CFG throughput shape")
    ap.add_argument("--only", nargs="+", choices=tuple(BUDGETS), default=None, help="run only these steps")
    args = ap.parse_args(argv)
    py = args.python or sys.executable
    t_start = time.monotonic()
    env = environment(py)
    if not args.dry_run and not env.get("cuda_available"):
        print("gpu_check: no CUDA device here; use --dry-run for the CPU rehearsal", file=sys.stderr)
        return 77
    out = Path(args.out or os.environ.get("OUT") or default_out(env))
    out.mkdir(parents=True, exist_ok=True)
    env["mode"] = "dry-run (CPU, tiny shapes: control flow only, no figures)" if args.dry_run else "gpu"
    (out / "env.json").write_text(json.dumps(env, indent=1) + "\n")
    budgets = DRY_BUDGETS if args.dry_run else BUDGETS
    results = []
    with open(out / "steps.log", "w") as log:
        run_env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": f"{REPO}{os.pathsep}"}
        run_env["PYTHONPATH"] += os.environ.get("PYTHONPATH", "")
        site = ensure_wheels(py, log)
        if site:
            run_env["PYTHONPATH"] = f"{site}{os.pathsep}{run_env['PYTHONPATH']}"
        if args.dry_run:
            run_env.update(OMP_NUM_THREADS="1", TRITON_INTERPRET="0", CUDA_VISIBLE_DEVICES="")
        for name, cmd, extra in steps(py, out, args.dry_run, args.steps):
            if args.only and name not in args.only:
                continue
            step_log = extra.get("log_file")
            if step_log:
                with open(out / step_log, "w") as slog:
                    r = run_step(name, cmd, budgets[name], slog, run_env, skip_codes=extra.get("skip_codes", ()))
                log.write(f"===== {name}: {r['status']} (rc {r['rc']}) in {r['seconds']} s, log in {step_log}\n")
            else:
                r = run_step(name, cmd, budgets[name], log, run_env)
            thr_dir = extra.get("thr_dir")
            if thr_dir is not None:  # keep two of the bench's files, under the names the GPU machine returns
                for src, dst in (("rows.jsonl", "throughput.jsonl"), ("table.md", "throughput.md")):
                    if (thr_dir / src).exists():
                        shutil.copyfile(thr_dir / src, out / dst)
                shutil.rmtree(thr_dir, ignore_errors=True)
            results.append(r)
    total = time.monotonic() - t_start
    lines = [
        f"# gpu_check ({env['mode']})",
        "",
        f"device {env.get('device')}, driver {env.get('driver')}, torch {env.get('torch')} (CUDA {env.get('cuda')}), "
        f"triton {env.get('triton')}, diffusers {env.get('diffusers')}, transformers {env.get('transformers')}, "
        f"git {env.get('git_sha')}",
        "",
        "| step | status | exit code | seconds |",
        "|---|---|---|---|",
        *(f"| {r['step']} | {r['status']} | {r['rc']} | {r['seconds']} |" for r in results),
        "",
        f"total {total:.0f} s",
    ]
    (out / "summary.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    extra_files = sorted(p.name for p in out.iterdir() if p.name not in FILES)
    assert not extra_files, f"gpu_check wrote files outside its list of {MAX_FILES}: {extra_files}"
    bad = [r for r in results if r["status"] in ("failed", "timeout")]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
