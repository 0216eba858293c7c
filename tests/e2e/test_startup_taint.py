"""`removeNodeNotReadyTaint` on a real control plane: a node starts with the startup taint, so
the real scheduler keeps pods that tolerate nothing off it until the agent has created every PV
of the node; only then does the agent remove the taint, and the pod is scheduled.

The order is read from the API's own revisions: two watches (the Node, the node's PVs) started
before the agent record the resourceVersion of each change, and etcd's revisions are one
increasing sequence across kinds, so "every PV was created before the taint went" is a
comparison of integers.
"""

from __future__ import annotations

import json
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.kube import Kube
from devkit.agents import (
    Agent,
    class_config,
    node_for_test,
    pvs_of,
    wait_for,
    write_token_kubeconfig,
)
from devkit.controlplane import ControlPlane
from devkit.disks import disks

TAINT = "localpv-agent.io/not-ready"
ACCOUNT = "localpv-agent-taint"
ENTRIES = ("a", "b", "c")


class Watch:
    """Every event of one watch, recorded with its object's resourceVersion, from a daemon
    thread. It ends with the server's `timeoutSeconds`: closing the response while the thread
    reads it would wait for the reader's lock."""

    def __init__(self, cluster: ControlPlane, path: str) -> None:
        status, listed = cluster.api("GET", path)
        assert status == 200, listed
        since = listed["metadata"]["resourceVersion"]
        sep = "&" if "?" in path else "?"
        url = f"{cluster.server}{path}{sep}watch=1&resourceVersion={since}&timeoutSeconds=240"
        self.events: list[tuple[int, str, dict[str, Any]]] = []
        self._lock = threading.Lock()
        self._response = urllib.request.urlopen(
            urllib.request.Request(url), context=cluster._admin_ssl(), timeout=300)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for line in self._response:
                event = json.loads(line)
                obj = event["object"]
                with self._lock:
                    self.events.append((int(obj["metadata"]["resourceVersion"]), event["type"],
                                        obj))
        except (OSError, ValueError):
            return  # closed by the test

    def seen(self) -> list[tuple[int, str, dict[str, Any]]]:
        with self._lock:
            return list(self.events)


@pytest.fixture(scope="module")
def taint_kubeconfig(cluster: ControlPlane, agent_kubeconfig: Path,
                     tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The agent's ClusterRole plus the one rule removeNodeNotReadyTaint needs (nodes get and
    patch), given to a ServiceAccount of its own: the default install never gets it."""
    docs = [
        {"apiVersion": "v1", "kind": "ServiceAccount",
         "metadata": {"name": ACCOUNT, "namespace": "localpv-agent"}},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRole",
         "metadata": {"name": "localpv-agent-node-taint"},
         "rules": [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["get", "patch"]}]},
        *({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding",
           "metadata": {"name": f"{ACCOUNT}-{role}"},
           "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                       "name": role},
           "subjects": [{"kind": "ServiceAccount", "name": ACCOUNT,
                         "namespace": "localpv-agent"}]}
          for role in ("localpv-agent", "localpv-agent-node-taint")),
    ]
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
    return write_token_kubeconfig(cluster, tmp_path_factory.mktemp("taint") / "kubeconfig",
                                  account=ACCOUNT)


def pod(name: str, node: str) -> dict[str, Any]:
    """A pod for `node` that tolerates nothing (beyond what admission adds)."""
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"nodeSelector": {"kubernetes.io/hostname": node},
                     "containers": [{"name": "c", "image": "registry.k8s.io/pause:3.10"}]}}


def unschedulable(cluster: ControlPlane, name: str) -> bool:
    _, body = cluster.api("GET", f"/api/v1/namespaces/default/pods/{name}")
    conditions = body.get("status", {}).get("conditions") or []
    return any(c["type"] == "PodScheduled" and c["status"] == "False"
               and c.get("reason") == "Unschedulable" for c in conditions)


def taints(node: dict[str, Any]) -> list[str]:
    return [t["key"] for t in node.get("spec", {}).get("taints") or []]


@pytest.fixture
def tainted_node(cluster: ControlPlane, request: pytest.FixtureRequest) -> Iterator[str]:
    name = node_for_test(cluster, request.node.name)
    cluster.kubectl("taint", "nodes", name, f"{TAINT}:NoSchedule",
                    "other.example/keep=yes:PreferNoSchedule")
    yield name
    for pv in pvs_of(cluster, name):
        cluster.api("DELETE", f"/api/v1/persistentvolumes/{pv['metadata']['name']}")


def test_pods_reach_the_node_only_after_its_pvs_exist(
        cluster: ControlPlane, taint_kubeconfig: Path, agent_kubeconfig: Path,
        tainted_node: str, tmp_path: Path) -> None:
    node = tainted_node
    # the default install cannot patch Nodes: the rule comes only with the setting
    can = cluster.kubectl("auth", "can-i", "patch", "nodes",
                          "--as=system:serviceaccount:localpv-agent:localpv-agent",
                          check=False).stdout.strip()
    assert can == "no"
    mount_dir = tmp_path / "disks"
    config = class_config(tmp_path / "config.yaml", mount_dir)
    config.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()),
                                      "removeNodeNotReadyTaint": True,
                                      "provisionerNotReadyNodeTaintKey": TAINT}))
    pod_name = f"wants-{node}"[:63]
    status, body = cluster.api("POST", "/api/v1/namespaces/default/pods", pod(pod_name, node))
    assert status == 201, body
    node_watch = Watch(cluster, f"/api/v1/nodes?fieldSelector=metadata.name%3D{node}")
    pv_watch = Watch(cluster, f"/api/v1/persistentvolumes?labelSelector="
                              f"kubernetes.io%2Fhostname%3D{node}")
    agent = None
    try:
        with disks(tmp_path) as d:
            for entry in ENTRIES:
                d.tmpfs(mount_dir / entry)
            wait_for(lambda: unschedulable(cluster, pod_name), 60,
                     "the scheduler to find the pod unschedulable on the tainted node")
            agent = Agent(node, config, taint_kubeconfig, tmp_path).start()
            wait_for(lambda: TAINT not in taints(cluster.api("GET", f"/api/v1/nodes/{node}")[1]),
                     90, "the agent to remove the startup taint", on_timeout=agent.log)
            scheduled = wait_for(
                lambda: cluster.api("GET", f"/api/v1/namespaces/default/pods/{pod_name}")[1]
                .get("spec", {}).get("nodeName"), 60, "the pod scheduled once the taint went")
            assert scheduled == node
            after = cluster.api("GET", f"/api/v1/nodes/{node}")[1]
            assert taints(after) == ["other.example/keep"]  # another taint is never touched
            assert "every volume has its PV; taint" in agent.log()

            removed = wait_for(lambda: next((rv for rv, _, obj in node_watch.seen()
                                             if TAINT not in taints(obj)), None),
                               30, "the taint's removal in the Node watch")
            def creations() -> dict[str, int] | None:
                found = {obj["metadata"]["name"]: rv for rv, kind, obj in pv_watch.seen()
                         if kind == "ADDED"}
                return found if len(found) == len(ENTRIES) else None

            created = wait_for(creations, 30, "every PV's creation in the PV watch")
            assert max(created.values()) < removed, (created, removed)
            assert all(TAINT in taints(obj) for rv, _, obj in node_watch.seen() if rv < removed)
    finally:
        if agent is not None:
            agent.stop()
        cluster.api("DELETE", f"/api/v1/namespaces/default/pods/{pod_name}")


def test_a_taint_added_between_the_read_and_the_patch_is_kept(
        cluster: ControlPlane, tainted_node: str) -> None:
    """The Node patch tests the taint list it read: when another client changes the taints in
    between, the real apiserver refuses the patch, and the agent reads again and retries,
    so the other client's taint survives."""
    node = tainted_node
    kube = Kube(str(cluster.kubeconfig))
    read = kube._core.read_node
    reads = 0

    def read_then_taint(name: str, **kwargs: Any) -> Any:
        nonlocal reads
        reads += 1
        answer = read(name, **kwargs)
        if reads == 1:  # the agent now holds a taint list that is about to be stale
            cluster.kubectl("taint", "nodes", name, "late.example/added:NoSchedule")
        return answer

    kube._core.read_node = read_then_taint  # type: ignore[method-assign]
    assert kube.remove_node_taint(node, TAINT)
    assert reads == 2
    assert kube.request_counts().get(("patch", "error")) == 1
    after = taints(cluster.api("GET", f"/api/v1/nodes/{node}")[1])
    assert sorted(after) == ["late.example/added", "other.example/keep"]
    assert not kube.remove_node_taint(node, TAINT)  # idempotent: nothing left to remove
