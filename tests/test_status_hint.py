"""``anyflow status NAME --workdir DIR`` for a run that is not there points at ``anyflow runs --workdir DIR``:
plain ``anyflow runs`` lists ``./anyflow-runs``, another folder (found in issue 20's first-hour repeat)."""

from __future__ import annotations

from pathlib import Path

from anyflow import cli


def test_the_hint_keeps_the_workdir(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    wd = tmp_path / "elsewhere"
    assert cli.main(["status", "run-x", "--workdir", str(wd)]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.endswith(f"list them with 'anyflow runs --workdir {wd}'."), line
    # and the command the hint names really lists that folder (here: says it is empty), exit 0
    assert cli.main(["runs", "--workdir", str(wd)]) == 0
    assert str(wd) in capsys.readouterr().out


def test_the_default_workdir_needs_no_flag(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert cli.main(["status", "run-x"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.endswith("list them with 'anyflow runs'."), line
