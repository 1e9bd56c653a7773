"""VBench adapter: file naming, prompt sets, running VBench in its own environment, aggregation.

docs/method.md §11. VBench pins old dependencies, so it never runs in our environment: it runs as a
subprocess of the interpreter named by ``ANYFLOW_VBENCH_PYTHON`` (the eval image sets it to its own
python; locally ``.venv-eval/bin/python``, see ``docs/evaluation-vbench.md``), else through the
``vbench`` CLI found on ``PATH``. We only write its inputs and parse its outputs.

With ``ANYFLOW_VBENCH_PYTHON`` we do not use VBench's launcher (``vbench/launch/evaluate.py``
hard-codes ``torch.device("cuda")`` and ``dist_init()`` with NCCL and ``torch.cuda.set_device``,
so it cannot run without a GPU). The interpreter runs :data:`_DRIVER` instead: VBench's documented
Python API, ``VBench(device, full_info_json, output_path).evaluate(...)``, with the device chosen by
``run_vbench(device=...)`` / ``ANYFLOW_VBENCH_DEVICE`` (``auto``: CUDA when available, else CPU).
VBench's own code is used unchanged; nothing in its site-packages is modified. The ``vbench
evaluate`` CLI fallback is VBench's GPU path (``torch.distributed.run`` + NCCL) and drops the exit
status of its child, so a failure there shows as "VBench wrote no score for it".

File naming (Vchitect/VBench ``prompts/README.md``, ``vbench/utils.py:get_prompt_from_filename``):
``{prompt}-{index}.mp4`` with the raw prompt text as the file name; VBench reads the prompt back
by stripping ``-<number>``; its standard mode looks files up by the *full* ``prompt_en`` (the
longest standard prompt has 210 characters, so no truncation there). For names over the 255-byte
file-name limit, VBench-2.0's README keeps the first 180 characters (``prompt[:180]``), and VBench's
custom-input mode accepts ``--prompt_file`` (a JSON ``{file name: prompt}``) for prompts the name
cannot hold. We do all three: the full prompt when the name fits, ``prompt[:180]`` when it does not,
``/`` (impossible in a file name; no standard VBench prompt has one) replaced by ``_``, and
``prompt_file.json`` recording the exact prompt of every file.

Prompt sets (docs/method.md §11): the Wan/FAR presets generate from the augmented ("extended") VBench
prompts, ``assets/vbench_prompts_extended.txt`` (VBench's Wan2.1 augmentation, line *i* = prompt *i* of
``assets/vbench_prompts.txt``; source and licence in ``assets/README.md``), but VBench must name and
score the videos by the original ``prompt_en``: :func:`vbench_names` maps each generation prompt to the
prompt its files are named after.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ASSETS = Path(__file__).parent / "assets"
MAX_NAME_CHARS = 180  # VBench-2.0 prompts/README.md: "we use the first 180 characters of the prompt"
MAX_NAME_BYTES = 255  # file-name limit of common file systems (ext4, xfs, APFS)
PROMPT_FILE = "prompt_file.json"
NOT_INSTALLED = "VBench not installed (use the eval image, or set ANYFLOW_VBENCH_PYTHON)"
DEVICE_ENV = "ANYFLOW_VBENCH_DEVICE"  # auto | cpu | cuda | cuda:N (ANYFLOW_VBENCH_PYTHON route only)

# Run by the eval interpreter with ``python -c`` (so no file of ours shadows the ``vbench`` package
# and anyflow need not be installed there). Arguments mirror vbench/launch/evaluate.py, plus
# ``--device`` and ``--probe``. Only the standard library, torch and vbench are imported.
_DRIVER = r"""
import argparse, importlib.machinery, importlib.metadata, importlib.util, json, os, sys
from datetime import datetime

p = argparse.ArgumentParser(prog="anyflow-vbench-driver")
p.add_argument("--probe", action="store_true")
p.add_argument("--videos_path")
p.add_argument("--dimension", nargs="+")
p.add_argument("--output_path")
p.add_argument("--mode", default="custom_input")
p.add_argument("--prompt_file")
p.add_argument("--full_json_dir")
p.add_argument("--device", default="auto")
p.add_argument("--load_ckpt_from_local", action="store_true")
p.add_argument("--api", default="t2v", choices=["t2v", "i2v"])  # i2v: vbench2_beta_i2v.VBenchI2V
p.add_argument("--resolution", default="1-1")  # i2v: the crop folder (VBenchI2V's ``resolution``)
p.add_argument("--chdir")  # i2v: VBench-I2V opens vbench2_beta_i2v/data/crop/<resolution>/<image_name> from here
a = p.parse_args()

import torch

# PyPI's torchvision wheels link against CUDA torch (libc10_cuda.so, libtorch_cuda.so); with a CPU
# torch (the 2.13.0+cpu wheel) their C++ ops cannot load, and torchvision >= 0.18 then fails at
# import: _meta_registrations calls torch.library.register_fake("torchvision::nms"/"qnms") without
# checking that the ops exist. Declaring those two schemas (no kernels) lets its pure-Python parts
# (transforms, which vbench.utils imports) load; torchvision.ops.* still raise torchvision's own
# "Couldn't load custom C++ ops" if a dimension calls them. Done only when the extension fails to
# load, so a matching torch/torchvision (the CUDA eval image) is untouched.
TORCHVISION_OPS = True
spec = importlib.util.find_spec("torchvision")
if spec is not None and spec.submodule_search_locations:
    libs = [os.path.join(d, "_C" + s) for d in spec.submodule_search_locations
            for s in importlib.machinery.EXTENSION_SUFFIXES]
    libs = [f for f in libs if os.path.isfile(f)]
    try:
        if not libs:
            raise OSError("no torchvision._C extension")
        torch.ops.load_library(libs[0])
    except (OSError, RuntimeError):
        TORCHVISION_OPS = False
        _SCHEMAS = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            _SCHEMAS.define(op + "(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")

import vbench
from vbench import VBench

if a.probe:
    print(json.dumps({"vbench": importlib.metadata.version("vbench"), "torch": torch.__version__,
                      "cuda": torch.cuda.is_available(), "torchvision_ops": TORCHVISION_OPS}))
    sys.exit(0)

device = a.device
if device == "auto":
    device = "cuda" if torch.cuda.is_available() else "cpu"
if device.startswith("cuda") and not torch.cuda.is_available():
    sys.exit(f"anyflow-vbench-driver: device {device!r} requested but torch {torch.__version__} in "
             f"{sys.executable} sees no CUDA device; use --device cpu")
full_json = a.full_json_dir or os.path.join(os.path.dirname(vbench.__file__), "VBench_full_info.json")
prompts = {}
if a.prompt_file:
    with open(a.prompt_file, encoding="utf-8") as f:
        prompts = json.load(f)
print(f"anyflow-vbench-driver: vbench {importlib.metadata.version('vbench')}, torch {torch.__version__}, "
      f"device {device}, torchvision C++ ops {'loaded' if TORCHVISION_OPS else 'unavailable'}", flush=True)
name = "results_" + datetime.now().strftime("%Y-%m-%d-%H:%M:%S")
if a.api == "i2v":
    # VBench-I2V's documented API (vbench2_beta_i2v/README.md, "Evaluation"). Its evaluate() looks the videos
    # up as {prompt_en}-{0..4}.<ext> from the info JSON (VBench's standard mode) and pairs each with the image
    # at the relative path vbench2_beta_i2v/data/crop/<resolution>/<image_name>, hence --chdir.
    from vbench2_beta_i2v import VBenchI2V

    bench = VBenchI2V(torch.device(device), full_json, a.output_path)
    if a.chdir:
        os.chdir(a.chdir)
    bench.evaluate(
        videos_path=a.videos_path,
        name=name,
        dimension_list=a.dimension,
        local=a.load_ckpt_from_local,
        read_frame=False,
        resolution=a.resolution,
        imaging_quality_preprocessing_mode="longer",
    )
else:
    bench = VBench(torch.device(device), full_json, a.output_path)
    bench.evaluate(
        videos_path=a.videos_path,
        name=name,
        prompt_list=prompts,
        dimension_list=a.dimension,
        local=a.load_ckpt_from_local,
        read_frame=False,
        mode=a.mode,
        imaging_quality_preprocessing_mode="longer",
    )
print("anyflow-vbench-driver: done", flush=True)
"""

# --- Aggregation constants -------------------------------------------------------------------
# Normalisation ranges (Min, Max) per dimension, from Vchitect/VBench scripts/constant.py
# (NORMALIZE_DIC, used by scripts/cal_final_score.py); keys in VBench's result-JSON spelling.
NORMALIZE_T2V: dict[str, tuple[float, float]] = {
    "subject_consistency": (0.1462, 1.0),
    "background_consistency": (0.2615, 1.0),
    "temporal_flickering": (0.6293, 1.0),
    "motion_smoothness": (0.706, 0.9975),
    "dynamic_degree": (0.0, 1.0),
    "aesthetic_quality": (0.0, 1.0),
    "imaging_quality": (0.0, 1.0),
    "object_class": (0.0, 1.0),
    "multiple_objects": (0.0, 1.0),
    "human_action": (0.0, 1.0),
    "color": (0.0, 1.0),
    "spatial_relationship": (0.0, 1.0),
    "scene": (0.0, 0.8222),
    "appearance_style": (0.0009, 0.2855),
    "temporal_style": (0.0, 0.364),
    "overall_consistency": (0.0, 0.364),
}
# VBench-I2V ranges, from VBench's NORMALIZE_DIC_I2V (leaderboard constants; i2v_subject/background
# share the subject/background consistency ranges, camera motion is already in [0, 1]).
NORMALIZE_I2V: dict[str, tuple[float, float]] = {
    "camera_motion": (0.0, 1.0),
    "i2v_subject": (0.1462, 1.0),
    "i2v_background": (0.2615, 1.0),
    "subject_consistency": (0.1462, 1.0),
    "background_consistency": (0.2615, 1.0),
    "motion_smoothness": (0.706, 0.9975),
    "dynamic_degree": (0.0, 1.0),
    "aesthetic_quality": (0.0, 1.0),
    "imaging_quality": (0.0, 1.0),
}
# docs/method.md §11 weights: Quality = (subj + bg + flicker + smooth + 0.5·dynamic + aesth + imaging)/6.5.
QUALITY_T2V = {
    "subject_consistency": 1.0, "background_consistency": 1.0, "temporal_flickering": 1.0,
    "motion_smoothness": 1.0, "dynamic_degree": 0.5, "aesthetic_quality": 1.0, "imaging_quality": 1.0,
}  # fmt: skip
SEMANTIC_T2V = {d: 1.0 for d in (
    "object_class", "multiple_objects", "human_action", "color", "spatial_relationship", "scene",
    "appearance_style", "temporal_style", "overall_consistency",
)}  # fmt: skip
# docs/method.md §11 I2V: Quality /5.5 (no temporal flickering), I2V = (subj + bg + 0.1·camera)/2.1.
# (VBench's own cal_i2v_final_score.py differs: it adds temporal flickering to Quality and leaves
# camera motion out of I2V; we follow docs/method.md, which follows the AnyFlow paper.)
QUALITY_I2V = {
    "subject_consistency": 1.0, "background_consistency": 1.0, "motion_smoothness": 1.0,
    "dynamic_degree": 0.5, "aesthetic_quality": 1.0, "imaging_quality": 1.0,
}  # fmt: skip
I2V_SCORE = {"i2v_subject": 1.0, "i2v_background": 1.0, "camera_motion": 0.1}
T2V_TOTAL = {"quality": 0.8, "semantic": 0.2}  # docs/method.md §11: Total = 0.8·Q + 0.2·S
I2V_TOTAL = {"i2v": 0.5, "quality": 0.5}  # docs/method.md §11: Total = 0.5·I2V + 0.5·Quality
ALL_T2V_DIMENSIONS: tuple[str, ...] = tuple(NORMALIZE_T2V)
# VBench-I2V (docs/method.md §11): the dimensions the paper reports; ``vbench2_beta_i2v.VBenchI2V`` also runs
# temporal_flickering (its quality list), which docs/method.md's I2V Quality leaves out.
I2V_DIMENSIONS: tuple[str, ...] = (
    "camera_motion", "i2v_subject", "i2v_background", "subject_consistency", "background_consistency",
    "motion_smoothness", "dynamic_degree", "aesthetic_quality", "imaging_quality",
)  # fmt: skip
I2V_RUNNABLE: tuple[str, ...] = (*I2V_DIMENSIONS, "temporal_flickering")
# The 7 camera instructions VBench-I2V's camera_motion reads back from the video's file name
# (vbench2_beta_i2v/camera_motion.py: get_type).
CAMERA_MOTIONS: tuple[str, ...] = (
    "camera pans left", "camera pans right", "camera tilts up", "camera tilts down", "camera zooms in",
    "camera zooms out", "camera static",
)  # fmt: skip
I2V_INFO_JSON = "vbench2_i2v_full_info.json"  # VBench repo: vbench2_beta_i2v/vbench2_i2v_full_info.json
I2V_CROP_DIR = "data/crop"  # download_data.sh unzips crop.zip into vbench2_beta_i2v/data/crop/<ratio>/
I2V_RATIOS = ("1-1", "8-5", "7-4", "16-9")  # the published crops (README §2.4); others via crop_to_diff_ratio.py
I2V_MAX_SAMPLES = 5  # VBench's standard-mode lookup reads {prompt}-0 .. {prompt}-4 only
# VBench's custom_input mode refuses these (they need the prompt suite's auxiliary info). human_action runs
# there but divides the recognised actions by *all* videos (only 100 of the 946 prompts are action prompts),
# so its custom_input number is not VBench's score: reported "not run" too.
CUSTOM_UNSUPPORTED = frozenset(
    {"object_class", "multiple_objects", "scene", "appearance_style", "color", "spatial_relationship", "human_action"}
)


# --- File naming and writing -------------------------------------------------------------------
def vbench_filename(prompt: str, index: int, ext: str = ".mp4") -> str:
    """VBench's file name for sample ``index`` of ``prompt``: ``{prompt}-{index}{ext}``.

    The whole prompt when the name fits in 255 bytes (what VBench's standard mode expects), else
    ``prompt[:180]`` (VBench-2.0's rule); ``/`` becomes ``_``.
    """
    stem = prompt.strip().replace("/", "_").replace("\x00", "")
    if not stem:
        raise ValueError(
            f"vbench_filename: prompt {prompt!r} gives an empty file name; use a non-empty prompt."
        )
    name = f"{stem}-{int(index)}{ext}"
    if len(name.encode("utf-8")) > MAX_NAME_BYTES:
        name = f"{stem[:MAX_NAME_CHARS]}-{int(index)}{ext}"
        while len(name.encode("utf-8")) > MAX_NAME_BYTES:  # multi-byte text: 180 characters can exceed 255 bytes
            stem = stem[: len(stem) - 1] if len(stem) <= MAX_NAME_CHARS else stem[: MAX_NAME_CHARS - 1]
            name = f"{stem}-{int(index)}{ext}"
    return name


def write_vbench_videos(
    videos: Sequence[Any],
    prompts: Sequence[str],
    out_dir: str | os.PathLike[str],
    samples_per_prompt: int = 5,
    fps: int = 16,
) -> list[Path]:
    """Write videos as ``out_dir/{prompt}-{index}.mp4`` plus ``out_dir/prompt_file.json``.

    Args:
        videos: uint8 videos (T, H, W, 3), prompt-major: ``videos[p * samples_per_prompt + i]`` is
            sample ``i`` of ``prompts[p]`` (docs/method.md §11 seeds them with the running index).
        prompts: the prompts used for file names and scoring (VBench's ``prompt_en``, not the
            augmented text used for generation).
        out_dir: folder to create/fill.
        samples_per_prompt: 5 for VBench.
        fps: frames per second of the mp4 files (16 for Wan2.1).

    Returns:
        The written paths, in the order of ``videos``.
    """
    from anyflow.data.video import write_video

    if len(videos) != len(prompts) * samples_per_prompt:
        raise ValueError(
            f"write_vbench_videos: got {len(videos)} videos for {len(prompts)} prompts × {samples_per_prompt} "
            f"samples; pass exactly {len(prompts) * samples_per_prompt} videos, prompt-major."
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mapping: dict[str, str] = {}
    paths: list[Path] = []
    for p, prompt in enumerate(prompts):
        for i in range(samples_per_prompt):
            name = vbench_filename(prompt, i)
            if name in mapping and mapping[name] != prompt:
                raise ValueError(
                    f"write_vbench_videos: prompts {mapping[name]!r} and {prompt!r} map to the same file name "
                    f"{name!r} (first {MAX_NAME_CHARS} characters); make them differ earlier."
                )
            video = np.asarray(videos[p * samples_per_prompt + i])
            if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
                raise ValueError(
                    f"write_vbench_videos: video for {name!r} must be uint8 (T, H, W, 3); got {video.dtype} {video.shape}"
                )
            write_video(out / name, video, fps=fps)
            mapping[name] = prompt
            paths.append(out / name)
    (out / PROMPT_FILE).write_text(json.dumps(mapping, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return paths


# --- Prompt sets -------------------------------------------------------------------------------
def load_prompts(kind: str, *, n: int = 16, seed: int = 0) -> list[str]:
    """Load a prompt set.

    Args:
        kind: ``"vbench"`` (the 946 ``prompt_en`` of VBench_full_info.json, shipped in
            ``assets/vbench_prompts.txt``), ``"vbench-extended"`` (the 946 augmented prompts, line-aligned
            with ``"vbench"``, shipped in ``assets/vbench_prompts_extended.txt``; ``$ANYFLOW_VBENCH_EXTENDED``
            names another file of the same length instead), ``"procedural"`` (captions of procedural
            clips ``0..n-1`` of dataset ``seed``), or a path to a ``.txt`` (one prompt a line) or
            ``.json`` (a list of strings, or of objects with ``prompt_en``) file.
        n, seed: for ``"procedural"`` only.

    These are the prompts to generate from; :func:`vbench_names` gives the prompts VBench names and
    scores the samples by (for ``"vbench-extended"``, the original ``prompt_en``).
    """
    if kind == "vbench":
        return _read_prompt_file(ASSETS / "vbench_prompts.txt")
    if kind == "vbench-extended":
        path = Path(os.environ.get("ANYFLOW_VBENCH_EXTENDED", ASSETS / "vbench_prompts_extended.txt"))
        if not path.is_file():
            raise FileNotFoundError(
                f"load_prompts('vbench-extended'): {path} does not exist; unset ANYFLOW_VBENCH_EXTENDED to "
                "use the shipped copy, or point it at VBench's prompts/augmented_prompts/Wan2.1-T2V-1.3B/"
                "all_dimension_aug_wanx_seed42.txt (github.com/Vchitect/VBench)."
            )
        prompts = _read_prompt_file(path)
        base = load_prompts("vbench")
        if len(prompts) != len(base):
            raise ValueError(
                f"load_prompts: {path} has {len(prompts)} prompts but the VBench list has {len(base)}; use the file aligned with VBench_full_info.json."
            )
        return prompts
    if kind == "procedural":
        from anyflow.data.procedural import make_clip

        return [make_clip(seed, i, frames=2, height=16, width=16).caption for i in range(n)]
    path = Path(kind)
    if not path.is_file():
        raise FileNotFoundError(
            f"load_prompts: {kind!r} is neither 'vbench', 'vbench-extended', 'procedural' nor an existing file."
        )
    return _read_prompt_file(path)


def vbench_names(kind: str, prompts: Sequence[str]) -> list[str]:
    """The prompt VBench names and scores each generation prompt by (docs/method.md §11).

    With ``kind="vbench-extended"`` the samples are generated from the augmented prompts, but VBench
    needs the original ``prompt_en``: file names ``{prompt_en}-{i}.mp4`` and ``prompt_file.json``. Each
    augmented prompt maps to the standard prompt on the same line. Every other prompt set names files
    by the generation prompt itself.

    Args:
        kind: the prompt set ``prompts`` came from (``evaluate.prompts``; see :func:`load_prompts`).
        prompts: generation prompts, in any order and with repeats (e.g. ``samples_per_prompt`` copies).

    Returns:
        One name per prompt, in the order of ``prompts``.
    """
    if kind != "vbench-extended":
        return list(prompts)
    to_name: dict[str, str] = {}
    for extended, standard in zip(load_prompts("vbench-extended"), load_prompts("vbench"), strict=True):
        if to_name.setdefault(extended, standard) != standard:
            raise ValueError(
                f"vbench_names: the extended prompt {extended[:80]!r}... stands for both "
                f"{to_name[extended]!r} and {standard!r}; use an extended prompt file with one distinct line "
                "per VBench prompt."
            )
    unknown = [p for p in prompts if p not in to_name]
    if unknown:
        raise ValueError(
            f"vbench_names: {len(unknown)} prompt(s) are not in the extended VBench set, e.g. "
            f"{unknown[0][:80]!r}; pass the prompts load_prompts('vbench-extended') returned."
        )
    return [to_name[p] for p in prompts]


def vbench_prompt_dimensions() -> list[tuple[str, list[str]]]:
    """The standard VBench prompts with their dimensions, ``[(prompt_en, [dimension, ...]), ...]``."""
    out: list[tuple[str, list[str]]] = []
    dims: list[str] = []
    for line in (ASSETS / "vbench_prompts.txt").read_text(encoding="utf-8").splitlines():
        if line.startswith("# dimension:"):
            dims = [d.strip() for d in line.split(":", 1)[1].split(",")]
        elif line.strip() and not line.startswith("#"):
            out.append((line.strip(), list(dims)))
    return out


def _read_prompt_file(path: Path) -> list[str]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        data = json.loads(text)
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of prompts or of objects with 'prompt_en'.")
        prompts = [d["prompt_en"] if isinstance(d, dict) else str(d) for d in data]
    else:
        prompts = [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]
    if not prompts:
        raise ValueError(f"{path}: no prompts found.")
    return prompts


# --- VBench-I2V image suite ----------------------------------------------------------------------
class I2VSuiteError(ValueError):
    """The VBench-I2V suite named by ``evaluate.i2v_suite`` is missing a file or is malformed."""


@dataclass(frozen=True)
class I2VPair:
    """One image-prompt pair of the suite: generate from ``image`` + ``prompt``, write ``{prompt}-{i}.mp4``."""

    prompt: str  # the entry's prompt_en: the generation prompt and the video file-name stem
    image_name: str  # the entry's image_name, a file in the suite's crop folder
    image: Path  # crop folder / image_name
    dimensions: tuple[str, ...]  # the entry's dimension list (merged over entries sharing the prompt)


@dataclass(frozen=True)
class I2VSuite:
    """A VBench-I2V suite read by :func:`load_i2v_suite`.

    ``entries`` are the info-JSON entries kept (in file order, as published); ``pairs`` the distinct
    prompts to generate, in the same order.
    """

    source: str  # what evaluate.i2v_suite said (folder or URL)
    root: Path  # the local folder holding the info JSON (the VBench checkout's vbench2_beta_i2v/)
    info_json: Path
    ratio: str
    image_dir: Path  # root / data/crop / ratio
    entries: tuple[dict, ...]
    pairs: tuple[I2VPair, ...]
    total_entries: int  # entries in the info JSON before filtering by dimension and limit

    def summary(self) -> dict[str, Any]:
        return {"source": self.source, "info_json": str(self.info_json), "ratio": self.ratio,
                "image_dir": str(self.image_dir), "entries": len(self.entries), "pairs": len(self.pairs),
                "entries_in_suite": self.total_entries}


def i2v_video_name(prompt: str, index: int, ext: str = ".mp4") -> str:
    """The file VBench-I2V looks for: exactly ``f"{prompt_en}-{index}{ext}"``.

    VBenchI2V reads the videos in VBench's standard mode (``vbench/__init__.py: build_full_info_json``),
    which builds that name from the info JSON and does not truncate or escape it, so a prompt that
    cannot be a file name (a ``/``, a NUL, over 255 bytes) cannot be scored: :class:`I2VSuiteError`.
    """
    name = f"{prompt}-{int(index)}{ext}"
    if not prompt or "/" in prompt or "\x00" in prompt or len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise I2VSuiteError(
            f"VBench-I2V prompt {prompt[:80]!r}: the video must be named {name[:100]!r}, which is not a valid file "
            f"name (empty, contains '/' or NUL, or over {MAX_NAME_BYTES} bytes); fix the prompt_en in the info JSON."
        )
    return name


def _suite_root(local: Path, source: str) -> Path:
    for root in (local, local / "vbench2_beta_i2v"):
        if (root / I2V_INFO_JSON).is_file():
            return root
    if local.is_file():
        raise I2VSuiteError(
            f"evaluate.i2v_suite={source!r} is a file; name the folder holding {I2V_INFO_JSON} and {I2V_CROP_DIR}/ "
            "(VBench's vbench2_beta_i2v/ folder after vbench2_beta_i2v/download_data.sh)."
        )
    if not local.is_dir():
        raise I2VSuiteError(f"evaluate.i2v_suite={source!r}: no such folder ({local}).")
    raise I2VSuiteError(
        f"evaluate.i2v_suite={source!r}: missing {local / I2V_INFO_JSON} (also looked for "
        f"{local / 'vbench2_beta_i2v' / I2V_INFO_JSON}). Copy vbench2_beta_i2v/{I2V_INFO_JSON} from "
        "github.com/Vchitect/VBench next to the data/crop/ folder that vbench2_beta_i2v/download_data.sh fetches."
    )


def load_i2v_suite(
    source: str,
    *,
    ratio: str = "7-4",
    dimensions: Sequence[str] = I2V_DIMENSIONS,
    limit: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
) -> I2VSuite:
    """Read and validate a VBench-I2V suite in its published layout.

    Layout (VBench's ``vbench2_beta_i2v/`` folder after its ``download_data.sh``)::

        <root>/vbench2_i2v_full_info.json   # [{"prompt_en", "dimension": [...], "image_name", "image_type"}, ...]
        <root>/data/crop/<ratio>/<image_name>   # e.g. data/crop/7-4/a beach with ... cliff.jpg

    ``source`` may also be a folder holding ``vbench2_beta_i2v/`` (a VBench checkout), or a URL
    (``s3://…``) of either, mirrored once into ``cache_dir`` by :func:`anyflow.storage.mirror` as base
    models are (the whole prefix is downloaded: point it at one with only the info JSON and the crop
    folder you use).

    Args:
        source: ``evaluate.i2v_suite``.
        ratio: the crop folder (``evaluate.i2v_ratio``; docs/method.md §11: ``7-4``).
        dimensions: keep the entries that list at least one of these (VBench-I2V scores each dimension
            on the entries listing it).
        limit: keep only the first ``limit`` such entries (0: all).
        cache_dir: where a URL is mirrored.

    Raises :class:`I2VSuiteError` naming the missing file or the malformed entry.
    """
    from anyflow import storage

    local = Path(storage.mirror(source, cache_dir))
    root = _suite_root(local, source)
    info = root / I2V_INFO_JSON
    crops = root / I2V_CROP_DIR
    image_dir = crops / ratio
    if not image_dir.is_dir():
        have = sorted(p.name for p in crops.iterdir() if p.is_dir()) if crops.is_dir() else []
        raise I2VSuiteError(
            f"evaluate.i2v_suite: missing the crop folder {image_dir} (evaluate.i2v_ratio={ratio!r}); "
            + (f"the suite has {have}." if have else f"no {crops} at all: unzip VBench's crop.zip there.")
        )
    try:
        data = json.loads(info.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise I2VSuiteError(f"{info}: not valid JSON ({e.msg} at line {e.lineno}).") from None
    if not isinstance(data, list) or not data:
        raise I2VSuiteError(f"{info}: expected a non-empty JSON list of entries {{prompt_en, dimension, image_name}}.")
    wanted = set(dimensions)
    entries: list[dict] = []
    for i, e in enumerate(data):
        where = f"{info}: entry {i}"
        if not isinstance(e, dict):
            raise I2VSuiteError(f"{where} is {type(e).__name__}, not an object.")
        for key, typ in (("prompt_en", str), ("dimension", list), ("image_name", str)):
            if not isinstance(e.get(key), typ) or not e[key]:
                raise I2VSuiteError(
                    f"{where} ({e.get('prompt_en', '?')!r}): needs a non-empty {key!r} ({typ.__name__}); "
                    "the published vbench2_i2v_full_info.json gives every entry prompt_en, dimension and image_name."
                )
        if wanted & set(e["dimension"]):
            entries.append(e)
    if not entries:
        raise I2VSuiteError(f"{info}: no entry lists any of the dimensions {sorted(wanted)}.")
    total = len(data)
    if limit > 0:
        entries = entries[:limit]
    pairs: dict[str, I2VPair] = {}
    missing: list[str] = []
    for e in entries:
        prompt, image_name = e["prompt_en"], e["image_name"]
        i2v_video_name(prompt, 0)  # the name VBench will look for must be writable
        if "camera_motion" in e["dimension"] and not any(m in prompt for m in CAMERA_MOTIONS):
            raise I2VSuiteError(
                f"{info}: entry {prompt!r} lists camera_motion but its prompt names none of {list(CAMERA_MOTIONS)}; "
                "VBench-I2V reads the intended camera motion from the video's file name."
            )
        image = image_dir / image_name
        if not image.is_file() and str(image) not in missing:
            missing.append(str(image))
        old = pairs.get(prompt)
        if old is not None and old.image_name != image_name:
            raise I2VSuiteError(
                f"{info}: prompt {prompt!r} has two images ({old.image_name!r}, {image_name!r}); its videos "
                f"'{prompt}-<i>.mp4' cannot come from both."
            )
        dims = tuple(dict.fromkeys([*(old.dimensions if old else ()), *e["dimension"]]))
        pairs[prompt] = I2VPair(prompt, image_name, image, dims)
    if missing:
        raise I2VSuiteError(
            f"evaluate.i2v_suite: {len(missing)} image(s) named in {info} are missing from {image_dir}, e.g. "
            f"{missing[0]}" + (f" (and {missing[1]})" if len(missing) > 1 else "")
            + "; unzip VBench's crop.zip (vbench2_beta_i2v/download_data.sh) or fix image_name."
        )
    return I2VSuite(source=str(source), root=root, info_json=info, ratio=ratio, image_dir=image_dir,
                    entries=tuple(entries), pairs=tuple(pairs.values()), total_entries=total)


def _prepare_i2v_run(suite: I2VSuite, out_root: Path) -> tuple[Path, Path]:
    """The info JSON VBench-I2V scores (the suite's kept entries only, so an ``i2v_limit`` run has no
    missing-video warnings) and a working folder whose ``vbench2_beta_i2v/data/crop/<ratio>`` is the
    suite's crop folder: VBench-I2V opens the images by that relative path."""
    out_root.mkdir(parents=True, exist_ok=True)
    info = out_root / I2V_INFO_JSON
    info.write_text(json.dumps(list(suite.entries), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    cwd = out_root / "i2v-cwd"
    link = cwd / "vbench2_beta_i2v" / "data" / "crop" / suite.ratio
    link.parent.mkdir(parents=True, exist_ok=True)
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(suite.image_dir.resolve(), target_is_directory=True)
    return info, cwd


# --- Aggregation -------------------------------------------------------------------------------
def _score(value: Any) -> float | None:
    """A raw dimension score, or None when the entry is a 'not run' record / missing."""
    if isinstance(value, Mapping):
        return float(value["score"]) if value.get("status") == "ok" and "score" in value else None
    if isinstance(value, bool) or value is None:
        return None
    return float(value)


def _weighted(
    normalized: Mapping[str, float], weights: Mapping[str, float]
) -> tuple[float | None, list[str]]:
    missing = [d for d in weights if d not in normalized]
    if missing:
        return None, missing
    return sum(w * normalized[d] for d, w in weights.items()) / sum(weights.values()), []


def aggregate(dim_scores: Mapping[str, Any], *, kind: str = "t2v") -> dict[str, Any]:
    """VBench Quality / Semantic / Total (``kind="t2v"``) or Quality / I2V / Total (``"i2v"``).

    docs/method.md §11. Each raw score is min–max normalised with VBench's ranges, then weighted. A
    component whose dimensions are not all present (or are "not run") is ``None`` with the reason,
    and so is the total — never zero.

    Args:
        dim_scores: ``{dimension: raw score}``; a value may also be a :func:`run_vbench` record
            (``{"status": "ok", "score": x}`` or ``{"status": "not run", "reason": ...}``).
        kind: ``"t2v"`` or ``"i2v"``.

    Returns:
        ``{"kind", "normalized": {dim: float}, "quality", "semantic"|"i2v", "total", "missing": [...],
        "status": "computed"|"not computed", "reason": str|None}``.
    """
    if kind == "t2v":
        ranges, parts, total_w = NORMALIZE_T2V, {"quality": QUALITY_T2V, "semantic": SEMANTIC_T2V}, T2V_TOTAL
    elif kind == "i2v":
        ranges, parts, total_w = NORMALIZE_I2V, {"quality": QUALITY_I2V, "i2v": I2V_SCORE}, I2V_TOTAL
    else:
        raise ValueError(f"aggregate: kind must be 't2v' or 'i2v'; got {kind!r}")
    normalized: dict[str, float] = {}
    for dim, value in dim_scores.items():
        score = _score(value)
        if dim in ranges and score is not None:
            lo, hi = ranges[dim]
            normalized[dim] = (score - lo) / (hi - lo)
    out: dict[str, Any] = {"kind": kind, "normalized": normalized}
    missing: list[str] = []
    for name, weights in parts.items():
        out[name], miss = _weighted(normalized, weights)
        missing += [d for d in miss if d not in missing]
    out["missing"] = missing
    if missing:
        out["total"] = None
        out["status"] = "not computed"
        out["reason"] = "missing or not-run dimensions: " + ", ".join(missing)
    else:
        out["total"] = sum(w * out[name] for name, w in total_w.items())
        out["status"] = "computed"
        out["reason"] = None
    return out


# --- Running VBench and parsing its output ----------------------------------------------------
def parse_vbench_results(output_dir: str | os.PathLike[str]) -> dict[str, float]:
    """Read every ``*_eval_results.json`` under ``output_dir`` into ``{dimension: mean score}``.

    VBench writes ``{dimension: [mean, [per-video records]]}`` per run (one file per dimension when
    run dimension by dimension); a bare ``{dimension: mean}`` is accepted too. Later files (by
    modification time) win when a dimension appears twice.
    """
    files = sorted(Path(output_dir).rglob("*_eval_results.json"), key=lambda p: (p.stat().st_mtime, str(p)))
    scores: dict[str, float] = {}
    for f in files:
        try:
            data = json.loads(f.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ValueError(
                f"{f}: not valid JSON ({e.msg} at line {e.lineno}); delete or fix the file."
            ) from e
        if not isinstance(data, dict):
            raise ValueError(
                f"{f}: expected an object {{dimension: [score, per_video]}}; got {type(data).__name__}."
            )
        for dim, value in data.items():
            raw = value[0] if isinstance(value, list) else value
            if isinstance(raw, bool) or not isinstance(raw, int | float):
                raise ValueError(f"{f}: dimension {dim!r} has no numeric score (got {raw!r}).")
            scores[dim] = float(raw)
    return scores


_LOCATED: dict[tuple[str | None, str | None], tuple[list[str] | None, str]] = {}


def _locate_vbench() -> tuple[list[str] | None, str]:
    """``(command prefix, "")`` for the first VBench found, else ``(None, why not)``.

    The probe starts the eval interpreter and imports vbench (seconds): it runs once per process for each
    (``ANYFLOW_VBENCH_PYTHON``, ``PATH``), not for every dimension, check and cache key.
    """
    key = (os.environ.get("ANYFLOW_VBENCH_PYTHON"), os.environ.get("PATH"))
    if key not in _LOCATED:
        _LOCATED[key] = _probe_vbench()
    return _LOCATED[key]


def _probe_vbench() -> tuple[list[str] | None, str]:
    python = os.environ.get("ANYFLOW_VBENCH_PYTHON")
    if python:
        try:
            probe = subprocess.run(
                [python, "-c", _DRIVER, "--probe"], capture_output=True, text=True, timeout=300
            )
        except (OSError, subprocess.TimeoutExpired) as e:
            return None, f"ANYFLOW_VBENCH_PYTHON={python} cannot run: {type(e).__name__}: {e}"
        if probe.returncode != 0:
            lines = [ln for ln in probe.stderr.strip().splitlines() if ln.strip()]
            last = lines[-1].strip() if lines else f"exit code {probe.returncode}"
            return None, f"ANYFLOW_VBENCH_PYTHON={python} cannot import vbench: {last}"
        return [python, "-c", _DRIVER], ""
    cli = shutil.which("vbench")
    return ([cli, "evaluate"], "") if cli else (None, NOT_INSTALLED)


def find_vbench() -> list[str] | None:
    """The command prefix that runs VBench's evaluator, or None when no VBench is usable.

    ``$ANYFLOW_VBENCH_PYTHON -c <driver>`` when that interpreter can import vbench (an interpreter
    named there that cannot is not replaced by the CLI: the reason is reported instead), else the
    ``vbench evaluate`` CLI on PATH (GPU only).
    """
    return _locate_vbench()[0]


def vbench_unavailable_reason() -> str | None:
    """None when :func:`find_vbench` finds an evaluator, else why not (checked before any VBench sampling)."""
    if find_vbench() is not None:
        return None
    return _locate_vbench()[1] or NOT_INSTALLED


def vbench_environment() -> dict[str, Any]:
    """What a VBench result depends on outside the preset: which evaluator (or none), its weight cache and the
    extended-prompt override. Part of the evaluate stage's cache key when VBench is enabled, so an artifact
    whose dimensions were all "not run" is not reused once an eval environment exists."""
    command, why_not = _locate_vbench()
    return {
        "evaluator": command[0] if command else f"none: {why_not}",
        "device": os.environ.get("ANYFLOW_VBENCH_DEVICE", "auto"),
        "weights": os.environ.get("VBENCH_CACHE_DIR", ""),
        "extended_prompts": os.environ.get("ANYFLOW_VBENCH_EXTENDED", ""),
    }


# Signs (in VBench's stdout or stderr) that it tried to fetch weights: its own "… does not exist.
# Downloading…" notes and wget calls, torch.hub / urllib / requests / huggingface_hub errors.
_OFFLINE_CUES = (
    "wget",
    "Downloading",
    "ConnectionError",
    "Connection refused",
    "huggingface.co",
    "Max retries",
    "Temporary failure in name resolution",
    "Name or service not known",
    "urlopen",
    "URLError",
)


def _failure_reason(stderr: str, returncode: int, stdout: str = "") -> str:
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    last = lines[-1] if lines else f"exit code {returncode}"
    if any(key in stderr or key in stdout for key in _OFFLINE_CUES):
        return f"model weights not available offline (VBench tried to download them): {last}"
    if returncode == 0:
        return f"VBench wrote no score for it: {last}" if lines else "VBench wrote no score for it"
    return f"VBench failed (exit {returncode}): {last}"


def run_vbench(
    videos_dir: str | os.PathLike[str],
    dimensions: Sequence[str],
    *,
    output_dir: str | os.PathLike[str],
    mode: str = "custom_input",
    timeout_s: float | None = None,
    device: str | None = None,
    i2v: I2VSuite | None = None,
) -> dict[str, dict[str, Any]]:
    """Run VBench on ``videos_dir``, one subprocess per dimension, and collect the scores.

    Args:
        videos_dir: folder written by :func:`write_vbench_videos`.
        dimensions: VBench dimension names (result-JSON spelling).
        output_dir: ``{output_dir}/{dimension}/`` receives VBench's ``*_eval_results.json``,
            ``*_full_info.json`` and our ``vbench.log`` (its stdout and stderr).
        mode: VBench's ``--mode``; ``custom_input`` reads prompts from ``prompt_file.json``.
        timeout_s: per-dimension limit.
        device: ``auto`` (CUDA when the eval interpreter sees one, else CPU), ``cpu``, ``cuda`` or
            ``cuda:N``; default ``$ANYFLOW_VBENCH_DEVICE`` or ``auto``. Applies to the
            ``ANYFLOW_VBENCH_PYTHON`` route; the ``vbench`` CLI always uses CUDA.
        i2v: score with VBench-I2V (``vbench2_beta_i2v.VBenchI2V``) against this suite instead:
            ``videos_dir`` holds only ``{prompt_en}-{i}.mp4`` files (:func:`i2v_video_name`), ``mode`` is
            ignored (VBench-I2V looks the videos up from the info JSON), ``{output_dir}`` also receives
            the info JSON scored (the suite's kept entries) and ``i2v-cwd/`` (the image-folder link).
            Needs ``ANYFLOW_VBENCH_PYTHON``: the ``vbench`` CLI has no I2V mode.

    Returns ``{dimension: {"status": "ok", "score": float} | {"status": "not run", "reason": str}}``.
    A dimension is "not run" when VBench is not installed, when ``mode="custom_input"`` cannot
    score it (it needs the standard prompt suite), when its model weights are not available
    offline, or when VBench fails; its reason says which. Never reported as zero.
    """
    videos = Path(videos_dir).resolve()
    out_root = Path(output_dir).resolve()
    unknown = [d for d in dimensions if d not in NORMALIZE_T2V and d not in NORMALIZE_I2V]
    if unknown:
        raise ValueError(
            f"run_vbench: unknown dimensions {unknown}; valid: {sorted(set(NORMALIZE_T2V) | set(NORMALIZE_I2V))}"
        )
    if i2v is not None:
        not_i2v = [d for d in dimensions if d not in I2V_RUNNABLE]
        if not_i2v:
            raise ValueError(f"run_vbench: VBench-I2V does not run {not_i2v}; its dimensions: {list(I2V_RUNNABLE)}")
    device = device or os.environ.get(DEVICE_ENV) or "auto"
    command, why_not = _locate_vbench()
    if command is None:
        return {d: {"status": "not run", "reason": why_not} for d in dimensions}
    driver = command[1:2] == ["-c"]
    if i2v is not None and not driver:
        why = ("VBench-I2V runs through ANYFLOW_VBENCH_PYTHON only (VBench's `vbench evaluate` CLI has no I2V "
               "mode); set it to the eval interpreter")
        return {d: {"status": "not run", "reason": why} for d in dimensions}
    i2v_args: list[str] = []
    if i2v is not None:
        info, cwd = _prepare_i2v_run(i2v, out_root)
        i2v_args = ["--api", "i2v", "--full_json_dir", str(info), "--resolution", i2v.ratio, "--chdir", str(cwd)]
    results: dict[str, dict[str, Any]] = {}
    for dim in dimensions:
        if i2v is None and mode == "custom_input" and dim in CUSTOM_UNSUPPORTED:
            results[dim] = {
                "status": "not run",
                "reason": f"{dim} needs VBench's standard prompt suite (mode='vbench_standard')",
            }
            continue
        dim_out = out_root / dim
        dim_out.mkdir(parents=True, exist_ok=True)
        for stale in dim_out.glob("*_eval_results.json"):  # a score must come from this run
            stale.unlink()
        args = [
            *command,
            "--videos_path",
            str(videos),
            "--dimension",
            dim,
            "--output_path",
            str(dim_out),
        ]
        if i2v is not None:
            args += i2v_args
        else:
            args += ["--mode", mode]
            if mode == "custom_input" and (videos / PROMPT_FILE).is_file():
                args += ["--prompt_file", str(videos / PROMPT_FILE)]
        if driver:
            args += ["--device", device]
        try:
            # cwd: the driver runs with ``-c``, so sys.path[0] is the working directory; ours holds
            # nothing importable.
            proc = subprocess.run(
                args, capture_output=True, text=True, timeout=timeout_s, cwd=dim_out if driver else None
            )
        except subprocess.TimeoutExpired:
            results[dim] = {"status": "not run", "reason": f"VBench timed out after {timeout_s} s"}
            continue
        (dim_out / "vbench.log").write_text(
            proc.stdout + "\n--- stderr ---\n" + proc.stderr, encoding="utf-8"
        )
        scores = parse_vbench_results(dim_out) if proc.returncode == 0 else {}
        if dim in scores and not math.isfinite(scores[dim]):
            # VBench averages an empty list to NaN when no video belongs to the dimension (e.g. a suite subset)
            results[dim] = {"status": "not run", "reason": f"VBench returned no score ({scores[dim]}): no video "
                            "of this run belongs to the dimension (a prompt or suite subset?)"}
        elif dim in scores:
            results[dim] = {"status": "ok", "score": scores[dim]}
        else:
            results[dim] = {
                "status": "not run",
                "reason": _failure_reason(proc.stderr, proc.returncode, proc.stdout),
            }
    return results
