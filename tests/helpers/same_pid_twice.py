"""Run the test VMM (testvmm) twice, one after the other with the same pid.

    python tests/helpers/same_pid_twice.py REPORT_A REPORT_B SCENARIO_A SCENARIO_B

The second guest is forked with the first one's pid (as root: the pid
namespace's ns_last_pid is set just below it and the fork retried until the
kernel hands out that pid), the situation in which a recording must keep
two VMMs apart although they share a pid. Exits non-zero when the pid could
not be reused.
"""

import os
import sys

GUEST = [sys.executable, "-m", "testvmm", "-q"]


def run(pid_wanted, argv):
    """Fork; the child execs argv only if it got pid_wanted (or any pid when None)."""
    pid = os.fork()
    if pid == 0:
        if pid_wanted is not None and os.getpid() != pid_wanted:
            os._exit(99)
        os.execvp(argv[0], argv)
    _, status = os.waitpid(pid, 0)
    return pid, os.waitstatus_to_exitcode(status)


def main():
    rep_a, rep_b, sc_a, sc_b = sys.argv[1:5]
    pid, rc = run(None, GUEST + ["--scenario", sc_a, "--report", rep_a])
    if rc:
        sys.exit(f"first guest failed ({rc})")
    for _ in range(200):
        with open("/proc/sys/kernel/ns_last_pid", "w") as f:
            f.write(str(pid - 1))
        got, rc = run(pid, GUEST + ["--scenario", sc_b, "--report", rep_b])
        if got == pid:
            sys.exit(rc)
    sys.exit("could not get the same pid again")


if __name__ == "__main__":
    main()
