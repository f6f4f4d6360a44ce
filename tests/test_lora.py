"""LoRA adapters: run-time application equals merged weights; formats; high/low phases; per-thread isolation."""

import threading

import pytest
import torch
from safetensors.torch import save_file

from tests.helpers import image_request
from zimage_core import lora as lora_mod
from zimage_core.errors import RequestError
from zimage_core.lora import LoraStore, load_lora
from zimage_core.service import ServerConfig

TARGETS = [
    "layers.0.attention.to_q",
    "layers.1.feed_forward.w1",
    "noise_refiner.0.feed_forward.w2",
    "context_refiner.0.attention.to_k",
]
RANK, ALPHA = 4, 2.0


def make_adapters(model, targets=TARGETS, seed=0):
    g = torch.Generator().manual_seed(seed)
    mods = dict(model.named_modules())
    out = {}
    for name in targets:
        m = mods[name]
        out[name] = (
            torch.randn(RANK, m.in_features, generator=g) * 0.3,
            torch.randn(m.out_features, RANK, generator=g) * 0.3,
        )
    return out


def write_peft(path, adapters):
    sd = {}
    for name, (down, up) in adapters.items():
        sd[f"transformer.{name}.lora_A.weight"] = down
        sd[f"transformer.{name}.lora_B.weight"] = up
        sd[f"transformer.{name}.alpha"] = torch.tensor(ALPHA)
    save_file(sd, path)
    return path


def write_comfy(path, adapters, model):
    """ComfyUI/kohya names; attention to_q/to_k/to_v adapters as one fused qkv adapter (zero rows elsewhere)."""
    sd = {}
    for name, (down, up) in adapters.items():
        if ".attention.to_" in name and name.split(".")[-1] in ("to_q", "to_k", "to_v"):
            stem = name.rsplit(".", 1)[0]
            blocks = [torch.zeros_like(up)] * 3
            blocks = list(blocks)
            blocks[("to_q", "to_k", "to_v").index(name.split(".")[-1])] = up
            key = f"diffusion_model.{stem}.qkv"
            sd[key + ".lora_down.weight"], sd[key + ".lora_up.weight"] = down, torch.cat(blocks)
        else:
            key = "lora_unet_" + name.replace(".", "_")  # kohya's flattened names
            sd[key + ".lora_down.weight"], sd[key + ".lora_up.weight"] = down, up
        sd[key + ".alpha"] = torch.tensor(ALPHA)
    save_file(sd, path)
    return path


def gen(pipe, **kw):
    base = dict(seed=4, steps=3, cfg_scale=2.5, width=128, height=128, output_type="latent")
    base.update(kw)
    return pipe.generate("a blue square", **base).latents


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_runtime_lora_equals_merged_weights(tiny_pipe, tmp_path):
    adapters = make_adapters(tiny_pipe.transformer)
    lw = load_lora(write_peft(tmp_path / "a.safetensors", adapters))
    assert set(lw.modules) == set(TARGETS)
    with_lora = gen(tiny_pipe, loras=[(lw, 0.7, "both")])
    plain = gen(tiny_pipe)
    mods = dict(tiny_pipe.transformer.named_modules())
    saved = {n: mods[n].weight.detach().clone() for n in TARGETS}
    try:
        with torch.no_grad():
            for n, (down, up) in adapters.items():
                mods[n].weight += 0.7 * (ALPHA / RANK) * up @ down
        merged = gen(tiny_pipe)
    finally:
        with torch.no_grad():
            for n, w in saved.items():
                mods[n].weight.copy_(w)
    assert torch.equal(gen(tiny_pipe), plain)  # weights restored, adapters gone after the call
    assert rel(with_lora, plain) > 1e-3  # the LoRA does something
    assert rel(with_lora, merged) < 1e-5


def test_comfy_kohya_format_equals_peft(tiny_pipe, tmp_path):
    adapters = make_adapters(tiny_pipe.transformer)
    a = load_lora(write_peft(tmp_path / "p.safetensors", adapters))
    b = load_lora(write_comfy(tmp_path / "c.safetensors", adapters, tiny_pipe.transformer))
    assert rel(gen(tiny_pipe, loras=[(b, 1.0, "both")]), gen(tiny_pipe, loras=[(a, 1.0, "both")])) < 1e-6


@pytest.mark.parametrize("phase", ["high", "low"])
def test_phases_follow_sigma(tiny_pipe, tmp_path, phase):
    adapters = make_adapters(tiny_pipe.transformer, targets=["layers.0.attention.to_q"])
    lw = load_lora(write_peft(tmp_path / "h.safetensors", adapters))
    module = dict(tiny_pipe.transformer.named_modules())["layers.0.attention.to_q"]
    seen = []

    def hook(mod, args, out):
        base = torch.nn.functional.linear(args[0], mod.weight)
        seen.append((lora_mod._local.sigma, bool((out - base).abs().max() > 0)))

    h = module.register_forward_hook(hook)
    try:
        gen(tiny_pipe, steps=6, cfg_scale=1.0, loras=[(lw, 1.0, phase)])
    finally:
        h.remove()
    assert len(seen) == 6 and {a for _, a in seen} == {True, False}
    for sigma, active in seen:
        assert active == (sigma >= 0.5 if phase == "high" else sigma < 0.5)


def test_phased_caption_lora_uses_two_contexts(tiny_pipe, tmp_path):
    adapters = make_adapters(tiny_pipe.transformer, targets=["context_refiner.0.attention.to_k"])
    lw = load_lora(write_peft(tmp_path / "c.safetensors", adapters))
    # 6 steps at shift 3: sigmas 1, .94, .86, .75, .6 (high phase) then .375 (low phase)
    plain, both = gen(tiny_pipe, steps=6), gen(tiny_pipe, steps=6, loras=[(lw, 1.0, "both")])
    high = gen(tiny_pipe, steps=6, loras=[(lw, 1.0, "high")])
    assert not torch.equal(high, plain) and not torch.equal(high, both)


def test_concurrent_requests_do_not_see_each_others_lora(tiny_pipe, tmp_path):
    lw = load_lora(write_peft(tmp_path / "t.safetensors", make_adapters(tiny_pipe.transformer)))
    solo_lora, solo_plain = gen(tiny_pipe, loras=[(lw, 1.0, "both")], steps=8), gen(tiny_pipe, steps=8)
    results = {}

    def run(key, **kw):
        results[key] = gen(tiny_pipe, steps=8, **kw)

    threads = [
        threading.Thread(target=run, args=("lora",), kwargs={"loras": [(lw, 1.0, "both")]}),
        threading.Thread(target=run, args=("plain",)),
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert torch.equal(results["lora"], solo_lora) and torch.equal(results["plain"], solo_plain)


def test_request_api_with_lora_store(tiny_pipe, tmp_path):
    write_peft(tmp_path / "civitai_123_4.safetensors", make_adapters(tiny_pipe.transformer))
    cfg = ServerConfig(lora_resolver=LoraStore(tmp_path))
    req = image_request(
        positivePrompt="a blue square", seed=1, lora=[{"model": "civitai:123@4", "weight": 0.8, "transformer": "low"}]
    )
    assert tiny_pipe.infer(req, cfg)[0]["seed"] == 1
    with pytest.raises(RequestError) as e:
        tiny_pipe.infer({**req, "lora": [{"model": "civitai:999@1"}]}, cfg)
    assert e.value.field == "lora[0].model" and "unknown LoRA" in str(e.value)


def test_lora_for_another_architecture_is_refused(tiny_pipe, tmp_path):
    save_file(
        {
            "transformer.layers.0.attention.to_q.lora_A.weight": torch.zeros(4, 999),
            "transformer.layers.0.attention.to_q.lora_B.weight": torch.zeros(64, 4),
        },
        tmp_path / "x.safetensors",
    )
    with pytest.raises(RequestError, match="shape"):
        gen(tiny_pipe, loras=[(load_lora(tmp_path / "x.safetensors"), 1.0, "both")])
    save_file(
        {
            "transformer.single_blocks.0.linear1.lora_A.weight": torch.zeros(4, 8),
            "transformer.single_blocks.0.linear1.lora_B.weight": torch.zeros(8, 4),
        },
        tmp_path / "f.safetensors",
    )
    with pytest.raises(RequestError, match="another architecture"):
        gen(tiny_pipe, loras=[(load_lora(tmp_path / "f.safetensors"), 1.0, "both")])
