"""LoRA through peft: target modules per role, frozen base, named adapters, save/load, merge."""

from __future__ import annotations

import copy

import pytest
import torch

from anyflow.models import lora
from anyflow.models.callable import flowmap_fn
from anyflow.models.convert import wan_to_anyflow
from anyflow.models.tiny import build_tiny_wan

NUM_LAYERS = 2


def _expected_modules(role: str) -> set[str]:
    # Written out from docs/method.md §2.3, independently of lora.py's substring lists.
    names = set()
    for i in range(NUM_LAYERS):
        for leaf in ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "ffn.net.0.proj", "ffn.net.2"):
            names.add(f"blocks.{i}.{leaf}")
    if role == "generator":
        for emb in ("time_embedder", "delta_embedder"):
            names |= {f"condition_embedder.{emb}.linear_1", f"condition_embedder.{emb}.linear_2"}
    return names


def _param_names(modules: set[str], adapter: str) -> set[str]:
    return {f"{m}.lora_{ab}.{adapter}.weight" for m in modules for ab in ("A", "B")}


def _base() -> torch.nn.Module:
    return wan_to_anyflow(build_tiny_wan(seed=0))


def _random_state(model, name: str, seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {k: 0.3 * torch.randn(v.shape, generator=gen) for k, v in lora.adapter_state_dict(model, name).items()}


@pytest.fixture(scope="module")
def inputs():
    gen = torch.Generator().manual_seed(7)
    z = torch.randn(2, 2, 4, 4, 4, generator=gen)
    t = torch.tensor([[800.0, 800.0], [300.0, 300.0]])
    r = torch.tensor([[400.0, 400.0], [100.0, 100.0]])
    c = torch.randn(2, 5, 32, generator=gen)
    return z, t, r, c


def _run(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return flowmap_fn(model)(*inputs)


def test_target_modules_per_role():
    model = _base()
    assert set(lora.lora_target_modules(model, "teacher")) == _expected_modules("teacher")
    assert set(lora.lora_target_modules(model, "critic")) == _expected_modules("teacher")
    assert set(lora.lora_target_modules(model, "generator")) == _expected_modules("generator")
    assert not any("attn2" in n for n in lora.lora_target_modules(model, "generator"))
    with pytest.raises(ValueError, match="role"):
        lora.lora_target_modules(model, "student")


def test_trainable_parameters_and_frozen_base():
    model = _base()
    lora.add_lora(model, "teacher", "teacher", rank=4, alpha=4, trainable=False)
    lora.add_lora(model, "generator", "generator", rank=4, alpha=8)
    # Names survive the peft wrapping (no '.base_layer' / 'lora_A' leaks into the target list).
    assert set(lora.lora_target_modules(model, "generator")) == _expected_modules("generator")
    assert set(lora.trainable_parameters(model, "teacher")) == _param_names(_expected_modules("teacher"), "teacher")
    assert set(lora.trainable_parameters(model, "generator")) == _param_names(
        _expected_modules("generator"), "generator"
    )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == _param_names(_expected_modules("generator"), "generator")
    # peft's set_adapter would make the active adapter trainable and freeze the others; ours keeps flags.
    lora.set_active_adapter(model, "teacher")
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    lora.set_active_adapter(model, None)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    lora.set_trainable(model, "teacher", True)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable | set(
        lora.trainable_parameters(model, "teacher")
    )


def test_optimizer_step_changes_only_the_adapter(inputs):
    model = _base()
    lora.add_lora(model, "teacher", "teacher", rank=4, alpha=4, trainable=False)
    lora.load_adapter_state_dict(model, "teacher", _random_state(model, "teacher", 1))
    lora.add_lora(model, "generator", "generator", rank=4, alpha=4)
    lora.load_adapter_state_dict(model, "generator", _random_state(model, "generator", 2))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    params = lora.trainable_parameters(model, "generator")
    opt = torch.optim.SGD(params.values(), lr=0.1)
    lora.set_active_adapter(model, "generator")
    loss = flowmap_fn(model)(*inputs).square().mean()
    loss.backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == set(params)  # every generator LoRA tensor moved (B and A are both non-zero)
    assert all(p.grad is None for n, p in model.named_parameters() if n not in params)


def test_two_adapters_switch(inputs):
    model = _base()
    base_out = _run(model, inputs)
    lora.add_lora(model, "teacher", "teacher", rank=4, alpha=4)
    assert torch.equal(_run(model, inputs), base_out)  # new adapter: B = 0, so it starts as the base
    lora.load_adapter_state_dict(model, "teacher", _random_state(model, "teacher", 1))
    critic_init = _random_state(model, "teacher", 2)  # same role targets and rank: valid critic weights
    lora.add_lora(model, "critic", "critic", rank=4, alpha=4, init_from=critic_init)
    critic_state = lora.adapter_state_dict(model, "critic")
    assert critic_state.keys() == critic_init.keys()
    assert all(torch.equal(critic_state[k], critic_init[k]) for k in critic_init)
    lora.set_active_adapter(model, "teacher")
    out_teacher = _run(model, inputs)
    lora.set_active_adapter(model, "critic")
    assert lora.active_adapter(model) == "critic"
    out_critic = _run(model, inputs)
    assert (out_teacher - out_critic).abs().max() > 1e-3
    assert (out_teacher - base_out).abs().max() > 1e-3
    lora.set_active_adapter(model, "teacher")
    assert torch.equal(_run(model, inputs), out_teacher)
    lora.set_active_adapter(model, None)
    assert torch.equal(_run(model, inputs), base_out)
    with pytest.raises(KeyError, match="student"):
        lora.set_active_adapter(model, "student")


def test_adapter_matches_manual_low_rank_update(inputs):
    # Independent reference: W + (alpha/r)·B·A written into a plain converted model by hand.
    model = _base()
    reference = copy.deepcopy(model)
    lora.add_lora(model, "g", "generator", rank=3, alpha=6)
    state = _random_state(model, "g", 5)
    lora.load_adapter_state_dict(model, "g", state)
    modules = dict(reference.named_modules())
    with torch.no_grad():
        for name in _expected_modules("generator"):
            a, b = state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"]
            modules[name].weight += (6 / 3) * b @ a
    expected = _run(reference, inputs)
    assert torch.allclose(_run(model, inputs), expected, atol=1e-5, rtol=1e-5)
    merged = lora.merge_adapter(model, "g")
    assert not any("lora" in n for n, _ in merged.named_parameters())
    assert type(merged) is type(model) and not any(p.requires_grad for p in merged.parameters())
    assert torch.allclose(_run(merged, inputs), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(merged.state_dict()["blocks.0.attn2.to_q.weight"], reference.blocks[0].attn2.to_q.weight)
    lora.set_active_adapter(model, None)  # merging did not touch the source model
    assert torch.equal(_run(model, inputs), _run(_base(), inputs))


def test_save_load_round_trip(tmp_path, inputs):
    model = _base()
    lora.add_lora(model, "generator", "generator", rank=4, alpha=8)
    lora.load_adapter_state_dict(model, "generator", _random_state(model, "generator", 9))
    out = _run(model, inputs)
    path = tmp_path / "adapters" / "generator.safetensors"
    lora.save_adapter(model, "generator", path)

    fresh = _base()
    lora.add_lora(fresh, "teacher", "teacher", rank=4, alpha=4, trainable=False)
    lora.load_adapter(fresh, "gen2", path)
    saved = lora.adapter_state_dict(model, "generator")
    loaded = lora.adapter_state_dict(fresh, "gen2")
    assert saved.keys() == loaded.keys() and all(torch.equal(saved[k], loaded[k]) for k in saved)
    lora.set_active_adapter(fresh, "gen2")
    assert torch.equal(_run(fresh, inputs), out)
    assert set(lora.trainable_parameters(fresh, "gen2")) == {n for n, p in fresh.named_parameters() if p.requires_grad}

    teacher_state = lora.adapter_state_dict(fresh, "teacher")
    with pytest.raises(ValueError, match="missing"):
        lora.load_adapter_state_dict(fresh, "teacher", saved)  # generator keys into a teacher adapter
    assert all(torch.equal(v, lora.adapter_state_dict(fresh, "teacher")[k]) for k, v in teacher_state.items())
    with pytest.raises(ValueError, match="already exists"):
        lora.add_lora(fresh, "teacher", "teacher", rank=4, alpha=4)
