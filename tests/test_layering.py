"""Import layering (README "Layout"): zimage_kernels -> zimage_core library -> zimage_core.service (the request API)
-> zimage_core.server (the network server) -> zimage_bench.

Read with ``ast`` from the source tree, every import counts (module level or inside a function):
- ``kernels`` imports nothing of ``zimage_core`` or ``bench``;
- the library (``zimage_core`` outside ``service/``) never imports ``zimage_core.service``;
- nothing outside ``bench`` (and the tests) imports ``bench``;
- nothing below the server (the library, the service) imports ``zimage_core.server``;
- the server reaches ``zimage_core`` only through ``zimage_core.service.engine`` (its one door);
- nothing outside ``zimage_core/train`` imports the training code;
- the step caches (``zimage_core/cache/``) sit below the pipeline: of ``zimage_core`` they import only themselves
  and the hook protocol (``zimage_core.hooks``); tools that run the pipeline (TeaCache calibration) live in bench.

Allowed on purpose: ``zimage_core/api.py`` is the service's old module name (a re-export), ``zimage_core/cli.py`` is
the command-line entry point on top of everything, and ``ZImage.infer`` delegates to the service (imported when
called).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import structure  # noqa: E402

PACKAGES = ("zimage_kernels", "zimage_core", "zimage_bench", "scripts")
SERVICE_ENTRY = {"zimage_core/api.py", "zimage_core/cli.py"}  # above the service: allowed to import it
SERVER_ENTRY = {"zimage_core/cli.py"}  # above the server: allowed to import it
SERVER_DOOR = "zimage_core.service.engine"
ALLOWED_FUNCTION_IMPORTS = {("zimage_core/pipeline.py", "infer", "zimage_core.service")}
CACHE_MAY_IMPORT = ("zimage_core.cache", "zimage_core.hooks")  # of zimage_core; zimage_kernels and torch are fine


def imports(root: Path, rel: Path) -> list[tuple[str, str | None]]:
    """(absolute module imported, name of the enclosing function or None) for every import in a file, read with
    ``scripts/structure.py``'s reader; ``from . import service`` also counts as importing that submodule."""
    found: list[tuple[str, str | None]] = []
    for mod, names, func, _ in structure.raw_imports(root, rel):
        found.append((mod, func))
        found.extend((f"{mod}.{name}", func) for name in names)
    return found


def _inside(mod: str, package: str) -> bool:
    return mod == package or mod.startswith(package + ".")


def violations(root: Path) -> list[str]:
    bad = []
    for top in PACKAGES:
        for path in sorted((root / top).rglob("*.py")):
            rel = path.relative_to(root)
            src = rel.as_posix()
            for mod, func in imports(root, rel):
                where = f"{src}{f' ({func})' if func else ''} imports {mod}"
                if top == "zimage_kernels" and (_inside(mod, "zimage_core") or _inside(mod, "zimage_bench")):
                    bad.append(f"{where}: kernels imports nothing of zimage_core or bench")
                if top != "zimage_bench" and _inside(mod, "zimage_bench"):
                    bad.append(f"{where}: nothing imports bench")
                if _inside(mod, "kernels") or _inside(mod, "bench"):
                    bad.append(f"{where}: old import name (kernels/bench collide with published packages)")
                library = top == "zimage_core" and not src.startswith(("zimage_core/service/", "zimage_core/server/"))
                if (
                    library
                    and src not in SERVICE_ENTRY
                    and _inside(mod, "zimage_core.service")
                    and (src, func, "zimage_core.service") not in ALLOWED_FUNCTION_IMPORTS
                ):
                    bad.append(f"{where}: the library never imports the service")
                server = src.startswith("zimage_core/server/")
                if (
                    top == "zimage_core"
                    and not server
                    and src not in SERVER_ENTRY
                    and _inside(mod, "zimage_core.server")
                ):
                    bad.append(f"{where}: nothing below the server imports it")
                if (
                    server
                    and _inside(mod, "zimage_core")
                    and not _inside(mod, "zimage_core.server")
                    and mod != "zimage_core.service"  # ``from ..service import X``: X is checked as its own entry
                    and not _inside(mod, SERVER_DOOR)
                ):
                    bad.append(f"{where}: the server reaches the library only through {SERVER_DOOR}")
                if (
                    src.startswith("zimage_core/cache/")
                    and _inside(mod, "zimage_core")
                    and not any(_inside(mod, ok) for ok in CACHE_MAY_IMPORT)
                ):
                    bad.append(f"{where}: the step caches sit below the pipeline")
                if not src.startswith("zimage_core/train/") and top != "scripts" and _inside(mod, "zimage_core.train"):
                    bad.append(f"{where}: training code is not imported at run time")
    return bad


def test_the_tree_respects_the_layers():
    assert violations(ROOT) == []


@pytest.mark.parametrize(
    ("rel", "source", "rule"),
    [
        ("zimage_kernels/x.py", "from zimage_core.model import Foo\n", "kernels imports nothing"),
        ("zimage_kernels/sub/x.py", "def f():\n    import zimage_bench.common\n", "kernels imports nothing"),
        ("zimage_core/model2.py", "from .service import infer\n", "never imports the service"),
        ("zimage_core/cache/x.py", "from ..service.request import SCHEMA\n", "never imports the service"),
        ("zimage_core/pipeline.py", "def generate():\n    from .service import infer\n", "never imports the service"),
        ("zimage_core/y.py", "from . import service\n", "never imports the service"),
        ("zimage_core/service/z.py", "import zimage_bench\n", "nothing imports bench"),
        ("zimage_core/w.py", "from .train import train\n", "training code"),
        ("zimage_core/cache/t.py", "def f():\n    from ..pipeline import ZImage\n", "below the pipeline"),
        ("zimage_core/cache/t.py", "from zimage_core.default_model import x\n", "below the pipeline"),
        ("zimage_core/v.py", "import kernels\n", "old import name"),
        ("zimage_bench/u.py", "from bench.common import x\n", "old import name"),
        ("zimage_core/service/infer.py", "from ..server.protocol import ApiError\n", "nothing below the server"),
        ("zimage_core/pipeline.py", "def serve():\n    from .server import app\n", "nothing below the server"),
        ("zimage_core/server/app.py", "from ..errors import RequestError\n", "only through"),
        ("zimage_core/server/progress.py", "def f():\n    from ..pipeline import X\n", "only through"),
        ("zimage_core/server/app.py", "from ..service import infer\n", "only through"),
        ("zimage_core/server/app.py", "from ..service.netpolicy import call\n", "only through"),
        ("zimage_core/server/app.py", "from .. import images\n", "only through"),
    ],
)
def test_each_rule_catches_a_bad_import(tmp_path, rel, source, rule):
    for top in PACKAGES:
        (tmp_path / top).mkdir()
    path = tmp_path / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    found = violations(tmp_path)
    assert any(rule in v for v in found), found


def test_allowed_imports_pass(tmp_path):
    for top in PACKAGES:
        (tmp_path / top).mkdir()
    files = {
        "zimage_core/pipeline.py": "from .model import X\ndef infer():\n    from .service import infer\n",
        "zimage_core/service/infer.py": "from ..pipeline import ZImage\nfrom .. import images\n",
        "zimage_core/api.py": "from .service import infer\n",
        "zimage_core/cli.py": "def serve():\n    from .server.app import serve\n",
        "zimage_core/server/app.py": "from ..service import engine\nfrom ..service.engine import RequestError\n"
        "from .protocol import ApiError\n",
        "zimage_bench/x.py": "import zimage_core\nimport zimage_kernels\nfrom zimage_bench import common\n",
        "zimage_kernels/a.py": "from . import reference\nfrom .backend import Ops\n",
        "zimage_core/cache/s.py": "from ..hooks import StackHook\nfrom .policy import decide\nimport zimage_kernels\n",
    }
    for rel, source in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(source)
    assert violations(tmp_path) == []
