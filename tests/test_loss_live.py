"""Lost events are always visible, per kind and per slot, and never turn into
a wrong verdict (live).

Loss is forced, not hoped for: record with 1-page fault rings, stop the
recorder (SIGSTOP) while a guest writes 4,096 pages, let it go on after the
guest has exited. Whatever the host's speed, the rings overflow.
"""

import json
import os
import signal
import subprocess
import sys

import pytest

import kvmtrace

from conftest import ROOT, guest_cmd, kvmtrace as run, load_json

pytestmark = pytest.mark.usefixtures("live")

PAGES = 4096


@pytest.fixture(scope="module")
def lossy(tmp_path_factory):
    d = tmp_path_factory.mktemp("loss")
    out, rep = d / "lossy.kvt", d / "guest.json"
    rec = subprocess.Popen([sys.executable, "-m", "kvmtrace.cli", "record", "-o", str(out),
                            "--buffer-size", "1", "--probes", "memslots,faults"],
                           cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        from test_record_live import wait_for
        wait_for(lambda: os.path.exists(out) and os.path.getsize(out) > 0
                 or rec.poll() is not None, what="recorder start")
        assert rec.poll() is None, rec.communicate()
        rec.send_signal(signal.SIGSTOP)
        try:
            g = subprocess.run(guest_cmd("--slot", f"anon:{PAGES}:w", "--slot", "anon:16:r",
                                         "-q", "--report", rep),
                               cwd=ROOT, capture_output=True, text=True, timeout=120)
        finally:
            rec.send_signal(signal.SIGCONT)
        assert g.returncode == 0, g.stderr
        rec.send_signal(signal.SIGINT)
        _, err = rec.communicate(timeout=60)
        assert rec.returncode == 0, err
    finally:
        if rec.poll() is None:
            rec.kill()
    return out, load_json(rep)


def test_loss_is_counted_per_kind(lossy):
    out, guest = lossy
    m = kvmtrace.load(str(out))
    lost = m.lost.set_index("kind")["lost"]
    assert lost.get("spte_requested", 0) > 0
    assert any("events lost" in n for n in m.notes)


def test_a_slot_that_lost_events_is_unknown_not_consistent(lossy):
    out, guest = lossy
    m = kvmtrace.load(str(out))
    v = m.verdicts[(m.verdicts["pid"] == guest["pid"]) & (m.verdicts["version"] >= 0)]
    big = next(s for s in guest["slots"] if s["npages"] == PAGES)
    row = v[v["slot"] == big["slot"]].iloc[0]
    assert row["lost"] > 0
    assert row["verdict"] == "unknown"
    assert "events lost in this slot" in row["reason"]
    # no slot that the guest touched claims that nothing happened in it
    touched = {s["slot"] for s in guest["slots"] if s.get("expected_faults")}
    for r in v[v["slot"].isin(touched)].itertuples():
        assert "no faults observed" not in r.reason or r.lost, r


def test_loss_in_every_format(lossy):
    out, guest = lossy
    j = run("report", out, "--format", "json")
    assert j.returncode == 0, j.stderr
    body = json.loads(j.stdout)
    kinds = {r["kind"]: r["lost"] for r in body["lost"]}
    assert kinds["spte_requested"] > 0
    assert any(r["lost"] > 0 for r in body["slots"])
    c = run("report", out, "--format", "csv", "--table", "lost")
    assert c.returncode == 0 and c.stdout.startswith("kind,events,lost"), c.stderr
    c = run("report", out, "--format", "csv")
    assert ",lost," in c.stdout.splitlines()[0]
    t = run("report", out)
    assert "lost" in t.stdout and "spte_requested" in t.stdout
    h = run("report", out, "--format", "html", "-o", out.with_suffix(".html"), "--force")
    assert h.returncode == 0, h.stderr
    assert "spte_requested" in out.with_suffix(".html").read_text()


def test_fail_on_loss(lossy):
    out, _ = lossy
    p = run("report", out, "--fail-on", "loss", "--format", "json")
    assert p.returncode == 1
    assert "lost" in p.stderr
    clean = ROOT / "tests/fixtures/x86-pvm-demo.kvt"
    assert run("report", clean, "--fail-on", "loss", "--format", "json").returncode == 0
