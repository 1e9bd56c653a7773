"""``anyflow artifacts show|verify``: inspect and re-hash artifacts (local or s3:// URLs)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from anyflow.cli._common import prog
from anyflow.urls import url_argument


def _summary(m: dict) -> list[str]:
    total = sum(e["size"] for e in m["files"].values())
    cv = m.get("code_version", {})
    lines = [
        f"  kind: {m['kind']}   created: {m.get('created_at')}   "
        f"code: anyflow {cv.get('anyflow')} git {(cv.get('git_sha') or '?')[:12]}",
        f"  files: {len(m['files'])} ({total / 1e6:.1f} MB)",
    ]
    for rel, e in m["files"].items():
        lines.append(f"    {rel}  {e['size']} B  sha256 {e['sha256'][:16]}…")
    if m.get("metrics"):
        lines.append("  metrics: " + json.dumps(m["metrics"], sort_keys=True)[:400])
    return lines


def cmd_show(args: argparse.Namespace) -> int:
    from anyflow import storage

    try:
        chain = storage.lineage(args.url)
    except (storage.ArtifactError, storage.StorageError) as exc:  # not an artifact (or unreadable): bad input
        print(f"{prog(args)}: error: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(chain, indent=2, sort_keys=True))
        return 0
    for item in chain:
        pad = "  " * item["depth"]
        status = {None: "", True: "  [hash matches]", False: "  [CHANGED or MISSING since the child was made]"}
        print(f"{pad}{item['uri']}  manifest sha256 {(item['manifest_sha256'] or '-')[:16]}{status[item['ok']]}")
        if item["manifest"] is not None:
            for line in _summary(item["manifest"]):
                print(pad + line)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from anyflow import storage

    try:
        m = storage.verify(args.url)
    except (storage.ArtifactError, storage.StorageError) as exc:
        print(f"{prog(args)}: error: {exc}", file=sys.stderr)
        return 1  # the verdict: the artifact does not match its manifest (or has none)
    print(f"OK: {args.url}: {len(m['files'])} files match manifest sha256 {storage.manifest_digest(args.url)[:16]}")
    return 0


def add_cli(subparsers: Any) -> None:
    """Add the ``artifacts`` command group."""
    p = subparsers.add_parser("artifacts", help="inspect and verify artifacts (local or s3:// URLs)",
                              description="Inspect and verify anyflow artifacts.")
    sub = p.add_subparsers(dest="artifacts_cmd", required=True)
    show = sub.add_parser("show", help="print an artifact's manifest summary and its parents chain",
                          description="Print the manifest summary of URL and of every parent artifact.")
    show.add_argument("url", type=url_argument, help="artifact URL (local directory or s3://bucket/prefix)")
    show.add_argument("--json", action="store_true", help="print the full lineage as JSON")
    show.set_defaults(func=cmd_show, cli_prog=show.prog)
    ver = sub.add_parser("verify", help="re-check every file's size and sha256 (exit 1 on mismatch)",
                         description="Re-hash every file of the artifact at URL against its manifest; exit 1 when "
                         "a file or the manifest is missing or differs.")
    ver.add_argument("url", type=url_argument, help="artifact URL (local directory or s3://bucket/prefix)")
    ver.set_defaults(func=cmd_verify, cli_prog=ver.prog)
