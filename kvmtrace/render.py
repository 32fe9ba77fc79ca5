"""Views of a model for people (rich text) and for programs (JSON, CSV).

Only presentation lives here; every number comes from kvmtrace.analysis.

Every string that comes from a recording or from the user (paths, host and
kernel names, VMA names, notes, reasons) reaches the terminal as a rich
``Text`` (table cells, via ``_c``) or through ``_m`` (inside markup), never as
markup: a VMA named ``[/]`` prints as itself instead of crashing the report,
and control characters (terminal escape sequences, bidi overrides) are shown
as ``\\xNN`` / ``\\uNNNN`` instead of being sent to the terminal. The console
should be made with ``emoji=False`` so ``:name:`` stays literal (``make_console``).
"""

from __future__ import annotations

import json
import math
import re

import pandas as pd
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .analysis import identity, pages, schema, summary
from .analysis.model import EXIT_REASONS, Model
from .probes.events import EVENTS

VERDICT_STYLE = {"consistent": "green", "downgraded": "yellow", "upgraded": "bold red",
                 "rejected": "red", "unknown": "dim"}

# C0 / DEL / C1 controls, the bidi / zero-width format characters that can
# make text display as something else, and lone surrogates (undecodable bytes
# of a file name, or "\\ud800" in a recording's JSON), which cannot be encoded
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u202a-\u202e\u2066-\u2069\ufeff"
                     "\ud800-\udfff]")


def plain(x) -> str:
    """``x`` as a string safe to show on a terminal: unprintable characters
    as Python-style escapes."""
    s = str(x)
    return _UNSAFE.sub(lambda m: (f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100
                                  else f"\\u{ord(m.group()):04x}"), s)


def _m(x) -> str:
    """A recorded or user-given value to put inside rich markup."""
    return escape(plain(x))


def _c(x, style: str = "") -> Text:
    """A table cell from any value: literal text, never markup."""
    return Text(plain(x), style=style)


def make_console(**kw) -> Console:
    """The console every text view prints to: no emoji codes; 200 columns when
    writing to a file or pipe (no wrapping at 80)."""
    c = Console(emoji=False, **kw)
    if not c.is_terminal and "width" not in kw:
        c = Console(emoji=False, width=200, **kw)
    return c


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
    """The tables every output format shows, all through one filter."""
    sel = summary.select
    return {
        "slots": summary.slot_summary(model, pid, slot),
        "ops": summary.ops_table(model, pid, slot),
        "faults": sel(model.faults, model, pid, slot),
        "ranges": sel(model.ranges, model, pid, slot),
        "verdicts": sel(model.verdicts, model, pid, slot),
        "errors": sel(model.errors, model, pid, slot),
        "vmas": sel(model.recording["vmas"], model, pid, slot),
        "lost": model.lost,  # per kind, host-wide: not placeable per process or slot
    }


def to_json(model: Model, pid=None, slot=None, table=None) -> str:
    t = tables(model, pid, slot)
    body = {name: schema.records(df) for name, df in t.items()
            if (table is None and name != "vmas") or table == name}
    if table is None:
        body = {"recording": {"path": model.recording.path, "complete": model.recording.complete,
                              "problems": model.recording.problems,
                              "schema_version": model.recording.schema_version},
                "tables_schema_version": schema.SCHEMA_VERSION,
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
    console.print(f"[bold]kvmtrace report[/] {_m(rec.path)}")
    console.print(f"  host {_m(m.get('host'))}  kernel {_m(m.get('kernel'))}  {_m(m.get('arch'))}  "
                  f"KVM {_m(kvm.get('vendor'))} ({_m(kvm.get('mmu'))}, "
                  f"{_m(kvm.get('spte_format'))} sptes)")
    n_events = sum(len(rec[name]) for name in EVENTS)
    if endv:
        try:
            lost = f"{sum((endv.get('lost') or {}).values()):,} lost"
        except (TypeError, ValueError, AttributeError):
            lost = "lost events unknown"
    else:
        st = rec["stats"]
        lost = (f"{int(st.groupby('kind')['lost'].max().sum()):,} lost by the last flush"
                if len(st) else "lost events unknown")
    console.print(f"  recorded {_m(endv.get('elapsed_s', '?'))} s, stopped by "
                  f"{_m(endv.get('stopped_by', 'unknown (not closed)'))}; "
                  f"{n_events:,} events, {lost}")
    console.print(f"  probes attached: {_m(', '.join(map(str, probes.get('attached', []))))}")
    for name, why in (probes.get("unavailable") or {}).items():
        console.print(f"  [dim]not attached: {_m(name)}: {_m(why)}[/]")
    for p in model.notes:  # the recording's own problems come first in it
        console.print(f"  [yellow]note:[/] {_m(p)}")


def _memslot_table(s: pd.DataFrame, console: Console):
    for (pid, proc, vm), g in s.groupby(["pid", "proc", "vm_fd"]):
        who = identity.label(pid, proc)
        if proc:
            who += f" (process {proc + 1} with pid {pid} in this recording)"
        t = Table(title=_c(f"memslots of VM pid {who} vm fd {vm}"), title_justify="left")
        for c in ("slot", "as", "GPA range", "size", "flags", "HVA", "VMA", "VmFlags",
                  "VMA type", "ioctl", "history"):
            t.add_column(c, overflow="fold")
        for r in g.itertuples(index=False):
            hist = f"{r.created_by} {_t(r.t_start_s)}"
            if r.ended_by:
                hist += f"; {r.ended_by} {_t(r.t_end_s)}"
            t.add_row(*map(_c, (_slot(r.slot, r.version), r.as_id,
                                f"{_hex(r.gpa)}-{_hex(r.gpa_end)}", _size(r.size), r.flag_names,
                                _hex(r.hva), r.vma, r.vm_flags, r.slot_vma_memtype,
                                str(r.ioctl_name).replace("KVM_SET_USER_MEMORY_", ""), hist)))
        console.print(t)


def _activity_table(s: pd.DataFrame, console: Console, levels: dict[str, str]):
    t = Table(title="faults per slot", title_justify="left")
    lost = bool(s["lost"].any() or s["unpaired_installs"].any())
    cols = ["slot", "faults", "read", "write", "exec", *levels.values(), "spte type",
            "prefetched", "invalidations", "MMIO exits", "p50 service"]
    cols += ["lost", "unpaired installs"] if lost else []
    for c in cols:
        t.add_column(c, justify="left" if c in ("slot", "spte type") else "right")
    for r in s.to_dict("records"):
        p50 = r["service_p50_us"]
        row = [_slot(r["slot"], r["version"]),
               *(r[c] for c in ("faults", "read", "write", "exec", *levels)),
               r["spte_memtype"], r["prefetched"], r["invalidations"],
               r["mmio_exits"], "" if pd.isna(p50) else f"{p50:.1f} us"]
        row += [r["lost"], r["unpaired_installs"]] if lost else []
        t.add_row(*(_c(x, "red" if i >= 13 and x else "") for i, x in enumerate(row)))
    console.print(t)


def _verdict_table(v: pd.DataFrame, console: Console):
    t = Table(title="memory-type verdicts", title_justify="left")
    for c in ("slot", "GPA", "faults", "verdict", "reason"):
        t.add_column(c, overflow="fold")
    for r in v.itertuples(index=False):
        style = VERDICT_STYLE.get(r.verdict, "")
        t.add_row(_c(_slot(r.slot, max(r.version, 0))), _c(_hex(r.gpa)), _c(r.faults),
                  _c(r.verdict, style), _c(r.reason))
    console.print(t)


def _ranges_table(r: pd.DataFrame, console: Console, page: int):
    t = Table(title="page ranges (guest frames faulted, by level and memory types)",
              title_justify="left")
    for c in ("slot", "GPA range", "pages", "level", "VMA type", "spte type", "verdict"):
        t.add_column(c)
    for x in r.itertuples(index=False):
        style = VERDICT_STYLE.get(x.verdict, "")
        t.add_row(*map(_c, (x.slot, f"{_hex(x.gfn_first * page)}-{_hex((x.gfn_last + 1) * page)}",
                            x.pages, x.size, x.vma_memtype, x.spte_memtype)),
                  _c(x.verdict, style))
    console.print(t)


def _ops_table(o: pd.DataFrame, console: Console):
    t = Table(title="memslot ioctls", title_justify="left")
    for c in ("time", "pid", "vm", "ioctl", "slot", "op", "flags", "GPA", "size", "result"):
        t.add_column(c, overflow="fold")
    for r in o.itertuples(index=False):
        res = _c("ok") if r.ret >= 0 else Text.assemble(
            _c(r.errno, "red"), ": ", _c(str(r.reason).split(": ", 1)[-1]))
        t.add_row(*map(_c, (_t(r.t_s), identity.label(r.pid, r.proc), r.vm_fd,
                            str(r.ioctl_name).replace("KVM_SET_USER_MEMORY_", ""),
                            f"{r.as_id}:{r.slot_id}" if r.as_id else r.slot_id,
                            r.op, r.flag_names, _hex(r.gpa), _size(r.size))), res)
    console.print(t)


def _lost_table(lost: pd.DataFrame, console: Console):
    """Per event kind: always one line; a table as soon as anything was lost."""
    n = int(lost["lost"].sum()) if len(lost) else 0
    if not n:
        console.print("lost events: none" if len(lost) else
                      "lost events: unknown (the recording has no per-kind counts)")
        return
    t = Table(title="lost events (ring buffer full), per kind", title_justify="left")
    for c in ("kind", "recorded", "lost", "lost %"):
        t.add_column(c, justify="left" if c == "kind" else "right")
    for r in lost.itertuples(index=False):
        t.add_row(_c(r.kind), _c(f"{r.events:,}"), _c(f"{r.lost:,}", "red" if r.lost else ""),
                  _c(f"{r.lost_pct:g}"))
    console.print(t)


def _errors_table(e: pd.DataFrame, console: Console):
    if not len(e):
        console.print("errors: none")
        return
    t = Table(title="errors", title_justify="left")
    for c in ("pid", "vm", "what", "slot", "errno", "detail"):
        t.add_column(c, overflow="fold")
    for r in e.itertuples(index=False):
        t.add_row(_c(identity.label(r.pid, r.proc)), _c(r.vm_fd), _c(r.what), _c("" if pd.isna(r.slot) else r.slot),
                  _c(r.errno, "red"), _c(r.detail))
    console.print(t)


def to_text(model: Model, console: Console, pid=None, slot=None):
    t = tables(model, pid, slot)
    _header(model, console)
    s = t["slots"]
    if not len(s) and not len(t["ops"]) and (pid is not None or slot is not None) \
            and len(model.ops):
        what = " ".join(f"--{k} {v}" for k, v in (("pid", pid), ("slot", slot)) if v is not None)
        pids = ", ".join(map(str, sorted(set(model.ops["pid"].tolist()))))
        console.print(_c(f"no memslot matches {what} (recorded: pids {pids}; "
                         f"{len(model.slots)} slot versions)", "yellow"))
    elif not len(s) and not len(t["ops"]):
        console.print("no memslots recorded: the VMM set its memslots before recording "
                      "started, or no VM ran (faults outside known slots: "
                      f"{int((model.faults['slot_row'] < 0).sum())})")
    else:
        _memslot_table(s, console)
        _ops_table(t["ops"], console)
        _activity_table(s, console, summary.level_labels(model))
        _verdict_table(t["verdicts"], console)
        _ranges_table(t["ranges"], console, pages.page_size(model.meta))
    outside = int((model.faults["slot_row"] < 0).sum())
    if outside:
        console.print(f"[yellow]{outside} faults outside every recorded memslot[/] "
                      "(slots set before recording started, or of untraced VMs)")
    _lost_table(t["lost"], console)
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
    console.print(f"[bold]kvmtrace diff[/]\n  BASE {_m(base.recording.path)}\n"
                  f"  NEW  {_m(new.recording.path)}")
    console.print(f"  [dim]{_m(c.method)}[/]")
    for p in base.recording.problems:
        console.print(f"  [yellow]BASE note:[/] {_m(p)}")
    for p in new.recording.problems:
        console.print(f"  [yellow]NEW note:[/] {_m(p)}")
    for p in c.notes:
        console.print(f"  [yellow]note:[/] {_m(p)}")
    t = Table(title="slots (matched by address space, GPA and size)", title_justify="left")
    for col in ("GPA", "size", "slot", "backing", "faults", "pages", "2M/1G", "p50 us",
                "invalidations", "MMIO exits"):
        t.add_column(col, overflow="fold")

    def pair(a, b, fmt=str):
        fa = "" if pd.isna(a) else fmt(a)
        fb = "" if pd.isna(b) else fmt(b)
        return fa if fa == fb else f"{fa} -> {fb}"

    for r in c.slots.to_dict("records"):
        t.add_row(*map(_c, (
            _hex(r["gpa"]), _size(r["bytes"]), pair(r["slot_base"], r["slot_new"]),
            pair(r["backing_base"], r["backing_new"]),
            pair(r["faults_base"], r["faults_new"], lambda x: str(int(x))),
            pair(r["pages_base"], r["pages_new"], lambda x: str(int(x))),
            pair(r["huge_share_base"], r["huge_share_new"], lambda x: f"{x * 100:.0f}%"),
            pair(r["p50_us_base"], r["p50_us_new"], lambda x: f"{x:.1f}"),
            pair(r["invalidations_base"], r["invalidations_new"], lambda x: str(int(x))),
            pair(r["mmio_exits_base"], r["mmio_exits_new"], lambda x: str(int(x))))))
    console.print(t)
    lat = c.latency
    if len(lat):
        t = Table(title="fault service time (us) by slot, memory type and level",
                  title_justify="left")
        for col in ("by", "key", "side", "count", "rate/s", "p50", "p90", "p99", "max"):
            t.add_column(col, justify="left" if col in ("by", "key", "side") else "right")
        for r in lat.sort_values(["by", "key", "side"]).to_dict("records"):
            t.add_row(*map(_c, (r["by"], r["key"], r["side"], r["count"],
                                "" if pd.isna(r.get("rate")) else f"{r['rate']:.0f}",
                                *(f"{r[q]:.2f}" for q in ("p50", "p90", "p99", "max")))))
        console.print(t)
    if len(c.totals):
        t = Table(title="VMs", title_justify="left")
        for col in ("side", "pid", "vm fd", "faults", "2M/1G", "p50 us", "exits to VMM",
                    "errors", "recorded"):
            t.add_column(col)
        for r in c.totals.to_dict("records"):
            exits = ", ".join(f"{EXIT_REASONS.get(int(k), k)} {v}" for k, v in r["exits"].items())
            t.add_row(*map(_c, (
                r["side"], r["pid"], r["vm_fd"], r["faults"],
                "" if pd.isna(r["huge_share"]) else f"{r['huge_share'] * 100:.0f}%",
                "" if pd.isna(r["p50_us"]) else f"{r['p50_us']:.1f}", exits,
                r["errors"], "" if r["recorded_s"] is None else f"{r['recorded_s']} s")))
        console.print(t)
    lines = diff_summary_lines(c)
    for line in lines:
        style = "bold red" if line.startswith("REGRESSION") else "yellow"
        console.print(_c(line, style))
    n = len(c.regressions)
    console.print("[green]no regression[/]" if not n else f"[bold red]{n} regression(s)[/]")


def diff_to_json(base, new, c) -> str:
    return json.dumps({
        "base": base.recording.path, "new": new.recording.path, "method": c.method,
        "regressions": len(c.regressions),
        "notes": c.notes,
        "summary": diff_summary_lines(c),
        "findings": [f.__dict__ for f in c.findings],
        "tables_schema_version": schema.SCHEMA_VERSION,
        "slots": schema.records(c.slots),
        "latency": schema.records(c.latency),
        "vms": schema.records(c.totals),
    }, indent=1, default=str)
