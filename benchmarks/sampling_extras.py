"""The optional sections of ``bench_sampling``: end-to-end stage times and 1.3B transformer MFU.

``e2e_stage_times``: ``anyflow run``'s stages (prepare_data → train_teacher → train_flowmap → distill
→ evaluate, the ``anyflow-t2v`` DAG without KFP) through ``anyflow.stages.run_stage`` on the tiny
preset into a fresh temporary store, seconds per stage.

``mfu_bench``: forward and forward+backward of an ``AnyFlowTransformer3DModel`` with random weights at
the Wan2.1-T2V-1.3B shape in bf16 (dim 1536 = 12 heads × 128, 30 layers, FFN 8960, text dim 4096 ×
512 tokens, latent 21×60×104 → 21·30·52 = 32,760 tokens with patch (1, 2, 2)).

Model FLOPs of one forward (multiply-add = 2 FLOPs; L = video tokens, T = text tokens = 512, d = dim,
f = FFN width, n = layers, C·p = 16·4 patch values, D_t = 4096 text features):

    per block:  self-attn projections q,k,v,o      8·L·d²
                self-attn scores + weighted sum     4·L²·d
                cross-attn q, o                     4·L·d²
                cross-attn k, v (text)              4·T·d²
                cross-attn scores + weighted sum    4·L·T·d
                FFN (two matmuls)                   4·L·d·f
    once:       patch embed + proj_out              4·L·(C·p)·d
                text embedder (D_t→d→d)             2·T·(D_t·d + d²)

Forward+backward counts 3× the forward (backward = 2×: input and weight gradients; every weight is
trainable here). Timestep embeddings / modulation (per frame) and norms are left out (< 0.1 %).
MFU = model FLOPs / time / peak; the peak is looked up from the full device name (``peak_bf16``; H100
SXM vs PCIe vs NVL, H200 SXM vs NVL, GH200, A100) and printed with the table.
"""

from __future__ import annotations

import gc
import os
import tempfile
import time
from dataclasses import dataclass

import torch

CACHE_ENV = "ANYFLOW_CACHE_DIR"  # the artifact / model cache root (anyflow.storage, anyflow.stages.common)
# Dense bf16 tensor-core peaks, FLOP/s, from NVIDIA's data sheets (their "with sparsity" figures halved):
# H100 SXM5 / H200 SXM / GH200 989.4 T, H100 NVL / H200 NVL 835.5 T, H100 PCIe 756.5 T, A100 (SXM4 and
# PCIe, 40 and 80 GB) 312 T. Keyed by variant; ``peak_bf16`` maps a full device name onto one.
PEAK_BF16 = {
    "H100 SXM": 989.4e12,
    "H100 NVL": 835.5e12,
    "H100 PCIe": 756.5e12,
    "H200 SXM": 989.4e12,
    "H200 NVL": 835.5e12,
    "GH200": 989.4e12,
    "A100": 312e12,
}


# ------------------------------------------------------------------------------------------- e2e


def e2e_stage_times(*, quick: bool = False) -> list[tuple[str, float]]:
    """Run the tiny ``anyflow run`` chain stage by stage into a temporary store; print seconds per stage.

    ``quick`` uses the test suite's short settings (2 steps per training stage, NFE 1,2,4, 16-step
    reference, 2 prompts) instead of the tiny preset as is.
    """
    from anyflow.stages import STAGES, run_stage, stage_module

    for name in STAGES:  # import every stage (and torch/diffusers/transformers) now, so no stage pays for it
        stage_module(name)
    import diffusers  # noqa: F401
    import transformers  # noqa: F401

    overrides = (
        {
            "teacher.train.steps": 2,
            "flowmap.train.steps": 2,
            "distill.train.steps": 2,
            "evaluate.nfes": "1,2,4",
            "evaluate.reference_steps": 16,
            "evaluate.num_prompts": 2,
        }
        if quick
        else {}
    )
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        saved = os.environ.get(CACHE_ENV)
        os.environ[CACHE_ENV] = os.path.join(tmp, "cache")  # nothing is read from the user's cache
        try:
            store = os.path.join(tmp, "store")

            def stage(name: str, **inputs: str) -> str:
                t0 = time.perf_counter()
                res = run_stage(
                    name, preset="tiny", overrides=overrides, inputs=inputs, store=store, progress=False
                )
                rows.append((name, time.perf_counter() - t0))
                return res.uri

            data = stage("prepare_data")
            teacher = stage("train_teacher", dataset=data)
            flowmap = stage("train_flowmap", dataset=data)
            gen = stage("distill", dataset=data, teacher=teacher, flowmap=flowmap)
            stage("evaluate", generator=gen, teacher=teacher, dataset=data, flowmap=flowmap)
        finally:
            if saved is None:
                os.environ.pop(CACHE_ENV, None)
            else:
                os.environ[CACHE_ENV] = saved
    total = sum(s for _, s in rows)
    print(
        f"\nanyflow run (tiny preset{', quick overrides' if quick else ''}), seconds per stage, fresh store and cache,"
        " imports done beforehand:"
    )
    width = max(len(n) for n, _ in rows)
    for name, sec in rows:
        print(f"  {name.ljust(width)}  {sec:8.2f} s  {100 * sec / total:5.1f} %")
    print(f"  {'total'.ljust(width)}  {total:8.2f} s")
    return rows


# ------------------------------------------------------------------------------------------- MFU


@dataclass(frozen=True)
class Shape:
    dim: int
    heads: int
    layers: int
    ffn: int
    text_dim: int
    text_len: int
    frames: int
    height: int  # latent
    width: int  # latent
    channels: int = 16
    patch: tuple[int, int, int] = (1, 2, 2)

    def tokens(self, frames: int | None = None) -> int:
        f = self.frames if frames is None else frames
        return f * (self.height // self.patch[1]) * (self.width // self.patch[2])


SHAPES = {
    "1.3b": Shape(
        dim=1536, heads=12, layers=30, ffn=8960, text_dim=4096, text_len=512, frames=21, height=60, width=104
    ),
    "small": Shape(
        dim=128, heads=2, layers=2, ffn=256, text_dim=64, text_len=32, frames=3, height=8, width=8
    ),
}


def forward_flops(s: Shape, frames: int | None = None) -> float:
    """Model FLOPs of one forward at batch 1 (formula in the module docstring)."""
    L, T, d, f = s.tokens(frames), s.text_len, s.dim, s.ffn
    cp = s.channels * s.patch[0] * s.patch[1] * s.patch[2]
    block = 8 * L * d * d + 4 * L * L * d + 4 * L * d * d + 4 * T * d * d + 4 * L * T * d + 4 * L * d * f
    return float(s.layers * block + 4 * L * cp * d + 2 * T * (s.text_dim * d + d * d))


def formula_vs_counter(s: Shape) -> tuple[float, float]:
    """(formula's matmul FLOPs, torch FlopCounterMode's count) of one fp32 forward on the CPU.

    The counter sees linear and convolution FLOPs but not the CPU attention kernel, so the formula's
    attention terms (4·L²·d + 4·L·T·d per block) are left out of the comparison; the rest should
    agree to the per-frame time-embedding matmuls the formula omits.
    """
    from torch.utils.flop_counter import FlopCounterMode

    model = _model(s, "cpu", torch.float32)
    g = torch.Generator().manual_seed(0)
    z = torch.randn((1, s.frames, s.channels, s.height, s.width), generator=g)
    tr = torch.full((1, s.frames), 700.0), torch.full((1, s.frames), 300.0)
    c = torch.randn((1, s.text_len, s.text_dim), generator=g)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(hidden_states=z, timestep=tr[0], r_timestep=tr[1], encoder_hidden_states=c, return_dict=False)
    L, T, d = s.tokens(), s.text_len, s.dim
    return forward_flops(s) - s.layers * (4 * L * L * d + 4 * L * T * d), float(counter.get_total_flops())


def _model(s: Shape, device: str, dtype: torch.dtype) -> torch.nn.Module:
    from diffusers import AnyFlowTransformer3DModel

    with torch.device(device):  # random init straight on the device (weights do not change the cost)
        model = AnyFlowTransformer3DModel(
            patch_size=s.patch,
            num_attention_heads=s.heads,
            attention_head_dim=s.dim // s.heads,
            in_channels=s.channels,
            out_channels=s.channels,
            text_dim=s.text_dim,
            freq_dim=256,
            ffn_dim=s.ffn,
            num_layers=s.layers,
            cross_attn_norm=True,
            eps=1e-6,
            rope_max_seq_len=1024,
        )
    model.to(dtype)
    keep = tuple(model._keep_in_fp32_modules or ())  # as from_pretrained(torch_dtype=bf16) leaves them
    for name, p in model.named_parameters():
        if any(k in name.split(".") for k in keep):
            p.data = p.data.float()
    return model


def _time(fn, device: str, repeats: int) -> float:
    fn()  # warm-up (kernels, allocator)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def peak_bf16(device_name: str) -> tuple[str | None, float | None]:
    """The PEAK_BF16 variant and peak FLOP/s for a full ``torch.cuda.get_device_name`` string, read whole:
    "NVIDIA H100 80GB HBM3" is the SXM5 card, "NVIDIA H100 PCIe" and "NVIDIA H100 NVL" are not; "NVIDIA H200"
    is the SXM card, "NVIDIA H200 NVL" is not. ``(None, None)`` for a card (or an H100/H200 variant) not in the
    table: MFU is then printed as n/a rather than over a guessed peak."""
    n = " ".join(device_name.upper().replace("-", " ").split())
    words = set(n.split())
    if "GH200" in n:
        key = "GH200"
    elif "H200" in words:
        key = "H200 NVL" if "NVL" in words else None if "PCIE" in words else "H200 SXM"
    elif "H100" in words:
        if "PCIE" in words:
            key = "H100 PCIe"
        elif "NVL" in words:
            key = "H100 NVL"
        elif "HBM3" in words or any(w.startswith("SXM") for w in words):
            key = "H100 SXM"
        else:
            key = None
    elif "A100" in words:
        key = "A100"
    else:
        key = None
    return key, (PEAK_BF16[key] if key else None)


def _peak(device: str) -> tuple[str, float | None]:
    """(description of the device and the peak used, peak FLOP/s or None)."""
    if not device.startswith("cuda"):
        return "cpu", None
    name = torch.cuda.get_device_name(torch.device(device))
    key, peak = peak_bf16(name)
    if peak is None:
        return f"{name} (no peak in the table: MFU not computed)", None
    return f"{name} (peak used: {key}, {peak / 1e12:.1f} TFLOP/s bf16 dense)", peak


def _measure(
    model: torch.nn.Module, s: Shape, frames: int, device: str, backward: bool, repeats: int
) -> dict:
    """Best-of-``repeats`` seconds of one forward (no grad) or forward+backward (all weights trainable)."""
    dtype = model.proj_out.weight.dtype
    g = torch.Generator(device="cpu").manual_seed(0)
    z = torch.randn((1, frames, s.channels, s.height, s.width), generator=g).to(device, dtype)
    t = torch.full((1, frames), 700.0, device=device)
    r = torch.full((1, frames), 300.0, device=device)
    c = torch.randn((1, s.text_len, s.text_dim), generator=g).to(device, dtype)
    model.requires_grad_(backward)

    def step() -> None:
        with torch.set_grad_enabled(backward):
            out = model(
                hidden_states=z, timestep=t, r_timestep=r, encoder_hidden_states=c, return_dict=False
            )[0]
            if backward:
                out.float().square().mean().backward()
        for p in model.parameters():
            p.grad = None

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    sec = _time(step, device, repeats)
    mem = torch.cuda.max_memory_allocated(device) / 2**30 if device.startswith("cuda") else float("nan")
    return {"frames": frames, "tokens": s.tokens(frames), "seconds": sec, "mem_gib": mem}


def _largest_fit(
    model: torch.nn.Module, s: Shape, candidates: list[int], device: str, backward: bool, repeats: int
) -> dict | None:
    """Measure at the first frame count in ``candidates`` that fits in memory."""
    for f in candidates:
        res = None
        try:
            res = _measure(model, s, f, device, backward, repeats)
        except torch.OutOfMemoryError:
            print(
                f"MFU: {'forward+backward' if backward else 'forward'} at {f} latent frames ({s.tokens(f)} tokens)"
                " does not fit; trying fewer frames"
            )
        gc.collect()  # drop the failed attempt's activations before the next one
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
        if res is not None:
            return res
    return None


def mfu_bench(
    device: str, *, shape: str = "1.3b", frames: int | None = None, repeats: int = 3, grad_ckpt: bool = False
) -> list[dict]:
    """Forward and forward+backward seconds, tokens/s and MFU in bf16 at batch 1.

    Each pass runs at 21 latent frames (32,760 tokens) if it fits, else at the largest of 17, 13, 9, 5,
    1 that does (or at ``frames``). ``grad_ckpt`` recomputes each block in backward (model FLOPs are
    still counted as 3× forward, so MFU then understates the hardware's work by 4/3).
    """
    if shape not in SHAPES:
        raise SystemExit(f"--mfu-shape {shape!r}: choose from {list(SHAPES)}")
    s = SHAPES[shape]
    gpu, peak = _peak(device)
    if not device.startswith("cuda"):
        ours, counted = formula_vs_counter(s)
        print(
            f"\nFLOP formula check ({shape} shape, fp32 CPU): matmul terms {ours:.4g}, torch FlopCounterMode "
            f"{counted:.4g} (ratio {counted / ours:.4f}; the excess is the per-frame time embedding)"
        )
    model = _model(s, device, torch.bfloat16)
    if grad_ckpt:
        model.enable_gradient_checkpointing()
    n_params = sum(p.numel() for p in model.parameters())
    candidates = [frames] if frames else [s.frames, *(f for f in (17, 13, 9, 5, 1) if f < s.frames)]
    results = []
    for name, backward, mult in (("forward", False, 1), ("forward+backward", True, 3)):
        res = _largest_fit(model, s, candidates, device, backward, repeats)
        if res is None:
            print(f"MFU: {name} does not fit at any frame count; not measured")
            continue
        flops = mult * forward_flops(s, res["frames"])
        results.append({"pass": name, **res, "flops": flops, "tflops": flops / res["seconds"] / 1e12})
    print(
        f"\ntransformer throughput, {shape} shape ({n_params / 1e9:.3f}B params), bf16, batch 1, {gpu}"
        f"{', gradient checkpointing' if grad_ckpt else ''}; text {s.text_len}x{s.text_dim}, latent HxW "
        f"{s.height}x{s.width}; model FLOPs = formula in benchmarks/sampling_extras.py (fwd+bwd = 3x fwd)"
    )
    header = (
        "pass",
        "latent F",
        "tokens",
        "TFLOP/step",
        "seconds",
        "tokens/s",
        "TFLOP/s",
        "MFU",
        "peak mem GiB",
    )
    rows = [header]
    for r in results:
        mfu = f"{100 * r['tflops'] * 1e12 / peak:.1f} %" if peak else f"n/a (no peak for {gpu})"
        rows.append(
            (
                r["pass"],
                str(r["frames"]),
                str(r["tokens"]),
                f"{r['flops'] / 1e12:.4g}",
                f"{r['seconds']:.4f}",
                f"{r['tokens'] / r['seconds']:,.0f}",
                f"{r['tflops']:.4g}",
                mfu,
                f"{r['mem_gib']:.1f}",
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  " + "  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))
    return results
