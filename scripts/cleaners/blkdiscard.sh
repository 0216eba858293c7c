#!/usr/bin/env bash
# Block cleaner for SSDs and thin-provisioned devices: tells the device to
# discard (TRIM/UNMAP) every sector. Fast, but only as good as the device's
# discard support; fails if the device does not support discard.
#
# Input: LOCAL_PV_BLKDEVICE, the in-container path of the device (set by the agent).
set -euo pipefail

readonly name="blkdiscard"

fail() {
	echo "${name}: error: $*" >&2
	exit 1
}

dev="${LOCAL_PV_BLKDEVICE:-}"
[[ -n "${dev}" ]] || fail "LOCAL_PV_BLKDEVICE is not set; refusing to run"
[[ -b "${dev}" ]] || fail "LOCAL_PV_BLKDEVICE=${dev} is not a block device; refusing to run"

target=$(readlink -f "${dev}")
size=$(blockdev --getsize64 "${dev}")
echo "${name}: ${dev} (${target}, ${size} bytes)"
echo "${name}: running: blkdiscard --verbose ${dev}"
blkdiscard --verbose "${dev}" || fail "blkdiscard failed on ${dev} (does the device support discard?)"
echo "${name}: done"
