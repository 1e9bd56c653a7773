"""The causal (FAR) variant: chunk layout, block mask, teacher forcing and the KV-cache rollout (docs/method.md §8).

Model-agnostic torch code: the FAR transformer (diffusers' ``AnyFlowFARTransformer3DModel``) is only called
through its documented ``forward`` keywords, never imported. The per-chunk maths reuses
:mod:`anyflow.rollout` (``flowmap_euler_sample``, ``fmbs_rollout``): a chunk is denoised by a
``FlowMapFn`` that closes over the KV cache of the previous chunks.

Token kinds of the training sequence ``[compressed context | noisy window | clean copy of the window]``
(§8.2) are CONTEXT, NOISY, CLEAN and PAD (the flex block size pads the sequence to a multiple of 128).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from anyflow.rollout import FlowMapFn, flowmap_euler_sample, fmbs_rollout

CONTEXT, NOISY, CLEAN, PAD = 0, 1, 2, 3
FLEX_BLOCK = 128


# --------------------------------------------------------------------------------------------------
# Chunk partition helpers (§8.1)
# --------------------------------------------------------------------------------------------------


def chunk_bounds(chunk_partition: Sequence[int]) -> list[tuple[int, int]]:
    """[(first_frame, end_frame)] of every chunk."""
    if len(chunk_partition) == 0 or any(int(n) < 1 for n in chunk_partition):
        raise ValueError(f"chunk_partition must be a non-empty list of positive frame counts, got {list(chunk_partition)}.")
    ends = [sum(chunk_partition[: i + 1]) for i in range(len(chunk_partition))]
    return [(e - n, e) for e, n in zip(ends, chunk_partition, strict=True)]


def num_compressed_chunks(num_chunks: int, full_chunk_limit: int = 3) -> int:
    """How many of ``num_chunks`` are compressed context: all but the last ``full_chunk_limit`` (§8.1, §8.2)."""
    return max(0, num_chunks - full_chunk_limit)


def context_chunk_count(num_context_frames: int, chunk_partition: Sequence[int]) -> int:
    """§8.7: the chunks that given context frames fill (0 for T2V). They must fill whole chunks."""
    if num_context_frames == 0:
        return 0
    ends = [b for _, b in chunk_bounds(chunk_partition)]
    if num_context_frames not in ends:
        raise ValueError(
            f"{num_context_frames} context latent frames do not fill whole chunks of chunk_partition "
            f"{list(chunk_partition)} (chunk ends {ends}); pass 1 frame (I2V), 7 (V2V) or another chunk end."
        )
    return ends.index(num_context_frames) + 1


def sample_num_chunks(
    generator: torch.Generator,
    *,
    long_context_ratio: float = 0.5,
    min_chunks: int = 3,
    max_chunks: int = 8,
) -> int:
    """§8.2.1 context-length sampling: with prob. ``long_context_ratio`` n ~ U{min..max}, else n = min.

    Every rank must get the same n: draw from a generator seeded identically on all ranks (the training methods
    seed it from (seed, step)). Two draws are always made, so the generator advances the same way.
    """
    if not 1 <= min_chunks <= max_chunks:
        raise ValueError(f"need 1 <= min_chunks <= max_chunks, got {min_chunks}, {max_chunks}.")
    dev = generator.device
    coin = float(torch.rand((), generator=generator, device=dev))
    n = int(torch.randint(min_chunks, max_chunks + 1, (), generator=generator, device=dev))
    return n if coin < long_context_ratio else min_chunks


# --------------------------------------------------------------------------------------------------
# Token layout and the five-rule mask (§8.2.3-4)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FarTokenLayout:
    """Per-token chunk index and kind of a FAR sequence, padded to a multiple of ``pad_to``."""

    chunk_partition: tuple[int, ...]
    num_context_chunks: int
    full_tokens_per_frame: int
    compressed_tokens_per_frame: int
    has_clean: bool
    chunk: Tensor  # (L_pad,) long; −1 on padding
    kind: Tensor  # (L_pad,) long; CONTEXT / NOISY / CLEAN / PAD

    @property
    def seq_len(self) -> int:
        return int((self.kind != PAD).sum())

    @property
    def padded_len(self) -> int:
        return int(self.kind.numel())


def far_token_layout(
    chunk_partition: Sequence[int],
    height: int,
    width: int,
    *,
    patch_size: Sequence[int] = (1, 2, 2),
    compressed_patch_size: Sequence[int] = (1, 4, 4),
    full_chunk_limit: int = 3,
    has_clean: bool = True,
    pad_to: int = FLEX_BLOCK,
) -> FarTokenLayout:
    """Token layout of the FAR forward over ``chunk_partition`` (latent ``height`` × ``width``).

    * ``has_clean=True`` (teacher forcing, §8.2): the last ``full_chunk_limit`` chunks are the noisy window,
      earlier chunks compressed context, then a clean copy of the window.
    * ``has_clean=False`` (cache pass / full masked forward, §8.5): full chunks are history or the chunk being
      generated; they are labelled CLEAN so the rules reduce to chunk-causal attention. For the cache pass use
      ``full_chunk_limit − 1`` (the two most recent chunks stay full).
    """
    bounds = chunk_bounds(chunk_partition)
    for name, p in (("patch_size", patch_size), ("compressed_patch_size", compressed_patch_size)):
        if height % p[1] or width % p[2]:
            raise ValueError(f"latent size {height}x{width} is not divisible by {name}={tuple(p)}.")
    full_tpf = (height // patch_size[1]) * (width // patch_size[2])
    comp_tpf = (height // compressed_patch_size[1]) * (width // compressed_patch_size[2])
    n_ctx = num_compressed_chunks(len(bounds), full_chunk_limit)
    chunk: list[Tensor] = []
    kind: list[Tensor] = []

    def add(c: int, k: int, n: int) -> None:
        chunk.append(torch.full((n,), c, dtype=torch.long))
        kind.append(torch.full((n,), k, dtype=torch.long))

    for c in range(n_ctx):
        add(c, CONTEXT, chunk_partition[c] * comp_tpf)
    full_kind = NOISY if has_clean else CLEAN
    for c in range(n_ctx, len(bounds)):
        add(c, full_kind, chunk_partition[c] * full_tpf)
    if has_clean:
        for c in range(n_ctx, len(bounds)):
            add(c, CLEAN, chunk_partition[c] * full_tpf)
    seq = sum(t.numel() for t in chunk)
    add(-1, PAD, int(math.ceil(seq / pad_to) * pad_to) - seq)
    return FarTokenLayout(
        chunk_partition=tuple(int(n) for n in chunk_partition),
        num_context_chunks=n_ctx,
        full_tokens_per_frame=full_tpf,
        compressed_tokens_per_frame=comp_tpf,
        has_clean=has_clean,
        chunk=torch.cat(chunk),
        kind=torch.cat(kind),
    )


def far_mask_rule(q_chunk: Tensor, q_kind: Tensor, k_chunk: Tensor, k_kind: Tensor) -> Tensor:
    """§8.2.4: may query (chunk, kind) attend key (chunk, kind)? All five rules must hold (broadcasting)."""
    chunk_causal = q_chunk >= k_chunk  # 1
    not_padding = (q_kind != PAD) & (k_kind != PAD)  # 2
    clean_to_noisy = (q_kind == CLEAN) & (k_kind == NOISY)  # 3 forbidden
    noisy_cross_chunk = (q_kind == NOISY) & (k_kind == NOISY) & (q_chunk != k_chunk)  # 4 forbidden
    noisy_to_own_clean = (q_kind == NOISY) & (k_kind == CLEAN) & (q_chunk == k_chunk)  # 5 forbidden
    return chunk_causal & not_padding & ~clean_to_noisy & ~noisy_cross_chunk & ~noisy_to_own_clean


def far_dense_mask(layout: FarTokenLayout, device: torch.device | str | None = None) -> Tensor:
    """The (L_pad, L_pad) boolean mask of ``layout`` (True = may attend); padding rows/cols all False."""
    c, k = layout.chunk.to(device), layout.kind.to(device)
    return far_mask_rule(c[:, None], k[:, None], c[None, :], k[None, :])


def far_block_mask(layout: FarTokenLayout, device: torch.device | str | None = None) -> Any:
    """The same rule as a flex-attention ``BlockMask`` (evaluated lazily from the per-token vectors)."""
    from torch.nn.attention.flex_attention import create_block_mask

    c, k = layout.chunk.to(device), layout.kind.to(device)

    def mask_mod(b, h, q_idx, kv_idx):
        return far_mask_rule(c[q_idx], k[q_idx], c[kv_idx], k[kv_idx])

    n = layout.padded_len
    dev = torch.device(device or "cpu")
    # compiled on CUDA: the eager path evaluates mask_mod over the full L × L grid (≈ 4e9 entries at 480p)
    return create_block_mask(mask_mod, B=None, H=None, Q_LEN=n, KV_LEN=n, device=dev, _compile=dev.type == "cuda")


def far_attention_mask(layout: FarTokenLayout, kind: str, device: torch.device | str | None = None) -> Any:
    """The mask for a FAR model whose attention path is ``kind`` (``"flex"`` BlockMask, ``"dense"`` bool)."""
    if kind == "flex":
        return far_block_mask(layout, device)
    if kind == "dense":
        return far_dense_mask(layout, device)
    raise ValueError(f"FAR attention kind must be 'flex' or 'dense', got {kind!r}.")


@functools.lru_cache(maxsize=16)
def _model_layout_mask(
    chunk_partition: tuple[int, ...], height: int, width: int, patch_size: tuple[int, ...],
    compressed_patch_size: tuple[int, ...], full_chunk_limit: int, has_clean: bool, kind: str, device: str,
) -> tuple[FarTokenLayout, Any]:
    """Layout and mask, memoised: the same few shapes recur every step (masks cost an L × L evaluation)."""
    layout = far_token_layout(chunk_partition, height, width, patch_size=patch_size,
                              compressed_patch_size=compressed_patch_size, full_chunk_limit=full_chunk_limit,
                              has_clean=has_clean)
    return layout, far_attention_mask(layout, kind, device)


def model_layout_mask(model: Any, chunk_partition: Sequence[int], height: int, width: int, *, has_clean: bool,
                      full_chunk_limit: int | None = None, device: torch.device | str = "cpu") -> tuple[FarTokenLayout, Any]:
    """:func:`far_token_layout` and its mask for ``model``'s patch sizes and attention kind (cached)."""
    cfg = model.config
    return _model_layout_mask(
        tuple(int(n) for n in chunk_partition), int(height), int(width), tuple(cfg.patch_size),
        tuple(cfg.compressed_patch_size), int(cfg.full_chunk_limit if full_chunk_limit is None else full_chunk_limit),
        bool(has_clean), _attention_kind(model), str(torch.device(device)),
    )


# --------------------------------------------------------------------------------------------------
# Teacher forcing (§8.2-8.4)
# --------------------------------------------------------------------------------------------------


def _model_dtype(model: Any) -> torch.dtype:
    # proj_out is never kept in fp32 (the time embedder and norms may be), so it holds the compute dtype
    return model.proj_out.weight.dtype


def _attention_kind(model: Any) -> str:
    return getattr(model, "_far_attention", "flex")  # set by anyflow.models.far.set_far_attention


@dataclass
class TeacherForcedSplit:
    """A clip split for teacher forcing: compressed context, window (clean), and the chunk partition used."""

    context: Tensor  # (B, Fc, C, H, W) clean latents of the compressed chunks
    window: Tensor  # (B, Fw, C, H, W) clean latents of the window (last full_chunk_limit chunks)
    chunk_partition: tuple[int, ...]


def split_teacher_forcing(
    x: Tensor, chunk_partition: Sequence[int], num_chunks: int, *, full_chunk_limit: int = 3
) -> TeacherForcedSplit:
    """§8.2.1-2: keep the first ``num_chunks`` chunks of ``x`` (B, F, C, H, W); the last ``full_chunk_limit`` of
    them form the window, earlier ones the context."""
    if not 1 <= num_chunks <= len(chunk_partition):
        raise ValueError(f"num_chunks must lie in [1, {len(chunk_partition)}], got {num_chunks}.")
    part = tuple(int(n) for n in chunk_partition[:num_chunks])
    if x.shape[1] < sum(part):
        raise ValueError(f"clip has {x.shape[1]} latent frames, fewer than the {sum(part)} of chunks {list(part)}.")
    fc = sum(part[: num_compressed_chunks(num_chunks, full_chunk_limit)])
    return TeacherForcedSplit(context=x[:, :fc], window=x[:, fc : sum(part)], chunk_partition=part)


def teacher_forced_fn(model: Any, split: TeacherForcedSplit, *, mask: Any = None) -> FlowMapFn:
    """The causal training callable u(z_window, t, r, c) of §8.3-8.4 (one forward = all window chunks).

    The sequence is [context (t = r = 0) | noisy window (t, r) | clean copy (t = δ = 0)]; only the noisy
    window's output is returned. Context and clean copy are fixed; ``t``/``r`` are (B, Fw) τ for the window.
    ``mask`` defaults to the five-rule mask of the model's attention kind; pass it to reuse it across calls.
    """
    b, fc = split.context.shape[:2]
    fw = split.window.shape[1]
    h, w = split.window.shape[-2:]
    if mask is None:
        _, mask = model_layout_mask(model, split.chunk_partition, h, w, has_clean=True, device=split.window.device)
    dtype = _model_dtype(model)
    ctx, clean = split.context.to(dtype), split.window.to(dtype)
    zeros_ctx = torch.zeros(b, fc, dtype=torch.float32, device=ctx.device)
    zeros_win = torch.zeros(b, fw, dtype=torch.float32, device=ctx.device)

    def u(z: Tensor, t: Tensor, r: Tensor, c: Tensor) -> Tensor:
        if z.shape[1] != fw:
            raise ValueError(f"the noisy window must have {fw} frames, got shape {tuple(z.shape)}.")
        out = model(
            hidden_states=torch.cat([ctx, z.to(dtype)], dim=1),
            timestep=torch.cat([zeros_ctx, t.float()], dim=1),
            r_timestep=torch.cat([zeros_ctx, r.float()], dim=1),
            encoder_hidden_states=c.to(dtype),
            chunk_partition=list(split.chunk_partition),
            clean_hidden_states=clean,
            clean_timestep=zeros_win,
            attention_mask=mask,
        ).sample
        return out.to(z.dtype)

    return u


def far_bidirectional_fn(model: Any) -> FlowMapFn:
    """The FAR transformer as the *bidirectional* model u(z, t, r, c): the whole clip as one full-resolution
    chunk, no clean copy, every real token attending every other (§8.4 auxiliary loss; the real score and the
    critic when they share the FAR base). At r = t it equals the unmodified Wan model (tests/test_far_model.py).
    """

    def u(z: Tensor, t: Tensor, r: Tensor, c: Tensor) -> Tensor:
        if z.ndim != 5:
            raise ValueError(f"z must be (B, F, C, H, W), got shape {tuple(z.shape)}.")
        f, (h, w) = z.shape[1], z.shape[-2:]
        _, mask = model_layout_mask(model, (f,), h, w, has_clean=False, device=z.device)
        dtype = _model_dtype(model)
        out = model(
            hidden_states=z.to(dtype), timestep=t.float(), r_timestep=r.float(), encoder_hidden_states=c.to(dtype),
            chunk_partition=[f], attention_mask=mask,
        ).sample
        return out.to(z.dtype)

    return u


# --------------------------------------------------------------------------------------------------
# KV-cache inference and the chunk-wise rollout (§8.5-8.7)
# --------------------------------------------------------------------------------------------------


@dataclass
class FarKVState:
    """KV cache of the first ``num_cached_chunks`` chunks (per block: compressed and full K/V buffers)."""

    kv_cache: dict[int, dict[str, Tensor]]
    num_cached_chunks: int


class FarCausalModel:
    """Adapter: a FAR transformer as a chunk-by-chunk causal flow map (§8.5).

    ``encode(frames, c)`` runs the no-grad cache pass over all frames so far (fresh buffers each time, as the
    cache is recomputed from scratch); ``chunk_fn(state)`` is the ``FlowMapFn`` of the next chunk reading it.
    ``calls`` counts transformer calls: ``denoise``, ``denoise_grad`` (made with autograd on), ``cache``.
    """

    def __init__(self, transformer: Any, chunk_partition: Sequence[int]) -> None:
        self.model = transformer
        self.chunk_partition = tuple(int(n) for n in chunk_partition)
        self.bounds = chunk_bounds(self.chunk_partition)
        self.calls = {"denoise": 0, "denoise_grad": 0, "cache": 0}

    def _empty_cache(self, batch: int, n_comp_tokens: int, n_full_tokens: int, like: Tensor) -> dict:
        cfg = self.model.config
        shape = (2, batch, cfg.num_attention_heads)
        return {
            i: {
                "compressed_cache": like.new_zeros((*shape, n_comp_tokens, cfg.attention_head_dim)),
                "full_cache": like.new_zeros((*shape, n_full_tokens, cfg.attention_head_dim)),
            }
            for i in range(cfg.num_layers)
        }

    def empty_state(self, like: Tensor) -> FarKVState:
        """The state before chunk 0 (nothing cached)."""
        return FarKVState(self._empty_cache(like.shape[0], 0, 0, like.to(_model_dtype(self.model))), 0)

    @torch.no_grad()
    def encode(self, frames: Tensor, c: Tensor) -> FarKVState:
        """§8.5 cache step: clean (t = r = 0) chunk-causal forward over ``frames`` (whole chunks), no grad."""
        cfg = self.model.config
        n = context_chunk_count(frames.shape[1], self.chunk_partition)
        if n == 0:
            raise ValueError("the cache pass needs at least one chunk of frames, got 0.")
        part = self.chunk_partition[:n]
        h, w = frames.shape[-2:]
        layout, mask = model_layout_mask(self.model, part, h, w, has_clean=False,
                                         full_chunk_limit=cfg.full_chunk_limit - 1, device=frames.device)
        n_comp = sum(part[: layout.num_context_chunks]) * layout.compressed_tokens_per_frame
        n_full = sum(part[layout.num_context_chunks :]) * layout.full_tokens_per_frame
        dtype = _model_dtype(self.model)
        x = frames.detach().to(dtype)
        kv = self._empty_cache(x.shape[0], n_comp, n_full, x)
        zeros = torch.zeros(x.shape[:2], dtype=torch.float32, device=x.device)
        self.model(
            hidden_states=x, timestep=zeros, r_timestep=zeros, encoder_hidden_states=c.to(dtype),
            chunk_partition=list(part), attention_mask=mask,
            kv_cache=kv, kv_cache_flag={"num_cached_chunks": n - 1, "is_cache_step": True},
        )
        self.calls["cache"] += 1
        return FarKVState(kv, n)

    def chunk_fn(self, state: FarKVState) -> FlowMapFn:
        """u(z_chunk, t, r, c) for chunk ``state.num_cached_chunks``: queries = the chunk, keys = cache ++ chunk."""
        part = list(self.chunk_partition[: state.num_cached_chunks + 1])
        dtype = _model_dtype(self.model)

        def u(z: Tensor, t: Tensor, r: Tensor, c: Tensor) -> Tensor:
            self.calls["denoise"] += 1
            self.calls["denoise_grad"] += int(torch.is_grad_enabled())
            out = self.model(
                hidden_states=z.to(dtype), timestep=t.float(), r_timestep=r.float(), encoder_hidden_states=c.to(dtype),
                chunk_partition=part, kv_cache=state.kv_cache,
                kv_cache_flag={"num_cached_chunks": state.num_cached_chunks, "is_cache_step": False},
            ).sample
            return out.to(z.dtype)

        return u


@dataclass
class CausalRolloutInfo:
    """NFE accounting of a causal rollout (§8.5): denoising calls + cache passes."""

    num_steps: int
    k: int | None
    num_context_chunks: int
    denoise_calls: int = 0
    cache_passes: int = 0
    calls_per_chunk: list[int] = field(default_factory=list)  # generated chunks only

    @property
    def nfe(self) -> int:
        return self.denoise_calls + self.cache_passes


def causal_rollout(
    model: FarCausalModel,
    noise: Tensor,
    c: Tensor,
    *,
    num_steps: int,
    k: int | None = None,
    context: Tensor | None = None,
    shift: float = 5.0,
) -> tuple[Tensor, CausalRolloutInfo]:
    """Generate a video chunk by chunk with a KV cache (§8.5-8.7).

    * ``k is None``: N-step FlowMap-Euler per chunk (inference, N calls per chunk).
    * ``k`` given: FMBS per chunk with the same (N, k) for all chunks (§8.6, ≤ 3 calls per chunk); gradients
      flow within each chunk when autograd is on. The cache holds the generator's *own* previous chunks,
      encoded under no-grad from detached frames, so no gradient crosses chunks.
    * ``context`` (B, Fc, C, H, W): I2V (1 frame) / V2V (chunk-aligned frames). Written to the output unchanged
      and into the cache; generation starts at the first non-context chunk. ``noise`` has the full video's shape;
      its context frames are ignored.

    Only the last cache pass before a chunk matters (the cache is recomputed from scratch), so context chunks
    share one pass: T2V with [1,3,3,3,3,3,3,2] costs 8·N denoising calls + 7 cache passes.
    """
    bounds = model.bounds
    if noise.ndim != 5 or noise.shape[1] != bounds[-1][1]:
        raise ValueError(f"noise must be (B, {bounds[-1][1]}, C, H, W) for chunk_partition "
                         f"{list(model.chunk_partition)}, got {tuple(noise.shape)}.")
    n_ctx = context_chunk_count(0 if context is None else context.shape[1], model.chunk_partition)
    info = CausalRolloutInfo(num_steps=num_steps, k=k, num_context_chunks=n_ctx)
    chunks: list[Tensor] = [] if context is None else [context.to(noise.dtype)]
    state = model.empty_state(noise)
    before = dict(model.calls)
    for i in range(n_ctx, len(bounds)):
        if i > 0:
            state = model.encode(torch.cat(chunks, dim=1), c)  # generator's own (or given) frames, no grad
        u = model.chunk_fn(state)
        start = model.calls["denoise"]
        z = noise[:, bounds[i][0] : bounds[i][1]]
        if k is None:
            x = flowmap_euler_sample(u, z, c, num_steps, shift=shift)
        else:
            x, _ = fmbs_rollout(u, z, c, num_steps, k, shift=shift)
        info.calls_per_chunk.append(model.calls["denoise"] - start)
        chunks.append(x)
    info.denoise_calls = model.calls["denoise"] - before["denoise"]
    info.cache_passes = model.calls["cache"] - before["cache"]
    return torch.cat(chunks, dim=1), info


def expected_nfe(chunk_partition: Sequence[int], num_steps: int, num_context_chunks: int = 0) -> tuple[int, int]:
    """(denoising calls, cache passes) of :func:`causal_rollout` with N-step FlowMap-Euler chunks."""
    n = len(chunk_partition)
    generated = n - num_context_chunks
    return generated * num_steps, generated if num_context_chunks > 0 else generated - 1
