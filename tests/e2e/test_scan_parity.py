"""`localpv-agent scan -o yaml` prints the PVs `run` creates, field for field.

A node with a label copied onto PVs (`nodeLabelsForPV`), a StorageClass with a reclaim policy
and mount options, an ext4 disk and a raw block device: the agent creates their PVs, then scan
runs twice, once reading the Node and StorageClasses from the API (`--kubeconfig`) and once
given them by flags, and both must equal the created PVs minus what the API server adds.
"""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

from devkit.agents import REPO, Agent, pvs_of, wait_for
from devkit.controlplane import ControlPlane
from devkit.disks import disks

ZONE = "topology.kubernetes.io/zone"
SC = "scan-parity"
MOUNT_OPTIONS = ["noatime", "nodiratime"]
# Written by the API server or its controllers, never by a client: not part of what is created.
SERVER_METADATA = ("uid", "resourceVersion", "creationTimestamp", "managedFields", "generation",
                   "finalizers")  # finalizers: kubernetes.io/pv-protection, by the controller


def created(pv: dict[str, Any]) -> dict[str, Any]:
    pv = copy.deepcopy(pv)
    pv.pop("status", None)
    for key in SERVER_METADATA:
        pv["metadata"].pop(key, None)
    return pv


def scan(config: Path, node: str, *flags: str) -> dict[str, dict[str, Any]]:
    result = subprocess.run([sys.executable, "-m", "agent.cli", "scan", "-o", "yaml",
                             "--config", str(config), "--node-name", node, *flags],
                            capture_output=True, text=True, cwd=REPO, timeout=120, check=False)
    assert result.returncode == 0, result.stderr
    return {d["metadata"]["name"]: d for d in yaml.safe_load_all(result.stdout) if d}


def test_scan_yaml_is_what_run_creates(cluster: ControlPlane, agent_kubeconfig: Path,
                                       tmp_path: Path) -> None:
    node = "scan-parity-node"
    cluster.add_node(node, labels={ZONE: "zone-7"})
    status, body = cluster.api("POST", "/apis/storage.k8s.io/v1/storageclasses", {
        "apiVersion": "storage.k8s.io/v1", "kind": "StorageClass", "metadata": {"name": SC},
        "provisioner": "kubernetes.io/no-provisioner", "volumeBindingMode":
            "WaitForFirstConsumer", "reclaimPolicy": "Retain", "mountOptions": MOUNT_OPTIONS})
    assert status in (201, 409), body
    fs_dir, block_dir = tmp_path / "disks", tmp_path / "block"
    block_dir.mkdir()
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "nodeLabelsForPV": [ZONE], "labelsForPV": {"team": "storage"},
        "storageClassMap": {
            SC: {"hostDir": "/mnt/scan", "mountDir": str(fs_dir), "fsType": "ext4"},
            "local-block": {"hostDir": "/mnt/block", "mountDir": str(block_dir),
                            "volumeMode": "Block"},
        }}))
    with disks(tmp_path) as d:
        d.mount(d.loop("scanfs", fs="ext4"), fs_dir / "data-1")
        (block_dir / "raw-1").symlink_to(d.loop("scanraw", size_mib=16))
        agent = Agent(node, config, agent_kubeconfig, tmp_path).start()
        try:
            agent.wait_ready()
            made = wait_for(lambda: (pvs := pvs_of(cluster, node)) and len(pvs) == 2 and pvs,
                            60, "both PVs created", on_timeout=agent.log)
            # Each read alone: a list's items carry no apiVersion and kind.
            runs = {pv["metadata"]["name"]: created(cluster.api(
                "GET", f"/api/v1/persistentvolumes/{pv['metadata']['name']}")[1]) for pv in made}
            _, node_obj = cluster.api("GET", f"/api/v1/nodes/{node}")
            from_api = scan(config, node, "--kubeconfig", str(agent_kubeconfig))
            from_flags = scan(config, node, "--node-uid", node_obj["metadata"]["uid"],
                              "--node-label", f"{ZONE}=zone-7",
                              *[a for o in MOUNT_OPTIONS for a in ("--mount-option", f"{SC}={o}")],
                              "--reclaim-policy", f"{SC}=Retain")
        finally:
            agent.kill()
            for pv in pvs_of(cluster, node):
                cluster.api("DELETE", f"/api/v1/persistentvolumes/{pv['metadata']['name']}")
    fs_pv = next(pv for pv in runs.values() if pv["spec"]["storageClassName"] == SC)
    assert fs_pv["spec"]["mountOptions"] == MOUNT_OPTIONS  # the test covers what it means to
    assert fs_pv["spec"]["persistentVolumeReclaimPolicy"] == "Retain"
    assert fs_pv["metadata"]["labels"][ZONE] == "zone-7"
    assert any(re.match(r"localpv-agent\.io/", k) for k in fs_pv["metadata"]["annotations"])
    assert from_api == runs
    assert from_flags == runs
