"""The shape table: image sizes, number of results, and the sampling preset (base with CFG, or turbo).

A shape is written ``WIDTHxHEIGHT/bN/PRESETSTEPS``, e.g. ``1024x768/b4/base50``:

- ``bN``: ``numberResults`` N. Our pipeline runs the results one after another (each result reproduces alone from
  its own seed); diffusers batches them (``num_images_per_prompt``). Both produce the same N images.
- ``base``: the base model's preset (CFGScale 5 with CFG normalization) at Z-Image's scheduler shift 6; ``turbo``:
  CFGScale 1 (no CFG, one forward per step) at Z-Image-Turbo's shift 3. Steps and CFG come from
  ``zimage_core.pipeline.MODEL_PRESETS``; the shift is the one each released checkpoint's scheduler config carries.

Named tables: ``cpu`` (small sizes for the embedded small model on 2 cores), ``gpu`` (the default on a GPU),
``full`` (every resolution × batch × preset: long), ``test`` (tiny, for the harness's own tests).
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass

from zimage_core.pipeline import MODEL_PRESETS

PRESETS = {"base": MODEL_PRESETS["runware:z-image@0"], "turbo": MODEL_PRESETS["z-image-turbo"]}
CHECKPOINT_SHIFT = {"base": 6.0, "turbo": 3.0}  # scheduler_config.json of Tongyi-MAI/Z-Image and Z-Image-Turbo
_SPEC = re.compile(r"^(\d+)x(\d+)/b(\d+)/([a-z]+)(\d+)$")


@dataclass(frozen=True)
class Shape:
    width: int
    height: int
    batch: int  # numberResults
    preset: str  # "base" | "turbo"
    steps: int

    def __post_init__(self):
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r} in a shape; known: {sorted(PRESETS)}")
        if min(self.width, self.height, self.batch, self.steps) < 1:
            raise ValueError(f"shape {self.name}: sizes, batch and steps must be positive")

    @property
    def name(self) -> str:
        return f"{self.width}x{self.height}/b{self.batch}/{self.preset}{self.steps}"

    @property
    def cfg_scale(self) -> float:
        """Standard CFG scale (our API's CFGScale); diffusers' guidance_scale is this − 1."""
        return PRESETS[self.preset].cfg_scale

    @property
    def cfg(self) -> bool:
        return self.cfg_scale > 1

    @property
    def shift(self) -> float:
        return CHECKPOINT_SHIFT[self.preset]

    @property
    def cfg_normalization(self) -> float:
        return PRESETS[self.preset].cfg_normalization

    @property
    def pixels(self) -> int:
        return self.width * self.height

    def describe(self) -> dict:
        return {
            "case": self.name,
            "width": self.width,
            "height": self.height,
            "batch": self.batch,
            "preset": self.preset,
            "steps": self.steps,
            "cfg_scale": self.cfg_scale,
            "shift": self.shift,
            "cfg_normalization": self.cfg_normalization,
        }

    @classmethod
    def parse(cls, text: str) -> Shape:
        m = _SPEC.match(text.strip())
        if not m:
            raise ValueError(f"bad shape {text!r}: expected WIDTHxHEIGHT/bN/PRESETSTEPS, e.g. 1024x768/b4/base50")
        w, h, b, preset, steps = m.groups()
        return cls(int(w), int(h), int(b), preset, int(steps))


def _table(*specs: str) -> tuple[Shape, ...]:
    return tuple(Shape.parse(s) for s in specs)


RESOLUTIONS = ((512, 512), (1024, 1024), (1024, 768), (2048, 2048))
BATCHES = (1, 4)
SCHEDULES = (("base", 30), ("base", 50), ("turbo", 8))

TABLES: dict[str, tuple[Shape, ...]] = {
    # Embedded small model on 2 CPU cores: every throughput config finishes in about a minute per shape.
    "cpu": _table("128x128/b1/turbo8", "128x128/b1/base30", "256x256/b1/turbo8", "256x192/b4/turbo8"),
    # GPU default: every resolution at turbo 8 / batch 1 (latency by resolution), base 30 and 50 with CFG at 1024²,
    # and batch 4 at 1024² (turbo) and 512² (base).
    "gpu": _table(
        "512x512/b1/turbo8",
        "1024x768/b1/turbo8",
        "1024x1024/b1/turbo8",
        "2048x2048/b1/turbo8",
        "1024x1024/b1/base30",
        "1024x1024/b1/base50",
        "1024x1024/b4/turbo8",
        "512x512/b4/base30",
    ),
    "full": tuple(Shape(w, h, b, p, s) for (w, h), b, (p, s) in itertools.product(RESOLUTIONS, BATCHES, SCHEDULES)),
    "test": _table("64x64/b1/turbo2", "64x64/b2/base2"),
}


def resolve(spec: str | None, device_type: str) -> list[Shape]:
    """Comma-separated table names and/or shape specs; None picks ``gpu`` on CUDA, else ``cpu``."""
    spec = spec or ("gpu" if device_type == "cuda" else "cpu")
    shapes: list[Shape] = []
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        for s in TABLES[part] if part in TABLES else (Shape.parse(part),):
            if s not in shapes:
                shapes.append(s)
    return shapes
