"""Faults whose install was not recorded: a verdict that says why, never a
crash (the IndexError seen with `--probes memslots,spte_requested`). Offline,
on the committed fixture with its install events taken out."""

import kvmtrace
from kvmtrace.recording.reader import read

from conftest import FIXTURES

REC = FIXTURES / "x86-pvm-demo.kvt"


def _without_installs(probe_recorded: bool):
    rec = read(str(REC))
    rec.tables["set_spte"] = rec.tables["set_spte"].iloc[0:0]
    if not probe_recorded:
        ev = rec.meta["probes"]["events"]
        rec.meta["probes"]["events"] = [e for e in ev if e != "set_spte"]
    return kvmtrace.load(rec)


def test_install_probe_not_chosen():
    m = _without_installs(False)
    v = m.verdicts[m.verdicts["faults"] > 0]
    assert len(v) and (v["verdict"] == "unknown").all()
    assert v["reason"].str.contains("install tracepoints .* were not recorded").all()


def test_install_probe_chosen_but_nothing_installed():
    m = _without_installs(True)
    v = m.verdicts[m.verdicts["faults"] > 0]
    assert (v["verdict"] == "unknown").all()
    assert v["reason"].str.contains("no installed entry").all()
