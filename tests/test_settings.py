"""One settings list (zimage_core/settings.py): every ZIMAGE_* variable that code names is declared there, every
declared one is read somewhere, docs/settings.md is what the module generates, and the serve options' declared
defaults are the command line's own."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from zimage_core import settings

ROOT = Path(__file__).resolve().parents[1]
SCANNED = ("zimage_core", "zimage_kernels", "zimage_bench", "scripts", "tests")
SUFFIXES = {".py", ".sh"}
NAME = re.compile(r"\bZIMAGE_[A-Z0-9_]+")
THIS = Path(__file__).resolve()  # the negative cases below write undeclared names on purpose


def named_variables(root: Path) -> dict[str, list[str]]:
    """ZIMAGE_* name -> files (relative) that name it, in code and comments of the scanned folders, plus
    CMakeLists.txt and pyproject.toml. A name in a comment counts too: it documents a variable that must exist."""
    found: dict[str, list[str]] = {}
    files = [p for top in SCANNED for p in sorted((root / top).rglob("*")) if p.suffix in SUFFIXES and p.is_file()]
    files += [root / name for name in ("CMakeLists.txt", "pyproject.toml") if (root / name).is_file()]
    for path in files:
        if path.resolve() == THIS:
            continue
        for name in set(NAME.findall(path.read_text(encoding="utf-8", errors="replace"))):
            found.setdefault(name, []).append(path.relative_to(root).as_posix())
    return found


def undeclared(root: Path) -> dict[str, list[str]]:
    return {k: v for k, v in named_variables(root).items() if k not in settings.BY_NAME}


def test_no_code_names_an_undeclared_variable():
    assert undeclared(ROOT) == {}


def test_every_declared_variable_is_read_outside_the_settings_module():
    named = named_variables(ROOT)
    unread = [n for n in settings.BY_NAME if not [f for f in named.get(n, []) if f != "zimage_core/settings.py"]]
    assert unread == []


def test_declared_read_by_files_exist_and_name_the_variable():
    for s in settings.BY_NAME.values():
        for rel in s.read_by.split(", "):
            assert (ROOT / rel).is_file(), (s.name, rel)
            assert s.name in (ROOT / rel).read_text(encoding="utf-8"), (s.name, rel)


@pytest.mark.parametrize(
    ("rel", "source"),
    [
        ("zimage_core/x.py", 'import os\nDEBUG = os.environ.get("ZIMAGE_DEBUG_NEW", "0")\n'),
        ("zimage_kernels/k.py", 'import os\nos.getenv("ZIMAGE_TILE")\n'),
        ("scripts/run.sh", 'echo "${ZIMAGE_SECRET_KNOB:-1}"\n'),
        ("tests/test_y.py", 'def test(monkeypatch):\n    monkeypatch.setenv("ZIMAGE_ONLY_IN_TESTS", "1")\n'),
    ],
)
def test_an_undeclared_variable_is_found(tmp_path, rel, source):
    for top in SCANNED:
        (tmp_path / top).mkdir()
    (tmp_path / rel).write_text(source + 'os.environ.get("ZIMAGE_KERNELS")\n')
    found = undeclared(tmp_path)
    assert list(found) == [NAME.search(source).group(0)]
    assert found[NAME.search(source).group(0)] == [rel]


def test_get_refuses_an_undeclared_name(monkeypatch):
    monkeypatch.setenv("ZIMAGE_QUEUE", "3")
    assert settings.get("ZIMAGE_QUEUE") == "3"
    monkeypatch.delenv("ZIMAGE_QUEUE")
    assert settings.get("ZIMAGE_QUEUE") is None
    with pytest.raises(KeyError, match="ZIMAGE_NOPE is not a declared setting"):
        settings.get("ZIMAGE_NOPE")


def test_docs_page_is_current():
    page = ROOT / "docs" / "settings.md"
    assert page.read_text(encoding="utf-8") == settings.markdown(), (
        "docs/settings.md is stale: python -m zimage_core.settings --write docs/settings.md"
    )
    for name in settings.BY_NAME:
        assert f"`{name}`" in page.read_text(encoding="utf-8")


def test_check_command_fails_on_a_stale_page_and_write_fixes_it(tmp_path):
    page = tmp_path / "settings.md"
    page.write_text("# old\n")
    cmd = [sys.executable, "-m", "zimage_core.settings"]
    stale = subprocess.run([*cmd, "--check", str(page)], cwd=ROOT, capture_output=True, text=True)
    assert stale.returncode == 1 and "stale" in stale.stderr
    subprocess.run([*cmd, "--write", str(page)], cwd=ROOT, check=True)
    assert subprocess.run([*cmd, "--check", str(page)], cwd=ROOT).returncode == 0


def test_serve_defaults_are_the_command_lines(monkeypatch):
    from zimage_core import cli

    for name in ("ZIMAGE_HOST", "ZIMAGE_PORT", "ZIMAGE_QUEUE", "ZIMAGE_TASK_TIMEOUT", "ZIMAGE_ALLOW_OUTBOUND"):
        monkeypatch.delenv(name, raising=False)
    args = cli.build_parser().parse_args(["serve"])
    assert args.host == settings.BY_NAME["ZIMAGE_HOST"].default
    assert args.port == int(settings.BY_NAME["ZIMAGE_PORT"].default)
    assert args.queue == int(settings.BY_NAME["ZIMAGE_QUEUE"].default)
    assert args.task_timeout == float(settings.BY_NAME["ZIMAGE_TASK_TIMEOUT"].default)
    assert args.allow_outbound is False and settings.BY_NAME["ZIMAGE_ALLOW_OUTBOUND"].default == "off"
