"""Sequence and CFG parallelism: 2 and 4 gloo processes against one process on the same inputs (fp32, CPU).

Each world size is spawned once (``zimage_core.parallel.launch``, bounded in time) and runs every case of that size;
the ranks return their outputs and this process compares them with its own single-process run of the same model
and inputs: transformer outputs and whole-``generate`` final latents within 1e-5 relative, and a step cache's
decisions equal to one process's.
"""

from __future__ import annotations

import time
import zlib

import pytest
import torch
import torch.distributed as dist

from zimage_core import RequestError, ZImageConfig, ZImageTransformer
from zimage_core.hooks import run_stack
from zimage_core.model import BlockInputs
from zimage_core.parallel import (
    LaunchError,
    ParallelConfig,
    ParallelContext,
    SequenceParallelHook,
    head_splits,
    launch,
)

TOL = 1e-5
LAUNCH_TIMEOUT_S = 240  # a hang fails the test instead of blocking the suite
COLLECTIVE_TIMEOUT_S = 60
# fork: the ranks start from this process's imports (the test session runs one torch thread; conftest); a rank
# started by spawn imports torch again, seconds each on a loaded machine
START = dict(start_method="fork", timeout_s=LAUNCH_TIMEOUT_S, collective_timeout_s=COLLECTIVE_TIMEOUT_S)

PIPE_CONFIG = ZImageConfig(  # 6 heads: uneven on 4 ranks (2, 2, 1, 1)
    dim=96,
    n_layers=2,
    n_refiner_layers=1,
    n_heads=6,
    n_kv_heads=6,
    cap_feat_dim=32,
    axes_dims=(4, 6, 6),
    axes_lens=(1536, 160, 160),
)
PROMPT = "a large red circle in the top left on a blue background"  # 55 caption tokens -> padded to 64
GEN = dict(  # the negative prompt pads to 32 tokens: ragged captions inside the CFG batch
    negative_prompt="blurry",
    width=64,
    height=64,
    steps=4,
    cfg_scale=3.0,
    shift=3.0,
    cfg_normalization=1.0,
    seed=7,
    output_type="latent",
)
# Cache runs: a negative prompt of the same padded caption length (64). One process computes the cache metric over
# the whole CFG batch, batch-padding rows of the shorter caption included; a CFG-parallel rank holds one half and
# has no such rows, so with ragged captions the two metrics differ slightly (docs/parallel.md, "Step caches").
GEN_CACHE = dict(GEN, negative_prompt="a small blue square in the bottom right on a red background")


# ---- models and inputs, built the same way in every process -------------------------------------------------------
def make_model(n_heads: int, seed: int = 0) -> ZImageTransformer:
    cfg = ZImageConfig(
        dim=8 * n_heads,
        n_layers=2,
        n_refiner_layers=1,
        n_heads=n_heads,
        n_kv_heads=n_heads,
        cap_feat_dim=16,
        axes_dims=(2, 2, 4),
        axes_lens=(256, 32, 32),
    )
    torch.manual_seed(seed)
    model = ZImageTransformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("pad_token") or "norm" in name:  # default init is zeros/ones: make them matter
                p.copy_(torch.randn_like(p) * 0.5 + (1.0 if "norm" in name else 0.0))
    return model


def make_inputs(kind: str):
    g = torch.Generator().manual_seed(1)
    rn = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    if kind == "ragged":  # captions 9 and 45 tokens -> unified 64 and 96: masked keys
        x, caps = [rn(16, 1, 6, 10), rn(16, 1, 6, 10)], [rn(9, 16), rn(45, 16)]
    else:  # "cfg": one latent twice, positive and negative captions of different lengths
        lat = rn(16, 1, 10, 14)
        x, caps = [lat, lat.clone()], [rn(40, 16), rn(7, 16)]
    return x, torch.rand(2, generator=g), caps


@torch.no_grad()
def transformer_out(n_heads: int, kind: str, hooks=()) -> torch.Tensor:
    model = make_model(n_heads)
    x, t, caps = make_inputs(kind)
    out = model.forward_with_context(x, t, model.encode_context(caps), hooks=hooks)
    return torch.cat([o.flatten() for o in out])


@torch.no_grad()
def odd_stack(hooks=()) -> torch.Tensor:
    """The main layers on a hand-made unified sequence of 50 tokens (not a multiple of 4: the hook pads)."""
    model = make_model(6)
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(2, 50, model.config.dim, generator=g)
    angles = torch.randn(2, 50, model.config.head_dim // 2, generator=g)
    inp = BlockInputs(
        model.ops_for(hidden.device),
        torch.tensor([50, 37], dtype=torch.int32),
        torch.polar(torch.ones_like(angles), angles),
        torch.randn(2, model.config.adaln_dim, generator=g),
    )
    return run_stack(hidden, inp, model.layers, hooks)


def cache_config(threshold: float):
    from zimage_core.cache import CacheConfig

    return CacheConfig.for_method("fb", threshold=threshold, max_consecutive=2)


def decisions(result) -> list[tuple[int, bool, str]]:
    return [(d["step"], d["computed"], d["reason"]) for d in result.stats["cache"][0]["decisions"]]


def make_pipe():
    """A ZImage whose caption features are a seeded function of the prompt (one feature row per character).

    The text encoder and the VAE are not parallelised (the ranks would each run them whole); leaving them out keeps
    each rank's start-up to importing torch. Everything from the caption features on is the real pipeline.
    """
    from types import SimpleNamespace

    from zimage_core.pipeline import ZImage

    class FeaturePipe(ZImage):
        def encode_prompts(self, prompts, max_sequence_length=512):
            feats = []
            for p in prompts:
                g = torch.Generator().manual_seed(zlib.crc32(p.encode()))
                feats.append(torch.randn(max(len(p), 1), PIPE_CONFIG.cap_feat_dim, generator=g))
            return feats

    torch.manual_seed(3)
    transformer = ZImageTransformer(PIPE_CONFIG).eval()
    with torch.no_grad():
        transformer.x_pad_token.normal_()
        transformer.cap_pad_token.normal_()
    vae = SimpleNamespace(config=SimpleNamespace(block_out_channels=(32, 32, 32, 32)))  # x8: latents only
    return FeaturePipe(transformer, None, None, vae)


def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    """max |ref − out| / max |ref|."""
    return float((ref - out).abs().max() / ref.abs().max())


# ---- what the ranks run ---------------------------------------------------------------------------------------------
def _transformer_cases(world: int):
    if world == 2:
        return [("ulysses=2", 4, "ragged"), ("ulysses=2", 4, "cfg"), ("ring=2", 4, "ragged")]
    return [("ulysses=4", 30, "ragged"), ("ulysses=4,heads=pad", 30, "ragged"), ("ring=4", 30, "ragged")]


def _generate_cases(world: int):
    return ["ulysses=2", "cfg=2"] if world == 2 else ["ulysses=4", "ulysses=2,cfg=2"]


def _cache_cases(world: int):
    return ["ulysses=2", "cfg=2"] if world == 2 else ["ulysses=2,cfg=2"]


def rank_main(rank: int, world: int, threshold: float):
    out: dict = {}
    contexts: dict[str, ParallelContext] = {}

    def ctx(spec):  # every rank builds the same meshes in the same order
        if spec not in contexts:
            contexts[spec] = ParallelContext(ParallelConfig.parse(spec))
        return contexts[spec]

    calls = {"all_to_all_single": 0, "batch_isend_irecv": 0}  # proof that the sharded path ran
    for name in calls:
        real = getattr(dist, name)

        def counted(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)

        setattr(dist, name, counted)  # this rank is its own process: the patch ends with it
    for spec, heads, kind in _transformer_cases(world):
        before = dict(calls)
        out[f"transformer {spec} {heads} heads {kind}"] = transformer_out(heads, kind, ctx(spec).hooks())
        out[f"calls {spec} {heads} heads {kind}"] = {k: calls[k] - before[k] for k in calls}
    if world == 4:
        c = ctx("ulysses=4")
        hook = SequenceParallelHook(c.mesh.sp_group, 4, "ulysses")
        out["stack ulysses=4 50 tokens"] = odd_stack([hook])
    pipe = make_pipe()
    for spec in _generate_cases(world):
        out[f"generate {spec}"] = ctx(spec).generate(pipe, PROMPT, **GEN).latents
    for spec in _cache_cases(world):
        res = ctx(spec).generate(pipe, PROMPT, **GEN_CACHE, cache=cache_config(threshold))
        out[f"cache {spec}"] = (res.latents, decisions(res))
    if world == 2:  # bad input on rank 1 only: every rank fails with its error, nothing hangs
        bad = dict(GEN, steps=0 if rank == 1 else GEN["steps"])
        try:
            ctx("ulysses=2").generate(pipe, PROMPT, **bad)
            out["bad input"] = None
        except RequestError as e:
            out["bad input"] = (type(e).__name__, e.field)
        out["after error"] = ctx("ulysses=2").generate(pipe, PROMPT, **GEN).latents  # the ranks are still usable
    return out


class Boom(RuntimeError):
    pass


def crash_main(rank: int):
    """Rank 1 raises inside the main layers while rank 0 waits in an all-to-all."""
    from zimage_core.hooks import StackHook

    class Explode(StackHook):
        def after_layer(self, index, hidden, inp):
            if rank == 1 and index == 0:
                raise Boom("rank 1 broke in layer 0")
            return hidden

    transformer_out(4, "ragged", [*ParallelContext(ParallelConfig(ulysses=2)).hooks(), Explode()])


# ---- the tests ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def single():
    """One process: the generate latents, a cache threshold that splits the measured changes, its decisions."""
    pipe = make_pipe()
    plain = pipe.generate(PROMPT, **GEN)
    probe = pipe.generate(PROMPT, **GEN_CACHE, cache=cache_config(1e9))  # measures every change the policy looks at
    changes = sorted(d["change"] for d in probe.stats["cache"][0]["decisions"] if d["change"] is not None)
    assert len(changes) >= 2, changes
    mid = len(changes) // 2
    threshold = (changes[mid - 1] + changes[mid]) / 2  # far from every measured value (relative gap checked)
    assert min(abs(c - threshold) / threshold for c in changes) > 1e-3
    cached = pipe.generate(PROMPT, **GEN_CACHE, cache=cache_config(threshold))
    computed = [c for _, c, _ in decisions(cached)]
    assert any(computed) and not all(computed), decisions(cached)  # the comparison sees both kinds of decision
    return {"latents": plain.latents, "threshold": threshold, "cached": cached}


def _check_world(world, single):
    t0 = time.monotonic()
    results = launch(rank_main, world, (world, single["threshold"]), **START)
    elapsed = time.monotonic() - t0
    errors = {}
    for spec, heads, kind in _transformer_cases(world):
        ref = transformer_out(heads, kind)
        for r in range(world):
            errors[(r, spec, heads, kind)] = rel_err(ref, results[r][f"transformer {spec} {heads} heads {kind}"])
            calls = results[r][f"calls {spec} {heads} heads {kind}"]
            # make_model: 2 main layers + 1 noise-refiner layer, each with two all-to-alls (q, k, v stacked; out)
            # under Ulysses or P − 1 ring hops
            blocks = 3
            if spec.startswith("ulysses"):
                assert calls == {"all_to_all_single": 2 * blocks, "batch_isend_irecv": 0}, calls
            else:
                assert calls == {"all_to_all_single": 0, "batch_isend_irecv": blocks * (world - 1)}, calls
    if world == 4:
        ref = odd_stack()
        for r in range(world):
            errors[(r, "stack 50 tokens")] = rel_err(ref, results[r]["stack ulysses=4 50 tokens"])
    for spec in _generate_cases(world):
        for r in range(world):
            errors[(r, "generate", spec)] = rel_err(single["latents"], results[r][f"generate {spec}"])
    for spec in _cache_cases(world):
        for r in range(world):
            latents, decided = results[r][f"cache {spec}"]
            assert decided == decisions(single["cached"]), (r, spec)
            errors[(r, "cache", spec)] = rel_err(single["cached"].latents, latents)
    bad = {k: v for k, v in errors.items() if not v <= TOL}
    assert not bad, bad
    assert max(errors.values()) <= TOL
    return results, elapsed


def test_two_ranks_ulysses_ring_cfg_parity_and_cache_decisions(single):
    results, _ = _check_world(2, single)
    # rank 1's bad input fails both ranks with its field; afterwards both still run requests
    assert [r["bad input"] for r in results] == [("RequestError", "steps")] * 2
    for r in results:
        assert rel_err(single["latents"], r["after error"]) <= TOL


def test_four_ranks_30_heads_ulysses_ring_and_ulysses_x_cfg(single):
    _check_world(4, single)


def test_a_rank_failing_mid_forward_fails_the_run_without_hanging():
    t0 = time.monotonic()
    with pytest.raises(LaunchError) as info:
        launch(crash_main, 2, **START)
    assert info.value.rank == 1 and "rank 1 broke in layer 0" in str(info.value)
    assert time.monotonic() - t0 < COLLECTIVE_TIMEOUT_S  # ended by the failure, not by the collective timeout


def hang_main(rank: int):
    """Rank 1 never reaches the collective (it hangs, it does not die)."""
    if rank == 1:
        time.sleep(600)
    dist.barrier()


def test_a_hung_rank_fails_the_run_at_the_collective_timeout():
    t0 = time.monotonic()
    with pytest.raises(LaunchError) as info:
        launch(hang_main, 2, start_method="fork", timeout_s=LAUNCH_TIMEOUT_S, collective_timeout_s=3)
    assert info.value.rank == 0  # rank 0's barrier timed out; rank 1 was terminated
    assert time.monotonic() - t0 < 60


def test_the_launcher_kills_a_run_past_its_time_limit():
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="exceeded 3 s"):
        launch(hang_main, 2, start_method="fork", timeout_s=3, collective_timeout_s=600)
    assert time.monotonic() - t0 < 30


# ---- no processes needed -----------------------------------------------------------------------------------------
def test_head_splits():
    assert head_splits(30, 4, "uneven") == (30, [8, 8, 7, 7])
    assert head_splits(30, 4, "pad") == (32, [8, 8, 8, 8])
    assert head_splits(30, 8, "pad") == (32, [4] * 8)
    assert head_splits(30, 2, "uneven") == (30, [15, 15])
    with pytest.raises(ValueError, match="exceeds the 2 attention heads"):
        head_splits(2, 4, "uneven")


def test_parallel_config_parse_and_errors():
    c = ParallelConfig.parse("ulysses=2,cfg=2")
    assert (c.ulysses, c.cfg, c.world_size, c.sp, c.sequence_mode) == (2, 2, 4, 2, "ulysses")
    assert ParallelConfig.parse("ring=4").sequence_mode == "ring"
    assert ParallelConfig.parse("ulysses=4,heads=pad").heads == "pad"
    for text, match in [
        ("ulysses=2,ring=2", "one sequence-parallel mode"),
        ("cfg=3", "cfg degree must be 1 or 2"),
        ("ulysses=0", "ulysses degree must be an integer >= 1"),
        ("tensor=2", "keys"),
        ("ulysses=two", "must be an integer"),
        ("heads=odd", "heads must be one of"),
    ]:
        with pytest.raises(ValueError, match=match):
            ParallelConfig.parse(text)


# ---- the command line ------------------------------------------------------------------------------------------
CLI_ARGS = ["a large red circle in the top left on a blue background", "--steps", "2", "--seed", "1"]
CLI_ARGS += ["--cfg-scale", "3", "--width", "64", "--height", "64", "--quiet"]


def test_cli_generate_parallel_matches_one_process(tmp_path, monkeypatch, capfd):
    import numpy as np
    from PIL import Image

    from zimage_core import cli

    monkeypatch.setenv("ZIMAGE_PARALLEL_START", "fork")
    assert cli.main(["generate", *CLI_ARGS, "-o", str(tmp_path / "one.png")]) == 0
    assert cli.main(["generate", *CLI_ARGS, "--parallel", "ulysses=2", "-o", str(tmp_path / "par.png")]) == 0
    out = capfd.readouterr().out
    assert "parallel: ulysses=2,heads=uneven on 2 ranks (gloo)" in out
    one, par = (np.asarray(Image.open(tmp_path / f"{n}.png")).astype(int) for n in ("one", "par"))
    assert one.shape == par.shape == (64, 64, 3)
    assert np.abs(one - par).max() <= 1  # latents agree to ~1e-7; a pixel can round the other way


def test_cli_parallel_bad_spec_and_bad_input_fail_cleanly(tmp_path, monkeypatch, capfd):
    from zimage_core import cli

    monkeypatch.setenv("ZIMAGE_PARALLEL_START", "fork")
    assert cli.main(["generate", *CLI_ARGS, "--parallel", "cfg=3"]) == 2
    assert "--parallel: parallel cfg degree must be 1 or 2" in capfd.readouterr().err
    bad = [*CLI_ARGS, "--steps", "0", "--parallel", "cfg=2", "-o", str(tmp_path / "x.png")]
    assert cli.main(["generate", *bad]) == 2
    err = capfd.readouterr().err
    assert err.count("zimage: error: steps: must be in [1, 1000], got 0") == 1  # rank 0 reports, every rank exits 2
    assert not (tmp_path / "x.png").exists()


# ---- the benchmark -------------------------------------------------------------------------------------------------
def test_bench_parallel_model_matches_hand_computed_zimage_sizes():
    from zimage_bench.parallel import Shape, step_model

    # Z-Image at 1024²: 4096 image + 128 caption tokens, CFG batch of 2, dim 3840 = 30 heads x 128, 30 layers
    shape = Shape(3840, 30, 10240, 30, 4224, 2, 16 * 128 * 128)
    u2 = step_model(shape, "ulysses=2")
    assert u2["elements_per_layer"] == {"all_to_all qkv": 3 * 2 * 2112 * 3840, "all_to_all out": 2 * 4224 * 15 * 128}
    u4 = step_model(shape, "ulysses=4,heads=uneven")  # rank 0 holds 8 of the 30 heads
    assert u4["elements_per_layer"] == {"all_to_all qkv": 3 * 2 * 1056 * 3840, "all_to_all out": 2 * 4224 * 8 * 128}
    pad = step_model(shape, "ulysses=4,heads=pad")  # 32 heads on the wire
    assert pad["elements_per_layer"]["all_to_all qkv"] == 3 * 2 * 1056 * 32 * 128
    ring = step_model(shape, "ring=4")
    assert ring["elements_per_layer"] == {"ring k,v (P-1 hops)": 2 * 2 * 1056 * 3840 * 3}
    cfg = step_model(shape, "cfg=2")
    assert cfg["elements_per_step"] == {"main layers": 0, "noise refiner": 0, "all_gather cfg": 16 * 128 * 128}
    # with the noise refiner (2 layers over the 4096 image tokens), sharded like the main layers
    refined = step_model(Shape(3840, 30, 10240, 30, 4224, 2, 16 * 128 * 128, 4096, 2), "ulysses=2")
    qkv_out = 3 * 2 * 2048 * 3840 + 2 * 4096 * 15 * 128
    assert refined["elements_per_step"]["noise refiner"] == 2 * qkv_out + 2 * 2048 * 3840  # + the gather
    assert cfg["bytes_sent_per_rank"] == 16 * 128 * 128 * 2


def test_bench_parallel_measures_and_counts_what_the_model_says(tmp_path, capsys):
    from zimage_bench import parallel

    args = ["--heads", "6", "--layers", "1", "--latent", "8", "--caption", "8", "--reps", "1", "--out", str(tmp_path)]
    assert parallel.main(args) == 0  # non-zero when counted collective elements differ from the model
    text = capsys.readouterr().out
    assert "CPU timings do not predict GPU scaling" in text and "| ulysses=2 x cfg=2 | 4 |" in text
    assert (tmp_path / "table.md").exists() and (tmp_path / "rows.json").exists()
