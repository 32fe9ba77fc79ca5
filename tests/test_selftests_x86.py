"""KVM's own selftests (set_memory_region_test, memslot_modification_stress_test,
dirty_log_test) recorded under ``kvmtrace record`` in the emulated AMD/NPT x86
host, offline: the report's memslot history per VM instance is what each
test's source does (testbed/x86/guest/selftests_expect.py, the same check
guest/selftests.py runs in the testbed), on Debian 6.1 and 7.3.4.

The fixtures are those recordings cut down to the tables the check reads
(testbed/x86/trim_selftests.py); tests/fixtures/x86-selftests-*/README.md has
the commands that made them.
"""

import copy
import json
import sys

import pandas as pd
import pytest

from conftest import FIXTURES, ROOT

sys.path.insert(0, str(ROOT / "testbed" / "x86" / "guest"))
import selftests_expect as expect  # noqa: E402

# 7.x-skips: a 7.3.4 run in which the kernel skipped the ioctl events of three
# memslot creates (tests/fixtures/x86-selftests-7.x-skips/README.md)
KERNELS = ["6.1", "7.x", "7.x-skips"]


def _dir(k):
    return FIXTURES / f"x86-selftests-{k}"


@pytest.fixture(scope="module", params=KERNELS)
def rec(request):
    d = _dir(request.param)
    if not (d / "selftests.kvt").exists():
        pytest.skip(f"no fixture {d}")
    with open(d / "selftests.json") as f:
        runs = json.load(f)
    return request.param, expect.memslot_model(str(d / "selftests.kvt")), runs


def test_every_check_holds(rec):
    k, model, runs = rec
    assert model.complete and not model.problems
    lines = []
    assert expect.check_all(model, runs, say=lines.append) == [], "\n".join(lines)
    assert sum(ln.startswith("ok ") for ln in lines) >= 1 + 3 * len(runs["tests"])


def test_the_kernel_and_what_ran(rec):
    k, model, runs = rec
    assert runs["kernel"].startswith("6.1" if k == "6.1" else "7.")
    assert set(runs["tests"]) == set(expect.TESTS)
    # KVM_CAP_NR_MEMSLOTS on both kernels' x86 KVM (KVM_USER_MEM_SLOTS 32764)
    assert runs["nr_memslots"] == 32764
    smrt = model.ops[model.ops["pid"] == runs["tests"]["set_memory_region_test"]["pid"]]
    # every memslot id filled, the one past the last refused
    assert (smrt["op"] == "create").sum() >= runs["nr_memslots"]
    assert ((smrt["op"] == "failed create") & (smrt["slot_id"] == runs["nr_memslots"])).sum() == 1


def test_a_missing_ioctl_is_caught(rec):
    """The check is not vacuous: one memslot ioctl dropped from the report (what
    a program the kernel skipped does) fails the history and the
    prepare_region count."""
    k, model, runs = rec
    pid = runs["tests"]["memslot_modification_stress_test"]["pid"]
    ops = model.ops
    mine = ops[(ops["pid"] == pid) & (ops["slot_id"] == 7) & (ops["op"] == "delete")]
    broken = copy.copy(model)
    broken.ops = ops.drop(index=mine.index[len(mine) // 2])
    lines = []
    failed = expect.check_all(broken, runs, say=lines.append)
    assert any("memslot_modification_stress_test: memslot history" in f for f in failed)
    assert any("memslot_modification_stress_test: kvm_arch_prepare" in f for f in failed)


def test_skipped_programs_fail_the_check(rec):
    """A recording whose bpf_misses note counts a skipped program fails, even
    with no ring ever full."""
    k, model, runs = rec
    broken = copy.copy(model)
    notes = model.recording["notes"]
    extra = pd.DataFrame({"ts": [int(notes["ts"].max()) + 1], "key": ["bpf_misses"],
                          "value": [json.dumps({"kvmtrace_kp_prepare_region": 1})]})
    broken.recording = dict(model.recording, notes=pd.concat(
        [notes, extra.astype(notes.dtypes.to_dict())], ignore_index=True))
    failed = expect.check_all(broken, runs, say=lambda s: None)
    assert any("no KVM probe program skipped" in f for f in failed)


def test_report_says_the_kernel_skipped_programs():
    """The 7.3.4 run's bpf_misses note (the ioctl syscall programs skipped 14
    times, no KVM program) gives the report's line; the 6.1 run, where nothing
    was skipped, gives none. (Read only: a report of 32,764 slots takes minutes.)"""
    from kvmtrace.analysis import loss
    from kvmtrace.recording.reader import read

    s7 = loss.skipped(read(_dir("7.x") / "selftests.kvt"))
    assert s7 == {"kvmtrace_enter_ioctl": 10, "tracepoint__syscalls__sys_exit_ioctl": 4}
    assert "skipped kvmtrace's probe programs 14 times" in loss.skipped_note(s7)
    assert loss.skipped(read(_dir("6.1") / "selftests.kvt")) == {}
    assert loss.skipped_note({}) == ""


def test_changes_whose_ioctl_events_were_skipped_are_recovered(rec):
    """The three creates whose ioctl events the kernel skipped come back from
    kvm_arch_prepare_memory_region (memslots.recover_skipped), marked, with
    the report's note; in the runs with nothing skipped nothing is added."""
    k, model, runs = rec
    got = model.ops[model.ops["ioctl_name"] == "recovered"]
    if k != "7.x-skips":
        assert got.empty and model.notes == []
        return
    smrt = runs["tests"]["set_memory_region_test"]["pid"]
    assert sorted(got["slot_id"]) == [2859, 10623, 12234]
    assert (got["pid"] == smrt).all() and (got["op"] == "create").all()
    # each as the test made it (test_add_max_memory_regions: slot i at
    # guest_addr + i * size, host address likewise): midway between the
    # recorded creates of slots i - 1 and i + 1 of the same VM, same size and flags
    ops = model.ops[model.ops["pid"] == smrt]
    for r in got.itertuples():
        near = ops[ops["slot_id"].isin([r.slot_id - 1, r.slot_id + 1]) & (ops["op"] == "create")
                   & (ops["vm_fd"] == r.vm_fd)].sort_values("slot_id")
        assert len(near) == 2 and (near["ioctl_name"] != "recovered").all()
        for col in ("gpa", "hva"):
            lo, hi = (int(v) for v in near[col])
            assert getattr(r, col) - lo == hi - getattr(r, col) == r.size_bytes
        assert near["flags"].eq(r.flags).all()
    assert model.notes == ["3 memslot changes had no ioctl event (the kernel skipped or lost "
                           "it) and were recovered from kvm_arch_prepare_memory_region's: "
                           "ioctl shown as 'recovered'"]
