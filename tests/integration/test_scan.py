"""`localpv-agent scan` on real mounts, loop devices and hostile entry names (needs root)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from agent.volumes import pv_name
from devkit.disks import can_make_disks, disks, sh
from tests.conftest import require

NODE, UID = "node-a", "0f0e-uid"
EXCLUDED_LINE = re.compile(r"^excluded: (.+?) \(.*\): ([a-z_]+): .+$")


@dataclass
class Host:
    fs_dir: Path
    raw_dir: Path
    config: Path
    ext4_dev: str
    xfs_dev: str
    raw_dev: str


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    ok, why = can_make_disks()
    require(ok, why)
    work = tmp_path_factory.mktemp("scan")
    fs_dir, raw_dir = work / "disks", work / "raw"
    fs_dir.mkdir()
    raw_dir.mkdir()
    with disks(work) as d:
        ext4 = d.loop("ext4", fs="ext4")
        xfs = d.loop("xfs", size_mib=320, fs="xfs")
        shared = d.loop("shared", fs="ext4")
        raw = d.loop("raw", size_mib=12)
        d.mount(ext4, fs_dir / "ext4disk")
        d.mount(xfs, fs_dir / "xfs disk")
        d.tmpfs(fs_dir / "ünïcode", size_mib=20)
        d.tmpfs(fs_dir / "new\nline", size_mib=1)
        d.mount(shared, fs_dir / "shared-a")
        d.mount(shared, fs_dir / "shared-b")  # the same disk under two entries
        (fs_dir / "plain").mkdir()
        (fs_dir / "lost+found").mkdir()
        (fs_dir / "stray.txt").write_text("not a disk")
        (fs_dir / "broken").symlink_to(work / "nowhere")
        (fs_dir / "to-root").symlink_to("/")
        (raw_dir / "by-id-link").symlink_to(raw)
        (raw_dir / "mounted-link").symlink_to(ext4)  # raw view of a disk offered as fs
        (raw_dir / "a-directory").mkdir()
        config = work / "config.yaml"
        config.write_text(yaml.safe_dump({"storageClassMap": {
            "local-storage": {"hostDir": "/mnt/disks", "mountDir": str(fs_dir)},
            "local-block": {"hostDir": "/mnt/raw", "mountDir": str(raw_dir),
                            "volumeMode": "Block"},
        }}))
        yield Host(fs_dir, raw_dir, config, ext4, xfs, raw)


def scan(host: Host, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "scan", "--config", str(host.config),
         "--node-name", NODE, "--node-uid", UID, *args],
        capture_output=True, text=True, check=False, timeout=60,
    )


def by_path(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {pv["spec"]["local"]["path"]: pv for pv in items}


def test_volumes_field_by_field(host: Host) -> None:
    result = scan(host, "-o", "json")
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    assert (listing["apiVersion"], listing["kind"]) == ("v1", "List")
    pvs = by_path(listing["items"])
    assert sorted(pvs) == sorted([
        "/mnt/disks/ext4disk", "/mnt/disks/xfs disk", "/mnt/disks/ünïcode",
        "/mnt/disks/new\nline", "/mnt/disks/shared-a", "/mnt/raw/by-id-link",
    ])

    ext4 = pvs["/mnt/disks/ext4disk"]
    assert ext4["metadata"]["name"] == pv_name("ext4disk", NODE, "local-storage")
    statvfs = os.statvfs(host.fs_dir / "ext4disk")
    expected = statvfs.f_blocks * statvfs.f_frsize // (1 << 20)
    assert ext4["spec"]["capacity"]["storage"] == f"{expected}Mi"
    assert ext4["spec"]["volumeMode"] == "Filesystem"
    assert ext4["spec"]["storageClassName"] == "local-storage"
    assert ext4["spec"]["persistentVolumeReclaimPolicy"] == "Delete"
    assert ext4["metadata"]["annotations"] == {
        "pv.kubernetes.io/provisioned-by": f"local-volume-provisioner-{NODE}-{UID}",
        "localpv-agent.io/fs-uuid": sh("blkid", "-p", "-s", "UUID", "-o", "value",
                                       host.ext4_dev),
    }
    assert ext4["metadata"]["labels"]["kubernetes.io/hostname"] == NODE
    assert ext4["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"] == [
        {"matchExpressions": [{"key": "kubernetes.io/hostname", "operator": "In",
                               "values": [NODE]}]}]

    assert pvs["/mnt/disks/ünïcode"]["spec"]["capacity"]["storage"] == "20Mi"
    assert pvs["/mnt/disks/new\nline"]["spec"]["capacity"]["storage"] == "1Mi"  # canonical form

    block = pvs["/mnt/raw/by-id-link"]
    assert block["spec"]["volumeMode"] == "Block"
    assert block["spec"]["capacity"]["storage"] == "12Mi"
    assert block["metadata"]["name"] == pv_name("by-id-link", NODE, "local-block")


def test_excluded_entries_have_reasons(host: Host) -> None:
    result = scan(host, "-o", "yaml")
    assert result.returncode == 0
    reasons = {
        m[1]: m[2] for m in map(EXCLUDED_LINE.match, result.stderr.splitlines()) if m
    }
    assert reasons == {
        "local-storage/plain": "not_mount_point",
        "local-storage/lost+found": "not_mount_point",
        "local-storage/stray.txt": "unsupported_type",
        "local-storage/broken": "broken_symlink",
        "local-storage/to-root": "symlink_escapes",
        "local-storage/shared-b": "duplicate",
        "local-block/mounted-link": "duplicate",  # mounted as ext4disk
        "local-block/a-directory": "wrong_mode",
    }
    assert "same disk as local-storage/shared-a" in result.stderr


def test_yaml_has_one_document_per_pv_and_validates(host: Host) -> None:
    result = scan(host, "-o", "yaml")
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert len(docs) == 6
    for doc in docs:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_table_lists_volumes_then_exclusions(host: Host) -> None:
    result = scan(host, "-o", "table")
    assert result.returncode == 0
    lines = result.stdout.splitlines()
    assert lines[0].split()[:5] == ["NAME", "CLASS", "MODE", "CAPACITY", "PATH"]
    assert len(lines) == 1 + 6 + 8
    assert any("/mnt/disks/new\\nline" in ln for ln in lines)  # one row, escaped
    assert all(ln.startswith("(excluded)") for ln in lines[7:])
    assert any("not_mount_point" in ln and "lost+found" in ln for ln in lines)


def test_unreadable_discovery_dir_exits_non_zero(host: Host, tmp_path: Path) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"storageClassMap": {
        "local-storage": {"hostDir": "/mnt/disks", "mountDir": str(host.fs_dir)},
        "gone": {"hostDir": "/mnt/gone", "mountDir": str(tmp_path / "missing")},
    }}))
    result = subprocess.run(
        [sys.executable, "-m", "agent.cli", "scan", "--config", str(config), "--node-name", NODE],
        capture_output=True, text=True, check=False, timeout=60,
    )
    assert result.returncode == 1
    assert "class gone: cannot read" in result.stderr
    assert len([d for d in yaml.safe_load_all(result.stdout) if d]) == 5  # the others still work
