"""``python -m zimage_bench cache --sweep``: the grid covers every method × calibrator × step mask, the Pareto marking,
and a small run whose static-mask row is checked against the evaluation count worked out by hand."""

import json

import pytest

from zimage_bench import cache_sweep as cs


def test_the_grid_covers_every_method_calibrator_and_mask():
    for steps, cfg in ((50, True), (8, False)):
        g = cs.grid(steps, cfg)
        combos = {(s.info["variant"], s.info["calibrator"], s.info["mask"]) for s in g if s.method != "velocity"}
        masks = set(cs._masks(steps))
        want = {(v, c, m) for v in cs.METHOD_VARIANTS for c in cs.CALIBRATOR_NAMES for m in masks}
        assert combos == want
        # the velocity cache on every static mask, copying and with the drift correction
        velocity = {(s.info["mask"], s.kw["correction"]) for s in g if s.method == "velocity"}
        assert velocity == {(m, a) for m in masks if m.startswith("static") for a in (0.0, 0.5)}
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
    # --heldout N reads the whole set from a file (the bench imports no training code)
    assert cs.HELDOUT48.read_text().splitlines() == [s.caption for s, _ in dataset.eval_prompts(0, 48)]
    train, _ = dataset.split(0)
    assert not set(lines) & {s.caption for s in train}


def test_rope_axes_follow_z_image_s_proportions():
    from zimage_bench.cache_sweep import rope_axes
    from zimage_core.config import ZImageConfig

    assert rope_axes(128) == ZImageConfig().axes_dims  # the real model's (32, 48, 48)
    assert rope_axes(32) == (8, 12, 12)


def test_db_f1b1_bound_is_the_hand_worked_ratio():
    # 4 layers, 50 steps: k full steps -> 200 / (4k + 2(50 - k)) = 200 / (100 + 2k); k = 1: 200/102, k = 2: 200/104
    # (1.923 >= 1.9), k = 3: 200/106 (1.887 < 1.9)
    assert cs.db_f1b1_bound(4, 50) == (2, pytest.approx(200 / 102))
    # 30 layers: 1500 / (30k + 2(50 - k)) >= 1.9 up to k = 24 (1500/772 = 1.943), not k = 25 (1500/800 = 1.875)
    assert cs.db_f1b1_bound(30, 50) == (24, pytest.approx(1500 / 128))
    assert cs.db_f1b1_bound(2, 50)[0] == 0  # two layers, both always run: nothing to save


def test_goals_report_mean_worst_and_the_f1b1_bound():
    base = {"model_label": "trained-small", "impl": "ours", "steps": 50, "cfg_scale": 3.0, "main_layers": 4}
    rows = [
        {**base, "setting": "tea a", "variant": "tea", "calibrator": "taylorseer1", "evals_saved": 6.25, "psnr": 45.5,
         "psnr_min": 40.0, "below_45": 3, "prompts": 8},
        {**base, "setting": "db F1B1 first+last only none", "variant": "db F1B1", "calibrator": "none",
         "evals_saved": 200 / 104, "psnr": 12.0, "psnr_min": 7.0, "below_45": 8, "prompts": 8},
        {**base, "setting": "preset quality", "variant": "tea", "calibrator": "taylorseer1", "evals_saved": 3.3,
         "psnr": 44.0, "psnr_min": 41.0, "below_45": 5, "prompts": 8},
    ]  # fmt: skip
    g = cs.goals(rows)
    assert g[0].startswith("≥ 6x fewer evaluations at ≥ 45 dB: MET") and "worst 40.0 dB, 3/8 captions below" in g[0]
    f1b1 = next(x for x in g if x.startswith("db F1B1"))
    assert "NOT MET" in f1b1 and "at most 1.96x" in f1b1 and "at most 2 of 50 steps" in f1b1 and "12.0 dB" in f1b1
    assert any(x.startswith("every named preset ≥ 45 dB: NOT MET") for x in g)  # quality's mean is 44.0


def test_heldout_takes_no_prompt_file():
    with pytest.raises(SystemExit, match="--heldout"):
        cs.main(["--sweep", "--heldout", "4", "--prompts", "x.txt"])
    with pytest.raises(SystemExit, match="--heldout"):
        cs.main(["--sweep", "--heldout", "49"])


@pytest.mark.slow
def test_goal_settings_run(folder, tmp_path):
    """--goal-settings on a 3-layer model, 8 steps: DBCache F1B1 with only the first and last step computing runs
    all 3 layers on 2 steps and the head and tail (2 of 3) on the other 6: 24 / (2·3 + 6·2) = 24 / 18."""
    out = tmp_path / "g"
    argv = ["--sweep", "--model", str(folder), "--scenarios", "8:3", "--goal-settings", "-n", "1", "--size", "64"]
    assert cs.main([*argv, "--out", str(out)]) == 0
    rows = {r["setting"]: r for r in map(json.loads, (out / "rows.jsonl").read_text().splitlines())}
    assert {s.name for s in cs.goal_settings(8)} | {s.name for s in cs.preset_settings()} == set(rows)
    assert rows["db F1B1 first+last only none"]["evals_saved"] == pytest.approx(24 / 18)
    assert rows["tea t1 c6 none none"]["prompts"] == 1 and 0 <= rows["tea t1 c6 none none"]["below_45"] <= 1
    assert rows["control (fb 0: computes every step)"]["psnr"] == 100.0  # identical to the uncached image
    assert "## goals" in (out / "table.md").read_text()
