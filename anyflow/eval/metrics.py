"""Evaluation metrics that need no downloaded weights (docs/method.md §15 A, issue 7).

Every function is a pure function of tensors/arrays and is small enough to check by hand:

* :func:`coupled_error` — latent MSE between samples and the teacher's many-step sample from the
  *same* noise (docs/method.md §15 A "coupled error": deterministic, sensitive to leaving the PF-ODE).
* :func:`psnr`, :func:`ssim` — on decoded frames (B, 3, T, H, W) in [-1, 1], per frame, averaged.
* :func:`temporal_flicker`, :func:`flicker_score` — mean |frame-to-frame difference| and the
  VBench-style 0–1 score ``(255 − mean|Δ|)/255`` on uint8 frames.
* :func:`energy_distance`, :func:`mmd_rbf` — unbiased two-sample distances between generated and
  held-out data latents (flattened to (n, d)).
* :func:`prompt_adherence` — procedural dataset only: colour/motion read back from the frames with
  :func:`anyflow.data.procedural.measure_attributes` and compared with the caption's attributes.
* :class:`MetricTable` — rows ``(model, nfe, metric, value)`` → nested dict / JSON / markdown.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "MetricTable",
    "coupled_error",
    "energy_distance",
    "flicker_score",
    "mmd_rbf",
    "prompt_adherence",
    "psnr",
    "ssim",
    "temporal_flicker",
    "to_uint8_videos",
]


def _same_shape(a: Tensor, b: Tensor, what: str) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{what}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}; pass tensors of the same shape."
        )


def coupled_error(x: Tensor, x_ref: Tensor) -> dict[str, Any]:
    """Coupled error of samples ``x`` against the reference ``x_ref`` drawn from the same noise.

    docs/method.md §15 A: for the same initial noise, the L2 distance to the teacher's many-step
    ODE endpoint. Reported as the mean squared error per sample (over all non-batch dims) and
    its mean over the batch.

    Args:
        x: samples (B, ...) — e.g. latents (B, F, C, H, W).
        x_ref: reference samples, same shape.

    Returns:
        ``{"mse_per_sample": list[float] (B), "mse": float, "rmse": float}``.
    """
    _same_shape(x, x_ref, "coupled_error")
    diff = (x.detach().double() - x_ref.detach().double()).reshape(x.shape[0], -1)
    per = diff.pow(2).mean(dim=1)
    mse = float(per.mean())
    return {"mse_per_sample": [float(v) for v in per], "mse": mse, "rmse": math.sqrt(mse)}


def _frames(video: Tensor) -> Tensor:
    """(B, 3, T, H, W) → (B·T, 3, H, W) in float64."""
    if video.ndim != 5:
        raise ValueError(f"expected decoded video (B, C, T, H, W); got shape {tuple(video.shape)}")
    b, c, t, h, w = video.shape
    return video.detach().double().permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)


def psnr(video_a: Tensor, video_b: Tensor, data_range: float = 2.0) -> float:
    """Peak signal-to-noise ratio in dB, computed per frame and averaged over frames and batch.

    ``PSNR = 10·log10(data_range² / MSE)``; ``data_range = 2`` for frames in [-1, 1]. Returns
    ``inf`` when every frame is identical (a frame with MSE 0 makes the mean infinite).
    """
    _same_shape(video_a, video_b, "psnr")
    fa, fb = _frames(video_a), _frames(video_b)
    mse = (fa - fb).pow(2).flatten(1).mean(dim=1)
    per_frame = 10.0 * torch.log10(data_range**2 / mse)  # inf where mse == 0
    return float(per_frame.mean())


def _gaussian_window(size: int, sigma: float) -> Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(x**2) / (2.0 * sigma**2))
    g = g / g.sum()
    return torch.outer(g, g)


def ssim(
    video_a: Tensor,
    video_b: Tensor,
    data_range: float = 2.0,
    *,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> float:
    """Structural similarity (Wang et al. 2004) with a Gaussian window, per frame and channel, averaged.

    Local means/variances/covariance use an 11×11 Gaussian window (σ = 1.5) over the *valid*
    region (no padding); frames smaller than the window use a window of the largest odd size that
    fits. ``C1 = (k1·L)²``, ``C2 = (k2·L)²`` with ``L = data_range``.
    """
    _same_shape(video_a, video_b, "ssim")
    fa, fb = _frames(video_a), _frames(video_b)
    _, c, h, w = fa.shape
    size = min(window_size, h, w)
    size = size if size % 2 == 1 else size - 1
    win = _gaussian_window(size, sigma).expand(c, 1, size, size).contiguous()

    def filt(z: Tensor) -> Tensor:
        return torch.nn.functional.conv2d(z, win, groups=c)

    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    mu_a, mu_b = filt(fa), filt(fb)
    var_a = filt(fa * fa) - mu_a**2
    var_b = filt(fb * fb) - mu_b**2
    cov = filt(fa * fb) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2)
    return float((num / den).mean())


def _as_uint8_thwc(video: Any) -> np.ndarray:
    arr = video.detach().cpu().numpy() if isinstance(video, Tensor) else np.asarray(video)
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ValueError(f"expected a uint8 video (T, H, W, 3); got dtype {arr.dtype}, shape {arr.shape}")
    return arr


def to_uint8_videos(video: Tensor) -> list[np.ndarray]:
    """Decoded frames (B, 3, T, H, W) in [-1, 1] → a list of B uint8 videos (T, H, W, 3).

    ``round((x + 1) · 127.5)`` after clamping, the usual mapping for writing mp4/GIF and for
    :func:`flicker_score` / :func:`prompt_adherence`.
    """
    if video.ndim != 5 or video.shape[1] != 3:
        raise ValueError(
            f"to_uint8_videos expects (B, 3, T, H, W) in [-1, 1]; got shape {tuple(video.shape)}"
        )
    v = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [np.ascontiguousarray(x.permute(1, 2, 3, 0).cpu().numpy()) for x in v]


def temporal_flicker(video: Any) -> float:
    """Mean absolute difference between consecutive frames.

    Accepts a uint8 video (T, H, W, 3) — result in uint8 levels (0–255) — or a float tensor
    (B, C, T, H, W) — result in the input's units (e.g. [-1, 1] frames). Needs T ≥ 2.
    """
    if isinstance(video, Tensor) and video.is_floating_point():
        if video.ndim != 5 or video.shape[2] < 2:
            raise ValueError(f"temporal_flicker expects (B, C, T>=2, H, W); got shape {tuple(video.shape)}")
        v = video.detach().double()
        return float((v[:, :, 1:] - v[:, :, :-1]).abs().mean())
    arr = _as_uint8_thwc(video)
    if arr.shape[0] < 2:
        raise ValueError(f"temporal_flicker needs at least 2 frames; got {arr.shape[0]}")
    a = arr.astype(np.int16)
    return float(np.abs(a[1:] - a[:-1]).mean())


def flicker_score(video: Any) -> float:
    """VBench-style temporal-flickering score of a uint8 video: ``(255 − mean|Δ|) / 255`` in [0, 1].

    VBench's ``temporal_flickering`` averages ``cv2.absdiff`` over consecutive frame pairs and maps it
    with this formula (1 = perfectly static). VBench additionally filters for static prompts; this is
    the raw per-video score.
    """
    return (255.0 - temporal_flicker(_as_uint8_thwc(video))) / 255.0


def _flat(x: Tensor | np.ndarray, what: str) -> Tensor:
    t = torch.as_tensor(np.asarray(x)) if not isinstance(x, Tensor) else x.detach()
    t = t.double().reshape(t.shape[0], -1)
    if t.shape[0] < 2:
        raise ValueError(f"{what}: the unbiased estimator needs at least 2 samples per set; got {t.shape[0]}")
    return t


def _offdiag_mean(k: Tensor) -> Tensor:
    n = k.shape[0]
    return (k.sum() - k.diagonal().sum()) / (n * (n - 1))


def energy_distance(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> float:
    """Unbiased energy distance ``2·E|X−Y| − E|X−X'| − E|Y−Y'|`` between sample sets (n, d) and (m, d).

    Inputs with more than two dims are flattened per sample. The within-set terms are U-statistics
    (pairs i ≠ j), so the estimate is unbiased and can be slightly negative for equal distributions.
    """
    x, y = _flat(a, "energy_distance"), _flat(b, "energy_distance")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"energy_distance: feature sizes differ ({x.shape[1]} vs {y.shape[1]}).")
    xy = torch.cdist(x, y).mean()
    return float(2 * xy - _offdiag_mean(torch.cdist(x, x)) - _offdiag_mean(torch.cdist(y, y)))


def median_bandwidth(a: Tensor | np.ndarray, b: Tensor | np.ndarray) -> float:
    """Median heuristic: the median of the pairwise distances (i < j) in the pooled sample."""
    z = torch.cat([_flat(a, "median_bandwidth"), _flat(b, "median_bandwidth")])
    d = torch.cdist(z, z)
    iu = torch.triu_indices(z.shape[0], z.shape[0], offset=1)
    med = float(d[iu[0], iu[1]].median())
    return med if med > 0 else 1.0


def mmd_rbf(a: Tensor | np.ndarray, b: Tensor | np.ndarray, bandwidth: float | None = None) -> float:
    """Unbiased squared MMD with the Gaussian kernel ``k(x, y) = exp(−|x−y|² / (2·bandwidth²))``.

    ``bandwidth=None`` uses the median heuristic on the pooled samples. Within-set kernel means
    exclude the diagonal (U-statistic); the estimate may be slightly negative for equal distributions.
    """
    x, y = _flat(a, "mmd_rbf"), _flat(b, "mmd_rbf")
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"mmd_rbf: feature sizes differ ({x.shape[1]} vs {y.shape[1]}).")
    s = median_bandwidth(x, y) if bandwidth is None else float(bandwidth)
    if s <= 0:
        raise ValueError(f"mmd_rbf: bandwidth must be positive; got {bandwidth}")

    def k(p: Tensor, q: Tensor) -> Tensor:
        return torch.exp(-torch.cdist(p, q).pow(2) / (2 * s * s))

    return float(_offdiag_mean(k(x, x)) + _offdiag_mean(k(y, y)) - 2 * k(x, y).mean())


def prompt_adherence(videos: Sequence[Any], attributes: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Fraction of procedural-dataset videos whose frames show the caption's colour and motion.

    Args:
        videos: uint8 videos (T, H, W, 3), one per caption.
        attributes: the caption attributes (``{"colour": ..., "motion": ..., ...}``) as produced by
            :func:`anyflow.data.procedural.make_clip`.

    Returns:
        ``{"colour_accuracy", "motion_accuracy", "joint_accuracy", "n", "per_video": [...]}``.
    """
    from anyflow.data.procedural import measure_attributes  # written by the data layer

    if len(videos) != len(attributes):
        raise ValueError(
            f"prompt_adherence: {len(videos)} videos but {len(attributes)} attribute dicts; pass one per video."
        )
    if not videos:
        raise ValueError("prompt_adherence: no videos given.")
    per: list[dict[str, Any]] = []
    for video, attr in zip(videos, attributes, strict=True):
        for key in ("colour", "motion"):
            if key not in attr:
                raise ValueError(f"prompt_adherence: attributes lack {key!r} (got keys {sorted(attr)}).")
        got = measure_attributes(_as_uint8_thwc(video))
        c_ok = got["colour"] == attr["colour"]
        m_ok = got["motion"] == attr["motion"]
        per.append({"colour": got["colour"], "motion": got["motion"], "colour_ok": c_ok, "motion_ok": m_ok})
    n = len(per)
    return {
        "colour_accuracy": sum(p["colour_ok"] for p in per) / n,
        "motion_accuracy": sum(p["motion_ok"] for p in per) / n,
        "joint_accuracy": sum(p["colour_ok"] and p["motion_ok"] for p in per) / n,
        "n": n,
        "per_video": per,
    }


@dataclass
class MetricTable:
    """Rows ``(model, nfe, metric, value)`` with nested-dict, JSON and markdown views."""

    rows: list[tuple[str, int, str, float]] = field(default_factory=list)

    def add(self, model: str, nfe: int, metric: str, value: float) -> None:
        """Append one measurement (a later row with the same key overrides an earlier one)."""
        self.rows.append((str(model), int(nfe), str(metric), float(value)))

    def to_nested(self) -> dict[str, dict[int, dict[str, float]]]:
        """``{model: {nfe: {metric: value}}}`` with models in insertion order and NFEs sorted."""
        out: dict[str, dict[int, dict[str, float]]] = {}
        for model, nfe, metric, value in self.rows:
            out.setdefault(model, {}).setdefault(nfe, {})[metric] = value
        return {m: dict(sorted(v.items())) for m, v in out.items()}

    @classmethod
    def from_nested(cls, nested: Mapping[str, Mapping[Any, Mapping[str, float]]]) -> MetricTable:
        """Inverse of :meth:`to_nested` (NFE keys may be strings, as after a JSON round trip)."""
        table = cls()
        for model, by_nfe in nested.items():
            for nfe, metrics in by_nfe.items():
                for metric, value in metrics.items():
                    table.add(model, int(nfe), metric, value)
        return table

    def metrics(self) -> list[str]:
        """Metric names in first-seen order."""
        return list(dict.fromkeys(r[2] for r in self.rows))

    def to_json(self, path: str | Path | None = None) -> str:
        """JSON text of :meth:`to_nested`; also written to ``path`` when given."""
        text = json.dumps(self.to_nested(), indent=2, sort_keys=False)
        if path is not None:
            Path(path).write_text(text + "\n", encoding="utf-8")
        return text

    def to_markdown(self, precision: int = 4) -> str:
        """A markdown table: one row per (model, NFE), one column per metric; blank where missing."""
        names = self.metrics()
        lines = ["| model | NFE | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
        for model, by_nfe in self.to_nested().items():
            for nfe, metrics in by_nfe.items():
                cells = [format_value(metrics[m], precision) if m in metrics else "" for m in names]
                lines.append(f"| {model} | {nfe} | " + " | ".join(cells) + " |")
        return "\n".join(lines)


def format_value(value: float, precision: int = 4) -> str:
    """Format a metric for tables: fixed ``precision`` significant digits, ``inf``/``nan`` spelled out."""
    if isinstance(value, float) and (math.isinf(value) or math.isnan(value)):
        return str(value)
    return f"{value:.{precision}g}"
