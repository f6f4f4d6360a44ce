"""The embedded default model: procedural dataset, pixel checker, shipped weights, parity with diffusers,
held-out accuracy at the default settings, and a smoke run of the training script."""

import json
import random
import time

import numpy as np
import pytest
import torch

from zimage_core.default_model import ASSET_DIR, default_model_path
from zimage_core.pipeline import ZImage
from zimage_core.train import dataset
from zimage_core.train.checker import ATTRIBUTES, read_image
from zimage_core.train.evaluate import evaluate
from zimage_core.train.train import MODEL_ID

ALL = (*ATTRIBUTES, "size")
MAX_ASSET_BYTES = 20 * 1024 * 1024
MIN_HELDOUT_ACCURACY = 0.8


# ---------------------------------------------------------------------------------------------------------------
# Dataset and checker
# ---------------------------------------------------------------------------------------------------------------


def test_caption_grammar_round_trips():
    scenes = dataset.all_scenes()
    assert len(scenes) == len({s.caption for s in scenes}) == 2 * 6 * 3 * 9 * 5
    for s in scenes:
        assert dataset.Scene.from_caption(s.caption) == s
    with pytest.raises(ValueError):
        dataset.Scene.from_caption("a red circle")
    with pytest.raises(ValueError):
        dataset.Scene("small", "red", "circle", "middle center", "red")  # same colour twice


def test_heldout_split_is_disjoint_and_every_word_is_trained():
    train, held = dataset.split(0)
    assert len(held) == 9 * 2 * 9  # nine (colour, shape, background) triples, in every size and position
    assert not {s.caption for s in train} & {s.caption for s in held}
    assert sorted(train + held) == sorted(dataset.all_scenes())
    held_triples = {s.triple for s in held}
    assert not held_triples & {s.triple for s in train}
    for attr in ("size", "color", "shape", "position", "background"):  # each value on its own is in training
        assert {getattr(s, attr) for s in train} == {getattr(s, attr) for s in dataset.all_scenes()}
    prompts = dataset.eval_prompts(0, 48)
    assert len({s for s, _ in prompts}) == 48 and all(s.triple in held_triples for s, _ in prompts)
    assert prompts == dataset.eval_prompts(0, 48)  # fixed


def test_checker_agrees_with_the_renderer():
    rng = random.Random(0)
    scenes = dataset.all_scenes()
    for s in scenes:  # every caption at its nominal layout
        r = read_image(dataset.render(s))
        assert r.agrees(s, ALL), (s.caption, r.mismatches(s))
    for s in rng.sample(scenes, 300):  # jittered, as in training
        r = read_image(dataset.render(s, rng=rng))
        assert r.agrees(s, ALL), (s.caption, r.mismatches(s))
    for s in rng.sample(scenes, 30):  # other image sizes: positions are thirds, sizes scale with the image
        r = read_image(dataset.render(s, 256, 192, rng=rng))
        assert r.agrees(s, ALL), (s.caption, r.mismatches(s))


def test_checker_is_not_fooled():
    blank = np.full((128, 128, 3), dataset.COLORS["blue"], dtype=np.uint8)
    r = read_image(blank)
    assert r.background == "blue" and r.color is None and r.shape is None
    assert not r.agrees(dataset.Scene("small", "red", "circle", "middle center", "blue"))
    s = dataset.Scene("large", "red", "square", "top left", "blue")
    img = dataset.render(s)
    assert not read_image(img).agrees(dataset.Scene("large", "red", "circle", "top left", "blue"))
    assert not read_image(img[::-1].copy()).agrees(s)  # flipped: bottom left
    noisy = np.clip(img + np.random.default_rng(0).normal(0, 12, img.shape), 0, 255)  # mild noise keeps it readable
    assert read_image(noisy).agrees(s, ALL)


# ---------------------------------------------------------------------------------------------------------------
# The shipped model
# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pipe():
    return ZImage.default(device="cpu", dtype=torch.float32)


def test_shipped_model_is_the_default_and_small():
    assert (ASSET_DIR / "model_index.json").exists()
    assert default_model_path() == ASSET_DIR
    files = [p for p in ASSET_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= MAX_ASSET_BYTES
    weights = [p for p in files if p.suffix in (".safetensors", ".bin", ".pt", ".pth", ".ckpt")]
    assert {p.parent.name for p in weights} == {"transformer", "text_encoder", "vae"}
    assert all(p.suffix == ".safetensors" for p in weights)


def test_shipped_defaults_apply_to_every_model_id(pipe):
    meta = json.loads((ASSET_DIR / "zimage_fast.json").read_text())
    assert pipe.meta["model_id"] == meta["model_id"] == MODEL_ID
    d = meta["defaults"]
    assert (d["width"], d["height"]) == (128, 128)
    for model_id in (MODEL_ID, "runware:z-image@0", "z-image-turbo"):
        assert pipe.defaults(model_id).__dict__ == pipe.defaults().__dict__
        assert pipe.defaults(model_id).steps == d["steps"] and pipe.defaults(model_id).cfg_scale == d["cfg_scale"]
    res = pipe.generate("a large red circle in the center on a blue background", seed=0)
    assert res.images[0].size == (128, 128)
    assert res.stats["steps"] == d["steps"]


def test_tokenizer_makes_each_word_one_token(pipe):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(ASSET_DIR / "tokenizer")
    for s in random.Random(0).sample(dataset.all_scenes(), 50):
        text = tok.apply_chat_template(
            [{"role": "user", "content": s.caption}], tokenize=False, add_generation_prompt=True, enable_thinking=True
        )
        assert len(tok(text).input_ids) == 8 + len(s.caption.split())  # 8 chat-template tokens
    assert tok("Zebra!").input_ids  # anything else still tokenizes, byte by byte


@pytest.fixture(scope="module")
def diffusers_pipe():
    from diffusers import ZImagePipeline

    p = ZImagePipeline.from_pretrained(ASSET_DIR, torch_dtype=torch.float32)
    p.set_progress_bar_config(disable=True)
    return p


def _rel_err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("split", ["heldout", "train"])
def test_parity_with_diffusers_at_default_settings(pipe, diffusers_pipe, split):
    train, held = dataset.split(0)
    scene = (held if split == "heldout" else train)[7]
    d = pipe.defaults()
    ours = pipe.generate(scene.caption, seed=21, output_type="latent").latents
    theirs = diffusers_pipe(
        prompt=scene.caption,
        width=d.width,
        height=d.height,
        num_inference_steps=d.steps,
        guidance_scale=d.cfg_scale - 1.0,  # diffusers' formulation: g = CFGScale − 1
        cfg_normalization=d.cfg_normalization,
        cfg_truncation=d.cfg_truncation,
        generator=torch.Generator("cpu").manual_seed(21),
        output_type="latent",
    ).images
    assert diffusers_pipe.scheduler.config.shift == d.shift  # the folder's scheduler agrees with our default
    assert ours.shape == theirs.shape == (1, 16, 16, 16)
    assert _rel_err(ours, theirs) <= 1e-5


def test_heldout_accuracy_at_default_settings(pipe):
    t0 = time.perf_counter()
    res = evaluate(pipe, dataset.eval_prompts(0, 48, heldout=True))
    seconds = time.perf_counter() - t0
    assert res["accuracy"] >= MIN_HELDOUT_ACCURACY, res
    assert seconds < 120, seconds


def test_foreground_weights_cover_the_object_and_only_near_it():
    from zimage_core.train.train import foreground_weights

    s = dataset.Scene("small", "red", "circle", "top left", "blue")
    w = foreground_weights([s], dataset.render(s)[None], weight=5.0)[0, 0]  # [16, 16] latent pixels
    cx, cy, extent = dataset.layout(s)
    assert w.shape == (16, 16) and set(w.unique().tolist()) == {1.0, 6.0}
    assert w[int(cy) // 8, int(cx) // 8] == 6.0  # the object's centre
    assert (w[12:, 12:] == 1.0).all()  # the far corner is background
    assert w.eq(6.0).sum() <= ((extent / 8 + 3) ** 2)  # the object's patches and one ring around them


# ---------------------------------------------------------------------------------------------------------------
# The training script
# ---------------------------------------------------------------------------------------------------------------


def test_training_script_smoke(tmp_path):
    from zimage_core.train.train import main

    out = tmp_path / "model"
    assert main(["--smoke", "--seed", "1", "--out", str(out), "--threads", "1"]) == 0
    meta = json.loads((out / "zimage_fast.json").read_text())
    assert meta["model_id"] == MODEL_ID and meta["training"]["config"]["seed"] == 1
    losses = meta["training"]["losses"]
    assert all(np.isfinite(losses)) and np.mean(losses[-3:]) < np.mean(losses[:3])
    small = ZImage.from_pretrained(out, device="cpu", dtype=torch.float32)
    res = small.generate("a small red circle in the top left on a blue background", seed=0, steps=2)
    assert res.images[0].size == (128, 128)


def test_training_script_refuses_bad_overrides(tmp_path, capsys):
    from zimage_core.train.train import main

    for bad, field in (("no_such_field=1", "no_such_field"), ("steps=many", "steps")):
        with pytest.raises(SystemExit) as e:
            main(["--out", str(tmp_path / "m"), "--set", bad])
        assert e.value.code == 2 and field in capsys.readouterr().err
