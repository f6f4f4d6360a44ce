"""The kernel tolerance rule (flash-attention style) and exact float64 oracles for every fused op.

Rule: a kernel's output ``out`` may be at most twice as far from the exact
result as torch's own same-dtype computation, plus a noise floor::

    max|out - ref64| <= 2 * max|pt - ref64| + floor,   floor = 2 * max|(r + 0.3 - 0.3) - r|, r = ref64 in out's dtype

``ref64`` is the op's mathematics evaluated in float64 on the same inputs (``exact``), ``pt`` the torch reference
(``zimage_kernels.reference``) run in the kernel's dtype. The floor is the rounding noise of one add at the output's
magnitude in the output dtype: it keeps the rule meaningful where torch happens to be exact.

``zimage_kernels.reference`` run in float64 is not exact for two ops: its RMSNorm computes the variance in fp32 and its
RoPE multiplies in complex64. ``exact`` therefore re-states those two in float64/complex128 (same formula, no
intermediate casts); the other ops use the reference itself on float64 inputs. ``zimage_bench/kernels.py`` uses this
module too, so benchmarks and tests apply one rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from zimage_kernels import reference

RTOL = 2.0


def _f64(t):
    if not isinstance(t, torch.Tensor):
        return t
    if t.is_complex():
        return t.to(torch.complex128)
    if t.is_floating_point():
        return t.double()
    return t


def _rms_norm64(x, weight, eps):
    x = x.double()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.double()


def _rope64(x, freqs_cis):
    xc = torch.view_as_complex(x.double().reshape(*x.shape[:-1], -1, 2).contiguous())  # [B, N, H, D/2] complex128
    return torch.view_as_real(xc * freqs_cis.to(torch.complex128).unsqueeze(2)).flatten(3)


def exact(op: str, *args, **kwargs):
    """The exact (float64 / complex128) value of ``zimage_kernels.reference.<op>(*args, **kwargs)``."""
    if op == "rms_norm_modulate":
        x, weight, scale, eps = args
        y = _rms_norm64(x, weight, eps)
        return y if scale is None else y * (1.0 + scale.double())
    if op == "gated_residual":
        x, y, weight, gate, eps = args
        yn = _rms_norm64(y, weight, eps)
        return x.double() + (yn if gate is None else gate.double().tanh() * yn)
    if op == "qk_norm_rope":
        q, k, qw, kw, freqs_cis, eps = args
        q, k = _rms_norm64(q, qw, eps), _rms_norm64(k, kw, eps)
        if freqs_cis is not None:
            q, k = _rope64(q, freqs_cis), _rope64(k, freqs_cis)
        return q, k
    args = [_f64(a) for a in args]
    kwargs = {k: _f64(v) for k, v in kwargs.items()}
    return getattr(reference, op)(*args, **kwargs)


def noise_floor(ref64: torch.Tensor, dtype: torch.dtype) -> float:
    r = ref64.to(dtype)
    return 2.0 * float(((r + 0.3) - 0.3 - r).abs().max()) if r.numel() else 0.0


@dataclass
class Comparison:
    """Outcome of the rule for one output tensor."""

    err: float  # max|out - ref64|
    torch_err: float  # max|pt - ref64|
    floor: float
    bound: float  # RTOL * torch_err + floor
    finite_ok: bool  # out is finite exactly where ref64 is

    @property
    def passed(self) -> bool:
        return self.finite_ok and self.err <= self.bound

    def as_dict(self) -> dict:
        return {"passed": self.passed, "err": self.err, "torch_err": self.torch_err, "bound": self.bound}


def compare(out: torch.Tensor, ref64: torch.Tensor, pt: torch.Tensor, rtol: float = RTOL) -> Comparison:
    assert out.shape == ref64.shape == pt.shape, (out.shape, ref64.shape, pt.shape)
    finite = torch.isfinite(ref64)
    finite_ok = bool(torch.equal(torch.isfinite(out), finite))
    o, r, p = out.double(), ref64.double(), pt.double()
    err = float((o - r)[finite].abs().max()) if finite.any() else 0.0
    torch_err = float((p - r)[finite].abs().max()) if finite.any() else 0.0
    floor = noise_floor(ref64[finite], out.dtype)
    return Comparison(err, torch_err, floor, rtol * torch_err + floor, finite_ok)


def describe_mismatch(out, ref64, pt, k: int = 5) -> str:
    """The k largest errors with their indices and the three values (Liger-style verbose mismatch)."""
    diff = (out.double() - ref64.double()).abs().nan_to_num(float("inf")).flatten()
    top = diff.topk(min(k, diff.numel())).indices
    lines = []
    for i in top.tolist():
        idx = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), out.shape))
        lines.append(
            f"  at {idx}: out={out.flatten()[i].item():.6g} ref64={ref64.flatten()[i].item():.6g} "
            f"torch={pt.flatten()[i].item():.6g}"
        )
    return "\n".join(lines)


def assert_close_to_ref(out: torch.Tensor, ref64: torch.Tensor, pt: torch.Tensor, name: str = "", rtol=RTOL):
    """Assert the rule; on failure print the errors and the worst elements. Returns the :class:`Comparison`."""
    assert out.dtype == pt.dtype, f"{name}: dtype {out.dtype} != torch's {pt.dtype}"
    c = compare(out, ref64, pt, rtol)
    if not c.passed:
        raise AssertionError(
            f"{name}: max|out-ref64| = {c.err:.3e} > bound {c.bound:.3e} (= {rtol}*{c.torch_err:.3e} torch error "
            f"+ floor {c.floor:.3e}); finite pattern ok: {c.finite_ok}\n{describe_mismatch(out, ref64, pt)}"
        )
    return c
