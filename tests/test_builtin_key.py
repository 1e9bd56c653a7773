"""A built-in base's shipped weights are part of every stage key (anyflow.stages.cache_key, review finding).

Before, the key held only the string ``builtin:tiny``: replacing the tiny VAE (as a release did) left every key
unchanged, so an existing store served latents encoded by the old VAE to a model decoding with the new one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from anyflow.config import apply_overrides, get_preset
from anyflow.models import tiny
from anyflow.stages import cache_key, stage_module


def _key(stage: str, preset: str = "tiny", **over: object) -> str:
    cfg = apply_overrides(get_preset(preset), over)
    return cache_key(stage, cfg, stage_module(stage).SECTIONS, {})


@pytest.fixture
def copied_assets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """The built-ins pointed at a copy of the shipped files (the test edits the copy)."""
    vae, demo = tmp_path / "tiny_vae", tmp_path / "demo_wan"
    shutil.copytree(tiny.TINY_VAE_DIR, vae)
    shutil.copytree(tiny.DEMO_WAN_DIR, demo)
    monkeypatch.setattr(tiny, "BUILTIN_ASSETS", {"builtin:tiny": (vae,), "builtin:demo": (vae, demo)})
    tiny.builtin_assets_digest.cache_clear()
    yield vae, demo
    tiny.builtin_assets_digest.cache_clear()


def _flip_a_byte(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 0x01
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("stage", ["prepare_data", "train_teacher", "evaluate"])
def test_new_vae_weights_are_a_new_key(copied_assets, stage: str) -> None:
    vae, _ = copied_assets
    before = _key(stage)
    assert _key(stage) == before  # the same files: the same key
    _flip_a_byte(vae / "diffusion_pytorch_model.safetensors")
    tiny.builtin_assets_digest.cache_clear()
    assert _key(stage) != before


def test_the_demo_transformer_is_in_the_demo_keys_only(copied_assets) -> None:
    _, demo = copied_assets
    tiny_before, demo_before = _key("train_teacher"), _key("train_teacher", "demo")
    _flip_a_byte(demo / "diffusion_pytorch_model.safetensors")
    tiny.builtin_assets_digest.cache_clear()
    assert _key("train_teacher") == tiny_before
    assert _key("train_teacher", "demo") != demo_before


def test_a_wan_folder_base_has_no_builtin_digest() -> None:
    assert tiny.builtin_assets_digest("/models/Wan2.1-T2V-1.3B-Diffusers") is None
    assert tiny.builtin_assets_digest("s3://bucket/wan") is None


# A checkpoint names its base by the string only; ``model.json`` also records the built-in's shipped weights, so
# that ``anyflow export`` / ``sample`` / a training stage never apply its adapters to other weights without a word.


def _demo_checkpoint(root: Path) -> str:
    """A demo-preset generator checkpoint in the stages' format (one made-up adapter tensor: never sampled)."""
    import torch

    from anyflow import storage
    from anyflow.config import to_dict
    from anyflow.stages import common

    cfg = get_preset("demo")
    stage = root / "staging"
    state = {"blocks.0.attn1.to_q.lora_A.weight": torch.zeros(16, 32)}
    common.write_checkpoint(stage, cfg, {"generator": ("generator", state)}, kind="generator")
    storage.publish(stage, str(root / "ck"), kind="generator", config=to_dict(cfg))
    return str(root / "ck")


def _sha256_of_files(*folders: Path) -> str:
    """The digest written out independently: sha256 over (folder/name NUL, sha256 of the bytes), files sorted."""
    import hashlib

    h = hashlib.sha256()
    for folder in folders:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            h.update(f"{folder.name}/{path.relative_to(folder).as_posix()}\0".encode())
            h.update(hashlib.sha256(path.read_bytes()).digest())
    return h.hexdigest()


def test_a_checkpoint_of_other_demo_weights_is_refused_by_export_and_sample(copied_assets, tmp_path, capsys) -> None:
    import json

    from anyflow.cli import main as cli_main
    from anyflow.config import StageInputError
    from anyflow.sample import sample_latents
    from anyflow.stages import common

    vae, demo = copied_assets
    ck = _demo_checkpoint(tmp_path)
    meta = json.loads((Path(ck) / "model.json").read_text())
    assert meta["base"] == "builtin:demo" and meta["base_assets"] == _sha256_of_files(vae, demo)
    common.read_checkpoint(ck, get_preset("demo"), role="checkpoint", need=("generator",))  # the same weights: read
    from anyflow.export import base_key

    shared_base = base_key(get_preset("demo"), "float32")  # names a converted base a LoRA export shares in a store

    _flip_a_byte(demo / "diffusion_pytorch_model.safetensors")  # another builtin:demo is installed
    tiny.builtin_assets_digest.cache_clear()
    out = tmp_path / "export"
    assert cli_main(["export", ck, "--format", "diffusers", "--output", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ck in err[0] and "'builtin:demo'" in err[0] and "shipped weights" in err[0], err
    assert not out.exists()
    with pytest.raises(StageInputError, match="shipped weights"):
        sample_latents(ck, ["a red circle"], nfe=1)
    assert base_key(get_preset("demo"), "float32") != shared_base  # a store's converted base is not reused


def test_a_checkpoint_without_the_record_is_still_read(copied_assets, tmp_path) -> None:
    """Checkpoints written before the field existed name no digest and are read as before."""
    import json

    from anyflow import storage
    from anyflow.stages import common

    ck = Path(_demo_checkpoint(tmp_path))
    meta = json.loads((ck / "model.json").read_text())
    meta.pop("base_assets", None)
    old = tmp_path / "old"
    shutil.copytree(ck, old)
    (old / "manifest.json").unlink()
    (old / "model.json").write_text(json.dumps(meta))
    storage.publish(old, str(tmp_path / "old-ck"), kind="generator", config=json.loads((ck / "config.json").read_text()))
    got = common.read_checkpoint(str(tmp_path / "old-ck"), get_preset("demo"), role="checkpoint", need=("generator",))
    want = common.read_checkpoint(str(ck), get_preset("demo"), role="checkpoint", need=("generator",))
    assert "base_assets" not in got.meta and got.adapters["generator"].keys() == want.adapters["generator"].keys()
    assert all(torch.equal(got.adapters["generator"][k], v) for k, v in want.adapters["generator"].items())
