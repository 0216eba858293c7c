"""PV names, capacity rounding and the manifest: the upstream provisioner's test vectors."""

from __future__ import annotations

import pytest

from agent.config import parse_config
from agent.discovery import Volume
from agent.volumes import (
    ClassPolicy,
    GiB,
    MiB,
    NodeInfo,
    format_quantity,
    pv_manifest,
    pv_name,
    round_capacity,
)

TiB = 1 << 40


@pytest.mark.parametrize(("entry", "node", "cls", "name"), [
    ("mount1", "test-node", "sc1", "local-pv-aaaafef5"),
    ("symlink2", "test-node", "sc1", "local-pv-23645a36"),
    ("symlink1", "test-node", "sc2", "local-pv-55d5adba"),
    ("mount2", "test-node", "sc1", "local-pv-79412c38"),
])
def test_pv_name_vectors(entry: str, node: str, cls: str, name: str) -> None:
    assert pv_name(entry, node, cls) == name


@pytest.mark.parametrize(("size", "rounded", "quantity"), [
    (13 * GiB - 1, 12 * GiB, "12Gi"),
    (10000 * MiB - 1, 9999 * MiB, "9999Mi"),
    (3 * TiB + 2 * GiB + MiB, 3 * TiB + 2 * GiB, "3074Gi"),
    (12345, 12345, "12345"),
    (10 * GiB, 10 * GiB, "10Gi"),
    (10 * MiB, 10 * MiB, "10Mi"),
    (10 * MiB - 1, 10 * MiB - 1, "10485759"),
    (4 * TiB, 4 * TiB, "4Ti"),
])
def test_capacity_rounding_vectors(size: int, rounded: int, quantity: str) -> None:
    assert round_capacity(size) == rounded
    assert format_quantity(rounded) == quantity


CONFIG = parse_config({
    "storageClassMap": {
        "sc1": {"hostDir": "/mnt/disks", "mountDir": "/host/disks", "fsType": "ext4",
                "selector": [{"matchExpressions": [
                    {"key": "pool", "operator": "In", "values": ["a"]}]}]},
        "raw": {"hostDir": "/mnt/raw", "volumeMode": "Block", "accessMode": "ReadWriteOncePod"},
    },
    "nodeLabelsForPV": ["topology.kubernetes.io/zone", "absent-label"],
    "labelsForPV": {"team": "storage"},
})
NODE = NodeInfo(name="test-node", uid="1234-uid", hostname="test-host",
                labels={"topology.kubernetes.io/zone": "z1"})
FS_VOLUME = Volume(
    class_name="sc1", entry_name="mount1", host_path="/mnt/disks/mount1",
    mount_path="/host/disks/mount1", volume_mode="Filesystem", is_block_device=False,
    capacity_bytes=13 * GiB - 1, device="7:0", identity={"fs-uuid": "abc", "wwn": ""},
)


def test_filesystem_manifest() -> None:
    pv = pv_manifest(FS_VOLUME, NODE, CONFIG,
                     ClassPolicy(reclaim_policy="Retain", mount_options=("noatime",)))
    assert pv == {
        "apiVersion": "v1",
        "kind": "PersistentVolume",
        "metadata": {
            "name": "local-pv-aaaafef5",
            "labels": {
                "kubernetes.io/hostname": "test-host",
                "app.kubernetes.io/managed-by": "localpv-agent",
                "topology.kubernetes.io/zone": "z1",
                "team": "storage",
            },
            "annotations": {
                "pv.kubernetes.io/provisioned-by": "local-volume-provisioner-test-node-1234-uid",
                "localpv-agent.io/fs-uuid": "abc",
            },
        },
        "spec": {
            "capacity": {"storage": "12Gi"},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "storageClassName": "sc1",
            "volumeMode": "Filesystem",
            "local": {"path": "/mnt/disks/mount1", "fsType": "ext4"},
            "mountOptions": ["noatime"],
            "nodeAffinity": {"required": {"nodeSelectorTerms": [
                {"matchExpressions": [
                    {"key": "kubernetes.io/hostname", "operator": "In", "values": ["test-host"]}]},
                {"matchExpressions": [{"key": "pool", "operator": "In", "values": ["a"]}]},
            ]}},
        },
    }


def test_block_manifest_uses_link_path_and_class_mode() -> None:
    volume = Volume(
        class_name="raw", entry_name="symlink1", host_path="/mnt/raw/symlink1",
        mount_path="/mnt/raw/symlink1", volume_mode="Block", is_block_device=True,
        capacity_bytes=12345, device="7:3", identity={"wwn": "0x5000", "serial": "S1"},
    )
    pv = pv_manifest(volume, NODE, CONFIG)
    assert pv["metadata"]["name"] == pv_name("symlink1", "test-node", "raw")
    assert pv["spec"]["volumeMode"] == "Block"
    assert pv["spec"]["local"] == {"path": "/mnt/raw/symlink1"}
    assert pv["spec"]["accessModes"] == ["ReadWriteOncePod"]
    assert pv["spec"]["persistentVolumeReclaimPolicy"] == "Delete"
    assert "mountOptions" not in pv["spec"]
    assert pv["metadata"]["annotations"]["localpv-agent.io/wwn"] == "0x5000"
    assert pv["metadata"]["annotations"]["localpv-agent.io/serial"] == "S1"


def test_node_name_only_and_owner_reference() -> None:
    config = parse_config({"storageClassMap": {"sc1": {"hostDir": "/mnt/disks"}},
                           "useNodeNameOnly": True, "setPVOwnerRef": True})
    pv = pv_manifest(FS_VOLUME, NODE, config)
    assert pv["metadata"]["annotations"]["pv.kubernetes.io/provisioned-by"] == \
        "local-volume-provisioner-test-node"
    assert pv["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Node", "name": "test-node", "uid": "1234-uid"}]
    with pytest.raises(ValueError, match="UID"):
        pv_manifest(FS_VOLUME, NodeInfo(name="n"), config)


def test_hostname_defaults_to_label_then_name() -> None:
    assert NodeInfo(name="n1").hostname_label == "n1"
    assert NodeInfo(name="n1", labels={"kubernetes.io/hostname": "h1"}).hostname_label == "h1"
