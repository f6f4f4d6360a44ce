"""Security properties: the loaders' refusals, the outbound-call policy (webhookURL / uploadEndpoint) and the async
task registry. Each test builds the hostile input itself and checks the refusal against the documented rule."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading

import pytest
import torch
from safetensors.torch import save_file

from zimage_core import CheckpointError, ZImageTransformer
from zimage_core.components import RANDOM_TRANSFORMER, build_random_pipeline
from zimage_core.config import PRESETS
from zimage_core.weights import save_transformer

# ---- loaders -------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe_folder(tmp_path_factory):
    return build_random_pipeline(tmp_path_factory.mktemp("sec") / "pipe", seed=0)


@pytest.fixture
def folder(pipe_folder, tmp_path):
    """A fresh copy of a small random pipeline folder, to be damaged by the test."""
    return shutil.copytree(pipe_folder, tmp_path / "pipe")


def _load_pipeline(path):
    from zimage_core.pipeline import ZImage

    return ZImage.from_pretrained(path, device="cpu", dtype=torch.float32)


def _within(seconds, fn, *args):
    """Run fn in a daemon thread; fail if it has not finished in time (a FIFO would block open() forever)."""
    box = {}

    def run():
        try:
            box["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still running after {seconds} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


@pytest.mark.parametrize("sub,weights", [("vae", "diffusion_pytorch_model"), ("text_encoder", "model")])
def test_pickle_weights_in_text_encoder_or_vae_refused(folder, sub, weights):
    """transformers/diffusers would unpickle a .bin (arbitrary code): the loader refuses it before they see it."""
    from safetensors.torch import load_file

    st = folder / sub / f"{weights}.safetensors"
    torch.save(load_file(st), folder / sub / f"{weights}.bin")
    st.unlink()
    with pytest.raises(CheckpointError, match="pickle"):
        _load_pipeline(folder)


@pytest.mark.parametrize(
    "relpath", ["transformer/config.json", "model_index.json", "scheduler/scheduler_config.json", "zimage_fast.json"]
)
@pytest.mark.parametrize("data", [b"{not json", b"[1, 2]", b'{"a": "\xff"}', b"[" * 100_000])
def test_malformed_json_is_a_checkpoint_error(folder, relpath, data):
    (folder / relpath).write_bytes(data)
    with pytest.raises(CheckpointError) as e:
        _load_pipeline(folder)
    assert relpath.split("/")[-1] in str(e.value)


@pytest.mark.parametrize(
    "relpath,patch",
    [
        ("transformer/config.json", {"n_layers": "30"}),
        ("transformer/config.json", {"axes_dims": 5}),
        ("transformer/config.json", {"dim": None}),
        ("scheduler/scheduler_config.json", {"shift": "three"}),
        ("scheduler/scheduler_config.json", {"base_image_seq_len": 1e400}),
        ("zimage_fast.json", {"defaults": {"steps": 2, "nonsense": 1}}),
    ],
)
def test_wrongly_typed_config_values_are_checkpoint_errors(folder, relpath, patch):
    path = folder / relpath
    d = json.loads(path.read_text()) if path.exists() else {}
    d.update(patch)
    path.write_text(json.dumps(d).replace("Infinity", "1e400"))
    with pytest.raises(CheckpointError, match=relpath.split("/")[-1].replace(".", r"\.")):
        _load_pipeline(folder)


def _sharded(tmp_path):
    model = ZImageTransformer(PRESETS["tiny"])
    return save_transformer(model, tmp_path / "t", max_shard_bytes=30_000)


@pytest.mark.parametrize("kind", ["dotdot", "absolute"])
def test_index_shard_outside_the_folder_refused(tmp_path, kind):
    folder = _sharded(tmp_path)
    index_path = folder / "diffusion_pytorch_model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    outside = tmp_path / "outside.safetensors"
    shutil.move(folder / first, outside)  # the shard exists, but outside the checkpoint folder
    target = "../outside.safetensors" if kind == "dotdot" else str(outside)
    index["weight_map"] = {k: (target if v == first else v) for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="outside"):
        ZImageTransformer.from_pretrained(folder)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this OS")
@pytest.mark.parametrize("name", ["diffusion_pytorch_model.safetensors", "config.json"])
def test_fifo_as_weights_or_config_refused_without_blocking(tmp_path, name):
    folder = tmp_path / "t"
    save_transformer(ZImageTransformer(PRESETS["tiny"]), folder)
    (folder / name).unlink()
    os.mkfifo(folder / name)
    # in a child process: a blocked open() of a FIFO can hold the interpreter lock
    code = (
        "import sys\nfrom zimage_core import CheckpointError, ZImageTransformer\n"
        "try:\n    ZImageTransformer.from_pretrained(sys.argv[1])\n"
        "except CheckpointError as e:\n    print('REFUSED', e)\n"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-c", code, str(folder)], capture_output=True, text=True, timeout=120, env=env
    )
    assert "REFUSED" in proc.stdout and "not a regular file" in proc.stdout, proc.stderr[-2000:]


def test_huge_layer_count_refused_before_building(tmp_path):
    """A config promising far more parameters than the files hold is refused from the header alone."""
    folder = tmp_path / "t"
    save_transformer(ZImageTransformer(PRESETS["tiny"]), folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "n_layers": 3000}))
    with pytest.raises(CheckpointError, match="parameters"):
        _within(60, ZImageTransformer.from_pretrained, folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "n_layers": 1e7}))  # a float is not a layer count
    with pytest.raises(CheckpointError, match="n_layers"):
        _within(60, ZImageTransformer.from_pretrained, folder)
    (folder / "config.json").write_text(json.dumps({**cfg, "n_layers": 10**7}))
    with pytest.raises(CheckpointError, match="parameters"):
        _within(60, ZImageTransformer.from_pretrained, folder)


def test_single_file_with_bad_metadata_config(tmp_path):
    model = ZImageTransformer(PRESETS["tiny"])
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(sd, tmp_path / "z.safetensors", metadata={"zimage_config": "{broken"})
    with pytest.raises(CheckpointError, match="metadata"):
        ZImageTransformer.from_pretrained(tmp_path / "z.safetensors")


def test_expected_parameter_count_matches_a_built_model():
    from zimage_core.model import count_parameters
    from zimage_core.weights import expected_parameters

    for cfg in (PRESETS["tiny"], RANDOM_TRANSFORMER, PRESETS["tiny"].replace(n_layers=5, n_refiner_layers=0)):
        assert expected_parameters(cfg) == count_parameters(ZImageTransformer(cfg))
    # the released model's figure, as published in the config's comment
    assert expected_parameters(PRESETS["z-image"]) == 6_154_908_736
