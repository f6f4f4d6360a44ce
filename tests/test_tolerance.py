"""The tolerance rule and the float64 oracles themselves (cpu tier)."""

import torch

from tests.tolerance import assert_close_to_ref, compare, exact
from zimage_kernels import reference


def test_rule_accepts_twice_and_rejects_three_times_the_torch_error():
    ref64 = torch.ones(100, dtype=torch.float64)
    pt = torch.full((100,), 1 + 1e-3, dtype=torch.float32)
    assert compare(torch.full((100,), 1 + 2e-3), ref64, pt).passed
    bad = compare(torch.full((100,), 1 + 3e-3), ref64, pt)
    assert not bad.passed and abs(bad.err - 3e-3) < 1e-6 and abs(bad.torch_err - 1e-3) < 1e-6


def test_noise_floor_covers_one_rounding_when_torch_is_exact():
    ref64 = torch.linspace(-3, 3, 101, dtype=torch.float64)
    exact_fp16 = ref64.half()  # torch error = rounding only
    one_ulp_off = torch.nextafter(exact_fp16.float(), torch.tensor(10.0)).half()
    assert compare(one_ulp_off, ref64, exact_fp16).passed
    assert not compare(exact_fp16 + 0.05, ref64, exact_fp16).passed


def test_non_finite_outputs_fail():
    ref64 = torch.zeros(4, dtype=torch.float64)
    out = torch.tensor([0.0, float("nan"), 0.0, 0.0])
    assert not compare(out, ref64, torch.zeros(4)).passed
    try:
        assert_close_to_ref(out, ref64, torch.zeros(4), "nan case")
    except AssertionError as e:
        assert "nan case" in str(e) and "finite pattern ok: False" in str(e)
    else:
        raise AssertionError("expected a failure")


def test_exact_oracles_agree_with_the_reference_semantics():
    """The float64 re-statements compute the same functions as zimage_kernels.reference (which in float64 keeps an fp32
    variance and complex64 RoPE): agreement to ~1e-7 relative, far below any fp16/bf16 error."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 5, 3, 16, generator=g, dtype=torch.float64), torch.randn(2, 5, 3, 16, generator=g).double()
    w = torch.rand(16, generator=g, dtype=torch.float64) + 0.5
    f = torch.polar(torch.ones(2, 5, 8), torch.rand(2, 5, 8, generator=g) * 10)
    for a, b in zip(exact("qk_norm_rope", q, k, w, w, f, 1e-5), reference.qk_norm_rope(q, k, w, w, f, 1e-5)):
        assert a.dtype == torch.float64 and torch.allclose(a, b, rtol=1e-6, atol=1e-6)
    x, y = torch.randn(2, 5, 16, generator=g).double(), torch.randn(2, 5, 16, generator=g).double()
    s = torch.randn(2, 1, 16, generator=g).double()
    assert torch.allclose(exact("rms_norm_modulate", x, w, s, 1e-5), reference.rms_norm_modulate(x, w, s, 1e-5))
    assert torch.allclose(exact("gated_residual", x, y, w, s, 1e-5), reference.gated_residual(x, y, w, s, 1e-5))
    assert torch.equal(exact("swiglu", x.float(), y.float()), reference.swiglu(x, y))
