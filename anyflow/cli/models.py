"""``anyflow models list|show|promote|rollback``: model aliases and their history."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from anyflow.cli._common import UserError, _guard, prog
from anyflow.urls import LocationError, check_url, url_argument

#: The store ``anyflow run`` writes to by default (``--workdir`` ./anyflow-runs), and so the default here.
DEFAULT_STORE = os.path.join(".", "anyflow-runs", "store")


def _root(args: argparse.Namespace) -> str:
    """``--store`` (``--root`` is its old name), else ``$ANYFLOW_STORE``, else ``anyflow run``'s default store."""
    root = args.store or os.environ.get("ANYFLOW_STORE") or DEFAULT_STORE
    try:
        return check_url(root, "store")
    except LocationError as exc:
        raise UserError(str(exc)) from None


def cmd_list(args: argparse.Namespace) -> int:
    from anyflow import registry

    root = _root(args)
    names = registry.list_models(root)
    if not names:
        print(f"no models in {root} (promote one with 'anyflow models promote NAME ARTIFACT_URL --store {root}')")
    for name in names:
        live = registry.promoted(root, name)
        where = f"{live['uri']}  (since {live['since']})" if live else "(nothing promoted)"
        print(f"{name}\t{where}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    from anyflow import registry

    root = _root(args)
    live = registry.promoted(root, args.name)
    print(f"model {args.name}: " + (f"live = {live['uri']} since {live['since']}" if live else "nothing promoted"))
    if live:
        print(f"  manifest sha256 {live['manifest_sha256']}\n  reason: {live['reason']}")
        print("  metrics: " + json.dumps(live.get("metrics", {}), sort_keys=True))
    print("history:")
    for e in registry.history(root, args.name):
        print(f"  {e['at']}  {e['event']:<8} {e['uri']}  — {e.get('reason', '')}")
        if args.metrics and e.get("metrics"):
            print("      metrics: " + json.dumps(e["metrics"], sort_keys=True))
    return 0


def _metrics_arg(text: str | None) -> dict:
    if not text:
        return {}
    path = Path(text)
    try:
        value = json.loads(path.read_text() if path.is_file() else text)
    except ValueError as exc:
        raise UserError(f"--metrics {text!r} is neither a JSON file nor a JSON object ({exc}).") from None
    if not isinstance(value, dict):
        raise UserError(f"--metrics must be a JSON object (NFE -> metric -> value), got {type(value).__name__}.")
    return value


def cmd_promote(args: argparse.Namespace) -> int:
    from anyflow import registry, storage

    try:
        entry = registry.promote(_root(args), args.name, args.uri, metrics=_metrics_arg(args.metrics),
                                 reason=args.reason, expected_current=args.expected_current)
    except (registry.RegistryError, storage.ArtifactError, storage.StorageError) as exc:
        print(f"{prog(args)}: error: {exc}", file=sys.stderr)
        return 1
    print(f"promoted {args.name} -> {entry['uri']} (manifest sha256 {entry['manifest_sha256'][:16]})")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from anyflow import registry, storage

    try:
        entry = registry.rollback(_root(args), args.name, reason=args.reason)
    except (registry.RegistryError, storage.ArtifactError, storage.StorageError) as exc:
        print(f"{prog(args)}: error: {exc}", file=sys.stderr)
        return 1
    print(f"rolled back {args.name} -> {entry['uri']} (manifest sha256 {entry['manifest_sha256'][:16]})")
    return 0


def add_cli(subparsers: Any) -> None:
    """Add the ``models`` command group."""
    p = subparsers.add_parser("models", help="list, inspect, promote and roll back model aliases",
                              description="Model aliases (promoted.json) and their history in a store.")
    sub = p.add_subparsers(dest="models_cmd", required=True)

    def add(name: str, help: str, func: Any) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.add_argument("--store", "--root", dest="store", type=url_argument,
                        help=f"store holding models/ (folder or s3://…; default $ANYFLOW_STORE, else {DEFAULT_STORE}, "
                        "where 'anyflow run' writes); --root is its old name")
        sp.set_defaults(func=_guard(func), command="models", cli_prog=sp.prog)  # usage errors: one sentence, exit 2
        return sp

    add("list", "list models and the artifact each one promotes", cmd_list)
    sp = add("show", "show a model's live alias and its promotion history", cmd_show)
    sp.add_argument("name", help="model name")
    sp.add_argument("--metrics", action="store_true", help="also print the metrics of every event")
    sp = add("promote", "point a model's alias at a (verified) artifact", cmd_promote)
    sp.add_argument("name", help="model name")
    sp.add_argument("uri", help="artifact URL to promote")
    sp.add_argument("--reason", default="manual promotion", help="why (recorded in the history)")
    sp.add_argument("--metrics", help="metrics JSON (a file or an inline string) recorded with it")
    sp.add_argument("--expected-current", default=None,
                    help="manifest sha256 that must be live now ('' for none); refuses otherwise")
    sp = add("rollback", "restore the previously promoted artifact", cmd_rollback)
    sp.add_argument("name", help="model name")
    sp.add_argument("--reason", default="manual rollback", help="why (recorded in the history)")
