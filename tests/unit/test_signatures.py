"""Signatures parsed from device images built here, byte by byte, formatted as blkid prints."""

from __future__ import annotations

import struct
import uuid
import zlib

import pytest

from agent.signatures import (
    HEAD,
    PartitionTable,
    Probe,
    Signature,
    format_guid,
    format_uuid,
    probe,
    probe_image,
    regions,
)

U = uuid.UUID("0f1e2d3c-4b5a-6978-8796-a5b4c3d2e1f0")
MIB = 1 << 20


def image(size: int = 4 * MIB, **at: bytes) -> bytearray:
    """A zeroed image with byte strings put at offsets (`at_1024=b"..."`)."""
    img = bytearray(size)
    for key, data in at.items():
        off = int(key.removeprefix("at_"))
        img[off:off + len(data)] = data
    return img


def put(img: bytearray, offset: int, data: bytes) -> bytearray:
    img[offset:offset + len(data)] = data
    return img


def ext(compat: int = 0, incompat: int = 0, ro_compat: int = 0) -> bytearray:
    img = image()
    sb = 1024
    put(img, sb + 0x38, struct.pack("<H", 0xEF53))
    put(img, sb + 0x5C, struct.pack("<III", compat, incompat, ro_compat))
    return put(img, sb + 0x68, U.bytes)


@pytest.mark.parametrize(("img", "expected"), [
    (ext(), "ext2"),
    (ext(compat=0x4, incompat=0x2, ro_compat=0x3), "ext3"),
    (ext(compat=0x4, incompat=0x2 | 0x40 | 0x200, ro_compat=0x3), "ext4"),  # extents, flex_bg
    (ext(incompat=0x40), "ext4"),  # ext4 without a journal
    (ext(incompat=0x8), "jbd"),
])
def test_ext_family(img: bytearray, expected: str) -> None:
    (sig,) = probe_image(bytes(img)).signatures
    assert (sig.type, sig.uuid) == (expected, str(U))


@pytest.mark.parametrize(("img", "expected"), [
    (image(at_0=b"XFSB", at_32=U.bytes), Signature("xfs", str(U))),
    (image(at_65600=b"_BHRfS_M", at_65568=U.bytes), Signature("btrfs", str(U))),
    (image(at_1024=struct.pack("<I", 0xF2F52010), at_1132=U.bytes), Signature("f2fs", str(U))),
    (image(at_3=b"NTFS    ", at_72=struct.pack("<Q", 0x1A2B3C4D5E6F7081)),
     Signature("ntfs", "1A2B3C4D5E6F7081")),
    (image(at_3=b"EXFAT   ", at_100=bytes([0xEF, 0xCD, 0xAB, 0x89])),
     Signature("exfat", "89AB-CDEF")),
    (image(at_4086=b"SWAPSPACE2", at_1024=struct.pack("<I", 1), at_1036=U.bytes),
     Signature("swap", str(U), "other")),
    (image(at_65526=b"SWAPSPACE2", at_1036=U.bytes), Signature("swap", str(U), "other")),
    (image(at_4086=b"SWAP-SPACE"), Signature("swap", "", "other")),
    (image(at_4086=b"S1SUSPEND\0", at_1036=U.bytes), Signature("swsuspend", str(U), "other")),
    (image(at_0=b"LUKS\xba\xbe\x00\x02", at_168=str(U).encode() + b"\0"),
     Signature("crypto_LUKS", str(U), "crypto")),
    (image(at_512=b"LABELONE", at_536=b"LVM2 001",
           at_544=b"AbCdEf0123456789GhIjKlMnOpQrStUv"),
     Signature("LVM2_member", "AbCdEf-0123-4567-89Gh-IjKl-MnOp-QrStUv", "raid")),
    (image(at_4096=struct.pack("<II", 0xA92B4EFC, 1), at_4112=U.bytes),  # md 1.2
     Signature("linux_raid_member", str(U), "raid")),
    (image(at_0=struct.pack("<II", 0xA92B4EFC, 1), at_16=U.bytes),  # md 1.1
     Signature("linux_raid_member", str(U), "raid")),
])
def test_signature_types_and_uuids(img: bytearray, expected: Signature) -> None:
    assert probe_image(bytes(img)) == Probe((expected,))


def test_md_superblocks_at_the_end_of_the_device() -> None:
    size = 4 * MIB + 12345  # not aligned: both formats round down
    v10 = (((size >> 9) - 16) & ~7) << 9
    img = image(size)
    put(img, v10, struct.pack("<II", 0xA92B4EFC, 1) + bytes(8) + U.bytes)
    assert probe_image(bytes(img)).signatures == (
        Signature("linux_raid_member", str(U), "raid"),)
    v090 = (((size >> 9) & ~127) - 128) << 9
    img = image(size)
    put(img, v090, struct.pack("<II", 0xA92B4EFC, 0))
    put(img, v090 + 20, U.bytes[:4])
    put(img, v090 + 52, U.bytes[4:])
    assert probe_image(bytes(img)).fs_uuid() == str(U)


def iso(modified: bytes, created: bytes = b"2001020304050600") -> bytearray:
    img = image(at_32769=b"CD001")
    put(img, 0x8000 + 813, created + b"\x00")
    return put(img, 0x8000 + 830, modified + b"\x00")


def test_iso9660_uuid_is_its_modification_date_else_its_creation_date() -> None:
    assert probe_image(bytes(iso(b"2024011512345678"))).fs_uuid() == "2024-01-15-12-34-56-78"
    assert probe_image(bytes(iso(b"0" * 16))).fs_uuid() == "2001-02-03-04-05-06-00"


def fat_boot(fat32: bool, serial: bytes = bytes([0x78, 0x56, 0x34, 0x12])) -> bytearray:
    """A boot sector as mkfs.fat writes it for a 64 MiB volume."""
    img = image(64 * MIB)
    put(img, 0, b"\xeb\x58\x90mkfs.fat")
    sectors = (64 * MIB) // 512
    if fat32:
        put(img, 0x0B, struct.pack("<HBHBHHBH", 512, 1, 32, 2, 0, 0, 0xF8, 0))
        put(img, 0x20, struct.pack("<II", sectors, 1009))
        put(img, 0x43, serial)
        put(img, 0x52, b"FAT32   ")
    else:
        put(img, 0x0B, struct.pack("<HBHBHHBH", 512, 4, 4, 2, 512, 0, 0xF8, 128))
        put(img, 0x20, struct.pack("<I", sectors))
        put(img, 0x27, serial)
        put(img, 0x36, b"FAT16   ")
    return put(img, 510, b"\x55\xaa")


@pytest.mark.parametrize("fat32", [True, False])
def test_fat_serial_and_no_partition_table_from_its_boot_sector(fat32: bool) -> None:
    found = probe_image(bytes(fat_boot(fat32)))
    assert found == Probe((Signature("vfat", "1234-5678"),))


def test_fat_without_a_magic_string_is_recognised_by_its_parameters() -> None:
    img = fat_boot(False)
    put(img, 0x36, b"\0" * 8)
    assert probe_image(bytes(img)).types == ("vfat",)
    put(img, 0x15, b"\x12")  # not a media descriptor: it is no FAT
    assert probe_image(bytes(img)).types == ()


def mbr(disk_id: int, entries: list[bytes], size: int = 4 * MIB) -> bytearray:
    img = image(size)
    put(img, 440, struct.pack("<I", disk_id))
    for i, entry in enumerate(entries):
        put(img, 446 + 16 * i, entry)
    return put(img, 510, b"\x55\xaa")


def entry(boot: int, kind: int, start: int, sectors: int) -> bytes:
    return struct.pack("<B3sB3sII", boot, b"\0\0\0", kind, b"\0\0\0", start, sectors)


def test_mbr_disk_signature_as_blkid_prints_it() -> None:
    found = probe_image(bytes(mbr(0x6B01ACE4, [entry(0x80, 0x83, 2048, 20480)])))
    assert found == Probe((), PartitionTable("dos", "6b01ace4"))
    assert probe_image(bytes(mbr(0, [entry(0, 0x83, 2048, 1)]))).table == PartitionTable("dos")


@pytest.mark.parametrize("entries", [
    [],  # 55AA but no partition
    [entry(0x12, 0x83, 2048, 20480)],  # not a boot flag: boot code, not a table
])
def test_not_an_mbr(entries: list[bytes]) -> None:
    assert probe_image(bytes(mbr(0x1234, entries))).table is None


def gpt_header(guid: uuid.UUID, my_lba: int, crc_ok: bool = True) -> bytes:
    header = bytearray(92)
    header[0:8] = b"EFI PART"
    struct.pack_into("<IIIIQQQQ", header, 8, 0x10000, 92, 0, 0, my_lba, 0, 34, 0)
    header[56:72] = guid.bytes_le
    crc = zlib.crc32(bytes(header))
    struct.pack_into("<I", header, 16, crc if crc_ok else crc ^ 1)
    return bytes(header)


def test_gpt_disk_guid_is_mixed_endian_on_disk() -> None:
    img = mbr(0, [entry(0, 0xEE, 1, 0xFFFFFFFF)])
    put(img, 512, gpt_header(U, 1))
    assert probe_image(bytes(img)) == Probe((), PartitionTable("gpt", str(U)))
    assert format_guid(U.bytes_le) == str(U)


def test_gpt_with_4k_sectors_backup_header_or_bad_crc() -> None:
    size = 4 * MIB
    four_k = put(image(size), 4096, gpt_header(U, 1))
    assert probe_image(bytes(four_k)).table == PartitionTable("gpt", str(U))
    backup_only = put(image(size), size - 512, gpt_header(U, size // 512 - 1))
    assert probe_image(bytes(backup_only)).table == PartitionTable("gpt", str(U))
    damaged = put(image(size), 512, gpt_header(U, 1, crc_ok=False))
    assert probe_image(bytes(damaged)).table == PartitionTable("gpt")  # still partitioned


def test_an_empty_or_tiny_device_holds_nothing() -> None:
    assert probe_image(bytes(4 * MIB)) == Probe()
    assert probe_image(b"") == Probe()
    assert probe_image(b"XFSB" + bytes(100)).types == ("xfs",)  # uuid beyond the end: none
    assert probe_image(b"XFSB" + bytes(100)).fs_uuid() == ""


def test_outermost_first_and_the_uuid_of_a_mounts_type() -> None:
    img = ext()
    put(img, 4096, struct.pack("<II", 0xA92B4EFC, 1))  # an md member with a stale ext4 inside
    found = probe_image(bytes(img))
    assert found.types == ("linux_raid_member", "ext2")
    assert found.fs_uuid() == ""  # the md superblock's (all zeros here)
    assert found.fs_uuid("ext2") == str(U)


def test_regions_cover_head_tail_and_md_superblocks() -> None:
    size = 1 << 30
    got = regions(size)
    assert (0, HEAD) in got and (size - 4096, 4096) in got
    assert all(off >= 0 and off + n <= size for off, n in got)
    assert regions(0) == ()
    assert regions(1000) == ((0, 1000),)


def test_probe_takes_only_what_was_read() -> None:
    """A short read near the end (or a region not read) is no signature, never an error."""
    assert probe({0: b"XFSB"}, 1 << 30) == Probe((Signature("xfs", ""),))
    assert probe({}, 1 << 30) == Probe()


def test_format_uuid() -> None:
    assert format_uuid(U.bytes) == str(U)
    assert format_uuid(bytes(16)) == ""
    assert format_uuid(b"short") == ""
