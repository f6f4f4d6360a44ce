"""Calibrators (zimage_core.cache.taylorseer, zimage_core.cache.foca) against closed forms on polynomial
trajectories, computed here in float64 from the formulas in their docstrings, and wired into the step-cache state."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from zimage_core.cache import DBCacheConfig, FBCacheConfig, FoCa, TaylorSeer, TeaCacheConfig
from zimage_core.hooks import run_stack
from zimage_kernels import TORCH_OPS

BIG = 1e9


def poly(coeffs, t):
    """Σ c_i t^i (lowest power first), float64."""
    return sum(c * t**i for i, c in enumerate(coeffs))


def feed(cal, ts, coeffs, shape=(3, 4), seed=0):
    """Update ``cal`` with F(t) = poly(coeffs, t)·u (u a fixed random tensor) at ``ts``; returns u."""
    u = torch.from_numpy(np.random.default_rng(seed).standard_normal(shape))
    for t in ts:
        cal.update(t, poly(coeffs, t) * u)
    return u


def close(pred, want_scalar, u):
    torch.testing.assert_close(pred.double(), want_scalar * u, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("order", [1, 2])
@pytest.mark.parametrize("ts", [[0.0, 1.0, 2.0, 3.0], [1.0, 0.9, 0.75, 0.55]])  # uniform, and σ-like decreasing
def test_taylorseer_is_exact_on_lines(order, ts):
    coeffs = (0.7, -1.3)
    cal = TaylorSeer(order)
    u = feed(cal, ts, coeffs)
    for t in (ts[-1] + 0.5 * (ts[-1] - ts[-2]), ts[-1] + 2.0 * (ts[-1] - ts[-2])):
        close(cal.predict(t), poly(coeffs, t), u)


@pytest.mark.parametrize("h", [1.0, -0.1])
@pytest.mark.parametrize("s_over_h", [0.5, 1.0, 3.0])
def test_taylorseer_on_a_quadratic_has_the_finite_difference_error(h, s_over_h):
    a, b, c = 0.8, -0.4, 1.5
    coeffs = (c, b, a)
    ts = [2.0 + k * h for k in range(4)]  # uniform grid of spacing h
    s = s_over_h * h
    t = ts[-1] + s
    exact = poly(coeffs, t)
    o1, o2 = TaylorSeer(1), TaylorSeer(2)
    u = feed(o1, ts, coeffs)
    feed(o2, ts, coeffs)
    close(o1.predict(t), exact - a * s * (s + h), u)  # order 1: F(t) − a·s·(s + h)
    close(o2.predict(t), exact - a * h * s, u)  # order 2: F(t) − a·h·s


def test_taylorseer_with_one_point_copies_and_with_two_is_linear():
    cal = TaylorSeer(2)
    u = feed(cal, [0.5], (1.0, 2.0, 3.0))
    close(cal.predict(0.1), poly((1.0, 2.0, 3.0), 0.5), u)
    cal.update(0.3, poly((1.0, 2.0, 3.0), 0.3) * u)
    slope = (poly((1.0, 2.0, 3.0), 0.3) - poly((1.0, 2.0, 3.0), 0.5)) / (0.3 - 0.5)
    close(cal.predict(0.1), poly((1.0, 2.0, 3.0), 0.3) + slope * (0.1 - 0.3), u)
    cal.reset()
    with pytest.raises(RuntimeError):
        cal.predict(0.1)
    with pytest.raises(ValueError, match="order"):
        TaylorSeer(3)


@pytest.mark.parametrize("ts", [[0.0, 1.0, 2.0], [1.0, 0.93, 0.8, 0.62], [0.0, 0.1, 0.5, 0.6]])
def test_foca_is_exact_on_quadratics_on_any_grid(ts):
    coeffs = (1.5, -0.4, 0.8)
    cal = FoCa()
    u = feed(cal, ts, coeffs)
    for t in (ts[-1] + 0.3 * (ts[-1] - ts[-2]), ts[-1] + 2.5 * (ts[-1] - ts[-2])):
        close(cal.predict(t), poly(coeffs, t), u)


@pytest.mark.parametrize("ts", [[0.0, 1.0, 2.0], [1.0, 0.93, 0.8, 0.62]])
def test_foca_on_a_cubic_has_the_interpolation_error(ts):
    a = 0.9
    coeffs = (0.2, -0.3, 0.5, a)
    cal = FoCa()
    u = feed(cal, ts, coeffs)
    t0, t1, t2 = ts[-1], ts[-2], ts[-3]
    for t in (t0 + 0.5 * (t0 - t1), t0 + 2.0 * (t0 - t1)):
        close(cal.predict(t), poly(coeffs, t) - a * (t - t0) * (t - t1) * (t - t2), u)


def test_foca_uniform_slope_is_bdf2_and_beats_taylorseer2_on_a_quadratic():
    h, coeffs = 0.5, (0.0, 0.0, 1.0)  # F = t²
    ts = [1.0, 1.5, 2.0]
    foca, ts2 = FoCa(), TaylorSeer(2)
    u = feed(foca, ts, coeffs)
    feed(ts2, ts, coeffs)
    # BDF2 slope (3F_n − 4F_{n−1} + F_{n−2}) / 2h = F'(2) = 4 for t²; forecast one step ahead is exact
    bdf2 = (3 * 4.0 - 4 * 2.25 + 1.0) / (2 * h)
    assert bdf2 == pytest.approx(4.0)
    close(foca.predict(2.5), 6.25, u)
    err_foca = (foca.predict(2.5).double() - 6.25 * u).abs().max()
    err_ts2 = (ts2.predict(2.5).double() - 6.25 * u).abs().max()
    assert err_foca < 1e-6 < err_ts2


def test_repeated_position_replaces_the_point():
    cal = FoCa()
    u = feed(cal, [0.0, 1.0, 1.0], (1.0, 1.0))
    close(cal.predict(2.0), 3.0, u)  # two distinct points of the line 1 + t


# ---- wired into the step-cache state --------------------------------------------------------------------------------


def _quadratic_layer(weight):
    """A 'layer' whose residual is quadratic in t = adaln_input: h + t²·w (so the middle residual is too)."""
    return lambda h, inp: h + inp.adaln_input**2 * weight


SIGMAS = [1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1]


def _run(config, layers):
    state, outs = config.new_state(num_steps=len(SIGMAS)), []
    for i, sigma in enumerate(SIGMAS):
        inp = SimpleNamespace(ops=TORCH_OPS, adaln_input=torch.tensor(1.0 - sigma, dtype=torch.float64), kv_lens=None)
        state.observe(lambda x, s: None)(None, sigma)
        outs.append(run_stack(torch.ones(1, 3, 5, dtype=torch.float64), inp, layers, [state]))
        state.end_step(i)
    return outs, state.summary()


@pytest.mark.parametrize("make", [lambda **k: DBCacheConfig(fn=1, bn=1, skip_interval=None, **k), FBCacheConfig])
def test_foca_forecasts_a_quadratic_residual_exactly_in_the_pipeline_state(make):
    torch.manual_seed(0)
    layers = [_quadratic_layer(torch.randn(1, 3, 5, dtype=torch.float64)) for _ in range(4)]
    exact, _ = _run(make(threshold=0.0), layers)
    # static mask: computes 0, 1, 2 (warmup 3), reuses 3..8 (cap 9), computes the last step
    from zimage_core.cache import StepMask

    mask = StepMask(warmup=3, policy="static")
    foca, s = _run(make(threshold=BIG, max_consecutive=9, calibrator="foca", mask=mask), layers)
    copy, _ = _run(make(threshold=BIG, max_consecutive=9, mask=mask), layers)
    ts1, _ = _run(make(threshold=BIG, max_consecutive=9, calibrator="taylorseer1", mask=mask), layers)
    assert s["reused_steps"] == [3, 4, 5, 6, 7, 8]
    for i in s["reused_steps"]:
        torch.testing.assert_close(foca[i], exact[i])
        assert not torch.allclose(copy[i], exact[i], atol=1e-3)
        assert not torch.allclose(ts1[i], exact[i], atol=1e-3)
    for i in (0, 1, 2, 9):
        assert torch.equal(foca[i], exact[i])


def test_teacache_takes_a_calibrator_too():
    cfg = TeaCacheConfig(threshold=0.5, calibrator="taylorseer2")
    assert cfg.describe()["calibrator"] == "taylorseer2" and cfg.new_state(num_steps=4)._calibrator.order == 2


def test_taylor_flag_is_the_order_one_calibrator_and_unknown_names_are_refused():
    assert DBCacheConfig(taylor=True).calibrator == "taylorseer1"
    with pytest.raises(ValueError, match="taylor=True"):
        DBCacheConfig(taylor=True, calibrator="foca")
    with pytest.raises(ValueError, match="unknown calibrator 'taylor'.*foca"):
        FBCacheConfig(calibrator="taylor")


G = [0.0, 0.0, 4.0, 4.0, 0.0, 0.0, 4.0, 4.0, 0.0, 0.0]  # residual scale per step: a zigzag over the computed steps


def _zigzag_layer(weight):
    """Residual G[step]·w, step = round(10·t) for the SIGMAS grid (t = 1 − σ = step / 10)."""
    return lambda h, inp: h + G[round(10 * float(inp.adaln_input))] * weight


def test_the_guard_copies_when_the_last_forecast_lost_to_copying():
    from zimage_core.cache import StepMask

    torch.manual_seed(1)
    layers = [_zigzag_layer(torch.randn(1, 3, 5, dtype=torch.float64)) for _ in range(3)]
    kw = dict(threshold=BIG, max_consecutive=9, mask=StepMask(every=2, policy="static"))  # compute even steps
    exact, _ = _run(FBCacheConfig(threshold=0.0), layers)
    guarded, s = _run(FBCacheConfig(calibrator="taylorseer1", **kw), layers)
    unguarded, _ = _run(FBCacheConfig(calibrator="taylorseer1", forecast_guard=False, **kw), layers)
    assert s["reused_steps"] == [1, 3, 5, 7]
    # step 3: no check has failed yet (at step 2 the one-point forecast is a copy): both forecast 4 + 2 = 6, truth 4
    for o in (guarded, unguarded):
        assert not torch.allclose(o[3], exact[3])
    # step 4 computes: the forecast for it (8) lost to copying (4) against the truth 0, so step 5 copies the truth;
    # the same at step 6 (forecast −4, copy 0, truth 4) for step 7. Unguarded: forecasts −2 and 6.
    for i in (5, 7):
        torch.testing.assert_close(guarded[i], exact[i])
        assert not torch.allclose(unguarded[i], exact[i])
