"""The Helm chart (charts/localpv-agent), without a cluster: `helm lint`, its default render
equal to daemonset.yaml (and, with remediation on, to remediate.yaml) object by object, every
values file under ci/ rendering valid Kubernetes objects, bad values failing with a clear
message, and an upstream chart user's values file giving the agent the same classes.

One source of truth: daemonset.yaml stays the hand-written manifest (its comments explain each
choice, and the kustomization and the real-node overlay build on it); the chart must render the
same objects, compared here after dropping only the labels Helm adds. The Namespace is the one
object the chart leaves out (`helm install --create-namespace`, as Helm charts do).

helm comes from scripts/build-binaries (built from its Go module, cached with the control plane
binaries); the server-side dry runs and the install are in tests/e2e/test_chart.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from agent.config import ConfigError, parse_config
from tests.conftest import require

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "charts" / "localpv-agent"
VALUES_FILES = sorted((CHART / "ci").glob("*.yaml"))
RELEASE = "localpv-agent"
NAMESPACE = "localpv-agent"
# Labels Helm's conventions add to every object; daemonset.yaml has only app.kubernetes.io/name.
HELM_LABELS = {"app.kubernetes.io/instance", "app.kubernetes.io/managed-by",
               "app.kubernetes.io/version", "helm.sh/chart"}
# Kinds of the Prometheus Operator: no schema in kubernetes-validate.
CRD_KINDS = {"ServiceMonitor", "PodMonitor", "PrometheusRule"}
FALLBACK_K8S_VERSION = "1.33"

Docs = list[dict[str, Any]]


@pytest.fixture(scope="module")
def helm() -> Path:
    """helm from scripts/build-binaries' bin dir, like kubectl for the e2e tests."""
    require(shutil.which("go") is not None or Path("/usr/local/go/bin/go").exists(),
            "Go is needed to build helm (scripts/build-binaries)")
    result = subprocess.run([str(ROOT / "scripts" / "build-binaries")], capture_output=True,
                            text=True, check=False, timeout=3600)
    if result.returncode != 0:
        pytest.fail(f"scripts/build-binaries failed:\n{result.stderr[-4000:]}", pytrace=False)
    path = Path(result.stdout.strip().splitlines()[-1]) / "helm"
    assert path.exists(), f"no helm in {path.parent}"
    return path


def run_helm(helm: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(helm), *args], capture_output=True, text=True, check=False,
                          timeout=120)


def render(helm: Path, *values: Path, sets: Iterable[str] = (),
           release: str = RELEASE, namespace: str = NAMESPACE) -> Docs:
    args = ["template", release, str(CHART), "--namespace", namespace]
    for v in values:
        args += ["--values", str(v)]
    for s in sets:
        args += ["--set", s]
    result = run_helm(helm, *args)
    assert result.returncode == 0, result.stderr
    return [d for d in yaml.safe_load_all(result.stdout) if d]


def key(doc: dict[str, Any]) -> tuple[str, str]:
    return doc["kind"], doc["metadata"]["name"]


def by_key(docs: Docs) -> dict[tuple[str, str], dict[str, Any]]:
    out = {key(d): d for d in docs}
    assert len(out) == len(docs), "two objects with the same kind and name"
    return out


def find(docs: Docs, kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind} {name or ''}, found {len(found)}"
    return found[0]


def _drop_helm_labels(obj: Any) -> Any:
    """The object without the labels Helm adds, wherever a label map sits (metadata, pod
    template, selectors, affinity label selectors)."""
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            kept = v
            if k in ("labels", "matchLabels") and isinstance(v, dict):
                kept = {lk: lv for lk, lv in v.items() if lk not in HELM_LABELS}
            out[k] = _drop_helm_labels(kept)
        return out
    if isinstance(obj, list):
        return [_drop_helm_labels(x) for x in obj]
    return obj


def _configmap_data(doc: dict[str, Any]) -> dict[str, Any]:
    """ConfigMap values parsed: each is a YAML fragment, compared by meaning (daemonset.yaml
    carries comments in them)."""
    return {k: yaml.safe_load(v) for k, v in doc.get("data", {}).items()}


def _normalised(doc: dict[str, Any]) -> dict[str, Any]:
    doc = _drop_helm_labels(doc)
    if doc["kind"] == "ConfigMap":
        doc = {**doc, "data": _configmap_data(doc)}
    return doc


def _diff(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(a.keys() | b.keys(), key=str)
                for d in _diff(a.get(k), b.get(k), f"{path}.{k}")]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b, strict=True))
                for d in _diff(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: manifest {a!r} != chart {b!r}"]


def _manifest(name: str) -> Docs:
    return [d for d in yaml.safe_load_all((ROOT / name).read_text()) if d]


# --- helm lint ---------------------------------------------------------------------------


@pytest.mark.parametrize("values", [None, *VALUES_FILES],
                         ids=["defaults", *(v.stem for v in VALUES_FILES)])
def test_helm_lint_is_clean(helm: Path, values: Path | None) -> None:
    args = ["lint", str(CHART), "--strict", "--namespace", NAMESPACE]
    if values is not None:
        args += ["--values", str(values)]
    result = run_helm(helm, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout, result.stdout


def test_at_least_eight_values_files() -> None:
    assert len(VALUES_FILES) >= 8, VALUES_FILES


# --- one source of truth -------------------------------------------------------------------


def test_default_render_is_daemonset_yaml(helm: Path) -> None:
    """Object by object, only Helm's labels dropped and ConfigMap values compared by meaning;
    the Namespace is daemonset.yaml's alone."""
    manifest = by_key(_manifest("daemonset.yaml"))
    chart = by_key(render(helm))
    assert set(manifest) - set(chart) == {("Namespace", NAMESPACE)}
    assert set(chart) - set(manifest) == set()
    for k, doc in chart.items():
        assert _diff(_normalised(manifest[k]), _normalised(doc)) == [], k


def test_remediation_render_is_remediate_yaml(helm: Path) -> None:
    manifest = by_key(_manifest("remediate.yaml"))
    chart = by_key(render(helm, sets=["remediation.enabled=true"]))
    daemonset = by_key(_manifest("daemonset.yaml"))
    assert set(chart) == (set(manifest) | set(daemonset)) - {("Namespace", NAMESPACE)}
    for k, doc in manifest.items():
        assert _diff(_normalised(doc), _normalised(chart[k])) == [], k


def test_helm_labels_are_all_that_differ(helm: Path) -> None:
    """Every object carries the instance label (two releases never share pods), and the
    DaemonSet selects its pods by it."""
    for doc in render(helm):
        labels = doc["metadata"]["labels"]
        assert labels["app.kubernetes.io/instance"] == RELEASE, key(doc)
        assert labels["app.kubernetes.io/managed-by"] == "Helm", key(doc)
    ds = find(render(helm), "DaemonSet")
    assert ds["spec"]["selector"]["matchLabels"] == {
        "app.kubernetes.io/name": "localpv-agent", "app.kubernetes.io/instance": RELEASE}


# --- every values file ------------------------------------------------------------------------


def _k8s_version() -> str:
    latest = getattr(kubernetes_validate, "latest_version", None)
    if latest is None:
        latest = getattr(getattr(kubernetes_validate, "utils", None), "latest_version", None)
    return str(latest()) if callable(latest) else FALLBACK_K8S_VERSION


@pytest.mark.parametrize("values", VALUES_FILES, ids=[v.stem for v in VALUES_FILES])
def test_values_file_renders_valid_objects(helm: Path, values: Path) -> None:
    docs = render(helm, values)
    version = _k8s_version()
    for doc in docs:
        if doc["kind"] in CRD_KINDS:
            assert doc["apiVersion"] == "monitoring.coreos.com/v1"
            continue
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            pytest.fail(f"{values.name}: {key(doc)} is invalid for Kubernetes {version}: {e}")
    config = parse_config(_configmap_data(find(docs, "ConfigMap", _config_name(docs))))
    assert config.classes


def _config_name(docs: Docs) -> str:
    ds = find(docs, "DaemonSet")
    volumes = ds["spec"]["template"]["spec"]["volumes"]
    return str(next(v["configMap"]["name"] for v in volumes if "configMap" in v
                    and v["name"] == "provisioner-config"))


def _pod(docs: Docs) -> dict[str, Any]:
    spec: dict[str, Any] = find(docs, "DaemonSet")["spec"]["template"]["spec"]
    return spec


def _container(docs: Docs) -> dict[str, Any]:
    (c,) = _pod(docs)["containers"]
    return dict(c)


def test_upstream_values_file_gives_the_agent_the_same_classes(helm: Path) -> None:
    """ci/upstream-values.yaml is written for the upstream chart; the ConfigMap rendered from
    it, read by the agent's own parser, has the classes that chart's ConfigMap would have."""
    values = yaml.safe_load((CHART / "ci" / "upstream-values.yaml").read_text())
    docs = render(helm, CHART / "ci" / "upstream-values.yaml")
    config = parse_config(_configmap_data(find(docs, "ConfigMap", _config_name(docs))))
    got = {c.name: c for c in config.classes}
    assert set(got) == {c["name"] for c in values["classes"]}
    for cls in values["classes"]:
        c = got[cls["name"]]
        assert c.host_dir == cls["hostDir"]
        assert c.mount_dir == cls.get("mountDir", cls["hostDir"])
        assert c.volume_mode == cls.get("volumeMode", "Filesystem")
        assert list(c.block_cleaner_command) == cls["blockCleanerCommand"]
    fast = got["fast-disks"]
    assert fast.fs_type == "ext4"
    assert config.labels_for_pv == (("pv-labels", "can-be-selected"),)
    assert config.node_labels_for_pv == ("topology.kubernetes.io/zone",)
    assert config.min_resync_period == 300
    # Every class directory is mounted from the host with HostToContainer propagation.
    pod, container = _pod(docs), _container(docs)
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    for cls in values["classes"]:
        mount = mounts[cls.get("mountDir", cls["hostDir"])]
        assert mount["mountPropagation"] == "HostToContainer"
        assert volumes[mount["name"]]["hostPath"]["path"] == cls["hostDir"]
    # The StorageClasses the upstream chart would create, default class included.
    fast_sc = find(docs, "StorageClass", "fast-disks")
    assert fast_sc["metadata"]["annotations"] == {
        "storageclass.kubernetes.io/is-default-class": "true"}
    assert fast_sc["reclaimPolicy"] == "Delete"
    assert find(docs, "StorageClass", "block-disks")["volumeBindingMode"] == (
        "WaitForFirstConsumer")
    assert container["image"] == values["image"]
    assert container["imagePullPolicy"] == "Always"
    assert container["resources"] == values["resources"]
    assert "tolerations" not in pod  # tolerations: [] as written


def test_classes_sharing_a_directory_share_one_mount(helm: Path) -> None:
    docs = render(helm, CHART / "ci" / "storage-classes.yaml")
    container = _container(docs)
    paths = [m["mountPath"] for m in container["volumeMounts"]]
    assert paths.count("/mnt/nvme") == 1
    assert "/hdd" in paths
    names = {sc["metadata"]["name"] for sc in docs if sc["kind"] == "StorageClass"}
    assert names == {"nvme-fs", "nvme-raw"}  # hdd: storageClass: false
    config = parse_config(_configmap_data(find(docs, "ConfigMap")))
    assert {c.name: c.name_patterns for c in config.classes}["nvme-raw"] == ("raw-*", "blk-*")
    result = run_helm(helm, "template", RELEASE, str(CHART), "--set-json",
                      'classes=[{"name":"a","hostDir":"/mnt/a","mountDir":"/m"},'
                      '{"name":"b","hostDir":"/mnt/b","mountDir":"/m"}]')
    assert result.returncode != 0
    assert "another class mounts /mnt/a there" in result.stderr


def test_startup_taint_adds_its_toleration_and_only_nodes_patch(helm: Path) -> None:
    plain = find(render(helm), "ClusterRole")["rules"]
    docs = render(helm, CHART / "ci" / "taint-and-jobs.yaml")
    rules = find(docs, "ClusterRole")["rules"]
    added = [r for r in rules if r not in plain]
    assert added == [{"apiGroups": [""], "resources": ["nodes"], "verbs": ["patch"]}]
    assert [r for r in plain if r not in rules] == []
    key_ = "localpv.example.com/agent-not-ready"
    assert _pod(docs)["tolerations"] == [{"key": key_, "operator": "Exists"}]
    data = find(docs, "ConfigMap")["data"]
    assert data["removeNodeNotReadyTaint"] == "true"
    assert data["provisionerNotReadyNodeTaintKey"] == key_
    config = parse_config(_configmap_data(find(docs, "ConfigMap")))
    assert config.remove_node_not_ready_taint
    assert config.use_job_for_cleaning and config.set_pv_owner_ref and config.use_node_name_only
    assert config.job_tolerations == ({"key": "dedicated", "operator": "Exists"},)


def test_agent_options_reach_the_command_line(helm: Path) -> None:
    docs = render(helm, CHART / "ci" / "agent-options.yaml")
    pod, container = _pod(docs), _container(docs)
    assert container["args"] == [
        "run", "--config", "/etc/provisioner/config", "--listen-address", ":9101",
        "--log-format=json", "--discovery-mode=poll", "--discovery-period=5",
        "--withdraw-removed-classes", "--clean-concurrency=4", "--clean-timeout=7200"]
    assert pod["hostNetwork"] is True and pod["dnsPolicy"] == "ClusterFirstWithHostNet"
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert volumes["udev"]["hostPath"]["path"] == "/run/udev"
    assert volumes["state"]["hostPath"]["path"] == "/var/lib/localpv-state"
    assert container["ports"][0]["containerPort"] == 9101
    assert container["image"] == "registry.example.com/localpv-agent:0.1.0"  # tpl applied
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["JOB_CONTAINER_IMAGE"] == container["image"]
    assert env["KUBECONFIG"] == "/etc/kubernetes/agent.kubeconfig"
    annotations = find(docs, "DaemonSet")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "9101"


def test_no_rbac_creates_no_rbac_and_uses_the_named_account(helm: Path) -> None:
    docs = render(helm, CHART / "ci" / "no-rbac.yaml")
    kinds = {d["kind"] for d in docs}
    assert not kinds & {"ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role",
                        "RoleBinding"}
    assert _pod(docs)["serviceAccountName"] == "storage-admin"


def test_names_and_remediation(helm: Path) -> None:
    docs = render(helm, CHART / "ci" / "names-remediation.yaml")
    names = {d["metadata"]["name"] for d in docs if d["kind"] != "StorageClass"}
    assert names <= {"node-disks", "node-disks-config", "node-disks-remediate"}, names
    deploy = find(docs, "Deployment")
    (c,) = deploy["spec"]["template"]["spec"]["containers"]
    assert "--lease-name=node-disks-remediate" in c["args"]
    assert "--storageclass-names=local-storage" in c["args"]
    assert {"--dry-run", "--trigger-not-ready", "--no-trigger-out-of-service",
            "--max-claims-per-minute=5", "--max-unavailable-nodes=2"} <= set(c["args"])
    role = find(docs, "Role", "node-disks-remediate")
    assert role["rules"][1]["resourceNames"] == ["node-disks-remediate"]
    assert deploy["spec"]["replicas"] == 3
    extra = {"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get"]}
    assert extra in find(docs, "ClusterRole", "node-disks")["rules"]


def test_upstream_node_cleanup_values_run_remediation(helm: Path) -> None:
    docs = render(helm, CHART / "ci" / "upstream-node-cleanup.yaml")
    (c,) = find(docs, "Deployment")["spec"]["template"]["spec"]["containers"]
    assert c["args"][:3] == ["remediate", "--storageclass-names=local-storage",
                             "--listen-address=:8080"]
    assert "--pvc-deletion-delay=60s" in c["args"]


def test_monitoring_objects_carry_the_repo_files(helm: Path) -> None:
    docs = render(helm, CHART / "ci" / "monitoring.yaml")
    rules = yaml.safe_load((CHART / "files" / "prometheus-rules.yaml").read_text())
    assert find(docs, "PrometheusRule")["spec"] == rules["spec"]
    board = find(docs, "ConfigMap", "localpv-agent-dashboard")
    assert board["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(board["data"]["localpv-agent.json"]) == json.loads(
        (CHART / "files" / "grafana-dashboard.json").read_text())
    monitor = find(docs, "ServiceMonitor")
    service = find(docs, "Service")
    assert monitor["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    assert service["spec"]["selector"] == find(docs, "DaemonSet")["spec"]["selector"][
        "matchLabels"]
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert find(docs, "PodMonitor")["spec"]["podMetricsEndpoints"][0]["port"] == "metrics"
    # config/monitoring keeps its paths: links to the chart's files.
    for name in ("prometheus-rules.yaml", "grafana-dashboard.json"):
        link = ROOT / "config" / "monitoring" / name
        assert link.resolve() == (CHART / "files" / name).resolve()


# --- bad values fail with a clear message ------------------------------------------------


@pytest.mark.parametrize(("sets", "message"), [
    (["classes[0].name=local-storage", "classes[0].hostDir=mnt/disks"],
     "/classes/0/hostDir"),
    (["classes[0].name=local-storage", "classes[0].hostDir=/mnt/disks",
      "classes[0].volumeMode=Blok"], "/classes/0/volumeMode"),
    (["classes[0].name=Local_Storage", "classes[0].hostDir=/mnt/disks"], "/classes/0/name"),
    (["classes[0].name=a", "classes[0].hostDir=/mnt/a",
      "classes[0].storageClass.reclaimPolicy=Recycle"], "/classes/0/storageClass"),
    (["logFormat=xml"], "/logFormat"),
    (["metrics.port=70000"], "/metrics/port"),
    (["minResyncPeriod=five minutes"], "/minResyncPeriod"),
    (["enableWindows=true"], "/enableWindows"),
    (["imagePullPolicy=Sometimes"], "/imagePullPolicy"),
    (["tolerationz[0].operator=Exists"], "tolerationz"),
])
def test_bad_values_fail_naming_the_value(helm: Path, sets: list[str], message: str) -> None:
    args = ["template", RELEASE, str(CHART)]
    for s in sets:
        args += ["--set", s]
    result = run_helm(helm, *args)
    assert result.returncode != 0, f"{sets} rendered"
    assert "values don't meet the specifications of the schema" in result.stderr, result.stderr
    assert message in result.stderr, result.stderr


def test_startup_taint_without_its_key_fails(helm: Path) -> None:
    result = run_helm(helm, "template", RELEASE, str(CHART), "--set",
                      "removeNodeNotReadyTaint=true")
    assert result.returncode != 0
    assert "needs provisionerNotReadyNodeTaintKey" in result.stderr


def test_empty_classes_fail(helm: Path) -> None:
    result = run_helm(helm, "template", RELEASE, str(CHART), "--set-json", "classes=[]")
    assert result.returncode != 0
    assert "/classes" in result.stderr


def test_parse_config_rejects_what_the_schema_rejects() -> None:
    """The schema is no looser than the agent on a class's volumeMode (a guard that the two
    agree on the one enum both check)."""
    with pytest.raises(ConfigError):
        parse_config({"storageClassMap": {"a": {"hostDir": "/mnt/a", "volumeMode": "Blok"}}})
    schema = json.loads((CHART / "values.schema.json").read_text())
    modes = schema["properties"]["classes"]["items"]["properties"]["volumeMode"]["enum"]
    for mode in modes:
        parse_config({"storageClassMap": {"a": {"hostDir": "/mnt/a", "volumeMode": mode}}})
