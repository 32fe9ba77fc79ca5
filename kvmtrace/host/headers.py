"""Kernel headers for bcc's compiler.

bcc compiles every program with the kernel's headers. The running kernel's
own headers often don't exist (custom kernels, this project's 6.18 PVM host).
kvmtrace's programs only use tracepoint ``args`` (layout from tracefs) and BPF
helpers, so any recent distro headers for the same architecture compile them
correctly; kernel struct layouts are never taken from these headers (offsets
come from BTF). Lookup order: /lib/modules/$(uname -r)/build, then the newest
Debian linux-headers-* pair for this architecture, through BCC_KERNEL_SOURCE
plus include flags (BCC_KERNEL_SOURCE alone is not enough: measured).
"""

from __future__ import annotations

import glob
import os
import platform
import re
from dataclasses import dataclass, field

DEBIAN_ARCH = {"x86_64": ("amd64", "x86"), "aarch64": ("arm64", "arm64")}


@dataclass
class Headers:
    source: str            # what the report shows
    matches_kernel: bool
    env: dict = field(default_factory=dict)
    cflags: list = field(default_factory=list)
    version: str = ""


def _version_key(path: str):
    return [int(x) if x.isdigit() else x for x in re.split(r"[.\-]", path)]


def find(release: str | None = None, machine: str | None = None) -> Headers | None:
    release = release or platform.release()
    machine = machine or platform.machine()
    own = f"/lib/modules/{release}/build"
    if os.path.isdir(os.path.join(own, "include")):
        return Headers(own, True, version=release)
    flavour, arch = DEBIAN_ARCH.get(machine, (None, None))
    if not flavour:
        return None
    builds = sorted(glob.glob(f"/usr/src/linux-headers-*-{flavour}"), key=_version_key)
    for build in reversed(builds):
        common = re.sub(rf"-{flavour}$", "-common", build)
        if not os.path.isdir(common):
            continue
        version = os.path.basename(build)[len("linux-headers-"):]
        return Headers(
            source=build,
            matches_kernel=version == release,
            env={"BCC_KERNEL_SOURCE": common},
            cflags=[f"-I{build}/arch/{arch}/include/generated",
                    f"-I{build}/arch/{arch}/include/generated/uapi",
                    f"-I{build}/include",
                    f"-I{build}/include/generated/uapi"],
            version=version,
        )
    return None


def apply(h: Headers) -> list[str]:
    """Set the environment bcc reads; return the cflags to pass to BPF()."""
    os.environ.update(h.env)
    return list(h.cflags)


MISSING_HINT = ("no kernel headers for bcc: install Debian's linux-headers-{flavour} "
                "(apt-get install linux-headers-{flavour}) or the headers of the running kernel")


def missing_hint(machine: str | None = None) -> str:
    flavour = DEBIAN_ARCH.get(machine or platform.machine(), ("<arch>",))[0]
    return MISSING_HINT.format(flavour=flavour)
