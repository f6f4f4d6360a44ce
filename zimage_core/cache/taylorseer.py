"""TaylorSeer: forecast a cached feature by a Taylor expansion whose derivatives are finite differences.

Reference: Liu et al., "From Reusing to Forecasting: Accelerating Diffusion Models with TaylorSeers" (ICCV 2025),
and its use as a DBCache calibrator in cache-dit. At every *computed* step ``n`` (position ``t_n``: σ when the
see below) the feature ``F_n`` (here: the cached residual of the skipped layers)
refreshes a table of backward divided differences, recursively, as the reference implementation does (positions:
the step index by default, σ with ``forecast_axis="sigma"``; the cache state chooses, see ``config.py``)::

    D⁰_n = F_n
    D^{i+1}_n = (D^i_n − D^i_{n−1}) / (t_n − t_{n−1})          i = 0 .. m−1  (only where D^i_{n−1} exists)

and on a *reused* step at position ``t`` the feature is forecast as the order-``m`` Taylor polynomial at ``t_n``::

    F̂(t) = Σ_{i=0..m} D^i_n · (t − t_n)^i / i!

Closed forms (what the tests check): for ``F`` a polynomial of degree ≤ 1 the forecast is exact for every
order ≥ 1. For ``F(t) = a·t² + b·t + c`` on a uniform grid of spacing ``h`` (``t_n − t_{n−1} = h``, ``s = t − t_n``):
order 1 gives ``F(t) − a·s·(s + h)`` and order 2 gives ``F(t) − a·h·s`` (the first difference is a first-order
estimate of ``F'(t_n)``: ``D¹_n = F'(t_n) − a·h``; ``D²_n = 2a`` exactly). With fewer computed steps than ``m + 1``
the expansion uses the orders available (order 0 = copying the last feature, what a plain cache does).

The state is per request (one instance per result); arithmetic is in fp32 (fp64 inputs stay fp64) on the
tensors' device.
"""

from __future__ import annotations

import math

import torch


def _wide(t: torch.Tensor) -> torch.Tensor:
    """At least fp32 (bf16/fp16 residuals are widened; fp64 stays fp64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


class TaylorSeer:
    """Per-request calibrator: ``update(t, F)`` on computed steps, ``predict(t)`` on reused ones, ``reset()``."""

    name = "taylorseer"

    def __init__(self, order: int = 1):
        if order not in (1, 2):
            raise ValueError(f"TaylorSeer order must be 1 or 2, got {order}")
        self.order = int(order)
        self.reset()

    def reset(self) -> None:
        self._diffs: list[torch.Tensor] = []  # D^0_n .. D^k_n (k <= order)
        self._pos: float | None = None

    def update(self, pos: float, feature: torch.Tensor) -> None:
        new = [_wide(feature)]
        if self._pos is not None and pos != self._pos:
            dt = float(pos) - self._pos
            for i in range(min(self.order, len(self._diffs))):
                new.append((new[i] - self._diffs[i]) / dt)
        self._diffs, self._pos = new, float(pos)

    def predict(self, pos: float) -> torch.Tensor:
        if self._pos is None:
            raise RuntimeError("TaylorSeer.predict before any update")
        s = float(pos) - self._pos
        out = self._diffs[0].clone()
        for i in range(1, len(self._diffs)):
            out.add_(self._diffs[i], alpha=s**i / math.factorial(i))
        return out


__all__ = ["TaylorSeer"]
