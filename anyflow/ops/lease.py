"""The run lease: the model's :class:`anyflow.registry.Lease`, held for a whole run and renewed by a
heartbeat thread — in-process runs and, across pods, every task of the KFP pipeline.

A run's lease has a short TTL (``lease_ttl_s``, default 900 s) and the process working under it
renews it every ``ttl/3`` from a daemon thread. In the KFP pipeline each long task re-takes the
lease of its run (:meth:`RunLease.resume`: same owner = the KFP run id, so a later pod of the same
run may take it back even after the TTL ran out between pods, but never from another owner), beats
while it works, and hands it on renewed (:meth:`RunLease.handoff`) when it finishes. If the pipeline
dies hard, nothing renews it and it expires ``lease_ttl_s`` later instead of blocking the next
scheduled run for a day.

A task that loses the lease (the heartbeat finds another owner's write) stops: inside
:meth:`RunLease.guard` on the main thread the work is interrupted at once with
:class:`~anyflow.registry.LeaseLost` (delivered by a Python-level signal handler for ``SIGUSR1``,
simulated with :func:`_thread.interrupt_main`: no real signal is sent); elsewhere it fails when the
block ends. :meth:`RunLease.check` — called before every promotion — raises it too, so a run that
lost the lease never promotes.
"""

from __future__ import annotations

import _thread
import signal
import threading
import time
from types import TracebackType
from typing import Any

from anyflow import registry

_INTERRUPT = getattr(signal, "SIGUSR1", None)  # None on Windows: no interruption, the block fails at its end


class RunLease:
    """The model's :class:`~anyflow.registry.Lease` held by one run, renewed by a heartbeat thread.

    ``owner`` is the run id (the KFP run id in the pipeline): every task of one run uses the same.
    """

    def __init__(self, store: str, name: str, owner: str, ttl_s: float, wait_s: float = 0.0,
                 interval_s: float | None = None):
        if ttl_s <= 0:
            raise ValueError(f"lease_ttl_s={ttl_s!r} must be > 0 (seconds; e.g. 900).")
        self.lease = registry.Lease(store, name, owner=owner, ttl_s=ttl_s, wait_s=wait_s, poll_s=min(1.0, ttl_s / 10))
        self.interval_s = ttl_s / 3 if interval_s is None else interval_s
        self.lock = threading.Lock()
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._armed = False  # a guard on the main thread wants to be interrupted when the lease is lost
        self._sent = False  # the interrupt was requested
        self._delivered = False  # ... and raised in the main thread

    # ------------------------------------------------------------------ taking and giving back
    def acquire(self, heartbeat: bool = True) -> bool:
        """Take the lease if free, expired, released or ours (waiting up to ``wait_s``); start beating."""
        with self.lock:
            if not self.lease.acquire():
                return False
        if heartbeat:
            self._start()
        return True

    def resume(self, heartbeat: bool = True) -> None:
        """Take back this run's lease in a later task (see :meth:`anyflow.registry.Lease.resume`) and beat.

        :class:`~anyflow.registry.LeaseLost` if another owner holds or held it since.
        """
        with self.lock:
            self.lease.resume()
        if heartbeat:
            self._start()

    def handoff(self) -> None:
        """Stop beating and renew once more, so the run's next task has a full TTL to start in.

        :class:`~anyflow.registry.LeaseLost` if the lease was lost meanwhile (the task must fail).
        """
        self.stop()
        self.check()

    def stop(self) -> None:
        """Stop the heartbeat (the lease stays held until it expires or is released)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(5.0, self.interval_s))
            self._thread = None

    def release(self) -> None:
        """Stop the heartbeat and give the lease up (a no-op if it is no longer ours)."""
        self.stop()
        with self.lock:
            self.lease.release()

    # ------------------------------------------------------------------------- the heartbeat
    def _start(self) -> None:
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, daemon=True, name="anyflow-lease-heartbeat")
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                with self.lock:
                    if self._stop.is_set():
                        return
                    self.lease.renew()
            except registry.LeaseLost as exc:
                self._mark_lost(str(exc))
                return
            except Exception:  # a transient store error: try again next beat (the TTL leaves 2 more)
                continue

    def _mark_lost(self, message: str) -> None:
        with self.lock:
            self.lost = message
            if self._armed and not self._sent and _INTERRUPT is not None:
                self._sent = True
                _thread.interrupt_main(_INTERRUPT)

    def check(self) -> None:
        """Raise :class:`~anyflow.registry.LeaseLost` if the heartbeat lost the lease; renew otherwise."""
        if self.lost:
            raise registry.LeaseLost(self.lost)
        try:
            with self.lock:
                self.lease.renew()
        except registry.LeaseLost as exc:
            self.lost = str(exc)
            raise

    # ------------------------------------------------------------------------------ the guard
    def guard(self) -> _Guard:
        """``with lease.guard(): work()`` — stop ``work`` with :class:`~anyflow.registry.LeaseLost` when
        the heartbeat loses the lease: at once on the main thread, otherwise when the block ends."""
        return _Guard(self)


class _Guard:
    """See :meth:`RunLease.guard`."""

    def __init__(self, run_lease: RunLease):
        self.rl = run_lease
        self._old: Any = None
        self._installed = False

    def _handler(self, signum: int, frame: Any) -> None:
        if not self.rl._sent:  # a real SIGUSR1 from elsewhere, not our interrupt: do what was done before
            if callable(self._old):
                self._old(signum, frame)
            return
        self.rl._delivered = True
        raise registry.LeaseLost(self.rl.lost or f"{self.rl.lease.url}: lease lost")

    def __enter__(self) -> RunLease:
        rl = self.rl
        if _INTERRUPT is not None and threading.current_thread() is threading.main_thread():
            self._old = signal.signal(_INTERRUPT, self._handler)
            self._installed = True
            with rl.lock:
                rl._armed, rl._sent, rl._delivered = True, False, False
        if rl.lost:
            self._disarm()
            raise registry.LeaseLost(rl.lost)
        return rl

    def _disarm(self) -> None:
        rl = self.rl
        if not self._installed:
            return
        try:
            with rl.lock:  # no interrupt is requested after this
                rl._armed = False
                pending = rl._sent and not rl._delivered
            # one requested just as the block ended arrives here, where we expect it
            deadline = time.monotonic() + 2.0
            while pending and not rl._delivered and time.monotonic() < deadline:
                time.sleep(0.005)
        except registry.LeaseLost:
            pass  # the interrupt itself; __exit__ raises LeaseLost with the message
        finally:
            signal.signal(_INTERRUPT, self._old)
            self._installed = False

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> bool:
        self._disarm()
        if self.rl.lost and not isinstance(exc, registry.LeaseLost):
            # the block ended (or failed because it was interrupted) after the lease was lost
            raise registry.LeaseLost(self.rl.lost) from exc
        return False
