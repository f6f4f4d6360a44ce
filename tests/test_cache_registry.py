"""The cache method registry (zimage_core.cache.registry) read by the request schema, the CLI and from_request; the
cachePreset extension; step masks (zimage_core.cache.masks) in the policy and in a generation."""

import subprocess
import sys
import textwrap

import pytest

from tests.helpers import image_request
from zimage_core.cache import METHODS, PRESETS, StepMask, from_request
from zimage_core.cache.policy import Counters, Rules, StepInfo, decide, measures
from zimage_core.errors import RequestError
from zimage_core.service.request import SCHEMA, validate_request

# The spec's acceleratorOptions (spec/imageInference-api.md, "acceleratorOptions": 12 properties), written out here.
SPEC_FIELDS = {
    "cacheEndStep": ("int", 1, None, None),
    "cacheEndStepPercentage": ("int", 1, 100, None),
    "cacheMaxConsecutiveSteps": ("int", 1, 5, 3),
    "cacheStartStep": ("int", 0, None, None),
    "cacheStartStepPercentage": ("int", 0, 99, None),
    "fbCache": ("bool", None, None, False),
    "fbCacheThreshold": ("float", 0, 1, 0.25),
    "teaCache": ("bool", None, None, False),
    "teaCacheDistance": ("float", 0, 1, 0.5),
    "dbCache": ("bool", None, None, False),
    "dbCacheThreshold": ("float", 0, 1, 0.25),
    "dbCacheSkipInterval": ("int", 1, 1000, 5),  # the spec gives only the minimum; 1000 is ours
}


def test_schema_keeps_the_spec_fields_and_adds_only_the_preset_extension():
    fields = SCHEMA["acceleratorOptions"].fields
    assert set(fields) == {*SPEC_FIELDS, "cachePreset"}
    for name, (kind, lo, hi, default) in SPEC_FIELDS.items():
        f = fields[name]
        assert (f.kind, f.lo, f.hi, f.default) == (kind, lo, hi, default), name
    assert fields["cachePreset"].kind == "enum" and set(fields["cachePreset"].choices) == {
        "quality",
        "balanced",
        "fast",
        "ultra",
        "max",
    }


def test_every_registered_method_owns_its_switch_and_fields():
    assert [m.switch for m in METHODS.values()] == ["fbCache", "teaCache", "dbCache"]
    owned = [f for m in METHODS.values() for f in m.request_fields()]
    assert sorted(owned) == sorted(k for k in SPEC_FIELDS if not k.startswith("cache"))


def _defaults(model):
    from zimage_core.pipeline import Defaults

    return Defaults(steps=10, cfg_scale=3.0, shift=3.0, width=128, height=128)


def _validate(**accel):
    return validate_request(image_request(steps=10, acceleratorOptions=accel), model_defaults=_defaults)


def test_request_builds_the_method_config_from_the_registry():
    v = _validate(dbCache=True, dbCacheThreshold=0.4, dbCacheSkipInterval=3, cacheStartStep=2)
    assert v.cache == {"method": "db", "max_consecutive": 3, "threshold": 0.4, "skip_interval": 3}
    cfg = from_request(v.cache, v.cache_window, v.steps)
    assert (cfg.method, cfg.threshold, cfg.skip_interval, cfg.window) == ("db", 0.4, 3, (2, 10))


def test_preset_request_and_its_errors():
    v = _validate(cachePreset="balanced", cacheEndStepPercentage=80)
    assert v.cache == {"preset": "balanced"} and v.cache_window == (0, 8)
    cfg = from_request(v.cache, v.cache_window, v.steps)
    method, kw = PRESETS["balanced"]
    assert cfg.method == method and cfg.window == (0, 8)
    assert all(getattr(cfg, k) == v for k, v in kw.items())  # every knob of the preset, the window added
    for accel, field in (
        ({"cachePreset": "fast", "fbCache": True}, "fbCache"),
        ({"cachePreset": "fast", "cacheMaxConsecutiveSteps": 2}, "cacheMaxConsecutiveSteps"),
        ({"cachePreset": "fastest"}, "cachePreset"),
    ):
        with pytest.raises(RequestError) as e:
            _validate(**accel)
        assert e.value.field == f"acceleratorOptions.{field}"
    with pytest.raises(RequestError) as e:
        _validate(cachePreset="fastest")
    assert "ultra" in str(e.value)  # the allowed values are named


def test_a_new_method_is_one_registration():
    """Register a method in a fresh interpreter: the schema, the request and from_request take it, nothing else."""
    code = textwrap.dedent(
        """
        from dataclasses import dataclass
        from zimage_core.cache.config import FBCacheConfig
        from zimage_core.cache.registry import Option, register

        @register("xb", switch="xbCache", options=(Option("xbCacheThreshold", "threshold", "float", 0, 1),))
        @dataclass(frozen=True, kw_only=True)
        class XBCacheConfig(FBCacheConfig):
            threshold: float = 0.125

        from zimage_core.cache import from_request
        from zimage_core.pipeline import Defaults
        from zimage_core.service.request import SCHEMA, validate_request
        from tests.helpers import image_request

        assert SCHEMA["acceleratorOptions"].fields["xbCacheThreshold"].default == 0.125
        d = lambda m: Defaults(steps=6, cfg_scale=3.0, shift=3.0, width=128, height=128)
        v = validate_request(image_request(steps=6, acceleratorOptions={"xbCache": True}), model_defaults=d)
        cfg = from_request(v.cache, v.cache_window, v.steps)
        assert type(cfg).__name__ == "XBCacheConfig" and cfg.threshold == 0.125, cfg
        print("ok")
        """
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


def test_cli_flags_come_from_the_registry(capsys):
    from zimage_core.cli import build_parser

    p = build_parser()
    args = p.parse_args(["generate", "a b", "--cache", "db", "--cache-threshold", "0.3", "--cache-skip-interval", "4"])
    assert (args.cache, args.cache_threshold, args.cache_skip_interval) == ("db", 0.3, 4)
    args = p.parse_args(["generate", "a b", "--cache-preset", "fast"])
    assert args.cache_preset == "fast"
    with pytest.raises(SystemExit):
        p.parse_args(["generate", "a b", "--cache", "db", "--cache-skip-interval", "0"])
    assert "--cache-skip-interval" in capsys.readouterr().err


# ---- step masks ------------------------------------------------------------------------------------------------------


def _trace(rules, num_steps, change=0.0, start_step=0):
    counters, out = Counters(), []
    for step in range(start_step, num_steps):
        info = StepInfo(step, num_steps, start_step)
        c = change if measures(rules, info, counters) else None
        d, counters = decide(rules, info, counters, c)
        out.append(d.reason)
    return out


def test_mask_must_compute_is_counted_in_the_window():
    m = StepMask(warmup=2, every=4, tail=1, steps=(9,))
    # window [3, 12): anchor 3 -> warmup 3, 4; grid 3, 7, 11; tail 11; explicit 9
    assert [s for s in range(3, 12) if m.must_compute(s, 3, 12)] == [3, 4, 7, 9, 11]


def test_dynamic_mask_forces_its_steps_and_leaves_the_rest_to_the_threshold():
    rules = Rules(threshold=0.5, max_consecutive=10, mask=StepMask(warmup=3, every=4))
    assert _trace(rules, 10, change=0.1) == [
        "first", "mask", "mask", "hit", "mask", "hit", "hit", "hit", "mask", "last"
    ]  # fmt: skip
    assert _trace(rules, 10, change=0.9).count("above-threshold") == 4


def test_static_mask_reuses_without_measuring_and_keeps_the_safety_rules():
    rules = Rules(threshold=0.0, max_consecutive=2, mask=StepMask(warmup=2, policy="static"))
    # threshold 0 would never reuse: the static mask reuses anyway (no change measured), the cap still holds
    assert _trace(rules, 9, change=None) == [
        "first", "mask", "mask-static", "mask-static", "max-consecutive", "mask-static", "mask-static",
        "max-consecutive", "last",
    ]  # fmt: skip


def test_mask_composes_with_the_window():
    rules = Rules(threshold=1.0, max_consecutive=9, window=(4, 8), mask=StepMask(warmup=1, policy="static"))
    assert _trace(rules, 10) == ["first"] + ["outside-window"] * 3 + ["mask"] + ["mask-static"] * 3 + [
        "outside-window",
        "last",
    ]


@pytest.mark.parametrize("kw", [{"warmup": -1}, {"every": 0}, {"policy": "sometimes"}, {"steps": (-2,)}])
def test_mask_validation(kw):
    with pytest.raises(ValueError, match=next(iter(kw))):
        StepMask(**kw)
