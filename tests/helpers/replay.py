"""Record a training run's random draws and replay them, batched, into a reference run.

Two runs that are the same computation on the same samples — A micro-batches (or W ranks) of b samples
against one batch of A·b — draw their random numbers in different shapes and order, so they can only be
compared on the same numbers. :class:`Recorder` intercepts the ``torch.randn`` / ``torch.rand`` calls
that pass an explicit ``generator`` (every random draw of the training maths does; docs/interfaces.md)
and files them in segments, one per batch taken from the loader (:class:`SegmentedBatches`).
:class:`Replayer` answers the reference run's draws: in its segment j, the i-th draw is the
concatenation, along the batch axis (the one axis whose size differs), of the i-th draws of the source
segments given for j. A draw that does not fit (another dtype, no batch axis, too many draws) is an
error, and :meth:`Replayer.check_consumed` fails if the reference made fewer draws than recorded.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

_ORIG = {"randn": torch.randn, "rand": torch.rand}


@contextmanager
def _patched(handler: Any) -> Iterator[None]:
    def make(kind: str) -> Any:
        def fn(*args: Any, **kwargs: Any) -> torch.Tensor:
            if kwargs.get("generator") is None:
                return _ORIG[kind](*args, **kwargs)
            return handler(kind, args, kwargs)

        return fn

    torch.randn, torch.rand = make("randn"), make("rand")
    try:
        yield
    finally:
        torch.randn, torch.rand = _ORIG["randn"], _ORIG["rand"]


class Recorder:
    def __init__(self) -> None:
        self.segments: list[list[tuple[str, torch.Tensor]]] = [[]]  # segment 0: draws before the first batch

    def new_segment(self) -> None:
        self.segments.append([])

    def _handle(self, kind: str, args: tuple, kwargs: dict) -> torch.Tensor:
        out = _ORIG[kind](*args, **kwargs)
        self.segments[-1].append((kind, out.detach().cpu().clone()))
        return out

    @contextmanager
    def active(self) -> Iterator[Recorder]:
        with _patched(self._handle):
            yield self


def _shape(args: tuple, kwargs: dict) -> tuple[int, ...]:
    size = kwargs.get("size", args[0] if len(args) == 1 and not isinstance(args[0], int) else args)
    return tuple(int(s) for s in size)


def _concat(parts: Sequence[torch.Tensor], want: tuple[int, ...]) -> torch.Tensor:
    shapes = [tuple(p.shape) for p in parts]
    axes = [
        d
        for d in range(len(want))
        if all(len(s) == len(want) for s in shapes)
        and sum(s[d] for s in shapes) == want[d]
        and all(s[e] == want[e] for s in shapes for e in range(len(want)) if e != d)
    ]
    if len(axes) != 1:
        raise AssertionError(f"replay: cannot build a draw of shape {want} from recorded {shapes}")
    return torch.cat(list(parts), dim=axes[0])


class Replayer:
    """``groups[j]``: the source segments (lists of recorded draws) whose draws form reference segment j+1."""

    def __init__(self, groups: Sequence[Sequence[list[tuple[str, torch.Tensor]]]]) -> None:
        self.groups = [list(g) for g in groups]
        self.segment = 0  # reference draws before its first batch are not allowed
        self.used: dict[int, int] = {}

    def new_segment(self) -> None:
        self.segment += 1

    def _handle(self, kind: str, args: tuple, kwargs: dict) -> torch.Tensor:
        if self.segment == 0 or self.segment > len(self.groups):
            raise AssertionError(f"replay: unexpected draw in reference segment {self.segment}")
        i = self.used.get(self.segment, 0)
        self.used[self.segment] = i + 1
        parts = []
        for src in self.groups[self.segment - 1]:
            if i >= len(src):
                raise AssertionError(
                    f"replay: reference segment {self.segment} makes more than {len(src)} draws"
                )
            k, t = src[i]
            if k != kind:
                raise AssertionError(f"replay: draw {i} of segment {self.segment} is {kind}, recorded {k}")
            parts.append(t)
        out = _concat(parts, _shape(args, kwargs))
        return out.to(device=kwargs.get("device") or "cpu", dtype=kwargs.get("dtype") or out.dtype)

    def check_consumed(self) -> None:
        for j, group in enumerate(self.groups, start=1):
            want = {len(src) for src in group}
            assert len(want) == 1, (
                f"replay: source segments of reference segment {j} differ in draw count {want}"
            )
            assert self.used.get(j, 0) == want.pop(), (
                f"replay: reference segment {j} used {self.used.get(j, 0)} draws"
            )

    @contextmanager
    def active(self) -> Iterator[Replayer]:
        with _patched(self._handle):
            yield self


class SegmentedBatches:
    """A batch iterator that opens a new draw segment on ``log`` before each batch (resumable by position)."""

    def __init__(self, batches: Any, log: Recorder | Replayer, keep: list | None = None) -> None:
        self.it, self.log, self.keep = batches, log, keep

    def __iter__(self) -> SegmentedBatches:
        return self

    def __next__(self) -> dict[str, Any]:
        self.log.new_segment()
        batch = next(self.it)
        if self.keep is not None:
            self.keep.append({k: (v.clone() if torch.is_tensor(v) else v) for k, v in batch.items()})
        return batch

    def state_dict(self) -> dict[str, Any]:
        return self.it.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.it.load_state_dict(state)


class ListBatches:
    """Batches from a list, with the ``state_dict`` protocol of the dataset loader."""

    def __init__(self, batches: Sequence[dict[str, Any]]) -> None:
        self.batches, self.pos = list(batches), 0

    def __iter__(self) -> ListBatches:
        return self

    def __next__(self) -> dict[str, Any]:
        batch = self.batches[self.pos]
        self.pos += 1
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pos = int(state["pos"])


def concat_batches(parts: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One batch of the samples of ``parts`` in order."""
    out: dict[str, Any] = {}
    for k in parts[0]:
        vals = [p[k] for p in parts]
        out[k] = torch.cat(vals) if torch.is_tensor(vals[0]) else [x for v in vals for x in v]
    return out


@contextmanager
def record_optimizer_grads(into: list[list[torch.Tensor]]) -> Iterator[None]:
    """Append, at every ``AdamW.step``, the gradients it applies (after reduction and clipping)."""
    orig = torch.optim.AdamW.step

    def step(self: torch.optim.AdamW, *args: Any, **kwargs: Any) -> Any:
        into.append(
            [
                torch.zeros(p.shape) if p.grad is None else p.grad.detach().cpu().clone()
                for g in self.param_groups
                for p in g["params"]
            ]
        )
        return orig(self, *args, **kwargs)

    torch.optim.AdamW.step = step  # type: ignore[method-assign]
    try:
        yield
    finally:
        torch.optim.AdamW.step = orig  # type: ignore[method-assign]


def record_step_metrics(method: Any) -> list[dict[str, float]]:
    """Wrap ``method.train_step`` so every step's metrics are appended to the returned list."""
    metrics: list[dict[str, float]] = []
    inner = method.train_step

    def train_step(ctx: Any, step: int) -> dict[str, float]:
        out = inner(ctx, step)
        metrics.append(dict(out))
        return out

    method.train_step = train_step
    return metrics
