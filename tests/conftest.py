"""Test tiers: unmarked = cpu, ``interpret`` = Triton under TRITON_INTERPRET=1 on CPU, ``gpu`` = needs CUDA.

TRITON_INTERPRET must be set before triton is first imported, so it is decided here, at collection time: with no
CUDA device the whole session runs Triton through the interpreter.
"""

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()

# The CPU tests run tiny models and small tensors: intra-op threading costs more than it gives (measured 4.5x slower
# with 2 threads on a loaded 2-core machine), so the test session uses one thread.
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="gpu tier: no CUDA device on this machine")
    for item in items:
        # the marker, not ``"gpu" in item.keywords``: keywords also hold folder names (a checkout in a folder
        # named gpu would skip every test)
        if item.get_closest_marker("gpu") is not None and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_pipe(tmp_path_factory):
    """A small random-weight ZImage (fp32, CPU) with fast defaults: 128x128, 2 steps, CFG 2."""
    from zimage_core.pipeline import Defaults, ZImage

    pipe = ZImage.random(tmp_path_factory.mktemp("tiny") / "pipe", seed=0, device="cpu", dtype=torch.float32)
    fast = Defaults(steps=2, cfg_scale=2.0, shift=3.0, width=128, height=128)
    pipe.presets = {"runware:z-image@0": fast, "z-image-turbo": fast}
    return pipe
