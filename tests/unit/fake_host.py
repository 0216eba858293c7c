"""A host for the loop's tests without root: disks are facts, not mounts.

`FakeHost` answers `HostReader.snapshot` and `read_identity` from a table of entries per class:
a mounted filesystem (a volume), a raw block device, a plain directory (an unmounted disk:
gone), or nothing. Disks
can be swapped (same path, another identity) or removed between passes.
"""

from __future__ import annotations

import posixpath
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.config import Config
from agent.discovery import EntryFacts, FileType, HostSnapshot, Mount
from agent.host import SnapshotInterrupted

GiB = 1 << 30


@dataclass
class Disk:
    device: str  # "major:minor"
    identity: dict[str, str]
    capacity: int = 20 * GiB
    mounted: bool = True


@dataclass
class FakeHost:
    entries: dict[str, dict[str, Disk]] = field(default_factory=dict)  # class -> entry -> disk
    block: set[str] = field(default_factory=set)  # entries that are raw block devices
    snapshots: int = 0
    interrupted: int = 0  # snapshots given up because a wake-up wanted a fresh look
    # called during each snapshot, before its entries are read (a mount arriving meanwhile)
    while_reading: Callable[[], None] | None = None
    _minor: int = 0

    def add(self, class_name: str, entry: str, fs_uuid: str | None = None,
            **identity: str) -> Disk:
        self._minor += 1
        ident = {"fs-uuid": fs_uuid or f"uuid-{entry}-{self._minor}", **identity}
        disk = Disk(f"7:{self._minor}", ident)
        self.entries.setdefault(class_name, {})[entry] = disk
        return disk

    def swap(self, class_name: str, entry: str) -> Disk:
        """Another disk at the same path."""
        return self.add(class_name, entry, fs_uuid=f"swapped-{entry}-{self._minor + 1}")

    def unmount(self, class_name: str, entry: str) -> None:
        self.entries[class_name][entry].mounted = False

    def snapshot(self, config: Config,
                 interrupted: Callable[[], bool] | None = None) -> HostSnapshot:
        self.snapshots += 1
        if self.while_reading is not None:
            self.while_reading()
        if interrupted is not None and interrupted():
            self.interrupted += 1
            raise SnapshotInterrupted
        facts: dict[str, list[EntryFacts]] = {}
        mounts = [Mount(1, 0, "8:1", "/", "/", "ext4", "/dev/sda1")]
        for cls in config.classes:
            listed = facts.setdefault(cls.name, [])
            for name, disk in sorted(self.entries.get(cls.name, {}).items()):
                path = posixpath.join(cls.mount_dir, name)
                if name in self.block:
                    listed.append(EntryFacts(name, path, FileType.BLOCK, device=disk.device,
                                             capacity_bytes=disk.capacity,
                                             identity=dict(disk.identity)))
                    continue
                if not disk.mounted:
                    listed.append(EntryFacts(name, path, FileType.DIRECTORY, device="8:1"))
                    continue
                listed.append(EntryFacts(name, path, FileType.DIRECTORY, device=disk.device,
                                         capacity_bytes=disk.capacity,
                                         identity=dict(disk.identity)))
                mounts.append(Mount(len(mounts) + 1, 1, disk.device, "/", path, "ext4",
                                    f"/dev/loop{disk.device.split(':')[1]}"))
        return HostSnapshot(facts, mounts, {c.name: c.mount_dir for c in config.classes})

    def read_identity(self, device: str, fs_type: str | None = None) -> dict[str, str]:
        for disks in self.entries.values():
            for disk in disks.values():
                if disk.device == device and disk.mounted:
                    return dict(disk.identity)
        return {}
