"""Every released ControlNet layout loads from a single file and from a diffusers folder, told apart by its tensor
names; a file matching no layout is refused naming what is missing or extra; a hostile ControlNet folder is refused
like a hostile transformer folder (tests/test_security.py).

The layouts are written here from the public sources, not from our table: the control-layer places and input
channels of VideoX-Fun's config/z_image/z_image_control{,_2.0,_2.1,_2.1_lite}.yaml, and the tensor names of
diffusers 0.42.1's ZImageControlNetModel built with those configs (the names VideoX-Fun's
ZImageControlTransformer2DModel gives its control modules). Small random weights (dim 32) on a 30-layer transformer,
so the released places fit.
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import save_file

from zimage_core import controlnet as C
from zimage_core.model import ZImageTransformer

from .test_controlnet import SHARED, randomise, rel_err

T30 = dict(
    dim=32, n_layers=30, n_refiner_layers=2, n_heads=2, n_kv_heads=2, cap_feat_dim=16, axes_dims=[4, 6, 6],
    axes_lens=[256, 32, 32],
)  # fmt: skip
EVERY_OTHER = list(range(0, 30, 2))
# name: (control_layers_places, add_control_noise_refiner in diffusers' terms, control_in_dim), from the yaml files
RELEASED = {
    "union-1.0": ([0, 5, 10, 15, 20, 25], None, 16),  # z_image_control.yaml
    "union-2.0": (EVERY_OTHER, "control_layers", 33),  # z_image_control_2.0.yaml (refiner, not "correctly")
    "union-2.1": (EVERY_OTHER, "control_noise_refiner", 33),  # z_image_control_2.1.yaml
    "union-2.1-lite": ([0, 10, 20], "control_noise_refiner", 33),  # z_image_control_2.1_lite.yaml
}


@pytest.fixture(scope="module")
def t30():
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(0)
    tr = randomise(ZImageTransformer2DModel(**T30).eval(), 1)
    return tr, ZImageTransformer.from_diffusers(tr)


def diffusers_cn(name, tr, seed=3):
    from diffusers import ZImageControlNetModel

    places, mode, in_dim = RELEASED[name]
    cn = ZImageControlNetModel(
        control_layers_places=places, control_refiner_layers_places=[0, 1], control_in_dim=in_dim,
        add_control_noise_refiner=mode, dim=32, n_refiner_layers=2, n_heads=2, n_kv_heads=2,
    ).eval()  # fmt: skip
    randomise(cn, seed)
    return ZImageControlNetModel.from_transformer(cn, tr)


def release_state_dict(name, cn):
    """The tensors of a released single file: the control modules only. The 2.0 release still carries the two
    control refiner blocks VideoX-Fun builds (add_control_noise_refiner: true) but never trains or runs (not
    "correctly"): their before_proj stays at its zero initialisation."""
    sd = {k: v.detach().clone().contiguous() for k, v in cn.state_dict().items() if not k.startswith(SHARED)}
    if name == "union-2.0":
        from diffusers import ZImageControlNetModel

        ref = ZImageControlNetModel(
            control_layers_places=[0], control_refiner_layers_places=[0, 1], control_in_dim=33,
            add_control_noise_refiner="control_noise_refiner", dim=32, n_refiner_layers=2, n_heads=2, n_kv_heads=2,
        )  # fmt: skip
        randomise(ref, 11)
        for k, v in ref.state_dict().items():
            if k.startswith("control_noise_refiner."):
                sd[k] = torch.zeros_like(v) if "before_proj" in k else v.clone()
    return sd


@pytest.mark.parametrize("name", list(RELEASED))
def test_each_released_layout_loads_from_its_single_file_and_a_diffusers_folder(t30, name, tmp_path):
    tr, ours_t = t30
    cn = diffusers_cn(name, tr)
    cn.save_pretrained(tmp_path / "folder")
    # a misleading file name: the layout comes from the tensor names
    single = tmp_path / "Z-Image-Turbo-Fun-Controlnet-Union-2.1-lite.safetensors"
    save_file(release_state_dict(name, cn), single)
    places, mode, in_dim = RELEASED[name]
    want = {k: v for k, v in cn.state_dict().items() if not k.startswith(SHARED)}
    for src in (single, tmp_path / "folder"):
        m = C.load_controlnet(src, ours_t)
        assert m.config.variant == name, src
        assert list(m.config.control_layers_places) == places
        assert m.config.add_control_noise_refiner == mode and m.config.control_in_dim == in_dim
        got = m.state_dict()
        assert sorted(got) == sorted(want)
        for k in want:
            assert torch.equal(got[k], want[k]), k


@pytest.mark.parametrize("name", ["union-2.1-lite", "union-2.1"])
def test_loaded_single_file_gives_diffusers_hints(t30, name, tmp_path):
    """The single file, loaded with its detected layout, computes diffusers' hints (the lite's 3 places included)."""
    tr, ours_t = t30
    cn = diffusers_cn(name, tr, seed=8)
    save_file(release_state_dict(name, cn), tmp_path / "f.safetensors")
    ours = C.load_controlnet(tmp_path / "f.safetensors", ours_t)
    g = torch.Generator().manual_seed(1)
    x = [torch.randn(16, 1, 8, 8, generator=g) for _ in range(2)]
    caps = [torch.randn(5, 16, generator=g), torch.randn(40, 16, generator=g)]
    ctl = torch.randn(33, 1, 8, 8, generator=g)
    t = torch.tensor([0.4, 0.4])
    with torch.no_grad():
        want = cn(x, t, caps, [ctl, ctl], conditioning_scale=0.8)
        hook = C.ControlHook(ours, ours_t, x, ctl, 0.8)
        ours_t.forward_with_context(x, t, ours_t.encode_context(caps), hooks=[hook])
    assert sorted(hook._hints) == sorted(want) == RELEASED[name][0]
    for k, v in want.items():
        assert v.norm() > 0.1
        assert rel_err(hook._hints[k], v) <= 1e-5


def test_2_0_and_2_1_share_names_and_the_zero_before_proj_decides(t30, tmp_path):
    tr, ours_t = t30
    sd = release_state_dict("union-2.0", diffusers_cn("union-2.0", tr))
    save_file(sd, tmp_path / "a.safetensors")
    assert C.load_controlnet(tmp_path / "a.safetensors", ours_t).config.variant == "union-2.0"
    sd["control_noise_refiner.0.before_proj.weight"] = torch.ones_like(sd["control_noise_refiner.0.before_proj.weight"])
    save_file(sd, tmp_path / "b.safetensors")
    assert C.load_controlnet(tmp_path / "b.safetensors", ours_t).config.variant == "union-2.1"


def test_a_file_matching_no_layout_names_the_missing_and_extra_tensors(t30, tmp_path):
    tr, ours_t = t30
    sd = release_state_dict("union-2.1", diffusers_cn("union-2.1", tr))
    dropped = {k: v for k, v in sd.items() if not k.startswith("control_layers.14.")}
    save_file({**dropped, "control_extra.weight": torch.zeros(3)}, tmp_path / "odd.safetensors")
    with pytest.raises(C.ControlNetError) as e:
        C.load_controlnet(tmp_path / "odd.safetensors", ours_t)
    msg = str(e.value)
    assert "match no released ControlNet layout" in msg and "nearest union-2.1" in msg
    assert "missing (" in msg and "control_layers.14." in msg
    assert "extra (1): control_extra.weight" in msg
    save_file({"layers.0.attention.to_q.weight": torch.zeros(2, 2)}, tmp_path / "not_cn.safetensors")
    with pytest.raises(C.ControlNetError, match="not a Z-Image ControlNet"):
        C.load_controlnet(tmp_path / "not_cn.safetensors", ours_t)
    # the right names with a wrong shape: named as mis-shaped
    sd2 = dict(sd)
    sd2["control_layers.3.after_proj.weight"] = torch.zeros(32, 31)
    save_file(sd2, tmp_path / "shape.safetensors")
    with pytest.raises(C.ControlNetError, match=r"mis-shaped keys \(1\): control_layers\.3\.after_proj\.weight"):
        C.load_controlnet(tmp_path / "shape.safetensors", ours_t)


# ---- hostile folders: refused like a hostile transformer folder ------------------------------------------------------


@pytest.fixture
def sharded(t30, tmp_path):
    tr, _ = t30
    folder = tmp_path / "cn"
    diffusers_cn("union-2.1-lite", tr).save_pretrained(folder, max_shard_size="40KB")
    assert (folder / "diffusion_pytorch_model.safetensors.index.json").exists()
    return folder


def test_sharded_folder_loads(t30, sharded):
    assert C.load_controlnet(sharded, t30[1]).config.variant == "union-2.1-lite"


@pytest.mark.parametrize("kind", ["dotdot", "absolute"])
def test_index_shard_outside_the_controlnet_folder_refused(t30, sharded, kind):
    index_path = sharded / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    outside = sharded.parent / "outside.safetensors"
    shutil.move(sharded / first, outside)
    target = "../outside.safetensors" if kind == "dotdot" else str(outside)
    index["weight_map"] = {k: (target if v == first else v) for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    with pytest.raises(C.ControlNetError, match="outside"):
        C.load_controlnet(sharded, t30[1])


def test_pickle_weights_in_a_controlnet_folder_refused(t30, tmp_path):
    from safetensors.torch import load_file

    folder = tmp_path / "cn"
    diffusers_cn("union-1.0", t30[0]).save_pretrained(folder)
    st = folder / "diffusion_pytorch_model.safetensors"
    torch.save(load_file(st), folder / "diffusion_pytorch_model.bin")
    st.unlink()
    with pytest.raises(C.ControlNetError, match="pickle"):
        C.load_controlnet(folder, t30[1])


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this OS")
@pytest.mark.parametrize("name", ["diffusion_pytorch_model.safetensors", "config.json", "single"])
def test_fifo_as_controlnet_weights_or_config_refused_without_blocking(t30, tmp_path, name):
    folder = tmp_path / "cn"
    diffusers_cn("union-1.0", t30[0]).save_pretrained(folder)
    target = tmp_path / "release.safetensors" if name == "single" else folder / name
    if target.exists():
        target.unlink()
    os.mkfifo(target)
    # in a child process: a blocked open() of a FIFO would hang the test run
    code = (
        "import sys, torch\nfrom zimage_core.controlnet import ControlNetError, load_controlnet\n"
        "from zimage_core.model import ZImageTransformer\nfrom zimage_core.config import ZImageConfig\n"
        f"t = ZImageTransformer(ZImageConfig(**{T30!r}))\n"
        "try:\n    load_controlnet(sys.argv[1], t)\n"
        "except ControlNetError as e:\n    print('REFUSED', e)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(target if name == "single" else folder)],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert "REFUSED" in proc.stdout and "not a regular file" in proc.stdout, proc.stdout + proc.stderr[-2000:]


@pytest.mark.parametrize(
    "patch,match",
    [
        ({"n_refiner_layers": 10**7}, "parameters"),
        ({"control_in_dim": 10**12}, "parameters"),
        ({"n_refiner_layers": 2.0}, "n_refiner_layers"),
        ({"control_in_dim": "33"}, "control_in_dim"),
        ({"control_layers_places": 5}, "control_layers_places"),
        ({"control_layers_places": [0, 5, 40]}, "control_layers_places"),
        ({"qk_norm": "yes"}, "qk_norm"),
    ],
)
def test_config_promising_more_than_the_files_hold_or_mistyped_is_refused(t30, tmp_path, patch, match):
    import threading

    folder = tmp_path / "cn"
    diffusers_cn("union-2.1-lite", t30[0]).save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, **patch}))
    box = {}

    def run():
        try:
            C.load_controlnet(folder, t30[1])
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            box["error"] = e

    th = threading.Thread(target=run, daemon=True)
    th.start()
    th.join(60)
    assert not th.is_alive(), "still loading after 60 s"
    assert isinstance(box.get("error"), C.ControlNetError), box
    assert match in str(box["error"]) and "config.json" in str(box["error"])


@pytest.mark.parametrize("data", [b"{not json", b"[1, 2]", b"[" * 100_000])
def test_malformed_controlnet_config_json_is_a_controlnet_error(t30, tmp_path, data):
    folder = tmp_path / "cn"
    diffusers_cn("union-1.0", t30[0]).save_pretrained(folder)
    (folder / "config.json").write_bytes(data)
    with pytest.raises(C.ControlNetError, match="config.json"):
        C.load_controlnet(folder, t30[1])


# ---- guide kinds (controlType) --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A small random pipeline and a random-weight 2.1-layout ControlNet for it."""
    from zimage_core.components import build_random_pipeline
    from zimage_core.pipeline import ZImage

    folder = build_random_pipeline(tmp_path_factory.mktemp("cntypes") / "random", seed=3)
    pipe = ZImage.from_pretrained(folder, device="cpu", dtype=torch.float32)
    tc = pipe.transformer.config
    config = C.ControlNetConfig(
        control_layers_places=(0, 1), control_in_dim=33, control_refiner_layers_places=(0,),
        add_control_noise_refiner="control_noise_refiner", dim=tc.dim, n_refiner_layers=tc.n_refiner_layers,
        n_heads=tc.n_heads, n_kv_heads=tc.n_kv_heads, norm_eps=tc.norm_eps,
    )  # fmt: skip
    return pipe, randomise(C.ZImageControlNet(config, tc).eval(), 31)


def run(pipe, cn):
    return pipe.generate(
        "a white circle", seed=5, steps=4, shift=3.0, cfg_scale=2.0, width=64, height=64, output_type="latent",
        controlnets=[cn],
    )  # fmt: skip


def colour_guide(w=64, h=64):
    from PIL import Image, ImageDraw

    im = Image.new("RGB", (w, h), (20, 90, 200))
    ImageDraw.Draw(im).ellipse([10, 14, 40, 50], fill=(230, 60, 30))
    ImageDraw.Draw(im).rectangle([40, 5, 60, 30], fill=(40, 220, 90))
    return im


def test_gray_guide_equals_the_luminance_image_and_differs_from_colour(small):
    """controlType gray: the result is the one for PIL's luminance image (ITU-R 601) of the guide."""
    ours, cn_pipe = small
    g = colour_guide()
    gray = run(ours, C.ControlNetInput(cn_pipe, g, weight=1.0, control_type="gray")).latents
    pil_gray = run(ours, C.ControlNetInput(cn_pipe, g.convert("L").convert("RGB"), weight=1.0)).latents
    colour = run(ours, C.ControlNetInput(cn_pipe, g, weight=1.0)).latents
    as_is = run(ours, C.ControlNetInput(cn_pipe, g, weight=1.0, control_type="canny")).latents
    assert torch.equal(as_is, colour)  # a structural kind uses the guide as given
    d_gray, d_colour = rel_err(gray, pil_gray), rel_err(colour, pil_gray)
    assert d_colour > 1e-3 and d_gray < 0.05 * d_colour, (d_gray, d_colour)  # PIL rounds luminance to 8 bits


@pytest.mark.parametrize("name,kind,ok", [
    ("union-1.0", "gray", False), ("union-1.0", "tile", False), ("union-2.0", "gray", False),
    ("union-1.0", "scribble", True), ("union-2.1", "gray", True), ("union-2.1-lite", "tile", True),
    ("union-2.1", "sketch", False),
])  # fmt: skip
def test_control_type_per_layout_and_unknown_refused_naming_the_field(t30, tmp_path, name, kind, ok):
    from types import SimpleNamespace

    from zimage_core.errors import RequestError

    tr, ours_t = t30
    save_file(release_state_dict(name, diffusers_cn(name, tr)), tmp_path / "f.safetensors")
    m = C.load_controlnet(tmp_path / "f.safetensors", ours_t)
    spec = C.ControlNetInput(m, colour_guide(), control_type=kind)
    # a transformer the ControlNet does not fit: prepare stops at the next check, before any image work
    fake = SimpleNamespace(transformer=SimpleNamespace(config=ours_t.config.replace(norm_eps=1e-3)))
    with pytest.raises(RequestError) as e:
        C.prepare(fake, [spec], 64, 64, 4)
    if ok:  # passed the type check, stopped at the next one
        assert e.value.field == "controlnets[0].model"
    else:
        assert e.value.field == "controlnets[0].control_type"
        assert ("not a guide" in str(e.value)) == (kind in C.CONTROL_TYPES)


def test_request_and_cli_control_type(small, tmp_path, capsys):
    from tests.helpers import image_request
    from zimage_core import cli
    from zimage_core.errors import RequestError

    ours, cn_pipe = small
    C.store_for(ours).add("test:cn21", cn_pipe)
    import base64
    import io

    buf = io.BytesIO()
    colour_guide(128, 128).save(buf, format="PNG")
    entry = {"model": "test:cn21", "guideImage": base64.b64encode(buf.getvalue()).decode(), "controlType": "sketch"}
    req = image_request(positivePrompt="a circle", width=128, height=128, steps=2, controlNet=[entry])
    with pytest.raises(RequestError) as e:
        ours.infer(req)
    assert e.value.field == "controlNet[0].controlType" and "gray" in str(e.value)
    entry["controlType"] = "gray"
    out = ours.infer(image_request(positivePrompt="a circle", width=128, height=128, steps=2, seed=3,
                                   outputType="base64Data", outputFormat="PNG", controlNet=[entry]))  # fmt: skip
    assert len(out) == 1
    colour_guide().save(tmp_path / "g.png")
    args = ["generate", "a circle", "--steps", "1", "--width", "64", "--height", "64", "--quiet"]
    args += ["--control-image", str(tmp_path / "g.png"), "--control-type", "sketch", "-o", str(tmp_path / "o.png")]
    assert cli.main(args) == 2
    assert "--control-type: must be one of canny" in capsys.readouterr().err
    assert not (tmp_path / "o.png").exists()


# ---- ControlNet with LoRA and with every step cache: one matrix ------------------------------------------------------
CACHE_METHODS = ("fb", "tea", "db")


def _gen(pipe, cn, guide_image, loras=(), cache=None, steps=6):
    return pipe.generate(
        "a white circle", seed=5, steps=steps, shift=3.0, cfg_scale=2.0, width=64, height=64, output_type="latent",
        controlnets=[C.ControlNetInput(cn, guide_image, weight=1.0)], loras=list(loras), cache=cache,
    )  # fmt: skip


@pytest.fixture(scope="module")
def lora(small, tmp_path_factory):
    from zimage_core.lora import load_lora

    from .test_lora import make_adapters, write_peft

    pipe, _ = small
    adapters = make_adapters(pipe.transformer, seed=2)
    return adapters, load_lora(write_peft(tmp_path_factory.mktemp("cnlora") / "l.safetensors", adapters))


def _merged(pipe, adapters, weight):
    """A context with the LoRA merged into the weights (the reference for the run-time LoRA)."""
    import contextlib

    from .test_lora import ALPHA, RANK

    @contextlib.contextmanager
    def ctx():
        mods = dict(pipe.transformer.named_modules())
        saved = {n: mods[n].weight.detach().clone() for n in adapters}
        try:
            with torch.no_grad():
                for n, (down, up) in adapters.items():
                    mods[n].weight += weight * (ALPHA / RANK) * up @ down
            yield
        finally:
            with torch.no_grad():
                for n, w in saved.items():
                    mods[n].weight.copy_(w)

    return ctx()


@pytest.mark.parametrize("with_lora", [False, True])
@pytest.mark.parametrize("method", CACHE_METHODS)
def test_controlnet_with_lora_and_each_cache_method(small, lora, method, with_lora):
    """Per cell: (a) the cache at threshold 0 (never reuses) gives the uncached ControlNet result; (b) the run-time
    LoRA gives the merged-weights result, through the ControlNet's pass over the shared modules too; (c) a cache
    that reuses steps runs fewer control layers than one that does not, and the result stays finite."""
    from zimage_core.cache import CacheConfig

    pipe, cn = small
    adapters, lw = lora
    g = colour_guide()
    loras = [(lw, 0.8, "both")] if with_lora else []
    plain = _gen(pipe, cn, g, loras)
    never = _gen(pipe, cn, g, loras, CacheConfig.for_method(method, threshold=0.0))
    assert rel_err(never.latents, plain.latents) <= 1e-6
    assert never.stats["controlnet"][0]["control_layers_run"] == plain.stats["controlnet"][0]["control_layers_run"]
    if with_lora:
        with _merged(pipe, adapters, 0.8):
            merged = _gen(pipe, cn, g)
        no_lora = _gen(pipe, cn, g)
        assert rel_err(plain.latents, no_lora.latents) > 1e-3  # the LoRA does something
        assert rel_err(plain.latents, merged.latents) <= 1e-5
    reuse = _gen(pipe, cn, g, loras, CacheConfig.for_method(method, threshold=1e9, max_consecutive=2))
    hits = [d for d in reuse.stats["cache"][0]["decisions"] if not d["computed"]]
    assert hits, reuse.stats["cache"][0]["decisions"]
    assert reuse.stats["controlnet"][0]["control_layers_run"] < plain.stats["controlnet"][0]["control_layers_run"]
    assert torch.isfinite(reuse.latents).all()


@pytest.mark.parametrize("name", list(RELEASED))
def test_drop_in_from_single_file_loads_each_release_offline(t30, name, tmp_path):
    """The drop-in's from_single_file on a local release file: no hub config needed, the layout from the names."""
    from zimage_core.diffusers import ZImageControlNetModel

    tr, _ = t30
    cn = diffusers_cn(name, tr, seed=12)
    save_file(release_state_dict(name, cn), tmp_path / "release.safetensors")
    m = ZImageControlNetModel.from_single_file(str(tmp_path / "release.safetensors"))
    places, mode, in_dim = RELEASED[name]
    assert list(m.config["control_layers_places"]) == places
    assert m.config["add_control_noise_refiner"] == mode and m.config["control_in_dim"] == in_dim
    assert m.config["n_heads"] == 2 and m.config["dim"] == 32
    want = {k: v for k, v in cn.state_dict().items() if not k.startswith(SHARED)}
    got = m.state_dict()
    assert sorted(got) == sorted(want) and all(torch.equal(got[k], want[k]) for k in want)


# ---- the same matrix on the drop-in: diffusers' LoRA API on our ControlNet pipeline, against diffusers' own ----------
@pytest.fixture(scope="module")
def dropin_lora_pair(tmp_path_factory):
    """(diffusers' ControlNet pipeline, ours, diffusers' result without the LoRA): the same small random components
    and ControlNet (2.0 layout); on both the same LoRA through diffusers' API (``load_lora_weights`` + ``set_adapters``
    with a weight; PEFT layers on diffusers', our run-time LoRA on ours)."""
    import diffusers

    import zimage_core.diffusers as zd
    from zimage_core.components import build_random_pipeline

    from .test_controlnet import diffusers_controlnet
    from .test_diffusers_lora import lora_sd

    folder = build_random_pipeline(tmp_path_factory.mktemp("cnlora_dropin") / "pipe", seed=3)
    base = diffusers.ZImagePipeline.from_pretrained(folder)
    cn = diffusers_controlnet("2.0", base.transformer, seed=21, places=[0, 1])
    theirs = diffusers.ZImageControlNetPipeline(**base.components, controlnet=cn)
    ours = zd.ZImageControlNetPipeline(**diffusers.ZImagePipeline.from_pretrained(folder).components, controlnet=cn)
    theirs.set_progress_bar_config(disable=True)
    no_lora = _dropin_run(theirs)
    for p in (theirs, ours):
        p.set_progress_bar_config(disable=True)
        p.load_lora_weights(lora_sd(p.transformer, 9), adapter_name="c")
        p.set_adapters("c", 0.8)
    return theirs, ours, no_lora


def _dropin_run(pipe, **kw):
    from .test_controlnet import guide

    return pipe(
        "a white circle", control_image=guide(64, 64), height=64, width=64, num_inference_steps=6, guidance_scale=2.0,
        controlnet_conditioning_scale=1.0, generator=torch.Generator().manual_seed(5), output_type="latent", **kw,
    ).images  # fmt: skip


@pytest.mark.parametrize("method", CACHE_METHODS)
def test_dropin_controlnet_with_diffusers_lora_api_and_each_cache_method(dropin_lora_pair, method):
    """Per cache method, on ``zimage_core.diffusers.ZImageControlNetPipeline`` with a LoRA loaded through diffusers'
    API: (a) without a cache and with the cache at threshold 0 (never reuses), the result equals diffusers' ControlNet
    pipeline with the same LoRA on PEFT (<= 1e-5), and the LoRA changes it; (b) a cache that reuses steps runs
    fewer control layers than none, and the result stays finite."""
    from zimage_core.cache import CacheConfig

    theirs, ours, no_lora = dropin_lora_pair
    want = _dropin_run(theirs)
    assert rel_err(want, no_lora) > 1e-3  # the LoRA does something
    plain = _dropin_run(ours)
    plain_layers = ours._last_stats.controlnet[0]["control_layers_run"]
    assert rel_err(plain, want) <= 1e-5
    never = _dropin_run(ours, cache=CacheConfig.for_method(method, threshold=0.0))
    assert rel_err(never, want) <= 1e-5
    assert ours._last_stats.controlnet[0]["control_layers_run"] == plain_layers
    reuse = _dropin_run(ours, cache=CacheConfig.for_method(method, threshold=1e9, max_consecutive=2))
    stats = ours._last_stats
    assert [d for d in stats.cache[0]["decisions"] if not d["computed"]], stats.cache[0]["decisions"]
    assert stats.controlnet[0]["control_layers_run"] < plain_layers
    assert torch.isfinite(reuse).all()
