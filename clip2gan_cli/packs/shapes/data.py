"""The procedural `shapes` domain: one coloured shape on a plain background, 32x32 RGB.

Every attribute of every image is known, so an independent checker (a small CNN trained on
`sample()`) can measure whether generated or edited images show what the prompt asked for.
Rendering is vectorised numpy with 2x2 supersampling (anti-aliased edges): 50k images take a
few seconds on one core.
"""
from __future__ import annotations

import numpy as np

from ...errors import UserInputError

RESOLUTION = 32

# Four outlines that differ at 32 px even when small: round, straight-edged, pointed, concave.
SHAPES = ("circle", "square", "triangle", "cross")

# Six hues far apart in RGB (pairwise distance >= 140; blue-cyan is the closest pair), none near black or white.
COLORS = {
    "red": (225, 30, 30),
    "green": (30, 190, 50),
    "blue": (40, 70, 235),
    "yellow": (240, 215, 30),
    "magenta": (215, 40, 215),
    "cyan": (30, 210, 225),
}

# Radius (half the outer extent) in pixels.
SIZES = {"small": 6.5, "large": 11.0}

BACKGROUNDS = {"black": (0, 0, 0), "white": (255, 255, 255)}

# Position jitter: centre offset from the middle, uniform in [-JITTER, JITTER] pixels per axis.
JITTER = 3.0

ATTRIBUTE_KEYS = ("shape", "color", "size", "background")

# Caption templates; the words they use (plus the attribute names) form the pack's vocabulary.
TEMPLATES = (
    "a {color} {shape}",
    "a {color} {shape}",
    "{color} {shape}",
    "a {size} {color} {shape}",
    "a {color} {shape} on a {background} background",
    "a {size} {color} {shape} on a {background} background",
    "a picture of a {color} {shape}",
    "a {color} {shape} on {background}",
)
TEMPLATE_WORDS = ("a", "on", "background", "picture", "of")


def contrast_sets() -> list[list[str]]:
    """The interchangeable words of each attribute (colours, shapes, sizes, backgrounds): what
    `clip2gan edit --neutral auto` swaps to name what an image shows now."""
    return [list(COLORS), list(SHAPES), list(SIZES), list(BACKGROUNDS)]


def vocabulary() -> list[str]:
    """Every word a caption of this domain can contain, in a fixed order."""
    words = list(TEMPLATE_WORDS) + list(SHAPES) + list(COLORS) + list(SIZES) + list(BACKGROUNDS)
    seen: list[str] = []
    for word in words:
        if word not in seen:
            seen.append(word)
    return seen


def _check(name: str, value: str, allowed) -> int:
    names = list(allowed)
    if value not in names:
        raise UserInputError(f"unknown {name} '{value}'", hint=f"expected one of: {', '.join(names)}")
    return names.index(value)


def _shape_masks(shape_index: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    """Inside-test for each image's shape on coordinates normalised by its radius.

    u, v: [n, H, W] offsets from the shape centre divided by the radius (v grows downwards).
    """
    inside = np.zeros(u.shape, dtype=bool)
    for index, shape in enumerate(SHAPES):
        rows = shape_index == index
        if not rows.any():
            continue
        su, sv = u[rows], v[rows]
        if shape == "circle":
            mask = su * su + sv * sv <= 1.0
        elif shape == "square":
            mask = np.maximum(np.abs(su), np.abs(sv)) <= 0.85
        elif shape == "triangle":
            # Apex up at v = -1, flat base at v = 0.85, base half-width 1.
            mask = (sv <= 0.85) & (np.abs(su) <= (sv + 1.0) / 1.85)
        else:  # cross (a plus sign with arms a third of the radius wide)
            arm = 0.36
            mask = ((np.abs(su) <= arm) & (np.abs(sv) <= 1.0)) | ((np.abs(sv) <= arm) & (np.abs(su) <= 1.0))
        inside[rows] = mask
    return inside


def render_batch(shape_index, color_index, size_index, background_index, cx, cy) -> np.ndarray:
    """Render n images from index arrays and centre coordinates (pixels); uint8 [n, 32, 32, 3]."""
    shape_index = np.asarray(shape_index, dtype=np.int64)
    n = shape_index.shape[0]
    radius = np.asarray(list(SIZES.values()), dtype=np.float32)[np.asarray(size_index)]
    cx = np.asarray(cx, dtype=np.float32).reshape(n, 1, 1)
    cy = np.asarray(cy, dtype=np.float32).reshape(n, 1, 1)
    r = radius.reshape(n, 1, 1)
    coverage = np.zeros((n, RESOLUTION, RESOLUTION), dtype=np.float32)
    pixel = np.arange(RESOLUTION, dtype=np.float32)
    for offset_y in (0.25, 0.75):  # 2x2 supersampling for smooth edges
        for offset_x in (0.25, 0.75):
            u = (pixel[None, None, :] + offset_x - cx) / r
            v = (pixel[None, :, None] + offset_y - cy) / r
            u, v = np.broadcast_arrays(u, v)
            coverage += _shape_masks(shape_index, u, v)
    coverage = (coverage / 4.0)[..., None]
    fg = np.asarray(list(COLORS.values()), dtype=np.float32)[np.asarray(color_index)].reshape(n, 1, 1, 3)
    bg = np.asarray(list(BACKGROUNDS.values()), dtype=np.float32)[np.asarray(background_index)].reshape(n, 1, 1, 3)
    image = coverage * fg + (1.0 - coverage) * bg
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def render(shape: str, color: str, size: str, background: str, x: float | None = None,
           y: float | None = None) -> np.ndarray:
    """Render one image (uint8 [32, 32, 3]) with the shape centred at pixel (x, y) (default: middle)."""
    indices = (_check("shape", shape, SHAPES), _check("color", color, COLORS),
               _check("size", size, SIZES), _check("background", background, BACKGROUNDS))
    centre = RESOLUTION / 2.0
    cx = centre if x is None else float(x)
    cy = centre if y is None else float(y)
    return render_batch([indices[0]], [indices[1]], [indices[2]], [indices[3]], [cx], [cy])[0]


def sample(n: int, seed: int = 0, chunk: int = 4096) -> tuple[np.ndarray, list[dict]]:
    """Draw n random images with uniformly random attributes and jittered position.

    Returns (images uint8 [n, 32, 32, 3], attributes) where each attribute dict has keys
    shape, color, size, background (names) and x, y (centre in pixels).
    """
    if n < 0:
        raise UserInputError(f"sample size must be >= 0, got {n}")
    rng = np.random.default_rng(seed)
    shape_index = rng.integers(0, len(SHAPES), n)
    color_index = rng.integers(0, len(COLORS), n)
    size_index = rng.integers(0, len(SIZES), n)
    background_index = rng.integers(0, len(BACKGROUNDS), n)
    centre = RESOLUTION / 2.0
    cx = centre + rng.uniform(-JITTER, JITTER, n).astype(np.float32)
    cy = centre + rng.uniform(-JITTER, JITTER, n).astype(np.float32)
    images = np.empty((n, RESOLUTION, RESOLUTION, 3), dtype=np.uint8)
    for start in range(0, n, chunk):  # chunks bound the float32 temporaries
        part = slice(start, start + chunk)
        images[part] = render_batch(shape_index[part], color_index[part], size_index[part],
                                    background_index[part], cx[part], cy[part])
    shapes, colors, sizes, backgrounds = list(SHAPES), list(COLORS), list(SIZES), list(BACKGROUNDS)
    attributes = [
        {"shape": shapes[s], "color": colors[c], "size": sizes[z], "background": backgrounds[b],
         "x": float(x), "y": float(y)}
        for s, c, z, b, x, y in zip(shape_index, color_index, size_index, background_index, cx, cy)
    ]
    return images, attributes


def caption(attrs: dict, rng: np.random.Generator | None = None) -> str:
    """One caption for an image's attributes, from a randomly chosen template."""
    rng = rng if rng is not None else np.random.default_rng()
    template = TEMPLATES[int(rng.integers(0, len(TEMPLATES)))]
    return template.format(**{key: attrs[key] for key in ATTRIBUTE_KEYS})


def attribute_indices(attributes: list[dict]) -> dict[str, np.ndarray]:
    """Attribute names -> integer class arrays (for classifiers), keyed like ATTRIBUTE_KEYS."""
    tables = {"shape": list(SHAPES), "color": list(COLORS), "size": list(SIZES), "background": list(BACKGROUNDS)}
    return {key: np.asarray([tables[key].index(a[key]) for a in attributes], dtype=np.int64) for key in ATTRIBUTE_KEYS}
