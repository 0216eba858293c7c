"""Event-driven discovery and disks that go away, on real mounts, loop devices and udevd.

Every agent here runs with a resync period of an hour, so anything it does within the test's
timeouts was triggered by a wake-up source (udev, the mount table, inotify), not by a resync.
"""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.volumes import pv_name
from devkit.agents import (
    Agent,
    bind_claim,
    events_for,
    fs_and_block_dirs,
    node_for_test,
    pvs_of,
    wait_events,
    wait_for,
)
from devkit.controlplane import ControlPlane
from devkit.disks import Disks, disks, sh
from devkit.udevd import Udevd, settle, trigger_block_changes

FS, BLOCK = "local-storage", "local-block"
REACT = 60.0  # seconds: generous for a loaded CI machine, far below the hour-long resync


@dataclass
class Node:
    name: str
    fs_dir: Path
    block_dir: Path
    disks: Disks
    agent: Agent
    cluster: ControlPlane

    def pv(self, entry: str, cls: str = FS) -> dict[str, Any] | None:
        name = pv_name(entry, self.name, cls)
        return next((p for p in pvs_of(self.cluster, self.name)
                     if p["metadata"]["name"] == name), None)


@pytest.fixture
def node(cluster: ControlPlane, agent_kubeconfig: Path, udevd: Udevd, tmp_path: Path,
         request: pytest.FixtureRequest) -> Iterator[Node]:
    name = node_for_test(cluster, request.node.name)
    fs_dir, block_dir, config = fs_and_block_dirs(tmp_path)
    marker = request.node.get_closest_marker("agent_args")
    extra = tuple(marker.args) if marker else ()
    with disks(tmp_path) as d:
        agent = Agent(name, config, agent_kubeconfig, tmp_path, *extra).start()
        try:
            agent.wait_ready()
            yield Node(name, fs_dir, block_dir, d, agent, cluster)
        finally:
            took = agent.stop()
            for pv in pvs_of(cluster, name):
                cluster.api("DELETE", f"/api/v1/persistentvolumes/{pv['metadata']['name']}")
            assert took < 5, f"SIGTERM took {took:.1f}s"


def test_hot_added_disks_get_pvs_without_a_resync(node: Node) -> None:
    for source in ("udev", "mount", "inotify"):
        assert node.agent.metric("localpv_agent_wakeup_source_active", source=source) == 1
    device = node.disks.loop("hot", fs="ext4")
    node.disks.mount(device, node.fs_dir / "hot")
    pv = wait_for(lambda: node.pv("hot"), REACT, "PV for a hot-added ext4 mount",
                  on_timeout=node.agent.log)
    uuid = sh("blkid", "-p", "-s", "UUID", "-o", "value", device)
    assert pv["metadata"]["annotations"]["localpv-agent.io/fs-uuid"] == uuid

    raw = node.disks.loop("raw", size_mib=24)
    (node.block_dir / "raw-link").symlink_to(raw)
    pv = wait_for(lambda: node.pv("raw-link", BLOCK), REACT, "PV for a symlink to a raw device",
                  on_timeout=node.agent.log)
    assert pv["spec"]["volumeMode"] == "Block" and pv["spec"]["capacity"]["storage"] == "24Mi"
    # the new entry's pass (settled 0.2 s) may see the mount before the mount table's read,
    # which is held to a rate while other mounts churn on the host: that wake-up may come after
    wait_for(lambda: node.agent.metric("localpv_agent_wakeups_total", source="mount") >= 1,
             REACT, "a mount wake-up", on_timeout=node.agent.log)
    assert node.agent.metric("localpv_agent_wakeups_total", source="inotify") >= 1


def udev_only_volume(node: Node, entry: str) -> None:
    """A symlink to a detached loop device (size 0: excluded), then the device is attached:
    only udev's `change` event can tell the agent."""
    image = node.disks.workdir / f"{entry}.img"
    with image.open("wb") as f:
        f.truncate(16 << 20)
    link = node.block_dir / entry
    for _ in range(5):  # another process may take the free device between find and attach
        free = sh("losetup", "--find")
        link.unlink(missing_ok=True)
        link.symlink_to(free)
        node.agent.wait_passes(2)  # the link is seen and there is nothing to offer
        assert node.pv(entry, BLOCK) is None
        if subprocess.run(["losetup", free, str(image)], check=False).returncode == 0:
            break
    else:
        raise AssertionError("no free loop device could be attached")
    node.disks._undo.append(("losetup", "-d", free))
    wait_for(lambda: node.pv(entry, BLOCK), REACT, f"PV for {entry} after attaching {free}",
             on_timeout=node.agent.log)


def test_device_appearing_behind_a_link_is_seen_through_udev(node: Node) -> None:
    before = node.agent.metric("localpv_agent_wakeups_total", source="udev")
    udev_only_volume(node, "late-device")
    assert node.agent.metric("localpv_agent_wakeups_total", source="udev") > before


@pytest.mark.agent_args("--udev-buffer-size", "1")
def test_failing_udev_monitor_is_recovered(node: Node, udevd: Udevd) -> None:
    for _ in range(20):
        trigger_block_changes(times=3)
        if node.agent.metric("localpv_agent_wakeup_source_failures_total", source="udev"):
            break
        time.sleep(0.2)
    assert node.agent.metric("localpv_agent_wakeup_source_failures_total", source="udev") >= 1
    settle()
    udev_only_volume(node, "after-overflow")
    if not udevd.borrowed:
        udevd.restart()
        udev_only_volume(node, "after-udevd-restart")


def test_unbound_pv_is_withdrawn_when_its_disk_goes(node: Node, cluster: ControlPlane) -> None:
    mount = node.disks.tmpfs(node.fs_dir / "leaving")
    pv = wait_for(lambda: node.pv("leaving"), REACT, "PV for leaving")
    sh("umount", str(mount))
    wait_for(lambda: node.pv("leaving") is None, REACT, "the unbound PV withdrawn",
             on_timeout=node.agent.log)
    warnings = wait_events(cluster, "Node", node.name, "VolumeWithdrawn", REACT,
                           on_timeout=node.agent.log)
    assert len(warnings) == 1 and pv["metadata"]["name"] in warnings[0]["message"]
    node.disks.tmpfs(node.fs_dir / "leaving")
    back = wait_for(lambda: node.pv("leaving"), REACT, "the PV offered again when remounted")
    assert back["metadata"]["uid"] != pv["metadata"]["uid"]


def test_bound_pv_is_kept_and_warned_about_until_its_disk_returns(
    node: Node, cluster: ControlPlane
) -> None:
    mount = node.disks.tmpfs(node.fs_dir / "precious")
    pv = wait_for(lambda: node.pv("precious"), REACT, "PV for precious")
    claim = f"claim-{node.name}"[:60]
    bind_claim(cluster, pv, claim)
    try:
        sh("umount", str(mount))
        wait_for(lambda: node.agent.metric("localpv_agent_volumes", state="missing") == 1,
                 REACT, "the missing state in metrics", on_timeout=node.agent.log)

        def warnings() -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
            return ([e for e in events_for(cluster, "PersistentVolume", pv["metadata"]["name"])
                     if e["reason"] == "VolumeMissing"],
                    [e for e in events_for(cluster, "PersistentVolumeClaim", claim)
                     if e["reason"] == "VolumeMissing"])

        wait_for(lambda: all(warnings()), REACT, "VolumeMissing on the PV and the claim",
                 on_timeout=node.agent.log)
        node.agent.wait_passes(2)  # passes that would warn again, or withdraw the PV
        kept = node.pv("precious")
        assert kept is not None and kept["metadata"]["uid"] == pv["metadata"]["uid"]
        on_pv, on_claim = warnings()
        assert len(on_pv) == 1 and len(on_claim) == 1
        assert on_claim[0]["metadata"]["namespace"] == "default"

        node.disks.tmpfs(node.fs_dir / "precious")
        wait_for(lambda: node.agent.metric("localpv_agent_volumes", state="missing") == 0,
                 REACT, "the condition cleared", on_timeout=node.agent.log)
        assert node.agent.metric("localpv_agent_volumes", state="bound") == 1
    finally:
        cluster.api("DELETE", f"/api/v1/namespaces/default/persistentvolumeclaims/{claim}")


def test_a_different_disk_at_a_pvs_path_is_reported_not_reused(
    node: Node, cluster: ControlPlane
) -> None:
    first = node.disks.loop("first", fs="ext4")
    node.disks.mount(first, node.fs_dir / "slot")
    pv = wait_for(lambda: node.pv("slot"), REACT, "PV for slot")
    second = node.disks.loop("second", fs="ext4")
    node.disks.mount(second, node.fs_dir / "slot")  # mounted over the first: a swapped disk
    warnings = wait_for(
        lambda: [e for e in events_for(cluster, "PersistentVolume", pv["metadata"]["name"])
                 if e["reason"] == "DiskChanged"], REACT, "a DiskChanged warning",
        on_timeout=node.agent.log)
    new_uuid = sh("blkid", "-p", "-s", "UUID", "-o", "value", second)
    assert new_uuid in warnings[0]["message"]
    node.agent.wait_passes(2)
    same = node.pv("slot")
    assert same is not None and same["metadata"]["uid"] == pv["metadata"]["uid"]
    assert same["metadata"]["annotations"]["localpv-agent.io/fs-uuid"] != new_uuid
