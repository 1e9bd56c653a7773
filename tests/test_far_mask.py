"""The FAR attention mask (docs/method.md §8.2): five rules, padding, long-context sampling."""

from __future__ import annotations

import pytest
import torch

from anyflow.causal import (
    context_chunk_count,
    far_block_mask,
    far_dense_mask,
    far_token_layout,
    sample_num_chunks,
    split_teacher_forcing,
)


def literal_tokens(partition, full_tpf, comp_tpf, full_chunk_limit=3, pad_to=128):
    """Independent token list [(kind, chunk)] of [compressed context | noisy window | clean copy | pad]."""
    n_ctx = max(0, len(partition) - full_chunk_limit)
    toks = []
    for c in range(n_ctx):
        toks += [("context", c)] * (partition[c] * comp_tpf)
    for c in range(n_ctx, len(partition)):
        toks += [("noisy", c)] * (partition[c] * full_tpf)
    for c in range(n_ctx, len(partition)):
        toks += [("clean", c)] * (partition[c] * full_tpf)
    while len(toks) % pad_to:
        toks.append(("pad", None))
    return toks


def literal_allowed(q, k):
    """The five rules of §8.2.4, applied literally to one (query, key) token pair."""
    (qk, qc), (kk, kc) = q, k
    if qk == "pad" or kk == "pad":
        return False
    if not qc >= kc:
        return False
    if qk == "clean" and kk == "noisy":
        return False
    if qk == "noisy" and kk == "noisy" and qc != kc:
        return False
    return not (qk == "noisy" and kk == "clean" and qc == kc)


@pytest.mark.parametrize("partition", [(1, 3, 3, 3), (1, 3, 3, 3, 2), (1, 3, 3)])
def test_dense_mask_equals_literal_five_rules(partition):
    h = w = 4  # 4 full tokens per frame (patch 2x2), 1 compressed token per frame (patch 4x4)
    layout = far_token_layout(partition, h, w)
    toks = literal_tokens(partition, full_tpf=4, comp_tpf=1)
    ref = torch.tensor([[literal_allowed(q, k) for k in toks] for q in toks])
    mask = far_dense_mask(layout)
    assert mask.shape == ref.shape == (layout.padded_len, layout.padded_len)
    assert torch.equal(mask, ref)
    real = layout.seq_len
    assert real < layout.padded_len  # the test really covers padding
    assert not mask[real:].any() and not mask[:, real:].any()
    # Spot checks of the consequences listed in §8.2: noisy chunk sees its own chunk, not later clean copies.
    assert mask[:real].any(dim=1).all()  # no real token is fully masked


def test_dense_mask_equals_diffusers_block_mask():
    """Our rules = diffusers' own FAR mask_mod (train layout with clean copies, and the cache layout)."""
    from diffusers.models.transformers.transformer_anyflow_far import _build_anyflow_far_causal_block_mask

    def dense_of(block_mask, n):
        q = torch.arange(n)[:, None]
        k = torch.arange(n)[None, :]
        return block_mask.mask_mod(torch.zeros(()), torch.zeros(()), q, k).bool()

    for partition, mode, has_clean, limit in [
        ((1, 3, 3, 3, 2), "train", True, 3),
        ((1, 3, 3, 3), "cache", False, 2),
        ((1, 3), "train", False, 3),
    ]:
        ours = far_dense_mask(far_token_layout(partition, 8, 8, full_chunk_limit=limit, has_clean=has_clean))
        theirs = _build_anyflow_far_causal_block_mask(
            list(partition), 8, 8, (1, 2, 2), (1, 4, 4), 3, mode=mode, has_clean_context=has_clean
        )
        assert torch.equal(ours, dense_of(theirs, ours.shape[0])), (partition, mode)


def test_block_mask_matches_dense():
    layout = far_token_layout((1, 3, 3, 3, 2), 8, 8)
    bm = far_block_mask(layout)
    n = layout.padded_len
    assert bm.shape[-2:] == (n, n)
    q, k = torch.arange(n)[:, None], torch.arange(n)[None, :]
    assert torch.equal(bm.mask_mod(0, 0, q, k).bool(), far_dense_mask(layout))


def test_sample_num_chunks_distribution_and_determinism():
    g = torch.Generator().manual_seed(0)
    draws = torch.tensor([sample_num_chunks(g) for _ in range(6000)])
    assert int(draws.min()) >= 3 and int(draws.max()) <= 8
    p3 = float((draws == 3).float().mean())
    assert abs(p3 - (0.5 + 0.5 / 6)) < 0.03  # short context half the time, plus U{3..8} hitting 3
    for n in range(4, 9):
        assert abs(float((draws == n).float().mean()) - 0.5 / 6) < 0.02
    a = [sample_num_chunks(torch.Generator().manual_seed(5)) for _ in range(2)]
    assert a[0] == a[1]
    assert all(sample_num_chunks(g, long_context_ratio=0.0) == 3 for _ in range(20))


def test_context_chunk_count():
    part = (1, 3, 3, 3, 3, 3, 3, 2)
    assert context_chunk_count(0, part) == 0
    assert context_chunk_count(1, part) == 1  # I2V
    assert context_chunk_count(7, part) == 3  # V2V: 25 video frames -> 7 latent frames
    with pytest.raises(ValueError, match="whole chunks"):
        context_chunk_count(2, part)


def test_split_teacher_forcing_window_and_context():
    """§8.2.1-2: keep n chunks; the last 3 are the window, earlier ones compressed context."""
    x = torch.arange(21.0).view(1, 21, 1, 1, 1).expand(2, 21, 4, 8, 8)
    part = (1, 3, 3, 3, 3, 3, 3, 2)
    s = split_teacher_forcing(x, part, 5)
    assert s.chunk_partition == (1, 3, 3, 3, 3)
    assert s.context[0, :, 0, 0, 0].tolist() == [0, 1, 2, 3]  # chunks 0, 1
    assert s.window[0, :, 0, 0, 0].tolist() == list(range(4, 13))  # chunks 2, 3, 4
    s3 = split_teacher_forcing(x, part, 3)
    assert s3.context.shape[1] == 0 and s3.window.shape[1] == 7
    layout = far_token_layout(s.chunk_partition, 8, 8)
    assert layout.num_context_chunks == 2
    assert layout.seq_len == 4 * 4 + 2 * 9 * 16  # compressed context (4 tokens/frame) + window + clean copy
    with pytest.raises(ValueError, match="num_chunks"):
        split_teacher_forcing(x, part, 9)
