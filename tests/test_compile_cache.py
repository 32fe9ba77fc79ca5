"""The compile cache (kvmtrace/host/bpfcache.py): keys, safe storage, and a
cached program that records exactly what the compiled one does (live).
"""

import base64
import ctypes
import json
import os
import stat
import subprocess

import pytest

from kvmtrace.host import bpfcache

from conftest import ROOT, guest_cmd, kvmtrace, load_json

ENTRY = {"maps": [], "funcs": {}, "license": "GPL", "kern_version": 0}


# -- keys ------------------------------------------------------------------------

def test_key_depends_on_what_the_code_depends_on(monkeypatch):
    k = bpfcache.key("int x;", ["-DA=1"], "0.26.0", None)
    assert k == bpfcache.key("int x;", ["-DA=1"], "0.26.0", None)  # stable
    assert k != bpfcache.key("int y;", ["-DA=1"], "0.26.0", None)  # program text
    assert k != bpfcache.key("int x;", ["-DA=2"], "0.26.0", None)  # a BTF offset
    assert k != bpfcache.key("int x;", ["-DA=1"], "0.27.0", None)  # bcc
    monkeypatch.setenv("BCC_KERNEL_SOURCE", "/nonexistent/headers")
    assert k != bpfcache.key("int x;", ["-DA=1"], "0.26.0", None)  # kernel headers


def test_key_covers_the_tracepoint_formats_read(tmp_path, monkeypatch):
    """bcc builds a TRACEPOINT_PROBE's args from the tracepoint's format file."""
    root = tmp_path / "tracing"
    fmt_file = root / "events" / "kvm" / "kvm_mmio" / "format"
    fmt_file.parent.mkdir(parents=True)
    fmt_file.write_text("field:u64 gpa;")
    monkeypatch.setattr(bpfcache.tracefs, "find", lambda: str(root))
    text = "TRACEPOINT_PROBE(kvm, kvm_mmio) { return 0; }"
    k = bpfcache.key(text, [], "0.26.0", None)
    fmt_file.write_text("field:u64 gpa; field:u32 len;")
    assert bpfcache.key(text, [], "0.26.0", None) != k


# -- storage ----------------------------------------------------------------------

def test_store_and_lookup(tmp_path):
    d = tmp_path / "cache" / "bpf"
    path = bpfcache.store("ab" * 32, ENTRY, str(d))
    assert stat.S_IMODE(os.stat(d).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(d.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    got = bpfcache.lookup("ab" * 32, str(d))
    assert got["maps"] == [] and got["key"] == "ab" * 32
    assert bpfcache.lookup("cd" * 32, str(d)) is None  # a miss
    assert bpfcache.lookup("cd" * 32, str(tmp_path / "none" / "bpf")) is None


def test_entries_are_pruned(tmp_path):
    d = str(tmp_path / "c" / "bpf")
    for i in range(bpfcache.KEEP + 5):
        bpfcache.store(f"{i:064x}", ENTRY, d)
    names = [n for n in os.listdir(d) if n.endswith(".json")]
    assert len(names) == bpfcache.KEEP
    assert f"{bpfcache.KEEP + 4:064x}.json" in names and f"{0:064x}.json" not in names


@pytest.mark.parametrize("how", ["dir-symlink", "dir-group-writable", "entry-symlink",
                                 "entry-0644", "entry-other-key", "entry-garbage"])
def test_unsafe_or_foreign_entries_are_not_used(tmp_path, how):
    d = tmp_path / "c" / "bpf"
    k = "ab" * 32
    bpfcache.store(k, ENTRY, str(d))
    entry = d / f"{k}.json"
    if how == "dir-symlink":
        real = tmp_path / "real"
        d.rename(real)
        d.symlink_to(real)
    elif how == "dir-group-writable":
        os.chmod(d, 0o770)
    elif how == "entry-symlink":
        target = tmp_path / "planted.json"
        entry.rename(target)
        entry.symlink_to(target)
    elif how == "entry-0644":
        os.chmod(entry, 0o644)
    elif how == "entry-other-key":
        entry.write_text(json.dumps(dict(ENTRY, key="cd" * 32, format=bpfcache.FORMAT)))
    else:
        entry.write_text("{not json")
    with pytest.raises(bpfcache.CacheError):
        bpfcache.lookup(k, str(d))
    if how.startswith("dir"):
        with pytest.raises(bpfcache.CacheError):  # nor stored into
            bpfcache.store(k, ENTRY, str(d))


# -- live: the cached program records what the compiled one does ---------------------

@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    d = tmp_path / "cache" / "bpf"
    monkeypatch.setenv(bpfcache.DIR_ENV, str(d))
    monkeypatch.delenv("KVMTRACE_BPF_CACHE", raising=False)
    return d


def _load(buffer_pages=None):
    from kvmtrace.probes.load import load_probes
    return load_probes("memslots,faults", filter_pids=True, buffer_pages=buffer_pages,
                       cache=True)


def _record_minimal(loaded, tmp_path):
    """Run the minimal guest under ``loaded``; events read per kind, and the guest."""
    from kvmtrace.collectors.ringbuf import RingReader
    from kvmtrace.probes import codegen

    b = loaded.bpf
    b["kvmtrace_pids"][ctypes.c_uint32(os.getpid())] = ctypes.c_uint8(1)  # children too
    readers = {e.name: RingReader(b[codegen.ring_name(e)].map_fd,
                                  b[codegen.ring_name(e)].max_entries, codegen.record_dtype(e))
               for e in loaded.program.events}
    rep = tmp_path / "guest.json"
    subprocess.run(guest_cmd("--scenario", "minimal", "-q", "--report", rep), cwd=ROOT,
                   check=True, timeout=120)
    got = {n: len(r.read()) for n, r in readers.items()}
    for r in readers.values():
        r.close()
    return got, load_json(rep)


@pytest.mark.usefixtures("live")
def test_a_cached_program_records_what_the_compiled_one_does(cache_dir, tmp_path):
    first = _load()
    assert first.cache["status"] == "miss" and type(first.bpf).__name__ == "BPF"
    compiled, guest = _record_minimal(first, tmp_path)
    first.cleanup()
    assert len(os.listdir(cache_dir)) == 1

    second = _load()
    assert second.cache["status"] == "hit", second.cache
    assert type(second.bpf).__name__ == "CachedBPF"
    assert second.program.vma_lookup.get("available") == first.program.vma_lookup.get(
        "available")
    cached, guest2 = _record_minimal(second, tmp_path)
    # tables work through the cache: per-CPU lost counters, the lost-where hash
    b = second.bpf
    assert all(sum(b["kvmtrace_lost_count"][ctypes.c_int(i)]) == 0
               for i in range(len(second.program.events)))
    assert list(b["kvmtrace_lost_where"].items()) == []
    second.cleanup()
    for g in (guest, guest2):
        assert g["ok"]
    assert compiled["spte_requested"] == guest["expected_faults_total"] > 0
    # invalidations depend on the host's memory management (COW, khugepaged): not
    # the same from run to run; every other kind is
    compiled.pop("unmap_hva_range")
    cached.pop("unmap_hva_range")
    assert cached == compiled, (cached, compiled)


@pytest.mark.usefixtures("live")
def test_loss_is_counted_through_a_cached_program(cache_dir, tmp_path):
    """1-page rings never read: events are lost, and counted per kind and per
    region by the cached program as by the compiled one."""
    _load(buffer_pages=1).cleanup()  # fills the cache
    loaded = _load(buffer_pages=1)
    assert loaded.cache["status"] == "hit"
    b = loaded.bpf
    b["kvmtrace_pids"][ctypes.c_uint32(os.getpid())] = ctypes.c_uint8(1)
    subprocess.run(guest_cmd("--slot", "anon:2048:w", "-q"), cwd=ROOT, check=True, timeout=120)
    from kvmtrace.collectors import loss
    idx = [e.name for e in loaded.program.events].index("set_spte")
    lost = sum(b["kvmtrace_lost_count"][ctypes.c_int(idx)])
    where = loss.lost_where(b, loaded.program.events)
    loaded.cleanup()
    assert lost > 0
    assert sum(r[3] for r in where if r[0] == "set_spte") == lost
    assert any(r[2] is not None for r in where if r[0] == "set_spte")  # a guest region


@pytest.mark.usefixtures("live")
def test_a_broken_entry_is_replaced_by_a_compile(cache_dir, tmp_path):
    _load().cleanup()
    (entry,) = cache_dir.iterdir()
    data = json.loads(entry.read_text())
    name = next(n for n in data["funcs"] if n.startswith("tracepoint__"))
    data["funcs"][name]["insns"] = base64.b64encode(b"\xff" * 16).decode()  # not a program
    entry.write_text(json.dumps(data))
    loaded = _load()
    assert loaded.cache["status"] == "unused" and "did not load" in loaded.cache["reason"]
    assert type(loaded.bpf).__name__ == "BPF"
    loaded.cleanup()
    again = _load()  # the compile stored a good entry again
    assert again.cache["status"] == "hit"
    again.cleanup()


@pytest.mark.usefixtures("live")
def test_record_no_cache(cache_dir, tmp_path):
    out = tmp_path / "n.kvt"
    r = kvmtrace("record", "-o", out, "--no-cache", "--duration", "0.2",
                 env=dict(os.environ, **{bpfcache.DIR_ENV: str(cache_dir)}))
    assert r.returncode == 0, r.stderr
    from kvmtrace.recording.reader import read
    assert read(out).meta["bpf_cache"]["status"] == "off"
    assert not cache_dir.exists() or not list(cache_dir.iterdir())
    r = kvmtrace("record", "-o", tmp_path / "c.kvt", "--duration", "0.2",
                 env=dict(os.environ, **{bpfcache.DIR_ENV: str(cache_dir)}))
    assert r.returncode == 0, r.stderr
    assert read(tmp_path / "c.kvt").meta["bpf_cache"]["status"] in ("miss", "hit")
    # the probes' program, and the memslot iterator read at start (no VMM runs here,
    # so maybe not: it is compiled only when a VMM is running)
    assert 1 <= len(list(cache_dir.iterdir())) <= 2


DESCS = ['"unsigned int"', '"int"', '"unsigned long long"',
         '["kvmtrace_lost_key", [["pid","unsigned int"], ["kind","unsigned int"], '
         '["region","unsigned long long"]], "struct_packed"]',
         '["p", [["ts","unsigned long long"], ["r", [["slot","unsigned int"], '
         '["pad","unsigned int"]], "struct_packed"], ["a", "char", [16]], '
         '["", [["x","int"], ["y","unsigned long long"]], "union"]], "struct"]']


@pytest.mark.parametrize("desc", DESCS)
def test_table_types_decode_as_bcc_decodes_them(desc):
    """The cache reads tables without bcc: its decoder of bcc's type
    descriptions must give bcc's layouts."""
    bcc = pytest.importorskip("bcc")
    want = bcc.BPF._decode_table_type(json.loads(desc))
    got = bpfcache.ctype(json.loads(desc))
    assert ctypes.sizeof(got) == ctypes.sizeof(want)
    if hasattr(want, "_fields_"):
        assert [f[0] for f in got._fields_] == [f[0] for f in want._fields_]
        for f in want._fields_:
            assert getattr(got, f[0]).offset == getattr(want, f[0]).offset
