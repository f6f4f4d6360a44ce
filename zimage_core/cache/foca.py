"""FoCa ("Forecast then Calibrate"): treat the cached feature as the solution of an ODE in the sampler's position
and forecast it with a BDF2 slope and a Heun-style (trapezoidal) corrector.

Reference: Zheng et al., "Forecast then Calibrate: Feature Caching as ODE for Efficient Diffusion Transformers"
(arXiv 2508.16211). Our rendering of its two stages, on the last three computed features ``F_{n−2}, F_{n−1}, F_n``
at positions ``t_{n−2}, t_{n−1}, t_n`` (the step index by default, σ with ``forecast_axis="sigma"``; any spacing), with
Newton's
divided differences ``F[n,n−1] = (F_n − F_{n−1})/(t_n − t_{n−1})`` and
``F[n,n−1,n−2] = (F[n,n−1] − F[n−1,n−2])/(t_n − t_{n−2})``::

    slope   d_n = F[n,n−1] + F[n,n−1,n−2]·(t_n − t_{n−1})        (variable-step BDF2 derivative at t_n; on a uniform
                                                                    grid (3F_n − 4F_{n−1} + F_{n−2}) / 2h)
    curve   c_n = 2·F[n,n−1,n−2]                                  (the slope's rate of change)
    forecast  F^p(t) = F_n + s·d_n,   s = t − t_n                 (explicit predictor with the BDF2 slope)
    calibrate d^p(t) = d_n + s·c_n                                (slope at the forecast point)
              F̂(t)  = F_n + s/2 · (d_n + d^p(t))                  (Heun / trapezoid over [t_n, t])

Closed forms (what the tests check): ``F̂`` equals the quadratic through the three computed points, so it is exact
for polynomials of degree ≤ 2 on any grid, and for ``F(t) = a·t³ + …`` its error is
``F(t) − F̂(t) = a·(t − t_n)(t − t_{n−1})(t − t_{n−2})``. This is where it differs from TaylorSeer order 2, whose
first-difference slope is only first-order accurate (error ``a·h·s`` on a quadratic). With two computed points it is
the linear forecast ``F_n + s·F[n,n−1]``, with one it copies.

The state is per request (one instance per result); arithmetic is in fp32 (fp64 inputs stay fp64) on the
tensors' device.
"""

from __future__ import annotations

import torch

from .taylorseer import _wide


class FoCa:
    """Per-request calibrator: ``update(t, F)`` on computed steps, ``predict(t)`` on reused ones, ``reset()``."""

    name = "foca"

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self._pts: list[tuple[float, torch.Tensor]] = []  # up to the last three (position, feature)

    def update(self, pos: float, feature: torch.Tensor) -> None:
        pos = float(pos)
        if self._pts and self._pts[-1][0] == pos:
            self._pts.pop()
        self._pts = [*self._pts, (pos, _wide(feature))][-3:]

    def predict(self, pos: float) -> torch.Tensor:
        if not self._pts:
            raise RuntimeError("FoCa.predict before any update")
        tn, fn = self._pts[-1]
        s = float(pos) - tn
        if len(self._pts) == 1:
            return fn.clone()
        t1, f1 = self._pts[-2]
        d01 = (fn - f1) / (tn - t1)
        if len(self._pts) == 2:
            return fn + s * d01
        t2, f2 = self._pts[-3]
        d12 = (f1 - f2) / (t1 - t2)
        dd = (d01 - d12) / (tn - t2)
        slope = d01 + dd * (tn - t1)  # BDF2 derivative at t_n
        curve = 2.0 * dd
        slope_p = slope + s * curve  # Heun: the slope at the forecast point
        return fn + (s / 2.0) * (slope + slope_p)


__all__ = ["FoCa"]
