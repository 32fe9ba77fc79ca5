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
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import pandas as pd
from rich import box
from rich.cells import cell_len
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from .analysis import compare, identity, pages, schema, summary
from .analysis.model import EXIT_REASONS, Model
from .probes.events import EVENTS
from .memtype import x86 as x86mt

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


def _mapping(nbytes) -> str:
    """A mapping size as kernel people write it ('4K', '2M'); '' when unknown."""
    return "" if pd.isna(nbytes) else pages.size_name(int(nbytes))


def _flags(names) -> str:
    """flag_names for people: '-' for none (the data has '')."""
    return names or "-"


def _slot(slot, version) -> str:
    """Slot id, with the version after a move / flags change (v2, v3, ...)."""
    return f"{slot} v{version + 1}" if version else str(slot)


def _t(x) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:+.3f}s"


def _sid(as_id, slot) -> str:
    """A slot id as KVM's ioctl names it: ``as:slot`` outside address space 0."""
    return f"{as_id}:{slot}" if as_id else str(slot)


# -- tables that fit the console ---------------------------------------------
#
# Every text table is declared as a list of Col. A number or an address
# ("num", "code") is never split: its column is as wide as its widest cell.
# Prose ("prose": reasons, names, paths) folds at spaces, else at punctuation
# (a path at / or -), never inside a number. A table is boxed where it fits
# whole; else it is drawn without box lines (columns two spaces apart, prose
# folded), then with short headers, then without its low-value columns in
# their declared order (``drop``: 1 goes first), and a dim line names what was
# left out. Narrower than its narrowest layout (about 60 columns for the
# widest table), a table's lines run past the width rather than split.

@dataclass(frozen=True)
class Col:
    header: str
    kind: str = "code"  # "num" (right-aligned), "code" (left), "prose" (folds at spaces)
    drop: int = 0       # 0: always shown; else left out at narrow widths, 1 first
    short: str = ""     # the header where space is short
    min: int = 20       # prose: narrowest it is folded to (words with numbers stay whole)


# what a fold never splits: words, numbers (1.5, 0:00:01.0 splits only at ':'), addresses
_RUN = re.compile(r"[0-9A-Za-z]+(?:[.,][0-9]+)*")


def _width(t: Text) -> int:
    return max((cell_len(line) for line in t.plain.split("\n")), default=0)


def _cuts(s: str, width: int) -> list[tuple[int, int]]:
    """(start, end) of each line of ``s`` folded to ``width``: at the last
    space that fits, else after the last character that is not inside a run
    of letters and digits (a path folds at / or -, a number never), else
    (a run longer than the width: a long word, never a number, see _layout)
    at the width."""
    out, start, n = [], 0, len(s)
    inside = [False] * (n + 1)  # a cut before s[p] would split a run
    for m in _RUN.finditer(s):
        inside[m.start() + 1:m.end()] = [True] * (m.end() - m.start() - 1)
    while n - start > width:
        end = start + width
        sp = s.rfind(" ", start + 1, end + 1)
        if sp > start:
            out.append((start, sp))
            start = sp + 1
            continue
        cut = next((p for p in range(end, start, -1) if not inside[p]), end)
        out.append((start, cut))
        start = cut
    out.append((start, n))
    return out


def _fold(t: Text, width: int) -> Text:
    """``t`` with line breaks that fit ``width`` (styles kept); see _cuts."""
    if _width(t) <= width:
        return t
    parts, pos = [], 0
    for para in t.plain.split("\n"):
        for a, b in _cuts(para, width):
            parts.append(t[pos + a:pos + b])
        pos += len(para) + 1
    return Text("\n").join(parts)


def _layout(cols: list[Col], rows: list[list[Text]], width: int | None):
    """(kept column indexes, compact, short headers, content widths, total
    width) of the fullest layout that fits ``width``; with ``width`` None the
    narrowest layout, whatever its width."""
    natural = [max([_width(r[i]) for r in rows], default=0) for i in range(len(cols))]
    words = [0] * len(cols)  # longest number (run of digits and letters with a digit)
    for i, c in enumerate(cols):
        if c.kind == "prose":
            words[i] = max([len(w) for r in rows for w in _RUN.findall(r[i].plain)
                            if any(ch.isdigit() for ch in w)], default=0)
    droppable = [i for _, i in sorted((c.drop, i) for i, c in enumerate(cols) if c.drop)]
    steps = [(False, False, 0), (True, False, 0)] + \
        [(True, True, k) for k in range(len(droppable) + 1)]
    if width is None:
        steps = steps[-1:]
    for compact, short, k in steps:
        keep = [i for i in range(len(cols)) if i not in droppable[:k]]
        w = {}
        for i in keep:
            c = cols[i]
            head = cell_len(c.short if short and c.short else c.header)
            # boxed only where prose need not fold; without box lines it may
            w[i] = max(head, natural[i] if c.kind != "prose" or not compact else
                       min(natural[i], max(c.min, words[i])))
        overhead = 2 * len(keep) - 2 if compact else 3 * len(keep) + 1
        total = overhead + sum(w.values())
        if width is None:
            return keep, compact, short, w, total
        spare = width - total
        if spare < 0:
            continue
        for i in keep:  # prose grows back towards its natural width
            if cols[i].kind == "prose":
                grow = min(spare, max(natural[i] - w[i], 0))
                w[i] += grow
                spare -= grow
        return keep, compact, short, w, width - spare
    return None


# A table longer than this is drawn as plain aligned columns, without styles: rich
# lays out every cell of every row (3 min for the four slot tables of 32,764 memslots
# that KVM's set_memory_region_test makes, measured on the development host)
PLAIN_ROWS = 500


def _plain_table(out: Console, cols: list[Col], rows: list[list[Text]], keep, w, short):
    """The table as plain lines: each kept column padded to its width, prose
    folded (_cuts) onto continuation lines; written straight to the console's file."""
    def cell(i, t: str) -> list[str]:
        if cols[i].kind == "prose":
            return [t[a:b] for para in t.split("\n") for a, b in _cuts(para, w[i])] or [""]
        t = t if len(t) <= w[i] else t[:max(w[i] - 1, 0)] + "…"
        return [t.rjust(w[i]) if cols[i].kind == "num" else t.ljust(w[i])]

    heads = [(cols[i].short if short and cols[i].short else cols[i].header) for i in keep]
    lines = [" ".join(h.rjust(w[i]) if cols[i].kind == "num" else h.ljust(w[i])
                      for h, i in zip(heads, keep)).rstrip()]
    for r in rows:
        parts = [cell(i, r[i].plain) for i in keep]
        for k in range(max(len(p) for p in parts)):
            lines.append(" ".join(p[k] if k < len(p) else " " * w[i]
                                  for p, i in zip(parts, keep)).rstrip())
    out.file.write("\n".join(lines) + "\n")


def fit_table(console: Console, title, cols: list[Col], rows: list[list]):
    """Print ``title`` (a line) and a table of ``rows`` (cells: Text, or
    anything ``_c`` takes) that fits the console's width (see Col); over
    PLAIN_ROWS rows, as plain columns (_plain_table)."""
    rows = [[x if isinstance(x, Text) else _c(x) for x in r] for r in rows]
    lay = _layout(cols, rows, console.width)
    out = console
    if lay is None:  # nothing fits: the narrowest layout, its lines longer than the width
        lay = _layout(cols, rows, None)
        out = Console(file=console.file, width=lay[4], emoji=False, highlight=False,
                      color_system=console.color_system, force_terminal=console.is_terminal,
                      no_color=console.no_color)
    keep, compact, short, w, _ = lay
    if title is not None:
        console.print(title if isinstance(title, Text) else Text(plain(title), style="bold"))
    if len(rows) > PLAIN_ROWS:
        _plain_table(out, cols, rows, keep, w, short)
    else:
        if compact:
            t = Table(box=None, pad_edge=False, padding=(0, 1), header_style="bold underline")
        else:
            t = Table(box=box.HEAVY_HEAD)
        for i in keep:
            c = cols[i]
            head = c.short if short and c.short else c.header
            if c.kind == "prose":  # folded here (_fold), so rich has nothing left to wrap
                t.add_column(head, overflow="fold", min_width=w[i], max_width=w[i])
            else:
                t.add_column(head, no_wrap=True, width=w[i],
                             justify="right" if c.kind == "num" else "left")
        for r in rows:
            t.add_row(*(_fold(r[i], w[i]) if cols[i].kind == "prose" else r[i] for i in keep))
        out.print(t)
    gone = [cols[i].header for i in range(len(cols)) if i not in keep]
    if gone:
        console.print(Text(f"(left out at {console.width} columns: {', '.join(gone)}; "
                           "--width or --format tsv shows them)", style="dim"))


class _Tables(Mapping):
    """The report's tables by name, each made when first asked for (the text
    report never needs the per-fault rows)."""

    def __init__(self, model: Model, pid, slot):
        sel = summary.select
        self._make = {
            "slots": lambda: summary.slot_summary(model, pid, slot),
            "ops": lambda: summary.ops_table(model, pid, slot),
            "faults": lambda: sel(model.faults, model, pid, slot),
            "ranges": lambda: sel(model.ranges, model, pid, slot),
            "verdicts": lambda: sel(model.verdicts, model, pid, slot),
            "errors": lambda: sel(model.errors, model, pid, slot),
            "vmas": lambda: sel(model.recording["vmas"], model, pid, slot),
            "lost": lambda: model.lost,  # per kind, host-wide: not placeable per process or slot
        }
        self._made: dict[str, pd.DataFrame] = {}

    def __getitem__(self, name: str) -> pd.DataFrame:
        if name not in self._made:
            self._made[name] = self._make[name]()
        return self._made[name]

    def __iter__(self):
        return iter(self._make)

    def __len__(self):
        return len(self._make)


def tables(model: Model, pid=None, slot=None) -> Mapping[str, pd.DataFrame]:
    """The tables every output format shows, all through one filter."""
    return _Tables(model, pid, slot)


# tables of the whole JSON report: every table but the VMA snapshots and the
# per-fault rows (millions on a long recording: --table faults streams them)
JSON_TABLES = tuple(k for k in schema.REPORT_TABLES if k not in schema.WHOLE_LEAVES_OUT)
CHUNK_ROWS = 100_000  # rows per piece of a streamed table


def _streamable(df: pd.DataFrame) -> bool:
    """Written by pandas' to_json exactly as json.dumps writes its records:
    integers, text and booleans (a float would be rounded to 15 digits)."""
    return not any(df[c].dtype.kind == "f" or df[c].dtype == object for c in df.columns)


def _json_rows(df: pd.DataFrame):
    """``df``'s rows as the elements of a JSON array, compact, row-chunk by
    row-chunk (a line per chunk)."""
    for start in range(0, len(df), CHUNK_ROWS):
        text = df.iloc[start:start + CHUNK_ROWS].to_json(orient="records", force_ascii=True)
        yield ("\n" if not start else ",\n") + text[1:-1]  # without the array's brackets


def json_chunks(model: Model, pid=None, slot=None, table=None, end=""):
    """`kvmtrace report --format json`, piece by piece: the whole report (its
    summary tables, indented), or ``table`` alone; a big table without
    floats (the per-fault rows) streams one compact row a line."""
    t = tables(model, pid, slot)
    if table is not None:
        df = t[table]
        if len(df) > CHUNK_ROWS and _streamable(df):
            yield "{" + json.dumps(table) + ": ["
            yield from _json_rows(df)
            yield "\n]}" + end
            return
        yield json.dumps({table: schema.records(df)}, indent=1, default=str) + end
        return
    body = {"recording": {"path": model.recording.path, "complete": model.recording.complete,
                          "problems": model.recording.problems,
                          "schema_version": model.recording.schema_version},
            "tables_schema_version": schema.SCHEMA_VERSION,
            "meta": model.meta, "notes": model.notes,
            **{name: schema.records(t[name]) for name in JSON_TABLES}}
    yield json.dumps(body, indent=1, default=str) + end


def to_json(model: Model, pid=None, slot=None, table=None) -> str:
    return "".join(json_chunks(model, pid, slot, table))


def csv_chunks(model: Model, pid=None, slot=None, table="slots"):
    """--format csv, row-chunk by row-chunk (the header once)."""
    df = tables(model, pid, slot)[table or "slots"]
    if not len(df):
        yield df.to_csv(index=False)
    for start in range(0, len(df), CHUNK_ROWS):
        yield df.iloc[start:start + CHUNK_ROWS].to_csv(index=False, header=not start)


def to_csv(model: Model, pid=None, slot=None, table="slots") -> str:
    return "".join(csv_chunks(model, pid, slot, table))


# -- TSV: for grep, awk, cut ----------------------------------------------------
#
# One header line per table, a "# table NAME" line before each when several
# are printed; integers as integers, floats as Python writes them (repr: exact,
# shortest), booleans true / false, null as the empty field, nested values as
# compact JSON. In text a backslash, tab and newline are written \\, \t, \n
# (as PostgreSQL's COPY text format does) and other control characters as
# \xNN, so each row is one line and each field one column.

# the declared table (analysis/schema.py) behind each --table name
REPORT_TSV = {"slots": schema.SUMMARY, "ops": schema.OPS_VIEW, "faults": schema.FAULTS,
              "ranges": schema.RANGES, "verdicts": schema.VERDICTS, "errors": schema.ERRORS,
              "vmas": None, "lost": schema.LOST}
DIFF_TSV = {"slots": schema.DIFF_SLOTS, "latency": schema.DIFF_LATENCY, "vms": schema.DIFF_VMS,
            "findings": schema.DIFF_FINDINGS}
_TSV_ESC = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def tsv_field(v) -> str:
    if v is None:
        return ""
    if isinstance(v, (bool, np.bool_)):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        return repr(v) if math.isfinite(v) else ""
    if isinstance(v, (dict, list)):
        v = json.dumps(v, separators=(",", ":"), default=str)
    return plain(str(v).translate(_TSV_ESC))


def tsv_table(df: pd.DataFrame, declared=None) -> str:
    """``df`` as TSV: the declared columns in their order (all of df's without a
    declaration), one header line, a line per row."""
    cols = declared.names if declared is not None else [str(c) for c in df.columns]
    rows = schema.records(df[cols]) if len(df) else []
    out = ["\t".join(cols)]
    out += ["\t".join(tsv_field(r[c]) for c in cols) for r in rows]
    return "\n".join(out) + "\n"


def _tsv(parts: dict[str, tuple[pd.DataFrame, object]]) -> str:
    if len(parts) == 1:
        (df, decl), = parts.values()
        return tsv_table(df, decl)
    return "".join(f"# table {name}\n" + tsv_table(df, decl)
                   for name, (df, decl) in parts.items())


def to_tsv(model: Model, pid=None, slot=None, table=None) -> str:
    """The report's tables as TSV: ``table`` alone, or every table JSON gives
    (all but the VMA snapshots), each after a "# table NAME" line."""
    t = tables(model, pid, slot)
    names = [table] if table else [n for n in t if n != "vmas"]
    return _tsv({n: (t[n], REPORT_TSV[n]) for n in names})


def diff_to_tsv(base, new, c, table=None) -> str:
    t = {"slots": c.slots, "latency": c.latency, "vms": c.totals,
         "findings": compare.findings_table(c)}
    names = [table] if table else list(t)
    return _tsv({n: (t[n], DIFF_TSV[n]) for n in names})


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
    n_events = sum(model.event_counts.get(name, len(rec[name])) for name in EVENTS)
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
    if m.get("arch") == "x86_64" and isinstance(m.get("x86"), dict):
        console.print(f"  {_m(x86mt.mtrr_words(m['x86']))}")
    for name, why in (probes.get("unavailable") or {}).items():
        console.print(f"  [dim]not attached: {_m(name)}: {_m(why)}[/]")
    for p in model.notes:  # the recording's own problems come first in it
        console.print(f"  [yellow]note:[/] {_m(p)}")


# the slot is "as:slot" outside address space 0 (x86 SMM), as in the ioctl table
MEMSLOT_COLS = [Col("slot"), Col("GPA range"), Col("size"), Col("flags", drop=5),
                Col("HVA", drop=1), Col("VMA", "prose", min=16), Col("VmFlags", drop=4),
                Col("VMA type"), Col("ioctl", drop=2), Col("history", "prose", drop=3)]


# with record --qmp: QEMU's name for the slot's memory, after the VMA
QEMU_COL = Col("QEMU region", "prose", min=12)


def _qemu(r) -> str:
    """'pc.ram (ram)': QEMU's region and its kind, '-' where QEMU named none."""
    if pd.isna(r.qemu_region):
        return "-"
    return f"{r.qemu_region} ({r.qemu_kind})"


def _memslot_table(s: pd.DataFrame, console: Console):
    reused = s.groupby(["pid", "proc", "vm_fd"])["vm_instance"].nunique()
    named = bool(s["qemu_region"].notna().any())  # the column only where QEMU named slots
    cols = MEMSLOT_COLS[:6] + [QEMU_COL] + MEMSLOT_COLS[6:] if named else MEMSLOT_COLS
    for (pid, proc, vm, inst), g in s.groupby(["pid", "proc", "vm_fd", "vm_instance"]):
        who = identity.label(pid, proc)
        if proc:
            who += f" (process {proc + 1} with pid {pid} in this recording)"
        if reused[(pid, proc, vm)] > 1 or inst:  # the fd number held one VM, then another
            vm = f"{vm} (VM {inst + 1} on this fd number)"
        rows = []
        for r in g.itertuples(index=False):
            hist = f"{r.created_by} {_t(r.t_start_s)}"
            if r.ended_by:
                hist += f"; {r.ended_by} {_t(r.t_end_s)}"
            rows.append([_slot(_sid(r.as_id, r.slot), r.version),
                         f"{_hex(r.gpa)}-{_hex(r.gpa_end)}", _size(r.size_bytes),
                         _flags(r.flag_names),
                         _hex(r.hva), r.vma, *([_qemu(r)] if named else []), r.vm_flags,
                         r.slot_vma_memtype,
                         str(r.ioctl_name).replace("KVM_SET_USER_MEMORY_", ""), hist])
        fit_table(console, f"memslots of VM pid {who} vm fd {vm}", cols, rows)


def _activity_table(s: pd.DataFrame, console: Console, levels: dict[str, str]):
    lost = bool(s["lost"].any() or s["unpaired_installs"].any())
    cols = [Col("slot"), Col("faults", "num"), Col("read", "num", drop=3),
            Col("write", "num", drop=4), Col("exec", "num", drop=5),
            *(Col(x, "num") for x in levels.values()), Col("spte type", short="spte"),
            Col("prefetched", "num", drop=1, short="pref"),
            Col("invalidations", "num", drop=2, short="inval"),
            Col("MMIO exits", "num", short="mmio"), Col("p50 service", "num", short="p50")]
    cols += [Col("lost", "num"), Col("unpaired installs", "num", short="unpaired")] \
        if lost else []
    rows = []
    for r in s.to_dict("records"):
        p50 = r["service_p50_us"]
        row = [_slot(_sid(r["as_id"], r["slot"]), r["version"]),
               *(r[c] for c in ("faults", "read", "write", "exec", *levels)),
               r["spte_memtype"], r["prefetched"], r["invalidations"],
               r["mmio_exits"], "" if pd.isna(p50) else f"{p50:.1f} us"]
        row += [_c(r["lost"], "red" if r["lost"] else ""),
                _c(r["unpaired_installs"], "red" if r["unpaired_installs"] else "")] \
            if lost else []
        rows.append(row)
    fit_table(console, "faults per slot", cols, rows)


def _verdict_table(v: pd.DataFrame, console: Console):
    rows = [[_slot(_sid(r.as_id, r.slot), max(r.version, 0)), _hex(r.gpa), r.faults,
             _c(r.verdict, VERDICT_STYLE.get(r.verdict, "")), r.reason]
            for r in v.itertuples(index=False)]
    fit_table(console, "memory-type verdicts", [Col("slot"), Col("GPA"), Col("faults", "num"),
                                                Col("verdict"), Col("reason", "prose", min=24)],
              rows)


def _ranges_table(r: pd.DataFrame, console: Console, page: int):
    rows = [[x.slot, f"{_hex(x.gfn_first * page)}-{_hex((x.gfn_last + 1) * page)}",
             x.pages, _mapping(x.mapping_size_bytes), x.vma_memtype, x.spte_memtype,
             _c(x.verdict, VERDICT_STYLE.get(x.verdict, ""))] for x in r.itertuples(index=False)]
    fit_table(console, "page ranges (guest frames faulted, by level and memory types)",
              [Col("slot"), Col("GPA range"), Col("pages", "num", drop=1), Col("level"),
               Col("VMA type", short="VMA"), Col("spte type", short="spte"), Col("verdict")],
              rows)


def _ops_table(o: pd.DataFrame, console: Console):
    rows = []
    for r in o.itertuples(index=False):
        res = _c("ok") if r.ret >= 0 else Text.assemble(
            _c(r.errno, "red"), ": ", _c(str(r.reason).split(": ", 1)[-1]))
        rows.append([_t(r.t_s), identity.label(r.pid, r.proc), r.vm_fd,
                     str(r.ioctl_name).replace("KVM_SET_USER_MEMORY_", ""),
                     _sid(r.as_id, r.slot_id), r.op, _flags(r.flag_names), _hex(r.gpa),
                     _size(r.size_bytes),
                     res])
    fit_table(console, "memslot ioctls",
              [Col("time", drop=4), Col("pid", drop=3), Col("vm", drop=2), Col("ioctl", drop=1),
               Col("slot"), Col("op"), Col("flags", drop=5), Col("GPA"), Col("size"),
               Col("result", "prose")], rows)


def _lost_table(lost: pd.DataFrame, console: Console):
    """Per event kind: always one line; a table as soon as anything was lost."""
    n = int(lost["lost"].sum()) if len(lost) else 0
    if not n:
        console.print("lost events: none" if len(lost) else
                      "lost events: unknown (the recording has no per-kind counts)")
        return
    rows = [[r.kind, f"{r.events:,}", _c(f"{r.lost:,}", "red" if r.lost else ""),
             f"{r.lost_pct:g}"] for r in lost.itertuples(index=False)]
    fit_table(console, "lost events (ring buffer full), per kind",
              [Col("kind"), Col("recorded", "num"), Col("lost", "num"), Col("lost %", "num")],
              rows)


def _errors_table(e: pd.DataFrame, console: Console):
    if not len(e):
        console.print("errors: none")
        return
    rows = [[identity.label(r.pid, r.proc), r.vm_fd, r.what,
             "" if pd.isna(r.slot) else r.slot, _c(r.errno, "red"), r.detail]
            for r in e.itertuples(index=False)]
    fit_table(console, "errors", [Col("pid", drop=2), Col("vm", drop=1), Col("what", drop=3),
                                  Col("slot"), Col("errno"), Col("detail", "prose")], rows)


def _faults_table(f: pd.DataFrame, model: Model, console: Console):
    if not len(f):
        console.print("faults: none")
        return
    page = pages.page_size(model.meta)
    base = (model.meta.get("clock") or {}).get("monotonic_ns", 0)
    rows = []
    for r in f.itertuples(index=False):
        svc = r.service_ns
        rows.append([_t((r.ts - base) / 1e9), identity.label(r.pid, r.proc), r.tid,
                     "" if pd.isna(r.slot) else r.slot, _hex(r.gfn * page), r.access,
                     _mapping(r.mapping_size_bytes),
                     r.spte_memtype, r.vma_memtype,
                     _c(r.verdict, VERDICT_STYLE.get(r.verdict, "")),
                     "" if pd.isna(svc) else f"{svc / 1e3:.1f}",
                     "" if pd.isna(r.spte) else _hex(r.spte)])
    fit_table(console, "faults", [
        Col("time"), Col("pid", drop=3), Col("tid", drop=2), Col("slot"), Col("GPA"),
        Col("access"), Col("size"), Col("spte type", short="spte"), Col("VMA type", short="VMA"),
        Col("verdict"), Col("service us", "num", short="us"), Col("spte value", drop=1)], rows)


def _vmas_table(v: pd.DataFrame, console: Console):
    if not len(v):
        console.print("VMA snapshots: none")
        return
    kib = lambda x: "" if pd.isna(x) else _size(int(x) * 1024)  # noqa: E731
    rows = [[r.pid, f"{_hex(r.start)}-{_hex(r.end)}", r.perms, kib(r.size_kb),
             kib(r.kernelpagesize_kb), kib(r.anonhugepages_kb), r.vmflags, r.reason, r.path]
            for r in v.itertuples(index=False)]
    fit_table(console, "VMA snapshots (/proc/PID/smaps)", [
        Col("pid"), Col("range"), Col("perms"), Col("size"), Col("page", drop=3),
        Col("THP", drop=2), Col("VmFlags", "prose", drop=1, min=12),
        Col("snapshot", drop=4), Col("path", "prose", min=24)], rows)


# --table NAME in text: that table alone
TEXT_TABLES = ("slots", "ops", "faults", "ranges", "verdicts", "errors", "vmas", "lost")


def _no_slots(model: Model, t: dict, pid, slot, console: Console):
    what = " ".join(f"--{k} {v}" for k, v in (("pid", pid), ("slot", slot)) if v is not None)
    if what and len(model.ops):
        pids = ", ".join(map(str, sorted(set(model.ops["pid"].tolist()))))
        console.print(_c(f"no memslot matches {what} (recorded: pids {pids}; "
                         f"{len(model.slots)} slot versions)", "yellow"))
    elif not model.recording.complete:
        console.print(_c("no memslots in the part of the recording that could be read "
                         "(it is incomplete: see the notes above)", "yellow"))
    else:
        console.print("no memslots recorded: the VMM set its memslots before recording "
                      "started, or no VM ran (faults outside known slots: "
                      f"{model.fault_stats.outside})")


def to_text(model: Model, console: Console, pid=None, slot=None, table=None):
    t = tables(model, pid, slot)
    if table is not None:
        if table == "slots":
            if len(t["slots"]):
                _memslot_table(t["slots"], console)
                _activity_table(t["slots"], console, summary.level_labels(model))
            else:
                _no_slots(model, t, pid, slot, console)
        elif not len(t[table]) and table in ("ops", "ranges", "verdicts"):
            console.print(f"{table}: none")
        elif table == "ops":
            _ops_table(t["ops"], console)
        elif table == "faults":
            _faults_table(t["faults"], model, console)
        elif table == "ranges":
            _ranges_table(t["ranges"], console, pages.page_size(model.meta))
        elif table == "verdicts":
            _verdict_table(t["verdicts"], console)
        elif table == "errors":
            _errors_table(t["errors"], console)
        elif table == "vmas":
            _vmas_table(t["vmas"], console)
        elif table == "lost":
            _lost_table(t["lost"], console)
        else:
            raise ValueError(table)
        return
    _header(model, console)
    s = t["slots"]
    if not len(s) and not len(t["ops"]):
        _no_slots(model, t, pid, slot, console)
    else:
        _memslot_table(s, console)
        _ops_table(t["ops"], console)
        _activity_table(s, console, summary.level_labels(model))
        _verdict_table(t["verdicts"], console)
        _ranges_table(t["ranges"], console, pages.page_size(model.meta))
    outside = summary.outside_words(model)
    if outside:
        console.print(f"[yellow]{outside}[/]")
    _lost_table(t["lost"], console)
    _errors_table(t["errors"], console)


# -- diff -----------------------------------------------------------------

def diff_summary_lines(c) -> list[str]:
    """One line per slot with findings, the form CI logs show:
    'slot 2 (GPA ...): 2M/1G mappings 100% -> 0%, p50 fault time +180% [...]; cause: ...'"""
    by_slot: dict[str, list] = {}
    for f in c.findings:
        by_slot.setdefault(compare.label(f), []).append(f)
    lines = []
    for slot, fs in by_slot.items():
        mark = "REGRESSION" if any(f.regression for f in fs) else "changed"
        cause = [x["message"] for x in fs[0].causes]
        lines.append(f"{mark}: {slot}: " + ", ".join(f.message for f in fs)
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
    def pair(a, b, fmt=str):
        def one(x):  # a list (slot ids) is a value; None / NaN / NA is missing
            return fmt(x) if isinstance(x, list) or not pd.isna(x) else ""
        fa, fb = one(a), one(b)
        return fa if fa == fb else f"{fa} -> {fb}"

    rows = [[
        _hex(r["gpa"]), _size(r["size_bytes"]),
        pair(r["slot_base"], r["slot_new"], lambda x: "/".join(map(str, x))),
        pair(r["backing_base"], r["backing_new"]),
        pair(r["faults_base"], r["faults_new"], lambda x: str(int(x))),
        pair(r["pages_base"], r["pages_new"], lambda x: str(int(x))),
        pair(r["huge_share_base"], r["huge_share_new"], lambda x: f"{x * 100:.0f}%"),
        pair(r["p50_us_base"], r["p50_us_new"], lambda x: f"{x:.1f}"),
        pair(r["invalidations_base"], r["invalidations_new"], lambda x: str(int(x))),
        pair(r["mmio_exits_base"], r["mmio_exits_new"], lambda x: str(int(x)))]
        for r in c.slots.to_dict("records")]
    fit_table(console, "slots (matched by address space, GPA and size)", [
        Col("GPA"), Col("size"), Col("slot"), Col("backing", "prose", min=12),
        Col("faults", "num"), Col("pages", "num", drop=3), Col("2M/1G", "num"),
        Col("p50 us", "num"), Col("invalidations", "num", drop=1, short="inval"),
        Col("MMIO exits", "num", drop=2, short="mmio")], rows)
    lat = c.latency
    if len(lat):
        rows = [[r["by"], r["key"], r["side"], r["count"],
                 "" if pd.isna(r["faults_per_s"]) else f"{r['faults_per_s']:.0f}",
                 *(f"{r[q]:.2f}" for q in ("p50_us", "p90_us", "p99_us", "max_us"))]
                for r in lat.sort_values(["by", "key", "side"]).to_dict("records")]
        fit_table(console, "fault service time (us) by slot, memory type and level", [
            Col("by"), Col("key"), Col("side"), Col("count", "num"),
            Col("rate/s", "num", drop=1), Col("p50", "num"), Col("p90", "num", drop=2),
            Col("p99", "num"), Col("max", "num", drop=3)], rows)
    if len(c.totals):
        rows = []
        for r in c.totals.to_dict("records"):
            exits = ", ".join(f"{EXIT_REASONS.get(int(k), k)} {v}" for k, v in r["exits"].items())
            rows.append([
                r["side"], r["pid"], r["vm_fd"], r["faults"],
                "" if pd.isna(r["huge_share"]) else f"{r['huge_share'] * 100:.0f}%",
                "" if pd.isna(r["p50_us"]) else f"{r['p50_us']:.1f}", exits,
                r["errors"], "" if pd.isna(r["recorded_s"]) else f"{r['recorded_s']} s"])
        fit_table(console, "VMs", [
            Col("side"), Col("pid"), Col("vm fd", drop=2), Col("faults", "num"),
            Col("2M/1G", "num"), Col("p50 us", "num"), Col("exits to VMM", "prose", min=16),
            Col("errors", "num"), Col("recorded", "num", drop=1)], rows)
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
        "findings": schema.records(compare.findings_table(c)),
        "tables_schema_version": schema.SCHEMA_VERSION,
        "slots": schema.records(c.slots),
        "latency": schema.records(c.latency),
        "vms": schema.records(c.totals),
    }, indent=1, default=str)
