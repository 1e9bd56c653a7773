"""``anyflow redistill``: one periodic re-distillation run (see docs/operations.md)."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from anyflow.cli._common import UserError, _guard
from anyflow.urls import LocationError, check_url, url_argument


def parse_metric(text: str) -> tuple[str, bool]:
    """``coupled_mse:lower`` / ``psnr:higher`` → ``(name, higher_is_better)``."""
    name, _, way = text.partition(":")
    if way not in ("lower", "higher") or not name:
        raise UserError(f"--metric {text!r}: expected NAME:lower or NAME:higher, e.g. coupled_mse:lower")
    return name, way == "higher"


def cmd_redistill(args: argparse.Namespace) -> int:
    from anyflow.config import load_overrides_file, parse_override_args
    from anyflow.ops.redistill import RedistillConfig, redistill

    store = args.store or os.environ.get("ANYFLOW_STORE")
    if not store:
        raise UserError("give the store with --store URL (or set ANYFLOW_STORE).")
    try:
        check_url(store, "store")
    except LocationError as exc:
        raise UserError(str(exc)) from None
    overrides: dict[str, Any] = load_overrides_file(args.config) if args.config else {}
    overrides.update(parse_override_args(args.overrides))
    cfg = RedistillConfig(
        name=args.name, preset=args.preset, overrides=overrides,
        distill_overrides=parse_override_args(args.distill_overrides),
        metrics=tuple(parse_metric(m) for m in args.metric) or RedistillConfig.metrics,
        margin=args.margin, relative_margin=args.relative_margin, seed=args.seed, replay_ratio=args.replay_ratio,
        min_replay=args.min_replay, max_replay=args.max_replay, min_new_items=args.min_new_items,
        on_teacher_change=args.on_teacher_change, run_lease=not args.no_run_lease,
        lease_ttl_s=args.lease_ttl, lease_wait_s=args.lease_wait,
    )
    rec = redistill(store, args.source, args.teacher, flowmap=args.flowmap, eval_dataset=args.eval_dataset,
                    cfg=cfg, run_id=args.run_id, progress=not args.no_progress)
    print(f"redistill {rec['run_id']}: {rec['status']}" + (f" — {rec['reason']}" if rec.get("reason") else ""))
    for line in (rec.get("gate") or {}).get("reasons", []):
        print(f"  gate: {line}")
    if rec.get("candidate"):
        print(f"  candidate: {rec['candidate']['uri']}")
    print(f"  report: {rec.get('report')}")
    if args.json:
        print(json.dumps(rec, indent=1, default=str))
    return 3 if args.fail_on_reject and rec["status"] in ("rejected", "conflict") else 0


def add_cli(subparsers: Any) -> None:
    """Add ``anyflow redistill``."""
    p = subparsers.add_parser(
        "redistill", help="re-distill on new data, gate against the live model, promote atomically",
        description="One periodic re-distillation run: prepare the data new since the live model (plus a replay "
                    "sample), warm-start distill from the live generator and critic, evaluate candidate and live "
                    "model on the same protocol, promote only if not worse at every NFE. See docs/operations.md.",
    )
    p.add_argument("--store", type=url_argument, help="store URL holding artifacts/ and models/ (default $ANYFLOW_STORE)")
    p.add_argument("--source", required=True, help="data source spec (folder, s3:// prefix, index, tars, procedural:n=…)")
    p.add_argument("--teacher", required=True, type=url_argument, help="the current teacher artifact URL")
    p.add_argument("--flowmap", type=url_argument, help="flow-map artifact: generator init for the first run or after a teacher change")
    p.add_argument("--eval-dataset", type=url_argument, help="fixed held-out dataset artifact for evaluation (optional)")
    p.add_argument("--name", default="anyflow-t2v", help="registry model name (default: anyflow-t2v)")
    p.add_argument("--preset", default="tiny", help="preset name")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override for every stage (fixes the evaluation protocol too; repeatable)")
    p.add_argument("--config", help="YAML file of overrides (applied before --set)")
    p.add_argument("--distill-set", dest="distill_overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override for the distill stage only (repeatable)")
    p.add_argument("--metric", action="append", default=[], metavar="NAME:lower|higher",
                   help="gate metric (repeatable; default coupled_mse:lower)")
    p.add_argument("--margin", type=float, default=0.0, help="absolute tolerance per metric (default 0)")
    p.add_argument("--relative-margin", type=float, default=0.05,
                   help="plus this fraction of the live value (default 0.05)")
    p.add_argument("--seed", type=int, default=0, help="replay sampling seed")
    p.add_argument("--replay-ratio", type=float, default=1.0, help="replay items per new item (default 1)")
    p.add_argument("--min-replay", type=int, default=0, help="at least this many replay items")
    p.add_argument("--max-replay", type=int, default=0, help="at most this many replay items (0: no cap)")
    p.add_argument("--min-new-items", type=int, default=1, help="skip the run below this many new items")
    p.add_argument("--on-teacher-change", choices=("flowmap", "generator"), default="flowmap",
                   help="generator init when the teacher changed (default: the --flowmap artifact)")
    p.add_argument("--no-run-lease", action="store_true", help="lock only the promotion, not the whole run")
    p.add_argument("--lease-ttl", type=float, default=900.0, help="lease expiry in seconds (renewed every ttl/3)")
    p.add_argument("--lease-wait", type=float, default=0.0, help="seconds to wait for another run's lease")
    p.add_argument("--run-id", help="run id (default: UTC time + random suffix; KFP passes its run id)")
    p.add_argument("--fail-on-reject", action="store_true", help="exit 3 when the candidate is not promoted")
    p.add_argument("--json", action="store_true", help="print the full run record")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_guard(cmd_redistill), command="redistill")
