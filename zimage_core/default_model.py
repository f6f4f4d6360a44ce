"""The embedded default model: what ``zimage generate`` runs when no ``--model`` is given.

The package ships a small model of the Z-Image architecture trained on a procedural shapes dataset
(``zimage_core/assets/default/``, see docs/default-model.md); that is the default. If the folder is missing (a
stripped install), a small *random-weight* pipeline is built deterministically (seed 0) into the user's cache on
first use instead; it exercises every code path but draws noise-like images.
"""

from __future__ import annotations

import os
from pathlib import Path

from .components import build_random_pipeline

ASSET_DIR = Path(__file__).resolve().parent / "assets" / "default"
RANDOM_VERSION = "random-v1"


def cache_dir() -> Path:
    base = os.environ.get("ZIMAGE_CACHE") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "zimage-fast")
    return Path(base).expanduser()


def default_model_path() -> Path:
    if (ASSET_DIR / "model_index.json").exists():
        return ASSET_DIR
    folder = cache_dir() / RANDOM_VERSION
    if not (folder / "model_index.json").exists():
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        build_random_pipeline(tmp, seed=0)
        tmp.replace(folder) if not folder.exists() else None
    return folder
