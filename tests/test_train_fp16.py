"""fp16 mixed precision: the loss scale must be divided out before clipping and stepping.

With ``train.mixed_precision="fp16"`` on CUDA, accelerate's ``Accelerator.backward`` multiplies the loss by
its ``GradScaler``'s scale (2^16 at the start). anyflow's optimisers are plain torch optimisers, not
accelerate-wrapped, so before this fix nothing unscaled the gradients: the clip threshold was applied to
gradients 65536x too large (every step clipped), the logged gradient norm was 65536x too large, and the
first fp16 overflow (which a GradScaler expects and handles by skipping the step) was reported as
divergence. There is no GPU here, so the tests hand the real ``accelerate.Accelerator`` (CPU) the scaler it
creates on CUDA (a real ``torch.amp.GradScaler``, CPU flavour) and run the project's
``TrainContext.backward``/``clip_and_step`` against a plain fp32 step written out by hand.
"""

from __future__ import annotations

import torch
from accelerate import Accelerator

from anyflow.config import TrainConfig
from anyflow.train.loop import TrainContext


def _ctx(param: torch.nn.Parameter, scaler: torch.amp.GradScaler | None, clip: float) -> TrainContext:
    acc = Accelerator(cpu=True)
    acc.scaler = scaler  # what Accelerator(mixed_precision="fp16") sets on a CUDA device
    opt = torch.optim.SGD([param], lr=0.1)
    return TrainContext(accelerator=acc, cfg=TrainConfig(), batches=iter(()), generator=torch.Generator(),
                        optimizers={"g": opt}, params={"g": {"w": param}}, clip={"g": clip})


def _loss(w: torch.Tensor) -> torch.Tensor:
    target = torch.tensor([3.0, -4.0, 0.5])
    return ((w - target) ** 2).sum()


def test_scaled_backward_steps_like_the_plain_fp32_step() -> None:
    clip = 2.0
    # the independent reference: fp32 backward, clip, SGD step, written out by hand
    ref = torch.zeros(3, requires_grad=True)
    _loss(ref).backward()
    ref_norm = float(ref.grad.norm())
    with torch.no_grad():
        expected = ref - 0.1 * ref.grad * min(1.0, clip / (ref_norm + 1e-6))

    w = torch.nn.Parameter(torch.zeros(3))
    ctx = _ctx(w, torch.amp.GradScaler("cpu", init_scale=2.0**16), clip)
    ctx.backward(_loss(w))
    assert float(w.grad.norm()) > 1000 * ref_norm  # the loss really was scaled by accelerate's backward
    norm = ctx.clip_and_step("g")
    assert abs(norm - ref_norm) < 1e-4 * ref_norm  # reported in true units, not x65536
    torch.testing.assert_close(w.detach(), expected.detach(), rtol=1e-6, atol=1e-6)
    assert ctx.last_grad_norm["g"] == norm


def test_an_overflow_skips_the_step_and_lowers_the_scale_instead_of_diverging() -> None:
    w = torch.nn.Parameter(torch.zeros(3))
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    ctx = _ctx(w, scaler, 1.0)
    ctx.backward(_loss(w) * float("inf"))  # an fp16 overflow: inf gradients
    norm = ctx.clip_and_step("g")  # no TrainingDiverged: the scaler handles it
    assert not torch.isfinite(torch.tensor(norm))
    assert torch.equal(w.detach(), torch.zeros(3))  # step skipped
    assert scaler.get_scale() == 2.0**15  # backoff 0.5
    assert w.grad is None  # gradients cleared for the next step
    # the next, finite step goes through at the lowered scale
    ctx.backward(_loss(w))
    assert torch.isfinite(torch.tensor(ctx.clip_and_step("g")))
    assert not torch.equal(w.detach(), torch.zeros(3))
