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


class _Tables(HTMLParser):
    """Every table as rows of cell texts; figure captions; all text."""

    def __init__(self) -> None:
        super().__init__()
        self.tables: list[list[list[str]]] = []
        self.captions: list[str] = []
        self.text: list[str] = []
        self._cell: list[str] | None = None
        self._caption: list[str] | None = None

    def handle_starttag(self, tag, attrs):
        if tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = []
        elif tag == "br" and self._cell is not None:
            self._cell.append("\n")
        elif tag == "figcaption":
            self._caption = []

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append("".join(self._cell).strip())
            self._cell = None
        elif tag == "figcaption" and self._caption is not None:
            self.captions.append("".join(self._caption))
            self._caption = None

    def handle_data(self, data):
        self.text.append(data)
        for buf in (self._cell, self._caption):
            if buf is not None:
                buf.append(data)


def _parse(path: Path) -> _Tables:
    p = _Tables()
    p.feed(path.read_text(encoding="utf-8"))
    return p


def _published_lineage(store: Path) -> tuple[list[dict], dict[str, Path]]:
    """prepare_data → train_flowmap → distill (which also lists the dataset) published with anyflow.storage, as
    run_stage publishes them; returns storage.lineage(distill) and each stage's folder."""
    from anyflow import storage

    dirs = {}
    for name, kind, parents in (("prepare_data", "dataset", []), ("train_flowmap", "flowmap", ["prepare_data"]),
                                ("distill", "generator", ["train_flowmap", "prepare_data"])):
        src = store / "src" / name
        src.mkdir(parents=True)
        (src / "payload.txt").write_text(name)
        dirs[name] = store / "artifacts" / name
        storage.publish(src, dirs[name], kind=kind, parents=[str(dirs[p]) for p in parents],
                        extra={"stage": name, "cache_key": name})
    return storage.lineage(str(dirs["distill"])), dirs


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
        "lineage": _published_lineage(tmp_path / "store")[0],
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
    assert "s3://b/flowmap" in body and "distill" in body  # promotion history, lineage
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


def browser_check(report: Path, tmp_path: Path) -> dict:
    """Open a copy of ``report`` in headless Chromium with a probe script appended and return what the browser
    saw after the page's load event: every <img> (complete, natural size), every src/href that is neither a
    data: URI nor an anchor to an id on the page (a broken link, offline), and the page's text length.

    The probe only reads the DOM; ``--dump-dom`` prints it after the scripts ran, with the result in a <pre>.
    """
    probe = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images].map(i => ({src: i.src.slice(0, 40), ok: i.complete && i.naturalWidth > 0,
                                               w: i.naturalWidth, h: i.naturalHeight}));
  const broken = [];
  for (const el of document.querySelectorAll('[src],[href]')) {
    const v = el.getAttribute('src') ?? el.getAttribute('href');
    if (v.startsWith('data:')) continue;
    if (v.startsWith('#') && (v === '#' || document.getElementById(decodeURIComponent(v.slice(1))))) continue;
    broken.push(v.slice(0, 80));
  }
  const pre = document.createElement('pre');
  pre.id = 'anyflow-browser-check';
  pre.textContent = JSON.stringify({imgs, broken, text: document.body.innerText.length});
  document.body.appendChild(pre);
});
</script>"""
    page = tmp_path / "probed.html"
    text = report.read_text(encoding="utf-8")
    page.write_text(text.replace("</body>", probe + "</body>") if "</body>" in text else text + probe,
                    encoding="utf-8")
    profile = tmp_path / "chromium-profile"
    proc = subprocess.run(
        [shutil.which("chromium"), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
         "--virtual-time-budget=10000", "--dump-dom", page.as_uri()],
        capture_output=True, text=True, timeout=120,
    )
    found = re.search(r'<pre id="anyflow-browser-check">(.*?)</pre>', proc.stdout, re.DOTALL)
    assert found, f"the probe did not run (rc {proc.returncode}): {proc.stderr[-1000:]}"
    import html as _html

    return json.loads(_html.unescape(found.group(1)))


@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="Debian chromium not installed (apt-get install -y chromium)"
)
def test_report_images_load_and_no_link_is_broken_in_chromium(tmp_path):
    """In a real browser every image of the report decodes (plots and GIF previews have their drawn size) and
    no src/href points anywhere but inline data or an anchor on the page. Control: a report with a file link
    beside it that does not exist is seen as broken, its image as not loaded."""
    data = _data(tmp_path)
    report = build_report(data, tmp_path / "report.html")
    seen = browser_check(report, tmp_path)
    assert len(seen["imgs"]) == count_images(data) and seen["imgs"], seen
    assert all(i["ok"] and i["w"] > 0 and i["h"] > 0 for i in seen["imgs"]), seen["imgs"]
    assert seen["broken"] == [] and seen["text"] > 500, seen
    bad = tmp_path / "bad" / "report.html"
    bad.parent.mkdir()
    bad.write_text(report.read_text(encoding="utf-8").replace("</body>", '<img src="samples/gone.gif"></body>'))
    seen = browser_check(bad, tmp_path / "bad")
    assert seen["broken"] == ["samples/gone.gif"] and [i["ok"] for i in seen["imgs"]].count(False) == 1, seen


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


def test_lineage_table_names_each_stage_digest_and_parent(tmp_path):
    import hashlib

    lineage, dirs = _published_lineage(tmp_path / "store")
    page = _parse(build_report({"title": "t", "lineage": lineage}, tmp_path / "r.html"))
    table = next(t for t in page.tables if t[0][0] == "stage")
    rows = {r[0].replace("\xa0", "").strip(): dict(zip(table[0], r, strict=True)) for r in table[1:]}
    # the published manifests themselves: their sha256 is what children record
    digest = {name: hashlib.sha256((d / "manifest.json").read_bytes()).hexdigest() for name, d in dirs.items()}
    assert set(rows) == {"prepare_data", "train_flowmap", "distill"}
    for name, row in rows.items():
        assert row["uri"] == str(dirs[name])
        assert row["manifest digest"] == digest[name][:16]
    assert rows["distill"]["parents"].splitlines() == [f"train_flowmap {digest['train_flowmap'][:16]}",
                                                       f"prepare_data {digest['prepare_data'][:16]}"]
    assert rows["train_flowmap"]["parents"] == f"prepare_data {digest['prepare_data'][:16]}"
    assert rows["prepare_data"]["parents"] == "none"
    assert rows["train_flowmap"]["check"] == "as recorded"


def test_summary_renders_mappings_and_lists(tmp_path):
    checkpoints = {"teacher": "/s/artifacts/train_teacher/k1", "generator": "/s/artifacts/distill/k2"}
    page = _parse(build_report({"title": "t", "summary": {"nfes": [1, 2, 4], "checkpoints": checkpoints}},
                               tmp_path / "r.html"))
    rows = {r[0]: r[1] for r in page.tables[0][1:]}
    assert rows["nfes"] == "1, 2, 4"
    assert rows["checkpoints"].splitlines() == [f"{k}: {v}" for k, v in checkpoints.items()]
    assert not any("{" in cell for row in page.tables[0] for cell in row)


def test_coinciding_curves_are_captioned(tmp_path):
    table = MetricTable()
    for nfe in (1, 2, 4):
        table.add("teacher", nfe, "coupled_mse", 0.3 / nfe)
        table.add("flowmap", nfe, "coupled_mse", 0.1 + 0.01 * nfe)
        table.add("generator", nfe, "coupled_mse", 0.1 + 0.01 * nfe)  # the flow map's values: hidden under it
        for model, v in (("teacher", 20.0), ("flowmap", 30.0), ("generator", 40.0)):
            table.add(model, nfe, "psnr", v + nfe)  # apart
    page = _parse(build_report({"title": "t", "metrics": table.to_nested()}, tmp_path / "r.html"))
    mse = [c for c in page.captions if "generator" in c]
    assert len(mse) == 1 and "flowmap" in mse[0] and "identical" in mse[0] and "teacher" not in mse[0]
    assert len(page.captions) == 1  # psnr: the curves are apart, nothing to say


def test_loss_section_merges_equal_series_and_gives_a_robust_final_loss(tmp_path):
    values = [1.1, 0.07, 1.6, 1.8, 0.6, 1.8, 1.9, 0.5, 1.6, 2.0, 1.1, 1.3, 1.2, 2.0, 0.07, 2.2, 1.1, 1.9, 1.6, 1.1,
              1.8, 2.1, 0.5, 0.0]  # the tiny run's flow-map loss: its last step is exactly 0
    records = [{"step": i + 1, "loss": v, "loss/diffusion": v, "loss/general": 1.0 + i % 3}
               for i, v in enumerate(values)]
    page = _parse(build_report({"title": "t", "losses": {"flowmap": records}}, tmp_path / "r.html"))
    assert len(page.captions) == 1 and "loss = loss/diffusion" in page.captions[0]
    table = next(t for t in page.tables if t[0][0] == "stage")
    rows = {r[1]: dict(zip(table[0], r, strict=True)) for r in table[1:]}
    assert set(rows) == {"loss = loss/diffusion", "loss/general"}
    row = rows["loss = loss/diffusion"]
    assert row["last step"] == "24" and row["loss at the last step"] == format_value(0.0)
    assert row["mean of the last quarter"] == f"{format_value(sum(values[-6:]) / 6)} (steps 19–24)"


def test_sample_previews_name_their_prompt(tmp_path):
    prompt = "a red square moving right"
    data = {"title": "t", "samples": {"teacher": {1: _moving_square((220, 40, 40))}}, "sample_prompts": [prompt]}
    page = _parse(build_report(data, tmp_path / "r.html"))
    assert prompt in "".join(page.text)


def test_previews_of_several_prompts_are_tiled_left_to_right(tmp_path):
    """Three prompts' samples in one cell: the GIF is the three videos side by side (each the clip scaled 64/24 ->
    3x, so six NFE columns fit the page; one prompt keeps 96 px, 4x), in the listed order, and the prompts are
    listed."""
    import base64
    import io

    from PIL import Image

    colours = [(220, 40, 40), (40, 190, 60), (45, 80, 230)]
    prompts = ["a red square moving right", "a green square moving right", "a blue square moving right"]
    for videos, scale in (([_moving_square(c) for c in colours], 3), (_moving_square(colours[0]), 4)):
        data = {"title": "t", "samples": {"teacher": {1: videos}}, "sample_prompts": prompts if scale == 3 else prompts[:1]}
        parser = _Collector()
        parser.feed(build_report(data, tmp_path / f"r{scale}.html").read_text(encoding="utf-8"))
        (gif,) = [i["src"] for i in parser.imgs if i["src"].startswith("data:image/gif")]
        im = Image.open(io.BytesIO(base64.b64decode(gif.split(",", 1)[1]))).convert("RGB")
        n = len(videos) if isinstance(videos, list) else 1
        assert im.size == (n * 24 * scale, 24 * scale), im.size
        first = np.asarray(im)  # frame 0: the square at rows 8..15, columns 2..9 of each tile
        for k in range(n):
            assert tuple(first[12 * scale, (k * 24 + 5) * scale]) == colours[k], k
        if n > 1:
            assert all(p in "".join(parser.text) for p in prompts)
