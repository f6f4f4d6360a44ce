"""Structure metrics of the source tree, read with ``ast`` (nothing is imported): a newcomer's view of the house.

    python scripts/structure.py [ROOT] [--json]

Prints, for the packages ``zimage_kernels``, ``zimage_core`` and ``zimage_bench``:

- module counts: ``.py`` files per package and per sub-package;
- the top-level modules of ``zimage_core`` (files directly in it, ``__init__``/``__main__`` included in the count);
- the 10 longest functions (methods included; lines from ``def`` to the last line of the body, decorators excluded);
- import cycles between modules, as strongly connected components of the import graph, twice:
  *module level*: imports run when the module is imported (top-level statements, including those under ``try``/``if``
  at top level, but not those under ``if TYPE_CHECKING:``, which never run); *all imports*: function-level imports
  (run when the function is called) and ``TYPE_CHECKING`` imports added. A cycle that appears only in the second
  graph is a deferred import, not a circle at import time.

How an import becomes edges: ``import a.b`` and ``from a.b import x`` give an edge to module ``a.b``; when ``a.b.x``
is itself a module of the tree, an edge to ``a.b.x`` too, and when every name imported is a module
(``from . import nosync``) the edge goes to those modules only (the package is just their namespace). The parent
packages that Python also initialises (``a`` for ``import a.b``) are not counted: every module would otherwise sit
in a cycle with its package's ``__init__``. Only modules of the tree count; third-party imports are ignored.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from dataclasses import dataclass
from pathlib import Path

PACKAGES = ("zimage_kernels", "zimage_core", "zimage_bench")
ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Import:
    target: str  # absolute module imported
    function: str | None  # enclosing function, None at module level
    type_checking: bool  # under ``if TYPE_CHECKING:``

    @property
    def module_level(self) -> bool:
        return self.function is None and not self.type_checking


def module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def source_files(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, Path]:
    """Module name -> path (relative to root) for every ``.py`` file of the packages."""
    found = {}
    for top in packages:
        for path in sorted((root / top).rglob("*.py")):
            rel = path.relative_to(root)
            found[module_name(rel)] = rel
    return found


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def raw_imports(root: Path, rel: Path) -> list[tuple[str, list[str], str | None, bool]]:
    """(absolute module, names imported from it, enclosing function, under TYPE_CHECKING) for each import."""
    tree = ast.parse((root / rel).read_text(encoding="utf-8"), filename=str(rel))
    package = module_name(rel).split(".")
    if rel.name != "__init__.py":
        package = package[:-1]
    found: list[tuple[str, list[str], str | None, bool]] = []

    def visit(node: ast.AST, func: str | None, tc: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.Import):
                found.extend((a.name, [], func, tc) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package[: len(package) - (child.level - 1)]
                    mod = ".".join(base + ([child.module] if child.module else []))
                else:
                    mod = child.module or ""
                found.append((mod, [a.name for a in child.names], func, tc))
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, child.name if func is None else f"{func}.{child.name}", tc)
            elif isinstance(child, ast.If) and _is_type_checking(child.test):
                # the body never runs; the else branch (rare) does
                visit(ast.Module(body=child.body, type_ignores=[]), func, True)
                visit(ast.Module(body=child.orelse, type_ignores=[]), func, tc)
            else:
                visit(child, func, tc)

    visit(tree, None, False)
    return found


def import_graph(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, list[Import]]:
    """Module -> its imports of other modules of the tree (see the module docstring for the edge rule)."""
    modules = source_files(root, packages)
    graph: dict[str, list[Import]] = {}
    for name, rel in modules.items():
        edges = []
        for mod, names, func, tc in raw_imports(root, rel):
            subs = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in modules]
            # ``from pkg import sub`` names the submodule: the package only serves as its namespace
            targets = subs if names and len(subs) == len(names) else [mod] + subs
            edges.extend(Import(t, func, tc) for t in targets if t in modules and t != name)
        graph[name] = edges
    return graph


def cycles(graph: dict[str, list[Import]], module_level_only: bool = True) -> list[list[str]]:
    """Strongly connected components of more than one module (or a module importing itself), sorted."""
    adj = {
        m: sorted({e.target for e in edges if e.module_level or not module_level_only}) for m, edges in graph.items()
    }
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = 0

    def strongconnect(v: str) -> None:  # Tarjan, iterative over the recursion depth of a small tree
        nonlocal counter
        work = [(v, iter(adj.get(v, ())))]
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        while work:
            node, it = work[-1]
            advanced = False
            for w in it:
                if w not in index:
                    index[w] = low[w] = counter
                    counter += 1
                    stack.append(w)
                    on_stack.add(w)
                    work.append((w, iter(adj.get(w, ()))))
                    advanced = True
                    break
                if w in on_stack:
                    low[node] = min(low[node], index[w])
            if advanced:
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    w = stack.pop()
                    on_stack.discard(w)
                    comp.append(w)
                    if w == node:
                        break
                if len(comp) > 1 or node in adj.get(node, ()):
                    out.append(sorted(comp))

    for v in sorted(adj):
        if v not in index:
            strongconnect(v)
    return sorted(out)


def longest_functions(root: Path, n: int = 10, packages: tuple[str, ...] = PACKAGES) -> list[tuple[int, str]]:
    """(lines, 'path:line qualified.name') of the n longest functions and methods, longest first."""
    rows = []
    for _, rel in source_files(root, packages).items():
        tree = ast.parse((root / rel).read_text(encoding="utf-8"), filename=str(rel))

        def visit(node: ast.AST, prefix: str, rel: Path = rel) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    name = f"{prefix}{child.name}"
                    rows.append((child.end_lineno - child.lineno + 1, f"{rel.as_posix()}:{child.lineno} {name}"))
                    visit(child, f"{name}.")
                elif isinstance(child, ast.ClassDef):
                    visit(child, f"{prefix}{child.name}.")
                else:
                    visit(child, prefix)

        visit(tree, "")
    return sorted(rows, key=lambda r: (-r[0], r[1]))[:n]


def module_counts(root: Path, packages: tuple[str, ...] = PACKAGES) -> dict[str, int]:
    """'package' and 'package/sub' -> number of .py files below it (the package's count includes its sub-packages)."""
    counts: dict[str, int] = {}
    for top in packages:
        for path in (root / top).rglob("*.py"):
            parts = path.relative_to(root).parts
            for depth in range(1, len(parts)):
                key = "/".join(parts[:depth])
                if depth > 2:
                    break
                counts[key] = counts.get(key, 0) + 1
    return dict(sorted(counts.items()))


def top_level_modules(root: Path, package: str = "zimage_core") -> list[str]:
    return sorted(p.stem for p in (root / package).glob("*.py"))


def metrics(root: Path) -> dict:
    graph = import_graph(root)
    return {
        "module_counts": module_counts(root),
        "zimage_core_top_level": top_level_modules(root),
        "longest_functions": [{"lines": n, "where": w} for n, w in longest_functions(root)],
        "cycles_module_level": cycles(graph, module_level_only=True),
        "cycles_all_imports": cycles(graph, module_level_only=False),
    }


def render(m: dict) -> str:
    lines = ["module counts (.py files; a package's count includes its sub-packages):"]
    lines += [f"  {k:32} {v}" for k, v in m["module_counts"].items()]
    top = m["zimage_core_top_level"]
    lines.append(f"zimage_core top-level modules: {len(top)}")
    lines.append("  " + " ".join(top))
    lines.append("10 longest functions (lines):")
    lines += [f"  {r['lines']:4}  {r['where']}" for r in m["longest_functions"]]
    for key, title in (
        ("cycles_module_level", "import cycles, module-level imports"),
        ("cycles_all_imports", "import cycles, function-level and TYPE_CHECKING imports included"),
    ):
        lines.append(f"{title}: {len(m[key])}")
        lines += ["  " + " <-> ".join(c) for c in m[key]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("root", nargs="?", type=Path, default=ROOT, help="repository root (default: this checkout)")
    ap.add_argument("--json", action="store_true", help="print the metrics as JSON")
    args = ap.parse_args(argv)
    for top in PACKAGES:
        if not (args.root / top).is_dir():
            ap.error(f"root: {args.root} has no {top}/ folder (give the repository root)")
    m = metrics(args.root)
    print(json.dumps(m, indent=1) if args.json else render(m))
    return 0


if __name__ == "__main__":
    sys.exit(main())
