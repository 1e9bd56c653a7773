"""Metric functions against hand-computed cases (issue 7)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from anyflow.eval.metrics import (
    MetricTable,
    coupled_error,
    energy_distance,
    flicker_score,
    mmd_rbf,
    prompt_adherence,
    psnr,
    ssim,
    temporal_flicker,
    to_uint8_videos,
)


def _video(seed: int, shape=(2, 3, 3, 16, 16)) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1


def test_coupled_error_hand_computed():
    x_ref = torch.zeros(2, 1, 2, 1, 2)
    x = x_ref.clone()
    x[0] += 1.0  # sample 0: every entry off by 1 → MSE 1
    x[1, 0, 0, 0, 0] = 2.0  # sample 1: two of its 4 entries off by 2 → MSE (4 + 4) / 4 = 2
    x[1, 0, 1, 0, 1] = 2.0
    out = coupled_error(x, x_ref)
    assert out["mse_per_sample"] == pytest.approx([1.0, 2.0])
    assert out["mse"] == pytest.approx(1.5)
    assert out["rmse"] == pytest.approx(math.sqrt(1.5))
    with pytest.raises(ValueError, match="shapes differ"):
        coupled_error(x, x_ref[:1])


def test_psnr_identical_is_inf_and_constant_error_matches_formula():
    a = _video(0)
    assert math.isinf(psnr(a, a.clone()))
    # Every pixel off by 0.1 → MSE 0.01 → PSNR = 10·log10(2² / 0.01) = 26.0206 dB.
    assert psnr(a, a + 0.1) == pytest.approx(10 * math.log10(4 / 0.01), abs=1e-9)
    # Known noise: ±0.2 with random signs has MSE exactly 0.04 → 10·log10(100) = 20 dB.
    signs = torch.where(_video(1) > 0, 1.0, -1.0).double()
    assert psnr(a, a + 0.2 * signs) == pytest.approx(20.0, abs=1e-9)
    # data_range enters as range²: range 1 → 6.02 dB less.
    assert psnr(a, a + 0.1, data_range=1.0) == pytest.approx(10 * math.log10(1 / 0.01), abs=1e-9)


def test_ssim_identical_constant_shift_and_single_window_reference():
    a = _video(2)
    assert ssim(a, a.clone()) == pytest.approx(1.0, abs=1e-12)
    # Constant images m and m + c: σ = 0 everywhere so SSIM = (2m(m+c) + C1) / (m² + (m+c)² + C1).
    m, c, L = 0.2, 0.5, 2.0
    c1 = (0.01 * L) ** 2
    const = torch.full((1, 3, 2, 12, 12), m, dtype=torch.float64)
    expected = (2 * m * (m + c) + c1) / (m**2 + (m + c) ** 2 + c1)
    assert ssim(const, const + c) == pytest.approx(expected, abs=1e-12)
    # A frame of exactly one 11×11 window: compare with a direct numpy evaluation of the formula.
    g = torch.Generator().manual_seed(3)
    x = torch.rand(1, 1, 1, 11, 11, generator=g, dtype=torch.float64) * 2 - 1
    y = (0.7 * x + 0.3 * torch.rand(1, 1, 1, 11, 11, generator=g, dtype=torch.float64)).clamp(-1, 1)
    k = np.exp(-((np.arange(11) - 5.0) ** 2) / (2 * 1.5**2))
    w = np.outer(k, k) / np.outer(k, k).sum()
    xn, yn = x.numpy()[0, 0, 0], y.numpy()[0, 0, 0]
    mx, my = (w * xn).sum(), (w * yn).sum()
    vx, vy = (w * (xn - mx) ** 2).sum(), (w * (yn - my) ** 2).sum()
    cxy = (w * (xn - mx) * (yn - my)).sum()
    c2 = (0.03 * L) ** 2
    ref = (2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))
    assert ssim(x, y) == pytest.approx(ref, abs=1e-12)
    assert ssim(x, y) < 0.99
    # Noise lowers SSIM monotonically.
    noise = _video(4)
    assert ssim(a, a + 0.05 * noise) > ssim(a, a + 0.3 * noise)


def test_temporal_flicker_and_vbench_score():
    v = np.zeros((3, 4, 4, 3), dtype=np.uint8)
    v[1] = 10  # |Δ| = 10 then 10 → mean 10
    assert temporal_flicker(v) == pytest.approx(10.0)
    assert flicker_score(v) == pytest.approx((255 - 10) / 255)
    assert flicker_score(np.full((4, 2, 2, 3), 77, dtype=np.uint8)) == 1.0
    # uint8 arithmetic must not wrap around: 0 → 255 is a difference of 255.
    w = np.zeros((2, 1, 1, 3), dtype=np.uint8)
    w[1] = 255
    assert temporal_flicker(w) == 255.0 and flicker_score(w) == 0.0
    # Float (B, C, T, H, W): frames 0, 0.5, 0.5 → mean(|0.5|, 0) = 0.25.
    f = torch.zeros(1, 3, 3, 2, 2)
    f[:, :, 1:] = 0.5
    assert temporal_flicker(f) == pytest.approx(0.25)
    with pytest.raises(ValueError, match="uint8"):
        flicker_score(v.astype(np.float32))


def test_energy_distance_hand_computed_and_sanity():
    a = torch.tensor([[0.0], [1.0]])
    b = torch.tensor([[3.0], [5.0]])
    # 2·mean(3, 5, 2, 4) − mean_{i≠j}|a| − mean_{i≠j}|b| = 7 − 1 − 2 = 4.
    assert energy_distance(a, b) == pytest.approx(4.0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 4, generator=g)
    y = torch.randn(200, 4, generator=g)
    same = energy_distance(x, y)
    assert abs(same) < 0.1
    shifts = [energy_distance(x, y + s) for s in (0.5, 1.0, 2.0)]
    assert same < shifts[0] < shifts[1] < shifts[2]
    # Flattening: (n, 2, 2) behaves like (n, 4).
    assert energy_distance(x.view(200, 2, 2), y.view(200, 2, 2)) == pytest.approx(same)


def test_mmd_rbf_hand_computed_and_sanity():
    a = torch.tensor([[0.0], [1.0]])
    b = torch.tensor([[2.0], [4.0]])

    def k(d: float) -> float:
        return math.exp(-(d**2) / 2)  # bandwidth 1

    expected = k(1) + k(2) - 2 * (k(2) + k(4) + k(1) + k(3)) / 4
    assert mmd_rbf(a, b, bandwidth=1.0) == pytest.approx(expected)

    # Median heuristic on pooled {0, 1, 2, 4}: distances 1,2,4,1,3,2 → median 2.
    def k2(d: float) -> float:
        return math.exp(-(d**2) / 8)

    expected2 = k2(1) + k2(2) - 2 * (k2(2) + k2(4) + k2(1) + k2(3)) / 4
    assert mmd_rbf(a, b) == pytest.approx(expected2)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(200, 4, generator=g)
    y = torch.randn(200, 4, generator=g)
    same = mmd_rbf(x, y, bandwidth=2.0)
    assert abs(same) < 0.01
    shifts = [mmd_rbf(x, y + s, bandwidth=2.0) for s in (0.5, 1.0, 2.0)]
    assert same < shifts[0] < shifts[1] < shifts[2]


def _moving_square(colour_rgb, direction: int, frames: int = 8, size: int = 32) -> np.ndarray:
    v = np.zeros((frames, size, size, 3), dtype=np.uint8)
    for t in range(frames):
        x0 = 2 + t * 2 if direction > 0 else size - 12 - t * 2
        v[t, 10:20, x0 : x0 + 10] = colour_rgb
    return v


def test_prompt_adherence_on_hand_built_videos():
    red_right = _moving_square((220, 40, 40), +1)
    blue_left = _moving_square((45, 80, 230), -1)
    good = [{"colour": "red", "motion": "right"}, {"colour": "blue", "motion": "left"}]
    out = prompt_adherence([red_right, blue_left], good)
    assert (out["colour_accuracy"], out["motion_accuracy"], out["joint_accuracy"], out["n"]) == (
        1.0,
        1.0,
        1.0,
        2,
    )
    wrong = [{"colour": "red", "motion": "left"}, {"colour": "green", "motion": "left"}]
    out = prompt_adherence([red_right, blue_left], wrong)
    assert out["colour_accuracy"] == 0.5 and out["motion_accuracy"] == 0.5 and out["joint_accuracy"] == 0.0
    with pytest.raises(ValueError, match="one per video"):
        prompt_adherence([red_right], good)


def test_prompt_adherence_on_procedural_clips():
    from anyflow.data.procedural import make_clip

    clips = [make_clip(0, i, frames=8, height=32, width=32) for i in range(6)]
    out = prompt_adherence([c.video for c in clips], [c.attributes for c in clips])
    assert out["joint_accuracy"] == 1.0
    shuffled = [clips[(i + 1) % 6].attributes for i in range(6)]
    assert prompt_adherence([c.video for c in clips], shuffled)["joint_accuracy"] < 1.0


def test_metric_table_views(tmp_path):
    t = MetricTable()
    t.add("distilled", 4, "coupled_mse", 0.125)
    t.add("distilled", 1, "coupled_mse", 0.5)
    t.add("teacher", 4, "psnr", 31.5)
    nested = t.to_nested()
    assert list(nested["distilled"]) == [1, 4]
    assert nested == {
        "distilled": {1: {"coupled_mse": 0.5}, 4: {"coupled_mse": 0.125}},
        "teacher": {4: {"psnr": 31.5}},
    }
    back = MetricTable.from_nested(json.loads(t.to_json(tmp_path / "m.json")))
    assert back.to_nested() == nested
    assert json.loads((tmp_path / "m.json").read_text())["teacher"]["4"]["psnr"] == 31.5
    md = t.to_markdown().splitlines()
    assert md[0] == "| model | NFE | coupled_mse | psnr |"
    assert md[2] == "| distilled | 1 | 0.5 |  |"
    assert md[4] == "| teacher | 4 |  | 31.5 |"


def test_to_uint8_videos_layout_and_range():
    v = torch.zeros(2, 3, 4, 5, 6)
    v[1, 0, 2, 3, 4] = 1.0  # red channel, frame 2, row 3, column 4 of sample 1
    v[1, 2] = -1.0  # blue channel of sample 1 fully dark
    v[0] = 2.0  # out of range → clamped to 255
    out = to_uint8_videos(v)
    assert len(out) == 2 and out[0].shape == (4, 5, 6, 3) and out[0].dtype == np.uint8
    assert (out[0] == 255).all()
    assert out[1][2, 3, 4].tolist() == [
        255,
        128,
        0,
    ]  # (1+1)·127.5, (0+1)·127.5 rounded half-even, (−1+1)·127.5
    assert out[1][0, 0, 0].tolist() == [128, 128, 0]
