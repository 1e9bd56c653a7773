"""``anyflow sample`` on a checkpoint path that does not exist says so in one sentence, exit 2, without the
``pass --preset`` hint (which cannot help: with ``--preset`` the same path still fails). Before, the message was
``/x: no readable config.json to take the preset from (/x is not an artifact: manifest.json is missing (its writer
did not finish, …); re-run the stage that publishes it.); pass --preset`` (found in issue 20's first-hour repeat)."""

from __future__ import annotations

from pathlib import Path

import pytest

from anyflow import cli


@pytest.mark.parametrize("preset", [[], ["--preset", "tiny"]])
def test_a_missing_checkpoint_is_named_as_missing(preset: list[str], tmp_path: Path, capsys) -> None:
    missing = tmp_path / "no-such-checkpoint"
    code = cli.main(["sample", str(missing), "--nfe", "1", "--out", str(tmp_path / "o"), *preset])
    assert code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].startswith("anyflow sample: error: ") and f"{missing} does not exist" in lines[0], lines
    assert "--preset" not in lines[0] and "re-run the stage" not in lines[0], lines
    assert not missing.exists() and not (tmp_path / "o").exists()  # nothing written


def test_an_existing_folder_without_a_manifest_is_still_not_an_artifact(tmp_path: Path, capsys) -> None:
    """The other case keeps its own sentence: the folder is there but no writer finished it."""
    (tmp_path / "half").mkdir()
    assert cli.main(["sample", str(tmp_path / "half"), "--nfe", "1", "--out", str(tmp_path / "o")]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "is not an artifact: manifest.json is missing" in line and "pass --preset" not in line, line
