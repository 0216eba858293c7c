#!/usr/bin/env bash
# Block cleaner that overwrites the whole device with random data using
# shred(1), then once with zeros so the next user sees a blank device.
#
# Usage: shred.sh [PASSES]   (random passes, default 2)
# Input: LOCAL_PV_BLKDEVICE, the in-container path of the device (set by the agent).
set -euo pipefail

readonly name="shred"

fail() {
	echo "${name}: error: $*" >&2
	exit 1
}

dev="${LOCAL_PV_BLKDEVICE:-}"
[[ -n "${dev}" ]] || fail "LOCAL_PV_BLKDEVICE is not set; refusing to run"
[[ -b "${dev}" ]] || fail "LOCAL_PV_BLKDEVICE=${dev} is not a block device; refusing to run"

passes="${1:-2}"
[[ "${passes}" =~ ^[1-9][0-9]*$ ]] || fail "number of passes '${passes}' is not a positive integer"

target=$(readlink -f "${dev}")
size=$(blockdev --getsize64 "${dev}")
echo "${name}: ${dev} (${target}, ${size} bytes)"
echo "${name}: running: shred --verbose --iterations=${passes} --zero ${dev}"
shred --verbose --iterations="${passes}" --zero "${dev}"
echo "${name}: done"
