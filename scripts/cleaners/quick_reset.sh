#!/usr/bin/env bash
# Default block cleaner: makes a released block volume look blank to the next
# user without writing the whole device. Removes every filesystem, RAID and
# partition-table signature, then zeroes the head and the tail of the device
# (where superblocks, GPT headers and their backups live).
#
# Input: LOCAL_PV_BLKDEVICE, the in-container path of the device (set by the agent).
# Optional: QUICK_RESET_MIB, how many MiB to zero at each end (default 10).
set -euo pipefail

readonly name="quick_reset"

fail() {
	echo "${name}: error: $*" >&2
	exit 1
}

dev="${LOCAL_PV_BLKDEVICE:-}"
[[ -n "${dev}" ]] || fail "LOCAL_PV_BLKDEVICE is not set; refusing to run"
[[ -b "${dev}" ]] || fail "LOCAL_PV_BLKDEVICE=${dev} is not a block device; refusing to run"

mib="${QUICK_RESET_MIB:-10}"
[[ "${mib}" =~ ^[1-9][0-9]*$ ]] || fail "QUICK_RESET_MIB=${mib} is not a positive integer"

size=$(blockdev --getsize64 "${dev}")
span=$((mib * 1024 * 1024))
if ((span > size)); then
	span=${size}
fi

target=$(readlink -f "${dev}")
echo "${name}: ${dev} (${target}, ${size} bytes)"

echo "${name}: wiping signatures: wipefs --all ${dev}"
wipefs --all "${dev}"

zero() { # zero <offset-bytes> <length-bytes>
	dd if=/dev/zero of="${dev}" bs=1M iflag=count_bytes oflag=seek_bytes \
		seek="$1" count="$2" conv=fsync status=none
}

echo "${name}: zeroing the first ${span} bytes"
zero 0 "${span}"
echo "${name}: zeroing the last ${span} bytes"
zero "$((size - span))" "${span}"

echo "${name}: done"
