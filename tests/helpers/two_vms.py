"""One process with two VMs alive at once, each with its own memslots and
vCPU, run one after the other while both exist (what a VMM hosting several
guests, or a test harness, does). Prints one JSON line: per VM its fd and
the test VMM's own report of it (slots, expected faults).

    python tests/helpers/two_vms.py SCENARIO_A SCENARIO_B
"""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from testvmm import scenario as sc_mod  # noqa: E402
from testvmm.vmm import Vmm  # noqa: E402


def main():
    vmms = [Vmm(sc_mod.builtin(name)) for name in sys.argv[1:3]]
    try:
        for v in vmms:  # both VMs, slots and vCPUs exist before either guest runs
            v.open()
            v.allocate()
            v.create_memslots()
            v.create_vcpus()
        out = []
        for v in vmms:
            v.run_vcpus()
            v.check_writes()
            out.append({"vm_fd": v.vm_fd, "report": v.report()})
    finally:
        for v in vmms:
            v.close()
    print(json.dumps(out))
    sys.exit(0 if all(o["report"]["ok"] for o in out) else 1)


if __name__ == "__main__":
    main()
