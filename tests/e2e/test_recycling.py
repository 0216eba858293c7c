"""Recycling released volumes on real disks: cleaned, then offered again; nothing else touched.

Each test gets its own fake Node and agent. Claims are pre-bound to a PV (`volumeName`), so the
real PV controller binds and, when the claim is deleted, releases them.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.volumes import pv_name
from devkit.agents import (
    REPO,
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

FS, BLOCK = "local-storage", "local-block"
CLEANERS = REPO / "scripts" / "cleaners"
FAST = ("--clean-retry-base", "1", "--clean-stale-after", "3")


@dataclass
class Node:
    name: str
    fs_dir: Path
    block_dir: Path
    config: Path
    work: Path
    disks: Disks
    cluster: ControlPlane
    kubeconfig: Path
    agent: Agent | None = None

    def start(self, *extra: str) -> Agent:
        self.agent = Agent(self.name, self.config, self.kubeconfig, self.work, *FAST,
                           *extra).start()
        self.agent.wait_ready()
        return self.agent

    def pv(self, entry: str, cls: str = FS) -> dict[str, Any] | None:
        return self.pv_by_name(pv_name(entry, self.name, cls))

    def pv_by_name(self, name: str) -> dict[str, Any] | None:
        status, body = self.cluster.api("GET", f"/api/v1/persistentvolumes/{name}")
        return body if status == 200 else None

    def log(self) -> str:
        return self.agent.log() if self.agent else ""


@pytest.fixture
def node(cluster: ControlPlane, agent_kubeconfig: Path, tmp_path: Path,
         request: pytest.FixtureRequest) -> Iterator[Node]:
    name = node_for_test(cluster, request.node.name)
    fs_dir, block_dir, config = fs_and_block_dirs(
        tmp_path, blockCleanerCommand=[str(CLEANERS / "dd_zero.sh")])
    with disks(tmp_path) as d:
        n = Node(name, fs_dir, block_dir, config, tmp_path, d, cluster, agent_kubeconfig)
        try:
            yield n
        finally:
            if n.agent is not None:
                n.agent.kill()
            for claim in items_named(cluster, name):
                cluster.api("DELETE", f"/api/v1/namespaces/default/persistentvolumeclaims/{claim}")
            for pv in pvs_of(cluster, name):
                cluster.api("DELETE", f"/api/v1/persistentvolumes/{pv['metadata']['name']}")


def items_named(cluster: ControlPlane, prefix: str) -> list[str]:
    _, body = cluster.api("GET", "/api/v1/namespaces/default/persistentvolumeclaims")
    return [c["metadata"]["name"] for c in body.get("items", [])
            if c["metadata"]["name"].startswith(prefix[:30])]


def bind(node: Node, pv: dict[str, Any], suffix: str) -> str:
    claim = f"{node.name[:30]}-{suffix}"
    bind_claim(node.cluster, pv, claim)
    return claim


def remembered_dirty(node: Node, entry: str) -> None:
    """Wait until the agent has seen the claim and recorded the volume as holding data (its
    record in the state dir, which outlives the PV)."""
    wait_for(lambda: dirty_paths(node) >= {f"/mnt/disks/{entry}"}, 20,
             f"{entry} remembered as dirty", on_timeout=node.log)


def dirty_paths(node: Node) -> set[str]:
    state = node.work / f"state-{node.name}" / "dirty"
    return {json.loads(f.read_text())["path"] for f in state.glob("*.json")}


def cleanings(*agents: Agent, result: str = "success") -> float:
    return sum(a.metric("localpv_agent_cleanings_total", result=result) for a in agents)


def release(node: Node, claim: str) -> None:
    status, _ = node.cluster.api(
        "DELETE", f"/api/v1/namespaces/default/persistentvolumeclaims/{claim}")
    assert status == 200


def recycled(node: Node, entry: str, old_uid: str, cls: str = FS,
             timeout: float = 60) -> dict[str, Any]:
    """Wait for the PV of `entry` to come back as a new object (a new UID), Available."""
    return wait_for(lambda: (pv := node.pv(entry, cls)) is not None
                    and pv["metadata"]["uid"] != old_uid
                    and pv.get("status", {}).get("phase") == "Available" and pv,
                    timeout, f"{entry} recycled", on_timeout=node.log)


def test_filesystem_volume_is_cleaned_and_offered_again(node: Node) -> None:
    device = node.disks.loop("fsvol", fs="ext4")
    mount = node.disks.mount(device, node.fs_dir / "vol")
    node.start()
    pv = wait_for(lambda: node.pv("vol"), 20, "PV for vol")
    claim = bind(node, pv, "fs")
    (mount / "tenant-data").mkdir()
    (mount / "tenant-data" / "secret.txt").write_text("the old tenant's data\n")
    release(node, claim)
    back = recycled(node, "vol", pv["metadata"]["uid"])
    assert back["metadata"]["name"] == pv["metadata"]["name"]
    assert os.listdir(mount) == []  # everything gone, the mount point kept
    assert os.path.ismount(mount)
    assert wait_events(node.cluster, "Node", node.name, "VolumeCleaned", 60)


def test_block_volume_is_wiped_by_its_cleaner_and_offered_again(node: Node) -> None:
    device = node.disks.loop("blkvol", size_mib=24)
    (node.block_dir / "raw").symlink_to(device)
    node.start()
    pv = wait_for(lambda: node.pv("raw", BLOCK), 20, "PV for raw")
    claim = bind(node, pv, "blk")
    with open(device, "r+b") as f:
        f.write(b"TENANT" * 4096)
        f.seek(20 << 20)
        f.write(b"TAIL" * 1024)
    release(node, claim)
    recycled(node, "raw", pv["metadata"]["uid"], BLOCK)
    with open(device, "rb") as f:
        assert f.read() == b"\0" * (24 << 20)
    assert "dd_zero: writing" in node.log()  # the cleaner's output streamed to the log


def write_hostile_tree(node: Node, mount: Path, outside: Path, other: Path) -> Path:
    """What a tenant could leave behind; returns the nested mount it also left."""
    (mount / "to-etc").symlink_to("/etc")
    (mount / "to-outside").symlink_to(outside)
    (mount / "to-other-volume").symlink_to(other)
    (mount / "to-discovery-dir").symlink_to(node.fs_dir)
    (mount / "dir-link").symlink_to("/etc", target_is_directory=True)
    deep = os.open(mount, os.O_RDONLY | os.O_DIRECTORY)
    for _ in range(10_000):  # deeper than PATH_MAX allows to name: walked by descriptors
        os.mkdir("d", dir_fd=deep)
        nxt = os.open("d", os.O_RDONLY | os.O_DIRECTORY, dir_fd=deep)
        os.close(deep)
        deep = nxt
    os.close(deep)
    (mount / "new\nline").write_text("x")
    with open(os.path.join(os.fsencode(mount), b"bad-\xff-utf8"), "w") as f:
        f.write("x")
    ro_dir = mount / "read-only"
    ro_dir.mkdir()
    (ro_dir / "file").write_text("x")
    (ro_dir / "file").chmod(0o444)
    ro_dir.chmod(0o555)
    (mount / "immutable").write_text("x")
    sh("chattr", "+i", str(mount / "immutable"))
    (mount / "append-only").write_text("x")
    sh("chattr", "+a", str(mount / "append-only"))
    nested = node.disks.tmpfs(mount / "nested-mount")
    (nested / "not-this-volume.txt").write_text("nested data")
    return nested


def test_hostile_contents_touch_nothing_outside_the_volume(node: Node, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep.txt").write_text("must survive")
    device = node.disks.loop("hostile", size_mib=128, fs="ext4")
    mount = node.disks.mount(device, node.fs_dir / "hostile")
    other = node.disks.tmpfs(node.fs_dir / "other-volume")
    (other / "other-tenant.txt").write_text("another volume's data")
    node.start()
    pv = wait_for(lambda: node.pv("hostile"), 20, "PV for hostile")
    claim = bind(node, pv, "hostile")
    nested = write_hostile_tree(node, mount, outside, other)

    release(node, claim)
    failed = wait_for(lambda: [e for e in events_for(node.cluster, "PersistentVolume",
                                                     pv["metadata"]["name"])
                               if e["reason"] == "VolumeFailedDelete"], 60,
                      "the clean refusing the nested mount", on_timeout=node.log)
    assert "nested mount" in failed[0]["message"]
    current = node.pv("hostile")
    assert current is not None and current["status"]["phase"] == "Released"  # never re-offered
    assert json.loads(current["metadata"]["annotations"]["localpv-agent.io/cleaning"])[
        "state"] == "failed"
    assert (nested / "not-this-volume.txt").read_text() == "nested data"
    assert sorted(os.listdir(mount)) == ["nested-mount"]  # the rest is already gone

    sh("umount", str(nested))
    recycled(node, "hostile", pv["metadata"]["uid"], timeout=90)
    assert os.listdir(mount) == []
    assert (outside / "keep.txt").read_text() == "must survive"
    assert (other / "other-tenant.txt").read_text() == "another volume's data"
    assert sorted(os.listdir(node.fs_dir)) == ["hostile", "other-volume"]
    assert Path("/etc/hostname").exists() and Path("/etc/passwd").stat().st_size > 0
    assert "cleared immutable/append-only flags" in node.log()


def slow_block_cleaner(node: Node, tmp_path: Path, seconds: int) -> Path:
    """Make the block class's cleaner say "slow: waiting", sleep, then zero the device."""
    slow = tmp_path / "slow_zero.sh"
    slow.write_text(f"#!/bin/sh\necho slow: waiting\nsleep {seconds}\n"
                    f"exec {CLEANERS / 'dd_zero.sh'}\n")
    slow.chmod(0o755)
    config = yaml.safe_load(node.config.read_text())
    config["storageClassMap"][BLOCK]["blockCleanerCommand"] = [str(slow)]
    node.config.write_text(yaml.safe_dump(config))
    return slow


def test_killed_mid_clean_resumes_and_never_offers_dirty(node: Node, tmp_path: Path) -> None:
    slow = slow_block_cleaner(node, tmp_path, 4)
    device = node.disks.loop("slowvol", size_mib=16)
    (node.block_dir / "slow").symlink_to(device)
    agent = node.start()
    pv = wait_for(lambda: node.pv("slow", BLOCK), 20, "PV for slow")
    claim = bind(node, pv, "kill")
    with open(device, "r+b") as f:
        f.write(b"DIRTY" * 1000)
    release(node, claim)
    wait_for(lambda: "slow: waiting" in agent.log(), 30, "the slow cleaner started")
    agent.kill()  # SIGKILL: no chance to tidy up
    wait_for(lambda: subprocess.run(["pgrep", "-f", str(slow)], capture_output=True,
                                    check=False).returncode != 0,
             10, "the cleaner dying with the agent")
    current = node.pv("slow", BLOCK)
    assert current is not None and current["status"]["phase"] == "Released"
    assert json.loads(current["metadata"]["annotations"]["localpv-agent.io/cleaning"])[
        "state"] == "running"
    node.start()
    back = recycled(node, "slow", pv["metadata"]["uid"], BLOCK, timeout=60)
    assert back["status"]["phase"] == "Available"
    with open(device, "rb") as f:
        assert f.read(1 << 20) == b"\0" * (1 << 20)


def test_dirty_pv_deleted_by_hand_is_cleaned_before_it_is_offered(node: Node) -> None:
    mount = node.disks.mount(node.disks.loop("handled", fs="ext4"), node.fs_dir / "handled")
    agent = node.start()
    pv = wait_for(lambda: node.pv("handled"), 20, "PV for handled")
    claim = bind(node, pv, "hand")
    (mount / "data.bin").write_bytes(b"tenant")
    remembered_dirty(node, "handled")
    agent.stop()
    release(node, claim)
    wait_for(lambda: (node.pv("handled") or {}).get("status", {}).get("phase") == "Released",
             30, "released")
    status, _ = node.cluster.api("DELETE",
                                 f"/api/v1/persistentvolumes/{pv['metadata']['name']}")
    assert status == 200
    wait_for(lambda: node.pv("handled") is None, 30, "the PV deleted by hand")
    agent = node.start()
    back = wait_for(lambda: node.pv("handled"), 30, "the volume offered again")
    assert back["metadata"]["uid"] != pv["metadata"]["uid"]
    assert os.listdir(mount) == []
    assert cleanings(agent) == 1 and "/mnt/disks/handled" not in dirty_paths(node)
    # Cleaned before the PV was created: the agent posts its Events in order from one thread,
    # each named after the time it was posted (agent/kube.py), so VolumeCleaned comes first.
    cleaned = wait_for(lambda: [e for e in node_events(node, "VolumeCleaned")
                                if "/mnt/disks/handled" in e["message"]], 30, "VolumeCleaned",
                       on_timeout=agent.log)
    provisioned = wait_for(lambda: len(found := [
        e for e in events_for(node.cluster, "PersistentVolume", back["metadata"]["name"])
        if e["reason"] == "Provisioned"]) == 2 and found, 30, "Provisioned, for each PV")
    assert len(cleaned) == 1
    assert posted_at(cleaned[0]) < max(posted_at(e) for e in provisioned), (cleaned, provisioned)


def posted_at(event: dict[str, Any]) -> int:
    """When the agent posted `event`: its name ends in that time (ns, hex), by agent/kube.py."""
    return int(event["metadata"]["name"].rsplit(".", 1)[1], 16)


def test_released_pv_whose_disk_is_missing_is_left_alone(node: Node) -> None:
    mount = node.disks.tmpfs(node.fs_dir / "vanishing")
    node.start()
    pv = wait_for(lambda: node.pv("vanishing"), 20, "PV for vanishing")
    claim = bind(node, pv, "gone")
    sh("umount", str(mount))
    release(node, claim)
    wait_for(lambda: [e for e in events_for(node.cluster, "PersistentVolume",
                                            pv["metadata"]["name"])
                      if e["reason"] == "VolumeMissing"], 30, "a VolumeMissing warning",
             on_timeout=node.log)
    assert node.agent is not None
    node.agent.wait_passes(2)
    current = node.pv("vanishing")
    assert current is not None and current["metadata"]["uid"] == pv["metadata"]["uid"]
    assert current["status"]["phase"] == "Released"
    assert cleanings(node.agent, result="success") == cleanings(node.agent, result="failure") == 0


def test_retained_pv_is_never_touched(node: Node) -> None:
    mount = node.disks.tmpfs(node.fs_dir / "kept")
    node.start()
    pv = wait_for(lambda: node.pv("kept"), 20, "PV for kept")
    node.cluster.kubectl("patch", "pv", pv["metadata"]["name"], "-p",
                         json.dumps({"spec": {"persistentVolumeReclaimPolicy": "Retain"}}))
    claim = bind(node, pv, "retain")
    (mount / "keep.me").write_text("retained")
    release(node, claim)
    wait_for(lambda: (node.pv("kept") or {}).get("status", {}).get("phase") == "Released",
             30, "released")
    assert node.agent is not None
    node.agent.wait_passes(2)
    assert (mount / "keep.me").read_text() == "retained"
    assert node.pv("kept")["metadata"]["uid"] == pv["metadata"]["uid"]  # type: ignore[index]


def test_block_volume_cleaned_by_an_upstream_style_job(node: Node) -> None:
    """useJobForCleaning: the agent creates the upstream's cleanup Job and, once the real Job
    controller reports it succeeded, deletes the Job and recycles the PV. (KWOK plays the
    kubelet, so the Job's container does not really run: this proves the orchestration.)"""
    config = yaml.safe_load(node.config.read_text())
    config["useJobForCleaning"] = True
    config["jobTolerations"] = [{"operator": "Exists"}]
    node.config.write_text(yaml.safe_dump(config))
    device = node.disks.loop("jobvol", size_mib=16)
    (node.block_dir / "raw").symlink_to(device)
    node.start("--job-image", "registry.example/localpv-agent:test",
               "--namespace", "localpv-agent")
    pv = wait_for(lambda: node.pv("raw", BLOCK), 20, "PV for raw")
    claim = bind(node, pv, "job")
    name, uid = pv["metadata"]["name"], pv["metadata"]["uid"]
    jobs = "/apis/batch/v1/namespaces/localpv-agent/jobs"
    seen: list[dict[str, Any]] = []

    def job_seen() -> bool:
        status, body = node.cluster.api("GET", f"{jobs}/cleanup-{name}")
        if status == 200:
            seen.append(body)
        return bool(seen)

    release(node, claim)
    wait_for(job_seen, 30, "the cleanup Job", on_timeout=node.log, interval=0.05)
    job = seen[0]
    assert job["metadata"]["labels"] == {
        "kubernetes.io/hostname": node.name, "pv": name, "pvuuid": uid,
        "app.kubernetes.io/managed-by": "localpv-agent"}
    assert job["metadata"]["annotations"]["device"] == str(node.block_dir / "raw")
    assert "start-time" in job["metadata"]["annotations"]
    spec = job["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["name"] == "cleaner"
    assert container["command"] == [str(CLEANERS / "dd_zero.sh")]
    assert container["env"] == [{"name": "LOCAL_PV_BLKDEVICE",
                                 "value": str(node.block_dir / "raw")}]
    assert container["securityContext"]["privileged"] is True
    assert spec["nodeSelector"] == {"kubernetes.io/hostname": node.name}
    assert spec["restartPolicy"] == "OnFailure"
    assert spec["tolerations"] == [{"operator": "Exists"}]

    recycled(node, "raw", uid, BLOCK)
    wait_for(lambda: node.cluster.api("GET", f"{jobs}/cleanup-{name}")[0] == 404, 30,
             "the finished Job deleted")
    _, metrics = node.agent.get("/metrics") if node.agent else (0, "")
    assert ('local_volume_provisioner_persistentvolume_delete_total'
            '{mode="Block",type="job"} 1.0') in metrics


def test_bound_pv_whose_labels_were_edited_is_never_cleaned(node: Node) -> None:
    """The watch selects on the agent's labels: a PV whose label was removed drops out of it.
    Its dirty volume must not look PV-less and be wiped while the claim still uses it."""
    mount = node.disks.mount(node.disks.loop("relabelled", fs="ext4"),
                             node.fs_dir / "relabelled")
    node.start()
    pv = wait_for(lambda: node.pv("relabelled"), 20, "PV for relabelled")
    bind(node, pv, "relabel")
    (mount / "in-use.db").write_text("live data")
    remembered_dirty(node, "relabelled")
    node.cluster.kubectl("label", "pv", pv["metadata"]["name"], "app.kubernetes.io/managed-by-")
    wait_for(lambda: "still exists for it" in node.log(), 20,
             "the agent checking the API before cleaning", on_timeout=node.log)
    assert node.agent is not None
    node.agent.wait_passes(2)
    assert (mount / "in-use.db").read_text() == "live data"
    current = node.pv("relabelled")
    assert current is not None and current["metadata"]["uid"] == pv["metadata"]["uid"]
    assert current["status"]["phase"] == "Bound"
    same_path = [p for p in pvs_of(node.cluster, node.name)
                 if p["spec"]["local"]["path"] == "/mnt/disks/relabelled"]
    assert len(same_path) == 1  # and no second PV for the path


# -- a different disk at the same path: never wiped (regressions of data loss seen in review) --

def replace_disk(node: Node, device: str, mount: Path, data: str) -> str:
    """Put a different filesystem, holding someone's data, on the same device number and at
    the same path: what a disk swap looks like to the agent. Returns its UUID."""
    sh("umount", str(mount))
    sh("mkfs.ext4", "-q", "-F", device)
    node.disks.mount(device, mount)
    (mount / "precious.txt").write_text(data)
    return sh("blkid", "-p", "-s", "UUID", "-o", "value", device)


def dirty_record(node: Node, entry: str) -> dict[str, Any]:
    state = node.work / f"state-{node.name}" / "dirty"
    for f in state.glob("*.json"):
        record: dict[str, Any] = json.loads(f.read_text())
        if record["path"] == f"/mnt/disks/{entry}":
            return record
    raise AssertionError(f"no dirty record for {entry}")


def node_events(node: Node, reason: str) -> list[dict[str, Any]]:
    return [e for e in events_for(node.cluster, "Node", node.name) if e["reason"] == reason]


def test_a_queued_clean_never_wipes_the_disk_that_replaced_its_volume(
        node: Node, tmp_path: Path) -> None:
    """One cleaning worker, busy with a slow block clean; a filesystem volume's clean waits
    behind it. Meanwhile its disk is replaced (new fs UUID, same major:minor). The queued
    clean must not run on the new disk, and the new disk must not be offered."""
    slow_block_cleaner(node, tmp_path, 8)
    raw = node.disks.loop("busy", size_mib=16)
    (node.block_dir / "busy").symlink_to(raw)
    device = node.disks.loop("swapped", fs="ext4")
    mount = node.disks.mount(device, node.fs_dir / "swapped")
    agent = node.start("--clean-concurrency", "1")
    busy = wait_for(lambda: node.pv("busy", BLOCK), 20, "PV for busy")
    pv = wait_for(lambda: node.pv("swapped"), 20, "PV for swapped")
    busy_claim, claim = bind(node, busy, "busy"), bind(node, pv, "swap")
    (mount / "old-tenant.txt").write_text("old")
    release(node, busy_claim)
    wait_for(lambda: "slow: waiting" in agent.log(), 30, "the slow clean holding the worker",
             on_timeout=agent.log)
    release(node, claim)
    wait_for(lambda: "cleaning /mnt/disks/swapped" in agent.log(), 30, "the queued clean",
             on_timeout=agent.log)
    new_uuid = replace_disk(node, device, mount, "the new disk's data")
    changed = wait_for(lambda: [e for e in events_for(node.cluster, "PersistentVolume",
                                                      pv["metadata"]["name"])
                                if e["reason"] == "DiskChanged"], 30, "DiskChanged",
                       on_timeout=agent.log)
    assert new_uuid in changed[0]["message"]
    recycled(node, "busy", busy["metadata"]["uid"], BLOCK, timeout=90)  # the worker is free
    wait_for(lambda: "clean /mnt/disks/swapped cancelled" in agent.log()
             or "not started: a different disk" in agent.log(), 30,
             "the queued clean dropped", on_timeout=agent.log)
    assert (mount / "precious.txt").read_text() == "the new disk's data"
    current = node.pv("swapped")
    assert current is not None and current["metadata"]["uid"] == pv["metadata"]["uid"]
    assert current["status"]["phase"] == "Released"  # left for an operator, never re-offered


def test_a_dirty_record_never_wipes_a_replacement_disk(node: Node) -> None:
    """The PV of a dirty volume deleted by hand, the disk replaced, the agent restarted: the
    record names the old disk, so the new one is neither cleaned nor offered."""
    device = node.disks.loop("recorded", fs="ext4")
    mount = node.disks.mount(device, node.fs_dir / "recorded")
    agent = node.start()
    pv = wait_for(lambda: node.pv("recorded"), 20, "PV for recorded")
    claim = bind(node, pv, "rec")
    remembered_dirty(node, "recorded")
    old_uuid = sh("blkid", "-p", "-s", "UUID", "-o", "value", device)
    assert dirty_record(node, "recorded")["identity"]["fs-uuid"] == old_uuid
    agent.stop()
    release(node, claim)
    wait_for(lambda: (node.pv("recorded") or {}).get("status", {}).get("phase") == "Released",
             30, "released")
    node.cluster.api("DELETE", f"/api/v1/persistentvolumes/{pv['metadata']['name']}")
    wait_for(lambda: node.pv("recorded") is None, 30, "the PV deleted by hand")
    new_uuid = replace_disk(node, device, mount, "a replacement disk's data")
    agent = node.start()
    changed = wait_for(lambda: node_events(node, "DiskChanged"), 30, "DiskChanged on the Node",
                       on_timeout=agent.log)
    assert old_uuid in changed[0]["message"] and new_uuid in changed[0]["message"]
    assert "delete" in changed[0]["message"]  # the manual step is named
    agent.wait_passes(2)
    assert (mount / "precious.txt").read_text() == "a replacement disk's data"
    assert node.pv("recorded") is None
    assert cleanings(agent, result="success") == cleanings(agent, result="failure") == 0


def test_a_dirty_record_without_identity_is_held_for_an_operator(node: Node) -> None:
    """Records written before identities were kept cannot prove which disk they mean."""
    device = node.disks.loop("legacy", fs="ext4")
    mount = node.disks.mount(device, node.fs_dir / "legacy")
    (mount / "tenant.db").write_text("someone's data")
    state = node.work / f"state-{node.name}" / "dirty"
    state.mkdir(parents=True)
    (state / "legacy.json").write_text(json.dumps(
        {"path": "/mnt/disks/legacy", "pv": "local-pv-old", "since": "2026-01-01T00:00:00Z"}))
    agent = node.start()
    held = wait_for(lambda: node_events(node, "VolumeUnverified"), 30, "VolumeUnverified",
                    on_timeout=agent.log)
    assert "/mnt/disks/legacy" in held[0]["message"]
    assert 'localpv_agent_volumes_held{reason="unverified"} 1.0' in agent.get("/metrics")[1]
    assert (mount / "tenant.db").read_text() == "someone's data"
    assert node.pv("legacy") is None


def test_twin_agents_clean_a_dirty_volume_once_and_never_the_next_tenant(node: Node) -> None:
    """Two agents of one node (a rollout overlaps old and new pod) share the state dir. A
    dirty volume whose PV was deleted by hand is cleaned once, offered once, and its next
    tenant's data is never wiped by the twin that decided late."""
    device = node.disks.loop("twin", fs="ext4")
    mount = node.disks.mount(device, node.fs_dir / "twin")
    agent = node.start()
    pv = wait_for(lambda: node.pv("twin"), 20, "PV for twin")
    claim = bind(node, pv, "twin")
    (mount / "old-tenant").write_text("old")
    remembered_dirty(node, "twin")
    agent.stop()
    release(node, claim)
    wait_for(lambda: (node.pv("twin") or {}).get("status", {}).get("phase") == "Released",
             30, "released")
    node.cluster.api("DELETE", f"/api/v1/persistentvolumes/{pv['metadata']['name']}")
    wait_for(lambda: node.pv("twin") is None, 30, "the PV deleted by hand")
    state = ("--state-dir", str(node.work / f"state-{node.name}"), "--resync-period", "1")
    twins = []
    for i in range(2):
        work = node.work / f"twin-{i}"
        work.mkdir()
        twins.append(Agent(node.name, node.config, node.kubeconfig, work, *FAST,
                           *state).start())
    try:
        back = wait_for(lambda: (p := node.pv("twin")) is not None
                        and p["metadata"]["uid"] != pv["metadata"]["uid"] and p, 120,
                        "the volume offered again",
                        on_timeout=lambda: "\n".join(t.log() for t in twins))
        bind(node, back, "twin-next")
        (mount / "next-tenant").write_text("new")
        for t in twins:
            t.wait_passes(3)
        assert (mount / "next-tenant").read_text() == "new"
        assert cleanings(*twins) == 1, "\n".join(t.log() for t in twins)
    finally:
        for t in twins:
            t.kill()
