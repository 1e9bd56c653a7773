"""Bytes moved per stage through the storage layer, against a real S3 API server.

Runs the stages of the tiny preset one after another (prepare_data, train_teacher, train_flowmap, distill,
finetune, evaluate -- the evaluate stage followed by what its KFP component does after it: ``copy_report`` into
the task's HTML output) into an ``s3://`` store on a moto server started here on 127.0.0.1 (or ``--endpoint``),
and counts every byte that crosses to S3.

The counter sits at the one place the storage layer's bytes cross to S3: the boto3 clients of
:mod:`anyflow._storage_s3` (every ``client()`` it hands out gets two botocore event handlers: ``before-send.s3``
counts each HTTP request's body -- ``Content-Length`` -- and ``response-received.s3`` each response's body,
HEAD responses aside; retries and every multipart part count as sent). The storage layer's other way to S3,
s3fs (``storage.fs_and_path`` / ``open_url``, used for raw data sources), is counted by its calls: the tiny
preset's stages make none, and the table says so.

Each request is put in one class by the object key it names (for a listing: its prefix):

* ``input``: under one of the stage's input artifacts;
* ``output``: under the stage's output artifact;
* ``checkpoint``: under the stage's training checkpoints (``<store>/checkpoints/<stage>/<key>``);
* ``other``: anything else (none expected).

The figure is (input + output bytes moved) / (bytes of the input files the stage uses + its output artifact), the
checkpoint traffic apart (bytes, number of checkpoints published, cadence). "Uses" is stated here, from what each
stage needs, not measured from the code: every input's ``manifest.json``; a dataset input's files, all of them,
for the training stages (evaluate of the tiny preset samples procedural prompts and reads none); of a
checkpoint input, ``model.json`` and the adapters the stage loads (teacher: ``teacher``; flow map and generator:
``generator``; never the distill artifact's ``critic``), plus ``log.jsonl`` where evaluate plots the loss curves.
The output is its files plus its manifest.

    python -m benchmarks.bench_bytes            # the tiny preset's stages at its own step counts
    python -m benchmarks.bench_bytes --quick    # fewer steps (the --quick smoke of `anyflow bench`)
"""

from __future__ import annotations

import argparse
import html
import json
import os
import re
import sys
import threading
import time
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

REPO = Path(__file__).resolve().parents[1]

STAGE_ORDER = ("prepare_data", "train_teacher", "train_flowmap", "distill", "finetune", "evaluate")
# role -> (adapters the stage loads from it, whether it reads the training log): see the module docstring
USES = {
    "train_teacher": {"dataset": "all"},
    "train_flowmap": {"dataset": "all"},
    "distill": {"dataset": "all", "teacher": (("teacher",), False), "flowmap": (("generator",), False)},
    "finetune": {"dataset": "all", "generator": (("generator",), False)},
    "evaluate": {
        "dataset": "none",
        "teacher": (("teacher",), True),
        "flowmap": (("generator",), True),
        "generator": (("generator",), True),
    },
}
QUICK = {
    "teacher.train.steps": 8,
    "teacher.train.checkpoint_every": 4,
    "flowmap.train.steps": 8,
    "flowmap.train.checkpoint_every": 4,
    "distill.train.steps": 4,
    "distill.train.checkpoint_every": 2,
    "finetune.train.steps": 4,
    "finetune.train.checkpoint_every": 2,
    "evaluate.nfes": "1,2",
    "evaluate.reference_steps": 8,
    "evaluate.num_prompts": 2,
}


class ByteCounter:
    """Per-request byte counts of the storage layer's boto3 clients (see the module docstring)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []
        self.stage = ""
        self._local = threading.local()
        self._lock = threading.Lock()
        self._hooked: set[int] = set()
        self.s3fs_calls = 0

    def hook(self, client: Any) -> Any:
        with self._lock:
            if id(client) not in self._hooked:
                self._hooked.add(id(client))
                client.meta.events.register("before-send.s3", self._before_send)
                client.meta.events.register("response-received.s3", self._received)
        return client

    def _before_send(self, request: Any, event_name: str = "", **_: Any) -> None:
        length = request.headers.get("Content-Length")
        if length is not None:
            sent = int(length)
        elif isinstance(request.body, (bytes, bytearray)):
            sent = len(request.body)
        else:
            sent = 0 if request.body is None else len(request.body)
        parts = urlsplit(request.url)
        path = unquote(parts.path).lstrip("/")  # path-style addressing: bucket/key
        query = parse_qs(parts.query, keep_blank_values=True)
        if "prefix" in query:  # a listing: classified by its prefix
            path = path.rstrip("/") + "/" + query["prefix"][0]
        elif "delete" in query and isinstance(request.body, (bytes, bytearray)):  # DeleteObjects: its 1st key
            key = re.search(rb"<Key>(.*?)</Key>", bytes(request.body))
            if key:
                path = path.rstrip("/") + "/" + html.unescape(key.group(1).decode())
        row = {
            "stage": self.stage,
            "op": event_name.rsplit(".", 1)[-1],
            "method": request.method,
            "url": "s3://" + path,
            "sent": sent,
            "received": 0,
        }
        with self._lock:
            self.rows.append(row)
        self._local.row = row

    def _received(self, response_dict: dict | None = None, **_: Any) -> None:
        row = getattr(self._local, "row", None)
        if row is None or response_dict is None or row["method"] == "HEAD":
            return
        row["received"] += int(response_dict.get("headers", {}).get("content-length", 0) or 0)
        self._local.row = None


def install(counter: ByteCounter) -> None:
    """Hook every client :mod:`anyflow._storage_s3` hands out; count s3fs filesystems made for ``s3://``."""
    from anyflow import _storage_s3, storage

    make = _storage_s3.client

    def client(*, transfer: bool = False) -> Any:
        return counter.hook(make(transfer=transfer))

    _storage_s3.client = client
    fs_and_path = storage.fs_and_path

    def counted_fs(url: Any) -> Any:
        if storage.is_remote(url):
            counter.s3fs_calls += 1
        return fs_and_path(url)

    storage.fs_and_path = counted_fs


def _under(url: str, prefix: str) -> bool:
    return url == prefix or url.startswith(prefix.rstrip("/") + "/")


def used_bytes(stage: str, inputs: dict[str, str]) -> tuple[int, int]:
    """Bytes of the input files ``stage`` uses (module docstring), read from the inputs' manifests: (with their
    manifests, without)."""
    from anyflow import storage

    total = manifests = 0
    for role, url in inputs.items():
        manifest_bytes = len(storage.read_bytes(storage.join(url, "manifest.json")))
        files = storage.read_manifest(url)["files"]
        use = USES[stage].get(role, "none")
        if use == "none":
            continue  # not read at all: its manifest only serves the cache key
        total += manifest_bytes
        manifests += manifest_bytes
        if use == "all":
            total += sum(e["size"] for e in files.values())
            continue
        adapters, log = use
        meta = json.loads(storage.fetch_file(url, "model.json").read_bytes())
        names = ["model.json", *(meta["adapters"][a]["file"] for a in adapters)] + (
            ["log.jsonl"] if log else []
        )
        total += sum(files[n]["size"] for n in names if n in files)
    return total, total - manifests


def output_bytes(url: str) -> tuple[int, int]:
    """Bytes of the output artifact: (its files and manifest, its files)."""
    from anyflow import storage

    raw = storage.read_bytes(storage.join(url, "manifest.json"))
    files = sum(e["size"] for e in storage.read_manifest(url)["files"].values())
    return len(raw) + files, files


META_OPS = {"ListObjectsV2", "DeleteObjects", "HeadObject", "HeadBucket"}


def is_meta(row: dict[str, Any]) -> bool:
    """A manifest read or write, a listing, a HEAD or a delete: per-artifact bookkeeping whose bytes do not grow
    with the model (the "files only" ratio leaves them out)."""
    return row["op"] in META_OPS or row["url"].endswith("/manifest.json")


class _HTML:
    """A stand-in for KFP's ``Output[HTML]`` (``copy_report`` writes to ``.path``)."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)


def run(store: str, overrides: dict[str, Any], counter: ByteCounter, work: Path) -> list[dict[str, Any]]:
    """Run every stage into ``store``; one summary dict per stage."""
    from anyflow import storage
    from anyflow.config import apply_overrides, get_preset
    from anyflow.stages import run_stage
    from components._io import copy_report

    cfg = apply_overrides(get_preset("tiny"), overrides)
    uris: dict[str, str] = {}
    plan = {
        "prepare_data": {},
        "train_teacher": {"dataset": "prepare_data"},
        "train_flowmap": {"dataset": "prepare_data"},
        "distill": {"dataset": "prepare_data", "teacher": "train_teacher", "flowmap": "train_flowmap"},
        "finetune": {"dataset": "prepare_data", "generator": "distill"},
        "evaluate": {
            "generator": "distill",
            "teacher": "train_teacher",
            "dataset": "prepare_data",
            "flowmap": "train_flowmap",
        },
    }
    out = []
    for stage in STAGE_ORDER:
        inputs = {role: uris[src] for role, src in plan[stage].items()}
        # each stage's pod starts with an empty cache
        os.environ["ANYFLOW_CACHE_DIR"] = str(work / "cache" / stage)
        counter.stage = stage
        first = len(counter.rows)
        t0 = time.perf_counter()
        res = run_stage(stage, store=store, overrides=overrides, inputs=inputs, progress=False)
        if stage == "evaluate":  # what the evaluate component does next (components/evaluate)
            written = getattr(res, "report_bytes", None)  # absent before the report was handed back
            copy_report(
                _HTML(work / "report.html"), res.report, str(res.uri), *([written] if written else [])
            )
        seconds = time.perf_counter() - t0
        counter.stage = ""
        if res.cached:
            raise RuntimeError(f"{stage} came from the cache: run into a fresh store")
        uris[stage] = res.uri
        key = res.uri.rstrip("/").rsplit("/", 1)[1]
        ckpt = storage.join(store, "checkpoints", stage, key)
        moved: dict[str, list[int]] = defaultdict(lambda: [0, 0])  # class -> [written, read]
        file_bytes = 0  # input, output and other bytes of file bodies (no bookkeeping: is_meta)
        published: set[str] = set()
        for row in counter.rows[first:]:
            u = row["url"]
            if _under(u, ckpt):
                cls = "checkpoint"
                rel = u[len(ckpt.rstrip("/")) + 1 :]
                if rel.endswith("/manifest.json") and row["op"] == "PutObject":
                    published.add(rel.split("/", 1)[0])
            elif _under(u, res.uri):
                cls = "output"
            elif any(_under(u, v) for v in inputs.values()):
                cls = "input"
            else:
                cls = "other"
            moved[cls][0] += row["sent"]
            moved[cls][1] += row["received"]
            if cls != "checkpoint" and not is_meta(row):
                file_bytes += row["sent"] + row["received"]
        section = {
            "train_teacher": "teacher",
            "train_flowmap": "flowmap",
            "distill": "distill",
            "finetune": "finetune",
        }.get(stage)
        tr = getattr(cfg, section).train if section else None
        left = storage.list_prefix(ckpt)
        out.append(
            {
                "stage": stage,
                "seconds": seconds,
                "moved": dict(moved),
                "used_inputs": used_bytes(stage, inputs),
                "output": output_bytes(res.uri),
                "file_bytes": file_bytes,
                "checkpoints": sorted(published),
                "cadence": f"every {tr.checkpoint_every} of {tr.steps} steps" if tr else "-",
                "left": len(left),
                "requests": len(counter.rows) - first,
            }
        )
    return out


def _kb(n: float) -> str:
    return f"{n / 1024:.1f}"


def report(rows: list[dict[str, Any]], where: str, s3fs_calls: int) -> None:
    print(f"\nbytes through the storage layer per stage, tiny preset, {where} (KiB; read = S3 -> process)")
    head = (
        f"{'stage':<14}{'in read':>9}{'in written':>11}{'out written':>12}{'out read':>9}{'other':>7}"
        f"{'used in':>9}{'output':>8}{'moved/(in+out)':>16}{'files only':>11}{'ckpt written':>13}{'ckpt read':>10}"
        f"{'ckpts':>6}  cadence, left after run"
    )
    print(head)
    for r in rows:
        m = r["moved"]
        inp, outp, oth, ck = (m.get(k, [0, 0]) for k in ("input", "output", "other", "checkpoint"))
        denom = r["used_inputs"][0] + r["output"][0]
        ratio = (sum(inp) + sum(outp) + sum(oth)) / denom if denom else float("nan")
        files = r["used_inputs"][1] + r["output"][1]
        files_ratio = r["file_bytes"] / files if files else float("nan")
        print(
            f"{r['stage']:<14}{_kb(inp[1]):>9}{_kb(inp[0]):>11}{_kb(outp[0]):>12}{_kb(outp[1]):>9}"
            f"{_kb(sum(oth)):>7}{_kb(r['used_inputs'][0]):>9}{_kb(r['output'][0]):>8}{ratio:>16.2f}{files_ratio:>11.2f}"
            f"{_kb(ck[0]):>13}{_kb(ck[1]):>10}{len(r['checkpoints']):>6}  {r['cadence']}, "
            f"{r['left']} checkpoint files left"
        )
    print(f"s3fs filesystems opened on s3:// URLs (not counted above): {s3fs_calls}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--quick",
        action="store_true",
        help="fewer training steps (8/8/4/4, checkpoints every 4/4/2/2) and a 2-NFE evaluate",
    )
    ap.add_argument("--endpoint", help="use this S3 endpoint instead of starting a local moto server")
    ap.add_argument("--bucket", default="anyflow-bench", help="bucket to use (created if missing)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = ap.parse_args(argv)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
    import tempfile

    import torch

    torch.set_num_threads(args.threads)
    from benchmarks._s3 import s3_endpoint

    counter = ByteCounter()
    with tempfile.TemporaryDirectory(prefix="anyflow-bench-bytes-") as tmp, \
            s3_endpoint(args.endpoint, args.bucket) as where:
        os.environ["ANYFLOW_WORK_DIR"] = str(Path(tmp) / "work")
        install(counter)
        store = f"s3://{args.bucket}/bench-bytes-{uuid.uuid4().hex[:8]}"
        rows = run(store, QUICK if args.quick else {}, counter, Path(tmp))
    report(
        rows,
        where + ("; --quick step counts" if args.quick else "; the preset's step counts"),
        counter.s3fs_calls,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
