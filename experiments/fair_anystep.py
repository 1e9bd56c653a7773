"""A fairer any-step comparison on the toy ring (issue 17 items 1 and 3; docs/method.md §6.2, §6.8, §7).

Against the **exact** ODE of the data (closed-form mixture velocities, ``anyflow.analytic``, RK4 in float64),
two arms from one teacher per seed:

* unguided: an AnyFlow stage 1 with g = 1 (no fusion) and consistency distillation (CD) without guidance,
  both against the exact conditional (CFG-1) ODE;
* guided (CFG 3): stage 1 with the released fused target and with the MeanFlow-style target
  (``cfg_target``), stage 2 (FMBS + DMD + co-trained forward loss) on top of each, CD distilled from the
  CFG-3 teacher, and the released objective's analytic floor (``cfg_floor.py``) beside them.

CD's step count is set so that its **network calls** equal AnyFlow's (stage 1: 4 calls a step with fusion,
3 at g = 1; stage 2 ≈ 14; CD 4 with CFG, 3 without). The teacher's own error against the exact ODE is
reported. The training code is toy_anystep.py's (same data, network, losses and defaults).

    OMP_NUM_THREADS=1 .venv/bin/python experiments/fair_anystep.py --out experiments/results_fair --seeds 1
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import toy_anystep as toy
from cfg_floor import cfg_velocity, ring
from toy_models import RingMixture, as_fn, cfg_fn, consistency_sample, ema_update, from_latent

from anyflow.analytic import integrate_ode
from anyflow.flowmap import forward_flowmap_loss
from anyflow.rollout import flowmap_euler_sample

CALLS = {"stage1_g": 4, "stage1_1": 3, "stage2": 14, "cd_g": 4, "cd_1": 3}  # network calls per step


@dataclasses.dataclass(frozen=True)
class FairConfig:
    seeds: tuple[int, ...] = (1,)
    teacher_steps: int = 3000
    flowmap_steps: int = 4000
    onpolicy_steps: int = 1500
    curve_every: int = 500  # N = 1 coupled error of the stage-1 EMA every so many steps (reported, not used)
    n_eval: int = 1024
    ref_steps: int = 400  # RK4 steps of the exact ODE, σ 1 → 0
    nfe: tuple[int, ...] = (1, 2, 4, 8, 32)
    width: int = 128
    batch: int = 256

    def toy(self, **kw) -> toy.ExpConfig:
        return toy.ExpConfig(
            teacher_steps=self.teacher_steps,
            flowmap_steps=self.flowmap_steps,
            onpolicy_steps=self.onpolicy_steps,
            width=self.width,
            batch=self.batch,
            **kw,
        )


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


def train_stage1(teacher, data, cfg: toy.ExpConfig, gen, curve) -> tuple[torch.nn.Module, list, float]:
    """toy_anystep.train_flowmap with a curve of the N = 1 error and the final training loss."""
    student = toy.make_student(teacher, data, gen)
    ema = copy.deepcopy(student).requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.flowmap_lr, betas=(0.9, 0.95), weight_decay=0.0)
    lcfg, c_neg = toy.loss_config(cfg), data.negative()
    points, losses = [], []
    for step in range(cfg.flowmap_steps):
        x, c, _ = data.batch(cfg.batch, gen)
        loss, _ = forward_flowmap_loss(as_fn(student), x, c, c_neg, gen, lcfg)
        toy._step(opt, student, loss)
        ema_update(ema, student, cfg.eval_ema if step >= 100 else 0.0)
        losses.append(loss.item())
        if (step + 1) % curve[0] == 0 or step == 0:
            points.append((step + 1, curve[1](ema)))
    tail = losses[-max(1, len(losses) // 10) :]
    return ema, points, sum(tail) / len(tail)


def run_seed(seed: int, fc: FairConfig) -> dict:
    data = RingMixture()
    gen = torch.Generator().manual_seed(seed)
    base = fc.toy()
    t0 = time.perf_counter()
    teacher = toy.train_teacher(data, base, gen, seed)
    eg = torch.Generator().manual_seed(10_000 + seed)
    labels = data.balanced_labels(fc.n_eval)
    c = data.embed(labels)
    z = torch.randn(fc.n_eval, 1, 2, 1, 1, generator=eg)
    refs = {g: exact_reference(z, labels, g, fc.ref_steps) for g in (1.0, 3.0)}
    c_neg = data.negative()

    def fm_sampler(model):
        return lambda n: flowmap_euler_sample(as_fn(model), z, c, n, shift=1.0)

    def n1(g):
        return lambda m: coupled(fm_sampler(m)(1), refs[g])

    res: dict = {"seed": seed, "rows": {}, "curves": {}, "train_loss": {}, "calls": {}, "timings_s": {}}

    def evaluate(name: str, g: float, sample, calls_per_n: int = 1) -> None:
        res["rows"][name] = {
            "g": g,
            "calls_per_step": calls_per_n,
            "coupled": {str(n): coupled(sample(n), refs[g]) for n in fc.nfe},
        }

    for g in (1.0, 3.0):
        tfn = cfg_fn(as_fn(teacher), c_neg, g) if g != 1.0 else as_fn(teacher)
        calls = 2 if g != 1.0 else 1
        evaluate(
            f"teacher Euler, CFG {g:g}",
            g,
            lambda n, f=tfn: flowmap_euler_sample(f, z, c, n, shift=1.0, use_mean_velocity=False),
            calls,
        )
        res["rows"][f"teacher Euler, CFG {g:g}"]["own_error_1000_steps"] = coupled(
            flowmap_euler_sample(tfn, z, c, 1000, shift=1.0, use_mean_velocity=False), refs[g]
        )
    res["timings_s"]["teacher+ref"] = time.perf_counter() - t0

    # unguided arm: g = 1 stage 1 and CD without guidance, at equal network calls
    t0 = time.perf_counter()
    cfg1 = dataclasses.replace(base, guidance=1.0)
    s1, res["curves"]["stage 1, g = 1"], res["train_loss"]["stage 1, g = 1"] = train_stage1(
        teacher, data, cfg1, gen, (fc.curve_every, n1(1.0))
    )
    evaluate("AnyFlow stage 1, g = 1", 1.0, fm_sampler(s1))
    cd_steps = fc.flowmap_steps * CALLS["stage1_1"] // CALLS["cd_1"]
    cd1 = toy.train_consistency(
        teacher, data, dataclasses.replace(cfg1, flowmap_steps=cd_steps, onpolicy_steps=0), gen
    )
    evaluate(
        "CD, unguided teacher",
        1.0,
        lambda n: consistency_sample(
            as_fn(cd1), z, c, n, torch.Generator().manual_seed(20_000 + seed), shift=1.0
        ),
    )
    res["calls"]["unguided"] = {
        "anyflow": fc.flowmap_steps * CALLS["stage1_1"],
        "cd": cd_steps * CALLS["cd_1"],
        "cd_steps": cd_steps,
    }
    res["timings_s"]["unguided"] = time.perf_counter() - t0

    # guided arm: released vs MeanFlow-style stage 1, stage 2 on both, CD at equal calls
    t0 = time.perf_counter()
    for target in ("released", "meanflow"):
        cfg3 = dataclasses.replace(base, cfg_target=target)
        key = f"stage 1, {target}"
        s1, res["curves"][key], res["train_loss"][key] = train_stage1(
            teacher, data, cfg3, gen, (fc.curve_every, n1(3.0))
        )
        evaluate(f"AnyFlow stage 1, {target} target", 3.0, fm_sampler(s1))
        s2 = toy.train_onpolicy(s1, teacher, data, cfg3, gen)
        evaluate(f"AnyFlow stage 1 + 2, {target} target", 3.0, fm_sampler(s2))
    anyflow_calls = fc.flowmap_steps * CALLS["stage1_g"] + fc.onpolicy_steps * CALLS["stage2"]
    cd_steps = anyflow_calls // CALLS["cd_g"]
    cd3 = toy.train_consistency(
        teacher, data, dataclasses.replace(base, flowmap_steps=cd_steps, onpolicy_steps=0), gen
    )
    evaluate(
        "CD, CFG-3 teacher",
        3.0,
        lambda n: consistency_sample(
            as_fn(cd3), z, c, n, torch.Generator().manual_seed(20_000 + seed), shift=1.0
        ),
    )
    res["calls"]["guided"] = {"anyflow": anyflow_calls, "cd": cd_steps * CALLS["cd_g"], "cd_steps": cd_steps}
    res["timings_s"]["guided"] = time.perf_counter() - t0
    return res


def markdown(per_seed: list[dict], fc: FairConfig, floor: dict | None, wall: float, command: str) -> str:
    lines = [f"Command: `{command}`  ", f"Config: `{dataclasses.asdict(fc)}`; wall {wall / 60:.1f} min.", ""]
    for r in per_seed:
        lines += [f"### Seed {r['seed']}: coupled error (mean L2 to the exact ODE endpoint, same noise)", ""]
        lines.append("| method | ref. | " + " | ".join(f"N={n}" for n in fc.nfe) + " |")
        lines.append("|---|---|" + "---|" * len(fc.nfe))
        for name, row in r["rows"].items():
            vals = " | ".join(f"{row['coupled'][str(n)]:.3g}" for n in fc.nfe)
            lines.append(f"| {name} | CFG {row['g']:g} | {vals} |")
        if floor:
            vals = " | ".join(f"{floor['coupled_error'].get(str(n), float('nan')):.3g}" for n in fc.nfe)
            lines.append(f"| released objective's exact fixed point (cfg_floor.py) | CFG 3 | {vals} |")
        lines += [
            "",
            "Teacher's own error (1000 Euler steps vs exact ODE): "
            + ", ".join(
                f"CFG {row['g']:g}: {row['own_error_1000_steps']:.3g}"
                for row in r["rows"].values()
                if "own_error_1000_steps" in row
            ),
            "",
        ]
        lines.append("Network calls: " + json.dumps(r["calls"]) + "  ")
        lines.append(
            "Stage-1 final training loss (mean of the last 10 % of steps): "
            + json.dumps({k: round(v, 4) for k, v in r["train_loss"].items()})
            + "  "
        )
        lines.append(
            "N = 1 curve of the stage-1 EMA (step, coupled error): "
            + json.dumps({k: [(s, round(v, 3)) for s, v in p] for k, p in r["curves"].items()})
        )
        lines.append("")
    return "\n".join(lines) + "\n"


def plot(per_seed: list[dict], fc: FairConfig, floor: dict | None, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = per_seed[0]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, g in zip(axes[:2], (1.0, 3.0), strict=True):
        for name, row in r["rows"].items():
            if row["g"] == g:
                ax.plot(fc.nfe, [row["coupled"][str(n)] for n in fc.nfe], marker="o", label=name)
        if g == 3.0 and floor:
            ax.plot(
                fc.nfe,
                [floor["coupled_error"][str(n)] for n in fc.nfe],
                "k--",
                label="released objective, exact fixed point",
            )
        ax.set(
            xscale="log",
            yscale="log",
            xlabel="N (sampling steps)",
            ylabel="coupled error vs exact ODE",
            title=f"CFG {g:g} (seed {r['seed']})",
        )
        ax.legend(fontsize=7)
    for name, pts in r["curves"].items():
        axes[2].plot([p[0] for p in pts], [p[1] for p in pts], marker=".", label=name)
    axes[2].set(
        yscale="log", xlabel="stage-1 step", ylabel="N = 1 coupled error (EMA)", title="stage-1 N = 1 curve"
    )
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    path = out / "fair_anystep.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default="experiments/results_fair")
    p.add_argument(
        "--floor", default="experiments/results_fair/floor.json", help="cfg_floor.py's JSON ('' = none)"
    )
    p.add_argument("--threads", type=int, default=1)
    d = FairConfig()
    for f in dataclasses.fields(FairConfig):
        v = getattr(d, f.name)
        if isinstance(v, tuple):
            p.add_argument("--" + f.name.replace("_", "-"), type=int, nargs="+", default=list(v))
        else:
            p.add_argument("--" + f.name.replace("_", "-"), type=type(v), default=v)
    a = p.parse_args(argv)
    fc = FairConfig(
        **{
            f.name: tuple(getattr(a, f.name)) if isinstance(getattr(a, f.name), list) else getattr(a, f.name)
            for f in dataclasses.fields(FairConfig)
        }
    )
    torch.set_num_threads(a.threads)
    start = time.perf_counter()
    per_seed = [run_seed(s, fc) for s in fc.seeds]
    wall = time.perf_counter() - start
    floor = json.loads(Path(a.floor).read_text()) if a.floor and Path(a.floor).is_file() else None
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    command = (
        " ".join(["experiments/fair_anystep.py", *sys.argv[1:]])
        if argv is None
        else "fair_anystep.main(" + repr(list(argv)) + ")"
    )
    (out / "fair_results.json").write_text(
        json.dumps(
            {"config": dataclasses.asdict(fc), "floor": floor, "per_seed": per_seed, "wall_s": wall}, indent=1
        )
        + "\n"
    )
    (out / "fair_results.md").write_text(markdown(per_seed, fc, floor, wall, command))
    plot(per_seed, fc, floor, out)
    print(f"wrote {out}/fair_results.md, fair_results.json, fair_anystep.png ({wall:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
