"""The run lease: the model's :class:`anyflow.registry.Lease`, held for a whole run and renewed by a
heartbeat thread (in-process runs; KFP tasks take it with a TTL covering the pipeline's timeout)."""

from __future__ import annotations

import threading

from anyflow import registry


class RunLease:
    """The model's :class:`~anyflow.registry.Lease` held by one run, renewed by a heartbeat thread."""

    def __init__(self, store: str, name: str, owner: str, ttl_s: float, wait_s: float):
        self.lease = registry.Lease(store, name, owner=owner, ttl_s=ttl_s, wait_s=wait_s, poll_s=min(1.0, ttl_s / 10))
        self.lock = threading.Lock()
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self, heartbeat: bool = True) -> bool:
        with self.lock:
            if not self.lease.acquire():
                return False
        if heartbeat:
            self._thread = threading.Thread(target=self._beat, daemon=True, name="anyflow-lease-heartbeat")
            self._thread.start()
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.lease.ttl_s / 3):
            try:
                with self.lock:
                    self.lease.renew()
            except registry.LeaseLost as exc:
                self.lost = str(exc)
                return
            except Exception:  # a transient store error: try again next beat
                continue

    def check(self) -> None:
        """Raise :class:`~anyflow.registry.LeaseLost` if the heartbeat lost the lease; renew otherwise."""
        if self.lost:
            raise registry.LeaseLost(self.lost)
        with self.lock:
            self.lease.renew()

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with self.lock:
            self.lease.release()
