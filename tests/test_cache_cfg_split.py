"""CFG-aware decisions (``cfg_split``): the positive and negative halves of a CFG batch decide and compute
separately; composition with CFG truncation; the joint decision stays when another hook is batch-shaped."""

from dataclasses import dataclass

import pytest
import torch

from zimage_core.cache import FBCacheConfig, TeaCacheConfig
from zimage_core.hooks import StackHook, run_stack
from zimage_kernels import TORCH_OPS


@dataclass(frozen=True)
class Inp:  # the per-batch fields a BlockInputs has
    ops: object
    kv_lens: torch.Tensor | None
    freqs_cis: torch.Tensor
    adaln_input: torch.Tensor


def _layer(weight):
    """Residual t·w per row (t = adaln_input[b]); rows do not interact, as CFG halves do not."""
    return lambda h, inp: h + inp.adaln_input[:, None, None] * weight


def _run(config, ts_pos, ts_neg, extra_hooks=()):
    torch.manual_seed(0)
    layers = [_layer(torch.randn(1, 3, 5, dtype=torch.float64)) for _ in range(3)]
    state, outs = config.new_state(num_steps=len(ts_pos)), []
    for i, (a, b) in enumerate(zip(ts_pos, ts_neg, strict=True)):
        t = torch.tensor([a, b], dtype=torch.float64)
        inp = Inp(TORCH_OPS, None, torch.zeros(2, 4), t)
        state.observe(lambda x, s: None)(None, 1.0 - i / len(ts_pos))
        outs.append(run_stack(torch.ones(2, 3, 5, dtype=torch.float64), inp, layers, [*extra_hooks, state]))
        state.end_step(i)
    return outs, state.summary()


# the positive half's timestep input barely moves, the negative half's jumps: joint vs separate decisions differ
POS = [0.5, 0.5, 0.5, 0.5, 0.5, 0.5]
NEG = [0.1, 0.9, 0.2, 0.8, 0.3, 0.7]


def test_halves_decide_separately():
    cfg = FBCacheConfig(threshold=0.3, max_consecutive=5, cfg_split=True)
    outs, s = _run(cfg, POS, NEG)
    recs = s["decisions"]
    pos = [r for r in recs if r["half"] == 0]
    neg = [r for r in recs if r["half"] == 1]
    assert [r["computed"] for r in pos] == [True, False, False, False, False, True]  # first, 4 hits, last
    assert all(r["computed"] for r in neg)  # every change of the negative half is far above the threshold
    joint, sj = _run(FBCacheConfig(threshold=0.3, max_consecutive=5), POS, NEG)
    assert sj["reused_forwards"] == 0  # the joint measure sees the negative half's jumps: never reuses
    exact, _ = _run(FBCacheConfig(threshold=0.0), POS, NEG)
    for o, e in zip(outs, exact, strict=True):
        torch.testing.assert_close(o, e)  # the positive half's input is constant: its reuse is exact here
    sequences = sum(r["layers"] * r["batch"] for r in recs)
    assert sequences == 2 * (6 * 3) - 4 * 2  # 4 reuses of the positive half skip 2 of 3 layers each


def test_threshold_zero_matches_no_cache():
    outs, _ = _run(FBCacheConfig(threshold=0.0, cfg_split=True), POS, NEG)
    exact, _ = _run(FBCacheConfig(threshold=0.0), POS, NEG)
    for o, e in zip(outs, exact, strict=True):
        torch.testing.assert_close(o, e, rtol=0, atol=1e-12)


class _BatchHook(StackHook):  # a batch-shaped hook (like ControlNet's hints): the cache keeps one joint decision
    def after_layer(self, index, hidden, inp):
        return hidden


def test_another_hook_keeps_the_joint_decision():
    _, s = _run(FBCacheConfig(threshold=0.3, max_consecutive=5, cfg_split=True), POS, NEG, extra_hooks=[_BatchHook()])
    assert all("half" not in r and r["batch"] == 2 for r in s["decisions"])


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    from zimage_core.components import RANDOM_TRANSFORMER, build_random_pipeline
    from zimage_core.pipeline import ZImage

    folder = tmp_path_factory.mktemp("cfgsplit") / "pipe4"
    build_random_pipeline(folder, seed=3, config=RANDOM_TRANSFORMER.replace(n_layers=4))
    return ZImage.from_pretrained(folder, device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("make", [FBCacheConfig, TeaCacheConfig])
def test_in_a_generation_with_cfg_truncation(pipe, make):
    kw = dict(steps=8, cfg_scale=3.0, seed=7, width=64, height=64, output_type="latent", cfg_truncation=0.2)
    plain = pipe.generate("a red fox", **kw)
    r = pipe.generate("a red fox", cache=make(threshold=0.0, cfg_split=True), **kw)
    torch.testing.assert_close(r.latents, plain.latents, rtol=1e-4, atol=1e-4)  # split batch: rounding only
    (s,) = r.stats["cache"]
    halves = [(d["half"], d["batch"]) for d in s["decisions"]]
    assert (1, 1) in halves and halves[-1] == (0, 1)  # both halves while CFG is on, then the positive one
    assert s["resets"] == 0  # the positive half keeps its cache across the truncation
    r = pipe.generate("a red fox", cache=make(threshold=1e9, cfg_split=True), **kw)
    assert r.stats["cache"][0]["reused_forwards"] > 0 and torch.isfinite(r.latents).all()
