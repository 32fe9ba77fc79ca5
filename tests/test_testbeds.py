"""The emulated KVM hosts' end to ends, from the x86 test suite: each boots
its testbed on Debian's 6.1 and 7.x kernels (the image is built on first use
and reused after) and checks there what this host cannot run.

- arm64 (testbed/arm64/e2e): stage-2 faults, kvm_pgtable_stage2_map, the
  arm64 memory types of a PCI BAR, the cacheable-PFNMAP rules, and the arm64
  live tests. Measured on the development host: 110 to 184 s per kernel with
  the image cached; about 19 minutes more to build it the first time.
- x86 with nested paging (testbed/x86/e2e, an emulated AMD host): the x86
  kprobes (kvm_arch_prepare_memory_region, kvm_mmu_page_fault entry and
  return), kvm:kvm_page_fault and the TDP MMU tracepoints, the report's faults
  per slot equal to the guest's own and bpftrace counting the same faults.
  Measured: 128 s (6.1) and 145 s (7.x) with the image cached; about 5.5
  minutes more to build it.

Both run beside the rest of the suite, started when collection ends
(tests/testbeds_beside.py); the test waits for its result.
KVMTRACE_ARM64=0 / KVMTRACE_X86=0 leave one out of a local run;
KVMTRACE_X86_KERNELS picks the x86 kernels (default "6.1 7.x", what CI runs).
"""

import os

import pytest

import testbeds_beside

pytestmark = pytest.mark.usefixtures("live")


@pytest.mark.parametrize("arch, env", [("arm64", "KVMTRACE_ARM64"), ("x86", "KVMTRACE_X86")])
def test_end_to_end_on_both_kernels(arch, env):
    if os.environ.get(env) == "0":
        pytest.skip(f"{env}=0: the {arch} end to end left out on request")
    run = testbeds_beside.RUNS.get(arch) or testbeds_beside.Run(arch)
    p = run.wait()
    # the failing tests and their assertion lines (pytest's "E   ..." lines)
    failures = [ln for ln in p.stdout.splitlines() if ln.startswith(("FAIL", "ERROR", "E  "))]
    summary = p.stdout[p.stdout.rfind(f"== {arch} end to end summary"):]
    assert p.returncode == 0, "\n".join(failures[-60:]) + "\n" + summary + p.stderr[-2000:]
    for k in testbeds_beside.kernels(arch).split():
        assert f"kernel {k}: ok" in summary
