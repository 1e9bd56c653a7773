"""``--s3-endpoint``'s help names every environment variable the endpoint falls back to, in the order
``anyflow._storage_s3.endpoint`` applies them (found here by setting them, not read from the help). Before, the help
said only ``(default: AWS_ENDPOINT_URL)`` while ``ANYFLOW_S3_ENDPOINT`` and ``AWS_ENDPOINT_URL_S3`` win over it."""

from __future__ import annotations

import pytest

from anyflow import _storage_s3, cli

VARS = ["AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "ANYFLOW_S3_ENDPOINT"]


def _precedence(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The variables, highest priority first, as the endpoint resolution really orders them."""
    monkeypatch.setattr(_storage_s3, "_settings", {**_storage_s3._settings, "endpoint": None})
    for v in VARS:
        monkeypatch.delenv(v, raising=False)
    order = []
    for v in VARS:  # lowest first: each newly set variable must take over
        monkeypatch.setenv(v, f"http://{v.lower()}:9000")
        assert _storage_s3.endpoint() == f"http://{v.lower()}:9000", v
        order.insert(0, v)
    return order


@pytest.mark.parametrize("argv", [["--help"], ["run", "--help"], ["submit", "--help"]])
def test_help_names_the_fallbacks_in_resolution_order(argv: list[str], capsys, monkeypatch) -> None:
    order = _precedence(monkeypatch)
    with pytest.raises(SystemExit):
        cli.main(argv)
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    help_line = text[text.index("--s3-endpoint S3_ENDPOINT") :]
    positions = [help_line.find(f"${v}") for v in order]
    assert all(p >= 0 for p in positions), (order, help_line[:300])
    assert positions == sorted(positions), (order, help_line[:300])


def test_an_invalid_endpoint_names_the_variable_it_came_from(capsys, monkeypatch) -> None:
    """A malformed ``AWS_ENDPOINT_URL_S3`` (the only endpoint set) is refused naming that variable; before, the
    sentence listed only --s3-endpoint, ANYFLOW_S3_ENDPOINT and AWS_ENDPOINT_URL."""
    monkeypatch.setattr(_storage_s3, "_settings", {**_storage_s3._settings, "endpoint": None})
    for v in VARS:
        monkeypatch.delenv(v, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "not a url")
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    assert cli.main(["artifacts", "verify", "s3://my-bucket/x"]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert "'not a url'" in line and "AWS_ENDPOINT_URL_S3" in line, line
