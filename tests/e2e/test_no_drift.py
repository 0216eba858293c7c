"""The no-drift story on a real control plane: agents create each node's PVs, a StatefulSet
binds them, and its pods always come back to the node holding their data."""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.volumes import pv_name
from devkit.agents import REPO, Agent, events_for, items, pvs_of, wait_events, wait_for
from devkit.controlplane import ControlPlane
from devkit.disks import Disks, disks

NODES = ("node-1", "node-2", "node-3")
CREATED = "local_volume_provisioner_persistentvolume_discovery_total"  # PVs the agent created
CLASS = "local-storage"
STS = "example-sts1"


@dataclass
class NodeDisks:
    name: str
    config: Path
    entries: dict[str, int]  # entry name -> filesystem size in bytes


def prepare_node(d: Disks, root: Path, node: str, volumes: dict[str, int],
                 extra_classes: dict[str, Any] | None = None) -> NodeDisks:
    """A discovery dir of real ext4 disks (loop devices), plus a stray file the agent must
    explain. Real disks, not tmpfs: a released volume is recycled only when its disk can be
    recognised, and a tmpfs has no identity."""
    mount_dir = root / node / "disks"
    mount_dir.mkdir(parents=True)
    sizes = {}
    for entry, mib in volumes.items():
        mount = d.mount(d.loop(f"{node}-{entry}", size_mib=mib, fs="ext4"), mount_dir / entry)
        st = os.statvfs(mount)
        sizes[entry] = st.f_blocks * st.f_frsize
    (mount_dir / "stray.txt").write_text("not a disk")
    config = root / node / "config.yaml"
    config.write_text(yaml.safe_dump({"storageClassMap": {
        CLASS: {"hostDir": "/mnt/disks", "mountDir": str(mount_dir)}, **(extra_classes or {}),
    }}))
    return NodeDisks(node, config, sizes)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("no-drift")


@pytest.fixture(scope="module")
def node_disks(cluster: ControlPlane, workdir: Path) -> Iterator[dict[str, NodeDisks]]:
    with disks(workdir) as d:
        yield {n: prepare_node(d, workdir, n, {"vol-a": 32, "vol-b": 48}) for n in NODES}


@pytest.fixture(scope="module")
def agents(node_disks: dict[str, NodeDisks], agent_kubeconfig: Path,
           workdir: Path) -> Iterator[dict[str, Agent]]:
    running = {n: Agent(n, nd.config, agent_kubeconfig, workdir).start()
               for n, nd in node_disks.items()}
    try:
        for agent in running.values():
            agent.wait_ready()
        yield running
    finally:
        for agent in running.values():
            agent.kill()


def expected_names(nd: NodeDisks) -> set[str]:
    return {pv_name(entry, nd.name, CLASS) for entry in nd.entries}


def test_each_agent_creates_exactly_its_nodes_pvs(
    cluster: ControlPlane, node_disks: dict[str, NodeDisks], agents: dict[str, Agent]
) -> None:
    for node, nd in node_disks.items():
        pvs = wait_for(lambda nd=nd: len(pvs_of(cluster, nd.name)) == 2
                       and pvs_of(cluster, nd.name), 30, f"PVs of {node}")
        assert {pv["metadata"]["name"] for pv in pvs} == expected_names(nd)
        for pv in pvs:
            entry = Path(pv["spec"]["local"]["path"]).name
            assert pv["spec"]["local"]["path"] == f"/mnt/disks/{entry}"
            assert pv["spec"]["capacity"]["storage"] == f"{nd.entries[entry] >> 20}Mi"
            assert pv["spec"]["storageClassName"] == CLASS
            assert pv["metadata"]["labels"]["kubernetes.io/hostname"] == node
            _, node_obj = cluster.api("GET", f"/api/v1/nodes/{node}")
            assert pv["metadata"]["annotations"]["pv.kubernetes.io/provisioned-by"] == \
                f"local-volume-provisioner-{node}-{node_obj['metadata']['uid']}"
    assert sum(len(pvs_of(cluster, n)) for n in NODES) == 6


def test_excluded_entry_is_one_event_and_deleted_pv_comes_back(
    cluster: ControlPlane, node_disks: dict[str, NodeDisks], agents: dict[str, Agent]
) -> None:
    nd = node_disks["node-3"]
    victim = sorted(expected_names(nd))[0]
    status, _ = cluster.api("DELETE", f"/api/v1/persistentvolumes/{victim}")
    assert status == 200
    wait_for(lambda: any(pv["metadata"]["name"] == victim for pv in pvs_of(cluster, "node-3")),
             30, f"{victim} recreated after a manual delete")
    stray = wait_for(lambda: [e for e in events_for(cluster, "Node", "node-3")
                              if e["reason"] == "VolumeExcluded" and "stray.txt" in e["message"]],
                     60, "the VolumeExcluded Event for stray.txt")
    assert len(stray) == 1, stray  # two passes, one Event
    assert "unsupported_type" in stray[0]["message"] and stray[0]["type"] == "Warning"


def statefulset_manifests() -> list[dict[str, Any]]:
    docs = [d for d in yaml.safe_load_all((REPO / "config/examples/statefulset.yaml").read_text())
            if d]
    (sts,) = [d for d in docs if d["kind"] == "StatefulSet"]
    (template,) = sts["spec"]["volumeClaimTemplates"]
    assert template["spec"]["storageClassName"] == CLASS
    template["spec"]["resources"]["requests"]["storage"] = "16Mi"  # the test disks are small
    return docs


def placement(cluster: ControlPlane) -> dict[str, tuple[str, str, str]]:
    """pod name -> (pod uid, node, PV) for running pods of the StatefulSet."""
    pvcs = {c["metadata"]["name"]: c for c in
            items(cluster, "/api/v1/namespaces/default/persistentvolumeclaims")}
    result = {}
    for pod in items(cluster, f"/api/v1/namespaces/default/pods?labelSelector=app%3D{STS}"):
        if pod["status"].get("phase") != "Running" or pod["metadata"].get("deletionTimestamp"):
            continue
        claim = pvcs.get(f"local-vol-{pod['metadata']['name']}")
        if claim is None or claim["status"].get("phase") != "Bound":
            continue
        result[pod["metadata"]["name"]] = (pod["metadata"]["uid"], pod["spec"]["nodeName"],
                                           claim["spec"]["volumeName"])
    return result


@pytest.fixture
def statefulset(cluster: ControlPlane) -> Iterator[None]:
    manifests = yaml.safe_dump_all(statefulset_manifests())
    cluster.kubectl("apply", "-f", "-", input=manifests)
    yield
    cluster.kubectl("delete", "-f", "-", "--wait=true", input=manifests)
    cluster.kubectl("delete", "pvc", "-l", f"app={STS}", "--wait=false", check=False)


def test_statefulset_pods_never_drift_from_their_data(
    cluster: ControlPlane, agents: dict[str, Agent], statefulset: None
) -> None:
    first = wait_for(lambda: len(p := placement(cluster)) == 3 and p, 90,
                     "3 StatefulSet pods running with bound claims")
    pv_nodes = {pv["metadata"]["name"]: pv["metadata"]["labels"]["kubernetes.io/hostname"]
                for pv in items(cluster, "/api/v1/persistentvolumes")}
    for pod, (_, node, pv) in first.items():
        assert pv_nodes[pv] == node, f"{pod} runs on {node} but its PV {pv} is on {pv_nodes[pv]}"

    for round_no in range(3):
        cluster.kubectl("delete", "pods", "-l", f"app={STS}", "--wait=false")
        before = {p: uid for p, (uid, _, _) in first.items()}
        again = wait_for(
            lambda b=before: len(p := placement(cluster)) == 3
            and all(p[n][0] != b[n] for n in p) and p,
            120, f"pods recreated in round {round_no + 1}")
        assert {p: (n, v) for p, (_, n, v) in again.items()} == \
            {p: (n, v) for p, (_, n, v) in first.items()}, f"round {round_no + 1}"
        first = again


def settled(cluster: ControlPlane, node: str) -> list[dict[str, Any]]:
    """The node's two PVs, once any recycling from earlier tests is over (all Available)."""
    return wait_for(lambda: len(p := pvs_of(cluster, node)) == 2 and all(
        pv.get("status", {}).get("phase") == "Available" for pv in p) and p, 60,
        f"{node}'s PVs available")


def test_restarted_agent_creates_no_duplicate(
    cluster: ControlPlane, node_disks: dict[str, NodeDisks], agents: dict[str, Agent]
) -> None:
    settled(cluster, "node-1")
    before = sorted((pv["metadata"]["name"], pv["metadata"]["uid"])
                    for pv in pvs_of(cluster, "node-1"))
    took = agents["node-1"].stop()
    assert took < 5, f"SIGTERM took {took:.1f}s"
    assert agents["node-1"].proc is not None and agents["node-1"].proc.returncode == 0
    agents["node-1"] = Agent("node-1", node_disks["node-1"].config,
                             agents["node-1"].kubeconfig, agents["node-1"].workdir).start()
    agents["node-1"].wait_ready()
    agents["node-1"].wait_passes(2)
    after = sorted((pv["metadata"]["name"], pv["metadata"]["uid"])
                   for pv in pvs_of(cluster, "node-1"))
    assert after == before
    assert agents["node-1"].metric(CREATED) == 0


def test_second_agent_for_the_same_node_creates_no_duplicate(
    cluster: ControlPlane, node_disks: dict[str, NodeDisks], agents: dict[str, Agent],
    agent_kubeconfig: Path, workdir: Path
) -> None:
    before = sorted(pv["metadata"]["uid"] for pv in settled(cluster, "node-2"))
    twin = Agent("node-2", node_disks["node-2"].config, agent_kubeconfig, workdir).start()
    try:
        twin.wait_ready()
        twin.wait_passes(2)
        assert sorted(pv["metadata"]["uid"] for pv in pvs_of(cluster, "node-2")) == before
        assert twin.metric(CREATED) == 0
    finally:
        twin.stop()


def test_upstream_pvs_are_adopted_and_missing_class_is_disabled(
    cluster: ControlPlane, agent_kubeconfig: Path, workdir: Path
) -> None:
    """A node whose hostname label differs from its name, with PVs the upstream made."""
    cluster.add_node("node-4", {"kubernetes.io/hostname": "host-4"})
    status, node = cluster.api("GET", "/api/v1/nodes/node-4")
    with disks(workdir) as d:
        nd = prepare_node(d, workdir, "node-4", {"old-a": 32, "old-b": 32, "new-c": 16},
                          extra_classes={"no-such-class": {
                              "hostDir": "/mnt/other", "mountDir": str(workdir / "node-4")}})
        upstream = {}
        for entry in ("old-a", "old-b"):
            name = pv_name(entry, "node-4", CLASS)
            manifest = {
                "apiVersion": "v1", "kind": "PersistentVolume",
                "metadata": {"name": name, "annotations": {
                    "pv.kubernetes.io/provisioned-by":
                        "local-volume-provisioner-node-4-an-older-node-uid"}},
                "spec": {
                    "capacity": {"storage": "32Mi"}, "accessModes": ["ReadWriteOnce"],
                    "persistentVolumeReclaimPolicy": "Delete", "storageClassName": CLASS,
                    "volumeMode": "Filesystem", "local": {"path": f"/mnt/disks/{entry}"},
                    "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                        {"key": "kubernetes.io/hostname", "operator": "In",
                         "values": ["host-4"]}]}]}},
                },
            }
            status, created = cluster.api("POST", "/api/v1/persistentvolumes", manifest)
            assert status == 201, created
            upstream[name] = created["metadata"]["uid"]
        agent = Agent("node-4", nd.config, agent_kubeconfig, workdir).start()
        try:
            agent.wait_ready()
            pvs = wait_for(lambda: len(p := pvs_of(cluster, "host-4")) == 3 and p, 30,
                           "node-4's three PVs")
        finally:
            assert agent.stop() < 5
    by_name = {pv["metadata"]["name"]: pv for pv in pvs}
    assert set(by_name) == expected_names(nd)
    for name, uid in upstream.items():
        assert by_name[name]["metadata"]["uid"] == uid  # adopted, not replaced
        assert by_name[name]["metadata"]["labels"] == {
            "app.kubernetes.io/managed-by": "localpv-agent", "kubernetes.io/hostname": "host-4"}
    new = by_name[pv_name("new-c", "node-4", CLASS)]
    assert new["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"][0][
        "matchExpressions"][0]["values"] == ["host-4"]  # the label, not the Node name
    warnings = wait_events(cluster, "Node", "node-4", "StorageClassMissing", 60)
    assert len(warnings) == 1 and "no-such-class" in warnings[0]["message"]
    assert node["metadata"]["name"] == "node-4"
