"""The hook chain around the transformer's main layers: the one extension point of the model.

A step cache (skip the middle layers), ControlNet (add a hint after given layers) and sequence parallelism (shard
the unified sequence before the stack, gather after it) all act around the 30 main layers, at the same time. Each
is a :class:`StackHook`; ``ZImageTransformer.forward_with_context(..., hooks=[...])`` composes them per call, so a
hook belongs to one request on one thread and never lives on the shared module.

Composition, for ``hooks = [h0, h1]``::

    h0.around_stack(inner0, hidden, inp, stack)
        inner0 = lambda hidden, inp: h1.around_stack(inner1, hidden, inp, stack)
            inner1 = lambda hidden, inp: stack.run(hidden, inp)          # every layer, in order
                layer i, then h0.after_layer(i, ...), then h1.after_layer(i, ...)

- ``around_stack`` wraps everything inside it: the first hook is the outermost. Sequence parallelism goes first
  (it shards once and every later hook sees local shards); a step cache goes last (it decides which layers run).
  The default calls ``before_stack`` and then ``inner``.
- ``stack.run(hidden, inp, start, stop)`` runs ``layers[start:stop]`` and, after each layer, every hook's
  ``after_layer``: a cache that runs only the head and the tail of the stack still gets ControlNet hints added on
  the layers it computes, and none on the layers it skips.
- ``after_layer(i, hidden, inp)`` sees the global layer index ``i``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from zimage_kernels import Ops


@dataclass
class BlockInputs:
    """Everything a transformer block needs besides the hidden states; shared by all blocks of one stage."""

    ops: Ops
    kv_lens: torch.Tensor | None  # [B] int32 valid key lengths, or None when the batch is not ragged
    freqs_cis: torch.Tensor  # complex64 [B, N, head_dim/2]
    adaln_input: torch.Tensor | None  # [B, adaln_dim] timestep embedding (None for unmodulated blocks)


Inner = Callable[[torch.Tensor, BlockInputs], torch.Tensor]


class StackHook:
    """Identity hook: override any of the three methods."""

    def before_stack(self, hidden: torch.Tensor, inp: BlockInputs) -> tuple[torch.Tensor, BlockInputs]:
        return hidden, inp

    def after_layer(self, index: int, hidden: torch.Tensor, inp: BlockInputs) -> torch.Tensor:
        return hidden

    def around_stack(self, inner: Inner, hidden: torch.Tensor, inp: BlockInputs, stack: Stack) -> torch.Tensor:
        hidden, inp = self.before_stack(hidden, inp)
        return inner(hidden, inp)


@dataclass(frozen=True)
class Stack:
    """The main layers of one forward and the hooks of that call."""

    layers: Sequence[nn.Module]
    hooks: Sequence[StackHook] = ()

    def __len__(self) -> int:
        return len(self.layers)

    def run(self, hidden: torch.Tensor, inp: BlockInputs, start: int = 0, stop: int | None = None) -> torch.Tensor:
        """``layers[start:stop]`` in order, each followed by every hook's ``after_layer``."""
        stop = len(self.layers) if stop is None else stop
        for i in range(start, stop):
            hidden = self.layers[i](hidden, inp)
            for hook in self.hooks:
                hidden = hook.after_layer(i, hidden, inp)
        return hidden


def run_stack(
    hidden: torch.Tensor, inp: BlockInputs, layers: Sequence[nn.Module], hooks: Sequence[StackHook] = ()
) -> torch.Tensor:
    """Run the main layers through the hook chain (with no hooks: every layer in order)."""
    hooks = tuple(h for h in hooks if h is not None)
    stack = Stack(layers, hooks)

    def call(k: int, hidden: torch.Tensor, inp: BlockInputs) -> torch.Tensor:
        if k == len(hooks):
            return stack.run(hidden, inp)
        return hooks[k].around_stack(lambda h, i: call(k + 1, h, i), hidden, inp, stack)

    return call(0, hidden, inp)


__all__ = ["BlockInputs", "Stack", "StackHook", "run_stack"]
