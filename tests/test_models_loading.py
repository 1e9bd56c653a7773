"""Base-model loading: builtin tiny vs the same models saved in the diffusers Wan layout; text; VAE."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from anyflow.models.callable import flowmap_fn
from anyflow.models.loading import load_base, save_tiny_base
from anyflow.models.text import WAN_NEGATIVE_PROMPT

PROMPTS = ["a red circle moving left", "blue square", "the yellow ball is bouncing up and down fast"]


@pytest.fixture(scope="module")
def builtin():
    return load_base("builtin:tiny")


@pytest.fixture(scope="module")
def saved_root(tmp_path_factory):
    return save_tiny_base(tmp_path_factory.mktemp("tiny_base"), seed=0)


def test_saved_layout_is_diffusers_wan_with_safetensors(saved_root):
    index = json.loads((saved_root / "model_index.json").read_text())
    assert index["_class_name"] == "WanPipeline"
    for sub in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (saved_root / sub).is_dir(), sub
    cfg = json.loads((saved_root / "transformer" / "config.json").read_text())
    assert cfg["_class_name"] == "WanTransformer3DModel"  # stored unconverted
    files = [p.name for p in saved_root.rglob("*") if p.is_file()]
    assert any(f.endswith(".safetensors") for f in files)
    assert not any(f.endswith((".bin", ".pt", ".pth", ".ckpt", ".pkl")) for f in files)


def test_load_dir_reproduces_builtin(builtin, saved_root):
    loaded = load_base(str(saved_root))
    assert loaded.source == str(saved_root)
    sd_a, sd_b = builtin.transformer.state_dict(), loaded.transformer.state_dict()
    assert sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    assert not any(p.requires_grad for p in loaded.transformer.parameters())

    gen = torch.Generator().manual_seed(0)
    z = torch.randn(2, 2, 4, 4, 4, generator=gen)
    t, r = torch.full((2, 2), 700.0), torch.full((2, 2), 200.0)
    c = builtin.text.encode(PROMPTS[:2])
    assert torch.equal(loaded.text.encode(PROMPTS[:2]), c)
    with torch.no_grad():
        assert torch.equal(flowmap_fn(loaded.transformer)(z, t, r, c), flowmap_fn(builtin.transformer)(z, t, r, c))
    video = torch.rand(1, 3, 5, 16, 16, generator=gen) * 2 - 1
    lat = builtin.vae.encode(video)
    assert torch.equal(loaded.vae.encode(video), lat)
    assert torch.equal(loaded.vae.decode(lat), builtin.vae.decode(lat))


def test_text_encoder_zeroes_past_true_length(builtin):
    text = builtin.text
    emb = text.encode(PROMPTS)
    assert emb.shape == (3, 16, 32) and emb.dtype == torch.float32 and text.dim == 32 and text.max_length == 16
    for i, prompt in enumerate(PROMPTS):
        n = len(prompt.split()) + 1  # every word is in the tiny vocabulary, plus </s>
        assert emb[i, n:].abs().max() == 0
        assert (emb[i, :n].abs().sum(-1) > 0).all()
        # Reference: the encoder run on the unpadded ids alone gives the same valid rows.
        ids = text.tokenizer(prompt, return_tensors="pt")["input_ids"]
        assert ids.shape[1] == n and ids[0, -1].item() == text.tokenizer.eos_token_id
        with torch.no_grad():
            alone = text.model(input_ids=ids).last_hidden_state[0]
        assert torch.allclose(emb[i, :n], alone, atol=1e-5)
    neg = text.encode([WAN_NEGATIVE_PROMPT])  # long prompt: truncated to max_length, nothing zeroed
    assert (neg[0].abs().sum(-1) > 0).all()
    assert WAN_NEGATIVE_PROMPT.startswith("色调艳丽，过曝，静态") and WAN_NEGATIVE_PROMPT.endswith("背景人很多，倒着走")
    with pytest.raises(TypeError, match="list of strings"):
        text.encode("a red circle")


def test_vae_shapes_and_mean_normalisation(builtin):
    vae = builtin.vae
    assert (vae.temporal_factor, vae.spatial_factor) == (4, 8)
    assert vae.latent_shape(81, 480, 832) == (21, 4, 60, 104)
    gen = torch.Generator().manual_seed(1)
    for frames, expected_f in ((17, 5), (9, 3), (1, 1)):  # F = (T - 1)/4 + 1; 81 -> 21 in the slow test
        video = torch.rand(1, 3, frames, 16, 16, generator=gen) * 2 - 1
        lat = vae.encode(video)
        assert lat.shape == (1, expected_f, 4, 2, 2) == (1, *vae.latent_shape(frames, 16, 16))
        out = vae.decode(lat)
        assert out.shape == video.shape and out.min() >= -1 and out.max() <= 1
    video = torch.rand(2, 3, 9, 16, 24, generator=gen) * 2 - 1
    lat = vae.encode(video)
    assert torch.equal(lat, vae.encode(video))  # posterior mean, not a sample
    # Reference: diffusers' posterior mean normalised by the config statistics, by hand.
    cfg = vae.vae.config
    mean = torch.tensor(cfg.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(cfg.latents_std).view(1, -1, 1, 1, 1)
    with torch.no_grad():
        mu = vae.vae.encode(video).latent_dist.mean
        expected = ((mu - mean) / std).permute(0, 2, 1, 3, 4)
        assert torch.allclose(lat, expected, atol=1e-6)
        decoded_ref = vae.vae.decode(lat.permute(0, 2, 1, 3, 4) * std + mean).sample.clamp(-1, 1)
    assert torch.allclose(vae.decode(lat), decoded_ref, atol=1e-6)
    with pytest.raises(ValueError, match="1 \\+ 4"):
        vae.latent_shape(80, 16, 16)
    with pytest.raises(ValueError, match="multiple of 8"):
        vae.encode(torch.zeros(1, 3, 5, 12, 16))


@pytest.mark.slow
def test_vae_81_frames_give_21_latent_frames(builtin):
    video = torch.rand(1, 3, 81, 16, 16, generator=torch.Generator().manual_seed(2)) * 2 - 1
    lat = builtin.vae.encode(video)
    assert lat.shape == (1, 21, 4, 2, 2)
    assert builtin.vae.decode(lat).shape == video.shape


@pytest.mark.parametrize("missing", ["vae", "text_encoder", "transformer", "tokenizer", "model_index.json"])
def test_missing_part_is_a_clear_error(saved_root, tmp_path, missing):
    root = tmp_path / "partial"
    shutil.copytree(saved_root, root)
    target = root / missing
    shutil.rmtree(target) if target.is_dir() else target.unlink()
    with pytest.raises(FileNotFoundError, match=missing):
        load_base(str(root))


def test_bad_specs_are_errors(tmp_path):
    with pytest.raises(ValueError, match="builtin:tiny"):
        load_base("builtin:huge")
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_base(str(tmp_path / "nowhere"))


def test_reduced_precision_keeps_fp32_time_embedder():
    base = load_base("builtin:tiny", dtype=torch.bfloat16)
    tr = base.transformer
    assert tr.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    assert tr.condition_embedder.time_embedder.linear_1.weight.dtype == torch.float32
    assert base.vae.vae.decoder.conv_in.weight.dtype == torch.float32
    z = torch.randn(1, 1, 4, 4, 4, generator=torch.Generator().manual_seed(0))
    t = torch.full((1, 1), 500.0)
    with torch.no_grad():
        out = flowmap_fn(tr)(z, t, t, base.text.encode(["red circle"]))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
