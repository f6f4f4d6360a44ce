"""Rows, tables and plots.

One row schema for every command (FlashInfer's rule): a flat dict with ``schema``, ``command``, ``status``
(``ok`` / ``parity_failed`` / ``skipped`` / ``error``), the case (shape fields), ``config``, the parity figures, the
timing figures where measured, telemetry, a ``repro`` command line and the full environment under ``env``. Rows are
written as JSON lines; non-finite floats are written as the strings ``"inf"``, ``"-inf"``, ``"nan"`` so every line is
strict JSON (``float(x)`` reads them back).
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable, Iterable
from pathlib import Path

from .timing import fmt

SCHEMA = 1


def jsonable(obj):
    """A strict-JSON copy: non-finite floats as strings, dataclasses as dicts, tensors as lists, tuples as lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else ("nan" if math.isnan(obj) else ("inf" if obj > 0 else "-inf"))
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return jsonable(dataclasses.asdict(obj))
    if hasattr(obj, "tolist"):
        return jsonable(obj.tolist())
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    return str(obj)


def as_float(x) -> float | None:
    """Read back a number written by :func:`jsonable` (``"inf"`` -> inf)."""
    if x is None:
        return None
    return float(x)


def write_jsonl(path: str | Path, rows: Iterable[dict], append: bool = False) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a" if append else "w") as f:
        for r in rows:
            f.write(json.dumps(jsonable(r), allow_nan=False) + "\n")
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def get(row: dict, dotted: str, default=None):
    """``get(row, "e2e_ms.median")``."""
    cur = row
    for part in dotted.split("."):
        if not isinstance(cur, dict) or part not in cur:
            return default
        cur = cur[part]
    return cur


def num(row: dict, dotted: str, digits: int = 3) -> str:
    v = get(row, dotted)
    return "–" if v is None else fmt(as_float(v), digits)


def stat(row: dict, key: str) -> str:
    """``median [min–max]`` of a Stats dict stored under ``key``."""
    s = get(row, key)
    if not s:
        return "–"
    return f"{fmt(s['median'])} [{fmt(s['min'])}–{fmt(s['max'])}]"


def markdown(rows: list[dict], columns: list[tuple[str, Callable[[dict], str]]]) -> str:
    head = "| " + " | ".join(h for h, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(str(f(r)).replace("|", "\\|") for _, f in columns) + " |" for r in rows]
    return "\n".join([head, sep, *body])


def psnr_text(row: dict) -> str:
    v = get(row, "psnr_db")
    if v is None:
        return "–"
    v = as_float(v)
    return "identical" if math.isinf(v) else f"{v:.1f}"


# ---------------------------------------------------------------------------------------------------------------
# Plots (matplotlib, headless); skipped with a message when matplotlib is missing
# ---------------------------------------------------------------------------------------------------------------


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(fig, path: str | Path) -> Path:
    """Lay out, write (PNG, 110 dpi, parent folders created) and close ``fig``; returns the path."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_latency_by_resolution(rows: list[dict], path: str | Path, title: str = "") -> Path | None:
    """End-to-end latency (median, min–max bars) against megapixels, one line per configuration, one panel per
    (batch, preset+steps)."""
    plt = _pyplot()
    ok = [r for r in rows if r.get("status") == "ok" and get(r, "e2e_ms.median") is not None]
    if plt is None or not ok:
        return None
    panels = sorted({(r["batch"], r["preset"], r["steps"]) for r in ok})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (b, preset, steps) in zip(axes[0], panels):
        sel = [r for r in ok if (r["batch"], r["preset"], r["steps"]) == (b, preset, steps)]
        for config in sorted({r["config"] for r in sel}):
            pts = sorted((r["width"] * r["height"] / 1e6, r) for r in sel if r["config"] == config)
            xs = [p for p, _ in pts]
            med = [get(r, "e2e_ms.median") for _, r in pts]
            lo = [m - get(r, "e2e_ms.min") for m, (_, r) in zip(med, pts)]
            hi = [get(r, "e2e_ms.max") - m for m, (_, r) in zip(med, pts)]
            ax.errorbar(xs, med, yerr=[lo, hi], marker="o", capsize=3, label=config)
        ticks = sorted({(r["width"] * r["height"] / 1e6, f"{r['width']}×{r['height']}") for r in sel})
        ax.set_xticks([t for t, _ in ticks], [label for _, label in ticks], rotation=30, fontsize=8)
        ax.set_xlabel("resolution (x axis in megapixels)")
        ax.set_ylabel("end-to-end latency per request (ms)")
        ax.set_title(f"batch {b}, {preset} {steps} steps")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=8)
    return save_figure(fig, path)


def plot_speed_vs_quality(rows: list[dict], path: str | Path, title: str = "") -> Path | None:
    """Speed-up over diffusers eager (same case, same run) against decoded-image PSNR; identical outputs are drawn
    at the top edge and marked as such."""
    plt = _pyplot()
    ok = [
        r
        for r in rows
        if r.get("status") == "ok" and get(r, "speedup") is not None and r["config"] != r.get("reference")
    ]
    if plt is None or not ok:
        return None
    finite = [
        as_float(r["psnr_db"]) for r in ok if r.get("psnr_db") is not None and math.isfinite(as_float(r["psnr_db"]))
    ]
    top = (max(finite) if finite else 60.0) + 10.0
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for config in sorted({r["config"] for r in ok}):
        sel = [r for r in ok if r["config"] == config and r.get("psnr_db") is not None]
        xs = [as_float(r["speedup"]) for r in sel]
        ys = [min(as_float(r["psnr_db"]), top) for r in sel]
        ax.scatter(xs, ys, label=config, alpha=0.8)
    ax.scatter([1.0], [top], marker="*", s=120, color="black", label="diffusers eager (reference)")
    ax.axhline(top, color="grey", lw=0.5, ls="--")
    ax.text(ax.get_xlim()[0], top, " identical to the reference", va="bottom", fontsize=7, color="grey")
    ax.axvline(1.0, color="grey", lw=0.5)
    ax.set_xlabel("speed-up over diffusers eager (end-to-end, same case and run)")
    ax.set_ylabel("decoded-image PSNR vs diffusers eager (dB)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=7)
    return save_figure(fig, path)
