"""An in-process stand-in for ``kubernetes.client.CustomObjectsApi`` (no API server runs in CI).

It keeps objects like the API server does where the launcher depends on it: create of an existing name is
409 AlreadyExists, get/patch/delete of a missing one 404 NotFound, ``patch`` is a JSON merge patch
(RFC 7386, what the client sends for custom objects), and the server assigns ``metadata.uid``. Faults are
real client exceptions (``ApiException``, urllib3's ``ProtocolError``) queued per verb; status updates
are replayed on ``get``. ``tests/test_trainjob_launcher.py`` checks the method signatures against the
real client, so every call the launcher makes here is a call the client has.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Mapping
from typing import Any

from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import MaxRetryError, ProtocolError

Key = tuple[str, str, str, str, str]


def api_error(status: int, reason: str) -> ApiException:
    """The exception the client raises for an HTTP error response."""
    return ApiException(status=status, reason=reason)


def connection_reset() -> ProtocolError:
    """What urllib3 raises when the API server (or a proxy) resets the connection mid-request."""
    return ProtocolError("Connection aborted.", ConnectionResetError(104, "Connection reset by peer"))


def max_retries() -> MaxRetryError:
    """What urllib3 raises when its own connection retries to the API server are exhausted."""
    return MaxRetryError(None, "/apis", reason=ConnectionRefusedError(111, "Connection refused"))


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge key by key, ``None`` deletes, anything else replaces."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


class FakeCustomObjects:
    """Stores objects per (group, version, namespace, plural, name).

    ``statuses``: condition lists, one popped per ``get`` (the job's progress). ``faults``: per verb
    (create/get/patch/delete), exceptions raised by the next calls before they reach the store; an entry
    ``(exc, "after")`` raises after the call took effect (a response lost on the way back).
    """

    def __init__(self, statuses: list[list[dict]] | None = None,
                 faults: Mapping[str, list[Any]] | None = None) -> None:
        self.objects: dict[Key, dict] = {}
        self.statuses = list(statuses or [])
        self.faults = {verb: list(excs) for verb, excs in (faults or {}).items()}
        self.calls: list[tuple[str, str]] = []  # (verb, name) of every call, faulted ones included
        self.deleted: list[tuple[str, str | None]] = []  # (name, propagation_policy)
        self._uids = itertools.count(1)

    def _call(self, verb: str, name: str, effect: Callable[[], Any]) -> Any:
        self.calls.append((verb, name))
        queued = self.faults.get(verb) or []
        fault = queued.pop(0) if queued else None
        if isinstance(fault, tuple):
            effect()
            raise fault[0]
        if fault is not None:
            raise fault
        return effect()

    def create_namespaced_custom_object(self, group, version, namespace, plural, body, **kwargs):
        key = (group, version, namespace, plural, body["metadata"]["name"])

        def effect() -> dict:
            if key in self.objects:
                raise api_error(409, "AlreadyExists")
            obj = copy.deepcopy(dict(body))
            obj["metadata"]["uid"] = f"uid-{next(self._uids)}"
            self.objects[key] = obj
            return copy.deepcopy(obj)

        return self._call("create", key[-1], effect)

    def get_namespaced_custom_object(self, group, version, namespace, plural, name, **kwargs):
        key = (group, version, namespace, plural, name)

        def effect() -> dict:
            if key not in self.objects:
                raise api_error(404, "NotFound")
            if self.statuses:
                self.objects[key]["status"] = {"conditions": self.statuses.pop(0)}
            return copy.deepcopy(self.objects[key])

        return self._call("get", name, effect)

    def patch_namespaced_custom_object(self, group, version, namespace, plural, name, body, **kwargs):
        key = (group, version, namespace, plural, name)

        def effect() -> dict:
            if key not in self.objects:
                raise api_error(404, "NotFound")
            self.objects[key] = merge_patch(self.objects[key], body)
            return copy.deepcopy(self.objects[key])

        return self._call("patch", name, effect)

    def delete_namespaced_custom_object(self, group, version, namespace, plural, name, **kwargs):
        key = (group, version, namespace, plural, name)

        def effect() -> dict:
            if key not in self.objects:
                raise api_error(404, "NotFound")
            del self.objects[key]
            self.deleted.append((name, kwargs.get("propagation_policy")))
            return {}

        return self._call("delete", name, effect)

    def only(self) -> dict:
        """The single stored object (tests that expect exactly one job)."""
        assert len(self.objects) == 1, sorted(self.objects)
        return next(iter(self.objects.values()))


class FakeClock:
    """A monotonic clock that ``sleep`` advances; ``on_sleep(n)`` runs before the n-th sleep (from 1)."""

    def __init__(self, on_sleep: Callable[[int], None] | None = None) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []
        self.on_sleep = on_sleep

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        if self.on_sleep:
            self.on_sleep(len(self.sleeps))
        self.now += seconds
