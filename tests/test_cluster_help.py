"""``submit`` and ``schedule`` start runs on a cluster: they take no ``--workdir`` (it did nothing there) and their
``--store`` help does not promise the local ``<workdir>/store`` default; what a run gets without ``--store`` is the
compiled pipeline's own ``store`` parameter default, read here from the committed YAML (found in issue 20's
first-hour repeat)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from anyflow import cli

ROOT = Path(__file__).resolve().parents[1]


def _store_default(pipeline: str) -> str:
    docs = list(yaml.safe_load_all((ROOT / "pipelines" / "compiled" / f"{pipeline}.yaml").read_text()))
    spec = next(d for d in docs if d and "root" in d)
    return spec["root"]["inputDefinitions"]["parameters"]["store"]["defaultValue"]


@pytest.mark.parametrize("command", ["submit", "schedule"])
def test_cluster_commands_have_no_local_store_default(command: str, capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--workdir" not in text and "<workdir>/store" not in text, text
    assert _store_default("anyflow-t2v") == "" == _store_default("anyflow-far")  # what the help says instead
    assert "empty in anyflow-t2v and anyflow-far" in text


@pytest.mark.parametrize("command", ["submit", "schedule"])
def test_workdir_is_refused_there(command: str, capsys) -> None:
    with pytest.raises(SystemExit) as exc:
        cli.main(
            [command, "--workdir", "x", "--cron", "0 3 * * *"]
            if command == "schedule"
            else [command, "--workdir", "x"]
        )
    assert exc.value.code == 2
    assert "unrecognized arguments: --workdir x" in capsys.readouterr().err


def test_run_keeps_its_local_default(capsys) -> None:
    with pytest.raises(SystemExit):
        cli.main(["run", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--workdir WORKDIR" in text and "(default: <workdir>/store)" in text
