"""Procedural clips: determinism by (seed, index), and attributes recoverable from the frames."""

from __future__ import annotations

import numpy as np
import pytest

from anyflow.data.procedural import (
    COLOURS,
    MOTIONS,
    SHAPES,
    describe,
    make_clip,
    measure_attributes,
    procedural_clips,
)


def test_same_seed_same_bytes_different_seed_different() -> None:
    a = [c.video.tobytes() for c in procedural_clips(6, 3, frames=5, height=32, width=32)]
    b = [c.video.tobytes() for c in procedural_clips(6, 3, frames=5, height=32, width=32)]
    c = [c.video.tobytes() for c in procedural_clips(6, 4, frames=5, height=32, width=32)]
    assert a == b
    assert all(x != y for x, y in zip(a, c, strict=True))
    assert len(set(a)) == len(a)  # different indices differ too
    clip = make_clip(3, 2, frames=5, height=32, width=40)
    assert clip.video.dtype == np.uint8 and clip.video.shape == (5, 32, 40, 3)
    # A clip does not depend on which other clips were generated before it.
    assert make_clip(3, 2, frames=5, height=32, width=40).video.tobytes() == clip.video.tobytes()


def test_caption_matches_attributes_and_size_independent() -> None:
    for i in range(40):
        clip = make_clip(0, i, frames=3, height=16, width=24)
        attrs = clip.attributes
        assert attrs["colour"] in COLOURS and attrs["shape"] in SHAPES and attrs["motion"] in MOTIONS
        words = clip.caption.split()
        assert words[:2] == (["a", "still"] if attrs["motion"] == "static" else ["a", attrs["colour"]])
        assert attrs["colour"] in words and attrs["shape"] in words and f"{attrs['background']} background" in clip.caption
        if attrs["motion"] != "static":
            assert f"moving {attrs['motion']}" in clip.caption
        # The caption is known without rendering, and does not depend on the video size.
        assert describe(0, i) == (clip.caption, attrs)
        assert make_clip(0, i, frames=7, height=48, width=32).caption == clip.caption


@pytest.mark.parametrize(("frames", "height", "width"), [(9, 32, 32), (5, 24, 40)])
def test_measure_attributes_recovers_colour_and_motion(frames: int, height: int, width: int) -> None:
    n = 120
    clips = list(procedural_clips(n, 11, frames=frames, height=height, width=width))
    got = [measure_attributes(c.video) for c in clips]
    colour = np.mean([g["colour"] == c.attributes["colour"] for g, c in zip(got, clips, strict=True)])
    motion = np.mean([g["motion"] == c.attributes["motion"] for g, c in zip(got, clips, strict=True)])
    both = np.mean([g["colour"] == c.attributes["colour"] and g["motion"] == c.attributes["motion"]
                    for g, c in zip(got, clips, strict=True)])
    assert both >= 0.95, (colour, motion)
    # The labels are balanced enough that a constant guess could not pass.
    assert max(np.mean([c.attributes["motion"] == m for c in clips]) for m in MOTIONS) < 0.4


def test_measure_attributes_on_known_track() -> None:
    """An independently drawn square moving down-left diagonally (mostly down) on gray."""
    video = np.full((6, 32, 32, 3), 110, dtype=np.uint8)
    for t in range(6):
        y, x = 2 + 4 * t, 20 - t
        video[t, y : y + 8, x : x + 8] = COLOURS["cyan"]
    got = measure_attributes(video)
    assert (got["colour"], got["motion"], got["shape"], got["background"]) == ("cyan", "down", "square", "gray")
    np.testing.assert_allclose(got["track"][:, 1], 2 + 4 * np.arange(6) + 3.5)
    empty = measure_attributes(np.zeros((3, 16, 16, 3), dtype=np.uint8))
    assert empty["colour"] is None and empty["motion"] is None
