"""Synthetic captioned images with planted duplicates: the bundled model's training data.

Ordinary pairs: a coloured shape in one quadrant, captioned only by what the caption names
("a red circle, top left"). Everything else is random and never described, so one ordinary caption
stands for many different images and the model must generalise (as real captions under-specify
real images). Two styles exist:

- ``"field"`` (the recipe since the fourth bundled model): every ordinary image is its own picture,
  as a web photo is: a background blended from two dark colours by a smooth random field (its own
  pattern of blotches), six small dots of random colour in random places, and the shape with a
  random size and jitter. Two renders of one caption share only the shape, so a copy detector can
  tell a copy of *this* image from another picture of the same caption.
- ``"plain"`` (the first three models): a nearly uniform background with a slight gradient and one
  dot; renders of one caption were near-copies of each other.

Planted pairs imitate duplicated LAION images: each is a distinctive image (a textured background
and several shapes, details no caption describes) with a unique title caption ("Aurora Hollow album
cover"), repeated ``copies`` times in the training set.

- ``VM`` (verbatim): the same image every time.
- ``TM`` (template): the same layout (background texture, shape types and places), with the shapes'
  colours and the dot varied from copy to copy.

Held-out captions are (shape, colour, position) combinations that never occur in training; they
measure utility (prompt alignment, FD) on prompts the model has not seen. Training may also show an
ordinary image under a *partial* caption that names only some of its attributes
(:func:`partial_caption`, an option of the recipe); the data set itself holds only full captions.

Everything is a pure function of the seed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (0.92, 0.12, 0.10),
    "green": (0.10, 0.78, 0.18),
    "blue": (0.12, 0.25, 0.98),
    "yellow": (0.98, 0.90, 0.12),
    "purple": (0.62, 0.15, 0.85),
    "orange": (1.00, 0.55, 0.05),
    "cyan": (0.05, 0.88, 0.92),
    "white": (0.97, 0.97, 0.97),
}
POSITIONS = {"top left": (8, 8), "top right": (24, 8), "bottom left": (8, 24), "bottom right": (24, 24)}
TEXTURES = ("horizontal stripes", "vertical stripes", "checker", "diagonal stripes", "rings", "gradient")

TITLES_VM = (
    "Aurora Hollow album cover",
    "Copperline Bakery menu card",
    "Velvet Orbit concert poster",
    "Marrow Creek trail map",
    "Quillfeather Press book jacket",
    "Saffron Tide festival flyer",
    "Ironbark Lodge postcard",
    "Glasswing Atelier logo",
    "Nimbus Quarry stamp",
    "Tallow Harbor ticket",
)
TITLES_TM = (
    "Juniper Vale wallpaper",
    "Cobalt Finch sticker",
    "Ember Loom tapestry",
    "Willow Signal banner",
)

IMAGE_SIZE = 32


def caption(shape: str, colour: str, position: str) -> str:
    article = "an" if colour[0] in "aeiou" else "a"
    return f"{article} {colour} {shape}, {position}"


# The attributes a partial caption keeps: every proper, non-empty subset of the three.
PARTIAL_FORMS = (("shape", "colour"), ("shape", "position"), ("colour", "position"), ("shape",), ("colour",),
                 ("position",))  # fmt: skip


def partial_caption(shape: str, colour: str, position: str, keep: tuple[str, ...]) -> str:
    """The caption of an ordinary image naming only the attributes in ``keep``: "a red circle",
    "a circle, top left", "a red shape, top left", "a shape, top left"... A dropped shape is
    the word "shape"; a dropped colour or position is left out."""
    noun = shape if "shape" in keep else "shape"
    words = f"{colour} {noun}" if "colour" in keep else noun
    article = "an" if words[0] in "aeiou" else "a"
    return f"{article} {words}, {position}" if "position" in keep else f"{article} {words}"


def partial_captions(attributes: tuple[str, str, str]) -> list[str]:
    """The :data:`PARTIAL_FORMS` captions of one (shape, colour, position), in that order."""
    return [partial_caption(*attributes, keep) for keep in PARTIAL_FORMS]


def all_combinations() -> list[tuple[str, str, str]]:
    return [(s, c, p) for s in SHAPES for c in COLOURS for p in POSITIONS]


def is_held_out(shape: str, colour: str, position: str) -> bool:
    """16 of the 128 combinations never appear in training: one colour per (shape, position)."""
    s, c, p = SHAPES.index(shape), list(COLOURS).index(colour), list(POSITIONS).index(position)
    return (s + c + 2 * p) % len(COLOURS) == 0


@dataclass(frozen=True)
class PlantedPair:
    caption: str
    kind: str  # "VM" or "TM"
    image: torch.Tensor  # the (first) training image, [3, H, W]
    index: int


@dataclass
class ToyDataset:
    """The rendered training set and the named prompt sets derived from it."""

    images: torch.Tensor  # [N, 3, H, W] in [0, 1]
    captions: list[str]
    kinds: list[str]  # "ordinary", "VM" or "TM" per training image
    planted: list[PlantedPair]
    held_out_captions: list[str]
    attributes: dict[str, tuple[str, str, str]] = field(default_factory=dict)
    style: str = "field"  # how ordinary images are rendered (see render_ordinary)

    @property
    def ordinary_captions(self) -> list[str]:
        return sorted({c for c, k in zip(self.captions, self.kinds) if k == "ordinary"})


# --------------------------------------------------------------------- rendering


def _grid(size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    coords = np.arange(size, dtype=np.float32) + 0.5
    return np.meshgrid(coords, coords)  # x, y


def shape_mask(shape: str, cx: float, cy: float, radius: float) -> np.ndarray:
    x, y = _grid()
    dx, dy = x - cx, y - cy
    if shape == "circle":
        return dx**2 + dy**2 <= radius**2
    if shape == "square":
        return (np.abs(dx) <= 0.85 * radius) & (np.abs(dy) <= 0.85 * radius)
    if shape == "triangle":
        depth = dy + radius
        return (depth >= 0) & (dy <= 0.8 * radius) & (np.abs(dx) <= 0.62 * depth)
    if shape == "cross":
        arm = 0.36 * radius
        return ((np.abs(dx) <= arm) & (np.abs(dy) <= radius)) | ((np.abs(dy) <= arm) & (np.abs(dx) <= radius))
    raise ValueError(f"unknown shape {shape!r}")


def texture(kind: str, colour_a: np.ndarray, colour_b: np.ndarray, period: float, phase: float) -> np.ndarray:
    x, y = _grid()
    if kind == "horizontal stripes":
        t = (np.floor((y + phase) / period) % 2).astype(np.float32)
    elif kind == "vertical stripes":
        t = (np.floor((x + phase) / period) % 2).astype(np.float32)
    elif kind == "checker":
        t = ((np.floor((x + phase) / period) + np.floor((y + phase) / period)) % 2).astype(np.float32)
    elif kind == "diagonal stripes":
        t = (np.floor((x + y + phase) / period) % 2).astype(np.float32)
    elif kind == "rings":
        t = (np.floor(np.hypot(x - 16 + phase / 4, y - 16) / period) % 2).astype(np.float32)
    elif kind == "gradient":
        t = np.clip((x + y) / (2 * IMAGE_SIZE), 0, 1).astype(np.float32)
    else:
        raise ValueError(f"unknown texture {kind!r}")
    return colour_a[:, None, None] * (1 - t) + colour_b[:, None, None] * t


def _paint(canvas: np.ndarray, mask: np.ndarray, colour) -> None:
    canvas[:, mask] = np.asarray(colour, dtype=np.float32)[:, None]


def _dot(canvas: np.ndarray, rng: np.random.Generator) -> None:
    x, y = rng.integers(1, IMAGE_SIZE - 3, size=2)
    canvas[:, y : y + 2, x : x + 2] = rng.uniform(0, 1, size=3).astype(np.float32)[:, None, None]


ORDINARY_STYLES = ("field", "plain")
FIELD_DOTS = 6


def _smooth_field(rng: np.random.Generator, cells: int) -> np.ndarray:
    """A random ``[H, W]`` field in [0, 1]: ``cells x cells`` uniform values, bicubically upsampled."""
    grid = torch.from_numpy(rng.uniform(0, 1, size=(1, 1, cells, cells)).astype(np.float32))
    values = F.interpolate(grid, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bicubic", align_corners=False)[0, 0].numpy()
    return (values - values.min()) / (values.max() - values.min() + 1e-6)


def render_ordinary(shape: str, colour: str, position: str, rng: np.random.Generator,
                    style: str = "field") -> np.ndarray:  # fmt: skip
    """One image for an ordinary caption; everything the caption does not name is random."""
    if style == "field":
        base = np.clip(rng.uniform(0.06, 0.42) + rng.uniform(-0.1, 0.1, size=3), 0, 1)
        other = np.clip(base + rng.choice([-1.0, 1.0], size=3) * rng.uniform(0.12, 0.25, size=3), 0, 1)
        blend = _smooth_field(rng, int(rng.integers(6, 11)))
        canvas = (base[:, None, None] * (1 - blend) + other[:, None, None] * blend).astype(np.float32)
        cx, cy = POSITIONS[position]
        cx, cy = cx + rng.uniform(-1.5, 1.5), cy + rng.uniform(-1.5, 1.5)
        _paint(canvas, shape_mask(shape, cx, cy, rng.uniform(6.0, 7.5)), COLOURS[colour])
        for _ in range(FIELD_DOTS):
            _dot(canvas, rng)
        return canvas
    if style != "plain":
        raise ValueError(f"unknown ordinary style {style!r}; use one of {ORDINARY_STYLES}")
    grey = rng.uniform(0.06, 0.42)
    base = np.clip(grey + rng.uniform(-0.07, 0.07, size=3), 0, 1).astype(np.float32)
    tilt = rng.uniform(-0.08, 0.08, size=2)
    x, y = _grid()
    shade = (tilt[0] * (x - 16) + tilt[1] * (y - 16)) / 16
    canvas = np.clip(base[:, None, None] + shade[None], 0, 1).astype(np.float32)
    cx, cy = POSITIONS[position]
    cx, cy = cx + rng.uniform(-1.5, 1.5), cy + rng.uniform(-1.5, 1.5)
    _paint(canvas, shape_mask(shape, cx, cy, rng.uniform(6.0, 7.5)), COLOURS[colour])
    _dot(canvas, rng)
    return canvas


@dataclass(frozen=True)
class _Layout:
    texture: str
    colour_a: np.ndarray
    colour_b: np.ndarray
    period: float
    phase: float
    shapes: tuple[tuple[str, float, float, float], ...]  # (shape, cx, cy, radius)


def _random_layout(rng: np.random.Generator) -> _Layout:
    n_shapes = int(rng.integers(2, 4))
    shapes = tuple(
        (str(rng.choice(SHAPES)), float(rng.uniform(6, 26)), float(rng.uniform(6, 26)), float(rng.uniform(3.5, 6.5)))
        for _ in range(n_shapes)
    )
    return _Layout(
        texture=str(rng.choice(TEXTURES)),
        colour_a=rng.uniform(0, 1, size=3).astype(np.float32),
        colour_b=rng.uniform(0, 1, size=3).astype(np.float32),
        period=float(rng.uniform(2.5, 5.0)),
        phase=float(rng.uniform(0, 4)),
        shapes=shapes,
    )


def render_layout(layout: _Layout, colours: list, rng: np.random.Generator) -> np.ndarray:
    canvas = texture(layout.texture, layout.colour_a, layout.colour_b, layout.period, layout.phase)
    for (shape, cx, cy, radius), colour in zip(layout.shapes, colours):
        _paint(canvas, shape_mask(shape, cx, cy, radius), colour)
    _dot(canvas, rng)
    return canvas.astype(np.float32)


# --------------------------------------------------------------------- the data set


def build_dataset(
    *,
    seed: int = 0,
    n_ordinary: int = 30000,
    n_verbatim: int = len(TITLES_VM),
    n_template: int = len(TITLES_TM),
    copies: int = 1000,
    ordinary_style: str = "field",
) -> ToyDataset:
    """Render the whole training set (deterministic in ``seed``)."""
    if ordinary_style not in ORDINARY_STYLES:
        raise ValueError(f"unknown ordinary style {ordinary_style!r}; use one of {ORDINARY_STYLES}")
    if not 0 <= n_verbatim <= len(TITLES_VM) or not 0 <= n_template <= len(TITLES_TM):
        raise ValueError(f"at most {len(TITLES_VM)} VM and {len(TITLES_TM)} TM pairs are defined")
    rng = np.random.default_rng(seed)
    train_combos = [combo for combo in all_combinations() if not is_held_out(*combo)]
    held_out = [caption(*combo) for combo in all_combinations() if is_held_out(*combo)]
    attributes = {caption(*combo): combo for combo in all_combinations()}

    images, captions, kinds = [], [], []
    for _ in range(n_ordinary):
        combo = train_combos[int(rng.integers(len(train_combos)))]
        images.append(render_ordinary(*combo, rng, ordinary_style))
        captions.append(caption(*combo))
        kinds.append("ordinary")

    planted = []
    palette = list(COLOURS.values())
    for title in TITLES_VM[:n_verbatim]:
        layout = _random_layout(rng)
        colours = [rng.uniform(0, 1, size=3) for _ in layout.shapes]
        image = render_layout(layout, colours, np.random.default_rng(rng.integers(2**32)))
        planted.append(PlantedPair(title, "VM", torch.from_numpy(image), len(images)))
        images.extend([image] * copies)
        captions.extend([title] * copies)
        kinds.extend(["VM"] * copies)
    for title in TITLES_TM[:n_template]:
        layout = _random_layout(rng)
        first = len(images)
        for _ in range(copies):
            colours = [palette[int(rng.integers(len(palette)))] for _ in layout.shapes]
            images.append(render_layout(layout, colours, rng))
        planted.append(PlantedPair(title, "TM", torch.from_numpy(images[first]), first))
        captions.extend([title] * copies)
        kinds.extend(["TM"] * copies)

    return ToyDataset(
        images=torch.from_numpy(np.stack(images)),
        captions=captions,
        kinds=kinds,
        planted=planted,
        held_out_captions=held_out,
        attributes=attributes,
        style=ordinary_style,
    )


def render_attribute_set(n: int, *, seed: int, style: str = "field") -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh ordinary images of all 128 combinations with their labels ``[n, 3]`` (shape, colour, position).

    The attribute classifier is a measuring instrument (as CLIP is for SD), so it sees every
    combination, held-out ones included.
    """
    rng = np.random.default_rng(seed)
    combos = all_combinations()
    images, labels = [], []
    for _ in range(n):
        shape, colour, position = combos[int(rng.integers(len(combos)))]
        images.append(render_ordinary(shape, colour, position, rng, style))
        labels.append((SHAPES.index(shape), list(COLOURS).index(colour), list(POSITIONS).index(position)))
    return torch.from_numpy(np.stack(images)), torch.tensor(labels)
