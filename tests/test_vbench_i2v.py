"""VBench-I2V in the evaluate stage of a FAR preset (docs/method.md §11, docs/evaluation-vbench.md).

A synthetic suite in VBench-I2V's published layout (``vbench2_i2v_full_info.json`` + ``data/crop/7-4/``,
procedural images) is read and validated; the far-tiny evaluate stage VAE-encodes each image as the
kept first latent frame, writes ``{prompt_en}-{i}.mp4`` and scores them through the subprocess runner:

* with a stand-in eval interpreter (``ANYFLOW_VBENCH_PYTHON`` = a script that checks what VBench-I2V
  would read: the info JSON, the image at ``vbench2_beta_i2v/data/crop/<ratio>/<image_name>`` relative to
  its working folder, the videos by their standard names) returning scores or a download failure;
* with the real eval environment (``.venv-eval``) when present, offline: the I2V dimensions must come
  back "not run" with the reason, never 0 (``temporal_flickering``, weight-free, is scored for real).
"""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from anyflow.eval import vbench as vb

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")

ROOT = Path(__file__).resolve().parent.parent
LOCAL_ENV = ROOT / ".venv-eval" / "bin" / "python"
FAST = {
    "teacher.train.steps": 2, "flowmap.train.steps": 2,
    "evaluate.nfes": "1,2", "evaluate.reference_steps": 4, "evaluate.num_prompts": 2,
    "far.long_context_ratio": 1.0,
}
# Two images (7:4, as the published "7-4" crops), a subject one and a background one, each also with a
# camera-motion entry.
IMAGES = {"a red box on green grass": (220, 40, 40), "a blue ball in a yellow sky": (40, 60, 220)}
# The published entries' dimension lists: a "subject" image and a "background" image (vbench2_i2v_full_info.json).
SUBJECT_DIMS = ["i2v_subject", "subject_consistency", "motion_smoothness", "dynamic_degree",
                "aesthetic_quality", "imaging_quality", "temporal_flickering"]
BACKGROUND_DIMS = ["i2v_background", "background_consistency", "aesthetic_quality", "imaging_quality",
                   "temporal_flickering"]
FAKE_SCORES = {
    "i2v_subject": 0.95, "i2v_background": 0.9, "camera_motion": 0.3, "subject_consistency": 0.93,
    "background_consistency": 0.94, "motion_smoothness": 0.98, "dynamic_degree": 0.4, "aesthetic_quality": 0.5,
    "imaging_quality": 0.6, "temporal_flickering": 0.97,
}


def _image(colour: tuple[int, int, int], seed: int) -> np.ndarray:
    """A 56×32 (7:4) procedural picture: a textured background and a coloured disc."""
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:56]
    img = np.stack([(xx * 4) % 256, (yy * 8) % 256, np.full_like(xx, 128)], -1).astype(np.float64)
    img += g.normal(0, 10, img.shape)
    disc = (xx - 20 - 12 * seed) ** 2 + (yy - 16) ** 2 < 100
    img[disc] = colour
    return np.clip(img, 0, 255).astype(np.uint8)


def _entries() -> list[dict]:
    out = []
    for caption, dims in zip(IMAGES, (SUBJECT_DIMS, BACKGROUND_DIMS), strict=True):
        out.append({"prompt_en": caption, "dimension": dims, "image_type": "other",
                    "image_name": f"{caption}.jpg"})
        out.append({"prompt_en": f"{caption}, camera pans left", "dimension": ["camera_motion"],
                    "image_type": "other", "image_name": f"{caption}.jpg"})
    return out


def make_suite(parent: Path, entries: list[dict] | None = None, ratio: str = "7-4") -> Path:
    """VBench's layout: ``<parent>/vbench2_beta_i2v/{vbench2_i2v_full_info.json, data/crop/<ratio>/*.jpg}``."""
    from PIL import Image

    root = parent / "vbench2_beta_i2v"
    crop = root / "data" / "crop" / ratio
    crop.mkdir(parents=True, exist_ok=True)
    for i, (caption, colour) in enumerate(IMAGES.items()):
        Image.fromarray(_image(colour, i)).save(crop / f"{caption}.jpg", quality=95)
    (root / vb.I2V_INFO_JSON).write_text(json.dumps(_entries() if entries is None else entries, indent=1))
    return root


# ------------------------------------------------------------------------------------ suite + config


def test_suite_is_read_in_the_published_layout(tmp_path: Path) -> None:
    root = make_suite(tmp_path)
    for source in (root, tmp_path):  # the vbench2_beta_i2v/ folder itself, or a checkout holding it
        suite = vb.load_i2v_suite(str(source), ratio="7-4")
        assert suite.root == root and suite.image_dir == root / "data" / "crop" / "7-4"
        assert [p.prompt for p in suite.pairs] == [e["prompt_en"] for e in _entries()]
        assert all(p.image.is_file() for p in suite.pairs)
    assert vb.i2v_video_name("a red box on green grass, camera pans left", 3) == "a red box on green grass, camera pans left-3.mp4"
    # dimension filter and limit keep the file order
    only_cam = vb.load_i2v_suite(str(root), dimensions=["camera_motion"])
    assert [p.prompt for p in only_cam.pairs] == [f"{c}, camera pans left" for c in IMAGES]
    assert len(vb.load_i2v_suite(str(root), limit=1).pairs) == 1
    assert vb.load_i2v_suite(str(root)).total_entries == 4


def _bad(tmp_path: Path, name: str, entries: list[dict] | None = None) -> Path:
    return make_suite(tmp_path / name, entries)


@pytest.mark.parametrize(
    "case, match",
    [
        ("no_folder", r"no such folder"),
        ("no_info", r"missing .*vbench2_i2v_full_info\.json"),
        ("no_ratio", r"missing the crop folder .*data/crop/16-9 .*the suite has \['7-4'\]"),
        ("no_image", r"1 image\(s\) named in .* are missing .*crop/7-4/a red box on green grass\.jpg"),
        ("no_image_name", r"entry 0 .*needs a non-empty 'image_name'"),
        ("camera_without_phrase", r"lists camera_motion but its prompt names none of"),
        ("slash_in_prompt", r"not a valid file name"),
        ("two_images", r"has two images"),
        ("not_json", r"not valid JSON"),
    ],
)
def test_bad_suite_layouts_give_clear_errors(tmp_path: Path, case: str, match: str) -> None:
    ratio = "7-4"
    if case == "no_folder":
        source = tmp_path / "nowhere"
    elif case == "no_info":
        source = _bad(tmp_path, case)
        (source / vb.I2V_INFO_JSON).unlink()
    elif case == "no_ratio":
        source, ratio = _bad(tmp_path, case), "16-9"
    elif case == "no_image":
        source = _bad(tmp_path, case)
        (source / "data" / "crop" / "7-4" / "a red box on green grass.jpg").unlink()
    else:
        entries = _entries()
        if case == "no_image_name":
            del entries[0]["image_name"]
        elif case == "camera_without_phrase":
            entries[1]["prompt_en"] = "a red box on green grass, moving"
        elif case == "slash_in_prompt":
            entries[0]["prompt_en"] = "a red/blue box"
        elif case == "two_images":
            entries[2]["prompt_en"] = entries[0]["prompt_en"]
            entries[2]["dimension"] = ["i2v_background"]
        source = _bad(tmp_path, case, entries)
        if case == "not_json":
            (source / vb.I2V_INFO_JSON).write_text("[{")
    with pytest.raises(vb.I2VSuiteError, match=match):
        vb.load_i2v_suite(str(source), ratio=ratio)


@pytest.mark.s3
def test_suite_url_is_mirrored(tmp_path: Path, s3_prefix: str) -> None:
    """A URL is fetched with anyflow.storage.mirror (as model.base is) and read from the local copy."""
    from anyflow import storage

    root = make_suite(tmp_path / "src")
    for f in sorted(root.rglob("*")):
        if f.is_file():
            storage.write_bytes(storage.join(s3_prefix, "vbench2_beta_i2v", *f.relative_to(root).parts), f.read_bytes())
    suite = vb.load_i2v_suite(s3_prefix, cache_dir=tmp_path / "cache")
    assert suite.source == s3_prefix and str(suite.root).startswith(str(tmp_path / "cache"))
    assert len(suite.pairs) == 4 and all(p.image.is_file() for p in suite.pairs)


def test_config_validation() -> None:
    from anyflow.config import ConfigError, apply_overrides, get_preset

    p = apply_overrides(get_preset("far-tiny"), {"evaluate.i2v_suite": "/suite", "evaluate.i2v_limit": 3})
    assert p.evaluate.i2v_ratio == "7-4" and p.evaluate.i2v_dimensions == vb.I2V_DIMENSIONS
    with pytest.raises(ConfigError, match=r"needs a causal FAR preset"):
        apply_overrides(get_preset("tiny"), {"evaluate.i2v_suite": "/suite"})
    with pytest.raises(ConfigError, match=r"evaluate.i2v_ratio='7:4'"):
        apply_overrides(get_preset("far-tiny"), {"evaluate.i2v_ratio": "7:4"})
    with pytest.raises(ConfigError, match=r"\['color'\] are not"):
        apply_overrides(get_preset("far-tiny"), {"evaluate.i2v_dimensions": "i2v_subject,color"})
    with pytest.raises(ConfigError, match=r"evaluate.i2v_limit=-1"):
        apply_overrides(get_preset("far-tiny"), {"evaluate.i2v_limit": -1})


# --------------------------------------------------------------------------------- evaluate stage


@pytest.fixture(scope="module")
def far_ckpts(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """far-tiny teacher and flow-map checkpoints (2 steps each); the flow-map artifact's generator adapter
    stands in for the ``generator`` input (the on-policy stage is not what this test is about)."""
    from anyflow.stages import run_stage

    store = str(tmp_path_factory.mktemp("i2v-store"))
    kw = {"preset": "far-tiny", "store": store, "overrides": FAST, "progress": False}
    dataset = run_stage("prepare_data", **kw).uri
    return {"store": store,
            "teacher": run_stage("train_teacher", inputs={"dataset": dataset}, **kw).uri,
            "generator": run_stage("train_flowmap", inputs={"dataset": dataset}, **kw).uri}


def _evaluate(far_ckpts: dict, overrides: dict) -> Path:
    from anyflow.stages import run_stage

    art = run_stage("evaluate", preset="far-tiny", store=far_ckpts["store"], overrides={**FAST, **overrides},
                    inputs={"teacher": far_ckpts["teacher"], "generator": far_ckpts["generator"]}, progress=False)
    return Path(art.uri)


FAKE_PYTHON = r'''
import json, os, sys
args = sys.argv[3:]  # called as: <this> -c <driver> ARGS
if "--probe" in args:
    print(json.dumps({"vbench": "fake"})); sys.exit(0)
opt = lambda k: args[args.index(k) + 1] if k in args else None
with open(os.environ["FAKE_LOG"], "a") as f:
    f.write(json.dumps(args) + "\n")
dim, out, videos = opt("--dimension"), opt("--output_path"), opt("--videos_path")
if opt("--api") == "i2v":
    # what vbench2_beta_i2v does: standard-mode lookup of {prompt_en}-{0..4}<ext of the first file> from the
    # info JSON, images by the relative path vbench2_beta_i2v/data/crop/<resolution>/<image_name>
    os.chdir(opt("--chdir"))
    names = os.listdir(videos)
    ext = os.path.splitext(names[0])[1]
    found = 0
    for e in json.load(open(opt("--full_json_dir"))):
        if dim not in e["dimension"]:
            continue
        image = os.path.join("vbench2_beta_i2v/data/crop", opt("--resolution"), e["image_name"])
        assert os.path.isfile(image), image
        videos_of = [n for n in (f"{e['prompt_en']}-{i}{ext}" for i in range(5)) if n in names]
        assert videos_of, ("no video for", e["prompt_en"], names)
        if dim == "camera_motion":
            assert any(m in videos_of[0] for m in json.loads(os.environ["FAKE_CAMERA"])), videos_of
        found += len(videos_of)
    assert found, ("nothing to score for", dim)
    if dim == "camera_motion" and "nfe1" in videos:
        print("File /cache/co-tracker does not exist. Downloading...", flush=True)
        sys.exit("urllib.error.URLError: <urlopen error [Errno 111] Connection refused>")
json.dump({dim: [json.loads(os.environ["FAKE_SCORES"])[dim], []]},
          open(os.path.join(out, "results_fake_eval_results.json"), "w"))
'''


def _expected_latent(image: Path, base) -> torch.Tensor:
    """The image → [-1, 1] at the preset's 32×32 (antialiased bilinear resize, not a crop) → VAE latent."""
    import torch.nn.functional as F
    from PIL import Image

    x = torch.from_numpy(np.array(Image.open(image).convert("RGB"))).permute(2, 0, 1)[None].float()
    x = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False) / 127.5 - 1
    with torch.no_grad():
        return base.vae.encode(x.permute(1, 0, 2, 3)[None])  # (1, 3, 1, H, W) → (1, 1, C, h, w)


def _uint8(frame: torch.Tensor) -> np.ndarray:
    return ((frame.clamp(-1, 1) + 1) * 127.5).round().permute(1, 2, 0).numpy()


def test_evaluate_stage_vbench_i2v(far_ckpts: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import imageio.v3 as iio

    from anyflow.config import apply_overrides, get_preset
    from anyflow.stages import common

    suite = make_suite(tmp_path / "suite")
    fake = tmp_path / "fake-python"
    fake.write_text(f"#!{sys.executable}\n{FAKE_PYTHON}")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    log = tmp_path / "fake.log"
    monkeypatch.setenv("ANYFLOW_VBENCH_PYTHON", str(fake))
    monkeypatch.setenv("FAKE_LOG", str(log))
    monkeypatch.setenv("FAKE_SCORES", json.dumps(FAKE_SCORES))
    monkeypatch.setenv("FAKE_CAMERA", json.dumps(vb.CAMERA_MOTIONS))

    import anyflow.causal

    rollouts: list[tuple[torch.Tensor, torch.Tensor]] = []  # (context, output) of every conditioned rollout
    original = anyflow.causal.causal_rollout

    def spy(*args, **kwargs):
        lat, info = original(*args, **kwargs)
        if kwargs.get("context") is not None:
            rollouts.append((kwargs["context"].clone(), lat.clone()))
        return lat, info

    monkeypatch.setattr(anyflow.causal, "causal_rollout", spy)
    out = _evaluate(far_ckpts, {"evaluate.vbench": True, "evaluate.i2v_suite": str(suite)})
    doc = json.loads((out / "metrics.json").read_text())
    assert "generator/i2v" in doc["metrics"] and "generator/nfe1" in doc["vbench"]  # held-out I2V and T2V kept
    prompts = [e["prompt_en"] for e in _entries()]
    base = common.load_models(apply_overrides(get_preset("far-tiny"), FAST))
    latent = {c: _expected_latent(suite / "data" / "crop" / "7-4" / f"{c}.jpg", base) for c in IMAGES}
    red, blue = latent.values()
    assert (red - blue).abs().max() > 1e-2  # the two images give different contexts
    want = torch.cat([latent[p.split(", camera")[0]] for p in prompts])  # suite order: one sample per pair
    suite_runs = [(ctx, lat) for ctx, lat in rollouts if ctx.shape == want.shape and torch.allclose(ctx, want, atol=1e-5)]
    assert len(suite_runs) == 2  # one rollout per NFE (4 samples < one batch)
    for n, (ctx, lat) in zip((1, 2), suite_runs, strict=True):
        assert torch.equal(lat[:, :1], ctx)  # the image latent is the kept first frame
        with torch.no_grad():  # causal VAE: frame 0 of the video decodes from latent frame 0 alone
            frame0 = base.vae.decode(lat)[:, :, 0]
            torch.testing.assert_close(frame0, base.vae.decode(want)[:, :, 0], atol=1e-5, rtol=0)
        entry = doc["vbench"][f"generator/i2v-nfe{n}"]
        assert entry["kind"] == "i2v" and entry["context_max_abs"] == 0.0
        assert entry["suite"]["ratio"] == "7-4" and entry["suite"]["pairs"] == 4
        videos = out / "vbench-i2v" / f"generator-nfe{n}" / "videos"
        assert sorted(p.name for p in videos.iterdir()) == sorted(vb.i2v_video_name(p, 0) for p in prompts)
        for i, prompt in enumerate(prompts):  # ... and is what the mp4 starts with (H.264 aside)
            written = iio.imread(videos / vb.i2v_video_name(prompt, 0))[0].astype(np.float64)
            # H.264 loses a few levels on the tiny VAE's high-frequency halos; another prompt's frame is far off
            assert np.abs(written - _uint8(frame0[i])).mean() < 6.0, prompt
            other = next(j for j, q in enumerate(prompts) if q.split(", camera")[0] != prompt.split(", camera")[0])
            assert np.abs(written - _uint8(frame0[other])).mean() > 3 * np.abs(written - _uint8(frame0[i])).mean()
        dims = entry["dimensions"]
        assert sorted(dims) == sorted(vb.I2V_DIMENSIONS)
        for d in vb.I2V_DIMENSIONS:
            if d == "camera_motion" and n == 1:
                assert dims[d]["status"] == "not run" and "offline" in dims[d]["reason"], dims[d]
            else:
                assert dims[d] == {"status": "ok", "score": FAKE_SCORES[d]}, (d, dims[d])
        agg = entry["aggregate"]
        assert agg == vb.aggregate(dims, kind="i2v")
        assert agg["quality"] is not None
        if n == 1:  # a missing dimension leaves I2V and Total uncomputed, never 0
            assert agg["status"] == "not computed" and agg["i2v"] is None and agg["total"] is None
            assert agg["missing"] == ["camera_motion"]
        else:
            assert agg["status"] == "computed" and 0 < agg["total"] < 1
    calls = [json.loads(line) for line in log.read_text().splitlines()]
    i2v_calls = [c for c in calls if "--api" in c]
    assert len(i2v_calls) == 2 * len(vb.I2V_DIMENSIONS)
    for c in i2v_calls:
        assert c[c.index("--resolution") + 1] == "7-4"
        assert Path(c[c.index("--full_json_dir") + 1]).name == vb.I2V_INFO_JSON
    assert "generator/i2v-nfe2" in (out / "report.html").read_text()


def _eval_python() -> str | None:
    return os.environ.get("ANYFLOW_VBENCH_PYTHON") or (str(LOCAL_ENV) if LOCAL_ENV.is_file() else None)


def test_evaluate_stage_vbench_i2v_real_env_offline(far_ckpts: dict, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """The real VBench-I2V (vbench2_beta_i2v of PyPI's vbench 0.1.5) through the stage, downloads made to
    fail: the I2V dimensions are "not run" with VBench's reason; temporal_flickering is scored."""
    python = _eval_python()
    if python is None:
        pytest.skip("no VBench eval environment (.venv-eval or ANYFLOW_VBENCH_PYTHON); docs/evaluation-vbench.md")
    monkeypatch.setenv("ANYFLOW_VBENCH_PYTHON", python)
    monkeypatch.setenv("ANYFLOW_VBENCH_DEVICE", "cpu")
    monkeypatch.setenv("VBENCH_CACHE_DIR", str(tmp_path / "vbench-cache"))  # no weights cached
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # no torch.hub checkout cached
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")  # discard port: downloads fail at once
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)
    if vb.find_vbench() is None:
        pytest.fail(f"ANYFLOW_VBENCH_PYTHON={python} cannot run VBench: {vb._locate_vbench()[1]}")
    suite = make_suite(tmp_path / "suite")
    i2v_dims = ["camera_motion", "i2v_subject", "i2v_background", "temporal_flickering"]
    out = _evaluate(far_ckpts, {"evaluate.vbench": True, "evaluate.i2v_suite": str(suite), "evaluate.nfes": "1",
                                "evaluate.i2v_dimensions": ",".join(i2v_dims)})
    entry = json.loads((out / "metrics.json").read_text())["vbench"]["generator/i2v-nfe1"]
    dims = entry["dimensions"]
    logs = {d: (out / "vbench-i2v" / "generator-nfe1" / "results" / d / "vbench.log") for d in i2v_dims}
    for d in ("camera_motion", "i2v_subject", "i2v_background"):
        assert dims[d]["status"] == "not run" and "score" not in dims[d], (d, dims[d])
        assert dims[d]["reason"].strip(), d
    # DINO comes through torch.hub from GitHub: a download, refused; camera_motion and i2v_background cannot
    # even import from PyPI's vbench 0.1.5 (no vbench2_beta_i2v/third_party, no dreamsim)
    assert "offline" in dims["i2v_subject"]["reason"], dims["i2v_subject"]
    assert "vbench2_beta_i2v.third_party" in dims["camera_motion"]["reason"]
    assert "dreamsim" in dims["i2v_background"]["reason"]
    assert dims["temporal_flickering"]["status"] == "ok", (dims["temporal_flickering"], logs["temporal_flickering"].read_text()[-2000:])
    assert 0.5 < dims["temporal_flickering"]["score"] <= 1.0
    # VBench-I2V found each subject video by its standard name (2 prompts × 1 sample)
    (full_info,) = (out / "vbench-i2v" / "generator-nfe1" / "results" / "temporal_flickering").glob("*_full_info.json")
    listed = [Path(v).name for e in json.loads(full_info.read_text()) for v in e.get("video_list", [])]
    assert sorted(listed) == sorted(vb.i2v_video_name(c, 0) for c in IMAGES)
    agg = entry["aggregate"]
    assert agg["status"] == "not computed" and agg["total"] is None and agg["i2v"] is None
    assert {"camera_motion", "i2v_subject", "i2v_background"} <= set(agg["missing"])
