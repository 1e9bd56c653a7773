"""Wan -> AnyFlow conversion: the converted model is the unmodified Wan model on the diagonal r = t."""

from __future__ import annotations

import pytest
import torch

from anyflow.models.callable import flowmap_fn, velocity_fn_wan
from anyflow.models.convert import anyflow_config_from_wan, anyflow_state_dict_from_wan, wan_to_anyflow
from anyflow.models.tiny import build_tiny_wan, tiny_transformer_config

T_VALUES = (0.0, 1.0, 250.0, 731.25, 999.0)


@pytest.fixture(scope="module")
def models():
    wan = build_tiny_wan(seed=0)
    return wan, wan_to_anyflow(wan)


def _text(batch: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 7, 32, generator=torch.Generator().manual_seed(seed))


def _latents(shape, seed: int = 2) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_r_equals_t_is_bitwise_wan_when_kernels_coincide(models):
    # One latent frame of one token: RoPE is the identity (position 0) and both models run the time
    # embedder on B rows, so nothing but the conversion can make them differ -> exactly 0.
    wan, anyflow = models
    u, v = flowmap_fn(anyflow), velocity_fn_wan(wan)
    z, c = _latents((2, 1, 4, 2, 2)), _text(2)
    for tv in T_VALUES:
        t = torch.full((2, 1), tv)
        assert torch.equal(u(z, t, t, c), v(z, t, t, c)), f"t={tv}"


def _wan_rope_arithmetic(hidden_states: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    # Wan's RoPE arithmetic (fp32 real cos/sin, interleaved pairs) on AnyFlow's complex table, whose
    # real/imag parts cast to fp32 equal Wan's cos/sin buffers bit for bit.
    x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs.real.to(hidden_states.dtype), freqs.imag.to(hidden_states.dtype)
    out = torch.empty_like(hidden_states)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out


@torch.no_grad()
@pytest.mark.parametrize("hw", [(8, 8), (16, 8)])
def test_r_equals_t_is_bitwise_wan_on_many_tokens_with_wan_rope_arithmetic(models, monkeypatch, hw):
    # Many tokens, one frame: the only kernel the two diffusers classes compute differently is RoPE
    # (Wan: fp32 cos/sin; AnyFlow: complex128, measured 2.4e-7 apart on unit inputs). With Wan's RoPE
    # arithmetic substituted into AnyFlow's attention processor, everything else -- patch embedding,
    # time/text embedders, every block, the output head -- must agree bit for bit.
    from diffusers.models.transformers import transformer_anyflow

    monkeypatch.setattr(transformer_anyflow, "apply_rotary_emb", _wan_rope_arithmetic)
    wan, anyflow = models
    u, v = flowmap_fn(anyflow), velocity_fn_wan(wan)
    z, c = _latents((2, 1, 4, *hw)), _text(2)
    for tv in T_VALUES:
        t = torch.full((2, 1), tv)
        assert torch.equal(u(z, t, t, c), v(z, t, t, c)), f"t={tv}"


@torch.no_grad()
def test_r_equals_t_matches_wan_multi_frame(models):
    # With several frames the two diffusers classes also lay the time embedding out differently: AnyFlow
    # runs the time embedder/projection on B·F rows (one per frame), Wan on B rows, and the CPU GEMM
    # does not return identical bits for identical rows at different positions (measured 3e-8 on the
    # time projection). Together with RoPE they agree to float32 rounding (measured max 4.8e-7 on
    # outputs of size ~2), not bitwise. The tolerance below is 10^4 times smaller than the r != t
    # effect checked in test_r_not_equal_t_changes_the_output.
    wan, anyflow = models
    u, v = flowmap_fn(anyflow), velocity_fn_wan(wan)
    z, c = _latents((2, 3, 4, 8, 8)), _text(2)
    gen = torch.Generator().manual_seed(3)
    ts = [torch.full((2, 3), tv) for tv in T_VALUES]  # equal per frame: Wan's (B,) timestep path
    ts.append(torch.rand(2, 3, generator=gen) * 1000)  # different per frame: Wan's per-token path
    for t in ts:
        ref = v(z, t, t, c)
        assert ref.abs().max() > 0.5
        diff = (u(z, t, t, c) - ref).abs().max().item()
        assert diff <= 2e-6, f"t={t.tolist()}: max |anyflow - wan| = {diff}"


@torch.no_grad()
def test_delta_path_is_exact_identity_at_r_equals_t(models):
    # Independent reference: an AnyFlow model loaded directly from the Wan weights with gate 0 and a
    # *random* delta embedder, i.e. pure Wan time conditioning through the same AnyFlow code path.
    from diffusers import AnyFlowTransformer3DModel

    wan, anyflow = models
    cfg = {k: v for k, v in tiny_transformer_config().items() if k not in ("qk_norm", "added_kv_proj_dim")}
    torch.manual_seed(123)
    ref = AnyFlowTransformer3DModel(**cfg, gate_value=0.0).eval()
    missing, unexpected = ref.load_state_dict(wan.state_dict(), strict=False)
    assert unexpected == [] and all(k.startswith("condition_embedder.delta_embedder.") for k in missing)
    u, u_ref = flowmap_fn(anyflow), flowmap_fn(ref)
    z, c = _latents((2, 3, 4, 8, 8)), _text(2)
    gen = torch.Generator().manual_seed(4)
    for t in [torch.full((2, 3), 500.0), torch.rand(2, 3, generator=gen) * 1000]:
        assert torch.equal(u(z, t, t, c), u_ref(z, t, t, c))
    # Off the diagonal the reference ignores r, the converted model must not.
    t = torch.full((2, 3), 800.0)
    assert not torch.equal(u(z, t, 0.5 * t, c), u_ref(z, t, 0.5 * t, c))


@torch.no_grad()
def test_r_not_equal_t_changes_the_output(models):
    _, anyflow = models
    u = flowmap_fn(anyflow)
    z, c = _latents((2, 3, 4, 8, 8)), _text(2)
    t = torch.full((2, 3), 900.0)
    on_diag = u(z, t, t, c)
    for r in (0.5 * t, torch.zeros_like(t), torch.tensor([[900.0, 600.0, 300.0]]).expand(2, 3)):
        assert (u(z, t, r, c) - on_diag).abs().max() > 1e-2


def test_weights_copied_and_wan_untouched(models):
    wan, _ = models
    before = {k: v.clone() for k, v in wan.state_dict().items()}
    anyflow = wan_to_anyflow(wan)
    sd = anyflow.state_dict()
    for key, value in before.items():
        assert torch.equal(sd[key], value), key
    time_w = anyflow.condition_embedder.time_embedder.linear_1.weight
    delta_w = anyflow.condition_embedder.delta_embedder.linear_1.weight
    assert torch.equal(time_w, delta_w) and time_w.data_ptr() != delta_w.data_ptr()
    with torch.no_grad():  # training the AnyFlow copy must not move the Wan weights
        anyflow.blocks[0].attn1.to_q.weight.add_(1.0)
        delta_w.add_(1.0)
    assert torch.equal(wan.blocks[0].attn1.to_q.weight, before["blocks.0.attn1.to_q.weight"])
    assert torch.equal(anyflow.condition_embedder.time_embedder.linear_1.weight, time_w)
    assert float(anyflow.condition_embedder.delta_emb_gate) == 0.25
    assert anyflow.config.deltatime_type == "r" and anyflow.config.num_layers == 2
    assert all(p.requires_grad for p in anyflow.parameters())


def test_unmapped_wan_key_is_an_error():
    wan = build_tiny_wan(seed=0)
    state = dict(wan.state_dict())
    state["blocks.0.attn2.add_k_proj.weight"] = torch.zeros(32, 32)
    from diffusers import AnyFlowTransformer3DModel

    cfg = anyflow_config_from_wan(wan.config)
    keys = set(AnyFlowTransformer3DModel(**cfg).state_dict())
    with pytest.raises(ValueError, match="add_k_proj"):
        anyflow_state_dict_from_wan(state, keys)
    state = dict(wan.state_dict())
    del state["proj_out.bias"]
    with pytest.raises(ValueError, match=r"proj_out\.bias"):
        anyflow_state_dict_from_wan(state, keys)


def test_unsupported_configs_are_errors():
    cfg = dict(tiny_transformer_config())
    with pytest.raises(ValueError, match="I2V"):
        anyflow_config_from_wan({**cfg, "added_kv_proj_dim": 32})
    with pytest.raises(ValueError, match="deltatime_type"):
        anyflow_config_from_wan(cfg, deltatime_type="t+r")
    out = anyflow_config_from_wan(cfg, gate_value=0.5, deltatime_type="t-r")
    assert out["gate_value"] == 0.5 and out["deltatime_type"] == "t-r" and "qk_norm" not in out


def test_callable_dtypes_and_shape_checks():
    anyflow = wan_to_anyflow(build_tiny_wan(seed=0)).to(torch.bfloat16)
    u = flowmap_fn(anyflow)
    z, c = _latents((1, 2, 4, 4, 4)), _text(1)
    t = torch.full((1, 2), 500.0)
    with torch.no_grad():
        out = u(z, t, t, c)
    assert out.dtype == torch.float32 and out.shape == z.shape
    with pytest.raises(ValueError, match="r must be"):
        u(z, t, t[:, :1], c)
    with pytest.raises(ValueError, match=r"z must be \(B, F, C, H, W\)"):
        u(z[0], t, t, c)
