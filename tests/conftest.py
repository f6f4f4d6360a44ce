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


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="gpu tier: no CUDA device on this machine")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
