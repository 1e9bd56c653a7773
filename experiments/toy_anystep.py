"""The any-step claim at small scale (issue 7; docs/method.md §15 A–E, §6, §7), on CPU.

teacher (rectified flow, label dropout) → AnyFlow forward flow-map stage (§6) → AnyFlow on-policy stage
(FMBS + DMD + co-trained forward loss, §7), and a consistency-distillation baseline with the same number
of student gradient steps; evaluated at N ∈ {1, 2, 4, 8, 16, 32}. See experiments/README.md.

    OMP_NUM_THREADS=2 .venv/bin/python experiments/toy_anystep.py --out experiments/results
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from toy_models import (
    RingMixture,
    ToyFlowMapMLP,
    as_fn,
    cfg_fn,
    consistency_endpoint,
    ema_update,
    to_flowmap,
)
from toy_report import evaluate_seed, write_outputs

from anyflow.dmd import critic_loss, dmd_generator_loss
from anyflow.flowmap import FlowMapLossConfig, flow_matching_loss, forward_flowmap_loss
from anyflow.rollout import fmbs_rollout, sample_rollout_plan
from anyflow.timesteps import noise_like, shift_sigma


@dataclass(frozen=True)
class ExpConfig:
    """All knobs of the experiment; saved with the results."""

    seeds: tuple[int, ...] = (0, 1, 2)
    # 2-D toy: no resolution-driven SNR shift is needed (docs/method.md §15 A allows shift 1)
    shift: float = 1.0
    batch: int = 256
    width: int = 128
    depth: int = 2
    teacher_steps: int = 3000
    teacher_lr: float = 1e-3
    flowmap_steps: int = 4000  # stage 1 (§6)
    flowmap_lr: float = 3e-4
    onpolicy_steps: int = 1500  # stage 2 (§7), generator updates (+ as many critic updates)
    onpolicy_lr: float = 1e-4
    onpolicy_ema: float = 0.99  # §7.6
    onpolicy_ema_warmup: int = 100  # plain copy before this step (§7.6: 200 of 1200)
    rollout_steps: tuple[int, ...] = (2, 4, 8, 16, 50)  # §7.2
    guidance: float = 3.0  # §6.2 fused CFG scale; the reference teacher uses the same standard CFG 3
    cfg_target: str = "released"  # §6.2 released fused-CFG target, or "meanflow" (§6.8)
    fd_epsilon: float = 5.0  # §6.3 central-difference step (τ units) of the forward loss
    dmd_real_scale: float = 2.0  # §7.3 convention cond + w(cond − uncond): w = 2 is standard CFG 3
    cd_lr: float = 3e-4
    cd_intervals: int = 32  # discrete CD grid
    cd_target_ema: float = 0.99
    eval_ema: float = 0.999  # EMA of teacher, stage 1 and CD weights used for evaluation
    n_eval: int = 1024  # coupled-error / sample-set size (balanced classes)
    n_heldout: int = 4096
    ref_steps: int = 1000  # teacher CFG Euler steps for the coupled reference
    nfe: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    fmbs_batch: int = 512
    fmbs_k_per_n: int = 6

    @property
    def cd_steps(self) -> int:
        """Same student gradient-step budget as AnyFlow's stage 1 + stage 2."""
        return self.flowmap_steps + self.onpolicy_steps


def _log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _step(opt: torch.optim.Optimizer, model: nn.Module, loss: torch.Tensor) -> None:
    opt.zero_grad(set_to_none=True)
    loss.backward()
    nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()


def train_teacher(data: RingMixture, cfg: ExpConfig, gen: torch.Generator, seed: int) -> ToyFlowMapMLP:
    """Stage 0 (§4): flow matching, logit-normal σ then shift, 10% label dropout to the null class."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # module init uses the global RNG; scope it to this seed
        model = ToyFlowMapMLP(cond_dim=data.cond_dim, width=cfg.width, depth=cfg.depth)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.teacher_lr, betas=(0.9, 0.95), weight_decay=0.0)
    c_neg = data.negative()
    for step in range(cfg.teacher_steps):
        x, c, _ = data.batch(cfg.batch, gen)
        loss, _ = flow_matching_loss(as_fn(model), x, c, gen, shift=cfg.shift, c_neg=c_neg, text_dropout=0.1)
        _step(opt, model, loss)
        ema_update(ema, model, cfg.eval_ema if step >= 100 else 0.0)
        if step % 1000 == 0:
            _log(f"  teacher step {step} loss {loss.item():.4f}")
    return ema


def make_student(teacher: ToyFlowMapMLP, data: RingMixture, gen: torch.Generator) -> ToyFlowMapMLP:
    """Two-time student (§2.2); asserts that at r = t it reproduces the teacher bit-for-bit."""
    student = to_flowmap(teacher, 0.25).requires_grad_(True)
    x, c, _ = data.batch(64, gen)
    tau = torch.rand(64, 1, generator=gen) * 1000
    with torch.no_grad():
        same = torch.equal(as_fn(student)(x, tau, tau, c), as_fn(teacher)(x, tau, tau, c))
    assert same, "two-time student does not equal the teacher at r = t"
    return student


def loss_config(cfg: ExpConfig) -> FlowMapLossConfig:
    # §6: pair mix 0.5/0.25/0.25, ε = 5 τ-units, beta08, adaptive scaling, fused CFG, 10% text dropout
    return FlowMapLossConfig(
        guidance_scale=cfg.guidance, shift=cfg.shift, cfg_target=cfg.cfg_target, fd_epsilon=cfg.fd_epsilon
    )


def train_flowmap(
    teacher: ToyFlowMapMLP, data: RingMixture, cfg: ExpConfig, gen: torch.Generator
) -> ToyFlowMapMLP:
    """Stage 1 (§6.7): forward flow-map loss on data; returns the EMA student."""
    student = make_student(teacher, data, gen)
    ema = copy.deepcopy(student).requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.flowmap_lr, betas=(0.9, 0.95), weight_decay=0.0)
    lcfg, c_neg = loss_config(cfg), data.negative()
    for step in range(cfg.flowmap_steps):
        x, c, _ = data.batch(cfg.batch, gen)
        loss, _ = forward_flowmap_loss(as_fn(student), x, c, c_neg, gen, lcfg)
        _step(opt, student, loss)
        ema_update(ema, student, cfg.eval_ema if step >= 100 else 0.0)
        if step % 1000 == 0:
            _log(f"  flowmap step {step} loss {loss.item():.4f}")
    return ema


def train_onpolicy(
    flowmap: ToyFlowMapMLP, teacher: ToyFlowMapMLP, data: RingMixture, cfg: ExpConfig, gen: torch.Generator
) -> ToyFlowMapMLP:
    """Stage 2 (§7.7): FMBS rollout → DMD (teacher CFG real score, FM critic) + co-trained forward loss; 1:1."""
    gen_model = copy.deepcopy(flowmap).requires_grad_(True)
    ema = copy.deepcopy(flowmap).requires_grad_(False)
    critic = copy.deepcopy(teacher).requires_grad_(True)  # fake score starts from the teacher (§7.1)
    real_v, fake_v, g_fn = as_fn(teacher), as_fn(critic), as_fn(gen_model)
    opt_g = torch.optim.AdamW(
        gen_model.parameters(), lr=cfg.onpolicy_lr, betas=(0.0, 0.999), weight_decay=0.0
    )
    opt_c = torch.optim.AdamW(critic.parameters(), lr=cfg.onpolicy_lr, betas=(0.0, 0.999), weight_decay=0.0)
    lcfg, c_neg = loss_config(cfg), data.negative()
    for step in range(cfg.onpolicy_steps):
        # generator update
        x, c, _ = data.batch(cfg.batch, gen)
        n, k = sample_rollout_plan(gen, cfg.rollout_steps)
        x_hat, _ = fmbs_rollout(g_fn, noise_like(x, gen), c, n, k, shift=cfg.shift)
        l_dmd, _ = dmd_generator_loss(
            x_hat, real_v, fake_v, c, c_neg, gen, real_guidance_scale=cfg.dmd_real_scale, shift=cfg.shift
        )
        l_fwd, _ = forward_flowmap_loss(g_fn, x, c, c_neg, gen, lcfg)
        _step(opt_g, gen_model, l_dmd + l_fwd)  # the DMD gradient never reaches the critic (no_grad inside)
        ema_update(ema, gen_model, cfg.onpolicy_ema if step >= cfg.onpolicy_ema_warmup else 0.0)
        # critic (fake score) update on a fresh batch's conditions and a fresh rollout
        _, c2, _ = data.batch(cfg.batch, gen)
        n2, k2 = sample_rollout_plan(gen, cfg.rollout_steps)
        with torch.no_grad():
            x_hat2, _ = fmbs_rollout(g_fn, noise_like(x, gen), c2, n2, k2, shift=cfg.shift)
        l_c, _ = critic_loss(fake_v, x_hat2, c2, gen, shift=cfg.shift)
        _step(opt_c, critic, l_c)
        if step % 200 == 0:
            _log(
                f"  onpolicy step {step} N={n} k={k} dmd {l_dmd.item():.2e} fwd {l_fwd.item():.4f} critic {l_c.item():.4f}"
            )
    return ema


def train_consistency(
    teacher: ToyFlowMapMLP,
    data: RingMixture,
    cfg: ExpConfig,
    gen: torch.Generator,
    on_step: Callable[[int, ToyFlowMapMLP, float], None] | None = None,
) -> ToyFlowMapMLP:
    """Baseline: discrete consistency distillation (endpoint map f = z − σ·u(z, σ, 0), Euler CFG teacher step,
    EMA target network), initialised from the same two-time student; cfg.cd_steps gradient steps.
    ``on_step(step, ema, loss)`` is called after every update (fair_anystep.py's curves)."""
    student = make_student(teacher, data, gen)
    target = copy.deepcopy(student).requires_grad_(False)
    ema = copy.deepcopy(student).requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.cd_lr, betas=(0.9, 0.95), weight_decay=0.0)
    teacher_cfg = cfg_fn(as_fn(teacher), data.negative(), cfg.guidance)
    grid = shift_sigma(
        torch.linspace(0.0, 1.0, cfg.cd_intervals + 1), cfg.shift
    ).float()  # σ_0 = 0 < … < σ_M = 1
    s_fn, t_fn = as_fn(student), as_fn(target)
    for step in range(cfg.cd_steps):
        x, c, _ = data.batch(cfg.batch, gen)
        idx = torch.randint(1, cfg.cd_intervals + 1, (cfg.batch,), generator=gen)
        s_hi, s_lo = grid[idx], grid[idx - 1]
        eps = noise_like(x, gen)
        b = s_hi.reshape(-1, 1, 1, 1, 1)
        z_hi = b * eps + (1 - b) * x
        with torch.no_grad():
            v = teacher_cfg(z_hi, s_hi[:, None] * 1000, s_hi[:, None] * 1000, c)
            z_lo = z_hi - (s_hi - s_lo).reshape(-1, 1, 1, 1, 1) * v
            f_tgt = consistency_endpoint(t_fn, z_lo, s_lo, c)
        f_on = consistency_endpoint(s_fn, z_hi, s_hi, c)
        loss = ((f_on - f_tgt) ** 2).mean()
        _step(opt, student, loss)
        ema_update(target, student, cfg.cd_target_ema)
        ema_update(ema, student, cfg.eval_ema if step >= 100 else 0.0)
        if on_step is not None:
            on_step(step, ema, loss.item())
        if step % 1000 == 0:
            _log(f"  consistency step {step} loss {loss.item():.2e}")
    return ema


def run_seed(seed: int, cfg: ExpConfig) -> dict:
    data = RingMixture()
    gen = torch.Generator().manual_seed(seed)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    teacher = train_teacher(data, cfg, gen, seed)
    timings["teacher"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    init_student = make_student(teacher, data, gen).requires_grad_(False)
    flowmap = train_flowmap(teacher, data, cfg, gen)
    timings["flowmap"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    anyflow = train_onpolicy(flowmap, teacher, data, cfg, gen)
    timings["onpolicy"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    cd = train_consistency(teacher, data, cfg, gen)
    timings["consistency"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    models = {"init": init_student, "flowmap": flowmap, "anyflow": anyflow, "consistency": cd}
    result = evaluate_seed(seed, teacher, models, data, cfg)
    timings["eval"] = time.perf_counter() - t0
    result["timings_s"] = timings
    _log(f"seed {seed} done: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
    return result


def parse_args(argv: Sequence[str] | None) -> tuple[ExpConfig, Path, int]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="experiments/results", help="folder for results.json/.md and the plot")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    defaults = ExpConfig()
    for f in dataclasses.fields(ExpConfig):
        val = getattr(defaults, f.name)
        flag = "--" + f.name.replace("_", "-")
        if isinstance(val, tuple):
            p.add_argument(flag, type=int, nargs="+", default=list(val), help=f"default {list(val)}")
        else:
            p.add_argument(flag, type=type(val), default=val, help=f"default {val}")
    args = p.parse_args(argv)
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(ExpConfig)}
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}
    return ExpConfig(**kw), Path(args.out), args.threads


def main(argv: Sequence[str] | None = None) -> int:
    cfg, out, threads = parse_args(argv)
    # These matmuls are tiny: one thread is faster than two on a shared machine (no sync stalls).
    torch.set_num_threads(threads)
    _log(f"config: {cfg}")
    start = time.perf_counter()
    per_seed = [run_seed(s, cfg) for s in cfg.seeds]
    wall = time.perf_counter() - start
    paths = write_outputs(per_seed, cfg, out, wall_s=wall, command=" ".join(sys.argv))
    _log(f"wrote {', '.join(str(p) for p in paths)} (total {wall:.0f}s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
