"""`--withdraw-removed-classes` on a real control plane: a config reload drops a class; its
Available PV is withdrawn, its Bound PV is left to its claim with a `ClassRemoved` Event, and
the PVs of the classes still configured are untouched."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.volumes import pv_name
from devkit.agents import (
    Agent,
    bind_claim,
    events_for,
    node_for_test,
    pvs_of,
    wait_events,
    wait_for,
)
from devkit.controlplane import ControlPlane
from devkit.disks import disks

KEPT, REMOVED = "local-storage", "e2e-removed-class"
REACT = 30.0


@pytest.fixture
def removed_class(cluster: ControlPlane) -> Iterator[str]:
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump({
        "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
        "metadata": {"name": REMOVED}, "provisioner": "kubernetes.io/no-provisioner",
        "volumeBindingMode": "WaitForFirstConsumer"}))
    yield REMOVED


def write_config(path: Path, classes: dict[str, Any]) -> None:
    """Replaced whole, as the kubelet updates a mounted ConfigMap."""
    edit = path.with_suffix(".new")
    edit.write_text(yaml.safe_dump({"storageClassMap": classes}))
    edit.rename(path)


def test_a_removed_class_withdraws_its_available_pvs_and_leaves_bound_ones(
        cluster: ControlPlane, agent_kubeconfig: Path, removed_class: str, tmp_path: Path,
        request: pytest.FixtureRequest) -> None:
    node = node_for_test(cluster, request.node.name)
    kept_dir, old_dir = tmp_path / "kept", tmp_path / "old"
    classes = {KEPT: {"hostDir": "/mnt/disks", "mountDir": str(kept_dir)},
               removed_class: {"hostDir": "/mnt/old", "mountDir": str(old_dir)}}
    config = tmp_path / "config.yaml"
    write_config(config, classes)
    claim = f"claim-{node}"[:60]

    def pv(entry: str, cls: str) -> dict[str, Any] | None:
        name = pv_name(entry, node, cls)
        return next((p for p in pvs_of(cluster, node) if p["metadata"]["name"] == name), None)

    with disks(tmp_path) as d:
        for mount in (kept_dir / "a", old_dir / "x", old_dir / "y"):
            d.tmpfs(mount)
        agent = Agent(node, config, agent_kubeconfig, tmp_path,
                      "--withdraw-removed-classes").start()
        try:
            agent.wait_ready()
            kept = wait_for(lambda: pv("a", KEPT), REACT, "PV for a", on_timeout=agent.log)
            free = wait_for(lambda: pv("x", removed_class), REACT, "PV for x")
            taken = wait_for(lambda: pv("y", removed_class), REACT, "PV for y")
            bind_claim(cluster, taken, claim, timeout=REACT)

            write_config(config, {KEPT: classes[KEPT]})
            wait_for(lambda: [e for e in events_for(cluster, "Node", node)
                              if e["reason"] == "ConfigReloaded"], REACT,
                     "the ConfigReloaded Event", on_timeout=agent.log)
            wait_for(lambda: pv("x", removed_class) is None, REACT,
                     "the Available PV of the removed class withdrawn", on_timeout=agent.log)
            withdrawn = wait_events(cluster, "Node", node, "VolumeWithdrawn", REACT,
                                    on_timeout=agent.log)
            assert len(withdrawn) == 1
            assert free["metadata"]["name"] in withdrawn[0]["message"]
            assert "no longer in the config" in withdrawn[0]["message"]
            name = taken["metadata"]["name"]
            reported = wait_for(lambda: [e for e in events_for(cluster, "PersistentVolume", name)
                                         if e["reason"] == "ClassRemoved"],
                                REACT, "the ClassRemoved Event on the Bound PV")
            assert len(reported) == 1 and reported[0]["type"] == "Warning"
            still = pv("y", removed_class)
            assert still is not None and still["metadata"]["uid"] == taken["metadata"]["uid"]
            assert still["status"]["phase"] == "Bound"
            again = pv("a", KEPT)
            assert again is not None and again["metadata"]["uid"] == kept["metadata"]["uid"]
        finally:
            agent.stop()
            cluster.api("DELETE", f"/api/v1/namespaces/default/persistentvolumeclaims/{claim}")
            for p in pvs_of(cluster, node):
                cluster.api("DELETE", f"/api/v1/persistentvolumes/{p['metadata']['name']}")
