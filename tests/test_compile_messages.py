"""``anyflow compile`` with an unknown pipeline prints one error line, not the placeholder-image note first (the
note is about a YAML that is never written); a compile that succeeds with the placeholder image still notes it.
Found in issue 20's first-hour repeat."""

from __future__ import annotations

from pathlib import Path

from anyflow import cli


def test_an_unknown_pipeline_is_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("ANYFLOW_IMAGE", raising=False)
    assert cli.main(["compile", "--pipeline", "nosuch", "--output", str(tmp_path / "x.yaml")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("anyflow compile: error: unknown pipeline 'nosuch'"), line
    assert not (tmp_path / "x.yaml").exists()


def test_a_compiled_placeholder_yaml_is_still_noted(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.delenv("ANYFLOW_IMAGE", raising=False)
    out = tmp_path / "t2v.yaml"
    assert cli.main(["compile", "--pipeline", "anyflow-t2v", "--output", str(out)]) == 0
    cap = capsys.readouterr()
    assert out.exists() and cap.out.strip() == str(out)
    (note,) = cap.err.strip().splitlines()
    assert note.startswith("anyflow compile: note: the YAML names the placeholder image")
    assert "unset-pass-image" in out.read_text()  # the image the note names is the one in the YAML
