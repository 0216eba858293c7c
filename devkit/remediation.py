"""`localpv-agent remediate` against the development control plane: the controller as a
process, and the scenario it acts on (a StatefulSet on KWOK nodes with one agent-shaped PV each)
with the ways a node gets lost. Used by tests/e2e/test_remediate.py and benchmarks/remediate.py.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from agent.volumes import pv_name
from devkit import REPO, process
from devkit.agents import api_get, items, metric_sum, wait_for, write_token_kubeconfig
from devkit.controlplane import KWOK_NODE_ANNOTATION, ControlPlane

ACCOUNT = "localpv-agent-remediate"
NAMESPACE = "localpv-agent"
RBAC_KINDS = {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
OOS = "node.kubernetes.io/out-of-service"
STS = "web"
TEMPLATE = "data"
FAST = ("--lease-duration", "4", "--renew-deadline", "3", "--retry-period", "1",
        "--stale-pv-discovery-interval", "1")
METRIC = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? ([^ ]+)$", re.M)


def install_rbac(cluster: ControlPlane, kubeconfig: Path, *, namespace: bool = False) -> Path:
    """remediate.yaml's RBAC as deployed (with daemonset.yaml's Namespace when `namespace`), and
    a token kubeconfig of the controller's ServiceAccount written to `kubeconfig`."""
    docs = [d for d in yaml.safe_load_all((REPO / "remediate.yaml").read_text())
            if d and d["kind"] in RBAC_KINDS]
    if {d["kind"] for d in docs} != RBAC_KINDS:
        raise AssertionError(f"remediate.yaml lacks {RBAC_KINDS - {d['kind'] for d in docs}}")
    if namespace:
        docs = [d for d in yaml.safe_load_all((REPO / "daemonset.yaml").read_text())
                if d and d["kind"] == "Namespace"] + docs
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
    return write_token_kubeconfig(cluster, kubeconfig, account=ACCOUNT, namespace=NAMESPACE)


class Controller:
    """`localpv-agent remediate` as a process, logging to a file, with a random HTTP port."""

    def __init__(self, kubeconfig: Path, workdir: Path, *args: str, name: str = "a") -> None:
        self.name = name
        self.args = (*FAST, *args)
        self.kubeconfig = kubeconfig
        self.log_path = workdir / f"remediate-{name}-{time.monotonic_ns()}.log"
        self.port_file = workdir / f"remediate-{name}.port"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Controller:
        self.port_file.unlink(missing_ok=True)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "remediate", "--kubeconfig",
                 str(self.kubeconfig), "--id", self.name, "--lease-namespace", NAMESPACE,
                 "--listen-address", "127.0.0.1:0", "--port-file", str(self.port_file),
                 *self.args], stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def text(self) -> str:
        """Its /metrics, in the Prometheus text format."""
        import urllib.request  # noqa: PLC0415

        port = wait_for(lambda: self.port_file.exists() and self.port_file.read_text().strip(),
                        30, f"controller {self.name} port", on_timeout=self.log)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            return str(r.read().decode())

    def metrics(self) -> dict[str, float]:
        return {m[1] + (m[2] or ""): float(m[3]) for m in METRIC.finditer(self.text())}

    def metric(self, name: str, **labels: str) -> float:
        return metric_sum(self.text(), name, **labels)

    def passes(self) -> float:
        return self.metric("localpv_agent_remediation_passes_total")

    def leader(self) -> bool:
        return self.alive() and self.metric("localpv_agent_remediation_leader") == 1.0

    def wait_leader(self, timeout: float = 30) -> None:
        wait_for(self.leader, timeout, f"controller {self.name} leading", on_timeout=self.log)

    def wait_passes(self, count: int = 3, timeout: float = 60) -> None:
        """Evidence that the controller looked again, `count` more times, at what is now."""
        start = self.passes()
        wait_for(lambda: self.passes() >= start + count, timeout,
                 f"{count} passes of controller {self.name}", on_timeout=self.log)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self) -> None:
        if self.alive():
            assert self.proc is not None
            process.stop(self.proc, timeout=15)

    def kill(self) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()


@dataclass
class Scenario:
    """A StorageClass, nodes with one PV each (the agent's shape), a namespace with a
    StatefulSet `web` whose claims `data-web-<i>` use that class."""

    name: str
    nodes: list[str]
    replicas: int
    cls: str = ""
    made_nodes: set[str] = field(default_factory=set)

    @property
    def ns(self) -> str:
        return self.name


def kubectl_json(cluster: ControlPlane, *args: str) -> Any:
    return json.loads(cluster.kubectl(*args, "-o", "json").stdout)


def node_uid(cluster: ControlPlane, node: str) -> str:
    body = api_get(cluster, f"/api/v1/nodes/{node}")
    assert body is not None, node
    return str(body["metadata"]["uid"])


def agent_shaped_pv(cluster: ControlPlane, node: str, cls: str, entry: str = "disk") -> dict[str,
                                                                                             Any]:
    """The PV the agent writes for `entry` on `node` (name, labels, annotation, affinity)."""
    return {
        "apiVersion": "v1", "kind": "PersistentVolume",
        "metadata": {
            "name": pv_name(entry, node, cls),
            "labels": {"kubernetes.io/hostname": node,
                       "app.kubernetes.io/managed-by": "localpv-agent"},
            "annotations": {"pv.kubernetes.io/provisioned-by":
                            f"local-volume-provisioner-{node}-{node_uid(cluster, node)}"},
        },
        "spec": {
            "capacity": {"storage": "1Gi"}, "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Delete", "storageClassName": cls,
            "volumeMode": "Filesystem", "local": {"path": f"/mnt/disks/{entry}"},
            "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": "kubernetes.io/hostname", "operator": "In", "values": [node]}]}]}},
        },
    }


def statefulset(s: Scenario, tolerations: Sequence[dict[str, Any]] = (),
                storage: str = "1Gi") -> dict[str, Any]:
    labels = {"app": STS}
    return {
        "apiVersion": "apps/v1", "kind": "StatefulSet",
        "metadata": {"name": STS, "namespace": s.ns},
        "spec": {
            "serviceName": STS, "replicas": s.replicas, "podManagementPolicy": "Parallel",
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {
                "containers": [{"name": "app", "image": "registry.invalid/app:1",
                                "volumeMounts": [{"name": TEMPLATE, "mountPath": "/data"}]}],
                "tolerations": list(tolerations),
            }},
            "volumeClaimTemplates": [{"metadata": {"name": TEMPLATE}, "spec": {
                "storageClassName": s.cls, "accessModes": ["ReadWriteOnce"],
                "resources": {"requests": {"storage": storage}}}}],
        },
    }


def make_scenario(cluster: ControlPlane, name: str, nodes: int, replicas: int,
                  tolerations: Sequence[dict[str, Any]] = (), pvs: bool = True) -> Scenario:
    s = Scenario(name, [f"{name}-{i}" for i in range(1, nodes + 1)], replicas, cls=f"sc-{name}")
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all([
        {"apiVersion": "storage.k8s.io/v1", "kind": "StorageClass",
         "metadata": {"name": s.cls}, "provisioner": "kubernetes.io/no-provisioner",
         "volumeBindingMode": "WaitForFirstConsumer", "reclaimPolicy": "Delete"},
        {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": s.ns}}]))
    for node in s.nodes:
        cluster.add_node(node)
        s.made_nodes.add(node)
        if pvs:
            status, body = cluster.api("POST", "/api/v1/persistentvolumes",
                                       agent_shaped_pv(cluster, node, s.cls))
            assert status == 201, body
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump(statefulset(s, tolerations)))
    return s


def running(cluster: ControlPlane, s: Scenario) -> dict[str, dict[str, str]]:
    """Replica -> its pod's uid and node, its claim's uid and PV: running pods whose claim is
    bound, only."""
    claims = {c["metadata"]["name"]: c for c in
              items(cluster, f"/api/v1/namespaces/{s.ns}/persistentvolumeclaims")}
    found = {}
    for pod in items(cluster, f"/api/v1/namespaces/{s.ns}/pods"):
        meta = pod["metadata"]
        claim = claims.get(f"{TEMPLATE}-{meta['name']}")
        if pod["status"].get("phase") != "Running" or meta.get("deletionTimestamp") \
                or claim is None or claim["status"].get("phase") != "Bound":
            continue
        found[meta["name"]] = {"pod": meta["uid"], "node": pod["spec"]["nodeName"],
                               "claim": claim["metadata"]["uid"],
                               "pv": claim["spec"]["volumeName"]}
    return found


def settle(cluster: ControlPlane, s: Scenario) -> dict[str, dict[str, str]]:
    """Wait until every replica runs on its PV; return `running`'s answer then."""
    def all_running() -> dict[str, dict[str, str]]:
        now = running(cluster, s)
        return now if len(now) == s.replicas else {}

    return wait_for(all_running, 120, f"{s.replicas} replicas of {s.name} running on their PVs")


def claim_uid(cluster: ControlPlane, s: Scenario, replica: str) -> str | None:
    body = api_get(cluster, f"/api/v1/namespaces/{s.ns}/persistentvolumeclaims/"
                            f"{TEMPLATE}-{replica}")
    return str(body["metadata"]["uid"]) if body is not None else None


def teardown(cluster: ControlPlane, s: Scenario) -> None:
    cluster.kubectl("delete", "statefulset", STS, "-n", s.ns, "--wait=false", check=False)
    cluster.kubectl("delete", "pods", "--all", "-n", s.ns, "--grace-period=0", "--force",
                    check=False)
    cluster.kubectl("delete", "namespace", s.ns, "--wait=false", check=False)
    for pv in items(cluster, "/api/v1/persistentvolumes"):
        if pv["spec"].get("storageClassName") == s.cls:
            cluster.kubectl("delete", "pv", pv["metadata"]["name"], "--wait=false", check=False)
    for node in sorted(s.made_nodes):
        cluster.kubectl("delete", "node", node, "--wait=false", check=False)
    cluster.kubectl("delete", "storageclass", s.cls, "--wait=false", check=False)


def shut_down(cluster: ControlPlane, node: str) -> None:
    """The node's kubelet is gone: the Node object stays, without KWOK behind it (made anew
    without KWOK's annotation), and reports NotReady. Its pods stay as they were."""
    obj = kubectl_json(cluster, "get", "node", node)
    labels = obj["metadata"]["labels"]
    cluster.kubectl("delete", "node", node, "--wait=true")
    status, body = cluster.api("POST", "/api/v1/nodes", {
        "apiVersion": "v1", "kind": "Node", "metadata": {"name": node, "labels": labels}})
    assert status == 201, body
    assert KWOK_NODE_ANNOTATION not in (body["metadata"].get("annotations") or {})
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    cluster.kubectl("patch", "node", node, "--subresource=status", "--type=merge", "-p",
                    json.dumps({"status": {"conditions": [{
                        "type": "Ready", "status": "False", "reason": "KubeletDown",
                        "message": "shut down by the test", "lastHeartbeatTime": now,
                        "lastTransitionTime": now}]}}))
    wait_for(lambda: not cluster.node_ready(node), 30, f"{node} NotReady")


def out_of_service(cluster: ControlPlane, node: str) -> None:
    cluster.kubectl("taint", "nodes", node, f"{OOS}=nodeshutdown:NoExecute")


def lost_by_deletion(cluster: ControlPlane, node: str) -> None:
    cluster.kubectl("delete", "node", node, "--wait=true")
