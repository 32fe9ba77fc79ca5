# Settings shared by the emulated KVM testbeds (testbed/arm64, testbed/x86).
# Sourced by testbed/<arch>/common.sh after it has set KT_ARCH. Not executed.
# shellcheck shell=bash disable=SC2034

KT_CACHE=${KVMTRACE_TESTBED_CACHE:-/var/cache/kvmtrace-testbed}
KT_LIB=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
KT_MIRROR=http://deb.debian.org/debian
KT_SECURITY=http://deb.debian.org/debian-security

# The kernels the testbeds know, and the Debian suite whose root goes with each.
#   6.1 : bookworm's linux-image-<arch> (bookworm-security carries the newest 6.1 ABI)
#   7.x : trixie-backports' linux-image-<arch> (resolved at build time; must be 7.*)
KT_KERNELS="6.1 7.x"

kt_suite() {            # kernel flavour -> suite of its root
    case $1 in
        6.1) echo bookworm ;;
        7.x) echo trixie ;;
        *) echo "unknown kernel '$1' (known: $KT_KERNELS)" >&2; return 1 ;;
    esac
}

kt_log() { printf '[testbed %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
kt_die() { printf '[testbed] error: %s\n' "$*" >&2; exit 1; }

# Host packages: install only the ones that are missing.
kt_need_host_pkgs() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' \
            || missing+=("$p")
    done
    if ((${#missing[@]})); then
        kt_log "installing host packages: ${missing[*]}"
        # (both testbeds' builds start together on a new machine: wait for
        # the other's dpkg lock rather than fail)
        local lock=(-o DPkg::Lock::Timeout=600)
        if ! DEBIAN_FRONTEND=noninteractive apt-get "${lock[@]}" install -y -q \
                --no-install-recommends "${missing[@]}" >&2; then
            kt_log "apt-get install failed; retrying after apt-get update"
            apt-get "${lock[@]}" update -q >&2
            DEBIAN_FRONTEND=noninteractive apt-get "${lock[@]}" install -y -q \
                --no-install-recommends "${missing[@]}" >&2 || kt_die "cannot install ${missing[*]}"
        fi
    fi
}
