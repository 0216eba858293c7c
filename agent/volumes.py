"""Turn a discovered volume into its PersistentVolume manifest.

Pure. Names, capacity rounding, the provisioned-by annotation and the nodeAffinity follow the
upstream provisioner exactly (docs/architecture.md, "Compatibility with the upstream
provisioner"), so PVs it created are recognised and adopted rather than duplicated.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from agent.config import ClassConfig, Config
from agent.discovery import Volume
from agent.identity import IDENTITY_KEYS

HOSTNAME_LABEL = "kubernetes.io/hostname"
PROVISIONED_BY = "pv.kubernetes.io/provisioned-by"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
MANAGED_BY = "localpv-agent"
ANNOTATION_PREFIX = "localpv-agent.io/"

KiB, MiB, GiB = 1 << 10, 1 << 20, 1 << 30
_SUFFIXES = (("Ei", 1 << 60), ("Pi", 1 << 50), ("Ti", 1 << 40), ("Gi", GiB), ("Mi", MiB),
             ("Ki", KiB))


@dataclass(frozen=True)
class NodeInfo:
    """The Node this agent serves, as far as PVs need it."""

    name: str
    uid: str = ""
    hostname: str = ""  # the Node's kubernetes.io/hostname label; defaults to the name
    labels: Mapping[str, str] = field(default_factory=dict)

    @property
    def hostname_label(self) -> str:
        return self.hostname or self.labels.get(HOSTNAME_LABEL) or self.name


@dataclass(frozen=True)
class ClassPolicy:
    """What the StorageClass object says about its PVs."""

    reclaim_policy: str = "Delete"
    mount_options: tuple[str, ...] = ()


def policy_of(storage_class: Mapping[str, Any]) -> ClassPolicy:
    """What a StorageClass object gives its PVs (no reclaimPolicy: Delete, as the API does)."""
    return ClassPolicy(reclaim_policy=storage_class.get("reclaimPolicy") or "Delete",
                       mount_options=tuple(storage_class.get("mountOptions") or ()))


def fnv1a_32(data: bytes) -> int:
    value = 0x811C9DC5
    for byte in data:
        value = ((value ^ byte) * 0x01000193) & 0xFFFFFFFF
    return value


def pv_name(entry_name: str, node_name: str, class_name: str) -> str:
    """The upstream name: FNV-1a 32 over entry+node+class, lowercase hex, no padding."""
    digest = fnv1a_32((entry_name + node_name + class_name).encode("utf-8", "surrogateescape"))
    return f"local-pv-{digest:x}"


def round_capacity(size_bytes: int) -> int:
    """Round down to whole GiB from 10 GiB, whole MiB from 10 MiB, else keep exact bytes."""
    if size_bytes >= 10 * GiB:
        return size_bytes // GiB * GiB
    if size_bytes >= 10 * MiB:
        return size_bytes // MiB * MiB
    return size_bytes


def format_quantity(size_bytes: int) -> str:
    """A Kubernetes quantity in binary units, the largest suffix that is exact."""
    for suffix, unit in _SUFFIXES:
        if size_bytes and size_bytes % unit == 0:
            return f"{size_bytes // unit}{suffix}"
    return str(size_bytes)


def provisioned_by(node: NodeInfo, use_node_name_only: bool) -> str:
    if use_node_name_only or not node.uid:
        return f"local-volume-provisioner-{node.name}"
    return f"local-volume-provisioner-{node.name}-{node.uid}"


def pv_labels(node: NodeInfo, config: Config) -> dict[str, str]:
    labels = {HOSTNAME_LABEL: node.hostname_label, MANAGED_BY_LABEL: MANAGED_BY}
    for key in config.node_labels_for_pv:
        if key in node.labels:
            labels[key] = node.labels[key]
    labels.update(dict(config.labels_for_pv))
    return labels


def node_affinity_terms(node: NodeInfo, cls: ClassConfig) -> list[dict[str, Any]]:
    own = {"matchExpressions": [
        {"key": HOSTNAME_LABEL, "operator": "In", "values": [node.hostname_label]},
    ]}
    return [own, *(_plain(term) for term in cls.selector)]


def identity_annotations(identity: Mapping[str, str]) -> dict[str, str]:
    return {ANNOTATION_PREFIX + k: identity[k] for k in IDENTITY_KEYS if identity.get(k)}


def identity_from_annotations(annotations: Mapping[str, str]) -> dict[str, str]:
    """The disk identity recorded on a PV when it was created."""
    return {k: annotations[ANNOTATION_PREFIX + k] for k in IDENTITY_KEYS
            if annotations.get(ANNOTATION_PREFIX + k)}


def pv_manifest(
    volume: Volume,
    node: NodeInfo,
    config: Config,
    policy: ClassPolicy = ClassPolicy(),
) -> dict[str, Any]:
    """The complete v1 PersistentVolume for a volume of this node."""
    cls = config.storage_class(volume.class_name)
    if cls is None:
        raise KeyError(f"volume {volume.entry_name} names unknown class {volume.class_name}")
    metadata: dict[str, Any] = {
        "name": pv_name(volume.entry_name, node.name, cls.name),
        "labels": pv_labels(node, config),
        "annotations": {
            PROVISIONED_BY: provisioned_by(node, config.use_node_name_only),
            **identity_annotations(volume.identity),
        },
    }
    if config.set_pv_owner_ref:
        if not node.uid:
            raise ValueError("setPVOwnerRef needs the Node's UID")
        metadata["ownerReferences"] = [
            {"apiVersion": "v1", "kind": "Node", "name": node.name, "uid": node.uid},
        ]
    local: dict[str, Any] = {"path": volume.host_path}
    if cls.fs_type:
        local["fsType"] = cls.fs_type
    spec: dict[str, Any] = {
        "capacity": {"storage": format_quantity(round_capacity(volume.capacity_bytes))},
        "accessModes": [cls.access_mode],
        "persistentVolumeReclaimPolicy": policy.reclaim_policy,
        "storageClassName": cls.name,
        "volumeMode": volume.volume_mode,
        "local": local,
        "nodeAffinity": {"required": {"nodeSelectorTerms": node_affinity_terms(node, cls)}},
    }
    if policy.mount_options:
        spec["mountOptions"] = list(policy.mount_options)
    return {"apiVersion": "v1", "kind": "PersistentVolume", "metadata": metadata, "spec": spec}


def _plain(value: Any) -> Any:
    """Deep-copy config structures into plain dicts and lists for serialisation."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, str):
        return [_plain(v) for v in value]
    return value
