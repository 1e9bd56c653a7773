"""One self-contained ``report.html`` for an evaluation run (issue 7; promotion section: issue 9).

Everything is inline: CSS in a ``<style>`` block, plots as base64 PNG (matplotlib, Agg backend),
sample previews as base64 animated GIF. No external URL is referenced, so the file renders offline
and as a KFP ``Output[HTML]`` artifact.

The ``data`` schema (every key except ``title`` is optional; absent sections are left out)::

    {
      "title": str,
      "summary": {label: value},                        # run summary (preset, seeds, commit, ...)
      "metrics": {model: {nfe: {metric: float}}},       # e.g. MetricTable.to_nested()
      "samples": {model: {nfe: video | [video, ...]}},  # video: uint8 (T, H, W, 3); a list is tiled
      "losses": {stage: [record, ...] | path},          # JSONL records {"step": .., "loss": .., "loss/x": ..}
      "lineage": [{"stage", "uri", "digest", "parents": [uri, ...]}],
      "vbench": {model: {"dimensions": {dim: {"status": "ok", "score": x} | {"status": "not run",
                 "reason": str}}, "kind": "t2v" | "i2v"}},
      "promotions": {"live": model, "candidate": model | None,
                     "history": [{"model", "since", "uri", "metrics": {metric: float}}]},
      "notes": [str],
    }

Plots: one quality-vs-NFE figure per metric (a line per model); one loss figure per stage (a line
per numeric key); with ``promotions`` and both models present in ``metrics``, one candidate-vs-live
figure per shared metric. Sample previews: one GIF per (model, NFE).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from anyflow.eval.metrics import format_value

__all__ = ["build_report", "count_images"]

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1200px;color:#1d232b;background:#fff}
h1{margin-bottom:4px}h2{border-bottom:2px solid #e3e7ec;padding-bottom:4px;margin-top:36px}
table{border-collapse:collapse;margin:8px 0;font-size:14px}th,td{border:1px solid #d5dbe2;padding:4px 10px;text-align:right}
th{background:#f2f5f8}td.l,th.l{text-align:left}.muted{color:#6b7580}.bad{color:#b3261e}.ok{color:#1b7d3a}
.plots{display:flex;flex-wrap:wrap;gap:12px}.plots figure{margin:0}.grid td{text-align:center;vertical-align:top}
.grid img{image-rendering:pixelated;border:1px solid #ccd}.badge{background:#1b7d3a;color:#fff;border-radius:4px;padding:1px 6px;font-size:12px}
"""


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _img(src: str, alt: str, width: int | None = None) -> str:
    w = f' width="{width}"' if width else ""
    return f'<img src="{src}" alt="{html.escape(alt)}"{w}>'


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt.subplots(figsize=(4.6, 3.2))


def _nfe_plot(metric: str, series: Mapping[str, Mapping[int, float]], title: str | None = None) -> str:
    fig, ax = _figure()
    for model, points in series.items():
        xs = sorted(points)
        ys = [points[x] for x in xs]
        ax.plot(xs, ys, marker="o", label=model)
    ticks = sorted({x for pts in series.values() for x in pts})
    if ticks and ticks[0] > 0:
        ax.set_xscale("log", base=2)
        ax.minorticks_off()
    ax.set_xticks(ticks, [str(x) for x in ticks])
    ax.set_xlabel("NFE")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} vs NFE")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def _gif(video: Any, min_side: int = 96) -> str:
    from PIL import Image

    frames = _tile(video)
    _, h, w, _ = frames.shape
    scale = max(1, math.ceil(min_side / min(h, w)))
    images = [Image.fromarray(f).resize((w * scale, h * scale), Image.NEAREST) for f in frames]
    buf = io.BytesIO()
    images[0].save(buf, format="GIF", save_all=True, append_images=images[1:], duration=125, loop=0)
    return "data:image/gif;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _tile(video: Any) -> np.ndarray:
    """A video (T, H, W, 3) or a list of them tiled side by side (shortest length wins)."""
    videos = [np.asarray(v) for v in video] if isinstance(video, list | tuple) else [np.asarray(video)]
    for v in videos:
        if v.dtype != np.uint8 or v.ndim != 4 or v.shape[-1] != 3:
            raise ValueError(f"report samples must be uint8 videos (T, H, W, 3); got {v.dtype} {v.shape}")
    t = min(v.shape[0] for v in videos)
    return np.concatenate([v[:t] for v in videos], axis=2)


def _read_losses(records: Sequence[Mapping[str, Any]] | str | os.PathLike[str]) -> list[dict[str, Any]]:
    if isinstance(records, str | os.PathLike):
        path = Path(records)
        out = []
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not a JSON line ({e.msg}); fix or remove the line.") from e
        return out
    return [dict(r) for r in records]


def _loss_plot(stage: str, records: list[dict[str, Any]]) -> str | None:
    keys = [k for k in dict.fromkeys(k for r in records for k in r) if k != "step"]
    keys = [
        k
        for k in keys
        if any(isinstance(r.get(k), int | float) and not isinstance(r.get(k), bool) for r in records)
    ]
    if not keys:
        return None
    fig, ax = _figure()
    for key in keys:
        pts = [
            (r.get("step", i), r[key]) for i, r in enumerate(records) if isinstance(r.get(key), int | float)
        ]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], label=key)
    values = [r[k] for r in records for k in keys if isinstance(r.get(k), int | float)]
    if values and min(values) > 0 and max(values) / min(values) > 100:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(f"{stage}: training loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _png(fig)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]], left: int = 1) -> str:
    def cls(i: int) -> str:
        return ' class="l"' if i < left else ""

    head = "".join(f"<th{cls(i)}>{html.escape(h)}</th>" for i, h in enumerate(header))
    body = "".join("<tr>" + "".join(f"<td{cls(i)}>{c}</td>" for i, c in enumerate(r)) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _metrics_section(metrics: Mapping[str, Mapping[Any, Mapping[str, float]]]) -> list[str]:
    names = list(dict.fromkeys(m for by_nfe in metrics.values() for vals in by_nfe.values() for m in vals))
    out = ["<h2>Quality vs NFE</h2>", '<div class="plots">']
    for name in names:
        series = {
            model: {int(n): float(v[name]) for n, v in by_nfe.items() if name in v}
            for model, by_nfe in metrics.items()
        }
        series = {m: s for m, s in series.items() if s}
        out.append(f"<figure>{_img(_nfe_plot(name, series), f'{name} vs NFE')}</figure>")
    out.append("</div><h2>Metrics</h2>")
    rows = []
    for model, by_nfe in metrics.items():
        for nfe in sorted(by_nfe, key=int):
            vals = by_nfe[nfe]
            rows.append(
                [html.escape(model), str(int(nfe))]
                + [format_value(float(vals[m])) if m in vals else "" for m in names]
            )
    out.append(_table(["model", "NFE", *names], rows))
    return out


def _samples_section(samples: Mapping[str, Mapping[Any, Any]]) -> list[str]:
    nfes = sorted({int(n) for by_nfe in samples.values() for n in by_nfe})
    out = [
        "<h2>Samples</h2>",
        '<p class="muted">Animated previews; columns share seeds, so each column compares NFEs on the same noise.</p>',
    ]
    head = '<tr><th class="l">model</th>' + "".join(f"<th>NFE {n}</th>" for n in nfes) + "</tr>"
    rows = []
    for model, by_nfe in samples.items():
        by_int = {int(n): v for n, v in by_nfe.items()}
        cells = [_img(_gif(by_int[n]), f"{model} NFE {n}") if n in by_int else "" for n in nfes]
        rows.append(
            f'<tr><td class="l">{html.escape(model)}</td>' + "".join(f"<td>{c}</td>" for c in cells) + "</tr>"
        )
    out.append(f'<table class="grid">{head}{"".join(rows)}</table>')
    return out


def _vbench_section(vbench: Mapping[str, Mapping[str, Any]]) -> list[str]:
    from anyflow.eval.vbench import aggregate

    out = ["<h2>VBench</h2>"]
    for model, entry in vbench.items():
        dims = entry.get("dimensions", {})
        agg = aggregate(dims, kind=entry.get("kind", "t2v"))
        rows = []
        for dim, rec in dims.items():
            if rec.get("status") == "ok":
                rows.append(
                    [html.escape(dim), f'<span class="ok">{format_value(float(rec["score"]))}</span>']
                )
            else:
                rows.append(
                    [
                        html.escape(dim),
                        f'<span class="bad">not run: {html.escape(str(rec.get("reason", "unknown")))}</span>',
                    ]
                )
        out.append(f"<h3>{html.escape(model)}</h3>" + _table(["dimension", "score"], rows))
        parts = [k for k in ("quality", "semantic", "i2v", "total") if k in agg]
        cells = [
            format_value(agg[k]) if agg[k] is not None else '<span class="bad">not computed</span>'
            for k in parts
        ]
        out.append(_table(parts, [cells], left=0))
        if agg["reason"]:
            out.append(f'<p class="bad">Aggregate not computed: {html.escape(agg["reason"])}</p>')
    return out


def _promotion_section(promotions: Mapping[str, Any], metrics: Mapping[str, Any]) -> list[str]:
    live, candidate = promotions.get("live"), promotions.get("candidate")
    out = ["<h2>Promotion history</h2>"]
    out.append(
        f'<p>Live model: <b>{html.escape(str(live))}</b> <span class="badge">live</span>'
        + (f" &middot; candidate: <b>{html.escape(str(candidate))}</b>" if candidate else "")
        + "</p>"
    )
    history = list(promotions.get("history", []))
    names = list(dict.fromkeys(k for h in history for k in h.get("metrics", {})))
    rows = []
    for h in history:
        mark = ' <span class="badge">live</span>' if h.get("model") == live else ""
        rows.append(
            [
                html.escape(str(h.get("model"))) + mark,
                html.escape(str(h.get("since", ""))),
                html.escape(str(h.get("uri", ""))),
            ]
            + [format_value(float(h["metrics"][m])) if m in h.get("metrics", {}) else "" for m in names]
        )
    out.append(_table(["model", "since", "uri", *names], rows, left=3))
    if candidate and live and candidate in metrics and live in metrics:
        shared = [
            m
            for m in dict.fromkeys(k for v in metrics[live].values() for k in v)
            if any(m in v for v in metrics[candidate].values())
        ]
        out.append('<div class="plots">')
        for m in shared:
            series = {
                f"{name} ({role})": {int(n): float(v[m]) for n, v in metrics[name].items() if m in v}
                for name, role in ((live, "live"), (candidate, "candidate"))
            }
            out.append(
                f"<figure>{_img(_nfe_plot(m, series, f'{m}: candidate vs live'), f'{m} candidate vs live')}</figure>"
            )
        out.append("</div>")
    return out


def build_report(data: Mapping[str, Any], out_path: str | os.PathLike[str]) -> Path:
    """Write the self-contained HTML report described in the module docstring; returns its path."""
    unknown = set(data) - {
        "title",
        "summary",
        "metrics",
        "samples",
        "losses",
        "lineage",
        "vbench",
        "promotions",
        "notes",
    }
    if unknown:
        raise ValueError(
            f"build_report: unknown keys {sorted(unknown)}; see the schema in anyflow/eval/report.py."
        )
    title = str(data.get("title", "AnyFlow evaluation report"))
    parts = [f"<h1>{html.escape(title)}</h1>"]
    if data.get("summary"):
        rows = [[html.escape(str(k)), html.escape(str(v))] for k, v in data["summary"].items()]
        parts += ["<h2>Run summary</h2>", _table(["item", "value"], rows, left=2)]
    for note in data.get("notes", []):
        parts.append(f'<p class="muted">{html.escape(str(note))}</p>')
    metrics = data.get("metrics") or {}
    if metrics:
        parts += _metrics_section(metrics)
    if data.get("samples"):
        parts += _samples_section(data["samples"])
    if data.get("losses"):
        parts += ["<h2>Training losses</h2>", '<div class="plots">']
        for stage, records in data["losses"].items():
            src = _loss_plot(stage, _read_losses(records))
            parts.append(
                f"<figure>{_img(src, f'{stage} loss')}</figure>"
                if src
                else f'<p class="muted">{html.escape(stage)}: no numeric loss records.</p>'
            )
        parts.append("</div>")
    if data.get("lineage"):
        rows = [
            [
                html.escape(str(a.get("stage", ""))),
                html.escape(str(a.get("uri", ""))),
                f"<code>{html.escape(str(a.get('digest', ''))[:16])}</code>",
                html.escape(", ".join(map(str, a.get("parents", [])))),
            ]
            for a in data["lineage"]
        ]
        parts += [
            "<h2>Artifact lineage</h2>",
            _table(["stage", "uri", "manifest digest", "parents"], rows, left=4),
        ]
    if data.get("promotions"):
        parts += _promotion_section(data["promotions"], metrics)
    if data.get("vbench"):
        parts += _vbench_section(data["vbench"])
    doc = (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{_CSS}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n"
    )
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(doc, encoding="utf-8")
    return out


def count_images(data: Mapping[str, Any]) -> int:
    """How many ``<img>`` the report of ``data`` promises (one per metric plot, sample, stage loss, promotion plot)."""
    metrics = data.get("metrics") or {}
    n = len({m for by_nfe in metrics.values() for v in by_nfe.values() for m in v})
    n += sum(len(by_nfe) for by_nfe in (data.get("samples") or {}).values())
    n += len(data.get("losses") or {})
    promo = data.get("promotions") or {}
    live, cand = promo.get("live"), promo.get("candidate")
    if live in metrics and cand in metrics:
        live_m = {k for v in metrics[live].values() for k in v}
        n += len(live_m & {k for v in metrics[cand].values() for k in v})
    return n
