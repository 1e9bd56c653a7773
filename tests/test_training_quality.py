"""Does training move the model the way METHOD.md §6–§7 says? (issue 4, training-quality checks)

Everything is built here in code, seeds fixed, single-threaded (the tiny model is op-overhead bound):

* **Data.** 2 prompts over a (1, 4, 4, 4) latent, each a Gaussian mixture with modes ±p_k or +p_k. The
  negative/null prompt is the zero embedding (text dropout 0.1 trains it).
* **Base.** The tiny ``WanTransformer3DModel`` pre-trained here by plain flow matching on that data
  (stands in for a pre-trained Wan), then converted with ``wan_to_anyflow``: the "untrained converted
  model".
* **Teacher reference.** The forward loss (§6.2) targets the flow map of the CFG-fused field
  ``v_∅ + g·(v_c − v_∅)`` of the data; the data-trained field we have is the base, so the reference is
  100 Euler steps of the base with CFG g. The baseline sampler is the untrained converted model with
  the same CFG at N steps (2N NFE; the students use N).
* **Stage 1.** ``FlowMapMethod`` + ``fit`` (LoRA rank 8 on the converted base, fused CFG g = 2, shift 1:
  a 64-dim toy needs no high-noise shift); the EMA is evaluated.
* **Stage 2.** ``OnPolicyMethod`` + ``fit`` from the stage-1 EMA, N ~ U{2, 4, 8, 16, 50}; teacher = the
  base (zero LoRA), critic from the teacher, ``real_guidance_scale = g − 1`` so the DMD real score uses
  the same CFG scale g as the reference (§7.3 writes it as x0_c + w·(x0_c − x0_∅), i.e. scale 1 + w).

Which metric for which stage, and why two toys:

* Stage 1 is judged by the **coupled error** (MSE to the reference endpoint from the same noise), as the
  issue asks, on **one mode per prompt** (std 0.3). With two modes per prompt the coupled error is
  dominated by samples near the boundary between the modes that land on the other mode: measured on
  the bimodal toy, the stage-1 student's 50-step samples were 0.19 (coupled MSE) from the reference while
  their distribution matched it to the estimator's noise (energy distance 0.07 vs 0.06 between two
  reference sets), and whether N = 2 beat the baseline by 10 % flipped with the evaluation seed.
* Stage 2 (DMD) matches **distributions**, not the noise→sample coupling, so it is judged by the energy
  distance to an independent set of reference samples (per prompt, 512 samples), on the **bimodal** toy
  where few-step samplers visibly fail (1-step Euler lands between the modes). Its coupled error is
  printed, not asserted. The estimator's own noise is measured as the energy distance between two
  reference sets from independent noise.

Measured (this file's seeds, one thread; 2026-11-27):

* stage 1, coupled MSE, N = 1 / 2 / 4 / 16 / 50 — converted+CFG 0.657 0.038 0.011 0.0004 0.0000 ·
  flow-map 0.085 0.011 0.0069 0.0048 0.0043.
* stage 2, energy distance — flow-map 1.077 0.128 0.044 0.017 0.012 · on-policy 0.540 0.105 0.056
  0.018 0.021; reference-vs-reference 0.034. Coupled MSE (printed) gets worse, 0.27 → 0.31 at N = 2.
  With other seeds for the evaluation set and the on-policy data (512 samples each): N = 1 0.59 vs 1.20
  and 0.49 vs 1.00, N = 2 0.195 vs 0.251 and 0.065 vs 0.114, N = 4 0.143 vs 0.148 and 0.033 vs 0.030.
* Only N = 1 improves reliably on this toy, and only that is asserted as an improvement. A sweep (17
  settings: more on-policy steps, more critic updates, higher lr, N lists restricted to {1, 2, 4}, no
  guidance, a shorter stage 1, four modes per prompt, other seeds) found on-policy better at N = 1 in
  every run; with 2,048 evaluation samples (reference-vs-reference 0.003–0.018) it was worse than stage 1
  at N = 2 in 5 of 8 runs and never better at N = 4 beyond the noise; with four modes per prompt N = 4
  improved on two seeds (0.292 → 0.166, 0.167 → 0.047) and regressed on others (0.175 → 0.336). The energy distance here is dominated by how
  samples split between a prompt's two modes (a split error δ costs ≈ 24·δ²): on-policy training does
  cut the samples stranded between the modes at N = 4 (e.g. 8–14 % → 3–7 %), but every run also moved
  the split by 2–12 %, which costs more. So N = 2 / 4 / 16 / 50 are asserted as "not worse than 1.5×
  stage 1 plus the estimator's noise". Showing the N = 2–4 gain needs a toy whose mode weights the
  models cannot shift, or the split and the stranded share scored separately; not done.
"""

from __future__ import annotations

import tempfile

import pytest
import torch

from anyflow.analytic import GaussianMixture
from anyflow.config import DistillStage, FlowMapStage, LossConfig, OptimConfig, TrainConfig
from anyflow.eval.metrics import energy_distance
from anyflow.flowmap import flow_matching_loss
from anyflow.models.callable import velocity_fn_wan
from anyflow.models.convert import wan_to_anyflow
from anyflow.models.tiny import _redraw_parameters, tiny_transformer_config
from anyflow.rollout import flowmap_euler_sample
from anyflow.train.adapters import AdapterModel
from anyflow.train.loop import fit
from anyflow.train.methods import FlowMapMethod, OnPolicyMethod

pytestmark = pytest.mark.slow

ITEM, K, L, D = (1, 4, 4, 4), 2, 2, 32
G, SHIFT = 2.0, 1.0
NS = (1, 2, 4, 16, 50)
REFERENCE_STEPS = 100
PRETRAIN_STEPS, FLOWMAP_STEPS, ONPOLICY_STEPS = 400, 300, 200


class _Toy:
    """Prompt k owns the modes +p_k (and −p_k if ``bimodal``) with the given std."""

    def __init__(self, *, bimodal: bool, std: float) -> None:
        gen = torch.Generator().manual_seed(0)
        pat = torch.randn((K, 1, 4, 1, 1), generator=gen).expand((K, *ITEM)).clone()
        pat = pat / pat.flatten(1).norm(dim=1).view(-1, 1, 1, 1, 1) * 6.0
        modes = torch.stack([pat, -pat], dim=1) if bimodal else pat[:, None]  # (K, modes, *ITEM)
        self.mix = [GaussianMixture(modes[k], std=std) for k in range(K)]
        self.emb = torch.randn(K, L, D, generator=gen)
        self.neg = torch.zeros(1, L, D)

    def batch(self, n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lab = torch.randint(K, (n,), generator=g)
        x = torch.empty((n, *ITEM))
        for k in range(K):
            idx = (lab == k).nonzero().flatten()
            if len(idx):
                x[idx] = self.mix[k].sample(len(idx), g)[0]
        return x, self.emb[lab], lab


class _Batches:
    """Endless procedural batches in the loader contract of ``fit`` (state_dict / load_state_dict)."""

    def __init__(self, toy: _Toy, batch_size: int, seed: int) -> None:
        self.toy, self.bs, self.g, self.n = toy, batch_size, torch.Generator().manual_seed(seed), 0

    def __iter__(self) -> _Batches:
        return self

    def __next__(self) -> dict:
        x, c, _ = self.toy.batch(self.bs, self.g)
        self.n += 1
        return {"latents": x, "text": c}

    def state_dict(self) -> dict:
        return {"n": self.n}

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError("the quality test never resumes")


def _pretrained_wan(toy: _Toy):
    from diffusers import WanTransformer3DModel

    wan = WanTransformer3DModel(**tiny_transformer_config())
    _redraw_parameters(wan, 0)
    wan.train()
    opt = torch.optim.AdamW(wan.parameters(), lr=3e-3)
    g, v = torch.Generator().manual_seed(1), velocity_fn_wan(wan)
    for _ in range(PRETRAIN_STEPS):
        x, c, _ = toy.batch(64, g)
        loss, _ = flow_matching_loss(v, x, c, g, shift=SHIFT, c_neg=toy.neg, text_dropout=0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return wan.eval().requires_grad_(False)


def _train(steps: int) -> TrainConfig:
    return TrainConfig(steps=steps, batch_size=32, seed=0, ema_decay=0.9, ema_warmup_step=steps // 2,
                       checkpoint_every=10**9, log_every=10**9, mixed_precision="no")


def _cfg(fn, neg: torch.Tensor):
    """The converted model as a guided instantaneous-velocity sampler (2 NFE per step)."""

    def u(z, t, r, c):
        un = fn(z, t, t, neg.expand_as(c))
        return un + G * (fn(z, t, t, c) - un)

    return u


def _sample(u, z: torch.Tensor, c: torch.Tensor, n: int, **kw) -> torch.Tensor:
    with torch.no_grad():
        return flowmap_euler_sample(u, z, c, n, shift=SHIFT, **kw)


def _stage1(toy: _Toy, wan) -> AdapterModel:
    loss = LossConfig(shift=SHIFT, guidance_scale=G, text_dropout=0.1)
    student = AdapterModel(wan_to_anyflow(wan).eval(), rank=8, alpha=8.0, gradient_checkpointing=False)
    st = FlowMapStage(train=_train(FLOWMAP_STEPS), optim=OptimConfig(lr=1e-3, beta1=0.9, beta2=0.99), loss=loss)
    with tempfile.TemporaryDirectory() as work:
        r1 = fit(FlowMapMethod(student, st, toy.neg), st.train, _Batches(toy, 32, 5), work_dir=work, progress=False)
    student.load_params("generator", r1.ema)
    return student


def _print(title: str, rows: dict[str, dict[int, float]]) -> None:
    print(f"\n{title}")
    for name, row in rows.items():
        print(f"  {name:14s} " + "  ".join(f"N={n}: {v:.4f}" for n, v in row.items()))


def _single_threaded(run):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return run()
    finally:
        torch.set_num_threads(threads)


def _setup(*, bimodal: bool, std: float):
    """Toy, pre-trained base, 512 evaluation prompts/labels/noises, the stage-1 student, the guided base
    sampler and its 100-step reference endpoints from that noise."""
    toy = _Toy(bimodal=bimodal, std=std)
    wan = _pretrained_wan(toy)
    ge = torch.Generator().manual_seed(123)
    _, c, lab = toy.batch(512, ge)
    z = torch.randn((512, *ITEM), generator=ge)
    student = _stage1(toy, wan)
    base = _cfg(student.fn(None), toy.neg)
    ref = _sample(base, z, c, REFERENCE_STEPS, use_mean_velocity=False)
    return toy, wan, c, lab, z, student, base, ref


@pytest.fixture(scope="module")
def stage1_coupled() -> dict[str, dict[int, float]]:
    """Coupled MSE to the teacher reference on the one-mode-per-prompt toy."""

    def run():
        _, _, c, _, z, student, base, ref = _setup(bimodal=False, std=0.3)

        def coupled(u):
            return {n: float(((_sample(u, z, c, n) - ref) ** 2).mean()) for n in NS}

        out = {"converted_cfg": coupled(base), "flowmap": coupled(student.fn("generator"))}
        _print("stage 1, one mode per prompt: coupled MSE to the base+CFG 100-step endpoint", out)
        return out

    return _single_threaded(run)


@pytest.fixture(scope="module")
def stage2_energy() -> dict[str, dict[int, float]]:
    """Energy distance to independent teacher samples on the bimodal toy (and the estimator's noise)."""

    def run():
        toy, wan, c, lab, z, student, base, ref = _setup(bimodal=True, std=0.1)  # ref: same noise (coupled)
        z_ref = torch.randn((512, *ITEM), generator=torch.Generator().manual_seed(999))
        ref2 = _sample(base, z_ref, c, REFERENCE_STEPS, use_mean_velocity=False)  # independent: energy

        def energy(x, y):
            return sum(energy_distance(x[lab == k], y[lab == k]) for k in range(K)) / K

        def rows(u):
            xs = {n: _sample(u, z, c, n) for n in NS}
            return ({n: energy(x, ref2) for n, x in xs.items()}, {n: float(((x - ref) ** 2).mean()) for n, x in xs.items()})

        out, coupled = {}, {}
        out["flowmap"], coupled["flowmap"] = rows(student.fn("generator"))

        onp = AdapterModel(wan_to_anyflow(wan).eval(), rank=8, alpha=8.0, gradient_checkpointing=False)
        onp.add("zero", "teacher")
        teacher = onp.state("zero")  # lora_B = 0: the teacher adapter is the base itself
        loss = LossConfig(shift=SHIFT, guidance_scale=G, text_dropout=0.1)
        dopt = OptimConfig(lr=3e-4, beta1=0.0, beta2=0.999)
        ds = DistillStage(train=_train(ONPOLICY_STEPS), generator_optim=dopt, critic_optim=dopt, loss=loss,
                          real_guidance_scale=G - 1.0)
        m2 = OnPolicyMethod(onp, ds, toy.neg, teacher=teacher, generator=student.state("generator"))
        with tempfile.TemporaryDirectory() as work:
            r2 = fit(m2, ds.train, _Batches(toy, 32, 7), work_dir=work, progress=False)
        onp.load_params("generator", r2.ema)
        out["onpolicy"], coupled["onpolicy"] = rows(onp.fn("generator"))
        out["noise"] = {0: abs(energy(ref, ref2))}
        _print("stage 2, two modes per prompt: energy distance to independent base+CFG 100-step samples", out)
        _print("(coupled MSE, not asserted: DMD does not keep the noise->sample coupling)", coupled)
        return out

    return _single_threaded(run)


def test_flowmap_training_reduces_coupled_error_at_one_two_four_steps(stage1_coupled) -> None:
    base, fm = stage1_coupled["converted_cfg"], stage1_coupled["flowmap"]
    for n in (1, 2, 4):  # the student uses N NFE, the guided baseline 2N
        assert fm[n] < 0.8 * base[n], (n, stage1_coupled)


def test_onpolicy_improves_one_step(stage2_energy) -> None:
    fm, op = stage2_energy["flowmap"], stage2_energy["onpolicy"]
    assert op[1] < 0.7 * fm[1], stage2_energy


def test_onpolicy_keeps_two_four_and_many_step_quality(stage2_energy) -> None:
    fm, op, noise = stage2_energy["flowmap"], stage2_energy["onpolicy"], stage2_energy["noise"][0]
    for n in (2, 4, 16, 50):  # a 1.5x regression beyond the estimator's noise fails (5x at N=16 would)
        assert op[n] <= 1.5 * fm[n] + noise, (n, stage2_energy)
