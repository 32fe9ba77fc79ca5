# The testbed runner shared by testbed/arm64/run and testbed/x86/run: boots one
# emulated KVM host under QEMU TCG and runs one command in it. Sourced by the
# per-architecture `run` script after its common.sh, which sets KT_ARCH,
# KT_HERE (testbed/<arch>), KT_ACACHE (that architecture's cache) and defines
#   kt_qemu_bin            the QEMU binary
#   kt_qemu_machine        prints the machine-specific QEMU arguments, one per line
#   kt_console             the kernel console device (ttyAMA0, ttyS0)
# and may read $KT_IOMMU (1: --iommu, give the machine an IOMMU; 0: --no-iommu)
# in kt_qemu_machine, and define kt_iommu_devices (QEMU arguments placed
# before every other device, as intel-iommu/amd-iommu must be) and
# kt_iommu_append (kernel command-line words).
# Optional: testbed/<arch>/guest/arch-init.sh runs in the guest before COMMAND
# (e.g. x86 loads kvm_amd); everything in testbed/<arch>/guest/ is at /kt/.
# The command line and behaviour are documented in testbed/arm64/README.md.
# shellcheck shell=bash

kernel='' root='' extra=() timeout_s=1800 src=$(cd "$KT_HERE/../.." && pwd) out='' mem=4096 console=0
# An IOMMU for the emulated host (so vfio-pci can take the ivshmem device):
# --iommu / --no-iommu, or KVMTRACE_TESTBED_IOMMU=1|0; off unless the
# architecture's common.sh sets KT_IOMMU_DEFAULT=1 (neither does yet).
KT_IOMMU=${KVMTRACE_TESTBED_IOMMU:-${KT_IOMMU_DEFAULT:-0}}
while (($#)); do
    case $1 in
        --kernel) kernel=${2:?}; shift 2 ;;
        --kernel=*) kernel=${1#*=}; shift ;;
        --timeout) timeout_s=${2:?}; shift 2 ;;
        --timeout=*) timeout_s=${1#*=}; shift ;;
        --src) src=${2:?}; shift 2 ;;
        --src=*) src=${1#*=}; shift ;;
        --out) out=${2:?}; shift 2 ;;
        --out=*) out=${1#*=}; shift ;;
        --mem) mem=${2:?}; shift 2 ;;
        --root) root=${2:?}; shift 2 ;;
        --cpio) extra+=("$(readlink -f "${2:?}")"); shift 2 ;;
        --console) console=1; shift ;;
        --iommu) KT_IOMMU=1; shift ;;
        --no-iommu) KT_IOMMU=0; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        --) shift; break ;;
        *) kt_die "unknown argument: $1 (the command goes after --)" ;;
    esac
done
(($#)) || kt_die "no command given (usage: run --kernel 6.1|7.x [--timeout S] -- COMMAND...)"
[[ -n $kernel ]] || kt_die "--kernel 6.1|7.x is required"
kt_suite "$kernel" >/dev/null || exit 2
[[ $timeout_s =~ ^[0-9]+$ ]] || kt_die "--timeout takes whole seconds"
[[ $KT_IOMMU == [01] ]] || kt_die "KVMTRACE_TESTBED_IOMMU must be 0 or 1 (got '$KT_IOMMU')"
root=${root:-$kernel}
kt_suite "$root" >/dev/null || exit 2
base=$KT_ACACHE/images/$root.cpio
vmlinuz=$KT_ACACHE/kernels/$kernel/vmlinuz
[[ -f $base && -f $vmlinuz ]] || kt_die "no testbed for kernel $kernel in $KT_ACACHE: run testbed/$KT_ARCH/build --kernel $kernel"
[[ -d $src ]] || kt_die "--src $src is not a directory"
src=$(cd "$src" && pwd)
command -v "$(kt_qemu_bin)" >/dev/null || kt_die "$(kt_qemu_bin) missing: run testbed/$KT_ARCH/build"
if [[ -n $out ]]; then mkdir -p "$out"; out=$(cd "$out" && pwd); fi

t_start=$(date +%s)
mkdir -p "$KT_ACACHE/tmp"
T=$(mktemp -d "$KT_ACACHE/tmp/run.XXXXXX")
QPID='' TAILS=()
cleanup() {
    local p
    if [[ -n $QPID ]] && kill -0 "$QPID" 2>/dev/null; then
        kill -TERM "$QPID" 2>/dev/null
        for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$QPID" 2>/dev/null || break; sleep 0.2; done
        kill -KILL "$QPID" 2>/dev/null || true
    fi
    for p in "${TAILS[@]}"; do kill "$p" 2>/dev/null || true; done
    [[ -f $T/console.log ]] && cp "$T/console.log" "$KT_ACACHE/tmp/last-console-$kernel.log" 2>/dev/null
    rm -rf "$T"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# ---- the per-run cpio: /init, /kt (settings, command, the arch's guest/
# files), /src (the checkout: kvmtrace, testvmm, tests; on PYTHONPATH)
S=$T/stage
mkdir -p "$S/kt" "$S/src" "$S/dev"
mknod -m 600 "$S/dev/console" c 5 1
install -m 755 "$KT_LIB/guest/init" "$S/init"
cp -a "$KT_LIB/guest/." "$S/kt/"
cp -a "$KT_HERE/guest/." "$S/kt/"
printf 'KT_DEADLINE=%d\nKT_OUT=%d\nKT_KERNEL=%s\nKT_ARCH=%s\nKT_IOMMU=%d\n' \
    $((t_start + timeout_s)) "$([[ -n $out ]] && echo 1 || echo 0)" "$kernel" "$KT_ARCH" \
    "$KT_IOMMU" > "$S/kt/env"
{
    echo 'export PYTHONPATH=/src/src:/src${PYTHONPATH:+:$PYTHONPATH}'
    echo 'export KVMTRACE_SRC=/src KVMTRACE_TESTBED_KERNEL='"$kernel"' KVMTRACE_TESTBED_IOMMU='"$KT_IOMMU"
    printf 'exec'; printf ' %q' "$@"; echo
} > "$S/kt/cmd"
# The checkout: tracked and untracked-but-not-ignored files of a git work tree
# (or every file otherwise), without .git, virtualenvs and byte code.
(
    cd "$src"
    if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then
        git ls-files -z -co --exclude-standard
    else
        find . -path ./.git -prune -o \( -type f -o -type l \) -printf '%P\0'
    fi
) | grep -zvE '(^|/)(\.git|\.venv|venv|__pycache__|\.pytest_cache|\.mypy_cache|node_modules)(/|$)|\.pyc$' \
  | (cd "$src" && cpio -0 -pdm --quiet "$S/src" 2>/dev/null) || true
(cd "$S" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) > "$T/run.cpio"
for f in "${extra[@]}"; do [[ -f $f ]] || kt_die "--cpio $f: no such file"; done
cat "$base" "${extra[@]}" "$T/run.cpio" > "$T/initrd"
rm -rf "$S"

# ---- QEMU
: > "$T/stdout"; : > "$T/stderr"; : > "$T/status"; : > "$T/console.log"
# rootfstype=ramfs: the default initramfs root is a tmpfs of half the RAM left
# while the initrd is still loaded (1.3 GiB of 4 GiB on arm64, 98% full with
# the 7.x root), ramfs has no such limit.
mapfile -t machine < <(kt_qemu_machine)
iommu_dev=() append_iommu=''
if ((KT_IOMMU)) && declare -F kt_iommu_devices >/dev/null; then
    mapfile -t iommu_dev < <(kt_iommu_devices)
fi
if ((KT_IOMMU)) && declare -F kt_iommu_append >/dev/null; then
    append_iommu=" $(kt_iommu_append)"
fi
qemu=("$(kt_qemu_bin)"
    "${machine[@]}" -m "$mem"
    -nodefaults -display none -no-reboot
    "${iommu_dev[@]}"
    -kernel "$vmlinuz" -initrd "$T/initrd"
    -append "console=$(kt_console) rdinit=/init rootfstype=ramfs panic=1 quiet loglevel=4$append_iommu"
    -chardev "file,id=kt_con,path=$T/console.log,append=on" -serial chardev:kt_con
    -object memory-backend-ram,id=kt_ivshmem,size=2M
    -device ivshmem-plain,memdev=kt_ivshmem
    -device virtio-serial-pci,id=kt_vser
    -chardev "file,id=kt_so,path=$T/stdout,append=on"
    -device virtserialport,bus=kt_vser.0,nr=1,chardev=kt_so,name=kt.stdout
    -chardev "file,id=kt_se,path=$T/stderr,append=on"
    -device virtserialport,bus=kt_vser.0,nr=2,chardev=kt_se,name=kt.stderr
    -chardev "file,id=kt_st,path=$T/status,append=on"
    -device virtserialport,bus=kt_vser.0,nr=3,chardev=kt_st,name=kt.status
)
if [[ -n $out ]]; then
    qemu+=(-fsdev "local,id=kt_outfs,path=$out,security_model=none"
           -device virtio-9p-pci,fsdev=kt_outfs,mount_tag=kt_out)
fi
left=$((t_start + timeout_s - $(date +%s)))
((left > 0)) || left=1
timeout --kill-after=5 "$left" "${qemu[@]}" </dev/null >"$T/qemu.log" 2>&1 &
QPID=$!
tail -s 0.2 -n +1 -f --pid="$QPID" "$T/stdout" & TAILS+=($!)
tail -s 0.2 -n +1 -f --pid="$QPID" "$T/stderr" >&2 & TAILS+=($!)
((console)) && { tail -s 0.2 -n +1 -f --pid="$QPID" "$T/console.log" >&2 & TAILS+=($!); }
qrc=0
wait "$QPID" || qrc=$?
QPID=
for p in "${TAILS[@]}"; do wait "$p" 2>/dev/null || true; done
TAILS=()

rc=$(sed -n 's/^rc=\([0-9]*\)$/\1/p' "$T/status" | tail -1)
[[ -n $rc ]] || rc=$(tr -d '\r' < "$T/console.log" | sed -n 's/^KVMTRACE-TESTBED-RC=\([0-9]*\)$/\1/p' | tail -1)
if [[ -z $rc ]]; then
    if ((qrc == 124 || qrc == 137)); then
        kt_log "timeout: killed QEMU after ${timeout_s} s"
        rc=124
    else
        kt_log "the guest ended without an exit status (qemu exit $qrc); console tail:"
        rc=125
    fi
    tail -n 25 "$T/console.log" | tr -d '\r' >&2
    [[ -s $T/qemu.log ]] && cat "$T/qemu.log" >&2
fi
exit "$rc"
