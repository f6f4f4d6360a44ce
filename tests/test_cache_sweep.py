"""``python -m zimage_bench cache --sweep``: the grid covers every method × calibrator × step mask, the Pareto marking,
and a small run whose static-mask row is checked against the evaluation count worked out by hand."""

import json

import pytest

from zimage_bench import cache_sweep as cs


def test_the_grid_covers_every_method_calibrator_and_mask():
    for steps, cfg in ((50, True), (8, False)):
        g = cs.grid(steps, cfg)
        combos = {(s.info["variant"], s.info["calibrator"], s.info["mask"]) for s in g}
        masks = set(cs._masks(steps))
        want = {(v, c, m) for v in cs.METHOD_VARIANTS for c in cs.CALIBRATOR_NAMES for m in masks}
        assert combos == want
        assert any(s.info["cfg_split"] for s in g) == cfg  # CFG-split settings only where CFG is on
        assert len({s.name for s in g}) == len(g)


def test_pareto_marks_the_non_dominated_rows():
    pts = {"a": (1.0, 60.0), "b": (2.0, 50.0), "c": (2.0, 45.0), "d": (3.0, 40.0), "e": (1.5, 49.0), "f": (3.0, 40.0)}
    rows = [
        {"model_label": "m", "impl": "ours", "steps": 50, "setting": k, "evals_saved": x, "psnr": y}
        for k, (x, y) in pts.items()
    ]
    cs.mark_pareto(rows)
    # c is dominated by b (same saving, lower PSNR), e by b; d and f tie and both stay
    assert {r["setting"] for r in rows if r["pareto"]} == {"a", "b", "d", "f"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from zimage_core.components import RANDOM_TRANSFORMER, build_random_pipeline

    f = tmp_path_factory.mktemp("sweep") / "pipe3"
    build_random_pipeline(f, seed=5, config=RANDOM_TRANSFORMER.replace(n_layers=3))
    return f


@pytest.mark.slow
def test_small_sweep_run(folder, tmp_path, capsys):
    out = tmp_path / "o"
    argv = ["--sweep", "--model", str(folder), "--scenarios", "8:3", "--grid", "small", "-n", "1", "--size", "64"]
    assert cs.main([*argv, "--no-cache-dit", "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "rows.jsonl").read_text().splitlines()]
    assert rows and all(r["model_label"] == "random" and r["impl"] == "ours" for r in rows)
    # TeaCache, static mask W1K3 on 8 steps: computes 0, 3, 6 (mask) and 7 (last); reuses 1, 2, 4, 5 running no
    # main layer: 8 evaluations' worth of layers done in 4 -> 2x
    (tea,) = [r for r in rows if r["setting"] == "tea static W1K3 none"]
    assert tea["evals_saved"] == pytest.approx(8 / 4)
    # FBCache on the same mask still runs its first layer (of 3) on reuses: 24 / (4·3 + 4·1)
    (fb,) = [r for r in rows if r["setting"] == "fb static W1K3 none"]
    assert fb["evals_saved"] == pytest.approx(24 / 16)
    assert all(0 < r["psnr"] <= 100 and r["speedup"] > 0 for r in rows)
    assert (out / "pareto.png").stat().st_size > 10_000
    text = (out / "table.md").read_text()
    assert "## Pareto front" in text and "tea static W1K3 none" in text


def test_heldout_prompt_file_is_the_default_model_s_first_eight_heldout_eval_captions():
    """docs/cache-presets.md measures the presets on zimage_bench/prompts-heldout8.txt: the first 8 of the default
    model's fixed held-out evaluation captions (none of them trained on)."""
    from pathlib import Path

    from zimage_core.train import dataset

    lines = (Path(__file__).parents[1] / "zimage_bench" / "prompts-heldout8.txt").read_text().splitlines()
    assert lines == [s.caption for s, _ in dataset.eval_prompts(0, 48)][:8]
    train, _ = dataset.split(0)
    assert not set(lines) & {s.caption for s in train}


def test_rope_axes_follow_z_image_s_proportions():
    from zimage_bench.cache_sweep import rope_axes
    from zimage_core.config import ZImageConfig

    assert rope_axes(128) == ZImageConfig().axes_dims  # the real model's (32, 48, 48)
    assert rope_axes(32) == (8, 12, 12)
