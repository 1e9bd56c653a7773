"""Long stages report their own progress (issue 20, item 5): the stages emit compact progress lines with
step/total, elapsed and ETA, and ``anyflow run``'s progress view shows them in place on a terminal and as
separate lines in a log."""

from __future__ import annotations

import io
import re
from pathlib import Path

from pipeline_fixtures import FAST

# Independent of anyflow.progress: what a reader of the log expects to find.
PROGRESS = re.compile(r"\[anyflow\] (?P<stage>\w+): (?P<unit>\w+) (?P<done>\d+)/(?P<total>\d+)\b[^\n\r]*?"
                      r"· (?P<elapsed>[\d.]+ (?:s|min)[^·\n\r]*)(?:· ETA (?P<eta>[\d.]+ (?:s|min)[^\n\r]*))?")


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _runner_output(stage_lines: list[str]) -> list[str]:
    """What the KFP local runner prints for one task whose component printed ``stage_lines``."""
    return ["13:00:00.000 - INFO - Running pipeline: 'anyflow-t2v'",
            "13:00:00.001 - INFO - Executing task \x1b[96m'evaluate'\x1b[0m",
            '    {"inputs": {"parameterValues": {"store": "/s"}}}',
            *[f"    {line}" for line in stage_lines],
            "    [anyflow] evaluate: wrote artifact /s/artifacts/evaluate/abc",
            "13:02:13.000 - INFO - Task 'evaluate' finished with status SUCCESS"]


STAGE_LINES = [
    "[anyflow] evaluate: sweep 0/6 (reference 32 steps) · 3.0 s · ETA 40 s",
    "[anyflow] evaluate: sweep 2/6 (teacher NFE 2) · 12.3 s · ETA 31 s",
    "[anyflow] evaluate: sweep 5/6 (generator NFE 1) · 30.0 s · ETA 4.0 s",
    "[anyflow] evaluate: sweep 6/6 (generator NFE 2) · 33.1 s · ETA 0.0 s",
]


def _screen(text: str) -> list[str]:
    """What a terminal shows for ``text``: ``\\r`` returns to column 0, later characters overwrite earlier ones."""
    rows, col = [""], 0
    for ch in text:
        if ch == "\n":
            rows.append("")
            col = 0
        elif ch == "\r":
            col = 0
        else:
            row = rows[-1]
            rows[-1] = row[:col] + ch + row[col + 1:]
            col += 1
    return [r.rstrip() for r in rows]


def _view(tmp_path: Path, echo: io.StringIO, after_each=None) -> str:
    from pipelines.local import ProgressLog

    log = ProgressLog(tmp_path / "runs" / "x.log", echo)
    for line in _runner_output(STAGE_LINES):
        log.write(line[:7])  # the runner writes in pieces
        log.write(line[7:] + "\n")
        if after_each is not None:
            after_each(line, echo.getvalue())
    log.close()
    return echo.getvalue()


def test_progress_view_rewrites_one_line_on_a_terminal(tmp_path: Path) -> None:
    seen = []

    def check(line: str, shown: str) -> None:
        if PROGRESS.search(line):
            screen = _screen(shown)
            seen.append((len(screen), screen[-1]))

    shown = _view(tmp_path, _Terminal(), check)
    # each report replaces the previous one on the same row: the screen does not grow, its last row is the report
    assert [rows for rows, _ in seen] == [seen[0][0]] * len(STAGE_LINES), seen
    assert [PROGRESS.search(row).group("done", "total") for _, row in seen] == [("0", "6"), ("2", "6"), ("5", "6"),
                                                                              ("6", "6")]
    assert all(PROGRESS.search(row).group("eta") for _, row in seen)
    # the next message takes the row over: no progress text is left on the screen, every message is there
    screen = [row for row in _screen(shown) if row]
    assert not any("sweep" in row for row in screen), screen
    assert screen == ["Running pipeline: 'anyflow-t2v'", "▶ evaluate",
                      "  [anyflow] evaluate: wrote artifact /s/artifacts/evaluate/abc", screen[3]]
    assert screen[3].startswith("  evaluate: SUCCESS in ")


def test_progress_view_writes_plain_lines_to_a_log(tmp_path: Path) -> None:
    shown = _view(tmp_path, io.StringIO())
    assert "\r" not in shown
    rows = [row for row in shown.splitlines() if PROGRESS.search(row)]
    assert [PROGRESS.search(r).group("done") for r in rows] == ["0", "2", "5", "6"]
    assert rows == [f"  {line}" for line in STAGE_LINES]


def test_stages_report_step_total_and_eta(tiny_chain, tmp_path: Path, monkeypatch, capfd) -> None:
    """A training stage and the evaluation sweep, run as the components run them (progress on, output a pipe)."""
    from anyflow.stages import run_stage

    monkeypatch.setenv("ANYFLOW_PROGRESS_INTERVAL", "0")  # every update: the counts below are exact
    ds = tiny_chain["dataset"].uri
    run_stage("train_flowmap", store=str(tmp_path), overrides={**FAST, "flowmap.train.steps": 3},
              inputs={"dataset": ds})
    train = [m.groupdict() for m in PROGRESS.finditer(capfd.readouterr().err)]
    assert [(m["stage"], m["unit"], m["done"], m["total"]) for m in train] == \
        [("train_flowmap", "step", str(i), "3") for i in (1, 2, 3)]
    assert all(m["eta"] for m in train)

    inputs = {"teacher": tiny_chain["teacher"].uri, "generator": tiny_chain["generator"].uri}
    run_stage("evaluate", store=str(tmp_path), overrides={**FAST, "evaluate.nfes": "1,2"}, inputs=inputs)
    err = capfd.readouterr().err
    sweeps = [m.groupdict() for m in PROGRESS.finditer(err)]
    # 2 models (teacher, generator) x 2 NFEs; each sweep finishes with a report, the last one at 4/4
    assert {m["stage"] for m in sweeps} == {"evaluate"} and {m["total"] for m in sweeps} == {"4"}
    assert [m["done"] for m in sweeps][-1] == "4"
    assert {"1", "2", "3", "4"} <= {m["done"] for m in sweeps}
    assert all(m["eta"] for m in sweeps)
    assert "\r" not in err  # not a terminal: plain lines
