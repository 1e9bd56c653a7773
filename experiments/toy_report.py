"""Evaluation and reporting for experiments/toy_anystep.py (docs/method.md §15 A, C, E).

Reference for the coupled error: the teacher with standard CFG scale 3 (v_∅ + 3·(v_c − v_∅)), integrated
with ``ref_steps`` (1000) Euler steps on the shifted grid from the same initial noise. The fused-CFG
flow-map students target exactly this field (§6.2: u_c ≈ u_∅ + 3·(target − u_∅)).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from toy_models import (
    RingMixture,
    as_fn,
    cfg_fn,
    classwise_energy_distance,
    consistency_sample,
    coupled_error,
    from_latent,
    rel_err,
    to_latent,
)

from anyflow.rollout import explicit_rollout, flowmap_euler_sample, fmbs_rollout, jump
from anyflow.timesteps import flowmap_euler_sigmas, shift_sigma

METHOD_LABELS = {
    "teacher": "teacher, Euler + CFG 3 (NFE = 2N)",
    "flowmap": "AnyFlow stage 1 (forward flow map)",
    "anyflow": "AnyFlow stage 2 (on-policy, EMA)",
    "consistency": "consistency distillation (multistep CM sampling)",
}
FIELD_LABELS = {
    "init": "student at init (= teacher copy)",
    "flowmap": "after stage 1",
    "anyflow": "after stage 2",
    "consistency": "consistency baseline",
}


@torch.no_grad()
def field_errors(model, teacher, data: RingMixture, cfg, gen: torch.Generator) -> dict[str, float]:
    """§15 E: E‖u(z,t,t,c) − v_teacher^{CFG 3}(z,t,c)‖² and E‖u(z,t,t,∅) − v_teacher(z,t,∅)‖² on the data path."""
    n = 4096
    labels = data.balanced_labels(n)
    x = to_latent(data.sample(labels, gen))
    c, c_neg = data.embed(labels), data.negative().expand(n, -1, -1)
    sigma = shift_sigma(torch.rand(n, generator=gen), cfg.shift)
    z = (
        sigma.reshape(-1, 1, 1, 1, 1) * torch.randn(x.shape, generator=gen)
        + (1 - sigma.reshape(-1, 1, 1, 1, 1)) * x
    )
    tau = (sigma * 1000)[:, None]
    u, v = as_fn(model), as_fn(teacher)
    v_cfg = cfg_fn(v, data.negative(), cfg.guidance)(z, tau, tau, c)
    v_neg = v(z, tau, tau, c_neg)
    e_g = (u(z, tau, tau, c) - v_cfg).pow(2).sum(dim=(1, 2, 3, 4))
    e_u = (u(z, tau, tau, c_neg) - v_neg).pow(2).sum(dim=(1, 2, 3, 4))
    return {
        "guided_mse": float(e_g.mean()),
        "guided_rel": float(e_g.mean() / v_cfg.pow(2).sum(dim=(1, 2, 3, 4)).mean()),
        "uncond_mse": float(e_u.mean()),
        "uncond_rel": float(e_u.mean() / v_neg.pow(2).sum(dim=(1, 2, 3, 4)).mean()),
    }


@torch.no_grad()
def fmbs_fidelity(model, z: torch.Tensor, c: torch.Tensor, cfg) -> dict[str, dict[str, float]]:
    """§15 C: FMBS prefix state vs k explicit steps, FMBS final vs the full N-step rollout (relative L2)."""
    u = as_fn(model)
    out = {}
    for n in cfg.rollout_steps:
        sig = flowmap_euler_sigmas(n, cfg.shift).tolist()
        full = explicit_rollout(u, z, c, n, shift=cfg.shift)
        ks = sorted({round(v) for v in torch.linspace(1, n - 1, min(cfg.fmbs_k_per_n, n - 1)).tolist()})
        state, final = [], []
        for k in ks:
            state.append(
                rel_err(
                    jump(u, z, c, sig[0], sig[k]), explicit_rollout(u, z, c, n, shift=cfg.shift, stop_at=k)
                )
            )
            final.append(rel_err(fmbs_rollout(u, z, c, n, k, shift=cfg.shift)[0], full))
        out[str(n)] = {"state_rel": sum(state) / len(state), "final_rel": sum(final) / len(final), "ks": ks}
    return out


@torch.no_grad()
def evaluate_seed(seed: int, teacher, models: dict, data: RingMixture, cfg) -> dict[str, Any]:
    eg = torch.Generator().manual_seed(10_000 + seed)
    labels = data.balanced_labels(cfg.n_eval)
    c = data.embed(labels)
    z = torch.randn(cfg.n_eval, 1, 2, 1, 1, generator=eg)
    hl = data.balanced_labels(cfg.n_heldout)
    heldout = data.sample(hl, eg)
    heldout2 = data.sample(hl, eg)
    teacher_cfg = cfg_fn(as_fn(teacher), data.negative(), cfg.guidance)
    ref = flowmap_euler_sample(teacher_cfg, z, c, cfg.ref_steps, shift=cfg.shift, use_mean_velocity=False)
    k = data.K
    res: dict[str, Any] = {
        "seed": seed,
        "floors": {
            "ed_ref_vs_data": classwise_energy_distance(from_latent(ref), labels, heldout, hl, k),
            "ed_data_vs_data": classwise_energy_distance(
                heldout[: cfg.n_eval], hl[: cfg.n_eval], heldout2, hl, k
            ),
        },
        "sampling": {},
        "samples": {},
    }
    samplers = {
        "teacher": lambda n: flowmap_euler_sample(
            teacher_cfg, z, c, n, shift=cfg.shift, use_mean_velocity=False
        ),
        "flowmap": lambda n: flowmap_euler_sample(as_fn(models["flowmap"]), z, c, n, shift=cfg.shift),
        "anyflow": lambda n: flowmap_euler_sample(as_fn(models["anyflow"]), z, c, n, shift=cfg.shift),
        "consistency": lambda n: consistency_sample(
            as_fn(models["consistency"]),
            z,
            c,
            n,
            torch.Generator().manual_seed(20_000 + seed),
            shift=cfg.shift,
        ),
    }
    for name, sample in samplers.items():
        res["sampling"][name] = {}
        for n in cfg.nfe:
            x = sample(n)
            pts = from_latent(x)
            res["sampling"][name][str(n)] = {
                "coupled": coupled_error(x, ref),
                "ed_data": classwise_energy_distance(pts, labels, heldout, hl, k),
                "ed_ref": classwise_energy_distance(pts, labels, from_latent(ref), labels, k, paired=True),
            }
            res["samples"][f"{name}/{n}"] = pts[:512].clone()
    res["samples"]["reference"] = from_latent(ref)[:512].clone()
    res["samples"]["data"] = heldout[:512].clone()
    fg = torch.Generator().manual_seed(30_000 + seed)
    res["field"] = {name: field_errors(m, teacher, data, cfg, fg) for name, m in models.items()}
    zf, cf = z[: cfg.fmbs_batch], c[: cfg.fmbs_batch]
    res["fmbs"] = {name: fmbs_fidelity(models[name], zf, cf, cfg) for name in ("init", "flowmap", "anyflow")}
    return res


# --------------------------------------------------------------------------------------------------
# Aggregation and outputs
# --------------------------------------------------------------------------------------------------


def _stat(vals: list[float]) -> dict[str, float]:
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return {"mean": m, "std": sd}


def _aggregate(items: list[Any]) -> Any:
    """Mean/std over seeds of every numeric leaf of identically-shaped dicts."""
    first = items[0]
    if isinstance(first, dict):
        return {k: _aggregate([it[k] for it in items]) for k in first}
    if isinstance(first, (int, float)) and not isinstance(first, bool):
        return _stat([float(v) for v in items])
    return first


def _fmt(s: dict[str, float], prec: int = 3) -> str:
    return f"{s['mean']:.{prec}g} ± {s['std']:.1g}"


def _sampling_table(agg: dict, metric: str, nfe: tuple[int, ...]) -> list[str]:
    lines = ["| method | " + " | ".join(f"N={n}" for n in nfe) + " |", "|---" * (len(nfe) + 1) + "|"]
    for name, label in METHOD_LABELS.items():
        lines.append(
            f"| {label} | " + " | ".join(_fmt(agg["sampling"][name][str(n)][metric]) for n in nfe) + " |"
        )
    return lines


def markdown(agg: dict, cfg, wall_s: float, command: str) -> str:
    nfe = cfg.nfe
    out = [
        "# Any-step claim at small scale — results",
        "",
        f"Command: `{command}`  ",
        f"Seeds: {list(cfg.seeds)}; values are mean ± std over seeds; total wall time {wall_s / 60:.1f} min.",
        "",
        "## Coupled error (mean L2 to the teacher's CFG-3 1000-step Euler endpoint from the same noise)",
        *_sampling_table(agg, "coupled", nfe),
        "",
        "## Energy distance to held-out data (class-conditional, averaged over classes)",
        f"Floors: data vs data {_fmt(agg['floors']['ed_data_vs_data'])}; teacher CFG-3 reference vs data "
        f"{_fmt(agg['floors']['ed_ref_vs_data'])} (CFG sharpens the classes, so the guided target is not the data).",
        "",
        *_sampling_table(agg, "ed_data", nfe),
        "",
        "## Energy distance to the teacher's CFG-3 reference samples (same noise, diagonal pairs dropped)",
        *_sampling_table(agg, "ed_ref", nfe),
        "",
        "## Instantaneous-field error E‖u(z,t,t) − v_teacher(z,t)‖² on the data path (σ = shift(U))",
        "| model | guided (vs teacher CFG 3) | guided, relative | unconditional (vs teacher v_∅) | uncond., relative |",
        "|---|---|---|---|---|",
    ]
    for name, label in FIELD_LABELS.items():
        f = agg["field"][name]
        out.append(
            f"| {label} | {_fmt(f['guided_mse'])} | {_fmt(f['guided_rel'])} | {_fmt(f['uncond_mse'])} | {_fmt(f['uncond_rel'])} |"
        )
    steps = cfg.rollout_steps
    out += [
        "",
        "## FMBS fidelity (relative L2; averaged over k ∈ evenly spaced {1..N−1})",
        "State: one prefix shortcut σ_0→σ_k vs k explicit flow-map Euler steps. "
        "Final: FMBS output vs the full N-step rollout.",
        "",
        "| model | "
        + " | ".join(f"state N={n}" for n in steps)
        + " | "
        + " | ".join(f"final N={n}" for n in steps)
        + " |",
        "|---" * (2 * len(steps) + 1) + "|",
    ]
    for name in ("init", "flowmap", "anyflow"):
        f = agg["fmbs"][name]
        out.append(
            f"| {FIELD_LABELS[name]} | "
            + " | ".join(_fmt(f[str(n)]["state_rel"]) for n in steps)
            + " | "
            + " | ".join(_fmt(f[str(n)]["final_rel"]) for n in steps)
            + " |"
        )
    t = agg["timings_s"]
    out += ["", "Wall time per seed (s): " + ", ".join(f"{k} {_fmt(v)}" for k, v in t.items()), ""]
    return "\n".join(out)


def plot(agg: dict, per_seed: list[dict], cfg, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    nfe = list(cfg.nfe)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    panels = [
        ("coupled", "coupled L2 error to teacher CFG-3 ODE"),
        ("ed_data", "energy distance to held-out data"),
        ("ed_ref", "energy distance to teacher CFG-3 samples"),
    ]
    for ax, (metric, title) in zip(axes, panels, strict=True):
        for name, label in METHOD_LABELS.items():
            m = [agg["sampling"][name][str(n)][metric]["mean"] for n in nfe]
            s = [agg["sampling"][name][str(n)][metric]["std"] for n in nfe]
            ax.errorbar(nfe, m, yerr=s, marker="o", capsize=3, label=label)
        if metric == "ed_data":
            ax.axhline(
                agg["floors"]["ed_ref_vs_data"]["mean"],
                color="gray",
                ls="--",
                label="teacher 1000-step ref vs data",
            )
            ax.axhline(agg["floors"]["ed_data_vs_data"]["mean"], color="gray", ls=":", label="data vs data")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sampling steps N")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=7)
    fig.suptitle(f"Any-step toy (8-Gaussian ring, 4 bimodal classes), mean ± std over {len(per_seed)} seeds")
    fig.tight_layout()
    p1 = out / "anystep_vs_nfe.png"
    fig.savefig(p1, dpi=110)
    plt.close(fig)

    samples = per_seed[0]["samples"]
    shown = [n for n in (1, 4, 32) if n in nfe]
    fig, axes = plt.subplots(
        len(METHOD_LABELS), len(shown) + 1, figsize=(3.2 * (len(shown) + 1), 3.2 * len(METHOD_LABELS))
    )
    for i, name in enumerate(METHOD_LABELS):
        for j, n in enumerate(shown):
            pts = samples[f"{name}/{n}"]
            axes[i, j].scatter(pts[:, 0], pts[:, 1], s=2)
            axes[i, j].set_title(f"{name}, N={n}", fontsize=9)
        ref = samples["reference"] if i > 0 else samples["data"]
        axes[i, -1].scatter(ref[:, 0], ref[:, 1], s=2, color="k")
        axes[i, -1].set_title("held-out data" if i == 0 else "teacher CFG-3 1000-step ref", fontsize=9)
        for ax in axes[i]:
            ax.set_xlim(-3.2, 3.2)
            ax.set_ylim(-3.2, 3.2)
            ax.set_aspect("equal")
    fig.tight_layout()
    p2 = out / f"samples_seed{per_seed[0]['seed']}.png"
    fig.savefig(p2, dpi=80)
    plt.close(fig)
    return [p1, p2]


def write_outputs(per_seed: list[dict], cfg, out: Path, *, wall_s: float, command: str) -> list[Path]:
    import dataclasses

    out.mkdir(parents=True, exist_ok=True)
    stripped = [{k: v for k, v in r.items() if k != "samples"} for r in per_seed]
    agg = _aggregate([{k: v for k, v in r.items() if k != "seed"} for r in stripped])
    payload = {
        "command": command,
        "config": dataclasses.asdict(cfg),
        "wall_s": wall_s,
        "aggregate": agg,
        "per_seed": stripped,
    }
    pj = out / "results.json"
    pj.write_text(json.dumps(payload, indent=1))
    pm = out / "results.md"
    pm.write_text(markdown(agg, cfg, wall_s, command))
    return [pj, pm, *plot(agg, per_seed, cfg, out)]
