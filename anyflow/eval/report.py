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
      "sample_prompts": [str],                          # the prompt of each tiled video (every cell, left to right)
      "losses": {stage: [record, ...] | path},          # JSONL records {"step": .., "loss": .., "loss/x": ..}
      "lineage": [item of anyflow.storage.lineage(uri)],  # {"uri", "depth", "manifest_sha256", "manifest", "ok", ..}
      "vbench": {model: {"dimensions": {dim: {"status": "ok", "score": x} | {"status": "not run",
                 "reason": str}}, "kind": "t2v" | "i2v"}},
      "promotions": {"live": model, "candidate": model | None,
                     "history": [{"model", "since", "uri", "metrics": {metric: float}}]},
      "notes": [str],
    }

Plots: one quality-vs-NFE figure per metric (a line per model); one loss figure per stage (a line
per numeric key); with ``promotions`` and both models present in ``metrics``, one candidate-vs-live
figure per shared metric. Sample previews: one GIF per (model, NFE). Legends sit beside the axes, never
on the data. Curves that coincide are said so in the figure's caption (each model keeps its own marker
and line style, so a curve under another still shows); loss series equal at every step are drawn once,
labelled ``a = b``. Under the loss plots a table gives each stage's last logged loss and the mean over
its last quarter of logged steps (a single step is one small batch: noisy, and can be exactly 0).
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
.grid img{image-rendering:pixelated;border:1px solid #ccd}figcaption{max-width:560px;font-size:13px}
.prompt{font-style:italic}.badge{background:#1b7d3a;color:#fff;border-radius:4px;padding:1px 6px;font-size:12px}
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


_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_LINESTYLES = ("-", "--", ":", "-.")


def _legend(ax: Any) -> None:
    """The legend beside the axes (``bbox_inches="tight"`` widens the image), so it never hides data."""
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, frameon=False)


def _coinciding(series: Mapping[str, Mapping[int, float]]) -> list[tuple[str, str, float]]:
    """``(earlier, later, largest |difference|)`` for the pairs of series that lie on each other in a plot:
    the same x values and every difference within 1% of the plotted range (or equal, for a flat plot)."""
    values = [v for pts in series.values() for v in pts.values() if math.isfinite(v)]
    span = (max(values) - min(values)) if values else 0.0
    tol = 0.01 * span if span > 0 else 1e-12
    names = list(series)
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            pa, pb = series[a], series[b]
            if not pa or set(pa) != set(pb):
                continue
            diffs = [abs(pa[x] - pb[x]) for x in pa]
            if all(math.isfinite(d) and d <= tol for d in diffs):
                out.append((a, b, max(diffs)))
    return out


def _overlap_caption(series: Mapping[str, Mapping[int, float]]) -> str:
    pairs = _coinciding(series)
    if not pairs:
        return ""
    groups: list[list[str]] = []  # models whose curves lie on one another (connected by coinciding pairs)
    for a, b, _ in pairs:
        hit = [g for g in groups if a in g or b in g]
        merged = [m for m in series if m in {a, b}.union(*hit)]
        groups = [g for g in groups if g not in hit] + [merged]
    parts = []
    for group in groups:
        d = max(diff for a, b, diff in pairs if a in group and b in group)
        names = ", ".join(group[:-1]) + " and " + group[-1]
        parts.append(f"{names} lie on one another ("
                     + ("identical values" if d == 0 else f"largest difference {format_value(d)}") + ")")
    return "; ".join(parts) + ". Each model keeps its own marker and line style, so a hidden curve still shows."


def _nfe_plot(metric: str, series: Mapping[str, Mapping[int, float]], title: str | None = None) -> str:
    fig, ax = _figure()
    for i, (model, points) in enumerate(series.items()):
        xs = sorted(points)
        ys = [points[x] for x in xs]
        # later series: hollow markers of another shape and another line style, so coinciding curves stay visible
        ax.plot(xs, ys, marker=_MARKERS[i % len(_MARKERS)], linestyle=_LINESTYLES[i % len(_LINESTYLES)],
                markersize=7 - min(i, 3), markerfacecolor="none" if i else None, label=model)
    ticks = sorted({x for pts in series.values() for x in pts})
    if ticks and ticks[0] > 0:
        ax.set_xscale("log", base=2)
        ax.minorticks_off()
    ax.set_xticks(ticks, [str(x) for x in ticks])
    ax.set_xlabel("NFE")
    ax.set_ylabel(metric)
    ax.set_title(title or f"{metric} vs NFE")
    ax.grid(alpha=0.3)
    _legend(ax)
    return _png(fig)


def _figure_html(src: str, alt: str, caption: str = "") -> str:
    cap = f'<figcaption class="muted">{html.escape(caption)}</figcaption>' if caption else ""
    return f"<figure>{_img(src, alt)}{cap}</figure>"


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


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _loss_series(records: list[dict[str, Any]]) -> dict[str, list[tuple[Any, float]]]:
    """``{key: [(step, value), ...]}`` of every numeric key but ``step``."""
    keys = [k for k in dict.fromkeys(k for r in records for k in r) if k != "step"]
    series = {k: [(r.get("step", i), float(r[k])) for i, r in enumerate(records) if _is_number(r.get(k))] for k in keys}
    return {k: pts for k, pts in series.items() if pts}


def _merge_equal(series: dict[str, list[tuple[Any, float]]]) -> tuple[dict[str, list[tuple[Any, float]]], list[str]]:
    """Series equal at every step (relative 1e-4) drawn once under the label ``a = b``; the merged groups."""
    out: dict[str, list[tuple[Any, float]]] = {}
    groups: list[list[str]] = []
    for key, pts in series.items():
        for group in groups:
            ref = series[group[0]]
            if [s for s, _ in ref] == [s for s, _ in pts] and all(
                math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-12) for (_, a), (_, b) in zip(ref, pts, strict=True)
            ):
                group.append(key)
                break
        else:
            groups.append([key])
    for group in groups:
        out[" = ".join(group)] = series[group[0]]
    return out, [" = ".join(g) for g in groups if len(g) > 1]


def _loss_plot(stage: str, records: list[dict[str, Any]]) -> tuple[str | None, str]:
    """The loss figure of a stage and its caption (which series coincide, and why for the flow-map loss)."""
    series, merged = _merge_equal(_loss_series(records))
    if not series:
        return None, ""
    fig, ax = _figure()
    for i, (label, pts) in enumerate(series.items()):
        ax.plot([p[0] for p in pts], [p[1] for p in pts], linestyle=_LINESTYLES[i % len(_LINESTYLES)], label=label)
    values = [v for pts in series.values() for _, v in pts]
    if values and min(values) > 0 and max(values) / min(values) > 100:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(f"{stage}: training loss")
    ax.grid(alpha=0.3)
    _legend(ax)
    caption = ""
    if merged:
        caption = "Equal at every step, drawn once: " + "; ".join(merged) + "."
        if any("loss/diffusion" in m for m in merged):
            caption += (" With adaptive scaling (method §6.5) every general pair's loss is rescaled to the mean of the"
                        " diffusion pairs, so the flow-map loss equals its diffusion part by construction.")
    return _png(fig), caption


def _final_losses(losses: Mapping[str, list[dict[str, Any]]]) -> list[str]:
    """Per stage and loss series: the last logged value and the mean over the last quarter of logged steps."""
    rows = []
    for stage, records in losses.items():
        series, _ = _merge_equal(_loss_series(records))
        for label, pts in series.items():
            if not label.split(" = ")[0].startswith(("loss", "forward/loss")):
                continue
            k = max(1, math.ceil(len(pts) / 4))
            tail = [v for _, v in pts[-k:]]
            rows.append([html.escape(stage), html.escape(label), str(pts[-1][0]), format_value(pts[-1][1]),
                         f"{format_value(sum(tail) / len(tail))} (steps {pts[-k][0]}–{pts[-1][0]})"])
    if not rows:
        return []
    return [
        "<h3>Final training losses</h3>",
        _table(["stage", "series", "last step", "loss at the last step", "mean of the last quarter"], rows, left=2),
        '<p class="muted">A step\'s loss is one small batch: it is noisy, and can be exactly 0 (a flow-map step whose'
        " diffusion pairs all fall where the loss weight is 0, near t = 1000, has a zero loss after adaptive"
        " scaling). Compare the mean of the last quarter.</p>",
    ]


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
        out.append(_figure_html(_nfe_plot(name, series), f"{name} vs NFE", _overlap_caption(series)))
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


def _samples_section(samples: Mapping[str, Mapping[Any, Any]], prompts: Sequence[str] = ()) -> list[str]:
    nfes = sorted({int(n) for by_nfe in samples.values() for n in by_nfe})
    out = [
        "<h2>Samples</h2>",
        '<p class="muted">Animated previews; every cell uses the same seed and prompt, so rows compare models and'
        " columns compare NFEs on the same noise.</p>",
    ]
    if len(prompts) == 1:
        out.append(f'<p class="prompt">Prompt: &ldquo;{html.escape(str(prompts[0]))}&rdquo;</p>')
    elif prompts:
        items = "".join(f"<li>{html.escape(str(p))}</li>" for p in prompts)
        out.append(f'<p class="prompt">Prompts, left to right in each cell:</p><ol class="prompt">{items}</ol>')
    head = '<tr><th class="l">model</th>' + "".join(f"<th>NFE {n}</th>" for n in nfes) + "</tr>"
    rows = []
    for model, by_nfe in samples.items():
        by_int = {int(n): v for n, v in by_nfe.items()}
        alt = f" — {'; '.join(map(str, prompts))}" if prompts else ""
        side = 64 if len(prompts) > 1 else 96  # several prompts tiled in a cell: six NFE columns still fit the page
        cells = [_img(_gif(by_int[n], min_side=side), f"{model} NFE {n}{alt}") if n in by_int else "" for n in nfes]
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


def _summary_value(value: Any) -> str:
    """A summary cell: a mapping as one ``key: value`` line per item, a list as comma-separated values."""
    if isinstance(value, Mapping):
        return "<br>".join(f"<b>{html.escape(str(k))}</b>: {_summary_value(v)}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return html.escape(", ".join(map(str, value)))
    return html.escape(str(value))


def _lineage_section(lineage: Sequence[Mapping[str, Any]]) -> list[str]:
    """The items of :func:`anyflow.storage.lineage`: each artifact's stage (the manifest's ``extra.stage``, else
    its kind), URI, manifest digest, its parents (by stage and digest) and whether each parent is still the
    version its child recorded."""
    by_uri = {str(a.get("uri")): a for a in lineage}

    def stage(a: Mapping[str, Any] | None) -> str:
        m = (a or {}).get("manifest") or {}
        return str((m.get("extra") or {}).get("stage") or m.get("kind") or "")

    rows = []
    for a in lineage:
        m = a.get("manifest")
        digest = str(a.get("manifest_sha256") or "")
        parents = []
        for p in (m or {}).get("parents", []):
            ref = by_uri.get(str(p.get("uri")))
            name = stage(ref) or str(p.get("kind") or p.get("uri"))
            parents.append(f"{html.escape(name)} <code>{html.escape(str(p.get('manifest_sha256', ''))[:16])}</code>")
        if m is None:
            check = '<span class="bad">manifest missing</span>'
        elif a.get("ok") is False:
            check = '<span class="bad">changed since its child recorded it</span>'
        elif a.get("ok"):
            check = '<span class="ok">as recorded</span>'
        else:
            check = '<span class="muted">evaluated artifact</span>'
        rows.append([
            "&nbsp;&nbsp;" * int(a.get("depth") or 0) + html.escape(stage(a) or "?"),
            html.escape(str((m or {}).get("kind", ""))),
            html.escape(str(a.get("uri", ""))),
            f'<code title="{html.escape(digest)}">{html.escape(digest[:16])}</code>',
            "<br>".join(parents) or '<span class="muted">none</span>',
            check,
        ])
    return [
        "<h2>Artifact lineage</h2>",
        '<p class="muted">The evaluated generator and every artifact it was made from; digests are the sha256 of'
        " each manifest.json (first 16 hex digits), as its children record them.</p>",
        _table(["stage", "kind", "uri", "manifest digest", "parents", "check"], rows, left=6),
    ]


def build_report(data: Mapping[str, Any], out_path: str | os.PathLike[str]) -> Path:
    """Write the self-contained HTML report described in the module docstring; returns its path."""
    unknown = set(data) - {
        "title",
        "summary",
        "metrics",
        "samples",
        "sample_prompts",
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
        rows = [[html.escape(str(k)), _summary_value(v)] for k, v in data["summary"].items()]
        parts += ["<h2>Run summary</h2>", _table(["item", "value"], rows, left=2)]
    for note in data.get("notes", []):
        parts.append(f'<p class="muted">{html.escape(str(note))}</p>')
    metrics = data.get("metrics") or {}
    if metrics:
        parts += _metrics_section(metrics)
    if data.get("samples"):
        parts += _samples_section(data["samples"], list(data.get("sample_prompts") or ()))
    if data.get("losses"):
        losses = {stage: _read_losses(records) for stage, records in data["losses"].items()}
        parts += ["<h2>Training losses</h2>", '<div class="plots">']
        for stage, records in losses.items():
            src, caption = _loss_plot(stage, records)
            parts.append(
                _figure_html(src, f"{stage} loss", caption)
                if src
                else f'<p class="muted">{html.escape(stage)}: no numeric loss records.</p>'
            )
        parts.append("</div>")
        parts += _final_losses(losses)
    if data.get("lineage"):
        parts += _lineage_section(data["lineage"])
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
