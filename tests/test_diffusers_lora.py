"""diffusers' LoRA API (``ZImageLoraLoaderMixin``) on the drop-in pipelines.

Written from what diffusers' own LoRA suite checks (``tests/lora/utils.py`` and
``tests/lora/test_lora_layers_z_image.py`` in diffusers' repository): loading, ``set_adapters`` with weights,
fuse / unfuse, unload, delete, adapter metadata, save / load of LoRA layers, wrong adapter names, the no-LoRA-keys
log line, hotswap, disable / enable. Every test of the ``impl`` part runs once on diffusers' own pipeline (with PEFT,
the reference) and once on ours; the parity part compares the two on the same LoRA (<= 1e-5), and the last part
checks what only ours promises (a call never merges the LoRA into the shared weights, other threads do not see it,
the service's LoRA path gives the same numbers) and LoRA on the ControlNet pipelines.

diffusers' LoRA API needs PEFT (``pip install peft``; the ``dev`` extra lists it).
"""

from __future__ import annotations

import logging
from types import SimpleNamespace

import diffusers
import peft  # noqa: F401  (required, not skipped: diffusers' LoRA API, the reference half, needs it; the dev extra)
import pytest
import torch

import zimage_core.diffusers as zd

TARGETS = ("to_q", "to_k", "to_v", "to_out.0")  # diffusers' Z-Image LoRA suite's denoiser_target_modules
RANK = 4
TOL = 1e-5


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from zimage_core.components import build_random_pipeline

    return build_random_pipeline(tmp_path_factory.mktemp("dlora") / "pipe", seed=4)


@pytest.fixture(scope="module", params=["diffusers", "zimage"])
def impl(request):
    mod = diffusers if request.param == "diffusers" else zd
    return SimpleNamespace(name=request.param, T2I=mod.ZImagePipeline)


def fresh(cls, folder):
    pipe = cls.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def lora_sd(transformer, seed, rank=RANK, targets=TARGETS, scale=0.1):
    """A random LoRA in diffusers' saved format (``transformer.<module>.lora_A/B.weight``) on ``targets``."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, m in transformer.named_modules():
        if name.endswith(targets) and hasattr(m, "in_features"):  # nn.Linear, or PEFT's wrapper of one
            sd[f"transformer.{name}.lora_A.weight"] = torch.randn(rank, m.in_features, generator=g) * scale
            sd[f"transformer.{name}.lora_B.weight"] = torch.randn(m.out_features, rank, generator=g) * scale
    assert sd
    return sd


def out(pipe, **kw):
    args = dict(prompt="a red circle", height=64, width=64, num_inference_steps=2, guidance_scale=1.5)
    args.update(kw)
    return pipe(**args, generator=torch.Generator().manual_seed(0), output_type="latent").images


def rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


# ---- the API, on diffusers' pipeline and on ours -------------------------------------------------------------------
def test_load_changes_output_and_names_the_adapter(impl, folder):
    pipe = fresh(impl.T2I, folder)
    base = out(pipe)
    pipe.load_lora_weights(lora_sd(pipe.transformer, 1), adapter_name="a1")
    assert pipe.get_list_adapters() == {"transformer": ["a1"]}
    assert pipe.get_active_adapters() == ["a1"]
    assert rel(out(pipe), base) > 1e-3
    pipe.load_lora_weights(lora_sd(pipe.transformer, 2))  # no name: diffusers' default_<n>
    assert pipe.get_list_adapters() == {"transformer": ["a1", "default_1"]}
    assert pipe.get_active_adapters() == ["default_1"]  # the newly loaded adapter is the active one


def test_set_adapters_with_weights(impl, folder):
    pipe = fresh(impl.T2I, folder)
    base = out(pipe)
    pipe.load_lora_weights(lora_sd(pipe.transformer, 1), adapter_name="a1")
    pipe.load_lora_weights(lora_sd(pipe.transformer, 2), adapter_name="a2")
    pipe.set_adapters("a1")
    o1 = out(pipe)
    pipe.set_adapters("a2")
    o2 = out(pipe)
    pipe.set_adapters(["a1", "a2"])
    mixed = out(pipe)
    assert pipe.get_active_adapters() == ["a1", "a2"]
    for a, b in ((o1, base), (o2, base), (mixed, base), (o1, o2), (o1, mixed), (o2, mixed)):
        assert rel(a, b) > 1e-3
    pipe.set_adapters(["a1", "a2"], [0.0, 0.0])  # zero weights: the base output
    assert rel(out(pipe), base) <= TOL
    pipe.set_adapters(["a1", "a2"], [1.0, 0.0])
    assert rel(out(pipe), o1) <= TOL
    pipe.set_adapters(["a1", "a2"], adapter_weights=0.5)
    half = out(pipe)
    assert rel(half, mixed) > 1e-3 and rel(half, base) > 1e-3
    with pytest.raises(ValueError, match="Length of adapter names"):
        pipe.set_adapters(["a1", "a2"], [1.0])


def test_wrong_adapter_names_raise(impl, folder, caplog):
    pipe = fresh(impl.T2I, folder)
    pipe.load_lora_weights(lora_sd(pipe.transformer, 1), adapter_name="adapter-1")
    with pytest.raises(ValueError, match="not in the list of present adapters"):
        pipe.set_adapters("test")
    with pytest.raises(ValueError, match="not in the list of present adapters"):
        pipe.set_adapters(["adapter-1", "other"])
    with caplog.at_level(logging.WARNING, logger="diffusers.loaders.lora_base"):
        pipe.set_adapters("adapter-1", adapter_weights={"foo": 0.0, "bar": 0.0, "tik": 0.0})
    msg = "The following components in `adapter_weights` are not part of the pipeline: ['bar', 'foo', 'tik']. "
    assert msg in caplog.text
    pipe.set_adapters("adapter-1")
    out(pipe)  # still runs
    with pytest.raises(ValueError, match="already in use"):
        pipe.load_lora_weights(lora_sd(pipe.transformer, 2), adapter_name="adapter-1")


def test_no_lora_keys_logs_and_changes_nothing(impl, folder, caplog):
    pipe = fresh(impl.T2I, folder)
    base = out(pipe)
    with caplog.at_level(logging.WARNING, logger="diffusers.loaders.peft"):
        pipe.load_lora_weights({"lora_foo": torch.tensor(2.0), "lora_bar": torch.tensor(3.0)})
    messages = [r.getMessage() for r in caplog.records if r.name == "diffusers.loaders.peft"]
    assert any(m.startswith("No LoRA keys associated to ZImageTransformer2DModel") for m in messages)
    assert pipe.get_list_adapters() == {}
    assert rel(out(pipe), base) <= TOL
    with pytest.raises(ValueError, match="Invalid adapter checkpoint"):
        pipe.load_lora_weights({"transformer.layers.0.attention.to_q.weight": torch.zeros(2, 2)})


def test_fuse_unfuse(impl, folder):
    pipe = fresh(impl.T2I, folder)
    base = out(pipe)
    pipe.load_lora_weights(lora_sd(pipe.transformer, 1), adapter_name="a1")
    pipe.load_lora_weights(lora_sd(pipe.transformer, 2), adapter_name="a2")
    pipe.set_adapters(["a1", "a2"])
    both = out(pipe)
    pipe.set_adapters(["a1"])
    one = out(pipe)
    pipe.fuse_lora(adapter_names=["a1"])
    assert pipe.num_fused_loras == 1
    assert rel(out(pipe), one) <= 1e-4  # fused: the same output
    pipe.unfuse_lora()
    assert pipe.num_fused_loras == 0
    assert rel(out(pipe), one) <= 1e-4  # unfused: the adapter still applies
    pipe.set_adapters(["a1", "a2"])
    pipe.fuse_lora(components=["transformer"], adapter_names=["a2", "a1"])
    assert pipe.num_fused_loras == 2
    assert rel(out(pipe), both) <= 1e-4
    pipe.unfuse_lora(components=["transformer"])
    assert pipe.num_fused_loras == 0
    pipe.disable_lora()
    assert rel(out(pipe), base) <= 1e-4  # unfusing restored the weights
    with pytest.raises(ValueError, match="cannot be an empty list"):
        pipe.fuse_lora(components=[])


@pytest.mark.parametrize("lora_scale", [1.0, 0.8])
def test_lora_scale_kwarg_matches_fusion(impl, folder, lora_scale):
    pipe = fresh(impl.T2I, folder)
    pipe.load_lora_weights(lora_sd(pipe.transformer, 1), adapter_name="adapter-1")
    pipe.set_adapters(["adapter-1"])
    scaled = out(pipe, joint_attention_kwargs={"scale": lora_scale})
    pipe.fuse_lora(adapter_names=["adapter-1"], lora_scale=lora_scale)
    assert rel(out(pipe), scaled) <= 1e-4


def test_unload_and_reload(impl, folder):
    pipe = fresh(impl.T2I, folder)
    base = out(pipe)
    sd = lora_sd(pipe.transformer, 1)
    pipe.load_lora_weights(sd, adapter_name="a1")
    with_lora = out(pipe)
    pipe.unload_lora_weights()
    assert pipe.get_list_adapters() == {} and pipe.get_active_adapters() == []
    assert rel(out(pipe), base) <= TOL
    pipe.load_lora_weights(sd, adapter_name="a1")  # the name is free again
    assert rel(out(pipe), with_lora) <= TOL


def test_delete_adapters(impl, folder):
    pipe = fresh(impl.T2I, folder)
    base = out(pipe)
    pipe.load_lora_weights(lora_sd(pipe.transformer, 1), adapter_name="a1")
    pipe.load_lora_weights(lora_sd(pipe.transformer, 2), adapter_name="a2")
    o2 = out(pipe)  # a2 active
    pipe.set_adapters(["a1", "a2"])
    pipe.delete_adapters("a1")
    assert pipe.get_list_adapters() == {"transformer": ["a2"]}
    assert pipe.get_active_adapters() == ["a2"]
    assert rel(out(pipe), o2) <= TOL
    pipe.delete_adapters(["a2"])
    assert rel(out(pipe), base) <= TOL
    pipe.load_lora_weights(lora_sd(pipe.transformer, 2), adapter_name="a2")  # load -> delete -> load works
    assert rel(out(pipe), o2) <= TOL


def test_disable_enable(impl, folder):
    pipe = fresh(impl.T2I, folder)
    base = out(pipe)
    pipe.load_lora_weights(lora_sd(pipe.transformer, 1), adapter_name="a1")
    with_lora = out(pipe)
    pipe.disable_lora()
    assert rel(out(pipe), base) <= TOL
    assert pipe.get_active_adapters() == ["a1"]  # still listed as active, as in diffusers
    pipe.enable_lora()
    assert rel(out(pipe), with_lora) <= TOL


@pytest.mark.parametrize("lora_alpha", [4, 8, 16])
def test_metadata_save_load(impl, folder, tmp_path, lora_alpha):
    """``save_lora_weights`` with adapter metadata, read back by ``lora_state_dict(return_lora_metadata=True)``; the
    metadata's ``lora_alpha`` sets the scale alpha / r, as with a LoRA of alpha = rank at weight alpha / rank."""
    pipe = fresh(impl.T2I, folder)
    sd = {k.removeprefix("transformer."): v for k, v in lora_sd(pipe.transformer, 1).items()}
    metadata = {"r": RANK, "lora_alpha": lora_alpha, "target_modules": list(TARGETS), "init_lora_weights": False}
    impl.T2I.save_lora_weights(tmp_path, transformer_lora_layers=sd, transformer_lora_adapter_metadata=metadata)
    state_dict, parsed = pipe.lora_state_dict(tmp_path, return_lora_metadata=True)
    assert set(state_dict) == {f"transformer.{k}" for k in sd}
    assert parsed["transformer.lora_alpha"] == lora_alpha and parsed["transformer.r"] == RANK
    pipe.load_lora_weights(tmp_path)
    with_metadata = out(pipe)
    pipe.unload_lora_weights()
    pipe.load_lora_weights({f"transformer.{k}": v for k, v in sd.items()}, adapter_name="plain")  # alpha = rank
    pipe.set_adapters("plain", lora_alpha / RANK)
    assert rel(with_metadata, out(pipe)) <= 1e-4


def test_save_load_lora_layers_round_trip(impl, folder, tmp_path):
    pipe = fresh(impl.T2I, folder)
    pipe.load_lora_weights(lora_sd(pipe.transformer, 3), adapter_name="a")
    want = out(pipe)
    layers = {k.removeprefix("transformer."): v for k, v in lora_sd(pipe.transformer, 3).items()}
    impl.T2I.save_lora_weights(tmp_path, transformer_lora_layers=layers, weight_name="mine.safetensors")
    assert (tmp_path / "mine.safetensors").exists()
    pipe.unload_lora_weights()
    pipe.load_lora_weights(tmp_path, weight_name="mine.safetensors", adapter_name="b")
    assert rel(out(pipe), want) <= TOL


def test_hotswap(impl, folder):
    pipe = fresh(impl.T2I, folder)
    sd1, sd2 = lora_sd(pipe.transformer, 1), lora_sd(pipe.transformer, 2)
    pipe.load_lora_weights(sd2, adapter_name="ref")
    want = out(pipe)
    pipe.unload_lora_weights()
    pipe.load_lora_weights(sd1, adapter_name="x")
    first = out(pipe)
    pipe.load_lora_weights(sd2, adapter_name="x", hotswap=True)
    assert pipe.get_list_adapters() == {"transformer": ["x"]}
    got = out(pipe)
    assert rel(got, want) <= TOL and rel(got, first) > 1e-3
    with pytest.raises(ValueError, match="no existing adapter by that name"):
        pipe.load_lora_weights(sd1, adapter_name="y", hotswap=True)


# ---- parity: ours against diffusers on the same LoRA ---------------------------------------------------------------
@pytest.fixture(scope="module")
def both(folder):
    return fresh(diffusers.ZImagePipeline, folder), fresh(zd.ZImagePipeline, folder)


def test_parity_with_adapter_weights_and_scale(both):
    theirs, ours = both
    for p in both:
        p.unload_lora_weights()
        p.load_lora_weights(lora_sd(p.transformer, 5), adapter_name="a")
        p.load_lora_weights(lora_sd(p.transformer, 6, rank=2), adapter_name="b")
        p.set_adapters(["a", "b"], [0.7, -1.3])
    assert rel(out(ours), out(theirs)) <= TOL
    kw = dict(joint_attention_kwargs={"scale": 0.6}, guidance_scale=0.0)
    assert rel(out(ours, **kw), out(theirs, **kw)) <= TOL


def test_parity_kohya_file(both, tmp_path):
    """A kohya-format file (``lora_unet_`` names, ``.alpha`` scalars): diffusers converts it, both give the same."""
    from safetensors.torch import save_file

    sd = {}
    for k, v in lora_sd(both[1].transformer, 7, targets=("to_q", "to_v")).items():
        stem = k.removeprefix("transformer.").rsplit(".lora_", 1)[0].replace(".", "_")
        kind = "lora_down" if ".lora_A." in k else "lora_up"
        sd[f"lora_unet_{stem}.{kind}.weight"] = v
        sd[f"lora_unet_{stem}.alpha"] = torch.tensor(2.0)  # alpha 2, rank 4: scale 0.5
    save_file(sd, tmp_path / "kohya.safetensors")
    for p in both:
        p.unload_lora_weights()
        p.load_lora_weights(tmp_path / "kohya.safetensors", adapter_name="k")
    assert rel(out(both[1]), out(both[0])) <= TOL


# ---- ours only: shared LoRA application --------------------------------------------------------------------------
def test_a_call_never_merges_and_the_service_path_agrees(folder):
    """The drop-in applies a LoRA at run time (the weights are unchanged after a call), through the same code as
    ``ZImage.generate(loras=...)`` (the service's path): both give the same latents."""
    from zimage_core.lora import lora_from_state_dict
    from zimage_core.pipeline import ZImage

    pipe = fresh(zd.ZImagePipeline, folder)
    sd = lora_sd(pipe.transformer, 8)
    before = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    pipe.load_lora_weights(sd, adapter_name="s")
    pipe.set_adapters("s", 0.75)
    got = out(pipe, guidance_scale=0.0)
    assert all(torch.equal(before[k], v) for k, v in pipe.transformer.state_dict().items())
    core = ZImage.from_pretrained(folder, device="cpu", dtype=torch.float32)
    res = core.generate(
        "a red circle",
        width=64,
        height=64,
        steps=2,
        cfg_scale=1.0,
        seed=0,
        output_type="latent",
        loras=[(lora_from_state_dict(sd, "s"), 0.75, "both")],
    )
    assert rel(res.latents, got) <= TOL


def test_other_threads_do_not_see_a_calls_adapters(folder):
    """While a LoRA call runs in one thread, a plain model call in another thread sees the base weights."""
    import threading

    pipe = fresh(zd.ZImagePipeline, folder)
    base = out(pipe)
    pipe.load_lora_weights(lora_sd(pipe.transformer, 1), adapter_name="a1")
    with_lora = out(pipe)
    seen, started, release = {}, threading.Event(), threading.Event()

    def slow_step(p, i, t, kw):  # holds the LoRA call open while the other thread runs
        started.set()
        release.wait(timeout=60)
        return {}

    def lora_call():
        seen["lora"] = out(pipe, callback_on_step_end=slow_step)

    worker = threading.Thread(target=lora_call)
    worker.start()
    assert started.wait(timeout=60)
    twin = fresh(zd.ZImagePipeline, folder)
    twin.register_modules(transformer=pipe.transformer)  # the very modules the LoRA call is running on
    pipe.disable_lora()  # this thread's call carries no adapter; the running call read its adapters at its start
    seen["plain"] = out(twin)
    pipe.enable_lora()
    release.set()
    worker.join(timeout=120)
    assert rel(seen["plain"], base) <= TOL
    assert rel(seen["lora"], with_lora) <= TOL


# ---- the ControlNet pipelines ------------------------------------------------------------------------------------
def test_controlnet_pipelines_lora_parity(folder):
    from tests.test_controlnet import diffusers_controlnet
    from tests.test_diffusers_controlnet import guide

    base = fresh(diffusers.ZImagePipeline, folder)
    for theirs_cls, ours_cls, layout in (
        (diffusers.ZImageControlNetPipeline, zd.ZImageControlNetPipeline, "2.0"),
        (diffusers.ZImageControlNetInpaintPipeline, zd.ZImageControlNetInpaintPipeline, "2.1"),
    ):
        cn = diffusers_controlnet(layout, base.transformer, seed=21, places=[0, 1])
        theirs = theirs_cls(**fresh(diffusers.ZImagePipeline, folder).components, controlnet=cn)
        ours = ours_cls(**fresh(diffusers.ZImagePipeline, folder).components, controlnet=cn)
        outs = []
        for p in (theirs, ours):
            p.set_progress_bar_config(disable=True)
            kw = dict(control_image=guide(64, 64))
            if ours_cls is zd.ZImageControlNetInpaintPipeline:
                from PIL import Image

                kw.update(image=Image.new("RGB", (64, 64), (90, 30, 200)), mask_image=Image.new("L", (64, 64), 255))
            plain = out(p, **kw)
            p.load_lora_weights(lora_sd(p.transformer, 9), adapter_name="c")
            p.set_adapters("c", 1.2)
            lora = out(p, **kw)
            assert rel(lora, plain) > 1e-3
            outs.append(lora)
        assert rel(outs[1], outs[0]) <= TOL


# ---- PEFT adapters added to the transformer itself: the route diffusers' own LoRA tests take -------------------------
def add_peft(pipe, name, seed, lora_alpha=RANK):
    from peft import LoraConfig

    torch.manual_seed(seed)  # PEFT draws the random (init_lora_weights=False) adapter weights from the global RNG
    config = LoraConfig(r=RANK, lora_alpha=lora_alpha, target_modules=list(TARGETS), init_lora_weights=False)
    pipe.transformer.add_adapter(config, adapter_name=name)
    return config


def test_peft_multi_adapter_set_get_disable(impl, folder):
    pipe = fresh(impl.T2I, folder)
    base = out(pipe)
    add_peft(pipe, "adapter-1", 1)
    assert pipe.get_active_adapters() == ["adapter-1"]
    add_peft(pipe, "adapter-2", 2)
    assert pipe.get_active_adapters() == ["adapter-2"]
    assert pipe.get_list_adapters() == {"transformer": ["adapter-1", "adapter-2"]}
    pipe.set_adapters("adapter-1")
    o1 = out(pipe)
    pipe.set_adapters("adapter-2")
    o2 = out(pipe)
    pipe.set_adapters(["adapter-1", "adapter-2"])
    assert pipe.get_active_adapters() == ["adapter-1", "adapter-2"]
    mixed = out(pipe)
    for a, b in ((o1, base), (o2, base), (mixed, base), (o1, o2), (o1, mixed), (o2, mixed)):
        assert rel(a, b) > 1e-3
    with pytest.raises(ValueError, match="not in the list of present adapters"):
        pipe.set_adapters("test")
    pipe.disable_lora()
    assert rel(out(pipe), base) <= TOL
    pipe.enable_lora()
    assert rel(out(pipe), mixed) <= TOL


def test_peft_fuse_unfuse_and_scale(impl, folder):
    pipe = fresh(impl.T2I, folder)
    add_peft(pipe, "adapter-1", 1)
    add_peft(pipe, "adapter-2", 2)
    pipe.set_adapters(["adapter-1", "adapter-2"])
    both = out(pipe)
    pipe.set_adapters(["adapter-1"])
    one = out(pipe)
    scaled = out(pipe, joint_attention_kwargs={"scale": 0.8})
    assert rel(scaled, one) > 1e-4
    pipe.fuse_lora(adapter_names=["adapter-1"])
    assert pipe.num_fused_loras == 1
    assert rel(out(pipe), one) <= 1e-4
    pipe.unfuse_lora()
    assert pipe.num_fused_loras == 0
    pipe.fuse_lora(components=["transformer"], adapter_names=["adapter-2", "adapter-1"])
    assert pipe.num_fused_loras == 2
    assert rel(out(pipe), both) <= 1e-4
    pipe.unfuse_lora()
    assert pipe.num_fused_loras == 0
    again = fresh(impl.T2I, folder)
    add_peft(again, "adapter-1", 1)
    again.fuse_lora(adapter_names=["adapter-1"], lora_scale=0.8)
    assert rel(out(again), scaled) <= 1e-4  # joint_attention_kwargs scale == fuse_lora(lora_scale=)


def test_peft_delete_and_unload(impl, folder):
    pipe = fresh(impl.T2I, folder)
    base = out(pipe)
    add_peft(pipe, "adapter-1", 1)
    add_peft(pipe, "adapter-2", 2)
    pipe.set_adapters("adapter-2")
    o2 = out(pipe)
    pipe.set_adapters(["adapter-1", "adapter-2"])
    pipe.delete_adapters("adapter-1")
    assert pipe.get_list_adapters() == {"transformer": ["adapter-2"]}
    assert rel(out(pipe), o2) <= TOL
    pipe.unload_lora_weights()
    assert pipe.get_list_adapters() == {}
    assert rel(out(pipe), base) <= TOL
    add_peft(pipe, "adapter-1", 1)  # unload -> add works
    out(pipe)


@pytest.mark.parametrize("lora_alpha", [4, 8])
def test_peft_metadata_save_load_inference(impl, folder, tmp_path, lora_alpha):
    """Adapters trained with PEFT on the transformer, saved with diffusers' save_lora_weights and their metadata,
    loaded back with load_lora_weights (into our adapter set on our pipelines): the same output."""
    from peft.utils import get_peft_model_state_dict

    pipe = fresh(impl.T2I, folder)
    add_peft(pipe, "default", 1, lora_alpha=lora_alpha)
    want = out(pipe)
    layers = get_peft_model_state_dict(pipe.transformer)
    metadata = pipe.transformer.peft_config["default"].to_dict()
    impl.T2I.save_lora_weights(tmp_path, transformer_lora_layers=layers, transformer_lora_adapter_metadata=metadata)
    pipe.unload_lora_weights()
    _, parsed = pipe.lora_state_dict(tmp_path, return_lora_metadata=True)
    assert parsed["transformer.lora_alpha"] == lora_alpha
    pipe.load_lora_weights(tmp_path)
    assert rel(out(pipe), want) <= 1e-4


def test_peft_adapters_parity(both):
    theirs, ours = both
    outs = []
    for p in both:
        p.unload_lora_weights()
        add_peft(p, "p1", 11, lora_alpha=8)
        add_peft(p, "p2", 12)
        p.set_adapters(["p1", "p2"], [0.6, 1.1])
        outs.append((out(p), out(p, joint_attention_kwargs={"scale": 0.5})))
        p.unload_lora_weights()
    assert rel(outs[1][0], outs[0][0]) <= TOL and rel(outs[1][1], outs[0][1]) <= TOL


def test_bad_lora_arguments_are_request_errors(folder):
    """Ours only (diffusers takes a NaN or huge weight and returns NaN or garbage): a clear error naming the field."""
    from zimage_core.errors import RequestError

    pipe = fresh(zd.ZImagePipeline, folder)
    pipe.load_lora_weights(lora_sd(pipe.transformer, 1), adapter_name="a")
    for bad in (float("nan"), float("inf"), 100.0, "1", True):
        with pytest.raises(RequestError) as e:
            pipe.set_adapters("a", bad)
        assert e.value.field == "adapter_weights[0]" and "[-16, 16]" in str(e.value)
    with pytest.raises(RequestError) as e:
        out(pipe, joint_attention_kwargs={"scale": float("nan")})
    assert e.value.field == "joint_attention_kwargs.scale"
    pipe.set_adapters("a", 4.0)
    with pytest.raises(RequestError) as e:  # weight 4 x scale 10 = 40: past the bound
        out(pipe, joint_attention_kwargs={"scale": 10.0})
    assert e.value.field.startswith("adapter_weights") and "[-16, 16]" in str(e.value)
    with pytest.raises(ValueError, match="not a linear layer|shape"):  # a LoRA for another architecture
        pipe.load_lora_weights({"transformer.layers.0.attention.to_q.lora_A.weight": torch.zeros(4, 7),
                                "transformer.layers.0.attention.to_q.lora_B.weight": torch.zeros(7, 4)})  # fmt: skip
    assert pipe.get_list_adapters() == {"transformer": ["a"]}  # the refused LoRA was not added
