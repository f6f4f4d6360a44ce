"""Step caches wired into ZImage.generate, the request API and the CLI: exactness, stats, window, CFG reset,
image-to-image start step, Taylor extrapolation, TeaCache coefficients, and per-request state under threads."""

import threading
from types import SimpleNamespace

import pytest
import torch
from PIL import Image

from tests.helpers import image_request
from zimage_core.cache import CacheConfig, DBCacheConfig, FBCacheConfig, TeaCacheConfig, from_request
from zimage_core.cache.teacache import lookup, model_fingerprint, save_entry
from zimage_core.hooks import run_stack
from zimage_kernels import TORCH_OPS

STEPS = 8
BIG = 1e9  # a threshold nothing reaches: every step that may reuse does


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    """A random pipeline with 4 main layers (fp32, CPU), so head / middle / tail splits are all non-trivial."""
    from zimage_core.components import RANDOM_TRANSFORMER, build_random_pipeline
    from zimage_core.pipeline import Defaults, ZImage

    folder = tmp_path_factory.mktemp("cache") / "pipe4"
    build_random_pipeline(folder, seed=3, config=RANDOM_TRANSFORMER.replace(n_layers=4))
    p = ZImage.from_pretrained(folder, device="cpu", dtype=torch.float32)
    fast = Defaults(steps=STEPS, cfg_scale=3.0, shift=3.0, width=64, height=64)
    p.presets = {"runware:z-image@0": fast, "z-image-turbo": fast}
    p.folder = folder
    return p


def gen(pipe, prompt="a red fox", cache=None, **kw):
    kw.setdefault("seed", 7)
    kw.setdefault("output_type", "latent")
    return pipe.generate(prompt, cache=cache, **kw)


@pytest.fixture(scope="module")
def uncached(pipe):
    return gen(pipe)


def summary(result):
    (s,) = result.stats["cache"]
    return s


@pytest.mark.parametrize(
    "config",
    [
        FBCacheConfig(threshold=0.0),
        TeaCacheConfig(threshold=0.0),
        TeaCacheConfig(threshold=0.0, coefficients=(-5.0, 0.1)),  # negative rescaling is clamped: still no reuse
        DBCacheConfig(threshold=0.0),
        DBCacheConfig(threshold=0.0, taylor=True, skip_interval=None),
    ],
    ids=["fb", "tea", "tea-negative-poly", "db", "db-taylor"],
)
def test_threshold_zero_is_bit_identical_to_no_cache(pipe, uncached, config):
    r = gen(pipe, cache=config)
    assert torch.equal(r.latents, uncached.latents)
    s = summary(r)
    assert s["reused_forwards"] == 0 and s["computed_steps"] == list(range(STEPS))
    assert s["main_layer_evals"] == s["main_layer_evals_uncached"] == 4 * STEPS


@pytest.mark.parametrize(
    "config,reused,layers_on_reuse",
    [
        # cap 3: 0 first, 1-3 reuse, 4 cap, 5-6 reuse, 7 last
        (FBCacheConfig(threshold=BIG), [1, 2, 3, 5, 6], 1),
        (TeaCacheConfig(threshold=BIG), [1, 2, 3, 5, 6], 0),
        # F2B1 of 4 layers: one middle layer. Skip interval 5: refresh at 5 (grid from step 0); cap at 4
        (DBCacheConfig(threshold=BIG, fn=2, bn=1, skip_interval=5), [1, 2, 3, 6], 3),
    ],
    ids=["fb", "tea", "db"],
)
def test_stats_list_decisions_and_main_layer_evaluations(pipe, uncached, config, reused, layers_on_reuse):
    r = gen(pipe, cache=config)
    s = summary(r)
    assert s["method"] == config.method and s["threshold"] == config.threshold
    assert s["reused_steps"] == reused
    assert s["computed_steps"] == sorted(set(range(STEPS)) - set(reused))
    decisions = s["decisions"]
    assert [d["step"] for d in decisions] == list(range(STEPS))
    assert decisions[0]["reason"] == "first" and decisions[-1]["reason"] == "last"
    assert all(d["change"] is not None for d in decisions if not d["computed"])  # each reuse was measured
    assert s["main_layer_evals"] == 4 * (STEPS - len(reused)) + layers_on_reuse * len(reused)
    assert s["main_layer_evals_uncached"] == 4 * STEPS
    assert s["evals_saved_factor"] == pytest.approx(s["main_layer_evals_uncached"] / s["main_layer_evals"])
    assert all(d["batch"] == 2 for d in decisions)  # CFG: positive and negative share one decision
    assert r.stats["forwards"] == STEPS and not torch.equal(r.latents, uncached.latents)
    assert torch.isfinite(r.latents).all()


def test_window_limits_reuse_to_its_steps(pipe):
    r = gen(pipe, cache=FBCacheConfig(threshold=BIG, window=(2, 5), max_consecutive=5))
    s = summary(r)
    assert s["reused_steps"] == [2, 3, 4]
    reasons = {d["step"]: d["reason"] for d in s["decisions"]}
    assert [reasons[i] for i in (1, 5, 6)] == ["outside-window"] * 3
    # through the request API's form (half-open window from cacheStartStep/cacheEndStep)
    cfg = from_request({"method": "fb", "threshold": 0.3, "max_consecutive": 2}, (2, 5), STEPS, pipe)
    assert isinstance(cfg, FBCacheConfig) and cfg.window == (2, 5) and cfg.max_consecutive == 2


def test_cfg_truncation_switching_the_batch_resets_the_cache(pipe):
    # CFG only while t = 1 − σ ≤ 0.2 (steps 0-3 here): the batch goes 2 → 1 mid-run; the cached [2, N, C] tensors
    # no longer fit
    r = gen(pipe, cache=FBCacheConfig(threshold=BIG), cfg_truncation=0.2)
    d = summary(r)["decisions"]
    batches = [x["batch"] for x in d]
    switch = batches.index(1)
    assert 0 < switch < STEPS - 1 and set(batches[:switch]) == {2} and set(batches[switch:]) == {1}
    assert d[switch]["reason"] == "reset" and d[switch]["computed"]
    assert summary(r)["resets"] == 1
    assert any(not x["computed"] for x in d[switch + 1 :])  # caching resumes on the new shape
    # never hitting, the same run is bit-identical to the uncached one
    plain = gen(pipe, cfg_truncation=0.2)
    assert torch.equal(gen(pipe, cache=FBCacheConfig(threshold=0.0), cfg_truncation=0.2).latents, plain.latents)


def test_image_to_image_run_starts_at_its_own_first_step(pipe):
    seed_image = Image.new("RGB", (64, 64), (120, 40, 200))
    r = gen(pipe, cache=TeaCacheConfig(threshold=BIG), seed_image=seed_image, strength=0.5)
    d = summary(r)["decisions"]
    assert [x["step"] for x in d] == list(range(4, STEPS))  # absolute schedule steps
    assert d[0]["reason"] == "first" and d[-1]["reason"] == "last"


def _fake_layer(weight):
    """A 'layer' whose residual is linear in the timestep t = adaln_input: h + t·w."""
    return lambda h, inp: h + inp.adaln_input * weight


def test_taylor_extrapolates_the_residual_in_sigma():
    torch.manual_seed(0)
    ws = [torch.randn(1, 3, 5) for _ in range(4)]
    layers = [_fake_layer(w) for w in ws]
    sigmas = [1.0, 0.9, 0.75, 0.6, 0.5, 0.35, 0.2, 0.1]

    def run(config):
        state, outs = config.new_state(num_steps=len(sigmas)), []
        for i, sigma in enumerate(sigmas):
            inp = SimpleNamespace(ops=TORCH_OPS, adaln_input=torch.tensor(1.0 - sigma), kv_lens=None)
            state.observe(lambda x, s: None)(None, sigma)
            outs.append(run_stack(torch.ones(1, 3, 5), inp, layers, [state]))
            state.end_step(i)
        return outs, state.summary()

    exact, _ = run(DBCacheConfig(threshold=0.0, fn=1, bn=1))
    taylor, s = run(DBCacheConfig(threshold=BIG, fn=1, bn=1, skip_interval=None, taylor=True, max_consecutive=1))
    plain, _ = run(DBCacheConfig(threshold=BIG, fn=1, bn=1, skip_interval=None, max_consecutive=1))
    # cap 1: reuse at 2, 4, 6 (step 1 computes: at t = 0 the head residual is 0, so any change is infinite)
    assert s["reused_steps"] == [2, 4, 6]
    for i in (2, 4, 6):  # two computed residuals on each side: the linear extrapolation is exact
        torch.testing.assert_close(taylor[i], exact[i])
        assert not torch.allclose(plain[i], exact[i], atol=1e-3)
    for i in (0, 1, 3, 5, 7):
        torch.testing.assert_close(taylor[i], exact[i], rtol=0, atol=0)


def test_teacache_coefficients_from_the_table_or_identity(pipe, tmp_path, monkeypatch):
    import zimage_core.cache.teacache as tc

    table = tmp_path / "coeffs.json"
    monkeypatch.setattr(tc, "TABLE_PATH", table)
    cfg = CacheConfig.for_method("tea", pipe=pipe)
    assert cfg.coefficients == (1.0, 0.0) and cfg.coefficients_source["kind"] == "identity"
    assert summary(gen(pipe, cache=cfg))["config"]["coefficients_source"]["kind"] == "identity"
    fp = model_fingerprint(pipe.transformer)
    save_entry({"fingerprint": fp, "preset": "z-image-turbo", "coefficients": [2.0, 0.0], "r2": 0.9})
    got = lookup(pipe, "runware:z-image@0")  # no exact preset: the model's other entry, and the source says so
    assert got.coefficients == (2.0, 0.0) and "z-image-turbo" in got.source["note"]
    entry = {"fingerprint": fp, "preset": "runware:z-image@0", "coefficients": [3.0, 0.1], "r2": 0.8}
    save_entry({**entry, "x_range": [0.05, 0.3]})
    cfg = CacheConfig.for_method("teaCache", 0.4, pipe=pipe, preset="runware:z-image@0")
    assert cfg.coefficients == (3.0, 0.1) and cfg.coefficients_source["r2"] == 0.8 and cfg.threshold == 0.4
    assert cfg.fit_range == (0.05, 0.3)
    assert lookup(pipe, "z-image-turbo").coefficients == (2.0, 0.0)
    # a different model (other weights) does not pick them up
    other = SimpleNamespace(transformer=torch.nn.Linear(2, 2), default_model="x")
    other.transformer.config = pipe.transformer.config
    other.transformer.all_x_embedder = pipe.transformer.all_x_embedder
    assert model_fingerprint(other.transformer) != fp


def test_two_threads_give_exactly_their_solo_results(pipe):
    jobs = [
        ("a red fox", FBCacheConfig(threshold=0.5), 11),
        ("a lighthouse at night", TeaCacheConfig(threshold=0.6), 12),
        ("a bowl of ramen", DBCacheConfig(threshold=0.5, taylor=True), 13),
    ]
    solo = [gen(pipe, p, c, seed=s) for p, c, s in jobs]
    results, errors = [None] * len(jobs), []

    def work(i):
        try:
            p, c, s = jobs[i]
            results[i] = gen(pipe, p, c, seed=s)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for a, b in zip(results, solo):
        assert torch.equal(a.latents, b.latents)
        assert summary(a)["decisions"] == summary(b)["decisions"]
    assert any(summary(r)["reused_forwards"] for r in solo)  # the caches did reuse something


def test_request_api_runs_each_cache(pipe):
    from zimage_core.service import infer

    for opts in (
        {"fbCache": True, "fbCacheThreshold": 0.5},
        {"teaCache": True, "teaCacheDistance": 0.8, "cacheStartStepPercentage": 25, "cacheEndStep": 7},
        {"dbCache": True, "dbCacheThreshold": 0.4, "dbCacheSkipInterval": 3, "cacheMaxConsecutiveSteps": 2},
    ):
        req = image_request(width=128, height=128, steps=STEPS, seed=3, acceleratorOptions=opts)
        (resp,) = infer(pipe, req)
        assert resp["seed"] == 3 and resp["imageBase64Data"]
    cfg = from_request(
        {"method": "db", "threshold": 0.4, "max_consecutive": 2, "skip_interval": 3}, (2, 7), STEPS, pipe
    )
    assert isinstance(cfg, DBCacheConfig) and (cfg.skip_interval, cfg.max_consecutive, cfg.window) == (3, 2, (2, 7))
    cfg = from_request({"method": "tea", "threshold": 0.8, "max_consecutive": 3}, None, STEPS, pipe)
    assert isinstance(cfg, TeaCacheConfig) and cfg.threshold == 0.8 and cfg.window is None


@pytest.mark.parametrize("preset", ["quality", "balanced", "fast", "ultra", "max"])
def test_request_and_cli_run_each_preset(pipe, preset, tmp_path):
    from zimage_core.cache import PRESETS
    from zimage_core.cli import main
    from zimage_core.service import infer

    req = image_request(width=128, height=128, steps=STEPS, seed=3, acceleratorOptions={"cachePreset": preset})
    (resp,) = infer(pipe, req)
    assert resp["imageBase64Data"]
    cfg = from_request({"preset": preset}, (1, 6), STEPS, pipe)
    assert cfg.method == PRESETS[preset][0] and cfg.window == (1, 6)
    out = tmp_path / "o.png"
    argv = ["generate", "a red circle", "-o", str(out), "--model", str(pipe.folder), "--width", "64", "--height"]
    assert main([*argv, "64", "--steps", "4", "--seed", "1", "--quiet", "--cache-preset", preset]) == 0
    assert Image.open(out).size == (64, 64)


def test_cli_generate_with_a_cache(pipe, tmp_path, capsys):
    from zimage_core.cli import main

    out = tmp_path / "o.png"
    argv = ["generate", "a red circle", "-o", str(out), "--model", str(pipe.folder), "--width", "64", "--height"]
    argv += ["64", "--steps", "4", "--seed", "1", "--quiet", "--cache", "tea", "--cache-threshold", "0.6"]
    assert main(argv) == 0
    assert Image.open(out).size == (64, 64)


def test_cli_summary_counts_the_cache_s_main_layer_evaluations(pipe, tmp_path, capsys):
    """Without --quiet the summary line says how many main-layer evaluations ran of layers x steps x results."""
    import re

    from zimage_core.cli import main

    argv = ["generate", "a red circle", "-o", str(tmp_path / "o.png"), "--model", str(pipe.folder), "-n", "2"]
    argv += ["--width", "64", "--height", "64", "--steps", "6", "--seed", "1", "--cache", "fb"]
    argv += ["--cache-threshold", "1"]  # the largest threshold: reuse what may be reused (first and last compute)
    assert main(argv) == 0
    m = re.search(r"step cache fb: (\d+) of (\d+) main-layer evaluations", capsys.readouterr().out)
    assert m, "no cache summary in the CLI output"
    layers = pipe.transformer.config.n_layers
    assert int(m[2]) == layers * 6 * 2
    assert int(m[1]) < int(m[2])


def test_two_evaluations_per_step_sampler(pipe):
    # Heun evaluates the model twice per step (15 evaluations for 8 steps): each evaluation is decided on its own,
    # at its own σ, with the step index of the sampler step it belongs to
    from zimage_core.errors import RequestError

    try:
        plain = gen(pipe, scheduler="HeunDiscreteScheduler")
    except RequestError as e:  # the pipeline still on the Euler-only sampler stub
        pytest.skip(f"no Heun sampler in this pipeline: {e}")
    r0 = gen(pipe, cache=DBCacheConfig(threshold=0.0, taylor=True), scheduler="HeunDiscreteScheduler")
    assert torch.equal(r0.latents, plain.latents)
    s = summary(gen(pipe, cache=FBCacheConfig(threshold=BIG), scheduler="HeunDiscreteScheduler"))
    d = s["decisions"]
    assert len(d) == 15 and s["main_layer_evals_uncached"] == 4 * 15
    assert [x["step"] for x in d] == sorted([*range(STEPS), *range(STEPS - 1)])
    by_step = {}
    for x in d:
        by_step.setdefault(x["step"], []).append(x["sigma"])
    for i in range(STEPS - 1):  # the step's own σ, then the next step's σ (Heun's corrector)
        assert by_step[i][0] > by_step[i][1] == by_step[i + 1][0]
    assert all(x["computed"] for x in d if x["step"] in (0, STEPS - 1)) and s["reused_forwards"] > 0
