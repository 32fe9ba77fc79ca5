"""Self-contained HTML for `report --format html` and `diff --format html`:
inline SVG (the memory map, the plots) and formatted tables, so one file can
be mailed or archived and opens offline.

The report leads with what a user opens it for: per VM, a guest-physical
memory map (htmlmap.py) coloured by the VMA's memory type, the type KVM
installed and the verdict; then the recording's header, any loss or damage in
a banner, and tables of readable columns (addresses in hex, sizes and times
with units). Every column stays in ``--format json`` / ``csv``.

Every value from a recording or the command line (paths, host and kernel
names, VMA names, reasons, table cells) is HTML-escaped where it is put into
the page (``_e``); the page has no script, and its Content-Security-Policy
allows none and no external resource: a recording cannot put markup or a
script into the report.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable

import numpy as np
import pandas as pd

from . import htmlmap, plots
from .analysis import compare, identity, pages, summary
from .analysis.compare import Comparison
from .analysis.model import EXIT_REASONS, Model
from .htmlmap import count, esc as _e, hexa, micros, missing, pct, rel_s, size, slot_label

CSP = "default-src 'none'; style-src 'unsafe-inline'; img-src data:"
MAX_ROWS = 2000  # per table; all rows are in --format json / csv

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em 2em;max-width:1320px;color:#222;
 font-size:14px}
h1{font-size:1.5em;margin:0 0 .3em} h2{margin-top:1.6em;font-size:1.2em}
h3{font-size:1.05em;margin:1.2em 0 .3em}
table{border-collapse:collapse;font-size:12px;margin:.4em 0 1.2em}
td,th{border:1px solid #d4d4d4;padding:2px 6px;text-align:left;vertical-align:top}
th{background:#f0f0f0;font-weight:600;white-space:nowrap}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.x{font-family:ui-monospace,monospace;white-space:nowrap}
td.s{white-space:nowrap} td.w{max-width:44em} td.p{max-width:28em;overflow-wrap:anywhere}
tr:target td{background:#fff3b0}
.v{font-weight:600} .v-consistent{color:#116b38} .v-downgraded{color:#a65a00}
.v-upgraded{color:#c01010} .v-rejected{color:#6a1f85} .v-unknown{color:#666}
.lostn{color:#b00;font-weight:600}
dl.hdr{display:grid;grid-template-columns:max-content 1fr;gap:2px 14px;margin:.5em 0 1em;
 font-size:13px} dl.hdr dt{color:#555} dl.hdr dd{margin:0;overflow-wrap:anywhere}
.banner{padding:.6em .9em;margin:.6em 0;border-radius:4px;border:1px solid}
.banner.bad{background:#fde8e8;border-color:#c62828;color:#7f1010}
.banner.warn{background:#fff4e0;border-color:#e69500;color:#6b4400}
.banner ul{margin:.2em 0 0 1.2em;padding:0}
.note{color:#6b4400} .reg{color:#b00;font-weight:bold} .ok{color:#080}
.plots{display:flex;flex-wrap:wrap;gap:1em;align-items:flex-start}
.map{overflow-x:auto;margin:.3em 0}
svg.gpamap{font:11px system-ui,sans-serif;display:block}
svg.gpamap.fit{max-width:100%;height:auto}
svg.gpamap .tick{stroke:#ddd;stroke-width:1}
svg.gpamap .addr{font:10px ui-monospace,monospace;fill:#333}
svg.gpamap .lanename{font-size:12px;fill:#333}
svg.gpamap .brk{font-size:16px;fill:#888}
svg.gpamap g.slot rect,svg.gpamap g.refused rect{stroke:#555;stroke-width:.6}
svg.gpamap g.slot rect.old{stroke:none}
svg.gpamap g.slot:hover rect{stroke:#000;stroke-width:2}
svg.gpamap text{pointer-events:none}
.legend{font-size:12px;margin:.2em 0 1em;line-height:1.9}
.sw{margin-right:.9em;white-space:nowrap}
.sw .k{display:inline-block;width:14px;height:11px;margin-right:4px;vertical-align:-1px;
 border:1px solid #555}
.sw.dashed .k{border-style:dashed}
.sw .k.hatched{background:repeating-linear-gradient(45deg,#888 0 2px,#fff 2px 5px)}
ul.plain{margin:.2em 0;padding-left:1.2em} summary{cursor:pointer;color:#444}
.hint{color:#666} .more{color:#666;font-size:12px}
"""


def _page(title: str, body: list[str]) -> str:
    return ("<!doctype html><html lang='en'><head><meta charset='utf-8'>"
            f"<meta http-equiv='Content-Security-Policy' content=\"{CSP}\">"
            "<meta name='viewport' content='width=device-width, initial-scale=1'>"
            f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>"
            + "\n".join(body) + "</body></html>\n")


# -- tables ------------------------------------------------------------------

@dataclass
class Col:
    head: str
    cell: Callable[[dict], object]   # the row (a dict) -> what to show
    kind: str = ""  # "n" number (right), "x" hex (mono), "s" no wrap, "w" wide, "p" path
    css: Callable[[dict], str] | None = None  # a class for the cell, from the row


def _s(v) -> str:
    return "" if missing(v) else str(v)


def _mapping(nbytes) -> str:
    """A mapping size as kernel people write it ('4K', '2M'); '' when unknown."""
    return "" if missing(nbytes) else pages.size_name(int(nbytes))


def _ids(ids) -> str:
    return "/".join(map(str, ids))


def _flag_history(names) -> str:
    return " -> ".join(x or "-" for x in names)


def _table(df: pd.DataFrame, cols: list[Col],
           row_id: Callable[[dict], str] | None = None) -> str:
    """``df`` as an HTML table of ``cols`` (every cell escaped), at most
    MAX_ROWS rows."""
    out = ["<table><thead><tr>" + "".join(f"<th>{_e(c.head)}</th>" for c in cols)
           + "</tr></thead><tbody>"]
    for r in df.head(MAX_ROWS).to_dict("records"):
        cells = []
        for c in cols:
            cls = " ".join(x for x in (c.kind, c.css(r) if c.css else "") if x)
            cells.append((f'<td class="{cls}">' if cls else "<td>") + _e(_s(c.cell(r)))
                         + "</td>")
        out.append((f'<tr id="{_e(row_id(r))}">' if row_id else "<tr>") + "".join(cells)
                   + "</tr>")
    out.append("</tbody></table>")
    if len(df) > MAX_ROWS:
        out.append(f"<p class='more'>first {MAX_ROWS:,} of {len(df):,} rows; every row is in "
                   "--format json or csv</p>")
    return "".join(out)


def _verdict_css(r: dict) -> str:
    v = r.get("verdict")
    return f"v v-{v}" if isinstance(v, str) and v else ""


def _vm(r) -> str:
    return f"{identity.label(r['pid'], r['proc'])} fd {int(r['vm_fd'])}"


def _types(v) -> str:
    return _s(v) or "none"


def _ioctl(name) -> str:
    return _s(name).replace("KVM_SET_USER_MEMORY_", "")


def _history(r) -> str:
    h = f"{r['created_by']} {rel_s(r['t_start_s'])}"
    return h + (f"; {r['ended_by']} {rel_s(r['t_end_s'])}" if r["ended_by"] else "")


def _memslot_cols(as_ids: bool) -> list[Col]:
    return [Col("slot", lambda r: slot_label(r["slot"], r["version"]), "s"),
            *([Col("as", lambda r: r["as_id"], "n")] if as_ids else []),
            Col("GPA range", lambda r: f"{hexa(r['gpa'])}-{hexa(r['gpa_end'])}", "x"),
            Col("size", lambda r: size(r["size_bytes"]), "n"),
            Col("KVM_MEM flags", lambda r: _s(r["flag_names"]) or "-"),
            Col("HVA", lambda r: hexa(r["hva"]), "x"),
            Col("VMA", lambda r: r["vma"], "p"),
            Col("VM flags", lambda r: r["vm_flags"]),
            Col("VMA type", lambda r: r["_vma_type"]),
            Col("installed", lambda r: _types(r["spte_memtype"])),
            Col("verdict", lambda r: r["verdict"], css=_verdict_css),
            Col("ioctl", lambda r: _ioctl(r["ioctl_name"])),
            Col("history", _history)]


def _activity_cols(levels: dict, lost: bool) -> list[Col]:
    cols = [Col("VM", _vm), Col("slot", lambda r: slot_label(r["slot"], r["version"]), "s"),
            Col("faults", lambda r: count(r["faults"]), "n"),
            *(Col(h, lambda r, c=c: count(r[c]), "n") for h, c in
              (("read", "read"), ("write", "write"), ("exec", "exec"))),
            *(Col(name, lambda r, c=c: count(r[c]), "n") for c, name in levels.items()),
            Col("installed", lambda r: _types(r["spte_memtype"])),
            Col("prefetched", lambda r: count(r["prefetched"]), "n"),
            Col("invalidations", lambda r: count(r["invalidations"]), "n"),
            Col("MMIO exits", lambda r: count(r["mmio_exits"]), "n"),
            Col("p50 service", lambda r: micros(r["service_p50_us"]), "n")]
    if lost:
        red = lambda c: (lambda r: "lostn" if r[c] else "")  # noqa: E731
        cols += [Col("lost", lambda r: count(r["lost"]), "n", red("lost")),
                 Col("unpaired installs", lambda r: count(r["unpaired_installs"]), "n",
                     red("unpaired_installs"))]
    return cols


VERDICT_COLS = [
    Col("VM", _vm),
    Col("slot", lambda r: slot_label(r["slot"], r["version"]) if r["version"] >= 0
        else f"{int(r['slot'])} (refused)", "s"),
    Col("GPA range", lambda r: f"{hexa(r['gpa'])}-{hexa(int(r['gpa']) + int(r['size_bytes']))}",
        "x"),
    Col("size", lambda r: size(r["size_bytes"]), "n"),
    Col("faults", lambda r: count(r["faults"]), "n"),
    Col("lost", lambda r: count(r["lost"]), "n", lambda r: "lostn" if r["lost"] else ""),
    Col("verdict", lambda r: r["verdict"], css=_verdict_css),
    Col("VMA type", lambda r: r["vma_memtype"]),
    Col("installed", lambda r: r["spte_memtype"]),
    Col("reason and kernel rule", lambda r: r["reason"], "w"),
]

OPS_COLS = [
    Col("time", lambda r: rel_s(r["t_s"]), "n"), Col("VM", _vm),
    Col("ioctl", lambda r: _ioctl(r["ioctl_name"])),
    Col("slot", lambda r: f"{r['as_id']}:{r['slot_id']}" if r["as_id"] else r["slot_id"]),
    Col("op", lambda r: r["op"]), Col("flags", lambda r: _s(r["flag_names"]) or "-"),
    Col("GPA", lambda r: hexa(r["gpa"]), "x"), Col("size", lambda r: size(r["size_bytes"]), "n"),
    Col("HVA", lambda r: hexa(r["hva"]), "x"),
    Col("result", lambda r: "ok" if r["ret"] >= 0 else
        f"{r['errno']}: {_s(r['reason']).split(': ', 1)[-1]}", "w",
        lambda r: "" if r["ret"] >= 0 else "v v-rejected"),
    Col("time in ioctl", lambda r: micros(r["latency_ns"] / 1e3), "n"),
]

ERROR_COLS = [
    Col("VM", _vm), Col("what", lambda r: r["what"]),
    Col("slot", lambda r: "" if missing(r["slot"]) else int(r["slot"])),
    Col("errno", lambda r: r["errno"], css=lambda r: "v v-rejected"),
    Col("detail", lambda r: r["detail"], "w"),
]

LOST_COLS = [
    Col("event kind", lambda r: r["kind"]), Col("recorded", lambda r: count(r["events"]), "n"),
    Col("lost", lambda r: count(r["lost"]), "n", lambda r: "lostn" if r["lost"] else ""),
    Col("lost %", lambda r: f"{r['lost_pct']:.3g}%" if r["lost"] else "0%", "n"),
]


MAX_FAULTS = 500  # the faults table shows the first ones; all are in --format json / csv


def _fault_cols(model: Model, page: int) -> list[Col]:
    arm = htmlmap.installed_name(model.meta) == "installed (stage 2)"
    clock = model.meta.get("clock")
    base = clock.get("monotonic_ns") if isinstance(clock, dict) else None
    base = base if isinstance(base, int) else 0
    return [Col("time", lambda r: rel_s((int(r["ts"]) - base) / 1e9), "n"),
            Col("VM", _vm), Col("thread", lambda r: r["tid"], "n"),
            Col("slot", lambda r: "" if missing(r["slot"]) else int(r["slot"]), "s"),
            Col("access", lambda r: r["access"]),
            Col("GPA", lambda r: hexa(int(r["gfn"]) * page), "x"),
            Col("mapping", lambda r: _mapping(r["mapping_size_bytes"])),
            Col("stage-2 prot" if arm else "spte", lambda r: hexa(r["spte"]), "x"),
            Col("pfn", lambda r: hexa(r["pfn"]), "x"),
            Col("installed", lambda r: _types(r["spte_memtype"])),
            Col("VMA type", lambda r: r["vma_memtype"]),
            Col("verdict", lambda r: r["verdict"], css=_verdict_css),
            Col("service", lambda r: micros(r["service_ns"] / 1e3)
                if not missing(r["service_ns"]) else "", "n")]


def _range_cols(page: int) -> list[Col]:
    return [Col("slot", lambda r: r["slot"]),
            Col("GPA range", lambda r: f"{hexa(int(r['gfn_first']) * page)}-"
                f"{hexa((int(r['gfn_last']) + 1) * page)}", "x"),
            Col("guest frames", lambda r: f"{hexa(r['gfn_first'])}-{hexa(r['gfn_last'])}", "x"),
            Col("pages", lambda r: count(r["pages"]), "n"),
            Col("mapping size", lambda r: _mapping(r["mapping_size_bytes"])),
            Col("VMA type", lambda r: r["vma_memtype"]),
            Col("installed", lambda r: _types(r["spte_memtype"])),
            Col("verdict", lambda r: r["verdict"], css=_verdict_css)]


# -- the header and banners --------------------------------------------------

def _end_note(rec) -> dict:
    """The recorder's closing note (stop cause, elapsed, lost), {} when none."""
    try:
        end = rec["notes"][rec["notes"]["key"] == "end"]
        v = json.loads(end["value"].iloc[-1]) if len(end) else {}
    except (KeyError, TypeError, ValueError):
        return {}
    return v if isinstance(v, dict) else {}


def _kvm_words(m: dict) -> str:
    kvm = m.get("kvm") if isinstance(m.get("kvm"), dict) else {}
    words = [f"{kvm.get('vendor')}" if kvm.get("vendor") else "",
             f"{kvm.get('mmu')} MMU" if kvm.get("mmu") else "",
             f"{kvm.get('spte_format')} sptes" if kvm.get("spte_format") not in
             (None, "", "arm64") else "",
             "TDP MMU" if kvm.get("tdp_mmu") is True else ""]
    return ", ".join(w for w in words if w) or "unknown"


def _cpu_words(m: dict) -> str:
    a = m.get("arm64")
    if isinstance(a, dict):
        yn = lambda v: "yes" if v is True else "no" if v is False else "unknown"  # noqa: E731
        cap = a.get("cap_cacheable_pfnmap")
        cap = cap.get("vm") if isinstance(cap, dict) else cap
        return (f"S2FWB {yn(a.get('fwb'))}, CTR_EL0.DIC {yn(a.get('dic'))}; "
                f"KVM_CAP_ARM_CACHEABLE_PFNMAP_SUPPORTED {_s(cap) or 'unknown'}")
    x = m.get("x86")
    if isinstance(x, dict) and isinstance(x.get("pat"), dict):
        e = x["pat"].get("entries")
        if isinstance(e, list):
            return "host PAT " + " ".join(map(str, e)) + (
                f" (from {x['pat'].get('source')})" if x["pat"].get("source") else "")
    return ""


def _header(model: Model) -> str:
    m, rec = model.meta, model.recording
    end = _end_note(rec)
    probes = m.get("probes") if isinstance(m.get("probes"), dict) else {}
    lost = model.lost
    n_events = int(lost["events"].sum()) if len(lost) else 0
    n_lost = int(lost["lost"].sum()) if len(lost) else 0
    kernel = _s(m.get("kernel")) + (f" ({m['kernel_version']})" if m.get("kernel_version") else "")
    items = [("recording", rec.path), ("host", _s(m.get("host"))), ("kernel", kernel),
             ("arch", f"{_s(m.get('arch'))}, {size(pages.page_size(m))} pages"),
             ("KVM", _kvm_words(m))]
    cpu = _cpu_words(m)
    if cpu:
        items.append(("CPU", cpu))
    if end:
        items.append(("recorded", f"{_s(end.get('elapsed_s')) or '?'} s, stopped by "
                      f"{_s(end.get('stopped_by')) or 'unknown'}"))
    else:
        items.append(("recorded", "not closed (the recorder did not finish the file): "
                      "stop cause unknown"))
    items.append(("events", f"{n_events:,} recorded, {n_lost:,} lost"))
    items.append(("kvmtrace", f"{_s(m.get('kvmtrace_version'))}, recording format "
                  f"{_s(rec.schema_version)}"))
    html_items = [(k, _e(v)) for k, v in items]
    att = probes.get("attached")
    if isinstance(att, list):
        html_items.append(("probes", _details(f"{len(att)} attached", [str(x) for x in att])))
    un = probes.get("unavailable")
    if isinstance(un, dict) and un:
        html_items.append(("not attached", _details(
            f"{len(un)} not attached on this host", [f"{k}: {v}" for k, v in un.items()])))
    return "<dl class='hdr'>" + "".join(f"<dt>{_e(k)}</dt><dd>{v}</dd>"
                                        for k, v in html_items) + "</dl>"


def _details(summary_text: str, items: list[str]) -> str:
    """A folded list (HTML details: opens without a script)."""
    return (f"<details><summary>{_e(summary_text)}</summary><ul class='plain'>"
            + "".join(f"<li>{_e(x)}</li>" for x in items) + "</ul></details>")


def _banners(model: Model, who: str = "") -> list[str]:
    """Damage and loss, where nobody can miss them; then the other notes."""
    rec, out = model.recording, []
    w = f"{who}: " if who else ""
    if not rec.complete or rec.problems:
        items = "".join(f"<li>{_e(p)}</li>" for p in rec.problems) or \
            "<li>the recording did not end cleanly</li>"
        bid = f"incomplete-{who}" if who else "incomplete"
        out.append(f"<div class='banner bad' id='{bid}'>"
                   f"<strong>{_e(w)}Incomplete recording.</strong> This report covers only what "
                   f"could be read:<ul>{items}</ul></div>")
    lost = model.lost[model.lost["lost"] > 0] if len(model.lost) else model.lost
    if len(lost):
        parts = ", ".join(f"{r.kind} {int(r.lost):,} of {int(r.events + r.lost):,}"
                          for r in lost.itertuples())
        bid = f"lost-banner-{who}" if who else "lost-banner"
        out.append(f"<div class='banner warn' id='{bid}'>"
                   f"<strong>{_e(w)}{int(lost['lost'].sum()):,} events lost</strong> "
                   f"(ring buffer full): {_e(parts)}. Slots that lost events have the "
                   "verdict “unknown” unless a mismatch was seen; see lost events below.</div>")
    problems = set(rec.problems)
    for note in model.notes:
        if note not in problems and not note.startswith("events lost"):
            out.append(f"<p class='note'>note: {_e(w)}{_e(note)}</p>")
    return out


# -- the report --------------------------------------------------------------

def _level_names(model: Model) -> list[str]:
    return list(pages.level_names(pages.page_size(model.meta), (1, 2, 3)).values())


def _level_shares(f: pd.DataFrame, by: str, order: list, names: list[str]) -> dict:
    sizes = f["mapping_size_bytes"].map(_mapping)
    ct = pd.crosstab(f[by], sizes, normalize="index").reindex(order).fillna(0)
    return {lvl: ct[lvl].tolist() if lvl in ct else [0.0] * len(order) for lvl in names}


def _slot_labels(model: Model) -> pd.Series:
    s = model.slots
    return s["slot"].astype(str) + np.where(s["version"] > 0, " v" + (s["version"] + 1)
                                            .astype(str), "")


def _plots(model: Model, slots: pd.DataFrame) -> str:
    f = model.faults[model.faults["slot_row"] >= 0]
    if not len(f):
        return ""
    key = ["pid", "proc", "vm_fd", "as_id", "slot", "version"]
    rows = model.slots[key].reset_index(names="slot_row").merge(slots[key], on=key)
    f = f[f["slot_row"].isin(rows["slot_row"])]  # the slots this view shows (--pid, --slot)
    labels = _slot_labels(model)
    f = f.assign(label=labels.reindex(f["slot_row"]).to_numpy())
    if not len(f):
        return ""
    n = f.groupby("label").size()
    order = [x for x in dict.fromkeys(labels) if x in n.index]
    shown = [f"slot {x} ({int(n[x]):,})" for x in order]
    groups = dict(tuple(f.groupby("label")))
    out = [plots.latency_cdf(
        {f"slot {k}": groups[k]["service_ns"].to_numpy(dtype=float, na_value=np.nan) / 1e3
         for k in order}, "fault service time per slot"),
           plots.level_mix(shown, _level_shares(f, "label", order, _level_names(model)),
                           "mapping levels per slot (share of its faults)")]
    return "<div class='plots'>" + "".join(out) + "</div>"


def _vm_title(key) -> str:
    pid, proc, vm_fd = key
    who = identity.label(pid, proc)
    more = f" (process {proc + 1} with pid {pid} in this recording)" if proc else ""
    return f"VM pid {who} vm fd {vm_fd}{more}"


def report_html(model: Model, tables: dict) -> str:
    s, ops = tables["slots"], tables["ops"]
    body = ["<h1>kvmtrace report</h1>", _header(model), *_banners(model)]
    if len(s):
        s = s.assign(_vma_type=[r["vma_type"] for r in htmlmap.vm_rows(model, s)])
    body.append("<h2 id='map'>guest-physical memory map</h2>")
    maps = htmlmap.vm_maps(model, s, ops)
    if not maps:
        if len(model.slots) or len(model.ops):
            body.append(f"<p>no memslot in this view ({len(model.slots):,} slot versions "
                        "recorded in all; see the command's --pid / --slot)</p>")
        elif model.recording.complete:
            body.append("<p>no memslots recorded: the VMM set its memslots before recording "
                        "started, or no VM ran</p>")
        else:
            body.append("<p>no memslots in the part of the recording that could be read</p>")
    as_ids = bool(len(s)) and bool((s["as_id"] != 0).any())
    for key, svgs, legend in maps:
        body.append(f"<section class='vm'><h3>{_e(_vm_title(key))}</h3>")
        for as_id, svg in svgs:
            if len(svgs) > 1 or as_id:
                body.append(f"<p class='hint'>address space {as_id}</p>")
            body.append(f"<div class='map'>{svg}</div>")
        body.append(legend)
        g = s[(s["pid"] == key[0]) & (s["proc"] == key[1]) & (s["vm_fd"] == key[2])] \
            if len(s) else s
        if len(g):
            body.append(_table(g, _memslot_cols(as_ids), row_id=lambda r: htmlmap.anchor(
                r["pid"], r["proc"], r["vm_fd"], r["as_id"], r["slot"], r["version"])))
        body.append("</section>")
    outside = summary.outside_words(model)
    if outside:
        body.append(f"<p class='note'>{_e(outside)}</p>")
    body.append("<h2 id='verdicts'>memory-type verdicts</h2>")
    v = tables["verdicts"]
    body.append(_table(v, VERDICT_COLS) if len(v) else "<p>none</p>")
    if len(s):
        body.append("<h2 id='activity'>faults per slot</h2>")
        lost = bool(s["lost"].any() or s["unpaired_installs"].any())
        body.append(_table(s, _activity_cols(summary.level_labels(model), lost)))
        body.append(_plots(model, s))
    body.append("<h2 id='ops'>memslot ioctls</h2>")
    body.append(_table(ops, OPS_COLS) if len(ops) else "<p>none recorded</p>")
    r = tables["ranges"]
    if len(r):
        body.append("<h2 id='ranges'>page ranges</h2><p class='hint'>guest frames faulted, "
                    "by mapping size and memory types</p>")
        body.append(_table(r, _range_cols(pages.page_size(model.meta))))
    f = tables["faults"]
    if len(f):
        shown = f"first {MAX_FAULTS:,} of {len(f):,}" if len(f) > MAX_FAULTS else f"{len(f):,}"
        body.append(f"<h2 id='faults'>faults</h2><details><summary>{_e(shown)} faults, one "
                    "row each</summary>"
                    + _table(f.head(MAX_FAULTS), _fault_cols(model, pages.page_size(model.meta)))
                    + "</details>")
    body.append("<h2 id='errors'>errors</h2>")
    e = tables["errors"]
    body.append(_table(e, ERROR_COLS) if len(e) else "<p>none</p>")
    body.append("<h2 id='lost'>lost events</h2>")
    lost = tables["lost"]
    if not len(lost):
        body.append("<p>unknown: the recording has no per-kind counts</p>")
    else:
        n = int(lost["lost"].sum())
        body.append(f"<p class='{'lostn' if n else 'ok'}'>"
                    + (f"{n:,} events lost (ring buffer full)" if n else "none lost") + "</p>")
        body.append(_table(lost, LOST_COLS))
    body.append("<p class='more'>Every column of every table: kvmtrace report FILE "
                "--format json, or --format csv --table slots|ops|faults|ranges|verdicts|"
                "errors|vmas|lost.</p>")
    return _page("kvmtrace report", body)


# -- diff --------------------------------------------------------------------

def _pair(a, b, fmt=_s) -> str:
    fa = "" if missing(a) else fmt(a)
    fb = "" if missing(b) else fmt(b)
    return fa if fa == fb else f"{fa or '–'} → {fb or '–'}"


def _levels(lv) -> str:
    if not isinstance(lv, dict) or not lv:
        return ""
    return ", ".join(f"{k} {count(v)}" for k, v in lv.items())


def _exits(ex) -> str:
    if not isinstance(ex, dict) or not ex:
        return ""
    out = []
    for k, v in ex.items():
        try:
            name = EXIT_REASONS.get(int(k), str(k))
        except (TypeError, ValueError):
            name = str(k)
        out.append(f"{name} {count(v)}")
    return ", ".join(out)


def _p(name, fmt=_s) -> Callable[[dict], str]:
    return lambda r: _pair(r[f"{name}_base"], r[f"{name}_new"], fmt)


DIFF_SLOT_COLS = [
    Col("GPA", lambda r: hexa(r["gpa"]), "x"), Col("size", lambda r: size(r["size_bytes"]), "n"),
    Col("as", lambda r: r["as_id"], "n"),
    Col("slot", _p("slot", _ids)), Col("backing", _p("backing"), "p"),
    Col("flags", _p("flags", _flag_history)),
    Col("faults", _p("faults", count), "n"), Col("pages", _p("pages", count), "n"),
    Col("mappings", lambda r: _pair(_levels(r["levels_base"]), _levels(r["levels_new"]))),
    Col("2M/1G share", _p("huge_share", pct), "n"),
    Col("cacheable share", _p("cacheable_share", pct), "n"),
    Col("p50 service", _p("p50_us", micros), "n"),
    Col("invalidations", _p("invalidations", count), "n"),
    Col("MMIO exits", _p("mmio_exits", count), "n"),
]

DIFF_LATENCY_COLS = [
    Col("by", lambda r: r["by"]),
    Col("key", lambda r: "outside slots" if r["key"] == "-0x1" and r["by"] == "slot GPA"
        else r["key"] or ("none installed" if r["by"] == "memtype" else "")),
    Col("side", lambda r: r["side"]), Col("faults", lambda r: count(r["count"]), "n"),
    Col("rate", lambda r: "" if missing(r["faults_per_s"]) else f"{r['faults_per_s']:.3g}/s",
        "n"),
    *(Col(q, lambda r, q=q: micros(r[f"{q}_us"]), "n") for q in ("p50", "p90", "p99", "max")),
]

DIFF_VM_COLS = [
    Col("side", lambda r: r["side"]), Col("VM", _vm),
    Col("faults", lambda r: count(r["faults"]), "n"),
    Col("2M/1G share", lambda r: pct(r["huge_share"]), "n"),
    Col("p50 service", lambda r: micros(r["p50_us"]), "n"),
    Col("exits to VMM", lambda r: _exits(r["exits"])),
    Col("errors", lambda r: count(r["errors"]), "n"),
    Col("recorded", lambda r: "" if missing(r["recorded_s"]) else f"{r['recorded_s']:.3f} s",
        "n"),
]

FINDING_COLS = [
    Col("slot", lambda r: r["slot"]), Col("metric", lambda r: r["metric"]),
    Col("change", lambda r: r["change"], "w"),
    Col("regression", lambda r: "yes" if r["regression"] else "",
        css=lambda r: "reg" if r["regression"] else ""),
    Col("cause", lambda r: r["cause"], "w"),
]


def diff_html(base: Model, new: Model, c: Comparison) -> str:
    regs = c.regressions
    body = ["<h1>kvmtrace diff</h1>"]
    for side, m in (("BASE", base), ("NEW", new)):
        body.append(f"<h3>{side}</h3>" + _header(m))
        body += _banners(m, side)
    body.append(f"<p class='hint'>{_e(c.method)}</p>")
    body += [f"<p class='note'>note: {_e(n)}</p>" for n in c.notes]
    body.append(f"<p class='{'reg' if regs else 'ok'}'>"
                + (f"{len(regs)} regression(s)" if regs else "no regression") + "</p>")
    if c.findings:
        body.append("<h2>what changed</h2>" + _table(pd.DataFrame(
            [{"slot": compare.label(f), "metric": f.metric, "change": f.message,
              "regression": bool(f.regression),
              "cause": ", ".join(x["message"] for x in f.causes)}
             for f in c.findings]), FINDING_COLS))
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
    body.append("<h2>slots side by side</h2><p class='hint'>matched by address space, GPA "
                "and size; a → b is base → new</p>" + _table(s, DIFF_SLOT_COLS))
    if len(c.latency):
        body.append("<h2>fault service time by slot, memory type and level</h2>"
                    + _table(c.latency.sort_values(["by", "key", "side"]), DIFF_LATENCY_COLS))
    body.append("<h2>VMs</h2>" + _table(c.totals, DIFF_VM_COLS))
    body.append("<p class='more'>Every column: kvmtrace diff BASE NEW --format json.</p>")
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
