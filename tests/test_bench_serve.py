"""``python -m zimage_bench serve``: its percentiles against numpy's, and one small end-to-end run against one server
process (``--replicas 0``: the Ray target is covered by tests/test_ray_serve.py) writing rows, table and plot."""

from __future__ import annotations

import json

import numpy as np
import pytest

from zimage_bench import serve


@pytest.mark.parametrize("n", [1, 2, 5, 17])
def test_percentiles_match_numpy(n):
    xs = list(np.random.default_rng(n).exponential(100.0, size=n))
    for q in (50, 95, 99):
        assert serve.percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)), rel=1e-12)
    assert serve.percentile([], 50) is None


def test_summary_counts_and_rate():
    s = serve.summarize([100.0, 300.0, 200.0], wall_s=1.5, errors=1)
    assert (s["requests"], s["ok"], s["errors"]) == (4, 3, 1)
    assert s["req_per_s"] == pytest.approx(2.0)
    assert s["p50_ms"] == 200.0 and s["mean_ms"] == pytest.approx(200.0)


def test_bench_serve_end_to_end_one_process(tmp_path, capsys):
    pytest.importorskip("websockets")
    out = tmp_path / "serve"
    argv = ["--replicas", "0", "--requests", "2", "--concurrency", "1,2", "--steps", "1", "--warmup", "1"]
    rc = serve.main([*argv, "--out", str(out)])
    assert rc == 0
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert [(r["target"], r["concurrency"]) for r in rows] == [
        ("direct", 1), ("server", 1), ("direct", 2), ("server", 2)
    ]  # fmt: skip
    for r in rows:
        assert r["ok"] == 2 and r["errors"] == 0 and r["req_per_s"] > 0
        assert r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"]
        assert r["model_kind"] == "trained-small" and r["env"]["python"]
    srv = [r for r in rows if r["target"] == "server"]
    direct = [r for r in rows if r["target"] == "direct"]
    for s, d in zip(srv, direct):  # the ratios are the measured ones of the same level
        assert s["latency_ratio"] == pytest.approx(s["p50_ms"] / d["p50_ms"])
        assert s["throughput_ratio"] == pytest.approx(d["req_per_s"] / s["req_per_s"])
    table = (out / "table.md").read_text()
    assert table.splitlines()[0].startswith("| target | clients |") and len(table.splitlines()) == 2 + 4
    assert (out / "latency_vs_concurrency.png").stat().st_size > 1000
    assert "| server | 2 |" in capsys.readouterr().out
