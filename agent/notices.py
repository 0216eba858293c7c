"""What the agent tells an operator through Events: typed reasons, and conditions reported once.

Pure. A `Notice` is an Event to be: the object it is about, a `Reason`, a message. A notice with
a `Once` key reports a condition that lasts (an excluded entry, a missing disk): it is posted
once, and again only after it cleared and came back. Conditions come in families (`Scope`); a
pass that reports the complete current set of a family also says which ones cleared.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Reason(StrEnum):
    """Every Event reason the agent posts; `kubectl describe` shows them."""

    PROVISIONED = "Provisioned"
    VOLUME_CLEANED = "VolumeCleaned"
    VOLUME_EXCLUDED = "VolumeExcluded"
    VOLUME_WITHDRAWN = "VolumeWithdrawn"
    VOLUME_MISSING = "VolumeMissing"
    DISK_CHANGED = "DiskChanged"
    VOLUME_UNVERIFIED = "VolumeUnverified"
    VOLUME_FAILED_DELETE = "VolumeFailedDelete"
    VOLUME_UNSUPPORTED_RECLAIM_POLICY = "VolumeUnsupportedReclaimPolicy"
    STORAGE_CLASS_MISSING = "StorageClassMissing"
    NAME_CONFLICT = "NameConflict"
    DUPLICATE_VOLUME = "DuplicateVolume"
    CONFIG_REJECTED = "ConfigRejected"
    CONFIG_RELOADED = "ConfigReloaded"
    CLASS_FAILED = "ClassFailed"
    STATE_DIR_UNWRITABLE = "StateDirUnwritable"
    CAPACITY_UPDATED = "CapacityUpdated"  # an Available PV got its disk's new size
    CAPACITY_CHANGED = "CapacityChanged"  # a claimed PV's disk changed size; the PV is left
    CLASS_REMOVED = "ClassRemoved"  # a claimed PV's class left the config; the PV is left

    @property
    def event_type(self) -> str:
        normal = (Reason.PROVISIONED, Reason.VOLUME_CLEANED, Reason.CONFIG_RELOADED,
                  Reason.CAPACITY_UPDATED)
        return "Normal" if self in normal else "Warning"


class Scope(StrEnum):
    """A family of lasting conditions. Its value prefixes the key in logs ("missing/...")."""

    EXCLUDED = "excluded"  # an entry not offered, per reason
    MISSING = "missing"  # a PV's disk is gone
    CHANGED = "changed"  # a different disk is at a PV's path
    DIRTY = "dirty"  # a dirty volume held for an operator
    CLASS_FAILED = "class-failed"  # a class whose PVs cannot be built
    STATE_DIR = "state-dir"  # a dirty mark that cannot be written
    SC_MISSING = "sc-missing"  # a StorageClass that does not exist
    NAME_CONFLICT = "name-conflict"
    DUPLICATE = "duplicate"
    POLICY = "policy"  # an unsupported reclaim policy
    UNVERIFIED = "unverified"  # a Released PV whose disk cannot be recognised
    CLEAN_FAILED = "clean-failed"  # one failed attempt
    JOB_FAILED = "job-failed"  # a failed cleaning Job, until it is deleted
    CAPACITY = "capacity"  # a claimed PV whose capacity differs from its disk's
    CLASS_REMOVED = "class-removed"  # a claimed PV of a class no longer configured


@dataclass(frozen=True)
class Once:
    """The key of a lasting condition: reported once while it lasts."""

    scope: Scope
    subject: str

    def __str__(self) -> str:
        return f"{self.scope.value}/{self.subject}"


@dataclass(frozen=True)
class Notice:
    """An Event worth posting about an object; with `once`, only once while it lasts."""

    kind: str  # of the involved object: Node, PersistentVolume, PersistentVolumeClaim
    name: str
    reason: Reason
    message: str
    once: Once | None = None  # None: posted every time it is reported
    namespace: str = ""  # for namespaced objects (a claim)
    uid: str = ""

    @property
    def event_type(self) -> str:
        return self.reason.event_type
