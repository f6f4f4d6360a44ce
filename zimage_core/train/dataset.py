"""The procedural, captioned dataset of the embedded default model: one flat shape on a flat background.

A scene is (size, colour, shape, position, background colour); its caption reads
``"a small red circle in the top left on a blue background"``. Images are rendered in code (4× supersampled, so
edges are anti-aliased) with a little jitter in position and size, so a caption names a small family of images.

Vocabulary: :data:`SIZES` × :data:`COLORS` × :data:`SHAPES` × :data:`POSITIONS` × background (any other colour):
2 · 6 · 3 · 9 · 5 = 1620 captions. The held-out split (:func:`split`) removes whole (colour, shape, background)
triples from training, in every size and position, so a held-out caption's combination of colour, shape and
background never appears in training; each colour, shape, background, size and position on its own does.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# Colour names and their RGB values, chosen far apart (pairwise RGB distance >= 150).
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle")
# Object extent in pixels at 128x128 (the diameter, the side, or the triangle's base and height).
SIZES: dict[str, int] = {"small": 32, "large": 48}
# A 3x3 grid: the row word (top / middle / bottom) then the column word (left / center / right). Every position is
# two words, so every caption has the same length and each attribute word sits at a fixed index.
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "center", "right")
POSITIONS: dict[str, tuple[int, int]] = {f"{r} {c}": (i, j) for i, r in enumerate(ROWS) for j, c in enumerate(COLUMNS)}
# Centres of the grid's rows and columns as fractions of the height and width (27, 64 and 101 px at 128): inset
# from the thirds' centres so that a large object in a corner stays inside the image.
GRID_CENTERS = (27 / 128, 0.5, 101 / 128)
POSITION_JITTER = 2  # pixels (at 128x128), uniform in [-2, 2] on each axis
SIZE_JITTER = 2  # pixels, uniform in [-2, 2]
SUPERSAMPLE = 4

# Every word a caption uses (the tokenizer makes each one a single token).
WORDS = sorted(
    {"a", "in", "the", "on", "background"}
    | set(COLORS)
    | set(SHAPES)
    | set(SIZES)
    | {w for p in POSITIONS for w in p.split()}
)


@dataclass(frozen=True, order=True)
class Scene:
    size: str
    color: str
    shape: str
    position: str
    background: str

    def __post_init__(self):
        if self.size not in SIZES or self.shape not in SHAPES or self.position not in POSITIONS:
            raise ValueError(f"not in the vocabulary: {self}")
        if self.color not in COLORS or self.background not in COLORS or self.color == self.background:
            raise ValueError(f"colours must be two different names from {sorted(COLORS)}: {self}")

    @property
    def caption(self) -> str:
        return f"a {self.size} {self.color} {self.shape} in the {self.position} on a {self.background} background"

    @property
    def triple(self) -> tuple[str, str, str]:
        return (self.color, self.shape, self.background)

    @classmethod
    def from_caption(cls, caption: str) -> Scene:
        """Parse a caption of the dataset's grammar (the inverse of :attr:`caption`)."""
        words = caption.strip().split()
        try:
            if words[0] != "a" or words[4:6] != ["in", "the"] or words[-3:-2] != ["a"] or words[-1] != "background":
                raise ValueError
            if words[-4] != "on":
                raise ValueError
            return cls(words[1], words[2], words[3], " ".join(words[6:-4]), words[-2])
        except (IndexError, ValueError):
            raise ValueError(f"not a caption of the dataset's grammar: {caption!r}") from None


def all_scenes() -> list[Scene]:
    return [
        Scene(s, c, sh, p, bg)
        for s, c, sh, p, bg in itertools.product(SIZES, COLORS, SHAPES, POSITIONS, COLORS)
        if c != bg
    ]


def all_triples() -> list[tuple[str, str, str]]:
    return [(c, sh, bg) for c, sh, bg in itertools.product(COLORS, SHAPES, COLORS) if c != bg]


def heldout_triples(seed: int = 0, n: int = 9) -> list[tuple[str, str, str]]:
    """``n`` (colour, shape, background) triples held out of training: 3 per shape, 9 distinct (colour, background)
    pairs, so every colour, shape and background still appears in training in other combinations."""
    rng = random.Random(seed)
    pairs = [(c, bg) for c, bg in itertools.product(COLORS, COLORS) if c != bg]
    rng.shuffle(pairs)
    per_shape = -(-n // len(SHAPES))
    chosen = []
    for i, shape in enumerate(SHAPES):
        for c, bg in pairs[i * per_shape : (i + 1) * per_shape]:
            chosen.append((c, shape, bg))
    return sorted(chosen[:n])


def split(seed: int = 0) -> tuple[list[Scene], list[Scene]]:
    """(train scenes, held-out scenes): disjoint, together all 1620 captions."""
    held = set(heldout_triples(seed))
    scenes = all_scenes()
    return [s for s in scenes if s.triple not in held], [s for s in scenes if s.triple in held]


def eval_prompts(seed: int = 0, n: int = 48, heldout: bool = True, split_seed: int = 0) -> list[tuple[Scene, int]]:
    """A fixed list of (scene, generation seed): ``n`` scenes drawn without replacement from the held-out (or the
    training) captions, each with its own seed."""
    train, held = split(split_seed)
    pool = held if heldout else train
    rng = random.Random(1000 + seed)
    scenes = rng.sample(pool, n)
    return [(s, 10_000 * (seed + 1) + i) for i, s in enumerate(scenes)]


# ---------------------------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------------------------


def layout(scene: Scene, width: int = 128, height: int = 128, rng: random.Random | None = None):
    """(cx, cy, extent) in pixels: the object's centre and extent, jittered when ``rng`` is given."""
    row, col = POSITIONS[scene.position]
    s = min(width, height) / 128
    extent = SIZES[scene.size] * s
    cx, cy = GRID_CENTERS[col] * width, GRID_CENTERS[row] * height
    if rng is not None:
        cx += rng.uniform(-POSITION_JITTER, POSITION_JITTER) * s
        cy += rng.uniform(-POSITION_JITTER, POSITION_JITTER) * s
        extent += rng.uniform(-SIZE_JITTER, SIZE_JITTER) * s
    return cx, cy, extent


def render(scene: Scene, width: int = 128, height: int = 128, rng: random.Random | None = None) -> np.ndarray:
    """uint8 [height, width, 3]. Without ``rng`` the scene is drawn exactly centred at its nominal size."""
    cx, cy, extent = layout(scene, width, height, rng)
    k = SUPERSAMPLE
    im = Image.new("RGB", (width * k, height * k), COLORS[scene.background])
    draw = ImageDraw.Draw(im)
    fill = COLORS[scene.color]
    x0, y0, x1, y1 = (cx - extent / 2) * k, (cy - extent / 2) * k, (cx + extent / 2) * k, (cy + extent / 2) * k
    if scene.shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif scene.shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    else:  # an upright isosceles triangle: apex at the top centre, base at the bottom
        draw.polygon([(cx * k, y0), (x1, y1), (x0, y1)], fill=fill)
    return np.asarray(im.resize((width, height), Image.BOX))


def render_batch(scenes, rng: random.Random, width: int = 128, height: int = 128) -> np.ndarray:
    """uint8 [N, height, width, 3], each scene jittered from ``rng``."""
    return np.stack([render(s, width, height, rng) for s in scenes])
