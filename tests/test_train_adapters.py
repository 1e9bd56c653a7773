"""One frozen base with named adapters + gradient checkpointing gives the same generator gradients as
three separate model copies (issue 4, memory design)."""

from __future__ import annotations

import copy

import pytest
import torch

from anyflow.dmd import dmd_generator_loss
from anyflow.models import lora
from anyflow.models.convert import wan_to_anyflow
from anyflow.models.tiny import build_tiny_wan
from anyflow.rollout import fmbs_rollout
from anyflow.train.adapters import AdapterModel

ROLES = {"teacher": "teacher", "critic": "critic", "generator": "generator"}


def _random_adapter(model: torch.nn.Module, name: str, seed: int) -> dict[str, torch.Tensor]:
    """A non-trivial adapter state (peft starts lora_B at zero, which would make every adapter equal)."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.2 for k, v in lora.adapter_state_dict(model, name).items()}


def _inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 4, 4, 4, generator=g)
    c = torch.randn(2, 16, 32, generator=g)
    c_neg = torch.randn(1, 16, 32, generator=g)
    return z, c, c_neg


def _generator_grads(get_fn, backward_adapter, models_for_grad) -> dict[str, torch.Tensor]:
    z, c, c_neg = _inputs()
    x_hat, info = fmbs_rollout(get_fn("generator"), z, c, 8, 3)
    assert info.calls == 3
    loss, _ = dmd_generator_loss(x_hat, get_fn("teacher"), get_fn("critic"), c, c_neg, torch.Generator().manual_seed(1))
    backward_adapter(loss)
    params = models_for_grad()
    assert all(p.grad is not None for p in params.values())
    return {lora_key(k): p.grad.clone() for k, p in params.items()}


def lora_key(name: str) -> str:
    return name.replace(".generator.", ".")


@pytest.fixture(scope="module")
def base_and_states():
    base = wan_to_anyflow(build_tiny_wan(0)).eval()
    probe = copy.deepcopy(base)
    states = {}
    for i, (name, role) in enumerate(ROLES.items()):
        lora.add_lora(probe, name, role, rank=2, alpha=2.0)
        states[name] = _random_adapter(probe, name, seed=10 + i)
    return base, states


def test_adapter_switching_with_checkpointing_equals_separate_copies(base_and_states):
    base, states = base_and_states
    shared = AdapterModel(copy.deepcopy(base), rank=2, alpha=2.0, gradient_checkpointing=True)
    for name, role in ROLES.items():
        shared.add(name, role, init=states[name], trainable=name != "teacher")
    assert shared.transformer.gradient_checkpointing
    g_shared = _generator_grads(
        shared.fn, lambda loss: shared.backward("generator", loss, torch.autograd.backward),
        lambda: shared.params("generator"),
    )

    copies = {}
    for name, role in ROLES.items():
        m = AdapterModel(copy.deepcopy(base), rank=2, alpha=2.0, gradient_checkpointing=False)
        m.add(name, role, init=states[name], trainable=name == "generator")
        copies[name] = m
    g_sep = _generator_grads(
        lambda name: copies[name].fn(name), lambda loss: loss.backward(), lambda: copies["generator"].params("generator")
    )
    assert g_shared.keys() == g_sep.keys() and len(g_shared) > 0
    for k in g_shared:
        torch.testing.assert_close(g_shared[k], g_sep[k], rtol=1e-5, atol=1e-7, msg=k)
    # the shared model holds one base: parameters counted once, adapters on top
    n_shared = sum(p.numel() for p in shared.transformer.parameters())
    n_copies = sum(p.numel() for m in copies.values() for p in m.transformer.parameters())
    assert n_shared < n_copies / 2


def test_backward_under_the_wrong_adapter_changes_gradients(base_and_states):
    """Negative control: checkpoint recomputation really uses the adapter active at backward time."""
    base, states = base_and_states
    shared = AdapterModel(copy.deepcopy(base), rank=2, alpha=2.0, gradient_checkpointing=True)
    for name, role in ROLES.items():
        shared.add(name, role, init=states[name], trainable=name != "teacher")
    right = _generator_grads(
        shared.fn, lambda loss: shared.backward("generator", loss, torch.autograd.backward),
        lambda: shared.params("generator"),
    )
    for p in shared.params("generator").values():
        p.grad = None
    wrong = _generator_grads(
        shared.fn, lambda loss: shared.backward("critic", loss, torch.autograd.backward),
        lambda: shared.params("generator"),
    )
    assert any(not torch.allclose(right[k], wrong[k], rtol=1e-3, atol=1e-6) for k in right)
