"""TeaCache calibration (zimage_bench.calibrate) and the cache benchmark's metrics and smoke run
(zimage_bench.cache)."""

import json

import numpy as np
import pytest
import torch

from zimage_bench import calibrate as cal
from zimage_core.cache.teacache import load_table, lookup


def test_fit_recovers_a_known_polynomial_and_reports_r2():
    rng = np.random.default_rng(0)
    x = rng.uniform(0.0, 0.5, 200)
    true = [3.0, -2.0, 1.5, 0.1]
    coeffs, r2 = cal.fit(x, np.polyval(true, x), degree=3)
    np.testing.assert_allclose(coeffs, true, atol=1e-8)
    assert r2 == pytest.approx(1.0)
    noisy = np.polyval(true, x) + rng.normal(0, 0.05, len(x))
    _, r2 = cal.fit(x, noisy, degree=3)
    assert 0.5 < r2 < 1.0
    assert cal.r_squared([1.0, 2.0, 3.0], [2.0, 2.0, 2.0]) == pytest.approx(0.0)  # the mean predicts R² 0
    with pytest.raises(ValueError, match="points"):
        cal.fit([0.1, 0.2], [0.1, 0.2], degree=4)


def test_bundled_prompts():
    prompts = cal.load_prompts()
    assert len(prompts) >= 32 and len(set(prompts)) == len(prompts)
    assert cal.load_prompts(n=3) == prompts[:3]


def test_a_model_with_its_own_prompts_uses_them_unless_a_file_is_given(tmp_path):
    class Pipe:
        meta = {"prompts": ["a red circle", "a blue square", "a green triangle"]}

    assert cal.load_prompts(pipe=Pipe()) == Pipe.meta["prompts"]
    assert cal.load_prompts(n=2, pipe=Pipe()) == Pipe.meta["prompts"][:2]
    f = tmp_path / "p.txt"
    f.write_text("one\n\ntwo\n")
    assert cal.load_prompts(str(f), pipe=Pipe()) == ["one", "two"]
    Pipe.meta = {}
    assert cal.load_prompts(pipe=Pipe()) == cal.load_prompts()


@pytest.fixture(scope="module")
def pipe_folder(tmp_path_factory):
    from zimage_core.components import RANDOM_TRANSFORMER, build_random_pipeline

    folder = tmp_path_factory.mktemp("cal") / "pipe3"
    build_random_pipeline(folder, seed=5, config=RANDOM_TRANSFORMER.replace(n_layers=3))
    return folder


def test_calibration_command_records_fits_and_stores_an_entry(pipe_folder, tmp_path, capsys):
    from zimage_core.pipeline import ZImage

    table = tmp_path / "table.json"
    argv = ["--model", str(pipe_folder), "-n", "2", "--steps", "6", "--cfg-scale", "3", "--size", "64"]
    assert cal.main([*argv, "--degree", "2", "--table", str(table)]) == 0
    (entry,) = load_table(table)
    assert entry["points"] == 2 * (6 - 1)  # every evaluation after each prompt's first
    assert entry["degree"] == 2 and len(entry["coefficients"]) == 3
    assert entry["r2"] <= 1.0 and entry["model_kind"] == "random" and entry["steps"] == 6
    pipe = ZImage.from_pretrained(pipe_folder, device="cpu", dtype=torch.float32)
    got = lookup(pipe, entry["preset"], path=table)
    assert got.source["kind"] == "calibrated" and got.coefficients == tuple(entry["coefficients"])
    # re-running replaces the entry for the same (model, preset) instead of appending
    assert cal.main([*argv, "--degree", "3", "--table", str(table)]) == 0
    (entry,) = load_table(table)
    assert entry["degree"] == 3
    assert "R²" in capsys.readouterr().err


# ---- bench cache -------------------------------------------------------------------------------------------------


def test_psnr_is_computed_in_float_not_wrapped_uint8():
    from zimage_bench.cache import psnr, ssim

    a = np.array([[[10, 200, 50]]], dtype=np.uint8)
    b = np.array([[[12, 100, 50]]], dtype=np.uint8)
    mse = (4 + 100**2 + 0) / 3  # 3334.67, not the 6.67 that uint8 arithmetic gives
    assert psnr(a, b) == pytest.approx(10 * np.log10(255**2 / mse))
    assert psnr(a, a) == 100.0
    img = np.random.default_rng(0).integers(0, 256, (32, 32, 3)).astype(np.uint8)
    assert ssim(img, img) == pytest.approx(1.0)
    noisy = np.clip(img + np.random.default_rng(1).normal(0, 40, img.shape), 0, 255)
    assert 0.0 < ssim(img, noisy) < 0.9


@pytest.mark.slow
def test_bench_cache_smoke(pipe_folder, tmp_path, capsys):
    from zimage_bench.cache import main

    out = tmp_path / "out"
    argv = ["--model", str(pipe_folder), "-n", "1", "--steps", "5", "--size", "64", "--cfg-scale", "3"]
    argv += ["--fb-thresholds", "0,5", "--tea-thresholds", "5", "--db-thresholds", "5", "--out", str(out)]
    assert main(argv) == 0
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert {r["method"] for r in rows} == {"none", "fb", "tea", "db", "steps"}
    for r in rows:
        assert r["model_label"] == "random" and r["steps"] == 5
        assert {"device", "device_label", "torch", "triton", "git_sha"} <= set(r["env"])
    fb0 = next(r for r in rows if r["method"] == "fb" and r["threshold"] == 0)
    assert fb0["psnr_mean"] == 100.0 and fb0["evals_saved_factor"] == 1.0  # never hits: identical images
    tea = next(r for r in rows if r["method"] == "tea")
    assert tea["evals_saved_factor"] > 1.0 and tea["fewer_steps"]["sampler_steps"] < 5
    assert (out / "pareto.png").stat().st_size > 10_000
    text = capsys.readouterr().out
    assert "model: random" in text and "fewer-steps" in text
