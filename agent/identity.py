"""What makes a disk the same disk: the one rule every destructive step asks before it acts.

Pure. A device number (major:minor) is not an identity: loop devices and SCSI disks reuse
them, so a different disk can appear under the same number. A filesystem volume is known by
its filesystem UUID (and the disk's hardware identity, when known); a raw device only by what a
tenant cannot rewrite: its WWN, serial, by-id name or, for a loop device, its backing file. A
filesystem UUID on a raw device says nothing once a tenant may have formatted it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum

# Keys, in the order they are shown. Each is also a PV annotation (`localpv-agent.io/<key>`).
IDENTITY_KEYS = ("fs-uuid", "wwn", "serial", "device-id", "pt-uuid", "loop-backing")
HARDWARE_KEYS = ("wwn", "serial", "device-id", "loop-backing")


class Match(StrEnum):
    SAME = "same"
    DIFFERENT = "different"
    UNKNOWN = "unknown"  # nothing recorded could be read again: never destroy on that


@dataclass(frozen=True)
class Comparison:
    match: Match
    differs: Mapping[str, tuple[str, str]] = field(default_factory=dict)  # key -> (was, is)

    def describe(self) -> str:
        return ", ".join(f"{k} {old} -> {new}" for k, (old, new) in sorted(self.differs.items()))


def relevant_keys(raw_device: bool) -> tuple[str, ...]:
    return HARDWARE_KEYS if raw_device else ("fs-uuid", *HARDWARE_KEYS)


def compare(recorded: Mapping[str, str], observed: Mapping[str, str],
            raw_device: bool) -> Comparison:
    """Whether the disk observed now is the one recorded.

    DIFFERENT when any key both sides know differs; SAME when at least one key both know is
    equal and none differs; UNKNOWN when the two share no key (nothing to check against).
    """
    keys = [k for k in relevant_keys(raw_device) if recorded.get(k) and observed.get(k)]
    differs = {k: (recorded[k], observed[k]) for k in keys if recorded[k] != observed[k]}
    if differs:
        return Comparison(Match.DIFFERENT, differs)
    return Comparison(Match.SAME if keys else Match.UNKNOWN)


def identifiable(identity: Mapping[str, str], raw_device: bool) -> bool:
    """Whether a disk has anything a later check could recognise it by."""
    return any(identity.get(k) for k in relevant_keys(raw_device))
