"""The server's libraries are the ``[serve]`` extra: the library and ``zimage generate`` run without them, and
``zimage serve`` without them says which extra to install in one line (issue 27, item 2)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]
SERVER_LIBS = ("starlette", "uvicorn", "websockets", "prometheus_client")

# A child interpreter in which the server's libraries cannot be imported (as in an install without the extra).
BLOCK = f"""
import importlib.abc, sys
class _NoServerLibs(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {SERVER_LIBS!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, _NoServerLibs())
"""


def _child(code: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-c", BLOCK + code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def test_server_libraries_are_the_serve_extra_not_core_dependencies():
    project = _project()
    names = lambda reqs: {r.split(">")[0].split("=")[0].split("[")[0].strip().lower() for r in reqs}  # noqa: E731
    core = names(project["dependencies"])
    serve = names(project["optional-dependencies"]["serve"])
    assert {"starlette", "uvicorn", "websockets", "prometheus-client"} <= serve
    assert not core & serve, core & serve
    assert any("[serve]" in r for r in project["optional-dependencies"]["dev"]), "dev must include the server"
    boot = (ROOT / "scripts" / "bootstrap.sh").read_text()
    assert 'EXTRAS="[serve]"' in boot  # the README's commands (zimage serve) work after the default bootstrap


def test_library_and_generate_run_without_the_server_libraries(tmp_path):
    out = tmp_path / "fox.png"
    code = f"""
import zimage_core, zimage_core.api, zimage_core.service, zimage_core.cli
from zimage_core.service import engine
loaded = sorted(m for m in sys.modules if m.split(".")[0] in {SERVER_LIBS!r})
assert not loaded, loaded
rc = zimage_core.cli.main(["generate", "a red fox", "--steps", "1", "--width", "64", "--height", "64",
                           "-o", {str(out)!r}, "--quiet"])
assert rc in (0, None), rc
try:
    zimage_core.cli.main(["serve", "--port", "1"])
except SystemExit as e:
    print("SERVE-EXIT:", e.code)
"""
    r = _child(code)
    assert r.returncode == 0, r.stderr[-3000:]
    assert out.exists() and out.stat().st_size > 0
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("SERVE-EXIT:"))
    msg = line.split(":", 1)[1].strip()
    assert "[serve]" in msg and "starlette" in msg and "\n" not in msg, msg
    assert "Traceback" not in r.stderr
