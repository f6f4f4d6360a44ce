"""``python -m zimage_bench serve``: the network server under N concurrent clients, against calling ``infer`` directly.

Targets, measured in one run:
- ``direct``: ``ZImage.infer(request)`` in this process, one request after another (no network, no queue);
- ``server``: ``zimage serve`` as one process (one model, one queue);
- ``ray-2`` (``--replicas 2``): ``zimage serve --ray --replicas 2`` (Ray Serve, one model per replica).

Each server runs in its own subprocess on 127.0.0.1. For every concurrency level ``c``, ``c`` clients, each with its
own WebSocket connection speaking the hosted API's protocol (authenticate, then one ``imageInference`` task at a
time: a closed loop), send ``--requests`` tasks in total. Per level: requests/s (tasks / wall time of the level),
latency percentiles (send → result frame), errors, and the **overhead ratios** against ``direct`` measured
alongside it (same level, just before it): ``p50 / direct p50`` and ``direct req/s / req/s``. A level of ``direct``
runs ``--requests`` calls one after another whatever ``c`` is (one model in one process serves one at a time).

Writes ``<out>/rows.jsonl`` (one row per target and level, with the environment), ``<out>/table.md`` and
``<out>/latency_vs_concurrency.png``; prints the table. CPU figures on the embedded toy model measure the server's
own overhead (protocol, queue, encoding, Ray's proxy) next to a small model; they are not GPU serving capacity.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

from . import report
from .common import say
from .timing import fmt

PROMPT = "a large blue circle in the top right on a red background"


def percentile(xs: list[float], q: float) -> float | None:
    """Linear-interpolation percentile (numpy's default), ``q`` in [0, 100]."""
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(k), math.ceil(k)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def summarize(latencies_ms: list[float], wall_s: float, errors: int) -> dict:
    n = len(latencies_ms)
    return {
        "requests": n + errors,
        "ok": n,
        "errors": errors,
        "wall_s": wall_s,
        "req_per_s": n / wall_s if wall_s > 0 else None,
        "p50_ms": percentile(latencies_ms, 50),
        "p95_ms": percentile(latencies_ms, 95),
        "p99_ms": percentile(latencies_ms, 99),
        "mean_ms": sum(latencies_ms) / n if n else None,
    }


def make_task(args, seed: int) -> dict:
    t = {
        "taskType": "imageInference",
        "taskUUID": str(uuid.uuid4()),
        "positivePrompt": args.prompt,
        "width": args.size,
        "height": args.size,
        "steps": args.steps,
        "seed": seed,
        "outputType": "base64Data",
        "outputFormat": "PNG",
        "numberResults": 1,
    }
    if args.model_id:
        t["model"] = args.model_id
    return t


# ---- clients over the real protocol ----------------------------------------------------------------------------
async def _client(url: str, tasks: list[dict], timeout: float) -> tuple[list[float], int]:
    import websockets

    lat, errors = [], 0
    async with websockets.connect(url, max_size=None, open_timeout=60) as ws:
        await ws.send(json.dumps([{"taskType": "authentication", "apiKey": "bench"}]))
        auth = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        if "errors" in auth:
            raise RuntimeError(f"authentication failed: {auth['errors']}")
        for task in tasks:
            t0 = time.perf_counter()
            await ws.send(json.dumps([task]))
            while True:
                frame = json.loads(await asyncio.wait_for(ws.recv(), timeout))
                if any(e.get("taskUUID") == task["taskUUID"] for e in frame.get("errors", [])):
                    errors += 1
                    break
                if any(it.get("taskUUID") == task["taskUUID"] and it.get("imageUUID") for it in frame.get("data", [])):
                    lat.append((time.perf_counter() - t0) * 1000)
                    break
    return lat, errors


def run_clients(url: str, tasks: list[dict], concurrency: int, timeout: float = 300.0) -> dict:
    """``concurrency`` connections; task ``i`` goes to client ``i % concurrency``; returns the level's summary."""
    shares = [tasks[i::concurrency] for i in range(concurrency)]

    async def go():
        return await asyncio.gather(*[_client(url, s, timeout) for s in shares if s])

    t0 = time.perf_counter()
    results = asyncio.run(go())
    wall = time.perf_counter() - t0
    return summarize([x for lat, _ in results for x in lat], wall, sum(e for _, e in results))


def run_direct(pipe, tasks: list[dict]) -> dict:
    lat, errors = [], 0
    t0 = time.perf_counter()
    for task in tasks:
        t = time.perf_counter()
        items = pipe.infer(dict(task))
        if any(it.get("imageUUID") for it in items):
            lat.append((time.perf_counter() - t) * 1000)
        else:
            errors += 1
    return summarize(lat, time.perf_counter() - t0, errors)


# ---- servers in subprocesses -------------------------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``zimage serve`` (optionally ``--ray --replicas N``) in a subprocess; ready once ``/healthz?ready=1`` is 200
    ``ready_checks`` times in a row (under Ray each check may reach another replica)."""

    def __init__(self, args, replicas: int = 0):
        self.port = _free_port()
        cmd = [sys.executable, "-c", "import sys; from zimage_core.cli import main; sys.exit(main())", "serve"]
        cmd += ["--host", "127.0.0.1", "--port", str(self.port), "--queue", str(max(64, max(args.concurrency) * 2))]
        if args.model:
            cmd += ["--model", args.model]
        if replicas:
            cmd += ["--ray", "--replicas", str(replicas)]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), MKL_NUM_THREADS=str(args.threads))
        env.setdefault("ZIMAGE_LOG_LEVEL", "warning")
        self.log = open(args.out / f"server-{'ray' if replicas else 'one'}.log", "w")  # noqa: SIM115
        self.proc = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        self.replicas = replicas

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1"

    def wait_ready(self, timeout: float) -> None:
        deadline, streak = time.monotonic() + timeout, 0
        need = 4 * max(self.replicas, 1) if self.replicas else 1
        while streak < need:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}; see {self.log.name}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server was not ready within {timeout:.0f} s; see {self.log.name}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz?ready=1", timeout=5) as r:
                    streak = streak + 1 if r.status == 200 else 0
            except OSError:
                streak = 0
            time.sleep(0.25 if streak else 1.0)

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(2)  # SIGINT: the server drains; under Ray, Serve and the local Ray shut down
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


# ---- report ------------------------------------------------------------------------------------------------------
COLUMNS = [
    ("target", lambda r: r["target"]),
    ("clients", lambda r: r["concurrency"]),
    ("requests", lambda r: r["requests"]),
    ("errors", lambda r: r["errors"]),
    ("req/s", lambda r: fmt(r["req_per_s"])),
    ("p50 ms", lambda r: fmt(r["p50_ms"])),
    ("p95 ms", lambda r: fmt(r["p95_ms"])),
    ("p99 ms", lambda r: fmt(r["p99_ms"])),
    ("p50 / direct p50", lambda r: fmt(r.get("latency_ratio"))),
    ("direct req/s / req/s", lambda r: fmt(r.get("throughput_ratio"))),
]


def plot(rows: list[dict], path: Path, title: str) -> Path | None:
    plt = report._pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for target in dict.fromkeys(r["target"] for r in rows):
        sel = sorted(
            (r for r in rows if r["target"] == target and r["p50_ms"] is not None), key=lambda r: r["concurrency"]
        )
        xs = [r["concurrency"] for r in sel]
        p50 = [r["p50_ms"] for r in sel]
        lo = [0.0 for _ in sel]
        hi = [r["p95_ms"] - r["p50_ms"] for r in sel]
        ax.errorbar(xs, p50, yerr=[lo, hi], marker="o", capsize=3, label=f"{target} (p50, bar to p95)")
    ax.set_xlabel("concurrent clients")
    ax.set_ylabel("latency per request (ms)")
    ax.set_xticks(sorted({r["concurrency"] for r in rows}))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(title, fontsize=8)
    return report.save_figure(fig, path)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m zimage_bench serve", description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", default="1,2,4", help="comma-separated client counts (default 1,2,4)")
    p.add_argument("--requests", type=int, default=12, help="tasks per target and level (default 12)")
    p.add_argument("--warmup", type=int, default=2, help="untimed tasks per server before its first level")
    p.add_argument("--size", type=int, default=128, help="width = height (default 128)")
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--model", default=None, help="a diffusers-format folder (default: the embedded default model)")
    p.add_argument("--model-id", default=None, help="the request's model field (default: the pipeline's default)")
    p.add_argument("--prompt", default=PROMPT)
    p.add_argument("--replicas", type=int, default=2, help="Ray Serve replicas for the ray target (0: skip it)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in this process and in each server/replica")
    p.add_argument("--ready-timeout", type=float, default=600.0, help="seconds a server may take to load")
    p.add_argument("--out", default=None, help="output folder (default zimage_bench/out/serve/)")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    args.concurrency = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if not args.concurrency or min(args.concurrency) < 1 or args.requests < 1:
        p.error("--concurrency needs positive integers and --requests >= 1")
    args.out = Path(args.out or Path(__file__).resolve().parent / "out" / "serve")
    args.out.mkdir(parents=True, exist_ok=True)

    import torch

    from zimage_core import ZImage

    from .env import device_label, environment

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    pipe = ZImage.from_pretrained(args.model) if args.model else ZImage.default()
    args.model_id = args.model_id or pipe.default_model
    env = environment("cpu" if not torch.cuda.is_available() else "cuda")
    model_kind = getattr(pipe, "meta", {}).get("kind", "real")
    base = {"command": "serve", "device": device_label(env), "model_kind": model_kind, "size": args.size,
            "steps": args.steps, "threads": args.threads, "env": env}  # fmt: skip
    say(f"serve: {args.model_id} [{model_kind}] {args.size}² {args.steps} steps, levels {args.concurrency}, "
        f"{args.requests} requests each, on {base['device']}")  # fmt: skip
    for w in range(args.warmup):
        pipe.infer(make_task(args, 10_000 + w))

    targets = [("server", 0)] + ([(f"ray-{args.replicas}", args.replicas)] if args.replicas else [])
    rows: list[dict] = []
    seed = 0
    for name, replicas in targets:
        say(f"[{name}] starting")
        srv = ServerProcess(args, replicas)
        try:
            srv.wait_ready(args.ready_timeout)
            warm = [make_task(args, 20_000 + w) for w in range(max(args.warmup, 1) * max(replicas, 1))]
            run_clients(srv.url, warm, max(replicas, 1))
            for c in args.concurrency:
                tasks = [make_task(args, seed + i) for i in range(args.requests)]
                seed += args.requests
                direct = run_direct(pipe, tasks)  # alongside: the same tasks, just before the level
                level = run_clients(srv.url, tasks, c)
                d_row = {**base, "target": "direct", "paired_with": name, "concurrency": c, **direct}
                row = {**base, "target": name, "replicas": max(replicas, 1), "concurrency": c, **level}
                if direct["p50_ms"] and level["p50_ms"]:
                    row["latency_ratio"] = level["p50_ms"] / direct["p50_ms"]
                if direct["req_per_s"] and level["req_per_s"]:
                    row["throughput_ratio"] = direct["req_per_s"] / level["req_per_s"]
                rows += [d_row, row]
                say(f"  c={c}: {fmt(level['req_per_s'])} req/s, p50 {fmt(level['p50_ms'])} ms "
                    f"(direct {fmt(direct['p50_ms'])} ms), errors {level['errors']}")  # fmt: skip
        finally:
            srv.stop()

    report.write_jsonl(args.out / "rows.jsonl", rows)
    table = report.markdown(rows, COLUMNS)
    (args.out / "table.md").write_text(table + "\n")
    print(table)
    if not args.no_plots:
        title = (
            f"python -m zimage_bench serve: {args.size}² {args.steps} steps, {model_kind} model\n"
            f"{base['device']}, {args.threads} torch thread(s) per process"
        )
        path = plot(
            [r for r in rows if r["target"] != "direct"] + _direct_rows(rows),
            args.out / "latency_vs_concurrency.png",
            title,
        )
        if path:
            say(f"plot: {path}")
    say(f"serve: {time.perf_counter() - t_start:.0f} s; rows: {args.out / 'rows.jsonl'}")
    return 1 if any(r["errors"] for r in rows) else 0


def _direct_rows(rows: list[dict]) -> list[dict]:
    """One ``direct`` point per level for the plot (the first target's pairing)."""
    first = next((r["paired_with"] for r in rows if r["target"] == "direct"), None)
    return [r for r in rows if r["target"] == "direct" and r["paired_with"] == first]
