"""The Helm chart on the test control planes (real apiserver; KWOK nodes, and the real node).

- `helm template` of the defaults and of every values file under charts/localpv-agent/ci is
  accepted by `kubectl apply --dry-run=server` (admission, RBAC escalation checks, schema of
  every built-in kind; the Prometheus Operator kinds against minimal CRDs of their own, which
  check the group, version and kind only).
- `helm install` of a values file written for the upstream chart (the class directories moved
  to this test's, and its StorageClass not made the cluster default), then `helm upgrade`: the
  DaemonSet's pods run on the KWOK nodes, and a real agent process, running with a token of
  the chart's ServiceAccount (so the chart's RBAC is what it gets) and reading the chart's
  ConfigMap projected into a directory the way the kubelet does it, turns a real loop device
  into a PV of the chart's class; after the upgrade it reloads the new ConfigMap and labels
  the next PV as the upgraded values say.
- On the real node (containerd + kubelet, devkit/realnode.py, in a control plane of
  its own): `helm install` of the defaults with only what this environment forces (the image
  built here, hostNetwork and the API's address, a free metrics port, host paths under the
  node's dir), the agent's pod running on the kubelet and a host disk becoming a PV; then
  `helm upgrade`, the kubelet bringing the new ConfigMap to the pod and the agent reloading it
  without a restart.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from devkit.agents import (
    REPO,
    Agent,
    node_for_test,
    pvs_of,
    wait_for,
    write_token_kubeconfig,
)
from devkit.controlplane import ControlPlane
from devkit.disks import Disks, sh
from devkit.realnode import Images, RealNode, stop_node, wait_daemonset_ready
from tests.conftest import require

pytestmark = [pytest.mark.e2e, pytest.mark.root]

CHART = REPO / "charts" / "localpv-agent"
VALUES_FILES = sorted((CHART / "ci").glob("*.yaml"))
DRY_RUN_NS = "chart-dry-run"
CRDS = {"servicemonitors": "ServiceMonitor", "podmonitors": "PodMonitor",
        "prometheusrules": "PrometheusRule"}


@pytest.fixture(scope="module")
def helm(bin_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Helm]:
    path = bin_dir / "helm"
    assert path.exists(), f"no helm in {bin_dir}: scripts/build-binaries builds it"
    yield Helm(path, tmp_path_factory.mktemp("helm-home"))


class Helm:
    """helm with its config, cache and data dirs of its own."""

    def __init__(self, path: Path, home: Path) -> None:
        self.path = path
        self.env = {**os.environ, "HELM_CACHE_HOME": str(home / "cache"),
                    "HELM_CONFIG_HOME": str(home / "config"),
                    "HELM_DATA_HOME": str(home / "data")}

    def run(self, *args: str, kubeconfig: Path | None = None,
            check: bool = True) -> subprocess.CompletedProcess[str]:
        extra = [f"--kubeconfig={kubeconfig}"] if kubeconfig else []
        proc = subprocess.run([str(self.path), *args, *extra], capture_output=True, text=True,
                              env=self.env, timeout=300, check=False)
        if check:
            assert proc.returncode == 0, f"helm {' '.join(args)}:\n{proc.stderr}"
        return proc


@pytest.fixture(scope="module")
def dry_run_namespace(cluster: ControlPlane) -> str:
    cluster.kubectl("create", "namespace", DRY_RUN_NS)
    docs = [{"apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
             "metadata": {"name": f"{plural}.monitoring.coreos.com"},
             "spec": {"group": "monitoring.coreos.com", "scope": "Namespaced",
                      "names": {"plural": plural, "kind": kind},
                      "versions": [{"name": "v1", "served": True, "storage": True,
                                    "schema": {"openAPIV3Schema": {
                                        "type": "object",
                                        "x-kubernetes-preserve-unknown-fields": True}}}]}}
            for plural, kind in CRDS.items()]
    cluster.kubectl("apply", "-f", "-", input=yaml.safe_dump_all(docs))
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s",
                    *(f"crd/{p}.monitoring.coreos.com" for p in CRDS))
    return DRY_RUN_NS


@pytest.mark.parametrize("values", [None, *VALUES_FILES],
                         ids=["defaults", *(v.stem for v in VALUES_FILES)])
def test_render_passes_server_side_dry_run(cluster: ControlPlane, helm: Helm,
                                           dry_run_namespace: str, values: Path | None) -> None:
    args = ["template", "dry", str(CHART), "--namespace", dry_run_namespace]
    if values is not None:
        args += ["--values", str(values)]
    rendered = helm.run(*args).stdout
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    assert docs
    proc = cluster.kubectl("apply", "--dry-run=server", "-f", "-", input=rendered,
                           check=False)
    assert proc.returncode == 0, proc.stderr
    applied = [line for line in proc.stdout.splitlines() if line.endswith("(server dry run)")]
    assert len(applied) == len(docs), proc.stdout


# ------------------------------------------------------------------- install, upgrade, agent


def _project(data: dict[str, str], directory: Path) -> None:
    """Write a ConfigMap's data as the kubelet does: the files in a timestamped dir, `..data`
    pointing at it (swapped atomically), and each key a link through `..data`."""
    directory.mkdir(exist_ok=True)
    stamp = directory / f"..{time.time_ns()}"
    stamp.mkdir()
    for name, value in data.items():
        (stamp / name).write_text(value)
    tmp = directory / "..data_tmp"
    tmp.unlink(missing_ok=True)
    tmp.symlink_to(stamp.name)
    tmp.replace(directory / "..data")
    for name in data:
        link = directory / name
        if not link.is_symlink():
            link.symlink_to(f"..data/{name}")
    for old in directory.glob("..[0-9]*"):
        if old != stamp:
            for f in old.iterdir():
                f.unlink()
            old.rmdir()


def _configmap(cluster: ControlPlane, ns: str, name: str) -> dict[str, Any]:
    status, body = cluster.api("GET", f"/api/v1/namespaces/{ns}/configmaps/{name}")
    assert status == 200, body
    return dict(body)


def _values_for_this_machine(work: Path) -> tuple[dict[str, Any], dict[str, Path]]:
    """ci/upstream-values.yaml with what this environment forces: each class's directories
    moved under `work`, and no cluster-wide default StorageClass (other tests share it)."""
    values = yaml.safe_load((CHART / "ci" / "upstream-values.yaml").read_text())
    dirs = {}
    for cls in values["classes"]:
        d = work / cls["name"]
        d.mkdir()
        dirs[cls["name"]] = d
        cls["hostDir"] = cls["mountDir"] = str(d)
        if isinstance(cls.get("storageClass"), dict):
            cls["storageClass"]["isDefaultClass"] = False
    return values, dirs


def _daemonset_ready(cluster: ControlPlane, ns: str, name: str) -> dict[str, Any]:
    """The DaemonSet once every pod it wants is Ready at its current generation, else {}."""
    status, ds = cluster.api("GET", f"/apis/apps/v1/namespaces/{ns}/daemonsets/{name}")
    if status != 200:
        return {}
    st = ds.get("status", {})
    want = st.get("desiredNumberScheduled", 0)
    ok = want > 0 and st.get("numberReady") == want and st.get(
        "observedGeneration") == ds["metadata"]["generation"]
    return dict(ds) if ok else {}


def _add_disk(disks: Disks, directory: Path, name: str) -> Path:
    """An ext4 loop device mounted by UUID under a class directory, as the README says."""
    device = disks.loop(name, 64, fs="ext4")
    return disks.mount(device, directory / sh("blkid", "-s", "UUID", "-o", "value", device))


def _wait_pv(cluster: ControlPlane, node: str, path: Path, agent: Agent) -> dict[str, Any]:
    def pv_at() -> dict[str, Any]:
        found = [p for p in pvs_of(cluster, node) if p["spec"]["local"]["path"] == str(path)]
        return found[0] if found else {}

    return wait_for(pv_at, 60, f"a PV for {path}", agent.log)


def _install(helm: Helm, cluster: ControlPlane, command: str, release: str, ns: str,
             values_file: Path) -> dict[str, Any]:
    """helm install/upgrade; returns `helm status` as JSON."""
    extra = ["--create-namespace"] if command == "install" else []
    helm.run(command, release, str(CHART), "--namespace", ns, "--values", str(values_file),
             *extra, kubeconfig=cluster.kubeconfig)
    status: dict[str, Any] = json.loads(helm.run(
        "status", release, "--namespace", ns, "--output", "json",
        kubeconfig=cluster.kubeconfig).stdout)
    return status


def test_install_then_upgrade_with_an_agent_reading_the_charts_configmap(
        cluster: ControlPlane, helm: Helm, tmp_path: Path) -> None:
    ns, release = "chart-e2e", "upstream"
    fullname = f"{release}-localpv-agent"
    node = node_for_test(cluster, "chart-install")
    values, dirs = _values_for_this_machine(tmp_path)
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    (tmp_path / "disks").mkdir()
    disks = Disks(tmp_path / "disks")
    agent: Agent | None = None
    try:
        status = _install(helm, cluster, "install", release, ns, values_file)
        assert status["version"] == 1 and status["info"]["status"] == "deployed"
        ds = wait_for(lambda: _daemonset_ready(cluster, ns, fullname), 120,
                      "the chart's DaemonSet Ready on the KWOK nodes")
        storage_classes = {sc["metadata"]["name"]: sc for sc in cluster.api(
            "GET", "/apis/storage.k8s.io/v1/storageclasses")[1]["items"]}
        assert storage_classes["fast-disks"]["reclaimPolicy"] == "Delete"
        assert "block-disks" in storage_classes

        # The agent: the chart's ServiceAccount, the chart's ConfigMap as the kubelet mounts it.
        config_dir = tmp_path / "config"
        _project(_configmap(cluster, ns, f"{fullname}-config")["data"], config_dir)
        kubeconfig = write_token_kubeconfig(cluster, tmp_path / "agent.kubeconfig",
                                            account=fullname, namespace=ns)
        agent = Agent(node, config_dir, kubeconfig, tmp_path).start()
        agent.wait_ready()
        first = _wait_pv(cluster, node, _add_disk(disks, dirs["fast-disks"], "first"), agent)
        assert first["spec"]["storageClassName"] == "fast-disks"
        assert first["metadata"]["labels"]["pv-labels"] == "can-be-selected"
        assert first["spec"]["volumeMode"] == "Filesystem"

        # helm upgrade: one more PV label; the DaemonSet is updated in place.
        values["labelsForPV"]["upgraded"] = "yes"
        values_file.write_text(yaml.safe_dump(values))
        status = _install(helm, cluster, "upgrade", release, ns, values_file)
        assert status["version"] == 2 and status["info"]["status"] == "deployed"
        after = wait_for(lambda: _daemonset_ready(cluster, ns, fullname), 120,
                         "the upgraded DaemonSet Ready")
        assert after["metadata"]["uid"] == ds["metadata"]["uid"]
        upgraded = _configmap(cluster, ns, f"{fullname}-config")["data"]
        assert yaml.safe_load(upgraded["labelsForPV"])["upgraded"] == "yes"
        _project(upgraded, config_dir)
        running = agent
        wait_for(lambda: _reloaded(running), 60, "the agent to reload the upgraded ConfigMap",
                 running.log)
        second = _wait_pv(cluster, node, _add_disk(disks, dirs["fast-disks"], "second"), agent)
        assert second["metadata"]["labels"]["upgraded"] == "yes"
        assert second["metadata"]["labels"]["pv-labels"] == "can-be-selected"
    finally:
        if agent is not None:
            agent.stop()
        disks.cleanup()
        helm.run("uninstall", release, "--namespace", ns, "--wait",
                 kubeconfig=cluster.kubeconfig, check=False)
        for pv in pvs_of(cluster, node):
            cluster.api("DELETE", f"/api/v1/persistentvolumes/{pv['metadata']['name']}")
        cluster.kubectl("delete", "namespace", ns, "--wait=false", check=False)


def _reloaded(agent: Agent) -> bool:
    for line in agent.get("/metrics")[1].splitlines():
        if line.startswith("localpv_agent_config_reloads_total") and '"applied"' in line:
            return float(line.split()[-1]) >= 1
    return False


# ------------------------------------------------------------------------------- real node


@pytest.fixture(scope="module")
def real_node(bin_dir: Path, tmp_path_factory: pytest.TempPathFactory
              ) -> Iterator[tuple[ControlPlane, RealNode]]:
    """A control plane of its own with the real node (containerd + kubelet) and no agent:
    the chart deploys it."""
    require(os.geteuid() == 0, "the real node needs root")
    missing = [t for t in ("containerd", "ctr", "runc", "buildah", "mmdebstrap", "unshare")
               if shutil.which(t) is None]
    require(not missing, f"missing {missing}: run scripts/install-system-deps")
    images = Images.build()
    workdir = tmp_path_factory.mktemp("chart-real-node")
    plane = ControlPlane(workdir, bin_dir)
    try:
        plane.start(nodes=0)
        node = RealNode(plane, images)
        # The harness drops its Popen handles of containerd and the kubelet (they are tracked
        # by pid files and die with this process), which Python reports as a ResourceWarning.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            node.start()
        yield plane, node
    finally:
        stop_node(workdir)
        plane.stop()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _agent_metric(port: int, name: str, result: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        for line in resp.read().decode().splitlines():
            if line.startswith(name) and f'"{result}"' in line:
                return float(line.split()[-1])
    return 0.0


def test_chart_runs_the_agent_on_the_real_node(real_node: tuple[ControlPlane, RealNode],
                                               helm: Helm, tmp_path: Path) -> None:
    """helm install of the chart's defaults with only what this environment forces (the
    image built here, hostNetwork and the API's address, a free metrics port, host paths under
    the node's dir): the agent's pod runs on the real kubelet and turns a disk mounted on the
    host into a PV; helm upgrade changes the ConfigMap, the kubelet brings it to the pod, the
    agent reloads it without a restart and labels the next PV."""
    plane, node = real_node
    port = _free_port()
    values: dict[str, Any] = {
        "image": node.images.agent,
        "hostNetwork": True,
        "extraEnv": [{"name": "KUBERNETES_SERVICE_HOST", "value": "127.0.0.1"},
                     {"name": "KUBERNETES_SERVICE_PORT", "value": plane.server.rsplit(":", 1)[1]}],
        "metrics": {"port": port},
        "classes": [{"name": "local-storage", "hostDir": str(node.disks_dir),
                     "mountDir": "/mnt/disks", "storageClass": True}],
        "stateDir": str(node.paths.agent_state),
    }
    values_file = tmp_path / "values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    ns = "localpv-agent"
    plane.kubectl("create", "namespace", ns)
    plane.kubectl("label", "namespace", ns, "pod-security.kubernetes.io/enforce=privileged")
    disks_ = Disks(tmp_path)
    try:
        assert _install(helm, plane, "install", "localpv-agent", ns, values_file)["version"] == 1
        wait_daemonset_ready(plane, 300, node.log_tails)
        _, pods = plane.api("GET", f"/api/v1/namespaces/{ns}/pods")
        (pod,) = pods["items"]
        assert pod["spec"]["nodeName"] == node.name and pod["spec"]["hostNetwork"] is True
        first = _wait_real_pv(plane, _add_disk(disks_, node.disks_dir, "chart-first"))
        assert first["spec"]["storageClassName"] == "local-storage"

        applied = _agent_metric(port, "localpv_agent_config_reloads_total", "applied")
        values["labelsForPV"] = {"installed-by": "helm-upgrade"}
        values_file.write_text(yaml.safe_dump(values))
        assert _install(helm, plane, "upgrade", "localpv-agent", ns, values_file)["version"] == 2
        wait_for(lambda: _agent_metric(port, "localpv_agent_config_reloads_total", "applied")
                 > applied, 240, "the kubelet to bring the upgraded ConfigMap to the agent",
                 node.log_tails)
        second = _wait_real_pv(plane, _add_disk(disks_, node.disks_dir, "chart-second"))
        assert second["metadata"]["labels"]["installed-by"] == "helm-upgrade"
        _, after = plane.api("GET", f"/api/v1/namespaces/{ns}/pods")
        assert [p["metadata"]["uid"] for p in after["items"]] == [pod["metadata"]["uid"]]
    finally:
        helm.run("uninstall", "localpv-agent", "--namespace", ns, "--wait",
                 kubeconfig=plane.kubeconfig, check=False)
        disks_.cleanup()


def _wait_real_pv(plane: ControlPlane, path: Path) -> dict[str, Any]:
    def pv_at() -> dict[str, Any]:
        _, body = plane.api("GET", "/api/v1/persistentvolumes")
        found = [p for p in body.get("items", [])
                 if p["spec"].get("local", {}).get("path") == str(path)]
        return found[0] if found else {}

    return wait_for(pv_at, 120, f"a PV for {path}")
