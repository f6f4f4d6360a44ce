"""Checkpoint loading: diffusers folders (sharded), single files in diffusers and ComfyUI layout, bad checkpoints."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.helpers import SMALL_CONFIGS, diffusers_transformer, inputs, rel_l2
from zimage_core import CheckpointError, ZImageTransformer
from zimage_core.weights import comfy_to_diffusers, diffusers_to_comfy, save_single_file, save_transformer


@pytest.fixture(scope="module")
def ref():
    return diffusers_transformer("hd96")


@pytest.fixture(scope="module")
def ours(ref):
    return ZImageTransformer.from_diffusers(ref)


def assert_same_weights(a: ZImageTransformer, b: ZImageTransformer):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def assert_parity(model, ref):
    x, t, caps = inputs(SMALL_CONFIGS["hd96"], "ragged")
    with torch.no_grad():
        assert rel_l2(model(x, t, caps), ref(x, t, caps, return_dict=False)[0]) <= 1e-5


def test_diffusers_sharded_folder(tmp_path, ref, ours):
    ref.save_pretrained(tmp_path / "transformer", max_shard_size="40KB")
    shards = list((tmp_path / "transformer").glob("*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()
    loaded = ZImageTransformer.from_pretrained(tmp_path / "transformer")
    assert_same_weights(loaded, ours)
    assert_parity(loaded, ref)


def test_pipeline_folder_resolves_transformer_subfolder(tmp_path, ref, ours):
    ref.save_pretrained(tmp_path / "transformer")
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "ZImagePipeline"}))
    assert_same_weights(ZImageTransformer.from_pretrained(tmp_path), ours)


def test_single_file_diffusers_layout(tmp_path, ref, ours):
    path = tmp_path / "z.safetensors"
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, path)  # plain file, no config inside
    loaded = ZImageTransformer.from_pretrained(path, config=dict(ref.config))
    assert_same_weights(loaded, ours)
    assert_parity(loaded, ref)
    # our own writer puts the config in the metadata, so no config= is needed
    assert_same_weights(ZImageTransformer.from_pretrained(save_single_file(ours, tmp_path / "ours.safetensors")), ours)


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_single_file_comfyui_layout(tmp_path, ref, ours, prefix):
    path = save_single_file(ours, tmp_path / "comfy.safetensors", layout="comfyui", prefix=prefix)
    keys = load_file(path).keys()
    assert any(k.endswith("attention.qkv.weight") for k in keys) and any("final_layer." in k for k in keys)
    assert not any("to_q" in k or "all_x_embedder" in k for k in keys)
    loaded = ZImageTransformer.from_pretrained(path)
    assert_same_weights(loaded, ours)
    assert_parity(loaded, ref)


def test_comfy_conversion_agrees_with_diffusers_converter(ours):
    """Our ComfyUI->diffusers mapping gives the same dict as diffusers' own single-file converter."""
    from diffusers.loaders.single_file_utils import convert_z_image_transformer_checkpoint_to_diffusers

    comfy = diffusers_to_comfy(ours.state_dict(), prefix="model.diffusion_model.")
    theirs = convert_z_image_transformer_checkpoint_to_diffusers(dict(comfy))
    mine = comfy_to_diffusers(comfy)
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_our_sharded_writer_round_trips(tmp_path, ours):
    save_transformer(ours, tmp_path / "t", max_shard_bytes=30_000)
    assert len(list((tmp_path / "t").glob("*.safetensors"))) > 1
    assert_same_weights(ZImageTransformer.from_pretrained(tmp_path / "t"), ours)


def test_dtype_conversion_on_load(tmp_path, ours):
    save_transformer(ours, tmp_path / "t")
    loaded = ZImageTransformer.from_pretrained(tmp_path / "t", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())


# ---- bad checkpoints ---------------------------------------------------------------------------------------------


def test_wrong_shapes_named(tmp_path, ours):
    sd = {k: v.clone() for k, v in ours.state_dict().items()}
    sd["layers.0.attention.to_q.weight"] = torch.zeros(7, 96)
    save_file(sd, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match=r"mis-shaped keys.*layers\.0\.attention\.to_q\.weight.*\(7, 96\)"):
        ZImageTransformer.from_pretrained(tmp_path / "bad.safetensors", config=ours.config)


def test_missing_and_unexpected_keys_named(tmp_path, ours):
    sd = {k: v.clone() for k, v in ours.state_dict().items() if k != "cap_pad_token"}
    sd["layers.0.bogus.weight"] = torch.zeros(3)
    save_file(sd, tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError) as e:
        ZImageTransformer.from_pretrained(tmp_path / "bad.safetensors", config=ours.config)
    assert "missing keys (1): cap_pad_token" in str(e.value)
    assert "unexpected keys (1): layers.0.bogus.weight" in str(e.value)
    assert "bad.safetensors" in str(e.value)


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".ckpt"])
def test_pickle_file_refused(tmp_path, ours, suffix):
    path = tmp_path / f"model{suffix}"
    torch.save(ours.state_dict(), path)
    with pytest.raises(CheckpointError, match="pickle"):
        ZImageTransformer.from_pretrained(path)


def test_pickle_only_folder_refused(tmp_path, ours):
    torch.save(ours.state_dict(), tmp_path / "diffusion_pytorch_model.bin")
    (tmp_path / "config.json").write_text(json.dumps(ours.config.to_dict()))
    with pytest.raises(CheckpointError, match="pickle"):
        ZImageTransformer.from_pretrained(tmp_path)


def test_folder_without_weights(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no weights found"):
        ZImageTransformer.from_pretrained(tmp_path)


def test_missing_path_and_corrupt_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        ZImageTransformer.from_pretrained(tmp_path / "nope.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(CheckpointError, match="not a readable safetensors"):
        ZImageTransformer.from_pretrained(tmp_path / "junk.safetensors")


def test_index_pointing_to_missing_shard(tmp_path, ref):
    ref.save_pretrained(tmp_path / "t", max_shard_size="40KB")
    next((tmp_path / "t").glob("*-00001-*.safetensors")).unlink()
    with pytest.raises(CheckpointError, match="do not exist"):
        ZImageTransformer.from_pretrained(tmp_path / "t")


def test_unknown_config_needs_explicit_config(tmp_path, ours):
    save_file({k: v.contiguous() for k, v in ours.state_dict().items()}, tmp_path / "z.safetensors")
    with pytest.raises(CheckpointError, match="pass config="):
        ZImageTransformer.from_pretrained(tmp_path / "z.safetensors")
