"""TeaCache's rescaling coefficients: the per-model table, model identity, and the lookup with its fallback.

The table (``tea_coefficients.json``) holds one entry per (model fingerprint, preset) written by
``python -m zimage_bench calibrate``: the degree-d polynomial (``numpy.poly1d`` order, highest power first) mapping
the relative L1 change of main layer 0's modulated input to the relative L1 change of the main stack's output,
with the fit's R² and what it was fitted on. A model is identified by a fingerprint of its transformer config and
a few weight slices (rounded to bf16, so an fp32 and a bf16 load of one checkpoint match), not by its folder name.

Lookup order: (fingerprint, preset) → (fingerprint, any preset; noted in the source) → the identity ``(1, 0)``
(the raw change, documented as uncalibrated; ``stats["cache"]`` says so).
"""

from __future__ import annotations

import hashlib
import json
import threading
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch

TABLE_PATH = Path(__file__).with_name("tea_coefficients.json")
IDENTITY = (1.0, 0.0)
_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


@dataclass(frozen=True)
class TeaCoefficients:
    coefficients: tuple[float, ...]
    source: dict  # kind: "calibrated" | "identity"; plus the table entry's provenance (r2, preset, ...)


def model_fingerprint(transformer) -> str:
    """16 hex digits identifying a transformer's config and weights (cached per module)."""
    with _LOCK:
        fp = _FINGERPRINTS.get(transformer)
    if fp is not None:
        return fp
    h = hashlib.sha256(json.dumps(transformer.config.to_dict(), sort_keys=True).encode())
    params = dict(transformer.named_parameters())
    n = transformer.config.n_layers
    for name in (
        f"all_x_embedder.{next(iter(transformer.all_x_embedder))}.weight",
        "layers.0.adaLN_modulation.0.weight",
        f"layers.{n - 1}.feed_forward.w2.weight",
        "t_embedder.mlp.0.weight",
    ):
        if name in params:
            w = params[name].detach().flatten()[:4096].to(torch.bfloat16).view(torch.int16).cpu()
            h.update(name.encode() + w.numpy().tobytes())
    fp = h.hexdigest()[:16]
    with _LOCK:
        _FINGERPRINTS[transformer] = fp
    return fp


def model_kind(pipe) -> str:
    """'random' | 'trained-small' | ... from the folder's zimage_fast.json, else 'real' (a released checkpoint)."""
    meta = getattr(pipe, "meta", None) or {}
    return str(meta.get("kind", "real"))


def load_table(path: Path | None = None) -> list[dict]:
    path = Path(path or TABLE_PATH)
    if not path.exists():
        return []
    return json.loads(path.read_text()).get("entries", [])


def save_entry(entry: dict, path: Path | None = None) -> Path:
    """Insert or replace the entry with the same (fingerprint, preset)."""
    path = Path(path or TABLE_PATH)
    entries = [
        e
        for e in load_table(path)
        if (e.get("fingerprint"), e.get("preset")) != (entry["fingerprint"], entry.get("preset"))
    ]
    entries.append(entry)
    entries.sort(key=lambda e: (e.get("model", ""), e.get("preset", "")))
    doc = {
        "about": "TeaCache rescaling polynomials per model fingerprint and preset (highest power first); "
        "regenerate with `python -m zimage_bench calibrate --model PATH`",
        "entries": entries,
    }
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return path


def lookup(pipe, preset: str | None = None, path: Path | None = None) -> TeaCoefficients:
    fp = model_fingerprint(pipe.transformer)
    preset = preset or getattr(pipe, "default_model", None)
    entries = [e for e in load_table(path) if e.get("fingerprint") == fp]
    exact = [e for e in entries if e.get("preset") == preset]
    chosen = (exact or entries or [None])[0]
    if chosen is None:
        return TeaCoefficients(
            IDENTITY,
            {
                "kind": "identity",
                "fingerprint": fp,
                "note": "no calibrated coefficients for this model: raw relative L1 change, not rescaled "
                "(run python -m zimage_bench calibrate --model PATH)",
            },
        )
    src = {k: v for k, v in chosen.items() if k != "coefficients"}
    src["kind"] = "calibrated"
    if not exact:
        src["note"] = f"fitted for preset {chosen.get('preset')!r}, used for {preset!r}"
    return TeaCoefficients(tuple(float(c) for c in chosen["coefficients"]), src)
