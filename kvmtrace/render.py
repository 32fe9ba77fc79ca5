"""Views of a model for people (rich text) and for programs (JSON, CSV).

Only presentation lives here; every number comes from kvmtrace.analysis.
"""

from __future__ import annotations

import json
import math

import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .analysis import summary
from .analysis.model import EXIT_REASONS, Model
from .probes.events import EVENTS

VERDICT_STYLE = {"consistent": "green", "downgraded": "yellow", "upgraded": "bold red",
                 "rejected": "red", "unknown": "dim"}


def _size(n) -> str:
    n = int(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:g} {unit}" if unit == "B" else f"{n:.4g} {unit}"
        n /= 1024
    return str(n)


def _hex(n) -> str:
    return f"{int(n):#x}"


def _slot(slot, version) -> str:
    """Slot id, with the version after a move / flags change (v2, v3, ...)."""
    return f"{slot} v{version + 1}" if version else str(slot)


def _t(x) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.3f}s"


def tables(model: Model, pid=None, slot=None) -> dict[str, pd.DataFrame]:
    f = model.faults.copy()
    if len(model.slots):
        f["slot"] = model.slots["slot"].reindex(f["slot_row"]).to_numpy()
    else:
        f["slot"] = -1
    r = model.ranges
    return {
        "slots": summary.slot_summary(model, pid, slot),
        "ops": summary.ops_table(model, pid, slot),
        "faults": summary.filter_rows(f.drop(columns=["prev_req_ts", "next_req_ts",
                                                      "install_row"], errors="ignore"),
                                      pid, slot),
        "ranges": summary.filter_rows(r, None, slot),
        "verdicts": summary.filter_rows(model.verdicts, pid, slot),
        "errors": summary.filter_rows(model.errors, pid, slot),
        "vmas": summary.filter_rows(model.recording["vmas"], pid, None),
    }


def to_json(model: Model, pid=None, slot=None, table=None) -> str:
    t = tables(model, pid, slot)
    body = {name: json.loads(df.to_json(orient="records")) for name, df in t.items()
            if (table is None and name != "vmas") or table == name}
    if table is None:
        body = {"recording": {"path": model.recording.path, "complete": model.recording.complete,
                              "problems": model.recording.problems,
                              "schema_version": model.recording.schema_version},
                "meta": model.meta, "notes": model.notes, **body}
    return json.dumps(body, indent=1, default=str)


def to_csv(model: Model, pid=None, slot=None, table="slots") -> str:
    return tables(model, pid, slot)[table or "slots"].to_csv(index=False)


def _header(model: Model, console: Console):
    m, rec = model.meta, model.recording
    kvm = m.get("kvm") or {}
    end = rec["notes"][rec["notes"]["key"] == "end"]
    endv = json.loads(end["value"].iloc[-1]) if len(end) else {}
    probes = m.get("probes") or {}
    console.print(f"[bold]kvmtrace report[/] {escape(rec.path)}")
    console.print(f"  host {m.get('host')}  kernel {m.get('kernel')}  {m.get('arch')}  "
                  f"KVM {kvm.get('vendor')} ({kvm.get('mmu')}, {kvm.get('spte_format')} sptes)")
    n_events = sum(len(rec[name]) for name in EVENTS)
    if endv:
        lost = f"{sum((endv.get('lost') or {}).values()):,} lost"
    else:
        st = rec["stats"]
        lost = (f"{int(st.groupby('kind')['lost'].max().sum()):,} lost by the last flush"
                if len(st) else "lost events unknown")
    console.print(f"  recorded {endv.get('elapsed_s', '?')} s, stopped by "
                  f"{endv.get('stopped_by', 'unknown (not closed)')}; "
                  f"{n_events:,} events, {lost}")
    console.print(f"  probes attached: {', '.join(probes.get('attached', []))}")
    for name, why in (probes.get("unavailable") or {}).items():
        console.print(f"  [dim]not attached: {name}: {why}[/]")
    for p in model.notes:  # the recording's own problems come first in it
        console.print(f"  [yellow]note:[/] {p}")


def _memslot_table(s: pd.DataFrame, console: Console):
    for (pid, vm), g in s.groupby(["pid", "vm_fd"]):
        t = Table(title=f"memslots of VM pid {pid} vm fd {vm}", title_justify="left")
        for c in ("slot", "as", "GPA range", "size", "flags", "HVA", "VMA", "VmFlags",
                  "VMA type", "ioctl", "history"):
            t.add_column(c, overflow="fold")
        for r in g.itertuples(index=False):
            hist = f"{r.created_by} {_t(r.t_start_s)}"
            if r.ended_by:
                hist += f"; {r.ended_by} {_t(r.t_end_s)}"
            t.add_row(_slot(r.slot, r.version), str(r.as_id),
                      f"{_hex(r.gpa)}-{_hex(r.gpa_end)}", _size(r.size), r.flag_names,
                      _hex(r.hva), escape(str(r.vma)), r.vm_flags, r.slot_vma_memtype,
                      r.ioctl_name.replace("KVM_SET_USER_MEMORY_", ""), hist)
        console.print(t)


def _activity_table(s: pd.DataFrame, console: Console):
    t = Table(title="faults per slot", title_justify="left")
    for c in ("slot", "faults", "read", "write", "exec", "4K", "2M", "1G", "spte type",
              "prefetched", "invalidations", "MMIO exits", "p50 service"):
        t.add_column(c, justify="left" if c in ("slot", "spte type") else "right")
    for r in s.to_dict("records"):
        p50 = r["service_p50_us"]
        t.add_row(_slot(r["slot"], r["version"]),
                  *(str(r[c]) for c in ("faults", "read", "write", "exec", "4K", "2M", "1G")),
                  r["spte_memtype"], str(r["prefetched"]), str(r["invalidations"]),
                  str(r["mmio_exits"]), "" if pd.isna(p50) else f"{p50:.1f} us")
    console.print(t)


def _verdict_table(v: pd.DataFrame, console: Console):
    t = Table(title="memory-type verdicts", title_justify="left")
    for c in ("slot", "GPA", "faults", "verdict", "reason"):
        t.add_column(c, overflow="fold")
    for r in v.itertuples(index=False):
        style = VERDICT_STYLE.get(r.verdict, "")
        t.add_row(_slot(r.slot, max(r.version, 0)), _hex(r.gpa), str(r.faults),
                  f"[{style}]{r.verdict}[/]", escape(r.reason))
    console.print(t)


def _ranges_table(r: pd.DataFrame, console: Console):
    t = Table(title="page ranges (guest frames faulted, by level and memory types)",
              title_justify="left")
    for c in ("slot", "GPA range", "pages", "level", "VMA type", "spte type", "verdict"):
        t.add_column(c)
    for x in r.itertuples(index=False):
        style = VERDICT_STYLE.get(x.verdict, "")
        t.add_row(str(x.slot), f"{_hex(x.gfn_first * 4096)}-{_hex((x.gfn_last + 1) * 4096)}",
                  str(x.pages), str(x.size), x.vma_memtype, x.spte_memtype,
                  f"[{style}]{x.verdict}[/]")
    console.print(t)


def _ops_table(o: pd.DataFrame, console: Console):
    t = Table(title="memslot ioctls", title_justify="left")
    for c in ("time", "pid", "vm", "ioctl", "slot", "op", "flags", "GPA", "size", "result"):
        t.add_column(c, overflow="fold")
    for r in o.itertuples(index=False):
        res = "ok" if r.ret >= 0 else f"[red]{r.errno}[/]: {escape(r.reason.split(': ', 1)[-1])}"
        t.add_row(_t(r.t_s), str(r.pid), str(r.vm_fd), r.ioctl_name.replace(
            "KVM_SET_USER_MEMORY_", ""), f"{r.as_id}:{r.slot_id}" if r.as_id else str(r.slot_id),
            r.op, r.flag_names, _hex(r.gpa), _size(r.size), res)
    console.print(t)


def _errors_table(e: pd.DataFrame, console: Console):
    if not len(e):
        console.print("errors: none")
        return
    t = Table(title="errors", title_justify="left")
    for c in ("pid", "vm", "what", "slot", "errno", "detail"):
        t.add_column(c, overflow="fold")
    for r in e.itertuples(index=False):
        t.add_row(str(r.pid), str(r.vm_fd), r.what, "" if r.slot < 0 else str(r.slot),
                  f"[red]{r.errno}[/]", escape(r.detail))
    console.print(t)


def to_text(model: Model, console: Console, pid=None, slot=None):
    t = tables(model, pid, slot)
    _header(model, console)
    s = t["slots"]
    if not len(s) and not len(t["ops"]):
        console.print("no memslots recorded: the VMM set its memslots before recording "
                      "started, or no VM ran (faults outside known slots: "
                      f"{int((model.faults['slot_row'] < 0).sum())})")
    else:
        _memslot_table(s, console)
        _ops_table(t["ops"], console)
        _activity_table(s, console)
        _verdict_table(t["verdicts"], console)
        _ranges_table(t["ranges"], console)
    outside = int((model.faults["slot_row"] < 0).sum())
    if outside:
        console.print(f"[yellow]{outside} faults outside every recorded memslot[/] "
                      "(slots set before recording started, or of untraced VMs)")
    _errors_table(t["errors"], console)


# -- diff -----------------------------------------------------------------

def diff_summary_lines(c) -> list[str]:
    """One line per slot with findings, the form CI logs show:
    'slot 2 (GPA ...): 2M/1G mappings 100% -> 0%, p50 fault time +180% [...]; cause: ...'"""
    by_slot: dict[str, list] = {}
    for f in c.findings:
        by_slot.setdefault(f.slot, []).append(f)
    lines = []
    for slot, fs in by_slot.items():
        mark = "REGRESSION" if any(f.regression for f in fs) else "changed"
        cause = c.causes.get(slot) or []
        lines.append(f"{mark}: {slot}: " + ", ".join(f.text for f in fs)
                     + (f"; cause: {', '.join(cause)}" if cause else ""))
    return lines


def diff_to_text(base, new, c, console: Console):
    console.print(f"[bold]kvmtrace diff[/]\n  BASE {escape(base.recording.path)}\n"
                  f"  NEW  {escape(new.recording.path)}")
    console.print(f"  [dim]{escape(c.method)}[/]")
    for p in base.recording.problems:
        console.print(f"  [yellow]BASE note:[/] {escape(p)}")
    for p in new.recording.problems:
        console.print(f"  [yellow]NEW note:[/] {escape(p)}")
    t = Table(title="slots (matched by address space, GPA and size)", title_justify="left")
    for col in ("GPA", "size", "slot", "backing", "faults", "pages", "2M/1G", "p50 us",
                "invalidations", "MMIO exits"):
        t.add_column(col, overflow="fold")

    def pair(a, b, fmt=str):
        fa = "" if pd.isna(a) else fmt(a)
        fb = "" if pd.isna(b) else fmt(b)
        return fa if fa == fb else f"{fa} -> {fb}"

    for r in c.slots.to_dict("records"):
        t.add_row(_hex(r["gpa"]), _size(r["bytes"]), pair(r["slot_base"], r["slot_new"]),
                  escape(pair(r["backing_base"], r["backing_new"])),
                  pair(r["faults_base"], r["faults_new"], lambda x: str(int(x))),
                  pair(r["pages_base"], r["pages_new"], lambda x: str(int(x))),
                  pair(r["huge_share_base"], r["huge_share_new"], lambda x: f"{x * 100:.0f}%"),
                  pair(r["p50_us_base"], r["p50_us_new"], lambda x: f"{x:.1f}"),
                  pair(r["invalidations_base"], r["invalidations_new"], lambda x: str(int(x))),
                  pair(r["mmio_exits_base"], r["mmio_exits_new"], lambda x: str(int(x))))
    console.print(t)
    lat = c.latency
    if len(lat):
        t = Table(title="fault service time (us) by slot, memory type and level",
                  title_justify="left")
        for col in ("by", "key", "side", "count", "rate/s", "p50", "p90", "p99", "max"):
            t.add_column(col, justify="left" if col in ("by", "key", "side") else "right")
        for r in lat.sort_values(["by", "key", "side"]).to_dict("records"):
            t.add_row(r["by"], r["key"], r["side"], str(r["count"]),
                      "" if pd.isna(r.get("rate")) else f"{r['rate']:.0f}",
                      *(f"{r[q]:.2f}" for q in ("p50", "p90", "p99", "max")))
        console.print(t)
    if len(c.totals):
        t = Table(title="VMs", title_justify="left")
        for col in ("side", "pid", "vm fd", "faults", "2M/1G", "p50 us", "exits to VMM",
                    "errors", "recorded"):
            t.add_column(col)
        for r in c.totals.to_dict("records"):
            exits = ", ".join(f"{EXIT_REASONS.get(int(k), k)} {v}" for k, v in r["exits"].items())
            t.add_row(r["side"], str(r["pid"]), str(r["vm_fd"]), str(r["faults"]),
                      "" if pd.isna(r["huge_share"]) else f"{r['huge_share'] * 100:.0f}%",
                      "" if pd.isna(r["p50_us"]) else f"{r['p50_us']:.1f}", exits,
                      str(r["errors"]), "" if r["recorded_s"] is None else f"{r['recorded_s']} s")
        console.print(t)
    lines = diff_summary_lines(c)
    for line in lines:
        style = "bold red" if line.startswith("REGRESSION") else "yellow"
        console.print(f"[{style}]{escape(line)}[/]")
    n = len(c.regressions)
    console.print("[green]no regression[/]" if not n else f"[bold red]{n} regression(s)[/]")


def diff_to_json(base, new, c) -> str:
    return json.dumps({
        "base": base.recording.path, "new": new.recording.path, "method": c.method,
        "regressions": len(c.regressions),
        "summary": diff_summary_lines(c),
        "findings": [f.__dict__ for f in c.findings],
        "slots": json.loads(c.slots.to_json(orient="records")),
        "latency": json.loads(c.latency.to_json(orient="records")),
        "vms": json.loads(c.totals.to_json(orient="records")),
    }, indent=1, default=str)
