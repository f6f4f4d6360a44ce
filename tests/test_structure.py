"""scripts/structure.py: the structure metrics, checked on small trees written here whose answers are known by
construction (counted by hand below), and the command line on this checkout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import structure  # noqa: E402


def _tree(root: Path, files: dict[str, str]) -> Path:
    for top in structure.PACKAGES:
        (root / top).mkdir(parents=True, exist_ok=True)
        (root / top / "__init__.py").touch()
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_module_counts_and_top_level_modules(tmp_path):
    _tree(
        tmp_path,
        {
            "zimage_core/a.py": "",
            "zimage_core/b.py": "",
            "zimage_core/sub/__init__.py": "",
            "zimage_core/sub/c.py": "",
            "zimage_core/sub/deep/d.py": "",
            "zimage_kernels/k.py": "",
        },
    )
    counts = structure.module_counts(tmp_path)
    # zimage_core: __init__, a, b, sub/__init__, sub/c, sub/deep/d = 6; zimage_core/sub: 3 (deep/d included)
    assert counts == {"zimage_bench": 1, "zimage_core": 6, "zimage_core/sub": 3, "zimage_kernels": 2}
    assert structure.top_level_modules(tmp_path) == ["__init__", "a", "b"]


def test_longest_functions_counts_def_to_last_line_with_methods_and_nesting(tmp_path):
    _tree(
        tmp_path,
        {
            "zimage_core/f.py": (
                "def three():\n    x = 1\n    return x\n"  # 3 lines
                "\n@decorator\ndef one(): pass\n"  # 1 line (decorator excluded)
                "class C:\n    def five(self):\n        a = 1\n        def inner():\n            return 2\n"
                "        return a\n"  # C.five: 5 lines, C.five.inner: 2 lines
            )
        },
    )
    rows = structure.longest_functions(tmp_path, n=10)
    assert rows == [
        (5, "zimage_core/f.py:8 C.five"),
        (3, "zimage_core/f.py:1 three"),
        (2, "zimage_core/f.py:10 C.five.inner"),
        (1, "zimage_core/f.py:6 one"),
    ]
    assert structure.longest_functions(tmp_path, n=1) == [(5, "zimage_core/f.py:8 C.five")]


def test_cycles_module_level_against_all_imports(tmp_path):
    _tree(
        tmp_path,
        {
            # a <-> b at module level (relative and absolute spellings)
            "zimage_core/a.py": "from .b import x\n",
            "zimage_core/b.py": "import zimage_core.a\n",
            # c -> d at module level, d -> c only inside a function: a cycle only when deferred imports count
            "zimage_core/c.py": "from . import d\n",
            "zimage_core/d.py": "def f():\n    from .c import y\n",
            # e -> f at module level, f -> e only for type checking: never runs
            "zimage_core/e.py": "from .f import Z\n",
            "zimage_core/f.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .e import W\n",
            # ``from . import g`` names the submodule, not the package: no cycle with zimage_core/__init__
            "zimage_core/g.py": "from . import h\n",
            "zimage_core/h.py": "import torch\nfrom zimage_kernels import k\n",
            "zimage_core/__init__.py": "from .g import G\n",
            "zimage_kernels/k.py": "",
            # a sub-package: ``from .. import b`` from zimage_core/sub/s.py is zimage_core.b
            "zimage_core/sub/__init__.py": "",
            "zimage_core/sub/s.py": "from .. import b\n",
        },
    )
    graph = structure.import_graph(tmp_path)
    assert {e.target for e in graph["zimage_core.sub.s"]} == {"zimage_core.b"}
    assert {e.target for e in graph["zimage_core.g"]} == {"zimage_core.h"}
    assert {e.target for e in graph["zimage_core.h"]} == {"zimage_kernels.k"}
    assert structure.cycles(graph, module_level_only=True) == [["zimage_core.a", "zimage_core.b"]]
    assert structure.cycles(graph, module_level_only=False) == [
        ["zimage_core.a", "zimage_core.b"],
        ["zimage_core.c", "zimage_core.d"],
        ["zimage_core.e", "zimage_core.f"],
    ]


def test_a_long_cycle_is_one_component(tmp_path):
    n = 5
    files = {f"zimage_bench/m{i}.py": f"from . import m{(i + 1) % n}\n" for i in range(n)}
    graph = structure.import_graph(_tree(tmp_path, files))
    assert structure.cycles(graph) == [[f"zimage_bench.m{i}" for i in range(n)]]


def test_command_line_prints_every_section_and_json():
    text = subprocess.run(
        [sys.executable, str(REPO / "scripts" / "structure.py")], capture_output=True, text=True, check=True
    ).stdout
    for title in ("module counts", "zimage_core top-level modules", "10 longest functions", "import cycles"):
        assert title in text
    cmd = [sys.executable, str(REPO / "scripts" / "structure.py"), "--json"]
    data = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout)
    assert len(data["longest_functions"]) == 10
    assert data["module_counts"]["zimage_core"] == len(list((REPO / "zimage_core").rglob("*.py")))


def test_command_line_refuses_a_folder_that_is_not_the_repository(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "structure.py"), str(tmp_path)], capture_output=True)
    assert run.returncode == 2
    assert b"root:" in run.stderr and b"zimage_kernels" in run.stderr
