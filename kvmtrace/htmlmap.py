"""The guest-physical memory map of the HTML report, as inline SVG text.

One map per VM (pid, process, VM fd) and KVM address space: every slot
version is a band on a GPA axis, drawn in three lanes, coloured by the host
VMA's memory type, by the memory type KVM installed (spte / stage-2 entry)
and by the verdict. A band's hover (its SVG ``<title>``) gives the slot, GPA
range, size, HVA, VMA, VM_* flags, both memory types, the verdict and its
reason with the kernel rule; hovering one band outlines the slot in all
three lanes (CSS only: the page has no script). Memslot requests KVM refused
get a fourth lane when there are any.

The axis is gap-compressed and logarithmic: each stretch between two slot
boundaries gets a width that grows with log2 of its size, and unmapped gaps a
fixed narrow width with a break mark, so a 16 KiB slot beside a 4 GiB one is
still a band one can point at. Boundaries are labelled in hex.

No matplotlib: the SVG is written here directly, and every string that comes
from a recording goes through ``esc`` (HTML-escaped, quotes too), so a VMA
path cannot close a tag or an attribute. The formatting helpers the report's
tables share (hex, sizes, times) live here too.
"""

from __future__ import annotations

import html
import math
from bisect import bisect_left

import pandas as pd

from .memtype import RANK, CACHED, COMBINING, UNCACHED

# -- formatting shared with html.py ------------------------------------------


def esc(x) -> str:
    """Any value as HTML text (quotes too: safe in attributes as well)."""
    return html.escape(str(x), quote=True)


def missing(v) -> bool:
    if v is None or v is pd.NA or v is pd.NaT:
        return True
    try:
        return bool(isinstance(v, float) and math.isnan(v))
    except TypeError:
        return False


def hexa(v) -> str:
    """An address or raw value in hex ('' when not known)."""
    return "" if missing(v) else f"{int(v):#x}"


def size(n) -> str:
    """Bytes with a binary unit: '16 KiB', '2 MiB', '4.5 KiB', '512 B'."""
    if missing(n):
        return ""
    n = int(n)
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            v = n / (1 << shift)
            return f"{int(v)} {unit}" if n % (1 << shift) == 0 else f"{v:.4g} {unit}"
    return f"{n} B"


def micros(us) -> str:
    """A duration given in microseconds, in the unit that reads best."""
    if missing(us):
        return ""
    us = float(us)
    if us >= 1e6:
        return f"{us / 1e6:.3g} s"
    if us >= 1e3:
        return f"{us / 1e3:.3g} ms"
    return f"{us:.3g} µs"


def rel_s(s) -> str:
    """Seconds from the recording's start: '+0.236 s'."""
    return "" if missing(s) else f"{float(s):+.3f} s"


def count(v) -> str:
    """An integer count: '68', '12,345' (never '1.2e+04')."""
    return "" if missing(v) else f"{int(v):,}"


def pct(x) -> str:
    """A share 0..1 as a percentage."""
    return "" if missing(x) else f"{float(x) * 100:.0f}%"


def slot_label(slot, version) -> str:
    """Slot id, with the version after a move / flags change (v2, v3, ...)."""
    return f"{int(slot)} v{int(version) + 1}" if int(version) > 0 else str(int(slot))


# -- colours -----------------------------------------------------------------

# memory types: cacheable in blues, write-combining teal, uncached browns
MEMTYPE_COLORS = {
    "WB": "#3b75af", "Normal": "#3b75af", "Normal-Tagged": "#2b5a8a",
    "WT": "#6ea3d6", "Normal-WT": "#6ea3d6", "WP": "#9ec5ea",
    "WC": "#35978f", "Normal-NC": "#35978f",
    "UC-": "#bf812d", "Device-GRE": "#bf812d",
    "UC": "#8c510a", "Device": "#8c510a", "Device-nGnRE": "#8c510a",
    "Device-nGnRnE": "#5e3c06",
    "unknown": "#c7c7c7",
}
RANK_COLORS = {CACHED: "#3b75af", COMBINING: "#35978f", UNCACHED: "#8c510a"}
NONE_FILL = "#ffffff"  # nothing installed: white, dashed outline
VERDICT_COLORS = {"consistent": "#1a9850", "downgraded": "#fdae61", "upgraded": "#d73027",
                  "rejected": "#7b3294", "unknown": "#c7c7c7"}
RANK_WORDS = {CACHED: "cacheable", COMBINING: "write-combining / non-cacheable",
              UNCACHED: "uncached / device"}


def memtype_color(t: str) -> str:
    if not t:
        return NONE_FILL
    return MEMTYPE_COLORS.get(t) or RANK_COLORS.get(RANK.get(t), "#c7c7c7")


def verdict_color(v: str) -> str:
    return VERDICT_COLORS.get(v, "#c7c7c7") if v else NONE_FILL


def _ink(fill: str) -> str:
    """Black or white text, whichever reads on ``fill``."""
    r, g, b = (int(fill[i:i + 2], 16) for i in (1, 3, 5))
    return "#000" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "#fff"


# -- the scale ---------------------------------------------------------------

MIN_SEG = 30     # px: the narrowest stretch between two boundaries (one page)
PER_OCTAVE = 9   # px more per doubling of its size
GAP = 22         # px: an unmapped gap, whatever its size
PLOT_W = 1000    # px the axis fills at least
LEFT, RIGHT, TOP = 150, 64, 74
TRACK_H, LANE_GAP = 20, 10
CHAR_W = 6.3     # px per character of the 11px band labels (approximate, to fit text)


class Scale:
    """Gap-compressed, log-per-stretch GPA axis: ``x(gpa)`` for any boundary."""

    def __init__(self, intervals: list[tuple[int, int]], width: int = PLOT_W):
        pts = {0}
        for a, b in intervals:
            pts.update((a, b))
        self.bounds = sorted(pts)
        cover = [0] * len(self.bounds)  # +1 at a start, -1 at an end
        for a, b in intervals:
            if b > a:
                cover[bisect_left(self.bounds, a)] += 1
                cover[bisect_left(self.bounds, b)] -= 1
        self.covered, depth = [], 0
        for i in range(len(self.bounds) - 1):
            depth += cover[i]
            self.covered.append(depth > 0)
        # natural widths: MIN_SEG plus PER_OCTAVE per doubling; then fitted to
        # ``width``: stretched when narrower, the log part squeezed when wider
        # (never below MIN_SEG: a map with very many slots scrolls instead)
        extra = [PER_OCTAVE * math.log2(max(b - a, 4096) / 4096) if c else 0.0
                 for a, b, c in zip(self.bounds, self.bounds[1:], self.covered)]
        n_mapped = sum(self.covered)
        fixed = GAP * (len(self.covered) - n_mapped)
        natural = fixed + n_mapped * MIN_SEG + sum(extra)
        if n_mapped and natural < width:
            k = (width - fixed) / (natural - fixed)
            seg = [(MIN_SEG + e) * k if c else GAP for e, c in zip(extra, self.covered)]
        elif n_mapped and sum(extra) and natural > width:
            k = max(0.0, (width - fixed - n_mapped * MIN_SEG) / sum(extra))
            seg = [MIN_SEG + e * k if c else GAP for e, c in zip(extra, self.covered)]
        else:
            seg = [MIN_SEG + e if c else GAP for e, c in zip(extra, self.covered)]
        self.xs = [0.0]
        for w in seg:
            self.xs.append(self.xs[-1] + w)
        self.width = self.xs[-1]

    def x(self, gpa: int) -> float:
        return self.xs[min(bisect_left(self.bounds, gpa), len(self.xs) - 1)]


# -- one map -------------------------------------------------------------------

def _num(v, default=0) -> int:
    return default if missing(v) else int(v)


def _str(v, default: str = "") -> str:
    """A text cell: ``default`` for null / empty."""
    return default if missing(v) or v == "" else str(v)


def _tracks(items: list[dict]) -> int:
    """Give each band a track (row) so bands that overlap in GPA do not: live
    slot versions (the map at the end) first, on track 0; earlier versions
    above them. Returns the number of tracks."""
    ends: list[int] = []
    for it in sorted(items, key=lambda it: (not it["live"], it["gpa"], it["t"])):
        for k, end in enumerate(ends):
            if end <= it["gpa"]:
                ends[k] = it["end"]
                it["track"] = k
                break
        else:
            ends.append(it["end"])
            it["track"] = len(ends) - 1
    return max(len(ends), 1)


def _split(types: str) -> list[str]:
    return [t for t in str(types).split("/") if t] if types else []


def _hover(r: dict, lanes) -> str:
    lines = [f"slot {r['label']}" + (f" (address space {r['as_id']})" if r["as_id"] else "")
             + ("" if r["live"] else f", ended by {r['ended_by']} {rel_s(r['t_end_s'])}"),
             f"GPA {hexa(r['gpa'])}-{hexa(r['end'])} ({size(r['end'] - r['gpa'])})",
             f"HVA {hexa(r['hva'])}" + (f", KVM_MEM flags {r['flags']}" if r["flags"] not in
                                        ("", "-") else ""),
             f"VMA {r['vma'] or 'not seen'}",
             f"VM flags {r['vm_flags']}" + (f" (smaps: {r['vmflags']})" if r["vmflags"] else ""),
             f"at the ioctl: {r['raw']}" if r["raw"] else ""]
    for name, key in lanes:
        lines.append(f"{name}: {r[key] or ('none installed' if key == 'spte_type' else 'none')}")
    lines.append(f"faults {r['faults']:,}" + (f", {r['lost']:,} events lost" if r["lost"] else ""))
    lines.append(f"why: {r['reason']}" if r["reason"] else "")
    return "\n".join(x for x in lines if x)


def _band(x0: float, x1: float, y: float, fills: list[str], text: str, dashed: bool,
          hatch: str | None) -> list[str]:
    out = []
    w = (x1 - x0) / max(len(fills), 1)
    for i, fill in enumerate(fills or [NONE_FILL]):
        extra = ' stroke-dasharray="3 2"' if fill == NONE_FILL or dashed else ""
        out.append(f'<rect x="{x0 + i * w:.1f}" y="{y:.1f}" width="{max(w, 1):.1f}" '
                   f'height="{TRACK_H - 2}" fill="{fill}"{extra}/>')
    if hatch:
        out.append(f'<rect class="old" x="{x0:.1f}" y="{y:.1f}" width="{x1 - x0:.1f}" '
                   f'height="{TRACK_H - 2}" fill="url(#{hatch})"/>')
    if text:
        fill = fills[0] if fills else NONE_FILL
        out.append(f'<text x="{x0 + 4:.1f}" y="{y + TRACK_H - 7:.1f}" fill="{_ink(fill)}">'
                   f"{esc(text)}</text>")
    return out


def _fit(width: float, *texts: str) -> str:
    for t in texts:
        if len(t) * CHAR_W + 8 <= width:
            return t
    return ""


def memory_map(rows: list[dict], refused: list[dict], uid: str, installed_name: str) -> str:
    """One SVG: ``rows`` are slot versions (dicts, see ``vm_maps``), ``refused``
    the refused memslot requests of the same VM and address space."""
    lanes = [("VMA memory type", "vma_type"), (installed_name, "spte_type"),
             ("verdict", "verdict")]
    ivals = [(r["gpa"], max(r["end"], r["gpa"])) for r in rows + refused]
    sc = Scale(ivals)
    ntr = _tracks(rows)
    nref = _tracks(refused) if refused else 0
    lane_h = ntr * TRACK_H
    lane_y = [TOP + i * (lane_h + LANE_GAP) for i in range(3)]
    ref_y = TOP + 3 * (lane_h + LANE_GAP)
    height = ref_y + (nref * TRACK_H + LANE_GAP if refused else 0) + 6
    width = LEFT + sc.width + RIGHT
    hatch = f"old-{uid}"
    fits = sc.width <= PLOT_W + 0.5  # else it scrolls (very many slots)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" class="gpamap{" fit" if fits else ""}" '
           f'width="{width:.0f}" height="{height:.0f}" viewBox="0 0 {width:.0f} {height:.0f}" '
           f'role="img" aria-label="guest-physical memory map">',
           f'<defs><pattern id="{hatch}" width="6" height="6" patternUnits="userSpaceOnUse" '
           f'patternTransform="rotate(45)"><rect width="2" height="6" fill="#fff" '
           f'fill-opacity="0.55"/></pattern></defs>']
    # lane labels and backgrounds
    names = [n for n, _ in lanes] + (["refused requests"] if refused else [])
    ys = lane_y + ([ref_y] if refused else [])
    hs = [lane_h] * 3 + ([nref * TRACK_H] if refused else [])
    for name, y, h in zip(names, ys, hs):
        out.append(f'<rect class="lane" x="{LEFT}" y="{y - 1}" width="{sc.width:.1f}" '
                   f'height="{h}" fill="#f7f7f7"/>')
        out.append(f'<text class="lanename" x="{LEFT - 8}" y="{y + h / 2 + 4:.1f}" '
                   f'text-anchor="end">{esc(name)}</text>')
    # the axis: a tick per boundary, hex labels where they do not collide
    bottom = height - 6
    last = -1e9
    for i, (gpa, x) in enumerate(zip(sc.bounds, sc.xs)):
        xx = LEFT + x
        out.append(f'<line class="tick" x1="{xx:.1f}" y1="{TOP - 6}" x2="{xx:.1f}" '
                   f'y2="{bottom}"/>')
        if xx - last >= 12 or i == len(sc.bounds) - 1:
            out.append(f'<text class="addr" x="{xx + 2:.1f}" y="{TOP - 9}" '
                       f'transform="rotate(-40 {xx + 2:.1f} {TOP - 9})">{hexa(gpa)}</text>')
            last = xx
    for a, b, c, x0, x1 in zip(sc.bounds, sc.bounds[1:], sc.covered, sc.xs, sc.xs[1:]):
        if not c:
            mid = LEFT + (x0 + x1) / 2
            what = f"unmapped: {hexa(a)}-{hexa(b)} ({size(b - a)}), not drawn to scale"
            out.append(f'<g class="gap"><title>{esc(what)}</title>'
                       f'<rect x="{LEFT + x0 + 3:.1f}" y="{TOP - 4}" width="{x1 - x0 - 6:.1f}" '
                       f'height="{bottom - TOP + 4}" fill="#fff"/>'
                       f'<text class="brk" x="{mid:.1f}" y="{lane_y[1] + lane_h / 2 + 4:.1f}" '
                       f'text-anchor="middle">≈</text></g>')
    for r in rows:
        x0, x1 = LEFT + sc.x(r["gpa"]), LEFT + sc.x(r["end"])
        dy = r["track"] * TRACK_H + 1
        g = [f'<a href="#{esc(r["anchor"])}"><g class="slot" data-slot="{esc(r["slot"])}" '
             f'data-version="{esc(r["version"])}" data-gpa="{hexa(r["gpa"])}" '
             f'data-verdict="{esc(r["verdict"])}"><title>{esc(_hover(r, lanes))}</title>']
        for (name, key), y in zip(lanes, lane_y):
            v = r[key]
            if key == "verdict":
                fills, words = [verdict_color(v)], v
            else:
                fills, words = [memtype_color(t) for t in _split(v)], v or "none"
            g += _band(x0, x1, y + dy, fills, _fit(x1 - x0, f"{r['label']}: {words}",
                                                      r["label"]),
                       False, None if r["live"] else hatch)
        g.append("</g></a>")
        out += g
    for r in refused:
        x0, x1 = LEFT + sc.x(r["gpa"]), LEFT + max(sc.x(r["end"]), sc.x(r["gpa"]) + 3)
        y = ref_y + r["track"] * TRACK_H + 1
        out.append(f'<g class="refused" data-slot="{esc(r["slot"])}"><title>'
                   f'{esc(_refused_hover(r))}</title>')
        out += _band(x0, x1, y, [VERDICT_COLORS["rejected"]], _fit(
            x1 - x0, f"slot {r['slot']}: {r['errno']}", str(r["slot"])), True, None)
        out.append("</g>")
    out.append("</svg>")
    return "".join(out)


def _refused_hover(r: dict) -> str:
    return (f"refused {r['ioctl']} for slot {r['slot']} at {rel_s(r['t_s'])}\n"
            f"GPA {hexa(r['gpa'])}+{size(r['end'] - r['gpa'])}\n{r['reason']}")


# -- every VM -----------------------------------------------------------------

KEY = ["pid", "proc", "vm_fd", "as_id", "slot", "version"]


def _slot_extra(model, s: pd.DataFrame) -> pd.DataFrame:
    """Columns of the model's slot table the summary leaves out, row for row
    with ``s``: the raw vm_flags / vm_page_prot captured at the ioctl, the
    arm64 VMA type the verdicts use."""
    cols = [c for c in ("vm_flags", "vm_page_prot", "vma_memtype_arm64")
            if c in model.slots]
    return s[KEY].merge(model.slots[KEY + cols], on=KEY, how="left")


def _vma_type(from_faults, arm, known) -> str:
    """The host VMA's memory type of a slot version: what the faults saw, else
    the type known without faults (arm64: the type the verdicts use)."""
    f, a, k = _str(from_faults), _str(arm), _str(known)
    return f if f and f != "unknown" else a or k or "unknown"


def vm_rows(model, s: pd.DataFrame) -> list[dict]:
    """The slot versions of the summary table ``s`` as plain dicts for the map."""
    if not len(s):
        return []
    x = _slot_extra(model, s).to_dict("records")
    out = []
    for r, e in zip(s.to_dict("records"), x):
        gpa = int(r["gpa"])
        raw = ", ".join(f"{k} {hexa(e[k])}" for k in ("vm_flags", "vm_page_prot")
                        if k in e and not missing(e[k]))
        out.append({
            "pid": int(r["pid"]), "proc": int(r["proc"]), "vm_fd": int(r["vm_fd"]),
            "as_id": int(r["as_id"]), "slot": int(r["slot"]), "version": int(r["version"]),
            "label": slot_label(r["slot"], r["version"]), "gpa": gpa,
            "end": gpa + int(r["size_bytes"]), "hva": r["hva"],
            "flags": _str(r["flag_names"]),
            "vma": _str(r["vma"]), "vm_flags": _str(r["vm_flags"], "-"),
            "vmflags": _str(r["vmflags"]), "raw": raw,
            "vma_type": _vma_type(r["vma_memtype"], e.get("vma_memtype_arm64"),
                                  r["slot_vma_memtype"]),
            "spte_type": _str(r["spte_memtype"]), "verdict": _str(r["verdict"]),
            "reason": _str(r["reason"]), "faults": _num(r["faults"]), "lost": _num(r["lost"]),
            "live": not _str(r["ended_by"]), "ended_by": _str(r["ended_by"]),
            "t": 0.0 if missing(r["t_start_s"]) else float(r["t_start_s"]),
            "t_end_s": r["t_end_s"],
            "anchor": anchor(r["pid"], r["proc"], r["vm_fd"], r["as_id"], r["slot"],
                             r["version"]),
        })
    return out


def refused_rows(ops: pd.DataFrame) -> list[dict]:
    """Refused memslot ioctls (the ops view) with a range to draw."""
    bad = ops[ops["ret"] < 0] if len(ops) else ops
    out = []
    for r in bad.to_dict("records"):
        gpa, n = int(r["gpa"]), int(r["size_bytes"])
        out.append({"pid": int(r["pid"]), "proc": int(r["proc"]), "vm_fd": int(r["vm_fd"]),
                    "as_id": int(r["as_id"]), "slot": int(r["slot_id"]), "gpa": gpa,
                    "end": gpa + n, "live": True, "t": 0.0, "t_s": r["t_s"],
                    "ioctl": _str(r["ioctl_name"], "memslot ioctl"),
                    "errno": _str(r["errno"], "error"), "reason": _str(r["reason"])})
    return out


def anchor(pid, proc, vm_fd, as_id, slot, version) -> str:
    """The id of a slot version's row in the memslot table (the map links to it)."""
    return f"s-{int(pid)}-{int(proc)}-{int(vm_fd)}-{int(as_id)}-{int(slot)}-{int(version)}"


def installed_name(meta: dict) -> str:
    arch = str(meta.get("arch") or "")
    mmu = str((meta.get("kvm") or {}).get("mmu") or "")
    if arch in ("aarch64", "arm64") or mmu == "stage2":
        return "installed (stage 2)"
    return {"ept": "installed (EPT)", "npt": "installed (NPT)"}.get(mmu, "installed (spte)")


def legend(rows: list[dict], refused: list[dict]) -> str:
    """Swatches for the types and verdicts that appear, and what the marks mean."""
    types = {t for r in rows for k in ("vma_type", "spte_type") for t in _split(r[k])}
    none = any(not r["spte_type"] for r in rows)
    verdicts = [v for v in VERDICT_COLORS if any(r["verdict"] == v for r in rows)]

    def sw(fill, text, cls=""):
        return (f'<span class="sw {cls}"><span class="k" style="background:{fill}"></span>'
                f"{esc(text)}</span>")

    rank_order = sorted(types, key=lambda t: (-RANK.get(t, 0), t))
    parts = ['<div class="legend"><strong>memory type</strong> ']
    parts += [sw(memtype_color(t), f"{t} ({RANK_WORDS.get(RANK.get(t), 'not known')})")
              for t in rank_order]
    if none:
        parts.append(sw(NONE_FILL, "none installed", "dashed"))
    parts.append(" <strong>verdict</strong> ")
    parts += [sw(VERDICT_COLORS[v], v) for v in verdicts]
    if any(not r["live"] for r in rows):
        parts.append(' <span class="sw"><span class="k hatched"></span>earlier version (moved, '
                     "flags changed or deleted), above the live ones</span>")
    if refused:
        parts.append(" " + sw(VERDICT_COLORS["rejected"], "refused memslot request", "dashed"))
    parts.append(" <span class='hint'>GPA axis: each stretch between slot boundaries "
                 "grows with log2 of its size; ≈ marks an unmapped gap (not to scale). "
                 "Hover a band for details; click it for its table row.</span></div>")
    return "".join(parts)


def vm_maps(model, s: pd.DataFrame, ops: pd.DataFrame):
    """[(vm key, [(as_id, svg)], legend html)] for every VM in the summary ``s``
    (already filtered) and the refused requests in the ops view ``ops``."""
    rows, refused = vm_rows(model, s), refused_rows(ops)
    vms: dict = {}
    for r in rows:
        vms.setdefault((r["pid"], r["proc"], r["vm_fd"]), []).append(r)
    for r in refused:
        vms.setdefault((r["pid"], r["proc"], r["vm_fd"]), [])
    name = installed_name(model.meta)
    out = []
    for n, (key, vrows) in enumerate(sorted(vms.items())):
        vref = [r for r in refused if (r["pid"], r["proc"], r["vm_fd"]) == key]
        svgs = []
        for as_id in sorted({r["as_id"] for r in vrows + vref}):
            svgs.append((as_id, memory_map([r for r in vrows if r["as_id"] == as_id],
                                           [r for r in vref if r["as_id"] == as_id],
                                           f"{n}-{as_id}", name)))
        out.append((key, svgs, legend(vrows, vref)))
    return out
