# Shared settings for testbed/arm64/{build,run,smoke}. Sourced, not executed.
# The parts both testbeds use are in testbed/lib/common.sh; this adds arm64's.
# shellcheck shell=bash disable=SC2034

KT_ARCH=arm64
KT_HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
# shellcheck source=../lib/common.sh
. "$KT_HERE/../lib/common.sh"
# arm64's cache is the top of $KT_CACHE (debs/ roots/ kernels/ images/ pip/ tmp/).
KT_ACACHE=$KT_CACHE
