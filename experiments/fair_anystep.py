"""A fairer any-step comparison on the toy ring (issue 17 items 1 and 3; docs/method.md §6.2, §6.8, §7).

Against the **exact** ODE of the data (closed-form mixture velocities, ``anyflow.analytic``, RK4 in float64),
two arms from one teacher per seed:

* unguided: an AnyFlow stage 1 with g = 1 (no fusion) and consistency distillation (CD) without guidance,
  both against the exact conditional (CFG-1) ODE;
* guided (CFG 3): stage 1 with the released fused target and with the MeanFlow-style target
  (``cfg_target``), stage 2 (FMBS + DMD + co-trained forward loss) on top of each, CD distilled from the
  CFG-3 teacher, and the released objective's analytic floor (``cfg_floor.py``) beside them.

CD's step count is set so that its **network calls** equal AnyFlow's (stage 1: 4 calls a step with fusion,
3 at g = 1; stage 2 ≈ 14; CD 4 with CFG, 3 without). Every method is scored at every N by the coupled error
(mean L2 to the exact ODE endpoint from the same noise) and by a held-out distance to data (class-wise energy
distance to fresh ring samples, no coupling: the right measure for CD's re-noising multistep sampler). The
teacher's own error against the exact ODE is reported. The training code is toy_anystep.py's.

Hyper-parameters are chosen on seed 0 (the exact ODE is not even computed there) and passed to the report run
by ``--selection`` (several files, applied in order): ``--select`` (constant learning rates of stage 1 and CD;
CD by the held-out distance to data at N = 1), ``--select-stage1`` (stage 1's schedule and peak rate by a
held-out loss), ``--select-stage2`` (stage 2's lr, EMA, ε_fd and DMD scale, one factor at a time, by the
distance to the teacher's CFG-3 samples). The full sequence of commands is in experiments/README.md:

    OMP_NUM_THREADS=1 .venv/bin/python experiments/fair_anystep.py --select --seeds 0 --flowmap-steps 1500 \
        --out experiments/results_fair/select
    OMP_NUM_THREADS=1 .venv/bin/python experiments/fair_anystep.py --seeds 1 2 3 \
        --selection experiments/results_fair/select/selection.json --out experiments/results_fair
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import toy_anystep as toy
from cfg_floor import cfg_velocity, ring
from toy_models import (
    RingMixture,
    as_fn,
    cfg_fn,
    classwise_energy_distance,
    consistency_sample,
    ema_update,
    from_latent,
)

from anyflow.analytic import integrate_ode
from anyflow.flowmap import forward_flowmap_loss
from anyflow.rollout import flowmap_euler_sample

CALLS = {"stage1_g": 4, "stage1_1": 3, "stage2": 14, "cd_g": 4, "cd_1": 3}  # network calls per step
STAGE1 = {"g1": "stage 1, g = 1", "released": "stage 1, released", "meanflow": "stage 1, meanflow"}
LR_FIELDS = ("lr_g1", "lr_released", "lr_meanflow", "cd_lr_1", "cd_lr_3")
SCHEDULES = ("constant", "cosine")
TARGETS = ("released", "meanflow")
S2_FIELDS = ("lr", "ema", "fd", "dmd")  # stage-2 settings, one field per target: s2_<name>_<target>
S2_DEFAULTS = {"lr": 1e-4, "ema": 0.99, "fd": 5.0, "dmd": 2.0}
CD_ROWS = {"CD, unguided teacher": "CD, unguided", "CD, CFG-3 teacher": "CD, CFG 3"}  # row → curve
CD_CONFIG = ("teacher_steps", "flowmap_steps", "onpolicy_steps", "cd_lr_1", "cd_lr_3", "width", "batch")
CD_CONFIG += ("n_eval", "n_heldout", "ref_steps", "nfe")
PATHS: dict = {
    "cache": None,
    "stage1_models": None,
    "reuse_cd": {},
}  # main's --cache / --stage1-models / --reuse-cd
FLAT_REL = 0.05  # convergence criterion: N = 1 curve changes < 5 % (relative) over the last 25 % of steps


@dataclasses.dataclass(frozen=True)
class FairConfig:
    seeds: tuple[int, ...] = (1,)
    teacher_steps: int = 3000
    flowmap_steps: int = 2000  # the report run (experiments/README.md)
    onpolicy_steps: int = 600
    curve_every: int = 500  # N = 1 errors of the stage-1 and CD EMAs every so many steps (reported, not used)
    n_eval: int = 1024
    n_heldout: int = 4096  # fresh data points for the energy distance (a new draw per seed)
    ref_steps: int = 400  # RK4 steps of the exact ODE, σ 1 → 0
    nfe: tuple[int, ...] = (1, 2, 4, 8, 32)
    width: int = 128
    batch: int = 256
    lr_g1: float = 3e-4  # stage-1 AdamW learning rates per arm (toy_anystep's default 3e-4)
    lr_released: float = 3e-4
    lr_meanflow: float = 3e-4
    cd_lr_1: float = 3e-4  # CD learning rates, unguided and CFG-3 teacher
    cd_lr_3: float = 3e-4
    onpolicy_lr: float = 1e-4  # unused: stage 2's settings are the s2_* fields below
    grid_lrs: tuple[float, ...] = (3e-4, 1e-3, 3e-3)  # --select: learning rates tried for every arm
    # stage-1 learning-rate schedule per arm: constant, or cosine from lr_<arm> to 0 at the last step
    sched_g1: str = "constant"
    sched_released: str = "constant"
    sched_meanflow: str = "constant"
    # --select-stage1: (schedule, lr) pairs tried for every stage-1 arm, "schedule@lr"
    grid_stage1: tuple[str, ...] = ("constant@0.0003", "cosine@0.001", "cosine@0.003")
    # stage 2 (FMBS + DMD + forward loss) per stage-1 target: AdamW lr of generator and critic, EMA of the
    # evaluated generator, ε_fd (τ units) of the co-trained forward loss, DMD real-score scale w (CFG 1 + w)
    s2_lr_released: float = 1e-4
    s2_lr_meanflow: float = 1e-4
    s2_ema_released: float = 0.99
    s2_ema_meanflow: float = 0.99
    s2_fd_released: float = 5.0
    s2_fd_meanflow: float = 5.0
    s2_dmd_released: float = 2.0
    s2_dmd_meanflow: float = 2.0
    # --select-stage2: values tried one factor at a time around S2_DEFAULTS, "name@value"
    grid_stage2: tuple[str, ...] = (
        "lr@3e-05",
        "lr@0.0003",
        "ema@0.9",
        "ema@0.999",
        "fd@2.5",
        "fd@10",
        "dmd@1",
        "dmd@3",
    )
    select_arms: tuple[str, ...] = ("g1", "released", "meanflow")  # the arms a --select-stage* run searches
    heldout_loss_n: int = 4096  # held-out batch of the stage-1 selection loss
    arms: tuple[str, ...] = ("unguided", "guided")  # the report's arms (a budget check may run one)

    def toy(self, **kw) -> toy.ExpConfig:
        return toy.ExpConfig(
            teacher_steps=self.teacher_steps,
            flowmap_steps=self.flowmap_steps,
            onpolicy_steps=self.onpolicy_steps,
            onpolicy_lr=self.onpolicy_lr,
            width=self.width,
            batch=self.batch,
            **kw,
        )

    def stage2(self, cfg3: toy.ExpConfig, target: str, **over) -> toy.ExpConfig:
        """The stage-2 config of a stage-1 target: its s2_* settings (or ``over``: name → value)."""
        v = {k: over.get(k, getattr(self, f"s2_{k}_{target}")) for k in S2_FIELDS}
        return dataclasses.replace(
            cfg3, onpolicy_lr=v["lr"], onpolicy_ema=v["ema"], fd_epsilon=v["fd"], dmd_real_scale=v["dmd"]
        )


def _pair(item: str) -> tuple[str, float]:
    name, value = item.split("@")
    return name, float(value)


def flatness(curve: list, col: int) -> float:
    """Relative drop of column ``col`` of an N = 1 curve over the last 25 % of steps, (v(¾S) − v(S)) / v(¾S),
    v(¾S) read at the last curve point at or before ¾ of the steps. Below FLAT_REL counts as converged."""
    last = curve[-1][0]
    ref = max((p for p in curve if p[0] <= 0.75 * last), key=lambda p: p[0], default=curve[0])
    return (ref[col] - curve[-1][col]) / ref[col]


def exact_reference(z: torch.Tensor, labels: torch.Tensor, g: float, steps: int) -> torch.Tensor:
    """Endpoints of the exact CFG-g ODE of the ring from noise z (B, 1, 2, 1, 1), per class, float64 RK4."""
    pts = from_latent(z).double()
    out = torch.empty_like(pts)
    for k in labels.unique().tolist():
        m = labels == k
        cond, uncond = ring(int(k))
        out[m] = integrate_ode(cfg_velocity(cond, uncond, g), pts[m], 1.0, 0.0, steps)
    return out


def coupled(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((from_latent(x).double() - ref).norm(dim=1).mean())


class Setup:
    """One seed's teacher, evaluation noise and held-out data (everything but the exact reference)."""

    def __init__(self, seed: int, fc: FairConfig):
        self.seed, self.fc, self.data = seed, fc, RingMixture()
        self.gen = torch.Generator().manual_seed(seed)
        self.base = fc.toy()
        cache = PATHS["cache"]
        key = f"teacher_seed{seed}_steps{fc.teacher_steps}_w{fc.width}_b{fc.batch}.pt"
        if cache and (Path(cache) / key).is_file():  # the same deterministic run, saved by an earlier process
            saved = torch.load(Path(cache) / key)
            self.teacher = toy.ToyFlowMapMLP(
                cond_dim=self.data.cond_dim, width=fc.width, depth=self.base.depth
            )
            self.teacher.load_state_dict(saved["state"])
            self.teacher.requires_grad_(False)
            self.gen.set_state(saved["gen"])
        else:
            self.teacher = toy.train_teacher(self.data, self.base, self.gen, seed)
            if cache:
                Path(cache).mkdir(parents=True, exist_ok=True)
                torch.save(
                    {"state": self.teacher.state_dict(), "gen": self.gen.get_state()}, Path(cache) / key
                )
        eg = torch.Generator().manual_seed(10_000 + seed)
        self.labels = self.data.balanced_labels(fc.n_eval)
        self.c = self.data.embed(self.labels)
        self.z = torch.randn(fc.n_eval, 1, 2, 1, 1, generator=eg)
        hg = torch.Generator().manual_seed(30_000 + seed)  # held-out data: never seen in training
        self.held_labels = self.data.balanced_labels(fc.n_heldout)
        self.held = self.data.sample(self.held_labels, hg)
        self.fresh = self.data.sample(self.labels, hg)  # a second fresh set: the data-vs-data noise floor
        self.c_neg = self.data.negative()

    def dist(self, x: torch.Tensor) -> float:
        """Class-wise energy distance of samples x (latents or (B, 2) points) to the held-out data."""
        pts = from_latent(x) if x.dim() == 5 else x
        return classwise_energy_distance(pts.float(), self.labels, self.held, self.held_labels, self.data.K)

    def fm_sampler(self, model) -> Callable[[int], torch.Tensor]:
        return lambda n: flowmap_euler_sample(as_fn(model), self.z, self.c, n, shift=1.0)

    def cd_sampler(self, model) -> Callable[[int], torch.Tensor]:
        return lambda n: consistency_sample(
            as_fn(model), self.z, self.c, n, torch.Generator().manual_seed(20_000 + self.seed), shift=1.0
        )

    def heldout_loss(self, model, cfg: toy.ExpConfig) -> float:
        """Stage 1's regression on a held-out batch (fresh data; noise, times and label dropout from one
        fixed generator, so every model of a seed sees the same draws), averaged over all pair types
        *before* adaptive scaling: the training loss after §6.5's scaling is ≈ the diagonal (r = t) pairs'
        loss alone, blind to the off-diagonal map that N = 1 uses."""
        hg = torch.Generator().manual_seed(40_000 + self.seed)
        x, c, _ = self.data.batch(self.fc.heldout_loss_n, hg)
        with torch.no_grad():
            _, diag = forward_flowmap_loss(as_fn(model), x, c, self.c_neg, hg, toy.loss_config(cfg))
        return float(diag["per_sample"].mean())

    def train_stage1(
        self, cfg: toy.ExpConfig, curve: Callable, schedule: str = "constant"
    ) -> tuple[torch.nn.Module, list, float]:
        """toy_anystep.train_flowmap with a curve of the N = 1 errors and the final training loss;
        ``schedule`` "cosine" decays the learning rate from cfg.flowmap_lr to 0 at the last step."""
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown stage-1 schedule {schedule!r}; valid: {', '.join(SCHEDULES)}")
        student = toy.make_student(self.teacher, self.data, self.gen)
        ema = copy.deepcopy(student).requires_grad_(False)
        opt = torch.optim.AdamW(student.parameters(), lr=cfg.flowmap_lr, betas=(0.9, 0.95), weight_decay=0.0)
        steps = cfg.flowmap_steps
        lcfg = toy.loss_config(cfg)
        points, losses = [], []
        for step in range(steps):
            if schedule == "cosine":
                for group in opt.param_groups:
                    group["lr"] = cfg.flowmap_lr * 0.5 * (1.0 + math.cos(math.pi * step / steps))
            x, c, _ = self.data.batch(cfg.batch, self.gen)
            loss, _ = forward_flowmap_loss(as_fn(student), x, c, self.c_neg, self.gen, lcfg)
            toy._step(opt, student, loss)
            ema_update(ema, student, cfg.eval_ema if step >= 100 else 0.0)
            losses.append(loss.item())
            if (step + 1) % self.fc.curve_every == 0 or step == 0:
                points.append([step + 1, *curve(ema, self.fm_sampler(ema)), self.heldout_loss(ema, cfg)])
        return ema, points, _tail_mean(losses)

    def train_cd(
        self, cfg: toy.ExpConfig, steps: int, curve: Callable
    ) -> tuple[torch.nn.Module, list, float]:
        points, losses = [], []

        def on_step(step: int, ema, loss: float) -> None:
            losses.append(loss)
            if (step + 1) % self.fc.curve_every == 0 or step == 0:
                points.append([step + 1, *curve(ema, self.cd_sampler(ema))])

        cfg = dataclasses.replace(cfg, flowmap_steps=steps, onpolicy_steps=0)
        model = toy.train_consistency(self.teacher, self.data, cfg, self.gen, on_step=on_step)
        return model, points, _tail_mean(losses)


def _tail_mean(losses: list[float]) -> float:
    tail = losses[-max(1, len(losses) // 10) :]
    return sum(tail) / len(tail)


def select(seed: int, fc: FairConfig) -> dict:
    """Seed-0 learning-rate search. Stage 1: lowest final training loss (mean of the last 10 % of steps; the
    loss is the same regression for every lr of one arm). CD: lowest held-out energy distance to data at N = 1
    (its loss chases a moving target network, so it does not compare across lrs). The exact ODE is not used."""
    t0 = time.perf_counter()
    s = Setup(seed, fc)

    def curve(model, sampler):
        return [None, s.dist(sampler(1))]

    grid: dict = {}
    arms = {"lr_g1": ("g1", 1.0), "lr_released": ("released", 3.0), "lr_meanflow": ("meanflow", 3.0)}
    for field, (target, g) in arms.items():
        for lr in fc.grid_lrs:
            cfg = dataclasses.replace(s.base, guidance=g, cfg_target="released" if g == 1.0 else target)
            cfg = dataclasses.replace(cfg, flowmap_lr=lr)
            m, pts, loss = s.train_stage1(cfg, curve)
            samp = s.fm_sampler(m)
            grid.setdefault(field, []).append(
                {
                    "lr": lr,
                    "train_loss": loss,
                    "dist": {str(n): s.dist(samp(n)) for n in fc.nfe},
                    "curve": pts,
                }
            )
            toy._log(f"select {field} lr {lr:g}: loss {loss:.4f}")
    for field, g in (("cd_lr_1", 1.0), ("cd_lr_3", 3.0)):
        for lr in fc.grid_lrs:
            cfg = dataclasses.replace(s.base, guidance=g, cd_lr=lr)
            m, pts, loss = s.train_cd(cfg, fc.flowmap_steps, curve)
            samp = s.cd_sampler(m)
            grid.setdefault(field, []).append(
                {
                    "lr": lr,
                    "train_loss": loss,
                    "dist": {str(n): s.dist(samp(n)) for n in fc.nfe},
                    "curve": pts,
                }
            )
            toy._log(f"select {field} lr {lr:g}: N=1 dist {grid[field][-1]['dist']['1']:.4f}")
    chosen = {
        f: min(rows, key=(lambda r: r["train_loss"]) if f.startswith("lr_") else (lambda r: r["dist"]["1"]))[
            "lr"
        ]
        for f, rows in grid.items()
    }
    return {"seed": seed, "grid": grid, "chosen": chosen, "wall_s": time.perf_counter() - t0}


def _arm_cfg(s: Setup, arm: str, lr: float) -> toy.ExpConfig:
    g = 1.0 if arm == "g1" else 3.0
    target = "released" if arm == "g1" else arm
    return dataclasses.replace(s.base, guidance=g, cfg_target=target, flowmap_lr=lr)


def select_stage1(seed: int, fc: FairConfig) -> dict:
    """Seed-0 search of stage 1's (schedule, lr) per arm over fc.grid_stage1 at fc.flowmap_steps. Rule: the
    lowest held-out loss of the final EMA (Setup.heldout_loss: the objective on fresh data with shared draws,
    before adaptive scaling). The N = 1 distance to data is recorded, not used; the exact ODE is not computed."""
    t0 = time.perf_counter()
    s = Setup(seed, fc)

    def curve(model, sampler):
        return [None, s.dist(sampler(1))]

    grid: dict = {}
    for arm in fc.select_arms:
        for item in fc.grid_stage1:
            sched, lr = _pair(item)
            cfg = _arm_cfg(s, arm, lr)
            m, pts, loss = s.train_stage1(cfg, curve, sched)
            if PATHS["stage1_models"]:
                Path(PATHS["stage1_models"]).mkdir(parents=True, exist_ok=True)
                torch.save(
                    m.state_dict(), Path(PATHS["stage1_models"]) / f"seed{seed}_{arm}_{sched}@{lr:g}.pt"
                )
            samp = s.fm_sampler(m)
            row = {"schedule": sched, "lr": lr, "train_loss": loss, "heldout_loss": s.heldout_loss(m, cfg)}
            row |= {"dist": {str(n): s.dist(samp(n)) for n in fc.nfe}, "curve": pts}
            row["flat_dist"] = flatness(pts, 2)
            grid.setdefault(arm, []).append(row)
            toy._log(f"select-stage1 {arm} {item}: held-out loss {row['heldout_loss']:.4f}")
    chosen: dict = {}
    for arm, rows in grid.items():
        best = min(rows, key=lambda r: r["heldout_loss"])
        chosen[f"lr_{arm}"], chosen[f"sched_{arm}"] = best["lr"], best["schedule"]
    return {"seed": seed, "grid": grid, "chosen": chosen, "wall_s": time.perf_counter() - t0}


BUDGET_REL = 0.10  # budget_constant/RULE.md: S is enough when S → 2S lowers the smoothed N = 1 distance by < 10 %


BUDGET_POINTS = (2000, 1000, 0)  # v(S): the curve at S − 2000, S − 1000, S (budget_constant/RULE.md)
BUDGET_RUN = {"curve_every": 1000, "n_eval": 4096}  # the rule's curve spacing and evaluation size


def smoothed(curve: list, step: int, col: int = 2) -> float:
    """v(S) of budget_constant/RULE.md: mean of column ``col`` (2: the N = 1 distance to data) at the curve points
    S − 2000, S − 1000 and S exactly (a missing one is an error, not a neighbour)."""
    at = {p[0]: p[col] for p in curve}
    want = [step - d for d in BUDGET_POINTS]
    missing = [s for s in want if s not in at]
    if missing:
        raise ValueError(f"the curve has no point at step {missing[0]} (v({step}) reads steps {want})")
    return statistics.fmean(at[s] for s in want)


def budget_check(paths: Sequence[str], budget: int) -> dict:
    """budget_constant/RULE.md on the --select-stage1 runs at ``paths`` (one constant-rate g1 or meanflow run to at
    least 2 × ``budget`` steps, curve every 1000 steps on 4096 evaluation points): per arm v(S) at S = budget and
    2 × budget and whether doubling the budget lowers v by less than BUDGET_REL. Reads only the recorded held-out
    distances to data."""
    rows = []
    for path in paths:
        sel = json.loads((Path(path) / "selection_stage1.json").read_text())
        off = {k: sel.get("config", {}).get(k) for k, v in BUDGET_RUN.items() if sel.get("config", {}).get(k) != v}
        if off:
            raise ValueError(f"{path}: the rule reads runs with {BUDGET_RUN}, this one has {off}")
        for arm, runs in sel["grid"].items():
            if arm not in ("g1", "meanflow"):
                raise ValueError(f"{path}: arm {arm!r}: the rule checks g1 and meanflow only (released sits at its floor)")
            for r in runs:
                if r["schedule"] != "constant":
                    raise ValueError(f"{path}: {arm} {r['schedule']} run: the rule reads constant-rate runs only")
                v = {s: smoothed(r["curve"], s) for s in (budget, 2 * budget)}
                drop = (v[budget] - v[2 * budget]) / v[budget]
                rows.append({"arm": arm, "lr": r["lr"], "seed": sel["seed"], "v": v, "drop": drop,
                             "enough": drop < BUDGET_REL, "from": str(path)})
    return {"budget": budget, "rel": BUDGET_REL, "rows": rows}


def budget_markdown(chk: dict, command: str) -> str:
    b = chk["budget"]
    lines = [
        f"Command: `{command}`  ",
        "Rule: budget_constant/RULE.md (written before the runs). v(S) = mean N = 1 held-out distance to data at "
        f"the curve points S − 2000, S − 1000, S. Enough when (v({b}) − v({2 * b})) / v({b}) < {chk['rel']:.0%}.",
        "",
        f"| arm | seed | lr (constant) | v({b}) | v({2 * b}) | drop {b} → {2 * b} | enough? |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in chk["rows"]:
        v = r["v"]
        lines.append(
            f"| {r['arm']} | {r['seed']} | {r['lr']:g} | {v[b]:.4g} | {v[2 * b]:.4g} | "
            f"{r['drop']:.1%} | {'yes' if r['enough'] else '**no**'} |"
        )
    return "\n".join(lines) + "\n"


def teacher_samples(s: Setup, g: float, steps: int = 100) -> torch.Tensor:
    """Points of the trained teacher's CFG-g ODE (Euler) from fresh noise, labels s.held_labels: the
    distribution stage 2 distils (not the exact ODE, not the evaluation noise)."""
    ng = torch.Generator().manual_seed(50_000 + s.seed)
    z = torch.randn(len(s.held_labels), 1, 2, 1, 1, generator=ng)
    fn = cfg_fn(as_fn(s.teacher), s.c_neg, g)
    with torch.no_grad():
        x = flowmap_euler_sample(
            fn, z, s.data.embed(s.held_labels), steps, shift=1.0, use_mean_velocity=False
        )
    return from_latent(x).float()


def select_stage2(seed: int, fc: FairConfig) -> dict:
    """Seed-0 search of stage 2 per stage-1 target (fc.select_arms ∩ TARGETS), one factor at a time around
    S2_DEFAULTS (fc.grid_stage2), on the stage 1 that fc's lr_/sched_ fields select. Rule: per factor, the value
    with the lowest mean over N ∈ {1, 2, 4} of the class-wise energy distance to held-out samples of the
    teacher's CFG-3 ODE (teacher_samples; the guided arm's target is the CFG-3 distribution, which is 0.05 from
    the data, so the distance to data would reward weaker guidance); the chosen factors are combined. The
    distance to data is recorded beside it. The exact ODE is not computed."""
    t0 = time.perf_counter()
    s = Setup(seed, fc)
    tpts = teacher_samples(s, 3.0)
    sel_n = (1, 2, 4)

    def dists(model) -> dict:
        samp = s.fm_sampler(model)
        xs = {n: from_latent(samp(n)).float() for n in fc.nfe}
        to_t = {
            str(n): classwise_energy_distance(x, s.labels, tpts, s.held_labels, s.data.K)
            for n, x in xs.items()
        }
        return {"dist_teacher": to_t, "dist": {str(n): s.dist(x) for n, x in xs.items()}}

    grid: dict = {}
    for target in (a for a in fc.select_arms if a in TARGETS):
        cfg3 = _arm_cfg(s, target, getattr(fc, f"lr_{target}"))
        sched = getattr(fc, f"sched_{target}")
        saved = Path(PATHS["stage1_models"] or ".") / f"seed{seed}_{target}_{sched}@{cfg3.flowmap_lr:g}.pt"
        if PATHS["stage1_models"] and saved.is_file():  # the --select-stage1 run's model of this setting
            s1 = toy.make_student(s.teacher, s.data, torch.Generator().manual_seed(0))
            s1.load_state_dict(torch.load(saved))
            s1.requires_grad_(False)
        else:
            s1, _, _ = s.train_stage1(cfg3, lambda m, smp: [None, None], sched)
        rows = [{"factor": "stage 1 only", "value": None, **dists(s1)}]
        for item in ("default@0", *fc.grid_stage2):
            name, value = _pair(item)
            over = dict(S2_DEFAULTS) | ({} if name == "default" else {name: value})
            gen_state = s.gen.get_state()
            s2 = toy.train_onpolicy(s1, s.teacher, s.data, fc.stage2(cfg3, target, **over), s.gen)
            s.gen.set_state(gen_state)  # every setting sees the same batches and rollout plans
            row = {
                "factor": name,
                "value": None if name == "default" else value,
                "settings": over,
                **dists(s2),
            }
            row["score"] = statistics.fmean(row["dist_teacher"][str(n)] for n in sel_n)
            rows.append(row)
            toy._log(f"select-stage2 {target} {item}: score {row['score']:.4f}")
        grid[target] = rows
    chosen: dict = {}
    for target, rows in grid.items():
        default = next(r for r in rows if r["factor"] == "default")
        for name in S2_FIELDS:
            cands = [default] + [r for r in rows if r["factor"] == name]
            best = min(cands, key=lambda r: r["score"])
            chosen[f"s2_{name}_{target}"] = best["settings"][name]
    return {
        "seed": seed,
        "grid": grid,
        "chosen": chosen,
        "sel_n": list(sel_n),
        "wall_s": time.perf_counter() - t0,
    }


def _old_cd(seed: int, fc: FairConfig) -> dict | None:
    """--reuse-cd: an earlier report run of this seed whose CD settings equal fc's (CD does not depend on the
    stage-1/2 settings); its CD rows, curves and losses are copied instead of retraining CD."""
    path = PATHS["reuse_cd"].get(seed)
    if path is None:
        return None
    run = json.loads((Path(path) / "fair_results.json").read_text())
    mine = dataclasses.asdict(fc)
    diff = [k for k in CD_CONFIG if run["config"][k] != (list(mine[k]) if k == "nfe" else mine[k])]
    if diff or [r["seed"] for r in run["per_seed"]] != [seed]:
        raise SystemExit(f"--reuse-cd {path}: its CD settings differ ({diff}) or it is not seed {seed} alone")
    return run["per_seed"][0] | {"from": run["command"]}


def _copy_cd(res: dict, old: dict, row: str) -> None:
    res["rows"][row] = old["rows"][row] | {"reused_from": old["from"]}
    res["curves"][CD_ROWS[row]] = old["curves"][CD_ROWS[row]]
    res["train_loss"][CD_ROWS[row]] = old["train_loss"][CD_ROWS[row]]


def run_seed(seed: int, fc: FairConfig) -> dict:
    t0 = time.perf_counter()
    s = Setup(seed, fc)
    refs = {g: exact_reference(s.z, s.labels, g, fc.ref_steps) for g in (1.0, 3.0)}
    res: dict = {"seed": seed, "rows": {}, "curves": {}, "train_loss": {}, "calls": {}, "timings_s": {}}
    res["floors"] = {
        "fresh data vs held-out data": s.dist(s.fresh),
        "exact CFG-1 ODE samples vs held-out data": s.dist(refs[1.0]),
        "exact CFG-3 ODE samples vs held-out data": s.dist(refs[3.0]),
    }

    def curve_for(g):
        return lambda model, sampler: (lambda x: [coupled(x, refs[g]), s.dist(x)])(sampler(1))

    def evaluate(name: str, g: float, sample, calls_per_n: int = 1) -> None:
        xs = {n: sample(n) for n in fc.nfe}
        res["rows"][name] = {
            "g": g,
            "calls_per_step": calls_per_n,
            "coupled": {str(n): coupled(x, refs[g]) for n, x in xs.items()},
            "dist": {str(n): s.dist(x) for n, x in xs.items()},
        }

    for g in (1.0, 3.0):
        tfn = cfg_fn(as_fn(s.teacher), s.c_neg, g) if g != 1.0 else as_fn(s.teacher)
        calls = 2 if g != 1.0 else 1
        evaluate(
            f"teacher Euler, CFG {g:g}",
            g,
            lambda n, f=tfn: flowmap_euler_sample(f, s.z, s.c, n, shift=1.0, use_mean_velocity=False),
            calls,
        )
        x = flowmap_euler_sample(tfn, s.z, s.c, 1000, shift=1.0, use_mean_velocity=False)
        res["rows"][f"teacher Euler, CFG {g:g}"]["own_error_1000_steps"] = coupled(x, refs[g])
        res["rows"][f"teacher Euler, CFG {g:g}"]["own_dist_1000_steps"] = s.dist(x)
    res["timings_s"]["teacher+ref"] = time.perf_counter() - t0

    # unguided arm: g = 1 stage 1 and CD without guidance, at equal network calls
    t0 = time.perf_counter()
    if "unguided" not in fc.arms:
        return _guided(s, fc, res, evaluate, curve_for)
    cfg1 = dataclasses.replace(s.base, guidance=1.0, flowmap_lr=fc.lr_g1)
    s1, res["curves"][STAGE1["g1"]], res["train_loss"][STAGE1["g1"]] = s.train_stage1(
        cfg1, curve_for(1.0), fc.sched_g1
    )
    evaluate("AnyFlow stage 1, g = 1", 1.0, s.fm_sampler(s1))
    cd_steps = fc.flowmap_steps * CALLS["stage1_1"] // CALLS["cd_1"]
    old = _old_cd(seed, fc)
    if old:
        _copy_cd(res, old, "CD, unguided teacher")
    else:
        cd1, res["curves"]["CD, unguided"], res["train_loss"]["CD, unguided"] = s.train_cd(
            dataclasses.replace(cfg1, cd_lr=fc.cd_lr_1), cd_steps, curve_for(1.0)
        )
        evaluate("CD, unguided teacher", 1.0, s.cd_sampler(cd1))
    res["calls"]["unguided"] = {
        "anyflow": fc.flowmap_steps * CALLS["stage1_1"],
        "cd": cd_steps * CALLS["cd_1"],
        "cd_steps": cd_steps,
    }
    res["timings_s"]["unguided"] = time.perf_counter() - t0
    if "guided" not in fc.arms:
        toy._log(f"seed {seed} done: {res['timings_s']}")
        return res
    return _guided(s, fc, res, evaluate, curve_for)


def _guided(s: Setup, fc: FairConfig, res: dict, evaluate: Callable, curve_for: Callable) -> dict:
    seed, old = s.seed, _old_cd(s.seed, fc)
    # guided arm: released vs MeanFlow-style stage 1, stage 2 on both, CD at equal calls
    t0 = time.perf_counter()
    for target in ("released", "meanflow"):
        cfg3 = dataclasses.replace(s.base, cfg_target=target, flowmap_lr=getattr(fc, f"lr_{target}"))
        key = STAGE1[target]
        s1, res["curves"][key], res["train_loss"][key] = s.train_stage1(
            cfg3, curve_for(3.0), getattr(fc, f"sched_{target}")
        )
        evaluate(f"AnyFlow stage 1, {target} target", 3.0, s.fm_sampler(s1))
        s2 = toy.train_onpolicy(s1, s.teacher, s.data, fc.stage2(cfg3, target), s.gen)
        evaluate(f"AnyFlow stage 1 + 2, {target} target", 3.0, s.fm_sampler(s2))
    anyflow_calls = fc.flowmap_steps * CALLS["stage1_g"] + fc.onpolicy_steps * CALLS["stage2"]
    cd_steps = anyflow_calls // CALLS["cd_g"]
    if old:
        _copy_cd(res, old, "CD, CFG-3 teacher")
    else:
        cd3, res["curves"]["CD, CFG 3"], res["train_loss"]["CD, CFG 3"] = s.train_cd(
            dataclasses.replace(s.base, cd_lr=fc.cd_lr_3), cd_steps, curve_for(3.0)
        )
        evaluate("CD, CFG-3 teacher", 3.0, s.cd_sampler(cd3))
    res["calls"]["guided"] = {"anyflow": anyflow_calls, "cd": cd_steps * CALLS["cd_g"], "cd_steps": cd_steps}
    res["timings_s"]["guided"] = time.perf_counter() - t0
    toy._log(f"seed {seed} done: {res['timings_s']}")
    return res


def _ms(vals: list[float]) -> str:
    m = statistics.fmean(vals)
    return f"{m:.3g}" if len(vals) == 1 else f"{m:.3g} ± {statistics.stdev(vals):.2g}"


def markdown(per_seed: list[dict], fc: FairConfig, floor: dict | None, wall: float, command: str, sel) -> str:
    seeds = [r["seed"] for r in per_seed]
    spread = "" if len(seeds) == 1 else " (mean ± sample std over the seeds)"
    lines = [
        f"Command: `{command}`  ",
        f"Config: `{dataclasses.asdict(fc)}`; seeds {seeds}; wall {wall / 60:.1f} min.  ",
        f"Learning rates from: {sel or 'the defaults (no --selection)'}",
        "",
    ]
    heads = " | ".join(f"N={n}" for n in fc.nfe)
    rows = per_seed[0]["rows"]
    for metric, title in (
        ("coupled", "Coupled error (mean L2 to the exact ODE endpoint from the same noise)"),
        ("dist", "Held-out distance to data (class-wise energy distance to fresh ring samples)"),
    ):
        lines += [
            f"### {title}{spread}",
            "",
            f"| method | ref. | {heads} |",
            "|---|---|" + "---|" * len(fc.nfe),
        ]
        for name, row in rows.items():
            vals = " | ".join(_ms([r["rows"][name][metric][str(n)] for r in per_seed]) for n in fc.nfe)
            lines.append(f"| {name} | CFG {row['g']:g} | {vals} |")
        if floor and metric == "coupled":
            vals = " | ".join(f"{floor['coupled_error'].get(str(n), float('nan')):.3g}" for n in fc.nfe)
            lines.append(f"| released objective's exact fixed point (cfg_floor.py) | CFG 3 | {vals} |")
        lines.append("")
    lines += [
        "CD's multistep sampler re-noises with fresh noise between its N calls, so for N > 1 its sample is not "
        "the ODE endpoint of its initial noise and its coupled error measures lost coupling, not quality: read "
        "CD at N > 1 in the distance table. Under CFG 3 the target distribution is sharper than the data, so "
        "the distance to data has a floor of its own (below).",
        "",
        "Floors of the distance: "
        + ", ".join(f"{k} {_ms([r['floors'][k] for r in per_seed])}" for k in per_seed[0]["floors"])
        + ".  ",
        "Teacher's own error, 1000 Euler steps vs the exact ODE: "
        + ", ".join(
            f"CFG {row['g']:g}: coupled {_ms([r['rows'][n]['own_error_1000_steps'] for r in per_seed])}, "
            f"distance {_ms([r['rows'][n]['own_dist_1000_steps'] for r in per_seed])}"
            for n, row in rows.items()
            if "own_error_1000_steps" in row
        )
        + ".  ",
        "Network calls (per seed): " + json.dumps(per_seed[0]["calls"]) + ".  ",
        "Final training loss (mean of the last 10 % of steps): "
        + ", ".join(f"{k} {_ms([r['train_loss'][k] for r in per_seed])}" for k in per_seed[0]["train_loss"]),
        "",
        f"### N = 1 curves of the EMA models{spread}: step → coupled error / distance to data",
        "",
    ]
    curves = per_seed[0]["curves"]
    for name, pts in curves.items():
        cells = []
        for i, p in enumerate(pts):
            cpl = _ms([r["curves"][name][i][1] for r in per_seed])
            dst = _ms([r["curves"][name][i][2] for r in per_seed])
            cells.append(f"{p[0]}: {cpl} / {dst}")
        lines.append(f"* {name}: " + "; ".join(cells))
    lines += [
        "",
        f"Convergence (criterion fixed before the runs: the N = 1 value drops by less than {FLAT_REL:.0%} "
        "relative over the last 25 % of the steps, (v(¾S) − v(S)) / v(¾S)); stage-1 schedules: "
        + ", ".join(f"{a} {getattr(fc, 'sched_' + a)} from lr {getattr(fc, 'lr_' + a):g}" for a in STAGE1)
        + ".",
        "",
        "| curve | drop of the coupled error | drop of the distance | held-out loss (stage 1), last point | flat in every seed? |",
        "|---|---|---|---|---|",
    ]
    for name in curves:
        drops = [[100 * flatness(r["curves"][name], col) for r in per_seed] for col in (1, 2)]
        held = [r["curves"][name][-1][3] for r in per_seed if len(r["curves"][name][-1]) > 3]
        flat = all(max(d) < 100 * FLAT_REL for d in drops)
        lines.append(
            f"| {name} | {_ms(drops[0])} % | {_ms(drops[1])} % | {_ms(held) if held else '–'} | "
            f"{'yes' if flat else 'no'} |"
        )
    lines += [
        "",
        "Wall time per seed (s): "
        + json.dumps([{k: round(v) for k, v in r["timings_s"].items()} for r in per_seed]),
    ]
    return "\n".join(lines) + "\n"


def select_markdown(sel: dict, fc: FairConfig, command: str) -> str:
    lines = [
        f"Command: `{command}`  ",
        f"Seed {sel['seed']}, stage-1 and CD budget {fc.flowmap_steps} steps, wall {sel['wall_s'] / 60:.1f} min.",
        "",
        "Rule (fixed before the run): stage 1 takes the learning rate with the lowest final training loss (mean "
        "of the last 10 % of steps); CD the one with the lowest held-out energy distance to data at N = 1. "
        "The exact ODE (the reference of the report) is not computed here.",
        "",
        "| arm | lr | final training loss | " + " | ".join(f"dist N={n}" for n in fc.nfe) + " | chosen |",
        "|---|---|---|" + "---|" * len(fc.nfe) + "---|",
    ]
    for field, rows in sel["grid"].items():
        for r in rows:
            dist = " | ".join(f"{r['dist'][str(n)]:.3g}" for n in fc.nfe)
            mark = "**yes**" if r["lr"] == sel["chosen"][field] else ""
            lines.append(f"| {field} | {r['lr']:g} | {r['train_loss']:.4g} | {dist} | {mark} |")
    lines += ["", "N = 1 distance-to-data curve (step: distance):", ""]
    for field, rows in sel["grid"].items():
        for r in rows:
            lines.append(f"* {field} lr {r['lr']:g}: " + "; ".join(f"{p[0]}: {p[2]:.3g}" for p in r["curve"]))
    lines += ["", "Chosen: `" + json.dumps(sel["chosen"]) + "`"]
    return "\n".join(lines) + "\n"


def select_stage1_markdown(sel: dict, fc: FairConfig, command: str) -> str:
    lines = [
        f"Command: `{command}`  ",
        f"Seed {sel['seed']}, stage-1 budget {fc.flowmap_steps} steps, wall {sel['wall_s'] / 60:.1f} min.",
        "",
        "Rule (fixed before the run): per arm, the (schedule, lr) whose final EMA has the lowest held-out loss "
        f"(the stage-1 regression on {fc.heldout_loss_n} fresh points with shared draws, all pair types, before adaptive "
        "scaling). The N = 1 distance to data and its drop over the last 25 % of steps are recorded, not used; "
        "the exact ODE is not computed.",
        "",
        "| arm | schedule | lr | held-out loss | training loss (tail) | "
        + " | ".join(f"dist N={n}" for n in fc.nfe)
        + " | N = 1 dist drop, last 25 % | chosen |",
        "|---|---|---|---|---|" + "---|" * len(fc.nfe) + "---|---|",
    ]
    for arm, rows in sel["grid"].items():
        for r in rows:
            dist = " | ".join(f"{r['dist'][str(n)]:.3g}" for n in fc.nfe)
            mark = (
                "**yes**"
                if (r["lr"], r["schedule"]) == (sel["chosen"][f"lr_{arm}"], sel["chosen"][f"sched_{arm}"])
                else ""
            )
            lines.append(
                f"| {arm} | {r['schedule']} | {r['lr']:g} | {r['heldout_loss']:.4g} | {r['train_loss']:.4g} | "
                f"{dist} | {r['flat_dist']:.1%} | {mark} |"
            )
    lines += ["", "N = 1 curves (step: distance to data / held-out loss):", ""]
    for arm, rows in sel["grid"].items():
        for r in rows:
            pts = "; ".join(f"{p[0]}: {p[2]:.3g} / {p[3]:.4g}" for p in r["curve"])
            lines.append(f"* {arm} {r['schedule']} lr {r['lr']:g}: {pts}")
    lines += ["", "Chosen: `" + json.dumps(sel["chosen"]) + "`"]
    return "\n".join(lines) + "\n"


def select_stage2_markdown(sel: dict, fc: FairConfig, command: str) -> str:
    lines = [
        f"Command: `{command}`  ",
        f"Seed {sel['seed']}, stage 1 {fc.flowmap_steps} steps, stage 2 {fc.onpolicy_steps} steps, "
        f"wall {sel['wall_s'] / 60:.1f} min.",
        "",
        "Rule (fixed before the run): one factor at a time around the defaults "
        f"{json.dumps(S2_DEFAULTS)} (lr: AdamW of generator and critic; ema: the evaluated generator's EMA; "
        "fd: ε_fd of the co-trained forward loss, τ units; dmd: the real score's scale w, CFG 1 + w), every "
        "setting on the same stage 1 and the same random draws; per factor the value with the lowest score = "
        f"mean over N ∈ {tuple(sel['sel_n'])} of the class-wise energy distance to held-out samples of the "
        "teacher's CFG-3 ODE (100 Euler steps, fresh noise); the chosen values are combined. The distance "
        "to data is shown beside it; the exact ODE is not computed.",
        "",
        "| target | setting | score | "
        + " | ".join(f"to teacher N={n}" for n in fc.nfe)
        + " | "
        + " | ".join(f"to data N={n}" for n in fc.nfe)
        + " |",
        "|---|---|---|" + "---|" * (2 * len(fc.nfe)),
    ]
    for target, rows in sel["grid"].items():
        for r in rows:
            name = r["factor"] if r["value"] is None else f"{r['factor']} = {r['value']:g}"
            score = f"{r['score']:.4g}" if "score" in r else "–"
            tt = " | ".join(f"{r['dist_teacher'][str(n)]:.3g}" for n in fc.nfe)
            dd = " | ".join(f"{r['dist'][str(n)]:.3g}" for n in fc.nfe)
            lines.append(f"| {target} | {name} | {score} | {tt} | {dd} |")
    lines += ["", "Chosen: `" + json.dumps(sel["chosen"]) + "`"]
    return "\n".join(lines) + "\n"


def plot(per_seed: list[dict], fc: FairConfig, floor: dict | None, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def band(ax, xs, series, **kw):
        m = [statistics.fmean(v) for v in series]
        sd = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in series]
        ax.errorbar(xs, m, yerr=sd, marker="o", ms=3, capsize=2, **kw)

    seeds = ",".join(str(r["seed"]) for r in per_seed)
    rows = per_seed[0]["rows"]
    fig, axes = plt.subplots(2, 3, figsize=(17, 9))
    for j, (metric, ylabel) in enumerate(
        (("coupled", "coupled error vs exact ODE"), ("dist", "energy distance to data"))
    ):
        for ax, g in zip(axes[j, :2], (1.0, 3.0), strict=True):
            for name, row in rows.items():
                if row["g"] == g:
                    band(
                        ax,
                        fc.nfe,
                        [[r["rows"][name][metric][str(n)] for r in per_seed] for n in fc.nfe],
                        label=name,
                    )
            if g == 3.0 and floor and metric == "coupled":
                ax.plot(
                    fc.nfe,
                    [floor["coupled_error"][str(n)] for n in fc.nfe],
                    "k--",
                    label="released objective, exact fixed point",
                )
            if metric == "dist":
                key = f"exact CFG-{g:g} ODE samples vs held-out data"
                ax.axhline(
                    statistics.fmean(r["floors"][key] for r in per_seed),
                    color="k",
                    ls=":",
                    label="exact ODE samples (floor)",
                )
            ax.set(
                xscale="log",
                yscale="log" if metric == "coupled" else "symlog",
                xlabel="N (sampling steps)",
                ylabel=ylabel,
                title=f"CFG {g:g} (seeds {seeds})",
            )
            if metric == "dist":
                ax.set_yscale("symlog", linthresh=1e-3)
            ax.legend(fontsize=6)
        ax = axes[j, 2]
        for name, pts in per_seed[0]["curves"].items():
            band(
                ax,
                [p[0] for p in pts],
                [[r["curves"][name][i][1 + j] for r in per_seed] for i in range(len(pts))],
                label=name,
            )
        ax.set(yscale="log", xlabel="training step", ylabel=f"N = 1 {ylabel}", title="N = 1 curves (EMA)")
        ax.legend(fontsize=6)
    fig.tight_layout()
    path = out / "fair_anystep.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _write_report(
    out: Path, fc: FairConfig, per_seed: list[dict], floor, wall: float, command: str, sel
) -> None:
    record = {"config": dataclasses.asdict(fc), "command": command, "selection": sel, "floor": floor}
    record |= {"per_seed": per_seed, "wall_s": wall}
    (out / "fair_results.json").write_text(json.dumps(record, indent=1) + "\n")
    (out / "fair_results.md").write_text(markdown(per_seed, fc, floor, wall, command, sel))
    plot(per_seed, fc, floor, out)
    print(f"wrote {out}/fair_results.md, fair_results.json, fair_anystep.png ({wall:.0f} s)")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="experiments/results_fair")
    p.add_argument(
        "--floor", default="experiments/results_fair/floor.json", help="cfg_floor.py's JSON ('' = none)"
    )
    p.add_argument(
        "--select", action="store_true", help="seed-0 learning-rate search (writes selection.json)"
    )
    p.add_argument(
        "--select-stage1",
        action="store_true",
        help="seed-0 search of stage 1's schedule and lr (writes selection_stage1.json)",
    )
    p.add_argument(
        "--select-stage2",
        action="store_true",
        help="seed-0 search of stage 2's lr, EMA, ε_fd, DMD scale (writes selection_stage2.json)",
    )
    p.add_argument(
        "--selection",
        nargs="+",
        default=[],
        help="selection JSONs of --select / --select-stage1 / --select-stage2 runs, applied in order",
    )
    p.add_argument(
        "--merge",
        nargs="+",
        default=[],
        help="report folders of single-seed runs (same config): write their combined tables/plot to --out",
    )
    p.add_argument(
        "--budget-check",
        nargs="+",
        default=[],
        help="--select-stage1 run folders of constant-rate runs to 2 x --flowmap-steps: apply "
        "budget_constant/RULE.md at S = --flowmap-steps (writes budget_check.md/.json to --out)",
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache", default="", help="folder of saved teachers (a seed's teacher is trained once)")
    p.add_argument(
        "--stage1-models",
        default="",
        help="folder where --select-stage1 saves its stage-1 models and --select-stage2 loads the chosen one",
    )
    p.add_argument(
        "--reuse-cd",
        nargs="+",
        default=[],
        help="single-seed report folders whose CD rows are copied (same seed and CD settings) instead of retrained",
    )
    d = FairConfig()
    for f in dataclasses.fields(FairConfig):
        v = getattr(d, f.name)
        if isinstance(v, tuple):
            p.add_argument("--" + f.name.replace("_", "-"), type=type(v[0]), nargs="+", default=list(v))
        else:
            p.add_argument("--" + f.name.replace("_", "-"), type=type(v), default=v)
    a = p.parse_args(argv)
    kw = {f.name: getattr(a, f.name) for f in dataclasses.fields(FairConfig)}
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in kw.items()}
    for sel_path in a.selection:
        path = Path(sel_path)
        if not path.is_file():
            print(f"--selection: no such file {path}; run --select first.", file=sys.stderr)
            return 2
        kw.update(json.loads(path.read_text())["chosen"])
    fc = FairConfig(**kw)
    PATHS["cache"], PATHS["stage1_models"] = a.cache or None, a.stage1_models or None
    PATHS["reuse_cd"] = {
        json.loads((Path(d) / "fair_results.json").read_text())["config"]["seeds"][0]: d for d in a.reuse_cd
    }
    torch.set_num_threads(a.threads)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    command = (
        " ".join(["experiments/fair_anystep.py", *sys.argv[1:]])
        if argv is None
        else "fair_anystep.main(" + repr(list(argv)) + ")"
    )
    if a.budget_check:
        chk = budget_check(a.budget_check, fc.flowmap_steps)
        (out / "budget_check.json").write_text(json.dumps({"command": command, **chk}, indent=1) + "\n")
        (out / "budget_check.md").write_text(budget_markdown(chk, command))
        print((out / "budget_check.md").read_text())
        return 0
    if a.merge:
        runs = [json.loads((Path(m) / "fair_results.json").read_text()) for m in a.merge]
        configs = {json.dumps({k: v for k, v in r["config"].items() if k != "seeds"}) for r in runs}
        if len(configs) != 1:
            print(
                f"--merge: the runs in {a.merge} differ in their config; merge only one setting.",
                file=sys.stderr,
            )
            return 2
        fc = FairConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in runs[0]["config"].items()})
        fc = dataclasses.replace(fc, seeds=tuple(s for r in runs for s in r["config"]["seeds"]))
        per_seed = [ps for r in runs for ps in r["per_seed"]]
        wall = sum(r["wall_s"] for r in runs)
        floor, sel = runs[0]["floor"], runs[0].get("selection", "")
        merged = command + "  (merged: " + "; ".join(r.get("command", "?") for r in runs) + ")"
        _write_report(out, fc, per_seed, floor, wall, merged, sel)
        return 0
    start = time.perf_counter()
    for flag, name, fn, md in (
        (a.select_stage1, "selection_stage1", select_stage1, select_stage1_markdown),
        (a.select_stage2, "selection_stage2", select_stage2, select_stage2_markdown),
    ):
        if flag:
            sel = fn(fc.seeds[0], fc)
            rec = {"config": dataclasses.asdict(fc), "command": command, **sel}
            (out / f"{name}.json").write_text(json.dumps(rec, indent=1) + "\n")
            (out / f"{name}.md").write_text(md(sel, fc, command))
            print(f"wrote {out}/{name}.md, {name}.json ({sel['wall_s']:.0f} s): {sel['chosen']}")
            return 0
    if a.select:
        (seed,) = fc.seeds[:1]
        sel = select(seed, fc)
        (out / "selection.json").write_text(
            json.dumps({"config": dataclasses.asdict(fc), "command": command, **sel}, indent=1) + "\n"
        )
        (out / "selection.md").write_text(select_markdown(sel, fc, command))
        print(f"wrote {out}/selection.md, selection.json ({sel['wall_s']:.0f} s): {sel['chosen']}")
        return 0
    per_seed = [run_seed(s, fc) for s in fc.seeds]
    wall = time.perf_counter() - start
    floor = json.loads(Path(a.floor).read_text()) if a.floor and Path(a.floor).is_file() else None
    _write_report(out, fc, per_seed, floor, wall, command, " ".join(a.selection))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
