"""What a device holds, from a few of its bytes: filesystems, containers, partition tables.

Pure: the host adapter reads the byte ranges `regions(size)` names from a device node and hands
them to `probe`; this module only parses them, so every rule is unit-testable from byte images
built in a test. Identities recorded from here must compare equal to what `blkid -p` reports, so
for the types it knows it prints the same TYPE, UUID and PTUUID strings as blkid (upper case
where blkid prints upper case: FAT and NTFS serials).

It leans towards seeing something: a signature with a damaged header (an LVM label with a bad
checksum, a GPT header with a bad CRC) still counts, since the device is then not empty; it only
has no UUID. It knows fewer types than blkid (no ZFS, bcache, ...).
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Mapping
from dataclasses import dataclass

HEAD = 0x11000  # the first 68 KiB: every superblock below, btrfs's at 64 KiB the farthest
TAIL = 4096  # the last 4 KiB: backup GPT headers (512- or 4096-byte sectors)
SECTOR = 512

MD_MAGIC = 0xA92B4EFC
EXT_MAGIC = 0xEF53
F2FS_MAGIC = 0xF2F52010
SWAP_PAGE_SIZES = (4096, 8192, 16384, 32768, 65536)
SWAP_MAGICS = {
    b"SWAPSPACE2": "swap", b"SWAP-SPACE": "swap", b"S1SUSPEND\0": "swsuspend",
    b"S2SUSPEND\0": "swsuspend", b"ULSUSPEND\0": "swsuspend",
    b"\xed\xc3\x02\xe9\x98\x56\xe5\x0c": "swsuspend", b"LINHIB0001": "swsuspend",
}
SWAP_MAGIC_LENGTHS = tuple(sorted({len(m) for m in SWAP_MAGICS}, reverse=True))
# ext feature bits that ext2 and ext3 do not have: anything else makes it ext4 (as blkid says)
EXT3_INCOMPAT = 0x0002 | 0x0004 | 0x0010  # filetype, recover, meta_bg
EXT3_RO_COMPAT = 0x0001 | 0x0002 | 0x0004  # sparse_super, large_file, btree_dir
EXT_HAS_JOURNAL = 0x0004
EXT_JOURNAL_DEV = 0x0008
FAT12_MAX, FAT16_MAX, FAT32_MAX = 0xFF4, 0xFFF4, 0x0FFFFFF6
GPT_PROTECTIVE = 0xEE


@dataclass(frozen=True)
class Signature:
    """One thing found on the device, named as blkid names it."""

    type: str  # blkid's TYPE: ext4, xfs, swap, crypto_LUKS, LVM2_member, linux_raid_member, ...
    uuid: str = ""  # blkid's UUID; "" when there is none (or it is all zeros)
    usage: str = "filesystem"  # blkid's USAGE: filesystem, raid, crypto, other


@dataclass(frozen=True)
class PartitionTable:
    type: str  # blkid's PTTYPE: gpt or dos
    uuid: str = ""  # blkid's PTUUID: the GPT disk GUID, or the MBR disk signature (8 hex digits)


@dataclass(frozen=True)
class Probe:
    """Everything found, outermost first (md, LUKS, LVM before the filesystems)."""

    signatures: tuple[Signature, ...] = ()
    table: PartitionTable | None = None

    @property
    def types(self) -> tuple[str, ...]:
        return tuple(s.type for s in self.signatures)

    def fs_uuid(self, fs_type: str | None = None) -> str:
        """The UUID of the signature of `fs_type` (a mount's type), else of the outermost one."""
        for sig in self.signatures:
            if sig.type == fs_type:
                return sig.uuid
        return self.signatures[0].uuid if self.signatures else ""


def regions(size: int) -> tuple[tuple[int, int], ...]:
    """The (offset, length) byte ranges `probe` looks at, for a device of `size` bytes."""
    wanted = [(0, HEAD), (max(0, size - TAIL), TAIL)]
    wanted += [(off, SECTOR) for off in (_md_090_offset(size), _md_10_offset(size))
               if off is not None]
    return tuple(sorted({(o, min(n, size - o)) for o, n in wanted if 0 <= o < size}))


def probe(chunks: Mapping[int, bytes], size: int) -> Probe:
    """Parse what was read: `chunks` maps each offset of `regions(size)` to the bytes read
    there (a short read near the end is fine)."""
    data = _Bytes(chunks)
    found = [s for s in (_md(data, size), _luks(data), _lvm2(data)) if s is not None]
    found += [s for s in (_swap(data), _xfs(data), _ext(data), _btrfs(data), _f2fs(data),
                          _ntfs(data), _exfat(data), _vfat(data), _iso9660(data))
              if s is not None]
    table = _gpt(data, size)
    if table is None and not any(s.type in ("vfat", "ntfs", "exfat") for s in found):
        table = _dos(data)
    return Probe(tuple(found), table)


def probe_image(image: bytes) -> Probe:
    """`probe` over a whole device image held in memory (tests, small images)."""
    return probe({o: image[o:o + n] for o, n in regions(len(image))}, len(image))


class _Bytes:
    """The chunks read, looked up by absolute offset."""

    def __init__(self, chunks: Mapping[int, bytes]) -> None:
        self._chunks = sorted(chunks.items())
        self._head = chunks.get(0, b"")  # where nearly every look falls: no search for it

    def get(self, offset: int, length: int) -> bytes | None:
        if offset >= 0 and offset + length <= len(self._head):
            return self._head[offset:offset + length]
        for start, buf in self._chunks:
            if start <= offset and offset + length <= start + len(buf):
                return buf[offset - start:offset - start + length]
        return None

    def eq(self, offset: int, magic: bytes) -> bool:
        return self.get(offset, len(magic)) == magic

    def u16(self, offset: int) -> int | None:
        buf = self.get(offset, 2)
        return None if buf is None else int(struct.unpack("<H", buf)[0])

    def u32(self, offset: int) -> int | None:
        buf = self.get(offset, 4)
        return None if buf is None else int(struct.unpack("<I", buf)[0])

    def u64(self, offset: int) -> int | None:
        buf = self.get(offset, 8)
        return None if buf is None else int(struct.unpack("<Q", buf)[0])


def format_uuid(raw: bytes) -> str:
    """16 bytes as blkid prints a UUID: lower case 8-4-4-4-12; "" for all zeros."""
    if len(raw) != 16 or not any(raw):
        return ""
    h = raw.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def format_guid(raw: bytes) -> str:
    """A GPT GUID: its first three fields are little-endian on disk."""
    if len(raw) != 16:
        return ""
    return format_uuid(raw[3::-1] + raw[5:3:-1] + raw[7:5:-1] + raw[8:])


def _serial4(raw: bytes) -> str:
    """A FAT or exFAT volume serial, as blkid prints it: `ABCD-1234`."""
    return "" if not any(raw) else f"{raw[3]:02X}{raw[2]:02X}-{raw[1]:02X}{raw[0]:02X}"


def _md_10_offset(size: int) -> int | None:
    """md metadata 1.0 sits 8 to 12 KiB from the end, 4 KiB aligned."""
    sectors = ((size >> 9) - 16) & ~7
    return sectors << 9 if sectors > 0 else None


def _md_090_offset(size: int) -> int | None:
    """md metadata 0.90 sits in the last 64 KiB-aligned 64 KiB of the device."""
    sectors = ((size >> 9) & ~127) - 128
    return sectors << 9 if sectors > 0 else None


def _md(data: _Bytes, size: int) -> Signature | None:
    for off, version in ((0, 1), (4096, 1), (_md_10_offset(size), 1), (_md_090_offset(size), 0)):
        if off is None or data.u32(off) != MD_MAGIC or data.u32(off + 4) != version:
            continue
        if version == 1:
            raw = data.get(off + 16, 16)
        else:  # 0.90: set_uuid0 at 20, set_uuid1..3 at 52
            head, tail = data.get(off + 20, 4), data.get(off + 52, 12)
            raw = head + tail if head is not None and tail is not None else None
        return Signature("linux_raid_member", format_uuid(raw or b""), "raid")
    return None


def _luks(data: _Bytes) -> Signature | None:
    if not data.eq(0, b"LUKS\xba\xbe"):
        return None
    raw = data.get(168, 40) or b""
    uuid = raw.split(b"\0", 1)[0].decode("ascii", "replace")
    return Signature("crypto_LUKS", uuid, "crypto")


def _lvm2(data: _Bytes) -> Signature | None:
    for sector in range(4):
        label = sector * SECTOR
        if data.eq(label, b"LABELONE") and data.eq(label + 24, b"LVM2 001"):
            raw = (data.get(label + 32, 32) or b"").decode("ascii", "replace")
            uuid = "-".join((raw[:6], raw[6:10], raw[10:14], raw[14:18], raw[18:22],
                             raw[22:26], raw[26:])) if len(raw) == 32 else ""
            return Signature("LVM2_member", uuid, "raid")
    return None


def _swap(data: _Bytes) -> Signature | None:
    for page in SWAP_PAGE_SIZES:
        for length in SWAP_MAGIC_LENGTHS:  # one look per page and length, not per magic
            magic = data.get(page - 10, length)
            kind = SWAP_MAGICS.get(magic) if magic is not None else None
            if kind is not None:
                uuid = "" if magic == b"SWAP-SPACE" else format_uuid(data.get(1036, 16) or b"")
                return Signature(kind, uuid, "other")
    return None


def _xfs(data: _Bytes) -> Signature | None:
    if not data.eq(0, b"XFSB"):
        return None
    return Signature("xfs", format_uuid(data.get(32, 16) or b""))


def _ext(data: _Bytes) -> Signature | None:
    sb = 1024
    if data.u16(sb + 0x38) != EXT_MAGIC:
        return None
    compat = data.u32(sb + 0x5C) or 0
    incompat = data.u32(sb + 0x60) or 0
    ro_compat = data.u32(sb + 0x64) or 0
    if incompat & EXT_JOURNAL_DEV:
        kind = "jbd"
    elif incompat & ~EXT3_INCOMPAT or ro_compat & ~EXT3_RO_COMPAT:
        kind = "ext4"
    elif compat & EXT_HAS_JOURNAL:
        kind = "ext3"
    else:
        kind = "ext2"
    return Signature(kind, format_uuid(data.get(sb + 0x68, 16) or b""),
                     "other" if kind == "jbd" else "filesystem")


def _btrfs(data: _Bytes) -> Signature | None:
    if not data.eq(0x10040, b"_BHRfS_M"):
        return None
    return Signature("btrfs", format_uuid(data.get(0x10020, 16) or b""))


def _f2fs(data: _Bytes) -> Signature | None:
    if data.u32(1024) != F2FS_MAGIC:
        return None
    return Signature("f2fs", format_uuid(data.get(1024 + 0x6C, 16) or b""))


def _ntfs(data: _Bytes) -> Signature | None:
    if not data.eq(3, b"NTFS    "):
        return None
    serial = data.u64(0x48) or 0
    return Signature("ntfs", f"{serial:016X}" if serial else "")


def _exfat(data: _Bytes) -> Signature | None:
    if not data.eq(3, b"EXFAT   "):
        return None
    return Signature("exfat", _serial4(data.get(0x64, 4) or b""))


def _vfat(data: _Bytes) -> Signature | None:  # noqa: PLR0911 - blkid's rules, one per return
    """A FAT boot sector, by blkid's rules: a magic string, or failing that a jump instruction
    or 55AA plus a boot parameter block that adds up."""
    boot = data.get(0, SECTOR)
    if boot is None:
        return None
    strong = (boot[0x52:0x57] == b"MSWIN" or boot[0x52:0x5A] == b"FAT32   "
              or boot[0x36:0x3B] == b"MSDOS"
              or boot[0x36:0x3E] in (b"FAT16   ", b"FAT12   ", b"FAT     "))
    if not strong:
        if boot[0] not in (0xEB, 0xE9) and boot[510:512] != b"\x55\xaa":
            return None
        if boot[510:512] != b"\x55\xaa" or boot[0x36:0x3E] in (b"JFS     ", b"HPFS    "):
            return None
    (sector_size, cluster_size, reserved, fats, dir_entries, sectors16, media, fat16_length,
     ) = struct.unpack_from("<HBHBHHBH", boot, 0x0B)
    total32, fat32_length = struct.unpack_from("<II", boot, 0x20)
    if not fats or not reserved or not (media >= 0xF8 or media == 0xF0):
        return None
    if not _power_of_two(cluster_size) or not _power_of_two(sector_size) \
            or not SECTOR <= sector_size <= 4096:
        return None
    sectors = sectors16 or total32
    fat_size = (fat16_length or fat32_length) * fats
    dir_size = (dir_entries * 32 + sector_size - 1) // sector_size
    clusters = (sectors - (reserved + fat_size + dir_size)) // cluster_size
    if fat16_length == 0 and fat32_length:
        most = FAT32_MAX
    else:
        most = FAT16_MAX if clusters > FAT12_MAX else FAT12_MAX
    if clusters < 0 or clusters > most:
        return None
    if fat16_length:
        serial = boot[0x27:0x2B]
    elif fat32_length:
        serial = boot[0x43:0x47]
    else:
        serial = b""
    return Signature("vfat", _serial4(serial))


def _power_of_two(n: int) -> bool:
    return n > 0 and n & (n - 1) == 0


def _iso9660(data: _Bytes) -> Signature | None:
    pvd = 0x8000
    if not data.eq(pvd + 1, b"CD001"):
        return None
    uuid = ""
    for date_at in (pvd + 830, pvd + 813):  # modified, else created (as blkid)
        date = data.get(date_at, 17)
        if date is None:
            continue
        digits, tz = date[:16], date[16]
        if digits == b"0" * 16 and tz == 0:
            continue  # unset
        if any(digits):
            text = digits.decode("ascii", "replace")
            uuid = "-".join((text[:4], text[4:6], text[6:8], text[8:10], text[10:12],
                             text[12:14], text[14:16]))
        break
    return Signature("iso9660", uuid)


def _gpt(data: _Bytes, size: int) -> PartitionTable | None:
    """A GPT header at LBA 1 (512- or 4096-byte sectors), else a backup one at the last LBA.
    The magic alone makes it a GPT; the disk GUID counts only from a header whose CRC holds."""
    seen = False
    for off in (512, 4096, size - 512, size - 4096):
        if off <= 0 or not data.eq(off, b"EFI PART"):
            continue
        seen = True
        header_size = data.u32(off + 12) or 0
        header = data.get(off, header_size) if 92 <= header_size <= 4096 else None
        if header is None:
            continue
        stored = struct.unpack_from("<I", header, 16)[0]
        if zlib.crc32(header[:16] + b"\0\0\0\0" + header[20:]) == stored:
            return PartitionTable("gpt", format_guid(header[56:72]))
    return PartitionTable("gpt") if seen else None


def _dos(data: _Bytes) -> PartitionTable | None:
    """An MBR: 55AA, four entries with valid boot flags, at least one of them used. Checked only
    when the sector is not a FAT/NTFS/exFAT boot sector, which ends in 55AA too."""
    mbr = data.get(0, SECTOR)
    if mbr is None or mbr[510:512] != b"\x55\xaa":
        return None
    entries = [mbr[446 + 16 * i:446 + 16 * (i + 1)] for i in range(4)]
    if any(e[0] not in (0x00, 0x80) for e in entries):
        return None
    if not any(e[4] or any(e[8:16]) for e in entries):
        return None
    disk_id = struct.unpack_from("<I", mbr, 440)[0]
    return PartitionTable("dos", f"{disk_id:08x}" if disk_id else "")
