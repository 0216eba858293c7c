"""Decide which entries of the discovery directories become volumes, and why the others don't.

Pure: the host adapter (`agent.host`) observes entries and the mount table; this module only
reasons about those facts, so every rule is unit-testable from fixtures. The rules protect data:
an entry is offered only when it is unambiguously one disk (or one filesystem subtree) that no
other entry, class, or the host itself already uses.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum

from agent.config import ClassConfig, Config
from agent.identity import identifiable


class FileType(StrEnum):
    DIRECTORY = "directory"
    BLOCK = "block"
    OTHER = "other"  # regular file, socket, fifo, char device
    BROKEN_LINK = "broken-link"
    UNREADABLE = "unreadable"


class Reason(StrEnum):
    """Why an entry was not offered. The values are stable: they are metric labels."""

    NOT_MOUNT_POINT = "not_mount_point"
    UNSUPPORTED_TYPE = "unsupported_type"
    BROKEN_SYMLINK = "broken_symlink"
    SYMLINK_ESCAPES = "symlink_escapes"
    WRONG_MODE = "wrong_mode"
    DUPLICATE = "duplicate"
    SYSTEM_DEVICE = "system_device"
    DEVICE_IN_USE = "device_in_use"
    UNREADABLE = "unreadable"
    TIMEOUT = "timeout"
    ZERO_CAPACITY = "zero_capacity"
    INVALID_NAME = "invalid_name"
    SYSTEM_FILESYSTEM = "system_filesystem"
    PARTITIONED = "partitioned"
    HAS_SIGNATURE = "has_signature"
    NO_IDENTITY = "no_identity"


# Mount points whose devices belong to the host itself. In a pod the kubelet bind-mounts
# /etc/hosts and friends from its own directory, so they reveal the host's kubelet filesystem.
SYSTEM_MOUNT_POINTS = (
    "/", "/boot", "/boot/efi", "/usr", "/var", "/var/lib/kubelet", "/etc/hosts",
    "/etc/hostname", "/etc/resolv.conf", "/dev/termination-log",
)


# Filesystems of the kernel and the system, never a disk: a mount of one in a discovery directory
# is a mistake (or a bind of the host's own /dev, /proc, ...). tmpfs is not among them: it is a
# legitimate (if volatile) volume. An overlay is one only when it is the root's (a container's).
SYSTEM_FILESYSTEMS = frozenset({
    "devtmpfs", "proc", "sysfs", "cgroup", "cgroup2", "devpts", "securityfs", "debugfs",
    "tracefs", "configfs", "bpf", "pstore", "mqueue", "hugetlbfs", "fusectl", "autofs",
    "binfmt_misc", "nsfs", "efivarfs", "rpc_pipefs",
})


@dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mountinfo."""

    mount_id: int
    parent_id: int
    device: str  # "major:minor"
    root: str  # the subtree of the filesystem mounted here
    mount_point: str
    fs_type: str
    source: str
    options: str = ""


@dataclass(frozen=True)
class EntryFacts:
    """What the host adapter observed about one entry in a class's `mountDir`."""

    name: str
    path: str  # mountDir/name, in the agent's mount namespace
    file_type: FileType
    target: str | None = None  # the fully resolved path, when the entry is a symlink
    device: str | None = None  # "major:minor" of the block device, or of the directory's fs
    capacity_bytes: int | None = None
    identity: Mapping[str, str] = field(default_factory=dict)
    partitions: tuple[str, ...] = ()  # block devices: "major:minor" of its partitions
    holders: tuple[str, ...] = ()  # block devices: kernel names of devices stacked on it
    # block devices, as read from the device itself: what it holds (blkid TYPEs: "ext4",
    # "LVM2_member", "crypto_LUKS", ...) and its partition table ("gpt", "dos"), if any
    signatures: tuple[str, ...] = ()
    partition_table: str | None = None
    error: str | None = None
    timed_out: bool = False


@dataclass(frozen=True)
class Volume:
    """An entry that becomes exactly one PV."""

    class_name: str
    entry_name: str
    host_path: str
    mount_path: str
    volume_mode: str  # of the PV: Filesystem or Block
    is_block_device: bool  # raw device (Block PV, or a Filesystem PV the kubelet formats)
    capacity_bytes: int
    device: str
    identity: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Exclusion:
    """An entry that was not offered, with a reason an operator can act on."""

    class_name: str
    entry_name: str
    path: str
    reason: Reason
    detail: str


@dataclass(frozen=True)
class HostSnapshot:
    """Everything discovery needs to know about the host, observed at one moment."""

    entries: Mapping[str, Sequence[EntryFacts]]  # by class name
    mounts: Sequence[Mount]
    real_dirs: Mapping[str, str] = field(default_factory=dict)  # class -> resolved mountDir
    dir_errors: Mapping[str, str] = field(default_factory=dict)  # class -> why it was unreadable
    # mount point -> "major:minor" of its source device node, where that differs from the
    # mount's own device number (btrfs shows an anonymous 0:N in mountinfo)
    mount_sources: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Discovery:
    volumes: tuple[Volume, ...]
    exclusions: tuple[Exclusion, ...]


class VolumeState(StrEnum):
    PRESENT = "present"
    GONE = "gone"  # the entry is definitely no longer a volume
    UNKNOWN = "unknown"  # cannot tell now (unreadable dir, hung disk, class not configured)


# Exclusions that mean "the disk is not there": an unmounted directory, a dangling link.
GONE_REASONS = frozenset({Reason.NOT_MOUNT_POINT, Reason.BROKEN_SYMLINK})


class HostView:
    """Answers, for an existing PV's class and path, whether its volume is still on the host.

    Conservative: only an entry missing from a directory that was read, or one that became a
    plain directory or a dangling link, is GONE. Anything uncertain is UNKNOWN, and nothing is
    ever withdrawn on UNKNOWN: a hung disk (`timeout`), an unreadable one, a directory that did
    not answer, a device that cannot be identified.
    """

    def __init__(self, config: Config, host: HostSnapshot, found: Discovery) -> None:
        self._config = config
        self._host = host
        self._volumes = {(v.class_name, v.entry_name): v for v in found.volumes}
        self._excluded = {(e.class_name, e.entry_name): e.reason for e in found.exclusions}
        self._listed = {c: {f.name for f in facts} for c, facts in host.entries.items()}

    def state(self, class_name: str, host_path: str) -> tuple[VolumeState, Mapping[str, str]]:
        cls = self._config.storage_class(class_name)
        if cls is None or class_name in self._host.dir_errors or class_name not in self._listed:
            return VolumeState.UNKNOWN, {}
        parent, entry = posixpath.split(host_path)
        if parent != cls.host_dir or not cls.matches(entry):
            return VolumeState.UNKNOWN, {}
        volume = self._volumes.get((class_name, entry))
        if volume is not None:
            return VolumeState.PRESENT, volume.identity
        reason = self._excluded.get((class_name, entry))
        if reason is not None:
            return (VolumeState.GONE if reason in GONE_REASONS else VolumeState.UNKNOWN), {}
        if entry not in self._listed[class_name]:
            return VolumeState.GONE, {}
        return VolumeState.UNKNOWN, {}


def discover(
    config: Config,
    host: HostSnapshot,
    keep: frozenset[str] = frozenset(),
    dirty: frozenset[str] = frozenset(),
) -> Discovery:
    """Classify every entry of every class, then enforce one disk → one PV across all classes.

    `keep` are the host paths that already have a PV, `dirty` those that hold a former
    tenant's data (cleaned before they are offered again): together, the established volumes.
    When two entries reach one disk, an established one wins, then the first in (class, entry
    name) order: the same host gives the same answer on every pass and restart, and a new alias
    never takes a disk away from its PV. The rules about what a device holds (a partition
    table, a filesystem in a Block class) are about new offers only: a tenant may write those
    on its volume, and it must stay a volume so it is recycled.
    """
    established = keep | dirty
    mounts = host.mounts
    mount_dirs = [host.real_dirs.get(c.name, c.mount_dir) for c in config.classes]
    mounts_at = {m.mount_point: m for m in mounts}  # the last mount on a path is the visible one
    system_devices = {
        mounts_at[p].device: p for p in SYSTEM_MOUNT_POINTS if p in mounts_at
    }
    volumes: list[Volume] = []
    exclusions: list[Exclusion] = []
    claimed: dict[str, list[tuple[str, str]]] = {}  # device -> [(fs root, "class/entry")]

    ordered = sorted(
        ((cls, facts) for cls in config.classes for facts in host.entries.get(cls.name, ())),
        key=lambda cf: (host_path(cf[0], cf[1].name) not in established, cf[0].name,
                        cf[1].name),
    )
    for cls, facts in ordered:
        if not cls.matches(facts.name):
            continue
        outcome = _classify(cls, facts, mounts_at, mounts, system_devices, mount_dirs,
                            host.mount_sources, host_path(cls, facts.name) in established)
        if isinstance(outcome, Exclusion):
            exclusions.append(outcome)
            continue
        volume, fs_root = outcome
        clash = _overlapping_claim(claimed, volume.device, fs_root)
        if clash is not None:
            exclusions.append(_exclude(
                cls, facts, Reason.DUPLICATE,
                f"same disk as {clash} (device {volume.device}); one disk gets one PV"))
            continue
        claimed.setdefault(volume.device, []).append((fs_root, f"{cls.name}/{facts.name}"))
        volumes.append(volume)
    return Discovery(tuple(volumes), tuple(exclusions))


def _classify(  # noqa: PLR0911, PLR0913, PLR0917 - one entry's facts and the host tables it is judged against
    cls: ClassConfig,
    facts: EntryFacts,
    mounts_at: Mapping[str, Mount],
    mounts: Sequence[Mount],
    system_devices: Mapping[str, str],
    mount_dirs: Sequence[str],
    mount_sources: Mapping[str, str],
    established: bool,
) -> Exclusion | tuple[Volume, str]:
    if _has_undecodable_bytes(facts.name):
        return _exclude(cls, facts, Reason.INVALID_NAME,
                        "the name is not valid UTF-8 and cannot be stored in a PV")
    if facts.timed_out:
        return _exclude(cls, facts, Reason.TIMEOUT, facts.error or "the host did not answer")
    if facts.file_type is FileType.UNREADABLE:
        return _exclude(cls, facts, Reason.UNREADABLE, facts.error or "cannot be read")
    if facts.file_type is FileType.BROKEN_LINK:
        return _exclude(cls, facts, Reason.BROKEN_SYMLINK,
                        f"symlink to {facts.target or 'a missing path'} that does not exist")
    if facts.file_type is FileType.OTHER:
        return _exclude(cls, facts, Reason.UNSUPPORTED_TYPE,
                        "neither a directory (mount point) nor a block device")
    if facts.file_type is FileType.DIRECTORY:
        return _classify_directory(cls, facts, mounts_at, system_devices, mount_dirs)
    return _classify_block(cls, facts, mounts, system_devices, mount_dirs, mount_sources,
                           established)


def _classify_directory(  # noqa: PLR0911 - one reason not to offer an entry per return, in order
    cls: ClassConfig,
    facts: EntryFacts,
    mounts_at: Mapping[str, Mount],
    system_devices: Mapping[str, str],
    mount_dirs: Sequence[str],
) -> Exclusion | tuple[Volume, str]:
    real = facts.target or facts.path
    if facts.target is not None and not _inside_any(facts.target, mount_dirs):
        return _exclude(cls, facts, Reason.SYMLINK_ESCAPES,
                        f"symlink leaves the discovery directory to {facts.target}, "
                        "which is not a block device")
    if cls.volume_mode == "Block":
        return _exclude(cls, facts, Reason.WRONG_MODE,
                        f"a directory, but class {cls.name} has volumeMode Block")
    mount = mounts_at.get(real)
    if mount is None:
        hint = (" (created by mkfs: is the discovery directory itself a mounted disk?)"
                if facts.name == "lost+found" else "; mount a disk here to offer it")
        return _exclude(cls, facts, Reason.NOT_MOUNT_POINT, f"a plain directory{hint}")
    if _is_system_filesystem(mount, mounts_at):
        return _exclude(cls, facts, Reason.SYSTEM_FILESYSTEM,
                        f"a {mount.fs_type} mount is a filesystem of the system, not a disk")
    if mount.device in system_devices:
        return _exclude(cls, facts, Reason.SYSTEM_DEVICE,
                        f"filesystem {mount.device} backs the host's "
                        f"{system_devices[mount.device]}")
    if not facts.capacity_bytes:
        return _exclude(cls, facts, Reason.ZERO_CAPACITY, "the filesystem reports no capacity")
    volume = Volume(
        class_name=cls.name,
        entry_name=facts.name,
        host_path=host_path(cls, facts.name),
        mount_path=facts.path,
        volume_mode="Filesystem",
        is_block_device=False,
        capacity_bytes=facts.capacity_bytes,
        device=mount.device,
        identity=dict(facts.identity),
    )
    return volume, mount.root


def _classify_block(  # noqa: PLR0911, PLR0913, PLR0917 - one reason not to offer a device per return, in order; the host tables it needs
    cls: ClassConfig,
    facts: EntryFacts,
    mounts: Sequence[Mount],
    system_devices: Mapping[str, str],
    mount_dirs: Sequence[str],
    mount_sources: Mapping[str, str],
    established: bool,
) -> Exclusion | tuple[Volume, str]:
    device = facts.device or "?"
    family = {device, *facts.partitions}
    system = sorted(family & set(system_devices))
    if system:
        return _exclude(cls, facts, Reason.SYSTEM_DEVICE,
                        f"device {system[0]} backs the host's {system_devices[system[0]]}")
    # A mounted device is never offered raw, whichever class or entry comes first.
    mounted = sorted(m.mount_point for m in mounts
                     if m.device in family or mount_sources.get(m.mount_point) in family)
    elsewhere = [p for p in mounted if not _inside_any(p, mount_dirs)]
    if elsewhere:
        return _exclude(cls, facts, Reason.DEVICE_IN_USE,
                        f"the device is mounted at {elsewhere[0]}")
    if mounted:
        return _exclude(cls, facts, Reason.DUPLICATE,
                        f"the device is mounted at {mounted[0]}, a filesystem entry; "
                        "one disk gets one PV")
    if facts.holders:
        return _exclude(cls, facts, Reason.DEVICE_IN_USE,
                        f"the device is in use by {', '.join(facts.holders)}")
    if facts.partitions:
        return _exclude(cls, facts, Reason.DEVICE_IN_USE,
                        "the device has a partition table; offer a partition instead")
    if not facts.capacity_bytes:
        return _exclude(cls, facts, Reason.ZERO_CAPACITY, "the device reports no size")
    if not established and facts.partition_table:
        return _exclude(cls, facts, Reason.PARTITIONED,
                        f"the device starts with a {facts.partition_table} partition table "
                        "(read from the device: the kernel may not have parsed it); offer a "
                        "partition instead")
    if not established and facts.signatures and cls.volume_mode == "Block":
        return _exclude(cls, facts, Reason.HAS_SIGNATURE,
                        f"the device holds {', '.join(facts.signatures)}; a Block volume is "
                        "offered only when empty (wipe it if its data is not needed, or use a "
                        "Filesystem class)")
    if not identifiable(facts.identity, raw_device=True):
        return _exclude(cls, facts, Reason.NO_IDENTITY,
                        "nothing identifies the device (no WWN, serial, by-id name or loop "
                        "backing file): a different disk here could not be told apart")
    volume = Volume(
        class_name=cls.name,
        entry_name=facts.name,
        host_path=host_path(cls, facts.name),
        mount_path=facts.path,
        volume_mode=cls.volume_mode,
        is_block_device=True,
        capacity_bytes=facts.capacity_bytes,
        device=device,
        identity=dict(facts.identity),
    )
    return volume, "/"


def _is_system_filesystem(mount: Mount, mounts_at: Mapping[str, Mount]) -> bool:
    if mount.fs_type in SYSTEM_FILESYSTEMS:
        return True
    root = mounts_at.get("/")
    return (mount.fs_type == "overlay" and root is not None and root.fs_type == "overlay"
            and root.device == mount.device)


def _overlapping_claim(
    claimed: Mapping[str, Iterable[tuple[str, str]]], device: str, fs_root: str
) -> str | None:
    """Two entries clash when they reach the same data: same device and nested fs subtrees.

    A raw device shares data with every filesystem on it, so its root is `/`: it clashes with
    any mount of that device. Bind mounts of disjoint directories of one filesystem do not.
    """
    for other_root, who in claimed.get(device, ()):
        if _is_within(fs_root, other_root) or _is_within(other_root, fs_root):
            return who
    return None


def host_path(cls: ClassConfig, entry_name: str) -> str:
    """The entry's path on the host: what goes into the PV's `local.path`."""
    return posixpath.join(cls.host_dir, entry_name)


def _exclude(cls: ClassConfig, facts: EntryFacts, reason: Reason, detail: str) -> Exclusion:
    return Exclusion(cls.name, facts.name, facts.path, reason, detail)


def _inside_any(path: str, dirs: Iterable[str]) -> bool:
    return any(_is_within(path, d) and path != d for d in dirs)


def _is_within(path: str, parent: str) -> bool:
    path, parent = posixpath.normpath(path), posixpath.normpath(parent)
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _has_undecodable_bytes(name: str) -> bool:
    return any("\udc80" <= ch <= "\udcff" for ch in name)


def mounts_under(mounts: Iterable[Mount], root: str) -> tuple[str, ...]:
    """Mount points strictly inside `root` (a resolved path): what a clean of `root` leaves
    alone. Compared as strings, as the kernel reports them: `root` is not itself included."""
    prefix = root.rstrip("/") + "/"
    return tuple(m.mount_point for m in mounts
                 if m.mount_point.startswith(prefix) and m.mount_point != prefix)


def parse_mountinfo(text: str) -> list[Mount]:
    """Parse /proc/<pid>/mountinfo (see proc(5)); paths have `\\ooo` octal escapes."""
    mounts = []
    for line in text.splitlines():
        if not line.strip():
            continue
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
            mounts.append(Mount(
                mount_id=int(fields[0]),
                parent_id=int(fields[1]),
                device=fields[2],
                root=unescape_mount_path(fields[3]),
                mount_point=unescape_mount_path(fields[4]),
                options=fields[5],
                fs_type=fields[sep + 1],
                source=unescape_mount_path(fields[sep + 2]) if len(fields) > sep + 2 else "",
            ))
        except (ValueError, IndexError):
            continue  # a line this parser does not understand never hides the others
    return mounts


def unescape_mount_path(field_text: str) -> str:
    """Decode the kernel's octal escapes (`\\040` space, `\\012` newline, `\\134` backslash).

    Bytes are decoded like `os.fsdecode`, so paths compare equal to `os.listdir` names.
    """
    if "\\" not in field_text:
        return field_text
    out = bytearray()
    raw = field_text.encode("utf-8", "surrogateescape")
    i = 0
    while i < len(raw):
        if raw[i] == 0x5C and i + 3 < len(raw) and all(
            0x30 <= b <= 0x37 for b in raw[i + 1:i + 4]
        ):
            out.append(int(raw[i + 1:i + 4], 8))
            i += 4
        else:
            out.append(raw[i])
            i += 1
    return os.fsdecode(bytes(out))
