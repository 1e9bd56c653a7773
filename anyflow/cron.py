"""Cron expressions for KFP recurring runs.

KFP's scheduler (robfig/cron) takes **six fields with seconds first**: ``sec min hour dom month dow``
(``0 0 3 * * *`` = daily at 03:00). People usually write the five-field form (``0 3 * * *``); this
module accepts both (and ``@daily``-style macros), validates every field with a one-sentence error,
converts to KFP's form, and lists the next fire times (via ``croniter``, seconds first).
"""

from __future__ import annotations

import re
from datetime import datetime, timezone

FIELDS: tuple[tuple[str, int, int], ...] = (
    ("second", 0, 59),
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day-of-month", 1, 31),
    ("month", 1, 12),
    ("day-of-week", 0, 6),
)
_NAMES = {
    "month": {m: i + 1 for i, m in enumerate("JAN FEB MAR APR MAY JUN JUL AUG SEP OCT NOV DEC".split())},
    "day-of-week": {d: i for i, d in enumerate("SUN MON TUE WED THU FRI SAT".split())},
}
MACROS = {
    "@yearly": "0 0 0 1 1 *", "@annually": "0 0 0 1 1 *", "@monthly": "0 0 0 1 * *",
    "@weekly": "0 0 0 * * 0", "@daily": "0 0 0 * * *", "@midnight": "0 0 0 * * *", "@hourly": "0 0 * * * *",
}
_TERM = re.compile(r"^(?P<range>\*|\?|[A-Za-z0-9]+(?:-[A-Za-z0-9]+)?)(?:/(?P<step>\d+))?$")


class CronError(ValueError):
    """An invalid cron expression; the message names the field and value."""


def _value(token: str, name: str, lo: int, hi: int, expr: str) -> int:
    upper = token.upper()
    if name in _NAMES and upper in _NAMES[name]:
        return _NAMES[name][upper]
    if not token.isdigit():
        raise CronError(f"cron {name} field has invalid value {token!r} in {expr!r}; expected a number {lo}-{hi}.")
    value = int(token)
    if name == "day-of-week" and value == 7:  # Sunday written as 7 (crontab); rewritten to 0 later
        return 7
    if not lo <= value <= hi:
        raise CronError(f"cron {name} value {value} is out of range {lo}-{hi} in {expr!r}.")
    return value


def _check_field(text: str, name: str, lo: int, hi: int, expr: str) -> str:
    for term in text.split(","):
        match = _TERM.match(term)
        if not match:
            raise CronError(f"cron {name} field {text!r} is not valid in {expr!r} (use *, N, N-M, */S or lists).")
        rng, step = match.group("range"), match.group("step")
        if step is not None and int(step) == 0:
            raise CronError(f"cron {name} step in {term!r} must be at least 1 in {expr!r}.")
        if rng == "?" and name not in ("day-of-month", "day-of-week"):
            raise CronError(f"cron {name} field cannot be '?' in {expr!r}; '?' is only for day-of-month/week.")
        if rng in ("*", "?"):
            continue
        parts = rng.split("-")
        first = _value(parts[0], name, lo, hi, expr)
        if len(parts) == 2:
            last = _value(parts[1], name, lo, hi, expr)
            if last < first:
                raise CronError(f"cron {name} range {rng!r} runs backwards in {expr!r}.")
    return text


def to_kfp_cron(expr: str) -> str:
    """Return KFP's six-field, seconds-first cron for a five-field, six-field or ``@macro`` expression.

    A five-field expression gets ``0`` seconds prepended; a six-field one is taken as seconds-first
    (KFP's own form). Raises :class:`CronError` with one clear sentence on invalid input.
    """
    text = " ".join((expr or "").split())
    if not text:
        raise CronError("cron expression is empty; use e.g. '0 3 * * *' (daily at 03:00).")
    if text.startswith("@"):
        if text.lower() not in MACROS:
            raise CronError(f"unknown cron macro {text!r}; use one of {', '.join(MACROS)}.")
        return MACROS[text.lower()]
    fields = text.split(" ")
    if len(fields) == 5:
        fields = ["0", *fields]
    elif len(fields) != 6:
        raise CronError(
            f"cron expression {expr!r} has {len(fields)} fields; use 5 (min hour dom month dow) "
            "or KFP's 6 with seconds first (sec min hour dom month dow)."
        )
    checked = [_check_field(f, name, lo, hi, expr) for f, (name, lo, hi) in zip(fields, FIELDS, strict=True)]
    checked[5] = _sunday_as_zero(checked[5])
    return " ".join(checked)


def _sunday_as_zero(dow: str) -> str:
    """KFP's parser takes day-of-week 0-6 only: rewrite crontab's Sunday-as-7 (``7``, ``5-7``)."""
    terms = []
    for term in dow.split(","):
        if term == "7":
            term = "0"
        elif re.fullmatch(r"\d-7", term):
            term = f"{term[0]}-6,0" if term[0] != "0" else "0-6"
        terms.append(term)
    return ",".join(terms)


def next_fire_times(expr: str, count: int = 5, start: datetime | None = None) -> list[datetime]:
    """The next ``count`` fire times (UTC) of ``expr`` after ``start`` (default: now)."""
    from croniter import croniter

    kfp = to_kfp_cron(expr).replace("?", "*")
    begin = start or datetime.now(timezone.utc)
    if begin.tzinfo is None:
        begin = begin.replace(tzinfo=timezone.utc)
    it = croniter(kfp, begin, second_at_beginning=True)
    return [it.get_next(datetime) for _ in range(count)]
