"""QEMU's names for guest memory: its flat views (``info mtree -f``) and
each memslot version named after the QEMU memory region at its place.

QEMU gives KVM one memslot per flat range of RAM, ROM, ROM device or RAM
device memory in an address space (accel/kvm/kvm-all.c, kvm_set_phys_mem),
trimmed inward to the host's page size (kvm_align_section); the flat view
says which region is behind each range and marks the ranges its accelerator
has a memslot for (" KVM", QEMU 5.1+). record --qmp stores QEMU's answers
with when they were asked (collectors/qmp.py, recording table qmp_mtree);
here each slot version is joined to the region whose trimmed range equals
the slot's (GPA, size) exactly, in the first answer of the slot's QEMU
asked and answered while the version was live. Nothing else names a slot: a
version no answer saw (it lived shorter than record's debounce, or there was
no --qmp) has no name, never a guessed one.

KVM address spaces are QEMU's: 0 is AS "memory", 1 (x86 SMM) AS "KVM-SMRAM".
"""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd

MEM_KINDS = ("ram", "rom", "romd", "ramd")  # flat-view kinds KVM gets a memslot for
AS_NAMES = {0: "memory", 1: "KVM-SMRAM"}    # KVM address space -> QEMU address space

# "  00000000000c3000-00000000000e7fff (prio 0, rom): pc.ram @00000000000c3000 KVM"
# (memory.c, mtree_print_flatview: the region's name, which may hold spaces, e.g.
# vfio's "0000:00:01.0 BAR 2 mmaps[0]"; " @offset" in the region when not 0; the
# accelerator's name when it has a memslot there; kind "nv-" prefixed when non-volatile)
FLAT_LINE = re.compile(r"^\s+([0-9a-f]+)-([0-9a-f]+) \(prio -?\d+, ([a-z/-]+)[^)]*\): "
                       r"(.+?)((?: @[0-9a-f]+)?)((?: KVM)?)$")


def flat_views(mtree: str) -> dict[str, list[dict]]:
    """Every address space's flat view in one ``info mtree -f`` text:
    {AS name: [{gpa, size, kind, name, kvm}]} (several address spaces share
    one flat view: each gets it). kind as QEMU prints it (ram, rom, romd,
    ramd, i/o); kvm: QEMU marks the range " KVM"."""
    out: dict[str, list[dict]] = {}
    names: list[str] = []
    ranges: list[dict] = []
    in_header = False

    def close():
        for n in names:
            out[n] = ranges

    for line in mtree.splitlines():
        if line.startswith("FlatView #"):
            close()
            names, ranges, in_header = [], [], True
        elif in_header and line.startswith(' AS "'):
            names.append(line[len(' AS "'):].split('",', 1)[0])
        elif len(line) < 1000 and (m := FLAT_LINE.match(line)):  # QEMU: ~100
            in_header = False
            lo, hi = int(m[1], 16), int(m[2], 16)
            if not lo <= hi < 1 << 64:  # not QEMU's (its ranges are 64-bit, last >= first)
                continue
            ranges.append({"gpa": lo, "size": hi - lo + 1, "kind": m[3], "name": m[4],
                           "kvm": bool(m[6])})
    close()
    return out


def flat_view(mtree: str, address_space: str = "memory") -> list[dict]:
    """The ranges of one address space's flat view (``flat_views``)."""
    return flat_views(mtree).get(address_space, [])


def memory_kind(kind: str) -> str | None:
    """The flat-view kind as a memslot kind (ram/rom/romd/ramd), None for I/O."""
    k = kind.removeprefix("nv-")
    return k if k in MEM_KINDS else None


def _regions(dumps: pd.DataFrame, page: int) -> pd.DataFrame:
    """One row per memory range of every dump: the dump's pid and times, the
    KVM address space, the range trimmed inward to ``page`` as KVM gets it."""
    rows = []
    parsed: dict[str, dict] = {}  # answers repeat: each distinct text parsed once
    for order, d in enumerate(dumps.itertuples(index=False)):
        if not int(d.pid):
            continue  # not known which QEMU answered: names nothing
        views = parsed.get(d.text)
        if views is None:
            views = parsed[d.text] = flat_views(d.text)
        for as_id, as_name in AS_NAMES.items():
            for r in views.get(as_name, ()):
                kind = memory_kind(r["kind"])
                if kind is None:
                    continue
                lo = -(-r["gpa"] // page) * page
                hi = (r["gpa"] + r["size"]) // page * page
                if hi > lo:
                    rows.append((int(d.pid), as_id, lo, hi - lo, r["name"], kind,
                                 int(d.request_ts), int(d.ts), order))
    cols = ["pid", "as_id", "gpa", "size_bytes", "qemu_region", "qemu_kind", "request_ts",
            "answer_ts", "order"]
    df = pd.DataFrame(rows, columns=cols)
    return df.astype({"pid": "int64", "as_id": "int64", "gpa": "uint64",
                      "size_bytes": "uint64", "request_ts": "uint64", "answer_ts": "uint64",
                      "order": "int64"})


def slot_regions(slots: pd.DataFrame, dumps: pd.DataFrame | None, page: int) -> pd.DataFrame:
    """``qemu_region`` and ``qemu_kind`` per slot version (index of ``slots``):
    the region of the first dump of the slot's QEMU (same pid) asked at or
    after the version began and answered before it ended whose range,
    trimmed to ``page``, is the slot's (address space, GPA, size); null where
    no dump says."""
    region = np.full(len(slots), None, dtype=object)
    kind = np.full(len(slots), None, dtype=object)

    def out():
        return pd.DataFrame({"qemu_region": region, "qemu_kind": kind}, index=slots.index)

    if dumps is None or not len(dumps) or not len(slots):
        return out()
    reg = _regions(dumps.sort_values("request_ts", kind="stable"), page)
    if not len(reg):
        return out()
    key = ["pid", "as_id", "gpa", "size_bytes"]
    s = slots[key + ["start_ts", "end_ts"]].astype(
        {"pid": "int64", "as_id": "int64", "gpa": "uint64", "size_bytes": "uint64",
         "start_ts": "uint64", "end_ts": "uint64"}).assign(row=np.arange(len(slots)))
    j = s.merge(reg, on=key, how="inner")
    j = j[(j["request_ts"] >= j["start_ts"]) & (j["answer_ts"] <= j["end_ts"])]
    first = j.sort_values(["row", "order"], kind="stable").drop_duplicates("row")
    rows = first["row"].to_numpy()
    region[rows] = first["qemu_region"].to_numpy(dtype=object)
    kind[rows] = first["qemu_kind"].to_numpy(dtype=object)
    return out()


def notes(notes_table: pd.DataFrame) -> list[str]:
    """What the report must say about --qmp sockets that gave no names
    (record's ``qmp`` notes, collectors/qmp.py)."""
    out, connected = [], set()
    vals = []
    for v in notes_table.loc[notes_table["key"] == "qmp", "value"]:
        try:
            d = json.loads(v)
            vals.append((str(d["socket"]), str(d["status"]), d))
        except (ValueError, KeyError, TypeError):
            continue
    for sock, status, d in vals:
        if status == "connected":
            connected.add(sock)
    for sock, status, d in vals:
        if status == "unavailable" or (status == "lost" and sock in connected):
            why = d.get("reason", "")
            if status == "unavailable":
                out.append(f"QMP socket {sock} gave no answer ({why}): memslots are not "
                           "named after QEMU's memory regions")
            else:
                out.append(f"QMP socket {sock} was lost after {d.get('dumps', '?')} answers "
                           f"({why}): slots set after that are not named")
    return out
