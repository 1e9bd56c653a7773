"""Procedural captioned videos: moving coloured shapes on a plain background.

The built-in data source for tests and the embedded ``tiny`` run. Each clip is a function of
``(seed, index)`` only, so a dataset spec like ``procedural:n=32,seed=0`` is fully reproducible
without any files. The caption describes what the frames show, with words from a small vocabulary
("a red circle moving left and a small blue square on a black background", "a still green
triangle on a white background"; every word is in the tiny text encoder's vocabulary), and
:func:`measure_attributes` recovers colour and motion from frames, so evaluation can score prompt
adherence of generated videos against the caption's attributes.

Layout of a clip: a *primary* shape (30–40 % of the short side) travels across 50–90 % of the free
room in one direction (or stays still); an optional *secondary* shape (12–16 %) of another colour
stays still underneath it. The primary is always the largest non-background region, which is what
:func:`measure_attributes` relies on.

``simple=True`` (``procedural:…,simple=1``, the ``demo`` preset) draws from a smaller class set: a red, green or
blue primary (:data:`SIMPLE_COLOURS`) of any shape, moving left or right or still (:data:`SIMPLE_MOTIONS`), on
black, with no secondary shape: 27 captions, few enough that a CPU-sized model learns to follow them in minutes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 190, 60),
    "blue": (45, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 50, 210),
    "cyan": (40, 210, 220),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {"black": (0, 0, 0), "gray": (110, 110, 110), "white": (245, 245, 245)}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
MOTIONS: tuple[str, ...] = ("left", "right", "up", "down", "static")
_DIRECTION = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "static": (0, 0)}
SIMPLE_COLOURS: tuple[str, ...] = ("red", "green", "blue")  # the simple=True class set (module docstring)
SIMPLE_MOTIONS: tuple[str, ...] = ("left", "right", "static")
_JITTER = 12  # per-clip colour jitter (uint8 levels) so colours are not exactly the palette


@dataclass(frozen=True)
class ProceduralClip:
    """One generated clip: ``video`` uint8 (T, H, W, 3), its ``caption`` and ground-truth ``attributes``."""

    video: np.ndarray
    caption: str
    attributes: dict[str, Any] = field(default_factory=dict)


def _shape_mask(shape: str, size: float, x0: float, y0: float, height: int, width: int) -> np.ndarray:
    """Boolean (H, W) mask of ``shape`` with bounding box ``[x0, x0+size) × [y0, y0+size)`` (pixel centres)."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    u = (xx - x0) / size  # 0..1 inside the bounding box
    v = (yy - y0) / size
    if shape == "square":
        return (u >= 0) & (u < 1) & (v >= 0) & (v < 1)
    if shape == "circle":
        return (u - 0.5) ** 2 + (v - 0.5) ** 2 <= 0.25
    if shape == "triangle":  # apex up, base at the bottom of the box
        return (v >= 0) & (v < 1) & (np.abs(u - 0.5) <= 0.5 * v)
    raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")


def _jitter(rng: np.random.Generator, rgb: tuple[int, int, int]) -> np.ndarray:
    return np.clip(np.asarray(rgb) + rng.integers(-_JITTER, _JITTER + 1, size=3), 0, 255).astype(np.uint8)


def _layout(seed: int, index: int, simple: bool = False) -> tuple[dict[str, Any], np.random.Generator]:
    """Draw clip ``index`` of dataset ``seed``: discrete attributes and geometry in relative units.

    Nothing here depends on the output size, so captions are known without rendering. ``simple``: the small
    class set of the module docstring (its own random stream, so it is not a subset of the full set's clips).
    """
    if simple:
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index) & 0xFFFFFFFF, 0x51A1])
        lay = {
            "shape": SHAPES[rng.integers(len(SHAPES))],
            "colour": SIMPLE_COLOURS[rng.integers(len(SIMPLE_COLOURS))],
            "background": "black",
            "motion": SIMPLE_MOTIONS[rng.integers(len(SIMPLE_MOTIONS))],
            "size": float(rng.uniform(0.30, 0.40)),
            "travel": float(rng.uniform(0.5, 0.9)),
            "start": (float(rng.uniform()), float(rng.uniform())),
            "second": None,
        }
        return lay, rng
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index) & 0xFFFFFFFF, 0xA11F])
    lay: dict[str, Any] = {
        "shape": SHAPES[rng.integers(len(SHAPES))],
        "colour": list(COLOURS)[rng.integers(len(COLOURS))],
        "background": list(BACKGROUNDS)[rng.integers(len(BACKGROUNDS))],
        "motion": MOTIONS[rng.integers(len(MOTIONS))],
        "size": float(rng.uniform(0.30, 0.40)),  # fraction of the short side
        "travel": float(rng.uniform(0.5, 0.9)),  # fraction of the free room crossed
        "start": (float(rng.uniform()), float(rng.uniform())),
    }
    lay["second"] = None
    if rng.uniform() < 0.5:
        others = [c for c in COLOURS if c != lay["colour"]]
        lay["second"] = {
            "shape": SHAPES[rng.integers(len(SHAPES))],
            "colour": others[rng.integers(len(others))],
            "size": float(rng.uniform(0.12, 0.16)),
            "pos": (float(rng.uniform()), float(rng.uniform())),
        }
    return lay, rng


def describe(seed: int, index: int, *, simple: bool = False) -> tuple[str, dict[str, Any]]:
    """Caption and attributes of clip ``index`` of dataset ``seed`` (cheap: nothing is rendered)."""
    lay, _ = _layout(seed, index, simple)
    second = lay["second"]
    if lay["motion"] == "static":
        caption = f"a still {lay['colour']} {lay['shape']}"
    else:
        caption = f"a {lay['colour']} {lay['shape']} moving {lay['motion']}"
    if second is not None:
        caption += f" and a small {second['colour']} {second['shape']}"
    caption += f" on a {lay['background']} background"
    attributes: dict[str, Any] = {
        "shape": lay["shape"],
        "colour": lay["colour"],
        "motion": lay["motion"],
        "background": lay["background"],
        "second_shape": None if second is None else second["shape"],
        "second_colour": None if second is None else second["colour"],
    }
    return caption, attributes


def _start(u: float, d: int, room: float, travel: float) -> float:
    """Start coordinate so that start and end (start + d·travel·room) both lie in [0, room]."""
    if d > 0:
        return u * (1 - travel) * room
    if d < 0:
        return room * (1 - (1 - travel) * u)
    return u * room


def make_clip(seed: int, index: int, *, frames: int, height: int, width: int, simple: bool = False) -> ProceduralClip:
    """Generate clip ``index`` of the procedural dataset ``seed`` (same arguments → identical bytes).

    Args:
        seed: dataset seed.
        index: clip index within the dataset.
        frames, height, width: output video size; ``frames >= 2`` and ``min(height, width) >= 16``.
        simple: draw from the small class set (module docstring).
    """
    if frames < 2 or min(height, width) < 16:
        raise ValueError(f"procedural clips need frames >= 2 and height, width >= 16; got {frames}x{height}x{width}")
    lay, rng = _layout(seed, index, simple)
    caption, attributes = describe(seed, index, simple=simple)
    side = min(height, width)
    size = lay["size"] * side
    dx, dy = _DIRECTION[lay["motion"]]
    room_x, room_y = width - size, height - size
    sx = _start(lay["start"][0], dx, room_x, lay["travel"])
    sy = _start(lay["start"][1], dy, room_y, lay["travel"])
    ex, ey = sx + dx * lay["travel"] * room_x, sy + dy * lay["travel"] * room_y

    bg = _jitter(rng, BACKGROUNDS[lay["background"]])
    fg = _jitter(rng, COLOURS[lay["colour"]])
    base = np.broadcast_to(bg, (height, width, 3)).copy()
    second = lay["second"]
    if second is not None:  # static, drawn underneath the primary
        s2 = second["size"] * side
        x2, y2 = second["pos"][0] * (width - s2), second["pos"][1] * (height - s2)
        base[_shape_mask(second["shape"], s2, x2, y2, height, width)] = _jitter(rng, COLOURS[second["colour"]])
    video = np.empty((frames, height, width, 3), dtype=np.uint8)
    for t in range(frames):
        a = t / (frames - 1)
        frame = base.copy()
        frame[_shape_mask(lay["shape"], size, sx + a * (ex - sx), sy + a * (ey - sy), height, width)] = fg
        video[t] = frame
    return ProceduralClip(video=video, caption=caption, attributes=attributes)


def procedural_clips(n: int, seed: int, *, frames: int, height: int, width: int) -> Iterator[ProceduralClip]:
    """Yield clips ``0 .. n-1`` of the procedural dataset ``seed``."""
    for index in range(n):
        yield make_clip(seed, index, frames=frames, height=height, width=width)


def _nearest(pixels: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """Index of the nearest palette colour for each pixel (N, 3) and the distance to it."""
    ref = np.asarray(list(palette.values()), dtype=np.float32)
    d = np.linalg.norm(pixels[:, None, :].astype(np.float32) - ref[None], axis=-1)
    return d.argmin(axis=1), d.min(axis=1)


def measure_attributes(video: np.ndarray, *, min_travel: float = 0.08) -> dict[str, Any]:
    """Estimate the dominant non-background colour, the motion direction and the shape of a clip.

    Works on generated or decoded videos (noisy colours are snapped to the nearest palette entry).

    Args:
        video: uint8 array (T, H, W, 3).
        min_travel: centroid displacement below this fraction of the short side counts as ``static``.

    Returns:
        ``{"colour", "motion", "shape", "background", "track"}``; colour/motion/shape are ``None`` when
        no foreground is found. ``track`` is the (T, 2) centroid (x, y) of the dominant colour, NaN
        where absent.
    """
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"measure_attributes expects a uint8 video (T, H, W, 3); got shape {video.shape}")
    frames, height, width, _ = video.shape
    pix = video.reshape(-1, 3).astype(np.float32)
    # Background: the most frequent quantised colour (it covers most of every frame).
    q = (pix // 32).astype(np.int32)
    codes = q[:, 0] * 64 + q[:, 1] * 8 + q[:, 2]
    bg_code = np.bincount(codes).argmax()
    bg_rgb = pix[codes == bg_code].mean(axis=0)
    bg_name = list(BACKGROUNDS)[_nearest(bg_rgb[None], BACKGROUNDS)[0][0]]
    fg = np.linalg.norm(pix - bg_rgb, axis=-1) > 60.0
    result: dict[str, Any] = {"colour": None, "motion": None, "shape": None, "background": bg_name}
    if fg.sum() == 0:
        result["track"] = np.full((frames, 2), np.nan)
        return result
    idx, dist = _nearest(pix[fg], COLOURS)
    idx[dist > 120.0] = -1  # far from every palette colour: not counted
    counts = np.bincount(idx[idx >= 0], minlength=len(COLOURS))
    if counts.sum() == 0:
        result["track"] = np.full((frames, 2), np.nan)
        return result
    best = int(counts.argmax())
    result["colour"] = list(COLOURS)[best]

    mask = np.zeros(pix.shape[0], dtype=bool)
    mask[np.flatnonzero(fg)[idx == best]] = True
    mask = mask.reshape(frames, height, width)
    yy, xx = np.mgrid[0:height, 0:width]
    track = np.full((frames, 2), np.nan)
    for t in range(frames):
        m = mask[t]
        if m.any():
            track[t] = (xx[m].mean(), yy[m].mean())
    result["track"] = track
    valid = np.flatnonzero(~np.isnan(track[:, 0]))
    if valid.size >= 2:
        # Least-squares slope of the centroid over time, times the clip length = total displacement.
        tt = valid.astype(np.float64)
        disp = [np.polyfit(tt, track[valid, k], 1)[0] * (frames - 1) for k in range(2)]
        dxy = np.asarray(disp)
        if np.abs(dxy).max() < min_travel * min(height, width):
            result["motion"] = "static"
        elif abs(dxy[0]) >= abs(dxy[1]):
            result["motion"] = "right" if dxy[0] > 0 else "left"
        else:
            result["motion"] = "down" if dxy[1] > 0 else "up"
    # Shape from how much of its bounding box the region fills (square ≈ 1, circle ≈ π/4, triangle ≈ 1/2).
    t_mid = valid[valid.size // 2] if valid.size else None
    if t_mid is not None:
        ys, xs = np.nonzero(mask[t_mid])
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        fill = ys.size / box
        result["shape"] = "square" if fill > 0.89 else ("circle" if fill > 0.64 else "triangle")
    return result
