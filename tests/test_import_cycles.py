"""No circles between modules: the import graph of zimage_kernels, zimage_core and zimage_bench has no cycle.

Read with ``ast`` by ``scripts/structure.py`` (nothing is imported; its docstring gives the edge rule). Two checks:
module-level imports (what runs at import time) and every import, function-level and ``TYPE_CHECKING`` ones
included: a deferred import that closes a circle still ties two modules to each other's insides, so the tree has
none of those either. Each check is shown to fail on a tree written with such a cycle.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import structure  # noqa: E402


def test_no_module_level_import_cycle():
    assert structure.cycles(structure.import_graph(REPO), module_level_only=True) == []


def test_no_import_cycle_even_through_function_level_imports():
    assert structure.cycles(structure.import_graph(REPO), module_level_only=False) == []


def _write(root: Path, files: dict[str, str]) -> Path:
    for top in structure.PACKAGES:
        (root / top).mkdir(parents=True, exist_ok=True)
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


@pytest.mark.parametrize(
    ("files", "module_level"),
    [
        # the shapes this tree had before issue 27: model <-> weights, hooks <-> model, cli <-> parallel/cli
        ({"zimage_core/weights.py": "from .model import M\n", "zimage_core/model.py": "from . import weights\n"}, True),
        (
            {
                "zimage_core/hooks.py": "import typing\nif typing.TYPE_CHECKING:\n    from .model import B\n",
                "zimage_core/model.py": "from .hooks import StackHook\n",
            },
            False,
        ),
        (
            {
                "zimage_core/cli.py": "def main():\n    from .parallel.cli import generate_parallel\n",
                "zimage_core/parallel/__init__.py": "",
                "zimage_core/parallel/cli.py": "def rank():\n    from .. import cli\n",
            },
            False,
        ),
        # three modules across packages, absolute imports
        (
            {
                "zimage_kernels/a.py": "import zimage_core.b\n",
                "zimage_core/b.py": "from zimage_bench.c import x\n",
                "zimage_bench/c.py": "from zimage_kernels import a\n",
            },
            True,
        ),
    ],
)
def test_a_cycle_is_found(tmp_path, files, module_level):
    graph = structure.import_graph(_write(tmp_path, files))
    expected = sorted(structure.module_name(Path(rel)) for rel in files if not rel.endswith("__init__.py"))
    assert structure.cycles(graph, module_level_only=False) == [expected]
    assert structure.cycles(graph, module_level_only=True) == ([expected] if module_level else [])


def test_one_way_imports_are_no_cycle(tmp_path):
    files = {
        "zimage_core/__init__.py": "from .model import M\nfrom .weights import CheckpointError\n",
        "zimage_core/model.py": "from . import weights\nfrom .hooks import BlockInputs\n",
        "zimage_core/hooks.py": "import torch\nfrom zimage_kernels import Ops\n",
        "zimage_core/weights.py": "def f():\n    from .config import C\n",
        "zimage_core/config.py": "",
        "zimage_kernels/__init__.py": "from .ops import Ops\n",
        "zimage_kernels/ops.py": "",
    }
    assert structure.cycles(structure.import_graph(_write(tmp_path, files)), module_level_only=False) == []
