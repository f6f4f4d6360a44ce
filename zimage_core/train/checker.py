"""Reads a generated image back into a scene by image analysis (no learned model): background colour, and the
colour, shape, position and size of the foreground object.

1. Background: the palette colour that most pixels of a 3-pixel border frame are closest to; its measured RGB is
   the median of those border pixels.
2. Foreground: pixels farther than :data:`FG_DISTANCE` (RGB, 0-255) from the measured background; the largest
   8-connected component is the object. Fewer than :data:`MIN_AREA` pixels (scaled to the image size) is "no
   object" and the reading fails.
3. Colour: the palette colour nearest to the median RGB of the object's inner half (its pixels farthest from the
   background), so that a soft edge's blend does not pull it towards a third colour. The object's outline is then
   redrawn where a pixel is at least half-way from the background colour to the object's (the true edge of an
   anti-aliased or blurred shape), and steps 4-6 use that outline.
4. Position: the object's centroid, in thirds of the width and height (the dataset's 3×3 grid).
5. Shape: the ideal circle, square and upright triangle inscribed in the object's bounding box, each compared with
   the object mask by intersection over union; the best one wins.
6. Size: the larger side of the bounding box against the midpoint of the two nominal sizes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image
from scipy import ndimage

from .dataset import COLORS, POSITIONS, SIZES, Scene

FG_DISTANCE = 75.0
MIN_AREA = 40  # at 128x128
BORDER = 3
EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity

_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[n] for n in _NAMES], dtype=np.float32)  # [K, 3]
_GRID = {rc: name for name, rc in POSITIONS.items()}
ATTRIBUTES = ("color", "shape", "position", "background")  # what "agrees" checks by default


@dataclass(frozen=True)
class Reading:
    background: str
    color: str | None = None
    shape: str | None = None
    position: str | None = None
    size: str | None = None
    area: int = 0
    scores: dict | None = None  # shape IoUs

    def agrees(self, scene: Scene, attributes=ATTRIBUTES) -> bool:
        return all(getattr(self, a) == getattr(scene, a) for a in attributes)

    def mismatches(self, scene: Scene, attributes=(*ATTRIBUTES, "size")) -> list[str]:
        return [
            f"{a}: {getattr(self, a)} != {getattr(scene, a)}"
            for a in attributes
            if getattr(self, a) != getattr(scene, a)
        ]


def _nearest(rgb: np.ndarray) -> np.ndarray:
    """Palette index nearest to each RGB row ([..., 3] -> [...])."""
    d = ((rgb[..., None, :] - _PALETTE) ** 2).sum(-1)
    return d.argmin(-1)


def _shape_masks(h: int, w: int) -> dict[str, np.ndarray]:
    """Ideal masks filling an h×w box, sampled at pixel centres."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    yy, xx = (yy + 0.5) / h, (xx + 0.5) / w  # (0, 1)
    circle = (xx - 0.5) ** 2 + (yy - 0.5) ** 2 <= 0.25
    triangle = np.abs(xx - 0.5) <= yy / 2  # apex at the top centre, base along the bottom
    return {"circle": circle, "square": np.ones((h, w), dtype=bool), "triangle": triangle}


def read_image(image) -> Reading:
    """Analyse a PIL image or a uint8/float [H, W, 3] array (0-255)."""
    if isinstance(image, Image.Image):
        image = np.asarray(image.convert("RGB"))
    arr = np.asarray(image, dtype=np.float32)
    h, w = arr.shape[:2]
    frame = np.concatenate(
        [
            arr[:BORDER].reshape(-1, 3),
            arr[-BORDER:].reshape(-1, 3),
            arr[:, :BORDER].reshape(-1, 3),
            arr[:, -BORDER:].reshape(-1, 3),
        ]
    )
    idx = _nearest(frame)
    bg_i = int(np.bincount(idx, minlength=len(_NAMES)).argmax())
    bg_rgb = np.median(frame[idx == bg_i], axis=0)
    background = _NAMES[bg_i]

    dist = np.sqrt(((arr - bg_rgb) ** 2).sum(-1))
    labels, n = ndimage.label(dist > FG_DISTANCE, structure=EIGHT)
    if n == 0:
        return Reading(background)
    areas = np.bincount(labels.ravel())[1:]
    k = int(areas.argmax()) + 1
    area = int(areas[k - 1])
    if area < MIN_AREA * (h * w) / (128 * 128):
        return Reading(background, area=area)
    blob = labels == k
    # The object's colour: the median of its inner half (the pixels farthest from the background), so that the
    # blend at a soft edge does not pull it towards a third colour.
    d = dist[blob]
    fg_rgb = np.median(arr[blob][d >= np.median(d)], axis=0)
    color = _NAMES[int(_nearest(fg_rgb))]
    # The object's outline: where a pixel is at least half-way from the background colour to the object's.
    axis = fg_rgb - bg_rgb
    frac = ((arr - bg_rgb) @ axis) / max(float(axis @ axis), 1e-6)
    labels, _ = ndimage.label(frac > 0.5, structure=EIGHT)
    ids = np.bincount(labels[blob], minlength=labels.max() + 1)
    ids[0] = 0
    mask = labels == int(ids.argmax()) if ids.max() > 0 else blob
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean() + 0.5, xs.mean() + 0.5
    row, col = min(int(3 * cy / h), 2), min(int(3 * cx / w), 2)
    position = _GRID[(row, col)]

    y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
    box = mask[y0:y1, x0:x1]
    scores = {}
    for name, ideal in _shape_masks(y1 - y0, x1 - x0).items():
        scores[name] = float((box & ideal).sum() / (box | ideal).sum())
    shape = max(scores, key=scores.get)
    extent = max(y1 - y0, x1 - x0) * 128 / min(h, w)
    size = "small" if extent < sum(SIZES.values()) / 2 else "large"
    return Reading(background, color, shape, position, size, area, scores)


def agreement(images, scenes, attributes=ATTRIBUTES) -> float:
    """Fraction of images whose reading agrees with their scene."""
    ok = [read_image(im).agrees(s, attributes) for im, s in zip(images, scenes)]
    return sum(ok) / len(ok)
