"""A built-in base's shipped weights are part of every stage key (anyflow.stages.cache_key, review finding).

Before, the key held only the string ``builtin:tiny``: replacing the tiny VAE (as a release did) left every key
unchanged, so an existing store served latents encoded by the old VAE to a model decoding with the new one.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

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
