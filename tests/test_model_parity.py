"""Our ZImageTransformer against diffusers 0.42.1's ZImageTransformer2DModel with identical random weights."""

import pytest
import torch

from tests.helpers import SMALL_CONFIGS, diffusers_transformer, flat, inputs, rel_l2
from zimage_core import ZImageConfig, ZImageTransformer, count_parameters

KINDS = ["ragged", "nonsquare", "cfg", "single"]


@pytest.mark.parametrize("name", list(SMALL_CONFIGS))
@pytest.mark.parametrize("kind", KINDS)
def test_fp32_parity(name, kind):
    ref = diffusers_transformer(name)
    ours = ZImageTransformer.from_diffusers(ref)
    x, t, caps = inputs(SMALL_CONFIGS[name], kind)
    with torch.no_grad():
        want = ref(x, t, caps, return_dict=False)[0]
        got = ours(x, t, caps)
    assert [g.shape for g in got] == [w.shape for w in want]
    assert torch.isfinite(flat(got)).all()
    assert rel_l2(got, want) <= 1e-5


@pytest.mark.parametrize("name", list(SMALL_CONFIGS))
@pytest.mark.parametrize("kind", ["ragged", "cfg"])
def test_bf16_error_at_most_twice_diffusers(name, kind):
    """bf16: our error against an fp64 run is at most 2x diffusers' own bf16 error against the same fp64 run."""
    ref64 = diffusers_transformer(name, dtype=torch.float64)
    ref16 = diffusers_transformer(name, dtype=torch.bfloat16)
    ours16 = ZImageTransformer.from_diffusers(diffusers_transformer(name, dtype=torch.bfloat16))
    x, t, caps = inputs(SMALL_CONFIGS[name], kind)
    with torch.no_grad():
        exact = ref64([xi.double() for xi in x], t.double(), [c.double() for c in caps], return_dict=False)[0]
        theirs = ref16([xi.bfloat16() for xi in x], t, [c.bfloat16() for c in caps], return_dict=False)[0]
        got = ours16([xi.bfloat16() for xi in x], t, [c.bfloat16() for c in caps])
    assert torch.isfinite(flat(got)).all()
    err_ours, err_theirs = rel_l2(got, exact), rel_l2(theirs, exact)
    assert err_theirs > 0  # the bf16 run really is low precision
    assert err_ours <= 2 * err_theirs, (err_ours, err_theirs)


@pytest.mark.parametrize("kind", KINDS)
def test_context_forward_equals_plain_forward(kind):
    ours = ZImageTransformer.from_diffusers(diffusers_transformer("hd32"))
    x, t, caps = inputs(SMALL_CONFIGS["hd32"], kind)
    with torch.no_grad():
        plain = ours(x, t, caps)
        ctx = ours.encode_context(caps)
        for _ in range(2):  # reused across steps, unchanged
            again = ours.forward_with_context(x, t, ctx)
            assert all(torch.equal(a, b) for a, b in zip(plain, again))


def test_context_select_matches_recomputation():
    """A sub-batch of a context (CFG truncated to positives) equals encoding those captions alone, up to rounding."""
    ours = ZImageTransformer.from_diffusers(diffusers_transformer("hd32"))
    x, t, caps = inputs(SMALL_CONFIGS["hd32"], "cfg")
    with torch.no_grad():
        ctx = ours.encode_context(caps)
        a = ours.forward_with_context(x[:1], t[:1], ctx.select([0]))
        b = ours(x[:1], t[:1], caps[:1])
    assert rel_l2(a, b) <= 1e-6


def test_drop_in_for_diffusers_call_convention():
    ours = ZImageTransformer.from_diffusers(diffusers_transformer("hd32"))
    x, t, caps = inputs(SMALL_CONFIGS["hd32"], "single")
    with torch.no_grad():
        as_list = ours(x, t, caps)
        as_tuple = ours(x, t, caps, return_dict=False)
        as_obj = ours(x, t, caps, return_dict=True)
    assert torch.equal(as_tuple[0][0], as_list[0]) and torch.equal(as_obj.sample[0], as_list[0])


def test_real_dims_parameter_count_on_meta():
    with torch.device("meta"):
        model = ZImageTransformer(ZImageConfig.from_preset("z-image"))
    assert count_parameters(model) == 6_154_908_736
    cfg = model.config
    assert (cfg.dim, cfg.n_layers, cfg.n_refiner_layers, cfg.n_heads, cfg.cap_feat_dim) == (3840, 30, 2, 30, 2560)
    assert cfg.axes_dims == (32, 48, 48) and cfg.axes_lens == (1536, 512, 512)


def test_invalid_config_is_explained():
    with pytest.raises(ValueError, match="axes_dims"):
        ZImageConfig(dim=64, n_heads=2, axes_dims=(8, 8, 8))


def test_rope_positions_beyond_tables_raise():
    ours = ZImageTransformer.from_diffusers(diffusers_transformer("hd32"))  # axes_lens [256, 32, 32]
    x = [torch.randn(16, 1, 70, 8)]  # 35 patch rows > 32
    with pytest.raises(ValueError, match="axes_lens"):
        ours(x, torch.tensor([0.5]), [torch.randn(4, 16)])
