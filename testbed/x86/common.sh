# Shared settings for testbed/x86/{build,run,e2e}. Sourced, not executed.
# The parts both testbeds use are in testbed/lib/common.sh; this adds x86's.
# shellcheck shell=bash disable=SC2034

KT_ARCH=x86
KT_HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../lib/common.sh
. "$KT_HERE/../lib/common.sh"
# x86's cache sits beside arm64's: $KT_CACHE/x86-amd64/{debs,roots,kernels,images,pip,tmp}.
KT_ACACHE=$KT_CACHE/x86-amd64
