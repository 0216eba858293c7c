"""The DaemonSet for real: a real node (containerd + kubelet) runs the agent's image, built from
the Dockerfile, deployed from daemonset.yaml through a kustomize overlay.

One session brings the cluster up with ``scripts/cluster up --real-node`` (as a user would), and
checks at the end that ``scripts/cluster down`` left the host as it was. Between the two: the
agent pod and its logs; a disk mounted on the host after the pod started reaching the agent
through mount propagation; the example StatefulSet keeping each replica's data across pod
deletions; a deleted claim's volume cleaned by the agent in its pod and offered again; a
ConfigMap edit reaching the agent through the kubelet, and a bad one rejected; a rolling update
of the DaemonSet that leaves every PV untouched.

The example StatefulSet (config/examples/statefulset.yaml) is adapted in size (16Mi claims on
64 MiB disks) and, since nothing can be pulled here, runs the agent's image with a shell instead
of nginx.
"""

from __future__ import annotations

import functools
import json
import os
import secrets
import shutil
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from devkit.agents import REPO, wait_for
from devkit.disks import Disks, sh
from devkit.realnode import NODE_NAME, _Layout, host_snapshot
from tests.conftest import require

pytestmark = [pytest.mark.e2e, pytest.mark.root]

NS = "localpv-agent"
DS = "localpv-agent"
STS = "example-sts1"
REPLICAS = 3
MOUNT_PATH = "/usr/share/nginx/html"  # the example's volume mount, kept
TOOLS = ("containerd", "ctr", "runc", "buildah", "mmdebstrap", "unshare", "losetup", "mkfs.ext4")


@dataclass
class RealCluster:
    """The cluster ``scripts/cluster up --real-node`` started, driven with kubectl."""

    workdir: Path
    kubeconfig: Path
    bin_dir: Path

    @property
    def layout(self) -> _Layout:
        return _Layout(self.workdir)

    @property
    def disks_dir(self) -> Path:
        return self.layout.disks

    def kubectl(self, *args: str, input: str | None = None, check: bool = True,
                timeout: float = 120) -> str:
        proc = subprocess.run([str(self.bin_dir / "kubectl"), f"--kubeconfig={self.kubeconfig}",
                               *args], input=input, capture_output=True, text=True,
                              timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)}: {proc.stderr.strip()}")
        return proc.stdout

    def get(self, *args: str) -> Any:
        return json.loads(self.kubectl("get", "-o", "json", *args))

    def items(self, *args: str) -> list[dict[str, Any]]:
        return list(self.get(*args)["items"])

    def pvs(self) -> dict[str, dict[str, Any]]:
        return {pv["metadata"]["name"]: pv for pv in self.items("pv")}

    def pv_at(self, path: Path) -> dict[str, Any] | None:
        found = [pv for pv in self.pvs().values()
                 if pv["spec"].get("local", {}).get("path") == str(path)]
        assert len(found) <= 1, f"two PVs for {path}: {found}"
        return found[0] if found else None

    def agent_pod(self) -> dict[str, Any]:
        pods = [p for p in self.items("pods", "-n", NS, "-l", "app.kubernetes.io/name=" + DS)
                if p["spec"].get("nodeName") == NODE_NAME
                and not p["metadata"].get("deletionTimestamp")]
        assert len(pods) == 1, [p["metadata"]["name"] for p in pods]
        return pods[0]

    def agent_log(self) -> str:
        return self.kubectl("logs", "-n", NS, self.agent_pod()["metadata"]["name"])

    def events(self, reason: str) -> list[dict[str, Any]]:
        return [e for e in self.items("events", "-A") if e.get("reason") == reason]

    def metrics(self) -> str:
        state = json.loads(self.layout.state_file.read_text())
        url = f"http://127.0.0.1:{state['metrics_port']}/metrics"
        with urllib.request.urlopen(url, timeout=10) as resp:
            return str(resp.read().decode())

    def diagnostics(self) -> str:
        parts = [self.kubectl("get", "pods,pv,pvc", "-A", "-o", "wide", check=False)]
        parts.append(self.kubectl("logs", "-n", NS, "-l", "app.kubernetes.io/name=" + DS,
                                  "--tail=40", check=False))
        return "\n".join(parts)


def _ready(pod: dict[str, Any]) -> bool:
    conditions = pod.get("status", {}).get("conditions", [])
    return pod.get("status", {}).get("phase") == "Running" and any(
        c["type"] == "Ready" and c["status"] == "True" for c in conditions)


@pytest.fixture(scope="session")
def real_cluster(bin_dir: Path, tmp_path_factory: pytest.TempPathFactory
                 ) -> Iterator[RealCluster]:
    """``scripts/cluster up --real-node`` once per session; ``down`` must leave the host as
    it found it."""
    require(os.geteuid() == 0, "the real node needs root")
    missing = [t for t in TOOLS if shutil.which(t) is None]
    require(not missing, f"missing {missing}: run scripts/install-system-deps")
    require((bin_dir / "kubelet").exists(), f"no kubelet in {bin_dir}: run scripts/build-binaries")
    workdir = tmp_path_factory.mktemp("real-node")
    before = host_snapshot(workdir)
    cluster = [str(REPO / "scripts" / "cluster")]
    up = subprocess.run([*cluster, "up", "--real-node", "--nodes", "0", "--dir", str(workdir),
                         "--bin-dir", str(bin_dir)], capture_output=True, text=True,
                        timeout=3600, check=False)
    try:
        assert up.returncode == 0, f"cluster up failed:\n{up.stderr[-6000:]}"
        kubeconfig = Path(up.stdout.strip().splitlines()[-1])
        assert kubeconfig.name == "admin.kubeconfig", up.stdout
        yield RealCluster(workdir, kubeconfig, bin_dir)
    finally:
        down = subprocess.run([*cluster, "down", "--dir", str(workdir)], capture_output=True,
                              text=True, timeout=600, check=False)
        after = host_snapshot(workdir)
    assert down.returncode == 0, down.stderr
    changed = {k: (before[k], after.get(k)) for k in before if before[k] != after.get(k)}
    assert not changed, f"scripts/cluster down left the host changed: {changed}"
    assert not workdir.exists() or not any(workdir.iterdir()), list(workdir.iterdir())


@pytest.fixture(scope="module")
def disks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Disks]:
    d = Disks(tmp_path_factory.mktemp("real-node-disks"))
    yield d
    d.cleanup()


def _add_disk(c: RealCluster, disks: Disks, name: str) -> Path:
    """An ext4 loop device mounted by UUID under the node's discovery dir, as the README says."""
    device = disks.loop(name, 64, fs="ext4")
    uuid = sh("blkid", "-s", "UUID", "-o", "value", device)
    return disks.mount(device, c.disks_dir / uuid)


def _wait_pv(c: RealCluster, path: Path, timeout: float = 120) -> dict[str, Any]:
    return wait_for(lambda: c.pv_at(path) or {}, timeout, f"a PV for {path}", c.diagnostics)


# ---------------------------------------------------------------------------------- tests


def test_agent_pod_is_running_ready_and_logs_its_start(real_cluster: RealCluster) -> None:
    c = real_cluster
    pod = c.agent_pod()
    assert _ready(pod), pod["status"]
    (status,) = pod["status"]["containerStatuses"]
    assert status["ready"] and "running" in status["state"]
    assert status["image"].endswith("localpv-agent:dev"), status["image"]
    assert pod["spec"]["hostNetwork"] is True
    log = c.agent_log()  # through the apiserver's kubelet client certificate
    assert f"serving node {NODE_NAME}" in log, log
    node = c.get("node", NODE_NAME)
    assert "kwok.x-k8s.io/node" not in node["metadata"].get("annotations", {})
    assert node["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://")


def _diff(a: Any, b: Any, path: str = "") -> set[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: set[str] = set()
        for k in a.keys() | b.keys():
            out |= _diff(a.get(k), b.get(k), f"{path}.{k}")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        pairs = enumerate(zip(a, b, strict=True))
        return set().union(*(_diff(x, y, f"{path}[{i}]") for i, (x, y) in pairs))
    return set() if a == b else {path}


def test_kustomization_beside_daemonset_yaml_renders_it_unchanged(bin_dir: Path) -> None:
    """`kubectl apply -k .` in the repo deploys exactly daemonset.yaml."""
    rendered = subprocess.run([str(bin_dir / "kubectl"), "kustomize", str(REPO)],
                              capture_output=True, text=True, check=True, timeout=60).stdout
    key = lambda d: (d["kind"], d["metadata"]["name"])  # noqa: E731
    base = [d for d in yaml.safe_load_all((REPO / "daemonset.yaml").read_text()) if d]
    assert sorted(map(key, yaml.safe_load_all(rendered))) == sorted(map(key, base))
    docs = {key(d): d for d in yaml.safe_load_all(rendered)}
    assert all(docs[key(d)] == d for d in base)


def test_overlay_changes_only_what_this_environment_forces(real_cluster: RealCluster) -> None:
    c = real_cluster
    rendered = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(
        c.kubectl("kustomize", str(c.layout.overlay))) if d}
    base = {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(
        (REPO / "daemonset.yaml").read_text()) if d}
    assert rendered.keys() == base.keys()
    changed = {f"{kind}/{name}{p}" for (kind, name), doc in base.items()
               for p in _diff(doc, rendered[(kind, name)])}
    pod = ".spec.template.spec"
    ds = base[("DaemonSet", DS)]["spec"]["template"]["spec"]
    env = [e["name"] for e in ds["containers"][0]["env"]]
    volumes = [v["name"] for v in ds["volumes"]]
    assert changed == {
        "ConfigMap/localpv-agent-config.data.storageClassMap",  # hostDir under the node dir
        f"DaemonSet/{DS}.spec.template.metadata.annotations.prometheus.io/port",
        f"DaemonSet/{DS}{pod}.hostNetwork",
        f"DaemonSet/{DS}{pod}.dnsPolicy",
        f"DaemonSet/{DS}{pod}.containers[0].image",
        f"DaemonSet/{DS}{pod}.containers[0].args[4]",  # --listen-address :<port>
        f"DaemonSet/{DS}{pod}.containers[0].ports[0].containerPort",
        f"DaemonSet/{DS}{pod}.containers[0].env",  # KUBERNETES_SERVICE_HOST/PORT added
        f"DaemonSet/{DS}{pod}.volumes[{volumes.index('local-disks')}].hostPath.path",
        f"DaemonSet/{DS}{pod}.volumes[{volumes.index('state')}].hostPath.path",
    }
    new_env = {e["name"]: e for e in rendered[("DaemonSet", DS)]["spec"]["template"]["spec"][
        "containers"][0]["env"]}
    assert set(new_env) == {*env, "KUBERNETES_SERVICE_HOST", "KUBERNETES_SERVICE_PORT"}
    assert new_env["KUBERNETES_SERVICE_HOST"]["value"] == "127.0.0.1"
    assert new_env["JOB_CONTAINER_IMAGE"]["value"].endswith("localpv-agent:dev")


def test_disk_mounted_after_the_pod_started_becomes_a_pv(real_cluster: RealCluster,
                                                        disks: Disks) -> None:
    """Mount propagation: the host mount reaches the agent's container (HostToContainer)."""
    c = real_cluster
    pod = c.agent_pod()
    mount = _add_disk(c, disks, "late")
    pv = _wait_pv(c, mount)
    assert pv["spec"]["storageClassName"] == "local-storage"
    terms = pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"]
    assert terms[0]["matchExpressions"][0]["values"] == [NODE_NAME]
    assert c.agent_pod()["metadata"]["uid"] == pod["metadata"]["uid"], "the pod was restarted"
    # Unmounted while unbound: the PV is withdrawn.
    name = pv["metadata"]["name"]
    sh("umount", str(mount))
    wait_for(lambda: name not in c.pvs(), 120, f"PV {name} withdrawn", c.diagnostics)


def _statefulset_manifest(image: str) -> str:
    docs = [d for d in yaml.safe_load_all(
        (REPO / "config" / "examples" / "statefulset.yaml").read_text()) if d]
    sts = next(d for d in docs if d["kind"] == "StatefulSet")
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    claim["spec"]["resources"]["requests"]["storage"] = "16Mi"  # our disks are 64 MiB
    (container,) = sts["spec"]["template"]["spec"]["containers"]
    container["image"] = image  # nginx cannot be pulled here
    container["command"] = ["sh", "-c", 'trap "exit 0" TERM; while :; do sleep 1; done']
    return yaml.safe_dump_all(docs)


@pytest.fixture(scope="module")
def statefulset(real_cluster: RealCluster, disks: Disks) -> Iterator[dict[str, str]]:
    """The example StatefulSet on three fresh disks; each pod wrote a random token into its
    volume. Yields pod name -> token."""
    c = real_cluster
    mounts = [_add_disk(c, disks, f"sts-{i}") for i in range(REPLICAS)]
    for m in mounts:
        _wait_pv(c, m)
    image = c.agent_pod()["spec"]["containers"][0]["image"]
    c.kubectl("apply", "-f", "-", input=_statefulset_manifest(image))
    tokens = {}
    try:
        for i in range(REPLICAS):
            pod = f"{STS}-{i}"
            wait_for(functools.partial(_pod_ready, c, pod), 300, f"{pod} Ready", c.diagnostics)
            tokens[pod] = secrets.token_hex(16)
            c.kubectl("exec", pod, "--", "sh", "-c",
                      f"printf %s {tokens[pod]} > {MOUNT_PATH}/token")
        yield tokens
    finally:
        c.kubectl("delete", "statefulset", STS, "--wait=true", "--timeout=120s", check=False)
        c.kubectl("delete", "pvc", "-l", f"app={STS}", "--wait=false", check=False)
        wait_for(lambda: not c.items("pods", "-l", f"app={STS}"), 180, "StatefulSet pods gone")


def _pod_ready(c: RealCluster, name: str, not_uid: str = "") -> bool:
    """Pod ``name`` exists (with another UID than ``not_uid``), is Running and Ready."""
    out = c.kubectl("get", "pod", name, "-o", "json", "--ignore-not-found")
    if not out.strip():
        return False
    pod = json.loads(out)
    return bool(pod["metadata"]["uid"] != not_uid and _ready(pod))


def _claim_pv(c: RealCluster, pod: str) -> dict[str, Any]:
    pvc = c.get("pvc", f"local-vol-{pod}")
    return dict(c.get("pv", pvc["spec"]["volumeName"]))


def test_statefulset_pods_keep_their_data_across_deletions(real_cluster: RealCluster,
                                                           statefulset: dict[str, str]) -> None:
    c = real_cluster
    for pod, token in statefulset.items():
        path = Path(_claim_pv(c, pod)["spec"]["local"]["path"])
        assert path.parent == c.disks_dir
        assert (path / "token").read_text() == token, f"{pod}'s token is not on the host disk"
    for round_ in range(3):
        uids = {p: c.get("pod", p)["metadata"]["uid"] for p in statefulset}
        c.kubectl("delete", "pods", "-l", f"app={STS}", "--wait=false")
        for pod, token in statefulset.items():
            uid = uids[pod]
            wait_for(functools.partial(_pod_ready, c, pod, uid), 300,
                     f"{pod} back (round {round_ + 1})", c.diagnostics)
            assert c.get("pod", pod)["spec"]["nodeName"] == NODE_NAME
            read = c.kubectl("exec", pod, "--", "cat", f"{MOUNT_PATH}/token")
            assert read == token, f"round {round_ + 1}: {pod} read {read!r}, wrote {token!r}"


def test_deleted_claim_is_cleaned_by_the_agent_and_offered_again(
        real_cluster: RealCluster, statefulset: dict[str, str]) -> None:
    c = real_cluster
    last = f"{STS}-{REPLICAS - 1}"
    pv = _claim_pv(c, last)
    path = Path(pv["spec"]["local"]["path"])
    assert (path / "token").read_text() == statefulset[last]
    c.kubectl("scale", "statefulset", STS, f"--replicas={REPLICAS - 1}")
    wait_for(lambda: not c.kubectl("get", "pod", last, "--ignore-not-found", "-o", "name"),
             180, f"{last} gone", c.diagnostics)
    c.kubectl("delete", "pvc", f"local-vol-{last}", "--wait=true", "--timeout=120s")

    def offered_again() -> dict[str, Any] | None:
        new = c.pv_at(path)
        if new and new["metadata"]["uid"] != pv["metadata"]["uid"] and new["status"].get(
                "phase") == "Available":
            return new
        return None

    wait_for(offered_again, 180, f"{path} cleaned and offered again", c.diagnostics)
    assert not (path / "token").exists(), "the released volume still holds the token"
    # Cleaned by the agent in its pod (the released PV named in its log, an Event from it).
    assert f"for released PV {pv['metadata']['name']}" in c.agent_log()
    cleaned = [e for e in c.events("VolumeCleaned")
               if f"PV {pv['metadata']['name']} deleted" in e["message"]]
    assert cleaned, "no VolumeCleaned Event for the released PV"


def _configmap_data(c: RealCluster) -> dict[str, str]:
    return dict(c.get("configmap", "-n", NS, "localpv-agent-config")["data"])


def _set_configmap(c: RealCluster, data: dict[str, str]) -> None:
    patch = json.dumps([{"op": "replace", "path": "/data", "value": data}])
    c.kubectl("patch", "configmap", "-n", NS, "localpv-agent-config", "--type=json",
              "-p", patch)


def _reloads(c: RealCluster, result: str) -> int:
    for line in c.metrics().splitlines():
        if line.startswith("localpv_agent_config_reloads_total") and f'"{result}"' in line:
            return int(float(line.split()[-1]))
    return 0


def test_configmap_edits_reach_the_agent_through_the_kubelet(real_cluster: RealCluster,
                                                            disks: Disks) -> None:
    c = real_cluster
    good = _configmap_data(c)
    applied, rejected = _reloads(c, "applied"), _reloads(c, "rejected")
    edited = {**good, "labelsForPV": "reloaded-by: kubelet\n"}
    _set_configmap(c, edited)
    try:
        wait_for(lambda: _reloads(c, "applied") > applied, 180,
                 "the agent to reload the edited ConfigMap", c.diagnostics)
        reloaded = wait_for(lambda: [e for e in c.events("ConfigReloaded")
                                     if e["involvedObject"]["name"] == NODE_NAME], 60,
                            "the ConfigReloaded Event", c.diagnostics)
        assert reloaded[-1]["type"] == "Normal"
        first = _wait_pv(c, _add_disk(c, disks, "after-edit"))
        assert first["metadata"]["labels"].get("reloaded-by") == "kubelet"

        bad = {**edited, "storageClassMap": "local-storage:\n  hostDir: /x\n  volumeMode: Blok\n"}
        _set_configmap(c, bad)
        wait_for(lambda: _reloads(c, "rejected") > rejected, 180,
                 "the agent to reject the bad ConfigMap", c.diagnostics)
        events = [e for e in c.events("ConfigRejected")
                  if e["involvedObject"]["name"] == NODE_NAME]
        assert events, "no ConfigRejected Event"
        assert "Blok" in events[-1]["message"]
        # The last good config stays in force: still Ready, new PVs still labelled.
        assert _ready(c.agent_pod())
        second = _wait_pv(c, _add_disk(c, disks, "after-bad-edit"))
        assert second["metadata"]["labels"].get("reloaded-by") == "kubelet"
        assert second["spec"]["local"]["path"].startswith(str(c.disks_dir))
    finally:
        applied_now = _reloads(c, "applied")
        _set_configmap(c, good)
        wait_for(lambda: _reloads(c, "applied") > applied_now, 180,
                 "the agent to reload the original ConfigMap", c.diagnostics)


def test_rolling_update_replaces_the_pod_and_touches_no_pv(real_cluster: RealCluster) -> None:
    c = real_cluster
    before = {n: (pv["metadata"]["uid"], pv["metadata"]["resourceVersion"])
              for n, pv in c.pvs().items()}
    assert before, "no PVs to compare"
    old = c.agent_pod()["metadata"]["uid"]
    c.kubectl("set", "env", f"daemonset/{DS}", "-n", NS, f"ROLLOUT_MARK={time.time_ns()}")
    c.kubectl("rollout", "status", f"daemonset/{DS}", "-n", NS, "--timeout=300s", timeout=330)
    def replaced() -> dict[str, Any]:
        pod = c.agent_pod()
        return pod if pod["metadata"]["uid"] != old and _ready(pod) else {}

    pod = wait_for(replaced, 300, "the new agent pod Ready", c.diagnostics)
    env = {e["name"] for e in pod["spec"]["containers"][0]["env"]}
    assert "ROLLOUT_MARK" in env
    after = {n: (pv["metadata"]["uid"], pv["metadata"]["resourceVersion"])
             for n, pv in c.pvs().items()}
    assert after == before, "the rolling update created, changed or deleted PVs"
