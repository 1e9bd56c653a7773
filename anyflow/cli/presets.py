"""``anyflow presets [NAME]``: list the presets, or print one fully resolved."""

from __future__ import annotations

import argparse
import json


def _presets(args: argparse.Namespace) -> int:
    from anyflow.config import (
        PRESETS,
        apply_overrides,
        get_preset,
        load_overrides_file,
        merge_overrides,
        parse_override_args,
        to_dict,
    )

    if args.name is None:
        width = max(map(len, PRESETS))
        for name, fn in PRESETS.items():
            print(f"{name:<{width}}  {(fn.__doc__ or '').strip().splitlines()[0]}")
        return 0
    from_file = load_overrides_file(args.config) if args.config else {}
    preset = apply_overrides(get_preset(args.name), merge_overrides(from_file, parse_override_args(args.overrides)))
    print(json.dumps(to_dict(preset), indent=1))
    return 0


def add_cli(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("presets", help="list presets or print one fully resolved",
                       description="Without NAME: list presets. With NAME: print its resolved configuration.")
    p.add_argument("name", nargs="?", help="preset to print")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a value (validated strictly)")
    p.add_argument("--config", default=None, metavar="YAML", help="YAML file of overrides, applied before --set")
    p.set_defaults(func=_presets)
