"""The throughput cases of ``python -m zimage_bench throughput`` under pytest-benchmark, so runs can be saved and
compared
across commits::

    pytest tests/benchmarks --benchmark-only --benchmark-autosave            # saves .benchmarks/<machine>/NNNN_*.json
    pytest tests/benchmarks --benchmark-only --benchmark-compare             # against the last saved run
    pytest-benchmark compare 0001 0002 --group-by=param:shape                 # two saved runs side by side

Each case checks parity against diffusers' pipeline first (same shapes, seeds and rule as the CLI) and stores the
parity figures and the environment in ``extra_info``; a case that fails parity fails and is not timed. Model and
shapes: ``ZIMAGE_BENCH_MODEL`` (default: the embedded model on CPU, ``synthetic`` real dims on CUDA) and
``ZIMAGE_BENCH_SHAPES`` (a table name or specs, as ``--shapes``; default ``cpu`` / ``gpu``).
"""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from zimage_bench import common, report, shapes  # noqa: E402
from zimage_bench.env import environment  # noqa: E402
from zimage_bench.pipelines import DEFAULT_PROMPT, REFERENCE, decode_float, load_pair, make_configs, run  # noqa: E402

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
SHAPES = shapes.resolve(os.environ.get("ZIMAGE_BENCH_SHAPES"), DEVICE.type)
CONFIGS = ["diffusers-eager", "ours-torch"] + (["ours-triton"] if DEVICE.type == "cuda" else [])
SEED = 42
ROUNDS = 3 if DEVICE.type == "cuda" else 5


@pytest.fixture(scope="module")
def pair():
    threads = torch.get_num_threads()
    if DEVICE.type == "cpu":
        torch.set_num_threads(1)  # as the CLI: on a shared machine multi-threaded timings scatter
    model = os.environ.get("ZIMAGE_BENCH_MODEL") or ("synthetic" if DEVICE.type == "cuda" else "default")
    yield load_pair(model, DEVICE)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def references(pair):
    cache = {}

    def get(shape):
        if shape not in cache:
            ref_cfg = make_configs(pair, [REFERENCE])[0]
            out = run(pair, ref_cfg, shape, seed=SEED, prompt=DEFAULT_PROMPT)
            cache[shape] = (out.latents, decode_float(pair.ref.vae, out.latents, pair.device))
        return cache[shape]

    return get


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: s.name.replace("/", "-"))
def test_pipeline(benchmark, pair, references, shape, config):
    cfg = make_configs(pair, [config])[0]
    if not cfg.available:
        pytest.skip(cfg.skip_reason)
    ref_latents, ref_images = references(shape)
    first = run(pair, cfg, shape, seed=SEED, prompt=DEFAULT_PROMPT)  # warm-up and parity check
    images = decode_float(pair.ref.vae, first.latents, pair.device)
    tol = common.DEFAULT_TOL[pair.dtype]
    check = common.check_parity(
        first.latents, ref_latents, images, ref_images, lossy=cfg.lossy, tol=tol, min_psnr=common.DEFAULT_MIN_PSNR
    )
    benchmark.group = shape.name
    benchmark.extra_info.update(
        case=shape.name,
        config=config,
        model=pair.model,
        model_kind=pair.model_kind,
        first_call_s=first.e2e_ms / 1e3,
        parity=report.jsonable(check),
        env=report.jsonable(environment(DEVICE)),
    )
    assert check["passed"], f"{config} failed parity on {shape.name}: {check}"
    benchmark.pedantic(
        run,
        args=(pair, cfg, shape),
        kwargs=dict(seed=SEED, prompt=DEFAULT_PROMPT),
        rounds=ROUNDS,
        iterations=1,
        warmup_rounds=0,
    )
