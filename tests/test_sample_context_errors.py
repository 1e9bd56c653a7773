"""FAR ``sample --image/--video`` context files: a bad file gets one sentence naming the option, the file and what
to change, not prepare_data's skip-reason words (``missing_video``, ``too_short``) that a user of ``sample`` has
never seen. The files fail in decoding, before the VAE is touched, so no model is built here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from anyflow.config import StageInputError, get_preset
from anyflow.data.video import write_video
from anyflow.sample import load_context


def _refusal(path: Path, flag: str, frames: int) -> str:
    with pytest.raises(StageInputError) as info:
        load_context(str(path), get_preset("far-tiny"), None, video_frames=frames, flag=flag)
    return str(info.value)


def test_a_missing_image_is_named_as_a_missing_file(tmp_path: Path) -> None:
    msg = _refusal(tmp_path / "nope.png", "--image", 1)
    assert msg == f"--image {tmp_path / 'nope.png'}: no such file"


def test_a_short_video_names_the_option_that_fixes_it(tmp_path: Path) -> None:
    clip = tmp_path / "short.mp4"
    write_video(clip, np.zeros((3, 16, 16, 3), dtype=np.uint8), fps=16)
    msg = _refusal(clip, "--video", 25)
    assert msg.startswith(f"--video {clip}: too short (")
    assert "--video-frames" in msg and "too_short" not in msg.split(": ", 1)[1]


def test_an_undecodable_file_says_so(tmp_path: Path) -> None:
    junk = tmp_path / "junk.mp4"
    junk.write_text("not a video")
    msg = _refusal(junk, "--video", 25)
    assert msg.startswith(f"--video {junk}: cannot be decoded") and "undecodable" not in msg.split(": ", 1)[1]
