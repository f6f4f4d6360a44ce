"""The step caches' decision policy (zimage_core.cache.policy): pure functions, every rule of README "Step caches"."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from zimage_core.cache import DBCacheConfig, FBCacheConfig, TeaCacheConfig
from zimage_core.cache.policy import Counters, Rules, StepInfo, decide, forced


def simulate(rules, num_steps, changes, start_step=0, rescale=None, reset_at=()):
    """Run the policy over a whole schedule; ``changes(step)`` is the measured change. Returns [(step, reason)]."""
    counters, out = Counters(), []
    for step in range(start_step, num_steps):
        info = StepInfo(step, num_steps, start_step, reset=step in reset_at)
        change = None if forced(rules, info, counters) else changes(step)
        d, counters = decide(rules, info, counters, change, rescale)
        out.append((step, d.reason))
    return out


def reused(trace):
    return [s for s, r in trace if r == "hit"]


def test_first_and_last_step_always_compute():
    rules = Rules(threshold=1.0, max_consecutive=5)
    trace = simulate(rules, 8, lambda s: 0.0)
    assert trace[0] == (0, "first") and trace[-1] == (7, "last")
    # an image-to-image run starting at step 3 computes its own first step
    trace = simulate(rules, 8, lambda s: 0.0, start_step=3)
    assert trace[0] == (3, "first") and trace[-1] == (7, "last")
    # a one-step run: that step is both first and last
    assert simulate(rules, 1, lambda s: 0.0) == [(0, "first")]


def test_window_is_half_open_and_caching_happens_only_inside():
    rules = Rules(threshold=1.0, max_consecutive=5, window=(3, 6))
    trace = dict(simulate(rules, 10, lambda s: 0.0))
    assert reused(trace.items()) == [3, 4, 5]
    for s in (1, 2, 6, 7, 8):
        assert trace[s] == "outside-window"


def test_consecutive_cap_then_compute_and_counter_resets():
    rules = Rules(threshold=1.0, max_consecutive=3)
    trace = dict(simulate(rules, 12, lambda s: 0.0))
    # 0 first; 1-3 hits; 4 forced by the cap; 5-7 hits; 8 cap; 9-10 hits; 11 last
    assert [s for s, r in trace.items() if r == "max-consecutive"] == [4, 8]
    assert reused(trace.items()) == [1, 2, 3, 5, 6, 7, 9, 10]
    # a threshold-triggered compute also resets the counter: step 2 is above the threshold
    trace = dict(simulate(rules, 12, lambda s: 5.0 if s == 2 else 0.0))
    assert trace[2] == "above-threshold"
    assert reused(trace.items()) == [1, 3, 4, 5, 7, 8, 9]
    assert trace[6] == "max-consecutive"


@pytest.mark.parametrize("cap", [1, 2, 5])
def test_never_more_than_cap_reused_in_a_row(cap):
    trace = simulate(Rules(threshold=1.0, max_consecutive=cap), 40, lambda s: 0.0)
    run = longest = 0
    for _, reason in trace:
        run = run + 1 if reason == "hit" else 0
        longest = max(longest, run)
    assert longest == cap


def test_skip_interval_refreshes_on_a_fixed_grid_inside_the_window():
    rules = Rules(threshold=1.0, max_consecutive=5, window=(4, 20), skip_interval=5)
    trace = dict(simulate(rules, 24, lambda s: 0.0))
    assert [s for s, r in trace.items() if r == "refresh"] == [4, 9, 14, 19]
    assert reused(trace.items()) == [5, 6, 7, 8, 10, 11, 12, 13, 15, 16, 17, 18]
    # the grid counts computed steps too: a threshold-triggered compute at 6 does not move the next refresh
    trace = dict(simulate(rules, 24, lambda s: 5.0 if s == 6 else 0.0))
    assert trace[6] == "above-threshold" and trace[9] == "refresh"
    # without a window the grid starts at the run's first step
    trace = dict(simulate(Rules(threshold=1.0, max_consecutive=5, skip_interval=3), 10, lambda s: 0.0, start_step=2))
    assert [s for s, r in trace.items() if r == "refresh"] == [5, 8]


def test_skip_interval_one_never_reuses_and_differs_from_the_cap():
    assert reused(simulate(Rules(threshold=1.0, skip_interval=1), 10, lambda s: 0.0)) == []
    # N=5 with a cap of 3: 0 first; 1-3 hits; 4 cap; 5 refresh; 6-8 hits; 9 cap; 10 refresh; 11 last
    trace = dict(simulate(Rules(threshold=1.0, max_consecutive=3, skip_interval=5), 12, lambda s: 0.0))
    assert reused(trace.items()) == [1, 2, 3, 6, 7, 8]
    assert trace[4] == trace[9] == "max-consecutive" and trace[5] == trace[10] == "refresh"


def test_reset_when_the_batch_changes_shape():
    rules = Rules(threshold=1.0, max_consecutive=5)
    trace = dict(simulate(rules, 10, lambda s: 0.0, reset_at={4}))
    assert trace[4] == "reset"
    assert reused(trace.items()) == [1, 2, 3, 5, 6, 7, 8]
    # the reset also clears the consecutive counter and the TeaCache accumulator
    d, c = decide(rules, StepInfo(4, 10, reset=True), Counters(consecutive=3, accumulated=0.7), None)
    assert d.compute and d.reason == "reset" and c == Counters()


def test_threshold_direction_higher_reuses_more():
    changes = [0.0, 0.12, 0.3, 0.05, 0.22, 0.4, 0.08, 0.15, 0.0, 0.0]
    counts = [
        len(reused(simulate(Rules(threshold=t, max_consecutive=5), 10, lambda s: changes[s])))
        for t in (0.0, 0.1, 0.2, 0.25, 0.5)
    ]
    assert counts[0] == 0 and counts == sorted(counts) and counts[-1] > counts[1]
    # strict comparison: a change equal to the threshold computes
    d, _ = decide(Rules(threshold=0.2), StepInfo(3, 10), Counters(), 0.2)
    assert d.compute and d.reason == "above-threshold"


def test_teacache_accumulates_rescaled_change_and_resets_on_compute():
    rules = Rules(threshold=0.25, max_consecutive=5, accumulate=True)
    # raw change 0.1 per step, identity rescale: acc 0.1, 0.2 (hits), 0.3 ≥ 0.25 → compute, then again
    trace = dict(simulate(rules, 10, lambda s: 0.1))
    assert reused(trace.items()) == [1, 2, 4, 5, 7, 8]
    assert trace[3] == trace[6] == "above-threshold"
    # the rescaling polynomial is applied to each change before accumulating: 3x makes every step exceed 0.25
    assert reused(simulate(rules, 10, lambda s: 0.1, rescale=lambda x: 3 * x)) == []
    d, c = decide(rules, StepInfo(2, 10), Counters(consecutive=1, accumulated=0.1), 0.1)
    assert not d.compute and d.accumulated == pytest.approx(0.2) and c.accumulated == pytest.approx(0.2)


def test_negative_rescale_is_clamped_so_threshold_zero_never_reuses():
    rules = Rules(threshold=0.0, accumulate=True)
    assert reused(simulate(rules, 10, lambda s: 0.01, rescale=lambda x: x - 1.0)) == []
    rules = Rules(threshold=0.05, max_consecutive=5, accumulate=True)
    assert reused(simulate(rules, 8, lambda s: 0.01, rescale=lambda x: x - 1.0)) == [1, 2, 3, 4, 5]


def test_nan_change_never_reuses():
    for accumulate in (False, True):
        d, _ = decide(Rules(threshold=1.0, accumulate=accumulate), StepInfo(3, 10), Counters(), math.nan)
        assert d.compute


@given(
    threshold=st.floats(0.0, 10.0),
    step=st.integers(0, 60),
    consecutive=st.integers(0, 6),
    change=st.floats(0.0, 5.0),
    accumulate=st.booleans(),
)
def test_threshold_zero_never_reuses_and_reuse_is_monotone(threshold, step, consecutive, change, accumulate):
    info, counters = StepInfo(step, 60), Counters(consecutive=consecutive, accumulated=0.0)
    d0, _ = decide(Rules(threshold=0.0, accumulate=accumulate), info, counters, change)
    assert d0.compute
    d, _ = decide(Rules(threshold=threshold, accumulate=accumulate), info, counters, change)
    if not d.compute:  # a hit at one threshold stays a hit at any larger one
        d2, _ = decide(Rules(threshold=threshold * 2 + 0.01, accumulate=accumulate), info, counters, change)
        assert not d2.compute


def test_change_is_required_only_when_nothing_forces_a_compute():
    rules = Rules(threshold=0.5)
    with pytest.raises(ValueError, match="measured change"):
        decide(rules, StepInfo(3, 10), Counters(), None)
    d, _ = decide(rules, StepInfo(0, 10), Counters(), None)
    assert d.compute and d.reason == "first"


@pytest.mark.parametrize(
    "kw",
    [
        dict(threshold=-0.1),
        dict(threshold=math.nan),
        dict(threshold=0.2, max_consecutive=0),
        dict(threshold=0.2, skip_interval=0),
        dict(threshold=0.2, window=(5, 5)),
        dict(threshold=0.2, window=(-1, 3)),
    ],
)
def test_rules_validation(kw):
    with pytest.raises(ValueError):
        Rules(**kw)


def test_method_configs_map_onto_rules():
    fb = FBCacheConfig(threshold=0.3, max_consecutive=2, window=(1, 9))
    assert fb.rules() == Rules(threshold=0.3, max_consecutive=2, window=(1, 9))
    assert fb.split(30) == (1, 0)
    tea = TeaCacheConfig(coefficients=[2.0, 0.5])
    assert tea.rules().accumulate and tea.threshold == 0.5 and tea.split(30) == (0, 0)
    assert tea.rescale(0.25) == pytest.approx(2.0 * 0.25 + 0.5)
    # outside the fitted range the polynomial is not trusted: value at the end, scaled linearly
    wild = TeaCacheConfig(coefficients=[-100.0, 30.0, 0.0], fit_range=(0.1, 0.2))  # poly < 0 beyond x = 0.3
    assert wild.rescale(0.15) == pytest.approx(-100 * 0.15**2 + 30 * 0.15)
    assert wild.rescale(0.8) == pytest.approx((-100 * 0.2**2 + 30 * 0.2) * 0.8 / 0.2) and wild.rescale(0.8) > 0
    assert wild.rescale(0.05) == pytest.approx((-100 * 0.1**2 + 30 * 0.1) * 0.05 / 0.1)
    db = DBCacheConfig(fn=4, bn=2, skip_interval=7)
    assert db.rules().skip_interval == 7 and db.split(30) == (4, 2)
    assert db.split(3) == (2, 0) and db.split(2) == (1, 0)  # at least one middle layer is left
    assert (db.fn, db.bn) != (1, 0)  # DBCache's defaults differ from FBCache
    with pytest.raises(ValueError):
        DBCacheConfig(fn=0)
