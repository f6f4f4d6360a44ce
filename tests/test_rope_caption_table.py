"""A checkpoint whose RoPE caption axis is shorter than the default ``max_sequence_length`` (issue 24, item 4).

The bound that matters is the caption that actually runs: tokenized, truncated at ``max_sequence_length`` and padded
to a multiple of 32 (positions 1..Lp on axis 0, the image frame at Lp + 1 < ``axes_lens[0]``). diffusers runs a short
prompt on such a model at its defaults; so must ``ZImage.generate`` and the drop-in, with the same numbers. A default
never refuses (it is clamped to what the table holds); an explicit value is refused only when a caption cannot fit,
with an error naming ``max_sequence_length``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from zimage_core.components import RANDOM_TRANSFORMER, build_random_pipeline
from zimage_core.errors import RequestError
from zimage_core.pipeline import ZImage

# axes_lens[0] = 66: captions of at most 64 tokens (padded) fit; the default max_sequence_length is 512.
SMALL_TABLE = dataclasses.replace(RANDOM_TRANSFORMER, axes_lens=(66, 160, 160))
TABLE = 64
SHORT = "a red circle"  # 31 tokens with the chat template (byte-level tokenizer): padded to 32, fits
LONG = "a large red circle in the top left on a blue background, drawn with care"  # > 64 tokens: does not fit
KW = dict(width=64, height=64)
STEPS, CFG = 3, 3.0


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return build_random_pipeline(tmp_path_factory.mktemp("ropetable") / "pipe", seed=5, config=SMALL_TABLE)


@pytest.fixture(scope="module")
def ours(folder):
    return ZImage.from_pretrained(folder, device="cpu", dtype=torch.float32)


@pytest.fixture(scope="module")
def theirs(folder):
    from diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def dropin(folder):
    from zimage_core.diffusers import ZImagePipeline

    pipe = ZImagePipeline.from_pretrained(folder, torch_dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def rel_err(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def diffusers_latents(pipe, prompt, **kw):
    return pipe(
        prompt=prompt,
        num_inference_steps=STEPS,
        guidance_scale=CFG - 1.0,
        generator=torch.Generator().manual_seed(7),
        output_type="latent",
        **KW,
        **kw,
    ).images


def ours_latents(ours, prompt, **kw):
    # the shift comes from the folder's scheduler config, as in diffusers; diffusers' CFG defaults (no normalization)
    res = ours.generate(
        prompt, steps=STEPS, cfg_scale=CFG, seed=7, cfg_normalization=0.0, output_type="latent", **KW, **kw
    )
    return res.latents


def test_fixture_prompts_straddle_the_table(ours):
    """The premise: SHORT fits the 64-token table, LONG does not (as tokenized with the chat template)."""
    from zimage_core.pipeline import caption_capacity, chat_texts

    assert caption_capacity(ours.transformer) == TABLE
    lens = [len(ours.tokenizer(t).input_ids) for t in chat_texts(ours.tokenizer, [SHORT, LONG])]
    assert lens[0] <= TABLE < lens[1]


def test_defaults_run_and_match_diffusers(ours, theirs, dropin):
    want = diffusers_latents(theirs, SHORT)  # diffusers at its default max_sequence_length=512
    assert rel_err(ours_latents(ours, SHORT), want) <= 1e-5
    assert rel_err(diffusers_latents(dropin, SHORT), want) <= 1e-5


def test_explicit_value_with_a_caption_that_fits_runs(ours, theirs):
    want = diffusers_latents(theirs, SHORT, max_sequence_length=512)
    assert rel_err(ours_latents(ours, SHORT, max_sequence_length=512), want) <= 1e-5


def test_default_clamps_a_long_prompt_to_the_table(ours, theirs):
    """At the default, a long prompt is truncated to the table's 64 tokens: diffusers with max_sequence_length=64."""
    want = diffusers_latents(theirs, LONG, max_sequence_length=TABLE)
    assert rel_err(ours_latents(ours, LONG), want) <= 1e-5


def test_explicit_value_with_a_caption_that_cannot_fit_is_refused(ours, theirs, dropin):
    with pytest.raises((IndexError, RuntimeError)):  # the reference: diffusers cannot run it either (RoPE index)
        diffusers_latents(theirs, LONG, max_sequence_length=512)
    for run in (
        lambda: ours_latents(ours, LONG, max_sequence_length=512),
        lambda: diffusers_latents(dropin, LONG, max_sequence_length=512),
    ):
        with pytest.raises(RequestError) as e:
            run()
        assert e.value.field == "max_sequence_length"
        assert f"<= {TABLE}" in str(e.value)


def test_explicit_value_out_of_range_is_refused(ours):
    for bad in (0, -1, 5000):
        with pytest.raises(RequestError) as e:
            ours_latents(ours, SHORT, max_sequence_length=bad)
        assert e.value.field == "max_sequence_length" and "[1, 4096]" in str(e.value)
