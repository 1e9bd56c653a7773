"""Decode a video file into the model's input tensor: (3, T, H, W) float in [-1, 1].

Decoder choice: **imageio-ffmpeg** (the ffmpeg backend of the imageio project), called through
``imageio_ffmpeg.read_frames``. It is a pure-pip wheel that bundles a static ffmpeg binary, so the
same decoder works on a laptop, in CI and in the training image with no system packages, and it
decodes every codec ffmpeg knows. Frames stream from an ffmpeg subprocess, so we stop reading as soon
as the frames we need are in (long videos are never decoded in full). Alternatives considered:
PyAV (in-process and faster per frame, but a larger binary wheel with its own FFmpeg build and
occasional ABI breaks between releases) and torchvision.io (its video decoding is deprecated in
favour of TorchCodec, which needs system FFmpeg libraries). The decode is a small share of
data-preparation time next to the VAE, so the simpler dependency wins.

Pipeline (docs/method.md §10 "data"): nearest-frame resampling to the target fps by timestamps, the first
``frames`` frames from t = 0, resize (not crop) to (H, W) with antialiased bilinear filtering, scale
to [-1, 1]. Bad inputs raise :class:`ClipError` with a machine-readable ``reason``.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# Skip reasons (closed set; prepare() counts them by name).
UNDECODABLE = "undecodable"
TOO_SHORT = "too_short"
WRONG_SIZE = "wrong_size"
MISSING_CAPTION = "missing_caption"
MISSING_VIDEO = "missing_video"
BAD_METADATA = "bad_metadata"
DUPLICATE_KEY = "duplicate_key"
REASONS = (UNDECODABLE, TOO_SHORT, WRONG_SIZE, MISSING_CAPTION, MISSING_VIDEO, BAD_METADATA, DUPLICATE_KEY)


class ClipError(Exception):
    """A bad input clip: ``reason`` is one of :data:`REASONS`, ``detail`` says what was wrong."""

    def __init__(self, reason: str, detail: str = "", *, key: str | None = None) -> None:
        if reason not in REASONS:
            raise ValueError(f"unknown ClipError reason {reason!r}; use one of {REASONS}")
        self.reason = reason
        self.detail = detail
        self.key = key
        where = f"clip {key!r}: " if key else ""
        super().__init__(f"{where}{reason}" + (f" ({detail})" if detail else ""))

    def with_key(self, key: str) -> ClipError:
        """The same error, naming the clip ``key``."""
        return ClipError(self.reason, self.detail, key=key)


@dataclass(frozen=True)
class VideoSpec:
    """Target clip geometry: ``frames`` at ``fps``, resized to ``height`` × ``width``.

    ``max_upscale`` rejects sources smaller than (H, W) / max_upscale on either side as ``wrong_size``.
    """

    frames: int
    fps: float
    height: int
    width: int
    max_upscale: float = 2.0

    def __post_init__(self) -> None:
        if self.frames < 1 or self.fps <= 0 or self.height < 1 or self.width < 1:
            raise ValueError(f"invalid VideoSpec {self}: frames, fps, height and width must be positive")


def source_indices(frames: int, fps: float, source_fps: float) -> list[int]:
    """Source frame index nearest to each target timestamp ``k / fps``, k = 0 .. frames-1."""
    return [math.floor(k / fps * source_fps + 0.5 + 1e-9) for k in range(frames)]


def frames_to_tensor(video: np.ndarray, spec: VideoSpec) -> torch.Tensor:
    """uint8 (T, H0, W0, 3) → float32 (3, T, H, W) in [-1, 1], resized (not cropped) to the spec.

    Raises ``ClipError(wrong_size)`` for a source much smaller than the target (see ``max_upscale``)
    or without 3 channels.
    """
    if video.ndim != 4 or video.shape[-1] != 3 or video.shape[0] == 0:
        raise ClipError(WRONG_SIZE, f"expected frames (T, H, W, 3), got shape {tuple(video.shape)}")
    _, h0, w0, _ = video.shape
    if h0 * spec.max_upscale < spec.height or w0 * spec.max_upscale < spec.width:
        raise ClipError(
            WRONG_SIZE,
            f"source is {w0}x{h0}, more than {spec.max_upscale:g}x smaller than the target {spec.width}x{spec.height}",
        )
    x = torch.from_numpy(np.ascontiguousarray(video)).permute(0, 3, 1, 2).float()  # (T, 3, H0, W0)
    if (h0, w0) != (spec.height, spec.width):
        x = F.interpolate(x, size=(spec.height, spec.width), mode="bilinear", antialias=True, align_corners=False)
    x = x.clamp(0, 255) / 127.5 - 1.0
    return x.permute(1, 0, 2, 3).contiguous()


def read_frames(path: str | os.PathLike[str], spec: VideoSpec) -> np.ndarray:
    """Decode the frames of ``path`` needed for ``spec`` as uint8 (T, H0, W0, 3) at the target fps.

    Raises ``ClipError(undecodable)`` if ffmpeg cannot read the file and ``ClipError(too_short)`` if
    it has fewer frames than ``spec.frames`` at ``spec.fps`` need.
    """
    import imageio_ffmpeg

    gen = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    try:
        try:
            meta = next(gen)
        except (OSError, RuntimeError, StopIteration) as e:
            raise ClipError(UNDECODABLE, _first_line(e) or "ffmpeg found no video stream") from None
        w0, h0 = meta.get("size") or (0, 0)
        src_fps = float(meta.get("fps") or 0.0)
        if w0 <= 0 or h0 <= 0 or not math.isfinite(src_fps) or src_fps <= 0:
            raise ClipError(UNDECODABLE, f"no usable video stream (size={meta.get('size')}, fps={meta.get('fps')})")
        if h0 * spec.max_upscale < spec.height or w0 * spec.max_upscale < spec.width:
            raise ClipError(WRONG_SIZE, f"source is {w0}x{h0}, more than {spec.max_upscale:g}x smaller than the target {spec.width}x{spec.height}")
        wanted = source_indices(spec.frames, spec.fps, src_fps)
        wanted_set = set(wanted)
        need = wanted[-1] + 1
        kept: dict[int, np.ndarray] = {}
        count = 0
        try:
            for raw in gen:
                if count in wanted_set:
                    kept[count] = np.frombuffer(raw, dtype=np.uint8).reshape(h0, w0, 3)
                count += 1
                if count >= need:
                    break
        except (OSError, RuntimeError, ValueError) as e:
            if count == 0:
                raise ClipError(UNDECODABLE, _first_line(e)) from None
            # A truncated stream: keep what decoded; the length check below decides.
        if count < need:
            raise ClipError(
                TOO_SHORT,
                f"{spec.frames} frames at {spec.fps:g} fps need {need} source frames at {src_fps:g} fps, found {count}",
            )
        return np.stack([kept[i] for i in wanted])
    finally:
        gen.close()


def decode_video(source: str | os.PathLike[str] | bytes, spec: VideoSpec) -> torch.Tensor:
    """Decode a video file (a local path or the file's bytes) to float32 (3, T, H, W) in [-1, 1].

    Raises :class:`ClipError` (undecodable, too_short, wrong_size) for bad inputs.
    """
    if isinstance(source, bytes):
        if not source:
            raise ClipError(UNDECODABLE, "empty file")
        # ffmpeg needs a seekable file for mp4 (the moov atom may be at the end): spill to a temp file.
        with tempfile.TemporaryDirectory(prefix="anyflow-video-") as tmp:
            path = Path(tmp) / "clip.mp4"
            path.write_bytes(source)
            return frames_to_tensor(read_frames(path, spec), spec)
    if not Path(source).is_file():
        raise ClipError(MISSING_VIDEO, f"no file at {source}")
    if Path(source).stat().st_size == 0:
        raise ClipError(UNDECODABLE, f"empty file {source}")
    return frames_to_tensor(read_frames(source, spec), spec)


def write_video(path: str | os.PathLike[str], video: np.ndarray, *, fps: float) -> None:
    """Write uint8 (T, H, W, 3) frames as an H.264 mp4 (H and W should be even)."""
    import imageio_ffmpeg

    _, h, w, _ = video.shape
    writer = imageio_ffmpeg.write_frames(
        str(path), (w, h), fps=fps, macro_block_size=1, quality=8, ffmpeg_log_level="error"
    )
    writer.send(None)
    for frame in video:
        writer.send(np.ascontiguousarray(frame))
    writer.close()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[-1][:200] if text else type(e).__name__
