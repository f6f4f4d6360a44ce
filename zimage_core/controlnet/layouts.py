"""The released Z-Image ControlNet key layouts, and telling them apart by their tensor names.

A released single file carries no config: only tensors named as VideoX-Fun's ``ZImageControlTransformer2DModel``
names its control modules (diffusers' ``ZImageControlNetModel`` uses the same names). What tells the layouts apart
is which control modules exist, never the file name:

==================  =========================  ======================  ===========  ==========================
layout              control_layers (places)    control_noise_refiner   in channels  releases using it
==================  =========================  ======================  ===========  ==========================
``union-1.0``       6: 0, 5, 10, 15, 20, 25    2 plain blocks          16           Turbo Union (1.0)
``union-2.0``       15: 0, 2, 4, …, 28         2 blocks, all-zero      33           Turbo Union 2.0
                                               ``before_proj``, unused
``union-2.1``       15: 0, 2, 4, …, 28         2 control blocks        33           Turbo Union 2.1 (and its
                                                                                    8-step 2601/2602 files),
                                                                                    Tile 2.1, base Union 2.1
``union-2.1-lite``  3: 0, 10, 20               2 control blocks        33           the ``-lite`` files of the
                                                                                    2.1 family
==================  =========================  ======================  ===========  ==========================

Sources (docs/controlnet-variants.md says which fact comes from which): VideoX-Fun's ``config/z_image/
z_image_control{,_2.0,_2.1,_2.1_lite}.yaml`` (places, in channels, refiner flags), its
``ZImageControlTransformer2DModel`` (which modules exist for each flag) and diffusers 0.42.1's single-file
detection (``control_layers.14`` marks 2.x; an absent or all-zero ``control_noise_refiner.0.before_proj`` marks 2.0).

This module imports nothing of the package: it works on key names only.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

EVERY_OTHER_OF_30 = tuple(range(0, 30, 2))
# The guide kinds (``controlNet[].controlType``). Every kind but gray is the preprocessed map itself (we run no
# detector); gray is the image in luminance, which the loader makes; tile is a low-resolution image of the target.
CONTROL_TYPES = ("canny", "depth", "pose", "mlsd", "hed", "scribble", "gray", "tile")
# gray and tile were trained only into releases of the 2.1 layouts (VideoX-Fun README: the base model's Union 2.1
# lists Gray; the Tile releases are 2.1 and 2.1-lite files); the older layouts get the structural maps
STRUCTURAL = ("canny", "depth", "pose", "mlsd", "hed", "scribble")


@dataclass(frozen=True)
class Layout:
    name: str
    control_layers_places: tuple[int, ...]
    add_control_noise_refiner: (
        str | None
    )  # diffusers' flag: None (1.0), "control_layers" (2.0), "control_noise_refiner"
    control_in_dim: int
    releases: tuple[str, ...]
    control_types: tuple[str, ...] = CONTROL_TYPES

    @property
    def summary(self) -> str:
        refiner = {None: "2 plain refiner blocks", "control_layers": "no control refiner"}.get(
            self.add_control_noise_refiner, "2 control refiner blocks"
        )
        return f"{self.name} ({len(self.control_layers_places)} control layers, {refiner})"


LAYOUTS = (
    Layout("union-1.0", (0, 5, 10, 15, 20, 25), None, 16, ("Z-Image-Turbo-Fun-Controlnet-Union",), STRUCTURAL),
    Layout(
        "union-2.0", EVERY_OTHER_OF_30, "control_layers", 33, ("Z-Image-Turbo-Fun-Controlnet-Union-2.0",), STRUCTURAL
    ),
    Layout(
        "union-2.1",
        EVERY_OTHER_OF_30,
        "control_noise_refiner",
        33,
        (
            "Z-Image-Turbo-Fun-Controlnet-Union-2.1",
            "Z-Image-Turbo-Fun-Controlnet-Union-2.1-2602-8steps",
            "Z-Image-Turbo-Fun-Controlnet-Tile-2.1-2601-8steps",
            "Z-Image-Fun-Controlnet-Union-2.1",
            "Z-Image-Fun-Controlnet-Tile-2.1",
        ),
    ),
    Layout(
        "union-2.1-lite",
        (0, 10, 20),
        "control_noise_refiner",
        33,
        (
            "Z-Image-Turbo-Fun-Controlnet-Union-2.1-lite-2602-8steps",
            "Z-Image-Turbo-Fun-Controlnet-Tile-2.1-lite-2601-8steps",
            "Z-Image-Fun-Controlnet-Union-2.1-lite",
            "Z-Image-Fun-Controlnet-Tile-2.1-lite",
        ),
    ),
)
BY_NAME = {lay.name: lay for lay in LAYOUTS}
N_REFINER = 2  # every release has two refiner blocks (VideoX-Fun: n_refiner_layers of the transformer, 2)
PROJ = ("before_proj.weight", "before_proj.bias", "after_proj.weight", "after_proj.bias")
ZERO_CHECK_KEY = "control_noise_refiner.0.before_proj.weight"


def expected_keys(layout: Layout, block_keys: Iterable[str], patches: Iterable[str], with_2_0_refiner: bool) -> set:
    """The tensor names of ``layout``. ``block_keys``: one main-layer block's names (without the projections);
    ``patches``: the embedder keys ("2-1"); ``with_2_0_refiner``: a 2.0 file that still carries its unused refiner."""
    block_keys = [k for k in block_keys if k not in PROJ]
    keys = {f"control_all_x_embedder.{p}.{w}" for p in patches for w in ("weight", "bias")}
    for i in range(len(layout.control_layers_places)):
        keys |= {f"control_layers.{i}.{k}" for k in block_keys}
        keys |= {f"control_layers.{i}.{k}" for k in PROJ[2:] + (PROJ[:2] if i == 0 else ())}
    kind = layout.add_control_noise_refiner
    if kind is None or kind == "control_noise_refiner" or with_2_0_refiner:
        for i in range(N_REFINER):
            keys |= {f"control_noise_refiner.{i}.{k}" for k in block_keys}
            if kind is not None:
                keys |= {f"control_noise_refiner.{i}.{k}" for k in PROJ[2:] + (PROJ[:2] if i == 0 else ())}
    return keys


def patch_keys(keys: Iterable[str]) -> list[str]:
    return sorted({m.group(1) for k in keys if (m := re.fullmatch(r"control_all_x_embedder\.(\d+-\d+)\.weight", k))})


def detect(keys: Iterable[str], block_keys: Iterable[str], zero_before_proj: bool | None) -> tuple[Layout | None, str]:
    """(the released layout whose tensor names are exactly ``keys``, "") or (None, what is missing / extra against
    the nearest layout). ``zero_before_proj``: whether ``control_noise_refiner.0.before_proj.weight`` is all zeros
    (diffusers' rule: then the file is 2.0, whose conversion drops the refiner)."""
    keys = set(keys)
    patches = patch_keys(keys)
    if not patches:
        return None, "no control_all_x_embedder.<p>-<f>.weight: not a Z-Image ControlNet checkpoint"
    block_keys = list(block_keys)
    candidates = []
    for lay in LAYOUTS:
        variants = [False, True] if lay.add_control_noise_refiner == "control_layers" else [False]
        for with_ref in variants:
            want = expected_keys(lay, block_keys, patches, with_ref)
            candidates.append((len(want - keys) + len(keys - want), lay, want))
    exact = [lay for d, lay, _ in candidates if d == 0]
    if len(exact) > 1 or (exact and exact[0].name in ("union-2.0", "union-2.1") and ZERO_CHECK_KEY in keys):
        # 2.0 with its refiner and 2.1 have the same names: the all-zero before_proj decides (diffusers)
        exact = [BY_NAME["union-2.0" if zero_before_proj else "union-2.1"]]
    if exact:
        return exact[0], ""
    preferred = "union-2.0" if zero_before_proj else "union-2.1"  # a tie between the two: the same rule
    d, lay, want = min(candidates, key=lambda c: (c[0], c[1].name != preferred))
    missing, extra = sorted(want - keys), sorted(keys - want)
    parts = []
    for label, items in (("missing", missing), ("extra", extra)):
        if items:
            more = f" ... (+{len(items) - 8} more)" if len(items) > 8 else ""
            parts.append(f"{label} ({len(items)}): {', '.join(items[:8])}{more}")
    known = ", ".join(x.summary for x in LAYOUTS)
    return None, (
        f"the tensor names match no released ControlNet layout (known: {known}); nearest {lay.name}: "
        + "; ".join(parts)
        + "; pass config= (a diffusers ZImageControlNetModel config) for another layout"
    )


def control_types(name: str) -> tuple[str, ...]:
    """The guide kinds a layout was trained on (every kind for a custom layout)."""
    return BY_NAME[name].control_types if name in BY_NAME else CONTROL_TYPES


def name_of(places: Iterable[int], add_control_noise_refiner: str | None) -> str:
    """The released layout with these places and refiner flag, or "custom"."""
    places = tuple(places)
    for lay in LAYOUTS:
        if lay.control_layers_places == places and lay.add_control_noise_refiner == add_control_noise_refiner:
            return lay.name
    return "custom"
