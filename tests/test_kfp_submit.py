"""``anyflow submit`` / ``schedule`` / ``runs`` / ``status`` with the real ``kfp.Client`` pointed at a local
recording HTTP server that answers the KFP v2beta1 endpoints the client calls (no KFP API server can run
here without a cluster). We assert on the requests the real client sends."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from anyflow import cli
from pipelines.compile import COMPILED_DIR


class Recorder:
    def __init__(self, token: str | None = None) -> None:
        self.requests: list[dict] = []
        self.token = token

    def reply(self, method: str, path: str, body: dict) -> tuple[int, dict]:
        route = path.split("?")[0]
        if route == "/apis/v2beta1/healthz":
            return 200, {"multi_user": False}
        if method == "GET" and route == "/apis/v2beta1/experiments":
            return 200, {}
        if method == "POST" and route == "/apis/v2beta1/experiments":
            return 200, {"experiment_id": "exp-1", "display_name": body.get("display_name")}
        if method == "POST" and route == "/apis/v2beta1/runs":
            return 200, {"run_id": "run-123", "display_name": body.get("display_name"), "state": "PENDING"}
        if method == "POST" and route == "/apis/v2beta1/recurringruns":
            return 200, {"recurring_run_id": "rr-7", "display_name": body.get("display_name")}
        if method == "GET" and route == "/apis/v2beta1/runs/run-123":
            return 200, {"run_id": "run-123", "display_name": "r1", "state": "SUCCEEDED"}
        if method == "GET" and route == "/apis/v2beta1/runs":
            return 200, {"runs": [{"run_id": "run-123", "display_name": "r1", "state": "RUNNING"}], "total_size": 1}
        return 404, {"error": f"no route {method} {route}"}


@pytest.fixture
def kfp_server() -> Iterator[tuple[str, Recorder]]:
    rec = Recorder()

    class Handler(BaseHTTPRequestHandler):
        def _handle(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else {}
            rec.requests.append({"method": self.command, "path": self.path, "body": body,
                                 "auth": self.headers.get("Authorization")})
            if rec.token and self.headers.get("Authorization") != f"Bearer {rec.token}":
                status, reply = 401, {"error": "unauthenticated"}
            else:
                status, reply = rec.reply(self.command, self.path, body)
            data = json.dumps(reply).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = _handle

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}", rec
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def _env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ANYFLOW_IMAGE", raising=False)
    monkeypatch.delenv("KFP_TOKEN", raising=False)


def _golden(name: str) -> tuple[dict, dict]:
    docs = list(yaml.safe_load_all((COMPILED_DIR / f"{name}.yaml").read_text()))
    return docs[0], docs[1]


def test_submit_sends_compiled_spec_and_parameters(kfp_server, capsys) -> None:
    url, rec = kfp_server
    rc = cli.main(["submit", "--host", url, "--run-name", "nightly", "--experiment", "anyflow-exp",
                      "--store", "s3://bucket/anyflow", "--param", "finetune=true"])
    assert rc == 0 and "submitted run run-123" in capsys.readouterr().out
    runs = [r for r in rec.requests if r["method"] == "POST" and r["path"].startswith("/apis/v2beta1/runs")]
    assert len(runs) == 1
    body = runs[0]["body"]
    spec, platform = _golden("anyflow-t2v")
    assert body["pipeline_spec"]["pipeline_spec"] == spec  # exactly the committed compiled pipeline
    assert body["pipeline_spec"]["platform_spec"] == platform
    assert body["runtime_config"]["parameters"] == {"preset": "tiny", "overrides_json": "{}",
                                                   "store": "s3://bucket/anyflow", "finetune": True}
    assert body["display_name"] == "nightly" and body["experiment_id"] == "exp-1"
    exp = [r for r in rec.requests if r["method"] == "POST" and r["path"].startswith("/apis/v2beta1/experiments")]
    assert exp[0]["body"]["display_name"] == "anyflow-exp"


def test_submit_unreachable_host_is_one_sentence(capsys) -> None:
    with socket.socket() as s:  # a port with nothing listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    rc = cli.main(["submit", "--host", f"http://127.0.0.1:{port}"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert err[-1].startswith(f"anyflow submit: cannot reach the KFP API at http://127.0.0.1:{port}")


def test_submit_missing_auth_then_token(kfp_server, capsys) -> None:
    url, rec = kfp_server
    rec.token = "s3cr3t"
    assert cli.main(["submit", "--host", url]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "refused the request (HTTP 401)" in err and "--existing-token" in err
    rec.requests.clear()
    assert cli.main(["submit", "--host", url, "--existing-token", "s3cr3t"]) == 0
    assert all(r["auth"] == "Bearer s3cr3t" for r in rec.requests if r["path"] != "/apis/v2beta1/healthz")


def test_schedule_creates_recurring_run_with_kfp_cron(kfp_server, capsys) -> None:
    url, rec = kfp_server
    rc = cli.main(["schedule", "--host", url, "--cron", "0 3 * * *", "--show", "2", "--run-name", "redistill"])
    out = capsys.readouterr().out
    assert rc == 0 and "KFP cron (seconds first): 0 0 3 * * *" in out and "created recurring run rr-7" in out
    assert out.count("next: ") == 2
    body = next(r for r in rec.requests if r["path"].startswith("/apis/v2beta1/recurringruns"))["body"]
    assert body["trigger"]["cron_schedule"]["cron"] == "0 0 3 * * *"
    assert body["display_name"] == "redistill" and int(body["max_concurrency"]) == 1 and body["no_catchup"] is True
    spec = body["pipeline_spec"].get("pipeline_spec", body["pipeline_spec"])
    assert spec == _golden("anyflow-t2v")[0]


def test_schedule_invalid_cron_needs_no_host(capsys) -> None:
    assert cli.main(["schedule", "--cron", "0 3 * *", "--dry-run"]) == 2
    assert "has 4 fields" in capsys.readouterr().err


def test_runs_and_status(kfp_server, capsys) -> None:
    url, _ = kfp_server
    assert cli.main(["runs", "--host", url]) == 0
    assert "run-123  RUNNING" in capsys.readouterr().out
    assert cli.main(["status", "run-123", "--host", url]) == 0
    assert "run-123  SUCCEEDED" in capsys.readouterr().out


def test_cli_errors_for_unknown_preset_and_pipeline(kfp_server, capsys, tmp_path: Path) -> None:
    url, _ = kfp_server
    assert cli.main(["submit", "--host", url, "--preset", "huge"]) == 2
    assert "unknown preset 'huge'" in capsys.readouterr().err
    assert cli.main(["compile", "--pipeline", "nope", "-o", str(tmp_path / "x.yaml")]) == 2
    assert "unknown pipeline 'nope'" in capsys.readouterr().err
    assert cli.main(["rerun", "--stage", "distill", "--from", f"dataset={tmp_path}", "--from",
                        f"teacher={tmp_path}", "--from", f"flowmap={tmp_path}"]) == 2
    assert "is not an anyflow artifact" in capsys.readouterr().err
    assert cli.main(["rerun", "--stage", "distil"]) == 2
    assert "unknown stage 'distil'" in capsys.readouterr().err


@pytest.mark.parametrize("code", ["EACCES", "EPERM", "EROFS", "ENOTDIR"])
def test_run_with_unwritable_workdir_is_one_sentence(code: str, capsys, monkeypatch, tmp_path: Path) -> None:
    # In the train image the root filesystem is read-only: `anyflow run` in the image's working folder
    # must say where it cannot write, not print a traceback (seen building the image). Which errno the
    # kernel gives depends on the user and the mount, so each is raised where the runner creates its folder.
    import errno
    import os

    import pipelines.local

    where = str(tmp_path / "runs" / "kfp-local")

    def refuse(workdir):
        num = getattr(errno, code)
        raise OSError(num, os.strerror(num), where)

    monkeypatch.setattr(pipelines.local, "init_local", refuse)
    assert cli.main(["run", "--workdir", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"anyflow run: cannot write {where}: {os.strerror(getattr(errno, code))}"), err
    assert "--workdir" in err and "Traceback" not in err


def test_unwritable_real_path_and_other_os_errors(capsys, monkeypatch, tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    assert cli.main(["run", "--workdir", str(a_file / "runs")]) == 2  # a real ENOTDIR, no patching
    assert "Not a directory" in capsys.readouterr().err

    import pipelines.local

    def full(workdir):
        raise OSError(28, "No space left on device")  # not "unwritable": must not be reworded as such

    monkeypatch.setattr(pipelines.local, "init_local", full)
    with pytest.raises(OSError, match="No space left"):
        cli.main(["run", "--workdir", str(tmp_path / "runs")])
