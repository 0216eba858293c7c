#!/usr/bin/env bash
# Block cleaner that writes zeros over the entire device with dd(1). Slow on
# large disks, but works on any device.
#
# Input: LOCAL_PV_BLKDEVICE, the in-container path of the device (set by the agent).
set -euo pipefail

readonly name="dd_zero"

fail() {
	echo "${name}: error: $*" >&2
	exit 1
}

dev="${LOCAL_PV_BLKDEVICE:-}"
[[ -n "${dev}" ]] || fail "LOCAL_PV_BLKDEVICE is not set; refusing to run"
[[ -b "${dev}" ]] || fail "LOCAL_PV_BLKDEVICE=${dev} is not a block device; refusing to run"

# Writing an exact byte count instead of "until the end" keeps dd from
# finishing with ENOSPC, which would make a successful wipe look failed.
size=$(blockdev --getsize64 "${dev}")

target=$(readlink -f "${dev}")
echo "${name}: ${dev} (${target}, ${size} bytes)"
echo "${name}: writing ${size} bytes of zeros"
dd if=/dev/zero of="${dev}" bs=4M iflag=count_bytes count="${size}" conv=fsync status=progress
echo "${name}: done"
