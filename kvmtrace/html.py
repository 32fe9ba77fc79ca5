"""Self-contained HTML for `report --format html` and `diff --format html`:
inline SVG plots and plain tables, so one file can be mailed or archived.

Every value from a recording or the command line (paths, host and kernel
names, VMA names, reasons, table cells and headers) is HTML-escaped where it
is put into the page (``_e``, and pandas ``to_html(escape=True)``): a
recording cannot put markup or a script into the report.
"""

from __future__ import annotations

import html

import numpy as np
import pandas as pd

from . import plots
from .analysis import pages
from .analysis.compare import Comparison
from .analysis.model import Model

STYLE = """
body{font-family:system-ui,sans-serif;margin:2em;max-width:1200px;color:#222}
table{border-collapse:collapse;font-size:12px;margin:0.5em 0 1.5em}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}
th{background:#f0f0f0} .reg{color:#b00;font-weight:bold} .ok{color:#080}
.plots{display:flex;flex-wrap:wrap;gap:1em} h2{margin-top:1.5em}
"""


def _e(x) -> str:
    """Any value as HTML text (quotes too: safe in attributes as well)."""
    return html.escape(str(x), quote=True)


def _page(title: str, body: list[str]) -> str:
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}"
            f"</title><style>{STYLE}</style></head><body><h1>{_e(title)}</h1>"
            + "\n".join(body) + "</body></html>\n")


def _table(df: pd.DataFrame) -> str:
    return df.to_html(index=False, na_rep="", float_format=lambda x: f"{x:.3g}", border=0,
                      escape=True, render_links=False)


def _slot_labels(model: Model) -> pd.Series:
    s = model.slots
    return s["slot"].astype(str) + np.where(s["version"] > 0, " v" + (s["version"] + 1)
                                            .astype(str), "")


def _level_names(model: Model) -> list[str]:
    return list(pages.level_names(pages.page_size(model.meta), (1, 2, 3)).values())


def _level_shares(f: pd.DataFrame, by: str, order: list, names: list[str]) -> dict:
    ct = pd.crosstab(f[by], f["size"], normalize="index").reindex(order).fillna(0)
    return {lvl: ct[lvl].tolist() if lvl in ct else [0.0] * len(order) for lvl in names}


def report_html(model: Model, tables: dict) -> str:
    m = model.meta
    body = [f"<p>{_e(model.recording.path)}: host {_e(m.get('host'))}, {_e(m.get('kernel'))} "
            f"{_e(m.get('arch'))}, KVM {_e(m.get('kvm'))}</p>"]
    f = model.faults[model.faults["slot_row"] >= 0]
    plots_html = []
    if len(f):
        labels = _slot_labels(model)
        f = f.assign(label=labels.reindex(f["slot_row"]).to_numpy())
        order = [x for x in labels if x in set(f["label"])]
        plots_html.append(plots.latency_cdf(
            {f"slot {k}": g["service_ns"].to_numpy(dtype=float, na_value=np.nan) / 1e3 for k, g in f.groupby("label")},
            "fault service time per slot"))
        plots_html.append(plots.level_mix(order, _level_shares(f, "label", order, _level_names(model)),
                                          "mapping levels per slot"))
    body.append("<div class='plots'>" + "".join(plots_html) + "</div>")
    for note in model.notes:
        body.append(f"<p class='reg'>note: {_e(note)}</p>")
    for name in ("slots", "verdicts", "ops", "ranges", "errors", "lost"):
        body.append(f"<h2>{_e(name)}</h2>" + _table(tables[name]))
    return _page("kvmtrace report", body)


def diff_html(base: Model, new: Model, c: Comparison) -> str:
    regs = c.regressions
    body = [f"<p>BASE {_e(base.recording.path)}<br>NEW {_e(new.recording.path)}"
            f"</p><p>{_e(c.method)}</p>",
            *(f"<p class='reg'>note: {_e(n)}</p>" for n in c.notes),
            f"<p class='{'reg' if regs else 'ok'}'>"
            + (f"{len(regs)} regression(s)" if regs else "no regression") + "</p>"]
    if c.findings:
        body.append(_table(pd.DataFrame(
            [{"slot": f.slot, "metric": f.metric, "change": f.text,
              "regression": "yes" if f.regression else ""} for f in c.findings])))
    plot = []
    series = {}
    for side, m in (("base", base), ("new", new)):
        series[side] = m.faults["service_ns"].to_numpy(dtype=float, na_value=np.nan) / 1e3
    plot.append(plots.latency_cdf(series, "fault service time, all slots"))
    s = c.slots
    labels = [f"{int(g):#x}" for g in s["gpa"]]
    plot.append(plots.grouped_bars(labels, {"base": s["faults_base"].fillna(0).tolist(),
                                            "new": s["faults_new"].fillna(0).tolist()},
                                   "faults per slot (by GPA)", "faults"))
    bars, shares = [], {name: [] for name in _level_names(base)}
    for label, lb, ln in zip(labels, s["levels_base"], s["levels_new"]):
        for side, lv in (("base", lb), ("new", ln)):
            lv = lv if isinstance(lv, dict) else {}
            total = sum(lv.values()) or 1
            bars.append(f"{label} {side}")
            for k in shares:
                shares[k].append(lv.get(k, 0) / total)
    plot.append(plots.level_mix(bars, shares, "mapping levels per slot, base vs new"))
    for label, (fb, fn) in _per_slot_series(base, new).items():
        if len(fb) >= 5 and len(fn) >= 5:
            plot.append(plots.latency_cdf({"base": fb, "new": fn}, f"service time, {label}"))
    body.append("<div class='plots'>" + "".join(plot) + "</div>")
    body.append("<h2>slots side by side</h2>" + _table(s))
    body.append("<h2>service time quantiles (us)</h2>" + _table(c.latency))
    body.append("<h2>VMs</h2>" + _table(c.totals))
    return _page("kvmtrace diff", body)


def _per_slot_series(base: Model, new: Model) -> dict:
    out: dict = {}
    for side, m in ((0, base), (1, new)):
        f = m.faults[m.faults["slot_row"] >= 0]
        gpa = m.slots["gpa"].reindex(f["slot_row"]).to_numpy()
        for g, grp in f.assign(gpa=gpa).groupby("gpa"):
            out.setdefault(f"GPA {int(g):#x}", [np.array([]), np.array([])])[side] = \
                grp["service_ns"].to_numpy(dtype=float, na_value=np.nan) / 1e3
    return out
