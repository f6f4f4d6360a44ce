"""The benchmark harness's own pieces on CPU: metrics, timers, shapes, rows/tables/plots, environment, telemetry,
configuration discovery (Triton, step caches) and the synthetic real-dims builder (on the meta device)."""

from __future__ import annotations

import json
import math
import sys
import types

import pytest
import torch

from zimage_bench import metrics, report, shapes, telemetry, timing
from zimage_bench.env import environment, git_info
from zimage_bench.pipelines import REAL_VAE, Recorder, cache_configs, parse_cache_spec


# ---- metrics ----------------------------------------------------------------------------------------------------
def test_metrics_known_values():
    b = torch.tensor([3.0, 4.0])
    a = torch.tensor([3.0, 4.5])
    assert metrics.max_abs(a, b) == pytest.approx(0.5)
    assert metrics.rel_l2(a, b) == pytest.approx(0.5 / 5.0)
    assert metrics.cosine(b, b) == pytest.approx(1.0)
    assert metrics.cosine(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])) == pytest.approx(0.0)
    # mse 0.125 on range 1 -> 10·log10(8)
    assert metrics.psnr(a, b) == pytest.approx(10 * math.log10(1 / 0.125))
    assert metrics.psnr(b, b) == math.inf
    assert metrics.compare(torch.tensor([float("nan"), 1.0]), b)["finite"] is False


# ---- timing -----------------------------------------------------------------------------------------------------
def test_stats_and_format():
    s = timing.Stats.of([3.0, 1.0, 2.0])
    assert (s.n, s.median, s.min, s.max, s.mean) == (3, 2.0, 1.0, 3.0, 2.0)
    assert timing.Stats.of([]) is None
    assert timing.fmt(1234.5) == "1234" and timing.fmt(12.345) == "12.3" and timing.fmt(0.5) == "0.500"
    assert timing.fmt(1.5e-7) == "1.50e-07" and timing.fmt(None) == "–" and timing.fmt(math.inf) == "inf"


def test_round_robin_rotates_and_balances():
    order = timing.round_robin(["a", "b", "c"], 3)
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert all(order.count(x) == 3 for x in "abc")


def test_measure_on_cpu_separates_warmup():
    calls = []
    out = timing.measure(lambda: calls.append(1), warmup=2, repeats=3, device="cpu")
    assert len(calls) == 5 and len(out["samples_ms"]) == 3 and out["first_call_ms"] >= 0
    assert timing.peak_memory_gb(torch.device("cpu")) is None


class FakeClock:
    """Marks are integers handed out in order; ms between marks is their difference."""

    def __init__(self):
        self.t = 0

    def mark(self):
        self.t += 1
        return self.t

    def ms(self, a, b):
        return float(b - a)


def test_recorder_step_durations_per_sequence():
    # two sequences (results) of two steps each, one forward per step
    rec = Recorder(FakeClock(), steps_per_seq=2)
    for _ in range(2):
        for _ in range(2):
            rec.forward_begin()
            rec.forward_end()
            rec.step_end(torch.zeros(1))
    # marks: f0b=1 f0e=2 s0=3 | f1b=4 f1e=5 s1=6 | f2b=7 f2e=8 s2=9 | f3b=10 f3e=11 s3=12
    assert rec.forward_ms() == [1.0, 1.0, 1.0, 1.0]
    assert rec.step_ms() == [2.0, 3.0, 2.0, 3.0]  # first step of a sequence: from its forward's start


# ---- shapes -----------------------------------------------------------------------------------------------------
def test_shape_parse_roundtrip_and_presets():
    s = shapes.Shape.parse("1024x768/b4/base50")
    assert (s.width, s.height, s.batch, s.preset, s.steps) == (1024, 768, 4, "base", 50)
    assert s.name == "1024x768/b4/base50" and s.cfg and s.cfg_scale == 5.0 and s.shift == 6.0
    t = shapes.Shape.parse("512x512/b1/turbo8")
    assert not t.cfg and t.shift == 3.0 and t.cfg_normalization == 0.0
    for bad in ("1024x768", "1024x768/b4/fast8", "0x16/b1/base2"):
        with pytest.raises(ValueError):
            shapes.Shape.parse(bad)


def test_shape_tables():
    full = shapes.TABLES["full"]
    assert len(full) == 4 * 2 * 3 and len(set(full)) == len(full)
    assert {(s.width, s.height) for s in shapes.TABLES["gpu"]} == {(512, 512), (1024, 1024), (1024, 768), (2048, 2048)}
    assert {s.batch for s in shapes.TABLES["gpu"]} == {1, 4}
    assert max(s.pixels for s in shapes.TABLES["cpu"]) <= 256 * 256
    assert shapes.resolve(None, "cpu") == list(shapes.TABLES["cpu"])
    assert shapes.resolve(None, "cuda") == list(shapes.TABLES["gpu"])
    picked = shapes.resolve("test,64x64/b1/turbo2,96x64/b1/base3", "cpu")
    assert [s.name for s in picked] == ["64x64/b1/turbo2", "64x64/b2/base2", "96x64/b1/base3"]


# ---- report -----------------------------------------------------------------------------------------------------
def test_rows_are_strict_json(tmp_path):
    rows = [{"a": math.inf, "b": [1.0, -math.inf, math.nan], "s": timing.Stats.of([1.0]), "t": torch.tensor([1, 2])}]
    path = report.write_jsonl(tmp_path / "r.jsonl", rows)

    def no_constants(name):
        raise AssertionError(f"non-standard JSON constant {name}")

    line = path.read_text().splitlines()[0]
    back = json.loads(line, parse_constant=no_constants)
    assert back["a"] == "inf" and back["b"] == [1.0, "-inf", "nan"] and back["s"]["median"] == 1.0
    assert back["t"] == [1, 2] and report.as_float(back["a"]) == math.inf
    report.write_jsonl(path, rows, append=True)
    assert len(report.read_jsonl(path)) == 2


def test_markdown_table_and_accessors():
    rows = [{"x": 1, "e2e_ms": {"median": 2.0, "min": 1.0, "max": 3.0}, "psnr_db": "inf"}]
    text = report.markdown(rows, [("x", lambda r: r["x"]), ("e2e", lambda r: report.stat(r, "e2e_ms"))])
    assert text.splitlines() == ["| x | e2e |", "|---|---|", "| 1 | 2.00 [1.00–3.00] |"]
    assert report.get(rows[0], "e2e_ms.median") == 2.0 and report.get(rows[0], "nope.x") is None
    assert report.psnr_text(rows[0]) == "identical"


def _fake_rows():
    out = []
    for w, h in ((64, 64), (128, 96)):
        for config, ms, psnr in (("diffusers-eager", 10.0, None), ("ours-torch", 8.0, "inf"), ("ours-x", 5.0, 30.0)):
            out.append(
                {
                    "status": "ok",
                    "config": config,
                    "reference": "diffusers-eager",
                    "width": w,
                    "height": h,
                    "batch": 1,
                    "preset": "turbo",
                    "steps": 8,
                    "e2e_ms": {"median": ms * w / 64, "min": ms * w / 80, "max": ms * w / 50},
                    "speedup": 10.0 / ms,
                    "psnr_db": psnr,
                }
            )
    return out


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    a = report.plot_latency_by_resolution(_fake_rows(), tmp_path / "lat.png", title="t")
    b = report.plot_speed_vs_quality(_fake_rows(), tmp_path / "q.png", title="t")
    for p in (a, b):
        assert p is not None and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.plot_latency_by_resolution([], tmp_path / "none.png") is None


# ---- environment and telemetry ------------------------------------------------------------------------------------
def test_environment_names_versions_and_git():
    env = environment("cpu")
    for key in ("torch", "triton", "diffusers", "transformers", "python", "cpu", "torch_threads", "git_sha"):
        assert key in env
    assert env["torch"] == torch.__version__.split("+")[0] or env["torch"].startswith(torch.__version__[:4])
    sha = git_info()["git_sha"]
    assert sha is None or (len(sha) == 40 and all(c in "0123456789abcdef" for c in sha))
    json.dumps(report.jsonable(env))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU behaviour")
def test_gpu_telemetry_is_gracefully_absent_without_a_gpu():
    tel = telemetry.GpuTelemetry(0)
    assert tel.available is False and tel.reason
    tel.start()
    summary = tel.stop()
    assert summary == {"telemetry": tel.reason}


def test_rss_telemetry_and_merge():
    tel = telemetry.for_device(torch.device("cpu"))
    with tel:
        torch.ones(1000, 1000).sum()
    assert tel.summary["rss_mb_max"] > 0 and tel.summary["samples"] >= 1
    merged = telemetry.merge(
        [
            {"energy_j": 1.0, "power_w_max": 3, "power_w_median": 2},
            {},
            {"energy_j": 2.0, "power_w_max": 5, "power_w_median": 4},
        ]
    )
    assert merged == {"energy_j": 3.0, "power_w_max": 5, "power_w_median": 3.0}


# ---- configuration discovery --------------------------------------------------------------------------------------
def test_cache_spec_parsing():
    assert parse_cache_spec(None) == {"fbcache": 0.25, "teacache": 0.5, "dbcache": 0.25}
    assert parse_cache_spec("fbcache=0.1, teacache") == {"fbcache": 0.1, "teacache": 0.5}


def test_caches_through_the_assumed_interface(monkeypatch):
    class FakeCacheConfig:
        def __init__(self, method, threshold):
            self.method, self.threshold = method, threshold

        @classmethod
        def for_method(cls, method, threshold=None):
            if method == "teacache":
                raise ValueError("no coefficients for this model")
            return cls(method, threshold)

        def new_state(self):
            raise NotImplementedError

    mod = types.ModuleType("zimage_core.cache")
    mod.CacheConfig = FakeCacheConfig
    monkeypatch.setitem(sys.modules, "zimage_core.cache", mod)
    cfgs = {c.name: c for c in cache_configs("fbcache=0.1,teacache")}
    assert cfgs["ours-fbcache"].available and cfgs["ours-fbcache"].cache.threshold == 0.1
    assert not cfgs["ours-teacache"].available and "no coefficients" in cfgs["ours-teacache"].skip_reason


# ---- the real-dims synthetic model, checked without materialising it ---------------------------------------------
def test_real_config_builds_the_6b_transformer_and_the_real_vae_on_meta():
    from diffusers import AutoencoderKL, ZImageTransformer2DModel

    from zimage_core.config import ZImageConfig

    kwargs = {k: v for k, v in ZImageConfig().to_dict().items() if k != "_class_name"}
    with torch.device("meta"):
        t = ZImageTransformer2DModel(**kwargs)
        vae = AutoencoderKL(**REAL_VAE)
    assert sum(p.numel() for p in t.parameters()) == 6_154_908_736
    assert vae.config.block_out_channels == (128, 256, 512, 512) or list(vae.config.block_out_channels) == [
        128,
        256,
        512,
        512,
    ]
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 8
