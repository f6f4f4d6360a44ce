"""``ParallelContext``: one rank's view of a parallel run, and what the pipeline calls.

- :meth:`ParallelContext.forward` replaces ``transformer.forward_with_context`` in the denoiser: with ``cfg=2`` and
  a CFG batch ``[pos ‖ neg]`` this rank runs only its half and one ``all_gather`` per step returns both halves;
  with a sequence degree > 1 the :class:`SequenceParallelHook` goes first in the hook chain. Outside a CFG batch
  (guidance off or truncated) the CFG ranks compute the same thing.
- :meth:`ParallelContext.reduce_metric` is what a step cache calls on its decision metric (the two L1 sums): it
  sums them over the ranks that together hold this forward's batch and sequence, so every rank takes the same
  skip decision as one process would.
- :meth:`ParallelContext.run` / :meth:`generate` make an error before the first collective (bad input on one
  rank) fail every rank with that error, instead of leaving the others blocked in an all-to-all: each rank
  reports ok/error exactly once per request, at its first forward or when it fails before one.
"""

from __future__ import annotations

import contextvars
from collections.abc import Sequence

import torch
import torch.distributed as dist

from ..errors import RequestError
from .attention import all_gather_tensor
from .config import ParallelConfig
from .hook import SequenceParallelHook
from .mesh import Mesh

_METRIC_GROUP = contextvars.ContextVar("zimage_parallel_metric_group", default=None)


class ParallelError(RuntimeError):
    """Another rank of the parallel run failed (its rank and error are in the message)."""


class ParallelContext:
    def __init__(self, config: ParallelConfig, mesh: Mesh | None = None):
        self.config = config
        self.mesh = mesh if mesh is not None else Mesh(config)
        self._pending = False  # a request is running and this rank has not reported yet

    # ---- hooks and the forward ------------------------------------------------------------------------------
    def hooks(self) -> list:
        if self.config.sp == 1:
            return []
        m = self.mesh
        return [SequenceParallelHook(m.sp_group, m.sp, self.config.sequence_mode, self.config.heads)]

    def forward(self, transformer, x: Sequence[torch.Tensor], t, context, *, cfg_batch: bool, hooks=(), **kw):
        """``transformer.forward_with_context`` on this rank's part; returns the full batch's outputs."""
        self.report(None)
        sp_hooks = self.hooks()
        for h in hooks:  # ControlNet hooks: their hints are sharded like the sequence
            if hasattr(h, "sequence_parallel"):
                h.sequence_parallel = sp_hooks[0] if sp_hooks else None
        hooks = (*sp_hooks, *hooks)
        m = self.mesh
        if m.cfg == 1 or not cfg_batch:
            token = _METRIC_GROUP.set(m.sp_group if m.sp > 1 else None)
            try:
                return transformer.forward_with_context(x, t, context, hooks=hooks, **kw)
            finally:
                _METRIC_GROUP.reset(token)
        if len(x) % 2:
            raise ValueError(f"a CFG batch has an even size ([pos ‖ neg]), got {len(x)}")
        b = len(x) // 2
        mine = list(range(m.cfg_index * b, (m.cfg_index + 1) * b))
        t = torch.as_tensor(t).reshape(-1).expand(len(x))
        token = _METRIC_GROUP.set(m.world_group)  # the whole world holds the CFG batch's tokens
        hooks = tuple(h.for_rows(mine) if hasattr(h, "for_rows") else h for h in hooks)  # hooks made for the batch
        try:
            xs, ctx = [x[i] for i in mine], context.select(mine)
            out = transformer.forward_with_context(xs, t[mine], ctx, hooks=hooks, **kw)
        finally:
            _METRIC_GROUP.reset(token)
        local = torch.stack(out)  # the halves have the same latent shapes
        full = local.new_empty(m.cfg * b, *local.shape[1:])
        all_gather_tensor(full, local.contiguous(), group=m.cfg_group)
        return list(full.unbind(0))

    def reduce_metric(self, sums: torch.Tensor) -> torch.Tensor:
        """Sum a cache metric over the ranks that hold the current forward's tokens (identity outside one)."""
        group = _METRIC_GROUP.get()
        if group is None:
            return sums
        sums = sums.clone()
        dist.all_reduce(sums, group=group)
        return sums

    # ---- errors: every rank fails together ------------------------------------------------------------------
    def report(self, error: BaseException | None) -> None:
        """Exchange this request's status with every rank (once per request); raise the first rank's error."""
        if not self._pending:
            return
        self._pending = False
        mine = None
        if error is not None:
            mine = (type(error).__name__, getattr(error, "field", None), getattr(error, "message", str(error)))
        statuses = [None] * self.mesh.world_size
        dist.all_gather_object(statuses, mine)
        for rank, status in enumerate(statuses):
            if status is None:
                continue
            if error is not None and rank == self.mesh.rank:
                raise error
            kind, field, message = status
            if field is not None:
                raise RequestError(field, f"{message} (rejected on rank {rank})")
            raise ParallelError(f"rank {rank} failed: {kind}: {message}")

    def run(self, fn, *args, **kwargs):
        """Call ``fn`` (which runs this context's forwards) on every rank; an early error fails all ranks."""
        self._pending = True
        try:
            result = fn(*args, **kwargs)
        except Exception as e:
            self.report(e)  # re-raises: this rank's error, or the first failing rank's
            raise
        finally:
            pending = self._pending
        if pending:
            self.report(None)
        return result

    def attach(self, pipe):
        """Make ``pipe``'s denoiser and step cache go through this context."""
        pipe.parallel = self
        return pipe

    def generate(self, pipe, prompt: str, **kwargs):
        """``pipe.generate(prompt, **kwargs)`` on every rank of the run; every rank returns the same result."""
        self.attach(pipe)
        return self.run(pipe.generate, prompt, **kwargs)
