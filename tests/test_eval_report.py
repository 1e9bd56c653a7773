"""report.html: every promised metric and image is there, it is self-contained, and it renders."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest

from anyflow.eval.metrics import MetricTable, format_value
from anyflow.eval.report import build_report, count_images

ROOT = Path(__file__).resolve().parents[1]


class _Collector(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.imgs: list[dict[str, str]] = []
        self.links: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "img":
            self.imgs.append(a)
        for key in ("src", "href"):
            if key in a:
                self.links.append(a[key])

    def handle_data(self, data):
        self.text.append(data)


def _moving_square(colour, frames=6, size=24):
    v = np.zeros((frames, size, size, 3), dtype=np.uint8)
    for t in range(frames):
        v[t, 8:16, 2 + 2 * t : 10 + 2 * t] = colour
    return v


def _data(tmp_path: Path) -> dict:
    table = MetricTable()
    for model, base in (("teacher", 0.30), ("flowmap", 0.20), ("distilled", 0.10)):
        for nfe in (1, 2, 4, 8):
            table.add(model, nfe, "coupled_mse", base / nfe + 0.0123)
            table.add(model, nfe, "psnr", 20.0 + nfe + base)
    log = tmp_path / "distill.jsonl"
    log.write_text(
        "".join(
            json.dumps({"step": s, "loss": 1.0 / (s + 1), "loss/diffusion": 0.5 / (s + 1)}) + "\n"
            for s in range(20)
        )
    )
    return {
        "title": "tiny run <test>",
        "summary": {"preset": "tiny", "seeds": "0,1,2"},
        "metrics": table.to_nested(),
        "samples": {
            "teacher": {1: _moving_square((220, 40, 40)), 4: _moving_square((40, 190, 60))},
            "distilled": {
                1: [_moving_square((45, 80, 230)), _moving_square((235, 215, 40))],
                4: _moving_square((210, 50, 210)),
            },
        },
        "losses": {
            "train_teacher": [{"step": s, "loss": 2.0 - 0.1 * s} for s in range(10)],
            "distill": str(log),
        },
        "lineage": [
            {"stage": "prepare_data", "uri": "s3://b/data", "digest": "ab" * 32, "parents": []},
            {
                "stage": "distill",
                "uri": "s3://b/distill",
                "digest": "cd" * 32,
                "parents": ["s3://b/data", "s3://b/flowmap"],
            },
        ],
        "promotions": {
            "live": "flowmap",
            "candidate": "distilled",
            "history": [
                {
                    "model": "flowmap",
                    "since": "2026-01-02T03:00:00Z",
                    "uri": "s3://b/flowmap",
                    "metrics": {"coupled_mse": 0.0623},
                }
            ],
        },
        "vbench": {
            "distilled": {
                "dimensions": {
                    "temporal_flickering": {"status": "ok", "score": 0.9812},
                    "aesthetic_quality": {
                        "status": "not run",
                        "reason": "model weights not available offline",
                    },
                }
            },
        },
        "notes": ["CPU smoke run; numbers are not comparable to the paper."],
    }


def test_report_contains_every_metric_and_image(tmp_path):
    data = _data(tmp_path)
    path = build_report(data, tmp_path / "out" / "report.html")
    text = path.read_text(encoding="utf-8")
    parser = _Collector()
    parser.feed(text)
    # 2 metric plots + 4 sample GIFs + 2 loss plots + 2 candidate-vs-live plots.
    assert len(parser.imgs) == 10 == count_images(data)
    assert sum(i["src"].startswith("data:image/gif;base64,") for i in parser.imgs) == 4
    assert sum(i["src"].startswith("data:image/png;base64,") for i in parser.imgs) == 6
    for img in parser.imgs:  # each image decodes and is a real PNG/GIF
        import base64

        raw = base64.b64decode(img["src"].split(",", 1)[1])
        assert raw[:4] in (b"\x89PNG", b"GIF8") and len(raw) > 200
    body = "".join(parser.text)
    for model, by_nfe in data["metrics"].items():
        for nfe, vals in by_nfe.items():
            for value in vals.values():
                assert format_value(value) in body, (model, nfe, value)
    assert "0.0623" in body and "2026-01-02T03:00:00Z" in body  # promotion history
    assert "0.9812" in body and "not run: model weights not available offline" in body
    assert "Aggregate not computed" in body
    assert "s3://b/flowmap" in body and "abababababababab" in body  # lineage
    assert "tiny run <test>" in body and "<test>" not in text.replace("&lt;test&gt;", "")  # escaped title


def test_report_is_self_contained(tmp_path):
    text = build_report(_data(tmp_path), tmp_path / "report.html").read_text()
    parser = _Collector()
    parser.feed(text)
    assert parser.links and all(link.startswith("data:") for link in parser.links)
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", text)
    assert "@import" not in text and "url(" not in text


def test_report_minimal_and_bad_input(tmp_path):
    path = build_report({"title": "empty"}, tmp_path / "r.html")
    assert "<img" not in path.read_text()
    with pytest.raises(ValueError, match="unknown keys"):
        build_report({"title": "x", "metricz": {}}, tmp_path / "r.html")
    with pytest.raises(ValueError, match="uint8"):
        build_report({"samples": {"m": {1: np.zeros((2, 4, 4, 3), dtype=np.float32)}}}, tmp_path / "r.html")


@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="Debian chromium not installed (apt-get install -y chromium)"
)
def test_report_renders_in_headless_chromium(tmp_path):
    from PIL import Image

    report = build_report(_data(tmp_path), tmp_path / "report.html")
    png = tmp_path / "shot.png"
    proc = subprocess.run(
        ["bash", str(ROOT / "scripts" / "screenshot_report.sh"), str(report), str(png), "1280x2000"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    img = np.asarray(Image.open(png).convert("RGB"))
    assert img.shape[:2] == (2000, 1280)
    colours = np.unique(img.reshape(-1, 3)[::97], axis=0)
    assert len(colours) > 50  # text, plots and GIF frames, not a blank page
    # Plot pixels (matplotlib's default blue line) appear, so images were decoded and drawn.
    blue = (np.abs(img.astype(int) - (31, 119, 180)).sum(-1) < 30).sum()
    assert blue > 100
