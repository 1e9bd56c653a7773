"""One frozen base transformer with named LoRA adapters (the on-policy memory design).

Teacher (real score), critic (fake score) and generator differ only by LoRA adapters (and the
generator's delta embedder, which is the identity at r = t, docs/method.md §2.2). So instead of three full
copies of a 1.3B/14B transformer we hold one frozen AnyFlow base and switch adapters per call.

Gradient checkpointing recomputes a block's forward during backward, with whatever adapter is active
*then*. :meth:`AdapterModel.backward` therefore re-activates the adapter that built the graph before
calling backward; ``tests/test_train_adapters.py`` checks the gradients equal those of separate copies.

Extra trainable tensors. The causal generator also trains ``far_patch_embedding`` in full (docs/method.md
§8.1). An adapter may own such base parameters (``extra=("far_patch_embedding",)``): it gets its own
copy, swapped into the module when the adapter is activated, so several generators (e.g. the flow map
and the distilled model in one evaluation) can share the base. Their tensors travel with the adapter
in :meth:`state` / :meth:`params` under their module names (``far_patch_embedding.weight``).

A FAR base (``AnyFlowFARTransformer3DModel``) is called as the bidirectional model by :meth:`fn` (one
chunk over the whole clip, which equals Wan at r = t); the causal generator paths call
:attr:`transformer` directly after :meth:`activate`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn

from anyflow.models import lora
from anyflow.models.callable import flowmap_fn
from anyflow.rollout import FlowMapFn


class AdapterModel:
    def __init__(self, transformer: nn.Module, *, rank: int, alpha: float, gradient_checkpointing: bool) -> None:
        self.transformer = transformer
        self.rank = rank
        self.alpha = alpha
        self.transformer.requires_grad_(False)
        if gradient_checkpointing:
            self.transformer.enable_gradient_checkpointing()
        if hasattr(transformer, "far_patch_embedding"):
            from anyflow.causal import far_bidirectional_fn

            self._base_fn = far_bidirectional_fn(transformer)
        else:
            self._base_fn = flowmap_fn(transformer)
        self._extra: dict[str, dict[str, nn.Parameter]] = {}  # adapter -> {param name: its own copy}
        self._extra_trainable: dict[str, bool] = {}
        self._base_extra: dict[str, nn.Parameter] = {}  # the base's own parameters of those modules

    @property
    def is_far(self) -> bool:
        return hasattr(self.transformer, "far_patch_embedding")

    def add(
        self, name: str, role: str, *, init: Mapping[str, torch.Tensor] | None = None, trainable: bool = True,
        extra: tuple[str, ...] = (),
    ) -> None:
        """Add adapter ``name`` for ``role`` (teacher/critic/generator targets, docs/method.md §2.3).

        ``requires_grad`` follows ``trainable`` whatever adapter is active (peft's switching would
        otherwise flip it). ``extra`` names base submodules whose parameters this adapter owns and
        trains in full (its own copy — fp32 if trainable, else the base's dtype — initialised from ``init``
        where given, else from the base).
        """
        init = dict(init) if init is not None else None
        own: dict[str, torch.Tensor] = {}

        def owned(key: str) -> bool:
            return any(key.startswith(module_name + ".") for module_name in extra)

        if init is not None:
            own = {k: init.pop(k) for k in list(init) if owned(k)}
            if extra and not own:
                raise KeyError(f"adapter {name!r}: init has no tensors for its extra modules {list(extra)} (a checkpoint "
                               "of another variant or an older format?)")
        lora.add_lora(self.transformer, name, role, rank=self.rank, alpha=self.alpha, init_from=init, trainable=trainable)
        for p in lora.trainable_parameters(self.transformer, name).values():
            if p.dtype != torch.float32:  # bf16 base: keep the trained tensors (and Adam on them) in fp32
                p.data = p.data.float()
        if extra:
            params: dict[str, nn.Parameter] = {}
            for module_name in extra:
                module = self.transformer.get_submodule(module_name)
                for pname, p in module.named_parameters(recurse=False):
                    key = f"{module_name}.{pname}"
                    base = self._base_extra.setdefault(key, p)  # first sight: nothing swapped in yet, this is the base's
                    value = own.pop(key, None)
                    # trained: an fp32 master (GPU training runs under bf16 autocast); frozen: the base's dtype,
                    # so no-autocast inference (evaluate, sample) feeds the conv matching tensors
                    dtype = torch.float32 if trainable else base.dtype
                    value = base.detach() if value is None else value
                    params[key] = nn.Parameter(value.to(base.device, dtype).clone(), requires_grad=trainable)
            if own:
                raise KeyError(f"adapter {name!r}: unexpected extra tensors {sorted(own)}; it owns {list(params)}")
            self._extra[name] = params
            self._extra_trainable[name] = trainable
        for other, ps in self._extra.items():  # add_lora froze every non-LoRA parameter it could reach
            for p in ps.values():
                p.requires_grad_(self._extra_trainable[other])
        self._swap_extra(name)

    def _swap_extra(self, name: str | None) -> None:
        """Put adapter ``name``'s own extra parameters into the base modules (no copy); adapters without them
        (teacher, critic, the base itself) get the base's original parameters back."""
        mine = self._extra.get(name, {})
        for key, base in self._base_extra.items():
            module_name, pname = key.rsplit(".", 1)
            self.transformer.get_submodule(module_name)._parameters[pname] = mine.get(key, base)

    @property
    def active(self) -> str | None:
        return lora.active_adapter(self.transformer)

    def activate(self, name: str | None) -> None:
        if name != self.active:
            lora.set_active_adapter(self.transformer, name)
            self._swap_extra(name)

    def fn(self, name: str | None, inner: FlowMapFn | None = None) -> FlowMapFn:
        """The model callable u(z, t, r, c) with adapter ``name`` active for each call: the base's own callable,
        or ``inner`` (another callable over :attr:`transformer`, e.g. the causal teacher-forced one)."""
        call = self._base_fn if inner is None else inner

        def u(z: torch.Tensor, t: torch.Tensor, r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
            self.activate(name)
            return call(z, t, r, c)

        return u

    def backward(self, name: str, loss: torch.Tensor, backward: Callable[[torch.Tensor], None]) -> None:
        """Backward with the adapter that built the graph active (checkpoint recomputation uses it)."""
        self.activate(name)
        backward(loss)

    def params(self, name: str) -> dict[str, nn.Parameter]:
        """The adapter's trainable tensors: LoRA (by full parameter name) and its extra parameters."""
        return {**lora.trainable_parameters(self.transformer, name), **self._extra.get(name, {})}

    def state(self, name: str) -> dict[str, torch.Tensor]:
        """The adapter as saved in checkpoints: LoRA keys without the adapter name, plus extra tensors."""
        out = dict(lora.adapter_state_dict(self.transformer, name))
        out.update({k: p.detach() for k, p in self._extra.get(name, {}).items()})
        return {k: v.detach().cpu().clone() for k, v in out.items()}

    @contextmanager
    def frozen_adapters_stored_in(self, dtype: torch.dtype) -> Iterator[None]:
        """Within the block, keep the LoRA tensors of every frozen adapter (the on-policy teacher) in ``dtype``.
        peft keeps adapters in fp32 over a bf16 base; a frozen one needs no fp32
        copy on the device while training. The original values are kept on the CPU and put back on exit.

        Only for code that calls the model under autocast to ``dtype`` (the training loop under bf16 mixed
        precision): autocast rounds each fp32 weight and input to ``dtype`` before the matmul, which is what
        storing them rounded does (peft casts the input to the LoRA weight's dtype), so outputs and gradients
        are bit for bit unchanged (``tests/test_train_resume.py``). Without autocast it would change them.
        """
        kept: list[tuple[nn.Parameter, torch.Tensor]] = []
        with torch.no_grad():
            for name in lora.adapter_names(self.transformer):
                if lora.is_trainable(self.transformer, name):
                    continue
                for p in lora.trainable_parameters(self.transformer, name).values():
                    if p.dtype != dtype:
                        kept.append((p, p.data.to("cpu", copy=True)))
                        p.data = p.data.to(dtype)
        try:
            yield
        finally:
            with torch.no_grad():
                for p, original in kept:
                    p.data = original.to(p.device)

    @torch.no_grad()
    def load_params(self, name: str, values: Mapping[str, torch.Tensor]) -> None:
        """Copy ``values`` (keyed like :meth:`params`, e.g. an EMA) into the adapter's parameters."""
        for k, p in self.params(name).items():
            p.copy_(values[k].to(p.dtype))
