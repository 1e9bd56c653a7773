"""A real S3 API server for tests (moto in server mode, as a subprocess on 127.0.0.1) and a small
fault-injecting HTTP proxy that sits in front of it.

Used by ``tests/conftest.py`` (fixtures ``s3_server`` / ``s3_prefix``) and ``benchmarks/``. No client is
patched: everything talks HTTP to the server.
"""

from __future__ import annotations

import contextlib
import http.client
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

FAKE_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
    "AWS_CONFIG_FILE": "/nonexistent/anyflow-test-aws-config",
    "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/anyflow-test-aws-credentials",
    "AWS_EC2_METADATA_DISABLED": "true",
    "ANYFLOW_S3_RETRY_BASE": "0.02",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class MotoServer:
    """A ``moto.server`` subprocess: ``endpoint`` is ``http://127.0.0.1:PORT``."""

    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> MotoServer:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with code {self.proc.returncode}; is moto[server] installed?")
            try:
                urllib.request.urlopen(self.endpoint + "/moto-api/", timeout=1).read()
                return self
            except OSError:
                time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"moto server did not answer on {self.endpoint} within {timeout} s.")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


@dataclass
class Fault:
    """Inject ``mode`` into the next ``count`` requests that ``match(method, path)`` selects.

    Modes: ``"500"`` (InternalError), ``"503"`` (SlowDown), ``"403"`` (AccessDenied), ``"reset"``
    (connection reset before any response), ``"truncate"`` (forward, then send half the body and close the connection).
    """

    mode: str
    count: int
    match: Callable[[str, str], bool] | None = None


_ERRORS = {
    "500": (500, "InternalError", "We encountered an internal error. Please try again."),
    "503": (503, "SlowDown", "Please reduce your request rate."),
    "403": (403, "AccessDenied", "Access Denied"),
}
_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection", "te", "upgrade"}


class FaultProxy:
    """HTTP proxy on 127.0.0.1 in front of ``upstream`` that logs requests and injects faults."""

    def __init__(self, upstream: str):
        self.upstream = upstream.split("://", 1)[1]
        self.faults: list[Fault] = []
        self.log: list[tuple[str, str, str | None]] = []  # (method, path, Range header)
        self.injected = 0
        self.delay = 0.0
        self._lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *a: object) -> None:
                pass

            def finish(self) -> None:
                with contextlib.suppress(OSError):
                    super().finish()

            def _handle(self) -> None:
                proxy._serve(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def inject(self, mode: str, count: int, match: Callable[[str, str], bool] | None = None) -> None:
        with self._lock:
            self.faults.append(Fault(mode, count, match))

    def clear(self) -> None:
        with self._lock:
            self.faults.clear()
            self.log.clear()
            self.injected = 0
            self.delay = 0.0

    def requests(self, method: str | None = None, contains: str = "") -> list[tuple[str, str, str | None]]:
        with self._lock:
            return [r for r in self.log if (method is None or r[0] == method) and contains in r[1]]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _pick(self, method: str, path: str) -> str | None:
        with self._lock:
            self.log.append((method, path, None))
            for f in self.faults:
                if f.count > 0 and (f.match is None or f.match(method, path)):
                    f.count -= 1
                    self.injected += 1
                    return f.mode
        return None

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        length = int(h.headers.get("Content-Length") or 0)
        body = h.rfile.read(length) if length else b""
        mode = self._pick(h.command, h.path)
        with self._lock:
            self.log[-1] = (h.command, h.path, h.headers.get("Range"))
        if self.delay:
            time.sleep(self.delay)
        if mode == "reset":
            return _reset(h)
        if mode in _ERRORS:
            status, code, msg = _ERRORS[mode]
            data = f'<?xml version="1.0"?><Error><Code>{code}</Code><Message>{msg}</Message></Error>'.encode()
            h.send_response(status)
            h.send_header("Content-Type", "application/xml")
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            if h.command != "HEAD":
                h.wfile.write(data)
            return None
        conn = http.client.HTTPConnection(self.upstream, timeout=60)
        try:
            headers = {k: v for k, v in h.headers.items() if k.lower() not in _HOP}
            conn.request(h.command, h.path, body=body, headers=headers)
            resp = conn.getresponse()
            data = resp.read()
        finally:
            conn.close()
        h.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in _HOP and k.lower() not in ("content-length", "server", "date"):
                h.send_header(k, v)
        size = resp.getheader("Content-Length") if h.command == "HEAD" else str(len(data))
        h.send_header("Content-Length", size or "0")
        h.end_headers()
        if h.command == "HEAD":
            return None
        if mode == "truncate" and len(data) > 1:
            # Close gracefully (FIN) after half the body: with a RST the kernel may discard bytes the
            # client has not read yet, so the "cut" could land at byte 0 and the test would be flaky.
            h.wfile.write(data[: len(data) // 2])
            h.wfile.flush()
            with contextlib.suppress(OSError):
                h.connection.shutdown(socket.SHUT_WR)
            h.close_connection = True
            return None
        h.wfile.write(data)
        return None


def _reset(h: BaseHTTPRequestHandler) -> None:
    """Abort the connection with a TCP RST (what a crashing load balancer does)."""
    with contextlib.suppress(OSError):
        h.wfile.flush()
        h.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        h.connection.close()
    h.close_connection = True
