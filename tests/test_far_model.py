"""Wan → AnyFlow-FAR conversion (docs/method.md §2.2, §8.1) and its attention paths."""

from __future__ import annotations

import pytest
import torch

from anyflow.causal import TeacherForcedSplit, far_attention_mask, far_token_layout, teacher_forced_fn
from anyflow.models.far import convert_wan_to_far, set_far_attention
from anyflow.models.tiny import build_tiny_wan

pytestmark = pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")


@pytest.fixture(scope="module")
def wan():
    return build_tiny_wan(0)


def test_conversion_copies_weights_and_interpolates_patch_kernel(wan):
    far = convert_wan_to_far(wan, chunk_partition=(1, 3, 3, 3))
    wan_sd, far_sd = wan.state_dict(), far.state_dict()
    for k, v in wan_sd.items():
        assert torch.equal(far_sd[k], v), k
    emb = far.condition_embedder
    for a, b in zip(emb.delta_embedder.parameters(), emb.time_embedder.parameters(), strict=True):
        assert torch.equal(a, b)
    # Independent trilinear (here bilinear in h, w) resize 2 -> 4 with align_corners=False: output pixel i sits
    # at input coordinate (i + 0.5)/2 − 0.5 = −0.25, 0.25, 0.75, 1.25, clamped to [0, 1].
    a = torch.tensor([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])
    k2 = wan.patch_embedding.weight[:, :, 0]  # (D, C, 2, 2)
    ref = torch.einsum("ih,dchw,jw->dcij", a, k2, a)[:, :, None]
    assert far.far_patch_embedding.weight.shape == (32, 4, 1, 4, 4)
    torch.testing.assert_close(far.far_patch_embedding.weight, ref, rtol=0, atol=1e-6)
    assert torch.equal(far.far_patch_embedding.bias, wan.patch_embedding.bias)
    assert far.condition_embedder.delta_emb_gate.item() == 0.25


@pytest.mark.parametrize("attention", ["dense", "flex"])
def test_r_equals_t_matches_wan_on_full_token_path(wan, attention):
    """One full-resolution chunk (no compressed context, no clean copy): the mask allows everything real, so
    the FAR forward at r = t must reproduce the unmodified Wan model.

    Not bit-exact: the time embedding is (0.75·e + 0.25·e = e exactly, checked below), but Wan applies RoPE with
    real cos/sin in fp32 while the FAR class rotates in complex fp64, and the attention kernels differ; measured
    max-abs diff 3.6e-7 on outputs of magnitude ~2, so the tolerance is 2e-6.
    """
    far = convert_wan_to_far(wan, chunk_partition=(5,))
    set_far_attention(far, attention)
    g = torch.Generator().manual_seed(0)
    b, f = 2, 5
    x = torch.randn(b, f, 4, 8, 8, generator=g)
    c = torch.randn(b, 6, 32, generator=g)
    tau = torch.tensor([300.0, 871.0])
    t = tau[:, None].expand(b, f)
    layout = far_token_layout((5,), 8, 8, has_clean=False)
    mask = far_attention_mask(layout, attention)
    with torch.no_grad():
        ref = wan(hidden_states=x.permute(0, 2, 1, 3, 4), timestep=tau, encoder_hidden_states=c).sample
        ref = ref.permute(0, 2, 1, 3, 4)
        out = far(hidden_states=x, timestep=t, r_timestep=t, encoder_hidden_states=c, chunk_partition=[5],
                  attention_mask=mask).sample
        out_r = far(hidden_states=x, timestep=t, r_timestep=t * 0.5, encoder_hidden_states=c,
                    chunk_partition=[5], attention_mask=mask).sample
        emb = far.condition_embedder
        s = emb.timesteps_proj(tau)
        assert torch.equal(0.75 * emb.time_embedder(s) + 0.25 * emb.delta_embedder(s), emb.time_embedder(s))
    diff = (out - ref).abs().max().item()
    assert diff < 2e-6, diff
    assert (out_r - ref).abs().max().item() > 1e-3  # r enters: the check above can fail


def test_dense_path_equals_flex_and_diffusers_mask(wan):
    """Teacher-forced forward: our dense-mask SDPA path = flex with our BlockMask = flex with diffusers' mask."""
    far = convert_wan_to_far(wan, chunk_partition=(1, 3, 3, 3))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 10, 4, 8, 8, generator=g)
    c = torch.randn(1, 6, 32, generator=g)
    split = TeacherForcedSplit(context=x[:, :1], window=x[:, 1:], chunk_partition=(1, 3, 3, 3))
    z = torch.randn(1, 9, 4, 8, 8, generator=g)
    t = torch.full((1, 9), 640.0)
    r = torch.full((1, 9), 210.0)
    outs = {}
    with torch.no_grad():
        for attention in ("flex", "dense"):
            set_far_attention(far, attention)
            outs[attention] = teacher_forced_fn(far, split)(z, t, r, c)
        set_far_attention(far, "flex")
        zeros1, zeros9 = torch.zeros(1, 1), torch.zeros(1, 9)
        theirs = far(hidden_states=torch.cat([split.context, z], 1), timestep=torch.cat([zeros1, t], 1),
                     r_timestep=torch.cat([zeros1, r], 1), encoder_hidden_states=c, chunk_partition=[1, 3, 3, 3],
                     clean_hidden_states=split.window, clean_timestep=zeros9,
                     attention_mask=far.build_attention_mask(chunk_partition=[1, 3, 3, 3], height=8, width=8,
                                                            has_clean_context=True)).sample
    assert outs["flex"].shape == (1, 9, 4, 8, 8)
    assert torch.equal(outs["flex"], theirs)
    torch.testing.assert_close(outs["dense"], outs["flex"], rtol=0, atol=2e-6)
