"""A recording HTTP server that answers the KFP v2beta1 (and v1beta1 healthz) endpoints the real ``kfp.Client`` calls.

No KFP API server can run here without a cluster: this is a test double for *our* client code, which the tests
drive with the real ``kfp.Client``; it asserts on the requests that client sends, never stands in for evidence
about the backend itself.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Recorder:
    def __init__(self, token: str | None = None) -> None:
        self.requests: list[dict] = []
        self.token = token
        self.multi_user = False
        self.version: str | None = "2.17.0"  # what KFP 2.x's /apis/v1beta1/healthz calls tag_name
        #: what GET /apis/v2beta1/runs lists; its ``filter`` query (EQUALS predicates, as filter.proto) selects
        self.runs: list[dict] = [{"run_id": "run-123", "display_name": "r1", "state": "RUNNING"}]

    def reply(self, method: str, path: str, body: dict) -> tuple[int, dict]:
        route = path.split("?")[0]
        if route == "/apis/v1beta1/healthz":
            if self.version is None:
                return 404, {"error": "no v1beta1 API"}
            return 200, {"commit_sha": "0123abc", "tag_name": self.version, "multi_user": self.multi_user}
        if route == "/apis/v2beta1/healthz":
            return 200, {"multi_user": self.multi_user}
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
            runs = [r for r in self.runs if _matches(r, _query(path).get("filter"))]
            return 200, {"runs": runs, "total_size": len(runs)}
        if method == "GET" and route.startswith("/apis/v2beta1/runs/"):
            found = [r for r in self.runs if r["run_id"] == route.rsplit("/", 1)[1]]
            if found:
                return 200, found[0]
        return 404, {"error": f"no route {method} {route}"}


def _query(path: str) -> dict[str, str]:
    from urllib.parse import parse_qs, urlsplit

    return {k: v[0] for k, v in parse_qs(urlsplit(path).query).items()}


def _matches(run: dict, flt: str | None) -> bool:
    """A KFP v2beta1 ``Filter`` (JSON): every EQUALS predicate on a string field holds."""
    if not flt:
        return True
    for pred in json.loads(flt).get("predicates", []):
        assert pred["operation"] == "EQUALS", pred  # the only operation our client sends
        if run.get(pred["key"]) != pred.get("stringValue", pred.get("string_value")):
            return False
    return True


@contextlib.contextmanager
def serve(rec: Recorder) -> Iterator[str]:
    """Serve ``rec`` on 127.0.0.1 (a free port) while the block runs; yields the base URL."""

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
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
