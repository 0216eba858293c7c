"""A disk that grows while mounted, on real loop devices and XFS: the file behind the loop
device is extended (`truncate`), the kernel told (`losetup -c`) and the filesystem grown online
(`xfs_growfs`; ext4's `resize2fs` does the same online, but needs CAP_SYS_RESOURCE, which the
test machines' containers may not grant, while XFS's grow needs CAP_SYS_ADMIN, which mounting
needs anyway). An Available PV takes the new capacity; a Bound PV keeps the size its claim was
matched against, and the agent says so with a `CapacityChanged` Event and a gauge.

A filesystem grown online makes no udev event or mount change after it has grown, so the
agent sees it on its next pass: the agents here resync every few seconds to make that prompt.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.volumes import format_quantity, pv_name, round_capacity
from devkit.agents import (
    Agent,
    bind_claim,
    class_config,
    events_for,
    node_for_test,
    pvs_of,
    wait_events,
    wait_for,
)
from devkit.controlplane import ControlPlane
from devkit.disks import Disks, disks, sh

CLASS = "local-storage"
REACT = 60.0  # seconds: a few resyncs on a loaded machine
PASSES = "localpv_agent_discovery_pass_duration_seconds_count"
SIZE, GROWN = 320, 480  # MiB; mkfs.xfs wants at least 300


@dataclass
class Node:
    name: str
    mount_dir: Path
    workdir: Path
    disks: Disks
    agent: Agent
    cluster: ControlPlane

    def pv(self, entry: str) -> dict[str, Any] | None:
        name = pv_name(entry, self.name, CLASS)
        return next((p for p in pvs_of(self.cluster, self.name)
                     if p["metadata"]["name"] == name), None)

    def grow(self, entry: str, device: str, size_mib: int) -> str:
        """Grow the disk under the mounted filesystem, then the filesystem; its new size as
        the PV should show it."""
        sh("truncate", "-s", f"{size_mib}M", str(self.workdir / f"{entry}.img"))
        sh("losetup", "-c", device)
        sh("xfs_growfs", str(self.mount_dir / entry))
        st = os.statvfs(self.mount_dir / entry)
        return format_quantity(round_capacity(st.f_blocks * st.f_frsize))


def gauge(agent: Agent, name: str) -> float:
    _, text = agent.get("/metrics")
    return next(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                if line.split(" ")[0] == name)


@pytest.fixture
def node(cluster: ControlPlane, agent_kubeconfig: Path, tmp_path: Path,
         request: pytest.FixtureRequest) -> Iterator[Node]:
    name = node_for_test(cluster, request.node.name)
    mount_dir = tmp_path / "disks"
    mount_dir.mkdir()
    config = class_config(tmp_path / "config.yaml", mount_dir)
    with disks(tmp_path) as d:
        agent = Agent(name, config, agent_kubeconfig, tmp_path, "--resync-period", "3").start()
        try:
            agent.wait_ready()
            yield Node(name, mount_dir, tmp_path, d, agent, cluster)
        finally:
            agent.stop()
            for pv in pvs_of(cluster, name):
                cluster.api("DELETE", f"/api/v1/persistentvolumes/{pv['metadata']['name']}")


def test_a_grown_disk_resizes_its_available_pv_and_is_reported_on_a_bound_one(
        node: Node, cluster: ControlPlane) -> None:
    free = node.disks.loop("free", size_mib=SIZE, fs="xfs")  # sparse files: no real space
    node.disks.mount(free, node.mount_dir / "free")
    taken = node.disks.loop("taken", size_mib=SIZE, fs="xfs")
    node.disks.mount(taken, node.mount_dir / "taken")
    before = wait_for(lambda: node.pv("free"), REACT, "PV for free", on_timeout=node.agent.log)
    bound = wait_for(lambda: node.pv("taken"), REACT, "PV for taken", on_timeout=node.agent.log)
    claim = f"claim-{node.name}"[:60]
    bind_claim(cluster, bound, claim)
    try:
        assert gauge(node.agent, "localpv_agent_volumes_capacity_differs") == 0
        grown = node.grow("free", free, GROWN)
        assert grown != before["spec"]["capacity"]["storage"]
        def resized() -> dict[str, Any] | None:
            pv = node.pv("free")
            return pv if pv and pv["spec"]["capacity"]["storage"] == grown else None

        after = wait_for(resized, REACT, f"the Available PV resized to {grown}",
                         on_timeout=node.agent.log)
        assert after["metadata"]["uid"] == before["metadata"]["uid"]
        updated = wait_events(cluster, "PersistentVolume", after["metadata"]["name"],
                              "CapacityUpdated", REACT, on_timeout=node.agent.log)
        assert len(updated) == 1 and updated[0]["type"] == "Normal"

        was = bound["spec"]["capacity"]["storage"]
        now = node.grow("taken", taken, GROWN)
        name = bound["metadata"]["name"]
        changed = wait_for(lambda: [e for e in events_for(cluster, "PersistentVolume", name)
                                    if e["reason"] == "CapacityChanged"],
                           REACT, "the CapacityChanged Event", on_timeout=node.agent.log)
        assert changed[0]["type"] == "Warning" and now in changed[0]["message"]
        wait_for(lambda: gauge(node.agent, "localpv_agent_volumes_capacity_differs") == 1,
                 REACT, "the gauge of PVs whose capacity differs")
        kept = node.pv("taken")
        assert kept is not None and kept["spec"]["capacity"]["storage"] == was
        assert kept["status"]["phase"] == "Bound"
        passes = gauge(node.agent, PASSES)
        wait_for(lambda: gauge(node.agent, PASSES) >= passes + 2, REACT, "two more passes")
        assert len([e for e in events_for(cluster, "PersistentVolume", name)
                    if e["reason"] == "CapacityChanged"]) == 1  # reported once while it lasts
        assert node.pv("taken")["spec"]["capacity"]["storage"] == was
    finally:
        cluster.api("DELETE", f"/api/v1/namespaces/default/persistentvolumeclaims/{claim}")
