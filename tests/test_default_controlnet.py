"""The embedded control model (zimage_core/assets/default-controlnet) on the embedded default model: it answers to
``zimage:default-controlnet``, puts the shape where the guide says even when the caption names another position,
and at weight 0 changes nothing; plus the CLI flags and a smoke run of its training script."""

import base64
import io
import json

import numpy as np
import pytest
import torch

from tests.helpers import image_request
from zimage_core import controlnet as C
from zimage_core.pipeline import ZImage
from zimage_core.train import dataset
from zimage_core.train.checker import read_image
from zimage_core.train.controlnet import eval_pairs, evaluate, guide_image, render_pair

MIN_AT_GUIDE = 0.8
MAX_ASSET_BYTES = 8 * 1024 * 1024

pytestmark = pytest.mark.skipif(not C.builtin_path().exists(), reason="the embedded control model is not shipped")


@pytest.fixture(scope="module")
def pipe():
    return ZImage.default(device="cpu", dtype=torch.float32)


def b64(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def test_shipped_control_model_is_small_and_resolves_by_id(pipe):
    size = sum(f.stat().st_size for f in C.builtin_path().iterdir())
    assert size <= MAX_ASSET_BYTES
    model = C.store_for(pipe)(C.BUILTIN_ID, "controlNet[0].model")
    assert isinstance(model, C.ZImageControlNet)
    assert model.config.layout == "1.0"
    meta = json.loads((C.builtin_path() / "zimage_fast.json").read_text())
    assert meta["model_id"] == C.BUILTIN_ID and meta["for_model"] == pipe.meta["model_id"]


def test_guide_is_the_images_silhouette():
    s = dataset.Scene("large", "red", "triangle", "bottom right", "blue")
    import random

    image, guide = render_pair(s, random.Random(3))
    # the fraction of each pixel the shape covers (anti-aliased edges included) is the same in both
    bg, fg = np.array(dataset.COLORS["blue"], float), np.array(dataset.COLORS["red"], float)
    cover_image = np.abs(image - bg).max(-1) / np.abs(fg - bg).max()
    white, black = dataset.COLORS["white"][0], dataset.COLORS["black"][0]
    cover_guide = (guide.max(-1) - black) / (white - black)
    assert cover_image.sum() > 500 and np.abs(cover_image - cover_guide).max() < 0.01
    r = read_image(guide)
    assert (r.background, r.color, r.shape, r.position) == ("black", "white", "triangle", "bottom right")


def test_eval_pairs_disagree_on_position():
    pairs = eval_pairs(24)
    assert len(pairs) == 24 and len({p[2] for p in pairs}) == 24
    assert all(c.position != g.position and c.shape == g.shape and c.size == g.size for c, g, _ in pairs)


def test_shape_lands_where_the_guide_says(pipe):
    model = C.store_for(pipe)(C.BUILTIN_ID, "controlNet[0].model")
    res = evaluate(pipe, model, eval_pairs(24), weight=1.0, mode="controlnet")
    assert res["at_guide"] >= MIN_AT_GUIDE, res
    base = evaluate(pipe, model, eval_pairs(24), weight=0.0)
    assert base["at_guide"] < 0.5, base  # without the control the caption's position wins


def test_weight_zero_request_equals_no_controlnet(pipe):
    s, g, seed = eval_pairs(1)[0]
    common = dict(positivePrompt=s.caption, seed=seed, outputFormat="PNG")
    off = pipe.infer(image_request(**common))[0]["imageBase64Data"]
    entry = {"model": C.BUILTIN_ID, "guideImage": b64(guide_image(g)), "weight": 0, "controlMode": "controlnet"}
    zero = pipe.infer(image_request(**common, controlNet=[entry]))[0]["imageBase64Data"]
    assert zero == off
    entry["weight"] = 1.0
    on = pipe.infer(image_request(**common, controlNet=[entry]))[0]["imageBase64Data"]
    assert on != off


def test_cli_control_flags(pipe, tmp_path, monkeypatch):
    from PIL import Image

    from zimage_core import cli

    s, g, seed = eval_pairs(2)[1]
    guide_path = tmp_path / "guide.png"
    guide_image(g).save(guide_path)
    monkeypatch.setattr(cli, "_load", lambda args: pipe)
    out = tmp_path / "out.png"
    argv = ["generate", s.caption, "-o", str(out), "--seed", str(seed), "--quiet", "--control-image", str(guide_path)]
    assert cli.main([*argv, "--control-weight", "1.0", "--control-mode", "controlnet"]) == 0
    assert read_image(Image.open(out)).position == g.position
    assert cli.main([*argv, "--control-model", "nope"]) == 2
    assert (
        cli.main(
            [*argv, "--control-model", str(C.builtin_path()), "--control-weight", "0.5", "--control-weight", "0.7"]
        )
        == 2
    )


def test_training_script_smoke(tmp_path):
    from zimage_core.train.controlnet import main

    out = tmp_path / "cn"
    assert main(["--out", str(out), "--set", "steps=3", "batch=2", "scenes_limit=4", "warmup=1"]) == 0
    meta = json.loads((out / "zimage_fast.json").read_text())
    assert meta["training"]["config"]["steps"] == 3 and np.isfinite(meta["training"]["losses"]).all()
    pipe = ZImage.default(device="cpu", dtype=torch.float32)
    model = C.load_controlnet(out, pipe.transformer)
    s, g, seed = eval_pairs(1)[0]
    res = pipe.generate(s.caption, seed=seed, steps=2, controlnets=[C.ControlNetInput(model, guide_image(g))])
    assert res.images[0].size == (128, 128)
