"""ControlNet under sequence parallelism (Ulysses, ring) and CFG parallelism: 2 and 4 gloo processes against one
process on the same inputs (fp32, CPU), as tests/test_parallel.py does for the plain model.

The hints are computed on each rank's shard of the sequence (the ranks count their all-to-alls / ring hops: the
control blocks add theirs); transformer outputs and whole-``generate`` latents must agree with one process within
1e-5 relative, for the 1.0 and 2.1 layouts, ``balanced`` and ``controlnet`` modes, 30 heads on 4 ranks included.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from zimage_core import controlnet as C
from zimage_core.parallel import ParallelConfig, ParallelContext, launch

from .test_parallel import GEN, PROMPT, START, make_inputs, make_model, make_pipe, rel_err

TOL = 1e-5
LAYOUT_FLAGS = {"1.0": (None, 16), "2.1": ("control_noise_refiner", 33)}


def make_controlnet(transformer, layout: str, seed: int = 5) -> C.ZImageControlNet:
    flag, in_dim = LAYOUT_FLAGS[layout]
    cfg = transformer.config
    config = C.ControlNetConfig(
        control_layers_places=(0, 1), control_in_dim=in_dim, control_refiner_layers_places=(0,),
        add_control_noise_refiner=flag, dim=cfg.dim, n_refiner_layers=1, n_heads=cfg.n_heads, n_kv_heads=cfg.n_heads,
        norm_eps=cfg.norm_eps,
    )  # fmt: skip
    cn = C.ZImageControlNet(config, cfg).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in cn.named_parameters():  # every weight random: zero projections would make every hint zero
            r = torch.randn(p.shape, generator=g)
            p.copy_(1.0 + 0.3 * r if "norm" in name else (r / p.shape[-1] ** 0.5 if p.dim() == 2 else 0.5 * r))
    return cn


@torch.no_grad()
def controlled_out(n_heads: int, layout: str, mode: str, sp_hooks=()) -> torch.Tensor:
    """The transformer with one ControlNet on the "ragged" inputs ("controlnet" mode: the hints go to row 0 only)."""
    model = make_model(n_heads)
    cn = make_controlnet(model, layout)
    x, t, caps = make_inputs("ragged")
    g = torch.Generator().manual_seed(4)
    ctl = torch.randn(LAYOUT_FLAGS[layout][1], *x[0].shape[1:], generator=g)
    hook = C.ControlHook(cn, model, x, ctl, 0.8, rows=[0] if mode == "controlnet" else None)
    if sp_hooks:
        hook.sequence_parallel = sp_hooks[0]
    out = model.forward_with_context(x, t, model.encode_context(caps), hooks=[*sp_hooks, hook])
    return torch.cat([o.flatten() for o in out])


def _model_cases(world: int):
    if world == 2:
        return [("ulysses=2", 4), ("ring=2", 4)]
    return [("ulysses=4", 30), ("ring=4", 30)]


def _generate_cases(world: int):
    if world == 2:
        return [
            ("ulysses=2", "balanced"), ("ring=2", "controlnet"), ("cfg=2", "balanced"), ("cfg=2", "controlnet"),
            ("ulysses=2", "balanced+fb"),
        ]  # fmt: skip
    return [("ulysses=4", "balanced"), ("ulysses=2,cfg=2", "controlnet"), ("ulysses=2,cfg=2", "balanced")]


class ControlPipe:
    """make_pipe() with a stand-in VAE encoder for the guide image (a fixed function of the pixels): the ranks run no
    real VAE, and the ControlNet only needs the guide's latent."""

    @staticmethod
    def build(layout: str):
        pipe = make_pipe()

        def encode_image(image, generator=None):
            pooled = torch.nn.functional.avg_pool2d(image.float(), 8)  # [1, 3, h, w]
            mix = torch.randn(16, 3, generator=torch.Generator().manual_seed(9))
            return torch.einsum("oc,bchw->bohw", mix, pooled)

        pipe.encode_image = encode_image
        return pipe, make_controlnet(pipe.transformer, layout, seed=6)


def guide_tensor():
    g = torch.Generator().manual_seed(3)
    return torch.rand(1, 3, GEN["height"], GEN["width"], generator=g) * 2 - 1


def generate_kwargs(cn, mode):
    kw = dict(GEN, controlnets=[C.ControlNetInput(cn, guide_tensor(), weight=0.9, mode=mode.split("+")[0])])
    if mode.endswith("+fb"):  # a step cache that reuses every step it may: the ranks take one process's decisions
        from zimage_core.cache import CacheConfig

        kw["cache"] = CacheConfig.for_method("fb", threshold=1e9, max_consecutive=2)
    return kw


def rank_main(rank: int, world: int):
    out: dict = {}
    contexts: dict[str, ParallelContext] = {}

    def ctx(spec):
        if spec not in contexts:
            contexts[spec] = ParallelContext(ParallelConfig.parse(spec))
        return contexts[spec]

    calls = {"all_to_all_single": 0, "batch_isend_irecv": 0}
    for name in calls:
        real = getattr(dist, name)

        def counted(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)

        setattr(dist, name, counted)
    for layout in LAYOUT_FLAGS:
        for spec, heads in _model_cases(world):
            for mode in ("balanced", "controlnet"):
                before = dict(calls)
                out[("model", layout, spec, mode)] = controlled_out(heads, layout, mode, ctx(spec).hooks())
                out[("calls", layout, spec, mode)] = {k: calls[k] - before[k] for k in calls}
        for spec, mode in _generate_cases(world):
            pipe, cn = ControlPipe.build(layout)
            res = ctx(spec).generate(pipe, PROMPT, **generate_kwargs(cn, mode))
            out[("generate", layout, spec, mode)] = (res.latents, res.stats["controlnet"])
    return out


@pytest.fixture(scope="module")
def single():
    ref = {}
    for layout in LAYOUT_FLAGS:
        for heads in (4, 30):
            for mode in ("balanced", "controlnet"):
                ref[("model", layout, heads, mode)] = controlled_out(heads, layout, mode)
        pipe, cn = ControlPipe.build(layout)
        plain = pipe.generate(PROMPT, **GEN).latents
        for mode in ("balanced", "controlnet", "balanced+fb"):
            res = pipe.generate(PROMPT, **generate_kwargs(cn, mode))
            assert rel_err(plain, res.latents) > 1e-3  # the ControlNet changes the result
            if mode.endswith("+fb"):
                assert any(not d["computed"] for d in res.stats["cache"][0]["decisions"])  # the cache reused steps
            ref[("generate", layout, mode)] = res.latents
    return ref


def _check(world, single):
    results = launch(rank_main, world, (world,), **START)
    errors = {}
    for layout in LAYOUT_FLAGS:
        # blocks with attention per forward: 2 main + 1 noise refiner; the ControlNet adds its 2 control layers and
        # its image-only stage (1.0: 1 refiner block; 2.1: 1 control refiner block and its pass through the shared
        # noise refiner); the "controlnet" mode runs them on row 0 only, still sharded
        blocks = 3 + 2 + (1 if layout == "1.0" else 2)
        for spec, heads in _model_cases(world):
            for mode in ("balanced", "controlnet"):
                ref = single[("model", layout, heads, mode)]
                for r in range(world):
                    errors[(r, layout, spec, mode)] = rel_err(ref, results[r][("model", layout, spec, mode)])
                    calls = results[r][("calls", layout, spec, mode)]
                    if spec.startswith("ulysses"):
                        assert calls == {"all_to_all_single": 2 * blocks, "batch_isend_irecv": 0}, (spec, calls)
                    else:
                        assert calls == {"all_to_all_single": 0, "batch_isend_irecv": blocks * (world - 1)}, calls
        for spec, mode in _generate_cases(world):
            forwards = []
            for r in range(world):
                latents, stats = results[r][("generate", layout, spec, mode)]
                errors[(r, layout, "generate", spec, mode)] = rel_err(single[("generate", layout, mode)], latents)
                forwards.append(stats[0]["controlnet_forwards"])
            # every rank runs the ControlNet, except the negative-half CFG ranks in "controlnet" mode
            idle = [f == 0 for f in forwards]
            assert idle == [mode == "controlnet" and "cfg" in spec and r >= world // 2 for r in range(world)], forwards
    bad = {k: v for k, v in errors.items() if not v <= TOL}
    assert not bad, bad


def test_controlnet_two_ranks_ulysses_ring_cfg_parity(single):
    _check(2, single)


def test_controlnet_four_ranks_30_heads_ulysses_ring_and_ulysses_x_cfg(single):
    _check(4, single)


def test_cli_generate_parallel_with_a_control_image_matches_one_process(tmp_path, monkeypatch, capfd):
    """``zimage generate --parallel … --control-image`` (the embedded control model) draws what one process draws."""
    import numpy as np
    from PIL import Image, ImageDraw

    from zimage_core import cli

    monkeypatch.setenv("ZIMAGE_PARALLEL_START", "fork")
    guide = Image.new("RGB", (64, 64), (0, 0, 0))
    ImageDraw.Draw(guide).ellipse([8, 8, 40, 40], fill=(255, 255, 255))
    guide.save(tmp_path / "guide.png")
    args = ["a large red circle in the top left on a blue background", "--steps", "2", "--seed", "1", "--quiet"]
    args += ["--cfg-scale", "3", "--width", "64", "--height", "64", "--control-image", str(tmp_path / "guide.png")]
    assert cli.main(["generate", *args, "-o", str(tmp_path / "one.png")]) == 0
    assert cli.main(["generate", *args, "--control-weight", "0", "-o", str(tmp_path / "off.png")]) == 0
    for spec in ("ulysses=2", "cfg=2"):
        out = tmp_path / f"{spec}.png"
        assert cli.main(["generate", *args, "--control-mode", "balanced", "--parallel", spec, "-o", str(out)]) == 0
        assert f"parallel: {spec}" in capfd.readouterr().out
    one, off, uly, cfg = (
        np.asarray(Image.open(tmp_path / f"{n}.png")).astype(int) for n in ("one", "off", "ulysses=2", "cfg=2")
    )
    assert np.abs(one - off).max() > 8  # the control image changes the picture
    assert np.abs(one - uly).max() <= 1 and np.abs(one - cfg).max() <= 1  # latents agree to ~1e-7
