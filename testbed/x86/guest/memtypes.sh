#!/bin/sh
# Memory types on NPT (issue 8 item 3): record the test VMM with a RAM slot
# and the ivshmem BAR through resource2 (UC-) and resource2_wc (WC), and keep
# the host side next to the recording: /proc/mtrr, the PAT memtype list
# before and while the BAR is mapped, the PAT line of the boot log, the
# device's lspci, the VMM's maps and smaps while mapped, the text report.
#   testbed/x86/run --kernel K --out DIR -- sh /kt/memtypes.sh [NAME [SCENARIO]]
# writes DIR/NAME-K.{kvt,guest.json,host.txt,report.txt} (NAME: bar, SCENARIO:
# x86-bar; the BAR through vfio-pci: run --iommu ... memtypes.sh vfio vfio)
set -u
name=${1:-bar}
scenario=${2:-x86-bar}
k=$(. /kt/env; echo "$KT_KERNEL")
o=/out
base=$o/$name-$k
host=$base.host.txt
mountpoint -q /sys/kernel/debug || mount -t debugfs none /sys/kernel/debug
cd /src
{
  echo "## uname -r"; uname -r
  echo "## /proc/mtrr"; cat /proc/mtrr
  echo "## dmesg: PAT / MTRR / IOMMU"; dmesg | grep -i -E 'x86/PAT|mtrr|AMD-Vi|iommu|DMAR' | head -20 || true
  echo "## lspci -vv -d 1af4:1110"; lspci -vv -d 1af4:1110 || true
  echo "## kallsyms: get_mt_mask / shadow_memtype_mask"; grep -E "get_mt_mask|shadow_memtype_mask" /proc/kallsyms || echo none
  echo "## pat_memtype_list before the VMM"; cat /sys/kernel/debug/x86/pat_memtype_list
} > "$host" 2>&1
rm -f "$base.guest.json"
(
  while [ ! -s "$base.guest.json" ]; do sleep 0.5; done
  pid=$(pgrep -f '^python3 -m testvmm' | head -n1)
  {
    echo "## driver: $(readlink /sys/bus/pci/devices/*/driver | grep vfio)"
    echo "## pat_memtype_list while the VMM holds the BAR (pid $pid)"
    cat /sys/kernel/debug/x86/pat_memtype_list
    echo "## /proc/$pid/maps"; cat /proc/$pid/maps
    echo "## /proc/$pid/smaps (BAR VMAs)"
    grep -E -A25 'resource2|vfio' /proc/$pid/smaps
  } >> "$host" 2>&1
) &
watcher=$!
python3 -m kvmtrace.cli record -o "$base.kvt" --force -- \
  python3 -m testvmm --scenario "$scenario" -q --report "$base.guest.json" --hold 8
rc=$?
wait $watcher 2>/dev/null
python3 -m kvmtrace.cli report "$base.kvt" --width 200 > "$base.report.txt" 2>&1
python3 -m kvmtrace.cli report "$base.kvt" --format tsv --table verdicts >> "$base.report.txt" 2>&1
exit $rc
