"""The hook chain around the main layers, checked against hand-written loops over the same layers."""

from __future__ import annotations

import torch

from zimage_core import ZImageTransformer
from zimage_core.hooks import StackHook, run_stack

from .helpers import SMALL_CONFIGS, diffusers_transformer, inputs, rel_l2


def _model():
    return ZImageTransformer.from_diffusers(diffusers_transformer("hd16x8"))  # 3 main layers


class AddAfter(StackHook):
    """Adds a fixed residual after given layers (what a ControlNet hint does)."""

    def __init__(self, residuals: dict[int, torch.Tensor]):
        self.residuals, self.seen = residuals, []

    def after_layer(self, index, hidden, inp):
        self.seen.append(index)
        return hidden + self.residuals[index] if index in self.residuals else hidden


class SkipMiddle(StackHook):
    """A step cache's shape: run layer 0 and the last layer, replace the middle by a stored residual."""

    def __init__(self, residual):
        self.residual = residual

    def around_stack(self, inner, hidden, inp, stack):
        hidden = stack.run(hidden, inp, 0, 1)
        hidden = hidden + self.residual
        return stack.run(hidden, inp, len(stack) - 1)


class Scale(StackHook):
    """before_stack changes what every later hook and layer sees (as sequence-parallel sharding does)."""

    def before_stack(self, hidden, inp):
        return hidden * 0.5, inp


def _capture_stack_input(model, x, t, caps):
    """(hidden, inp) exactly as the model hands them to the main stack."""
    seen = {}

    class Grab(StackHook):
        def around_stack(self, inner, hidden, inp, stack):
            seen["hidden"], seen["inp"] = hidden.clone(), inp
            return inner(hidden, inp)

    out = model.forward_with_context(x, t, model.encode_context(caps), hooks=[Grab()])
    return seen["hidden"], seen["inp"], out


def test_no_hooks_equals_plain_forward():
    model = _model()
    x, t, caps = inputs(SMALL_CONFIGS["hd16x8"], "ragged")
    _, _, with_grab = _capture_stack_input(model, x, t, caps)
    assert rel_l2(with_grab, model(x, t, caps)) == 0.0


def test_two_hooks_compose_like_a_hand_written_loop():
    model = _model()
    x, t, caps = inputs(SMALL_CONFIGS["hd16x8"], "ragged")
    hidden, inp, _ = _capture_stack_input(model, x, t, caps)
    g = torch.Generator().manual_seed(5)
    res = {i: torch.randn(hidden.shape, generator=g) * 0.1 for i in (0, 1, 2)}
    skip_res = torch.randn(hidden.shape, generator=g) * 0.1
    add, skip = AddAfter(res), SkipMiddle(skip_res)

    got = run_stack(hidden, inp, model.layers, [Scale(), add, skip])

    # Hand-written: scale, layer 0 + hint 0, cached residual for layer 1 (its hint is not added), layer 2 + hint 2.
    ref = hidden * 0.5
    ref = model.layers[0](ref, inp) + res[0]
    ref = ref + skip_res
    ref = model.layers[2](ref, inp) + res[2]
    assert torch.equal(got, ref)
    assert add.seen == [0, 2]


def test_hooks_reach_the_output_through_forward_with_context():
    model = _model()
    x, t, caps = inputs(SMALL_CONFIGS["hd16x8"], "single")
    ctx = model.encode_context(caps)
    plain = model.forward_with_context(x, t, ctx)
    hidden, _, _ = _capture_stack_input(model, x, t, caps)
    hinted = model.forward_with_context(x, t, ctx, hooks=[AddAfter({1: torch.ones_like(hidden)})])
    assert rel_l2(hinted, plain) > 1e-3


def test_a_step_cache_and_a_hint_hook_compose_like_a_hand_written_loop():
    """The real DBCache state (innermost hook: layer 0 always, layer 1 cached, layer 2 always) with a hook that adds
    a residual after every layer, over two steps: compute, then reuse. Hints land on computed layers only, and the
    cached residual includes the hint of the layer it stands for."""
    from zimage_core.cache import DBCacheConfig

    model = _model()
    x, t, caps = inputs(SMALL_CONFIGS["hd16x8"], "ragged")
    hidden, inp, _ = _capture_stack_input(model, x, t, caps)
    g = torch.Generator().manual_seed(7)
    res = {i: torch.randn(hidden.shape, generator=g) * 0.1 for i in (0, 1, 2)}
    state = DBCacheConfig(threshold=1e9, fn=1, bn=1, skip_interval=None).new_state(num_steps=3)
    add = AddAfter(res)
    inputs_per_step = [hidden, hidden * 0.9 + 0.01]
    got = []
    for i, h in enumerate(inputs_per_step):
        got.append(run_stack(h, inp, model.layers, [add, state]))
        state.end_step(i)

    L = model.layers
    head0 = L[0](inputs_per_step[0], inp) + res[0]
    mid0 = L[1](head0, inp) + res[1]
    want0 = L[2](mid0, inp) + res[2]
    head1 = L[0](inputs_per_step[1], inp) + res[0]
    want1 = L[2](head1 + (mid0 - head0), inp) + res[2]
    assert state.summary()["reused_steps"] == [1]
    assert add.seen == [0, 1, 2, 0, 2]
    torch.testing.assert_close(got[0], want0, rtol=0, atol=0)
    torch.testing.assert_close(got[1], want1, rtol=1e-6, atol=1e-6)


def test_generate_passes_caller_hooks_to_every_model_call(tiny_pipe):
    class Count(StackHook):
        def __init__(self):
            self.calls = 0

        def after_layer(self, index, hidden, inp):
            self.calls += 1
            return hidden

    kw = dict(seed=3, steps=2, cfg_scale=1.0, width=64, height=64, output_type="latent")
    plain = tiny_pipe.generate("a cat", **kw)
    count = Count()
    hooked = tiny_pipe.generate("a cat", hooks=[count], **kw)
    assert torch.equal(plain.latents, hooked.latents)  # an identity hook changes nothing
    assert count.calls == plain.stats["forwards"] * tiny_pipe.transformer.config.n_layers
    nudged = tiny_pipe.generate("a cat", hooks=[AddAfter({0: torch.tensor(0.5)})], **kw)
    assert not torch.equal(plain.latents, nudged.latents)
