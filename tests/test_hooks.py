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
