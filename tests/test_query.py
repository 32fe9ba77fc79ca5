"""kvmtrace query's analysis offline: ranges, verdicts, sources, exit codes,
and the decoding of the memslot iterator's records. The live side is
tests/test_query_live.py."""

from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from kvmtrace.analysis import query as q
from kvmtrace.collectors import snapshot as snap_mod

PVM = {"arch": "x86_64", "kvm": {"vendor": "pvm", "mmu": "shadow", "spte_format": "legacy"},
       "x86": {"pat": {"entries": ["WB", "WC", "UC-", "UC", "WB", "WP", "UC-", "WT"],
                       "source": "dmesg"},
               "pat_memtype_list": [{"start": 0xE0000000, "end": 0xE0100000,
                                     "memtype": "write-combining"}],
               "ram": [{"start": 0x100000, "end": 0x80000000}]}}
HVA, GPA = 0x7F0000000000, 0x1000000
PROT_WB, PROT_UC = 0x8000000000000027, 0x8000000000000027 | 0x8 | 0x10  # PWT|PCD: PAT 3


def snapshot(prot=PROT_WB, vmflags="rd wr mr mw me ac", vm_flags=0x73, bpf_vmas=True, **kw):
    memslots = pd.DataFrame([{"vm_fd": 4, "as_id": 0, "slot": 1, "gpa": GPA, "size": 0x10000,
                              "hva": HVA, "flags": 0, "gmem": False, "gmem_offset": 0,
                              "generation": 2}])
    vmas = pd.DataFrame([{"start": HVA, "end": HVA + 0x10000, "vm_flags": vm_flags,
                          "vm_page_prot": prot, "vm_pgoff": 0, "ino": 0, "dev": 0,
                          "has_file": 0}])
    smaps = [{"start": HVA, "end": HVA + 0x10000, "path": "", "vmflags": vmflags,
              "inode": 0}]
    s = SimpleNamespace(pid=100, comm="vmm", vm_fds=[4], memslots=memslots,
                        memslots_source="BPF iterator (task_file)", vms=[],
                        vmas=vmas if bpf_vmas else None,
                        vmas_source="BPF iterator (task_vma)" if bpf_vmas else "refused: EPERM",
                        smaps=smaps, context=PVM)
    for k, v in kw.items():
        setattr(s, k, v)
    return s


def spte(bits=0):
    return 0x8000000000000007 | (0x123 << 12) | bits


def window(faults=(), invalidations=(), slots=(), lost=0):
    """A Model-like recording of the same process."""
    f = pd.DataFrame([{"pid": 100, "vm_fd": 4, "gfn": gfn, "pfn": pfn, "level": 1, "ts": ts,
                       "install_ts": ts, "spte_memtype": mt} for gfn, pfn, mt, ts in faults],
                     columns=["pid", "vm_fd", "gfn", "pfn", "level", "ts", "install_ts",
                              "spte_memtype"])
    inv = pd.DataFrame([{"pid": 100, "ts": ts, "hva_start": a, "hva_end": b}
                        for a, b, ts in invalidations],
                       columns=["pid", "ts", "hva_start", "hva_end"])
    sl = pd.DataFrame(list(slots), columns=["pid", "vm_fd", "as_id", "slot", "gpa", "size_bytes",
                                            "start_ts", "created_by"])
    return SimpleNamespace(faults=f, prefetch=pd.DataFrame(), invalidations=inv, slots=sl,
                           lost=pd.DataFrame({"lost": [lost]}), meta=PVM)


G = GPA // 4096


# -- ranges -------------------------------------------------------------------------
@pytest.mark.parametrize("text,want", [
    ("0x1000+8K", (0x1000, 0x2000)), ("4096", (4096, 4096)), ("0x1000-0x3000", (0x1000, 0x2000)),
    ("1M+2M", (1 << 20, 2 << 20)), ("0x10+0x1", (0x10, 1)),
])
def test_parse_range(text, want):
    assert q.parse_range(text, "--gpa") == want


@pytest.mark.parametrize("text,words", [
    ("zz", "expected a number"), ("0x1000+0", "more than 0"),
    ("0x3000-0x1000", "above the start"), ("0xffffffffffffffff+2", r"past 2\^64"),
])
def test_parse_range_refuses(text, words):
    with pytest.raises(q.QueryError, match=words):
        q.parse_range(text, "--gpa")


# -- verdicts -------------------------------------------------------------------------
def test_no_window_cannot_tell():
    df = q.answer(snapshot())
    (r,) = q.to_records(df)
    assert r["vma_memtype"] == "WB" and r["verdict"] == "unknown"
    assert "page-table dump" in r["reason"] and df.attrs["exit_code"] == 2
    assert "KVM-PVM" in df.attrs["decided_by"] and "WB WC UC- UC" in df.attrs["decided_by"]


def test_window_consistent():
    df = q.answer(snapshot(), window=window([(G, 0x2000, "WB", 10), (G + 1, 0x2001, "WB", 11)]),
                  window_s=2)
    (r,) = q.to_records(df)
    assert (r["verdict"], r["installed_pages"], r["installed_memtype"]) == ("consistent", 2, "WB")
    assert r["installed_pfns"] == "0x2000-0x2001" and "System RAM" in r["pat_memtype_list"]
    assert df.attrs["exit_code"] == 0


def test_uncached_vma_mapped_write_back_is_upgraded():
    df = q.answer(snapshot(prot=PROT_UC), window=window([(G, 0x2000, "WB", 10)]))
    (r,) = q.to_records(df)
    assert r["vma_memtype"] == "UC" and r["verdict"] == "upgraded"
    assert "mismatched attributes" in r["reason"] and df.attrs["exit_code"] == 1


def test_write_back_vma_mapped_uncached_is_downgraded():
    df = q.answer(snapshot(), window=window([(G, 0x2000, "UC", 10)]))
    assert q.to_records(df)[0]["verdict"] == "downgraded" and df.attrs["exit_code"] == 1


def test_a_mapping_invalidated_since_does_not_count():
    w = window([(G, 0x2000, "WB", 10), (G + 1, 0x2001, "UC", 10)],
               invalidations=[(HVA + 0x1000, HVA + 0x2000, 20)])
    (r,) = q.to_records(q.answer(snapshot(), window=w))
    assert r["installed_pages"] == 1 and r["verdict"] == "consistent"
    assert "1 other page(s) installed, then unmapped" in r["reason"]


def test_only_mappings_since_the_slot_was_created_or_moved_count():
    """A flags change keeps KVM's mappings, a move / re-create drops them."""
    created = (100, 4, 0, 1, GPA, 0x10000, 50, "create")
    flagged = (100, 4, 0, 1, GPA, 0x10000, 70, "flags")
    faults = [(G, 0x2000, "UC", 10), (G + 1, 0x2001, "WB", 60)]
    (r,) = q.to_records(q.answer(snapshot(), window=window(faults, slots=[created, flagged])))
    assert r["installed_pages"] == 1 and r["verdict"] == "consistent"


def test_lost_events_make_consistent_unknown():
    (r,) = q.to_records(q.answer(snapshot(), window=window([(G, 0x2000, "WB", 10)], lost=3)))
    assert r["verdict"] == "unknown" and "3 events lost" in r["reason"]


def test_smaps_fallback_pfnmap_takes_its_frames_type():
    """Without the VMA iterator a VM_PFNMAP VMA has no vm_page_prot: its
    frames' type from the PAT memtype list decides (here write-combining)."""
    s = snapshot(bpf_vmas=False, vmflags="rd wr sh mr mw me pf io")
    (r0,) = q.to_records(q.answer(s))
    assert r0["vma_memtype"] == "unknown" and r0["vm_page_prot"] is None
    (r,) = q.to_records(q.answer(s, window=window([(G, 0xE0000, "WB", 10)])))
    assert r["verdict"] == "upgraded" and "write-combining" in r["reason"]
    s2 = snapshot(bpf_vmas=False)
    assert q.to_records(q.answer(s2))[0]["vma_memtype"] == "WB"  # ordinary VMA: by construction


# -- selections and what cannot be answered ---------------------------------------------
def test_gpa_and_hva_select_the_part_asked():
    (r,) = q.to_records(q.answer(snapshot(), gpa=(GPA + 0x2000, 0x1000)))
    assert (r["range_gpa"], r["range_size_bytes"], r["range_hva"]) == (GPA + 0x2000, 0x1000,
                                                                  HVA + 0x2000)
    (h,) = q.to_records(q.answer(snapshot(), hva=(HVA + 0x3000, 0x100000)))
    assert (h["range_gpa"], h["range_size_bytes"]) == (GPA + 0x3000, 0xD000)


@pytest.mark.parametrize("kw,words", [
    ({"gpa": (0x10, 0x1000)}, "no memslot of process 100 covers GPA"),
    ({"hva": (0x1000, 0x1000)}, "(and no VMA is there)"),
    ({"slot": 7}, "no memslot 7"),
    ({"vm_fd": 9}, "fd 9 of process 100 is not a KVM VM"),
])
def test_what_is_not_there(kw, words):
    df = q.answer(snapshot(), **kw)
    assert df.attrs["exit_code"] == 2 and words in q.first_unknown(df)


def test_no_vm_and_no_iterator():
    df = q.answer(snapshot(vm_fds=[]))
    assert "has no KVM VM open" in q.first_unknown(df)
    df = q.answer(snapshot(memslots=None, memslots_source="BPF iterator refused: EPERM"))
    assert "not readable here: BPF iterator refused: EPERM" in q.first_unknown(df)


def test_text_lists_each_slot():
    t = q.to_text(q.answer(snapshot(), window=window([(G, 0x2000, "WB", 10)])))
    assert "slot 1 (as 0, VM fd 4): GPA 0x1000000+0x10000" in t
    assert "KVM:       WB, 1 page(s) (level 1: 1), pfns 0x2000" in t and t.endswith("\n")


# -- the iterator's records ---------------------------------------------------------------
def _rec(kind, as_id=0, gen=5, slot=0, count=0, status=0, fd=4, kvm=0xFFFF8880):
    r = np.zeros(1, dtype=snap_mod.SLOT_DTYPE)
    r["kind"], r["as_id"], r["generation"], r["slot"] = kind, as_id, gen, slot
    r["count"], r["status"], r["fd"], r["kvm"] = count, status, fd, kvm
    r["base_gfn"], r["npages"], r["hva"] = 0x1000 + slot, 16, HVA
    return r


def test_decode_slots():
    H, S, T = snap_mod.REC_HEADER, snap_mod.REC_SLOT, snap_mod.REC_TRAILER
    raw = np.concatenate([_rec(H), _rec(S, slot=1), _rec(S, slot=2), _rec(T, count=2)])
    df, vms, why = snap_mod._decode_slots(raw)
    assert not why and list(df["slot"]) == [1, 2] and int(df["gpa"].iloc[0]) == 0x1001000
    assert vms[0]["slots"] == 2 and vms[0]["complete"]
    # a second visit of the same VM file (another thread): counted once
    df2, vms2, _ = snap_mod._decode_slots(np.concatenate([raw, raw]))
    assert len(df2) == 2 and vms2[0]["slots"] == 2
    # the generation moved during the walk, or an update was in progress: retry
    moved = np.concatenate([_rec(H), _rec(S, slot=1), _rec(T, gen=6, count=1)])
    assert "generation moved" in snap_mod._decode_slots(moved)[2]
    busy = np.concatenate([_rec(H, gen=1 << 63 | 5), _rec(T, gen=1 << 63 | 5)])
    assert snap_mod._decode_slots(busy)[2]
    cut = np.concatenate([_rec(H), _rec(T, status=snap_mod.TRAILER_CUT)])
    assert not snap_mod._decode_slots(cut)[1][0]["complete"]


def test_record_layouts_fit_the_iterator_buffer():
    assert snap_mod.SLOT_DTYPE.itemsize % 8 == 0 and snap_mod.VMA_DTYPE.itemsize % 8 == 0
    assert (snap_mod.MAX_SLOTS + 8) * snap_mod.SLOT_DTYPE.itemsize <= snap_mod.SEQ_BUFFER
    text = snap_mod._c_struct("kvmtrace_slot_rec", snap_mod.SLOT_FIELDS)
    assert all(f" {n};" in text for n, _, _ in snap_mod.SLOT_FIELDS)


# -- what the window and the iterator cannot see: said, not guessed --------------------
def test_pages_installed_before_the_window_are_said_unseen():
    """A window sees installs during it only: nothing seen is 'cannot tell'
    with that reason, part of the range seen is a partial answer that says so."""
    (r,) = q.to_records(q.answer(snapshot(), window=window([])))
    assert r["verdict"] == "unknown" and r["installed_pages"] == 0
    assert "installed before the window began is not seen" in r["reason"]
    (p,) = q.to_records(q.answer(snapshot(), window=window([(G, 0x2000, "WB", 10)])))
    assert p["verdict"] == "consistent" and "(of 16 in the range" in p["reason"]
    assert "installed before it" in p["reason"]
    (a,) = q.to_records(q.answer(snapshot(), gpa=(GPA, 0x1000),
                                 window=window([(G, 0x2000, "WB", 10)])))
    assert "of 1 in the range" not in a["reason"]  # the whole range asked was seen


CUT = [{"vm_fd": 4, "kvm": 1, "complete": False, "slots": 333,
        "address_spaces": [{"as_id": 0, "generation": 2, "present": True, "slots": 400}]}]


@pytest.mark.parametrize("kw,words", [
    ({"slot": 7}, "memslot 7 may be one of those"),
    ({"gpa": (0x10, 0x1000)}, "GPA range 0x10+0x1000 may be in one of those"),
    ({}, "partial answer: VM fd 4 has at least 400 memslots and the BPF iterator read 333"),
    ({"gpa": (GPA, 0x1000)}, "partial answer"),
])
def test_more_memslots_than_the_iterator_holds(kw, words):
    """Past MAX_SLOTS (333) per VM the iterator reads only some slots: a slot or
    range not found among them is 'cannot tell', not 'no memslot'; what was
    found is given with a row saying the answer is partial (exit 2)."""
    df = q.answer(snapshot(vms=CUT), **kw)
    assert df.attrs["exit_code"] == 2 and words in q.first_unknown(df), q.first_unknown(df)
    assert "no memslot" not in q.first_unknown(df)
    # a slot that was read is answered in full
    (r,) = q.to_records(q.answer(snapshot(vms=CUT), slot=1))
    assert r["slot"] == 1 and r["vma_memtype"] == "WB"
