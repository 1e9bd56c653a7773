"""A stage's own progress as one compact, parseable line (issue 20, item 5).

Long stages (training, the evaluation sweep, data preparation) report where they are with
:class:`Progress`::

    [anyflow] evaluate: sweep 4/15 (flowmap NFE 4) · 12.3 s · ETA 34 s
    [anyflow] train_flowmap: step 17/24 (loss 1.23) · 20.1 s · ETA 8.3 s

``<stage>: <unit> <done>[/<total>] [(<detail>)] · <elapsed> [· ETA <remaining>]``; :data:`LINE` parses it.
On a terminal the line is rewritten in place (``\\r``); otherwise (a pipe, a pod's log, the KFP local
runner's subprocess) each report is a line of its own, at most one every ``interval`` seconds
(``$ANYFLOW_PROGRESS_INTERVAL``; default 10 s off a terminal, 0.5 s on one) plus the first and the
last, so a log stays short. ``anyflow run``'s progress view (``pipelines.local.ProgressLog``) shows
these lines from the components' output, in place on a terminal.

The ETA is the elapsed time scaled by the work left: ``elapsed · (1 − f) / f`` with ``f`` the fraction
done, in units of ``total`` or, where the items differ in cost (an NFE-8 sweep costs eight NFE-1 ones),
of the caller's ``total_work``.
"""

from __future__ import annotations

import os
import re
import sys
import time
from collections.abc import Callable
from typing import IO, Any

__all__ = ["INTERVAL_ENV", "LINE", "Progress", "format_duration", "parse"]

#: Seconds between two reports (a float); the default depends on the stream (module docstring).
INTERVAL_ENV = "ANYFLOW_PROGRESS_INTERVAL"
_DEFAULT_INTERVAL = {True: 0.5, False: 10.0}  # by stream.isatty()

#: One progress line (without a trailing newline or the ``\r`` of a terminal).
LINE = re.compile(
    r"\[anyflow\] (?P<stage>[\w.-]+): (?P<unit>[a-z][\w-]*) (?P<done>\d+)(?:/(?P<total>\d+))?"
    r"(?: \((?P<detail>[^()]*)\))? · (?P<elapsed>[0-9][^·]*?)(?: · ETA (?P<eta>[0-9][^·]*?))?\s*$"
)


def parse(line: str) -> dict[str, str] | None:
    """The fields of a progress line (``stage``, ``unit``, ``done``, ``total``, ``detail``, ``elapsed``,
    ``eta``; absent ones are ``None``), or ``None`` when ``line`` is no progress line."""
    m = LINE.search(line)
    return m.groupdict() if m else None


def format_duration(seconds: float) -> str:
    """``4.2 s``, ``42 s``, ``3 min 05 s``, ``2 h 07 min``."""
    s = max(0.0, float(seconds))
    if s < 10:
        return f"{s:.1f} s"
    if s < 60:
        return f"{s:.0f} s"
    if s < 3600:
        m, r = divmod(round(s), 60)
        return f"{m} min {r:02d} s"
    h, r = divmod(round(s) // 60, 60)
    return f"{h} h {r:02d} min"


class Progress:
    """Reports ``done``/``total`` items of a stage's work (module docstring).

    ``update(n, detail=..., work=...)`` advances by ``n`` items (0: a report within an item, e.g. a batch)
    and ``work`` units when ``total_work`` is set; ``close()`` reports the final state if it was not
    reported yet and ends the terminal line. ``enabled=False`` makes every call a no-op.
    ``stream`` defaults to ``sys.stderr`` at construction time.
    """

    def __init__(self, stage: str, total: int | None = None, *, unit: str = "step", start: int = 0,
                 enabled: bool = True, stream: IO[str] | None = None, interval: float | None = None,
                 total_work: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.stage, self.total, self.unit = stage, total, unit
        self.done = self._start = int(start)
        self.enabled = enabled
        self._stream = stream if stream is not None else sys.stderr
        self._tty = _isatty(self._stream)
        self._interval = _interval(interval, self._tty)
        self._total_work, self._work = total_work, 0.0
        self._clock = clock
        self._t0 = clock()
        self._last: float | None = None  # when the last report was written
        self._reported: tuple[int, float] | None = None  # (done, work) of that report
        self._detail: str | None = None
        self._width = 0  # of the line on the terminal, to blank a longer previous one

    @property
    def fraction(self) -> float | None:
        """The share of the work done (``None``: unknown total)."""
        if self._total_work:
            return min(1.0, self._work / self._total_work)
        if self.total is None or self.total <= self._start:
            return None
        return min(1.0, (self.done - self._start) / (self.total - self._start))

    def update(self, n: int = 1, *, detail: str | None = None, work: float = 0.0) -> None:
        if not self.enabled:
            return
        self.done += n
        self._work += work
        if detail is not None:
            self._detail = detail
        now = self._clock()
        final = self.total is not None and self.done >= self.total
        if self._last is None or final or now - self._last >= self._interval:
            self._report(now)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._reported != (self.done, self._work):
            self._report(self._clock())
        if self._tty and self._last is not None:
            self._stream.write("\n")
            self._stream.flush()
        self.enabled = False

    def line(self, now: float | None = None) -> str:
        """The progress line for the current state."""
        now = self._clock() if now is None else now
        elapsed = now - self._t0
        count = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
        text = f"[anyflow] {self.stage}: {self.unit} {count}"
        if self._detail:
            text += f" ({self._detail.replace('(', '[').replace(')', ']')})"
        text += f" · {format_duration(elapsed)}"
        f = self.fraction
        if f is not None and 0 < f < 1:
            text += f" · ETA {format_duration(elapsed * (1 - f) / f)}"
        elif f == 1:
            text += " · ETA 0.0 s"
        return text

    def _report(self, now: float) -> None:
        text = self.line(now)
        if self._tty:
            pad = max(0, self._width - len(text))
            self._stream.write("\r" + text + " " * pad)
            self._width = len(text)
        else:
            self._stream.write(text + "\n")
        self._stream.flush()
        self._last, self._reported = now, (self.done, self._work)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def _interval(given: float | None, tty: bool) -> float:
    if given is not None:
        return float(given)
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    if raw:
        try:
            return max(0.0, float(raw))
        except ValueError:
            pass  # a malformed value must not stop a stage: fall back to the default
    return _DEFAULT_INTERVAL[tty]
