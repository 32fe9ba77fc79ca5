"""How often does `kvmtrace diff` flag a regression between identical runs?

Records the same test VMM (testvmm) scenario 2*N times (N pairs, real KVM, real
BPF), diffs each pair with --fail-on-regression, and prints how many pairs
were (wrongly) flagged and which findings did it. Run as root from the
project root:

    .venv/bin/python bench/diff_identical_runs.py --pairs 20 --scenario demo
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

PY = sys.executable


def record(out, scenario):
    subprocess.run([PY, "-m", "kvmtrace.cli", "record", "-o", out, "--force", "--",
                    PY, "-m", "testvmm", "--scenario", scenario, "-q"],
                   check=True, capture_output=True, text=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=20)
    ap.add_argument("--scenario", default="demo")
    a = ap.parse_args()
    flagged = []
    with tempfile.TemporaryDirectory() as d:
        for i in range(a.pairs):
            base, new = os.path.join(d, f"b{i}.kvt"), os.path.join(d, f"n{i}.kvt")
            record(base, a.scenario)
            record(new, a.scenario)
            p = subprocess.run([PY, "-m", "kvmtrace.cli", "diff", base, new, "--format", "json",
                                "--fail-on-regression"], capture_output=True, text=True)
            body = json.loads(p.stdout)
            if p.returncode:
                flagged.append((i, [ln for ln in body["summary"] if ln.startswith("REGRESSION")]))
            print(f"pair {i + 1}/{a.pairs}: {'REGRESSION' if p.returncode else 'no regression'}",
                  flush=True)
    print(f"\n{a.pairs - len(flagged)} of {a.pairs} identical pairs ({a.scenario}) flagged no "
          f"regression; {len(flagged)} false positive(s)")
    for i, lines in flagged:
        print(f"  pair {i + 1}: " + "; ".join(lines))


if __name__ == "__main__":
    main()
