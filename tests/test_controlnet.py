"""ControlNet (zimage_core.controlnet) against diffusers 0.42.1's ZImageControlNetModel and its two pipelines, on
tiny random components in the three checkpoint layouts (fp32, CPU), plus the definitions of controlMode and the step
window (counted ControlNet forwards)."""

import pytest
import torch
from PIL import Image, ImageDraw

from zimage_core import controlnet as C
from zimage_core.components import build_random_pipeline
from zimage_core.model import ZImageTransformer
from zimage_core.pipeline import ZImage

SHARED = C.SHARED_PREFIXES  # the transformer's modules a diffusers ControlNet holds

SHIFT = 3.0
# diffusers' add_control_noise_refiner per layout, and control_in_dim
LAYOUTS = {"1.0": (None, 16), "2.0": ("control_layers", 33), "2.1": ("control_noise_refiner", 33)}
TINY = dict(
    dim=64, n_layers=4, n_refiner_layers=2, n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[8, 12, 12],
    axes_lens=[256, 32, 32],
)  # fmt: skip


def rel_err(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def randomise(module, seed):
    """Every parameter random (the zero-initialised before/after projections included, or every hint is zero)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in module.named_parameters():
            r = torch.randn(p.shape, generator=g)
            if "norm" in n:
                p.copy_(1.0 + 0.3 * r)
            elif p.dim() == 2:
                p.copy_(r / p.shape[1] ** 0.5)
            else:
                p.copy_(0.5 * r)
    return module


def diffusers_controlnet(layout, transformer, seed=5, places=None, dim=None, heads=None, refiners=None):
    from diffusers import ZImageControlNetModel

    mode, in_dim = LAYOUTS[layout]
    cfg = transformer.config
    cn = ZImageControlNetModel(
        control_layers_places=places or list(range(0, cfg.n_layers, 2)),
        control_refiner_layers_places=list(range(cfg.n_refiner_layers)),
        control_in_dim=in_dim,
        add_control_noise_refiner=mode,
        dim=dim or cfg.dim,
        n_refiner_layers=refiners or cfg.n_refiner_layers,
        n_heads=heads or cfg.n_heads,
        n_kv_heads=heads or cfg.n_heads,
    ).eval()
    randomise(cn, seed)
    return ZImageControlNetModel.from_transformer(cn, transformer)


@pytest.fixture(scope="module")
def tiny():
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(0)
    tr = randomise(ZImageTransformer2DModel(**TINY).eval(), 1)
    return tr, ZImageTransformer.from_diffusers(tr)


def model_inputs(in_dim, seed=1, size=(8, 12)):
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(16, 1, *size, generator=g) for _ in range(2)]
    caps = [torch.randn(5, 16, generator=g), torch.randn(40, 16, generator=g)]  # padded to 32 and 64 tokens
    ctl = torch.randn(in_dim, 1, *size, generator=g)
    return x, caps, ctl


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_hints_and_transformer_output_match_diffusers(tiny, layout):
    tr, ours_t = tiny
    cn = diffusers_controlnet(layout, tr)
    ours = C.from_diffusers(cn, ours_t)
    x, caps, ctl = model_inputs(LAYOUTS[layout][1])
    t = torch.tensor([0.3, 0.3])
    with torch.no_grad():
        want = cn(x, t, caps, [ctl, ctl], conditioning_scale=0.7)
        want_out = tr(x, t, caps, controlnet_block_samples=want, return_dict=False)[0]
        plain = tr(x, t, caps, return_dict=False)[0]
        hook = C.ControlHook(ours, ours_t, x, ctl, 0.7)
        out = ours_t.forward_with_context(x, t, ours_t.encode_context(caps), hooks=[hook])
    assert sorted(hook._hints) == sorted(want) == [0, 2]
    for k, v in want.items():
        assert v.norm() > 1.0  # the hints are not zero
        assert rel_err(hook._hints[k], v) <= 1e-5
    for a, b, p in zip(out, want_out, plain):
        assert rel_err(b, p) > 1e-2  # the control changes the output
        assert rel_err(a, b) <= 1e-5


def test_shares_the_transformers_modules_and_owns_only_control_weights(tiny):
    tr, ours_t = tiny
    ours = C.from_diffusers(diffusers_controlnet("2.1", tr), ours_t)
    names = [n for n, _ in ours.named_parameters()]
    assert names and all(n.startswith(("control_layers.", "control_all_x_embedder.", "control_noise_refiner.")) for n in names)
    assert not any(p is q for p in ours.parameters() for q in ours_t.parameters())


# ---- loading -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_folder_and_single_file_give_bit_identical_weights(tiny, layout, tmp_path):
    from safetensors.torch import save_file

    tr, ours_t = tiny
    cn = diffusers_controlnet(layout, tr, seed=9)
    cn.save_pretrained(tmp_path / "folder")
    # the single-file release: the control weights only, no config (2.0 also carries a control_noise_refiner that
    # the conversion drops; give it an all-zero before_proj as the release's)
    sd = {k: v.contiguous() for k, v in cn.state_dict().items() if not k.startswith(SHARED)}
    if layout == "2.0":
        extra = C.ControlBlock(ours_t.config, 0).state_dict()
        sd.update({f"control_noise_refiner.0.{k}": torch.zeros_like(v) for k, v in extra.items()})
    save_file(sd, tmp_path / "release.safetensors")
    a = C.load_controlnet(tmp_path / "folder", ours_t)
    b = C.load_controlnet(tmp_path / "release.safetensors", ours_t)
    assert a.config == b.config
    assert a.config.layout == layout
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(sa) == sorted(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
        assert torch.equal(sa[k], cn.state_dict()[k]), k


def test_loader_errors_name_the_problem(tiny, tmp_path):
    from zimage_core.config import ZImageConfig

    tr, ours_t = tiny
    cn = diffusers_controlnet("1.0", tr)
    cn.save_pretrained(tmp_path / "cn")
    other = ZImageTransformer(ZImageConfig(dim=96, n_layers=4, n_heads=2, axes_dims=(16, 16, 16), cap_feat_dim=16))
    with pytest.raises(C.ControlNetError, match="dim: controlnet 64 vs transformer 96"):
        C.load_controlnet(tmp_path / "cn", other)
    (tmp_path / "x.ckpt").write_bytes(b"0")
    with pytest.raises(C.ControlNetError, match="pickle"):
        C.load_controlnet(tmp_path / "x.ckpt", ours_t)
