"""VBench adapter: file naming, prompt sets, running VBench in its own environment, aggregation.

METHOD.md §11. VBench pins old dependencies, so it never runs in our environment: it runs as a
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

Prompt sets (METHOD.md §11): the Wan/FAR presets generate from the augmented ("extended") VBench
prompts, ``assets/vbench_prompts_extended.txt`` (VBench's Wan2.1 augmentation, line *i* = prompt *i* of
``assets/vbench_prompts.txt``; source and licence in ``assets/README.md``), but VBench must name and
score the videos by the original ``prompt_en``: :func:`vbench_names` maps each generation prompt to the
prompt its files are named after.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
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
bench = VBench(torch.device(device), full_json, a.output_path)
bench.evaluate(
    videos_path=a.videos_path,
    name="results_" + datetime.now().strftime("%Y-%m-%d-%H:%M:%S"),
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
# METHOD.md §11 weights: Quality = (subj + bg + flicker + smooth + 0.5·dynamic + aesth + imaging)/6.5.
QUALITY_T2V = {
    "subject_consistency": 1.0, "background_consistency": 1.0, "temporal_flickering": 1.0,
    "motion_smoothness": 1.0, "dynamic_degree": 0.5, "aesthetic_quality": 1.0, "imaging_quality": 1.0,
}  # fmt: skip
SEMANTIC_T2V = {d: 1.0 for d in (
    "object_class", "multiple_objects", "human_action", "color", "spatial_relationship", "scene",
    "appearance_style", "temporal_style", "overall_consistency",
)}  # fmt: skip
# METHOD.md §11 I2V: Quality /5.5 (no temporal flickering), I2V = (subj + bg + 0.1·camera)/2.1.
# (VBench's own cal_i2v_final_score.py differs: it adds temporal flickering to Quality and leaves
# camera motion out of I2V; we follow METHOD.md, which follows the AnyFlow paper.)
QUALITY_I2V = {
    "subject_consistency": 1.0, "background_consistency": 1.0, "motion_smoothness": 1.0,
    "dynamic_degree": 0.5, "aesthetic_quality": 1.0, "imaging_quality": 1.0,
}  # fmt: skip
I2V_SCORE = {"i2v_subject": 1.0, "i2v_background": 1.0, "camera_motion": 0.1}
T2V_TOTAL = {"quality": 0.8, "semantic": 0.2}  # METHOD.md §11: Total = 0.8·Q + 0.2·S
I2V_TOTAL = {"i2v": 0.5, "quality": 0.5}  # METHOD.md §11: Total = 0.5·I2V + 0.5·Quality
ALL_T2V_DIMENSIONS: tuple[str, ...] = tuple(NORMALIZE_T2V)
# VBench's custom_input mode refuses these (they need the prompt suite's auxiliary info).
CUSTOM_UNSUPPORTED = frozenset(
    {"object_class", "multiple_objects", "scene", "appearance_style", "color", "spatial_relationship"}
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
            sample ``i`` of ``prompts[p]`` (METHOD.md §11 seeds them with the running index).
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
    """The prompt VBench names and scores each generation prompt by (METHOD.md §11).

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

    METHOD.md §11. Each raw score is min–max normalised with VBench's ranges, then weighted. A
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


def _locate_vbench() -> tuple[list[str] | None, str]:
    """``(command prefix, "")`` for the first VBench found, else ``(None, why not)``."""
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
    device = device or os.environ.get(DEVICE_ENV) or "auto"
    command, why_not = _locate_vbench()
    if command is None:
        return {d: {"status": "not run", "reason": why_not} for d in dimensions}
    driver = command[1:2] == ["-c"]
    results: dict[str, dict[str, Any]] = {}
    for dim in dimensions:
        if mode == "custom_input" and dim in CUSTOM_UNSUPPORTED:
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
            "--mode",
            mode,
        ]
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
        if dim in scores:
            results[dim] = {"status": "ok", "score": scores[dim]}
        else:
            results[dim] = {
                "status": "not run",
                "reason": _failure_reason(proc.stderr, proc.returncode, proc.stdout),
            }
    return results
