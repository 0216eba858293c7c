"""A PersistentVolume as the agent reads it: the fields it uses, and the cleaning record it keeps.

Pure. PVs cross the API boundary as plain dicts (the API's JSON). `PersistentVolume` documents
the part of that shape the agent relies on; the accessors below are the one place that knows
where each field lives, and they tolerate a field that is missing or null. The cleaning record
is the agent's only state on a PV: JSON in one annotation, which anyone who may patch PVs can
write, so it is parsed defensively and only well-typed values count.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, TypedDict

from agent.volumes import (
    ANNOTATION_PREFIX,
    HOSTNAME_LABEL,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    PROVISIONED_BY,
    NodeInfo,
    identity_from_annotations,
)

PV = Mapping[str, Any]  # a PersistentVolume object as the API returns it
CLEANING_ANNOTATION = ANNOTATION_PREFIX + "cleaning"


class ObjectMeta(TypedDict, total=False):
    name: str
    uid: str
    resourceVersion: str
    labels: dict[str, str]
    annotations: dict[str, str]
    deletionTimestamp: str


class ClaimRef(TypedDict, total=False):
    name: str
    namespace: str
    uid: str


class LocalSource(TypedDict):
    path: str


class PVSpec(TypedDict, total=False):
    local: LocalSource
    claimRef: ClaimRef
    storageClassName: str
    volumeMode: str  # Filesystem or Block
    persistentVolumeReclaimPolicy: str  # Delete, Retain or Recycle
    nodeAffinity: dict[str, Any]  # required.nodeSelectorTerms[].matchExpressions[]
    capacity: dict[str, str]  # {"storage": a quantity}


class PVStatus(TypedDict, total=False):
    phase: str  # Pending, Available, Bound, Released, Failed


class PersistentVolume(TypedDict, total=False):
    """The fields of a PV the agent reads; the accessors below read them."""

    metadata: ObjectMeta
    spec: PVSpec
    status: PVStatus


def _meta(pv: PV) -> Mapping[str, Any]:
    return pv.get("metadata") or {}


def _spec(pv: PV) -> Mapping[str, Any]:
    return pv.get("spec") or {}


def name(pv: PV) -> str:
    return str(_meta(pv).get("name") or "")


def uid(pv: PV) -> str:
    return str(_meta(pv).get("uid") or "")


def resource_version(pv: PV) -> str:
    return str(_meta(pv).get("resourceVersion") or "")


def labels_of(pv: PV) -> Mapping[str, str]:
    return _meta(pv).get("labels") or {}


def annotations_of(pv: PV) -> Mapping[str, str]:
    return _meta(pv).get("annotations") or {}


def deleting(pv: PV) -> bool:
    """The API is deleting it (finalizers pending): never act on such a PV."""
    return bool(_meta(pv).get("deletionTimestamp"))


def phase(pv: PV) -> str:
    """The PV's phase, "" when the API has not set one yet."""
    return str((pv.get("status") or {}).get("phase") or "")


def claim_ref(pv: PV) -> Mapping[str, str] | None:
    claim = _spec(pv).get("claimRef")
    return claim if isinstance(claim, Mapping) else None


def storage_class(pv: PV) -> str:
    return str(_spec(pv).get("storageClassName") or "")


def volume_mode(pv: PV) -> str:
    return str(_spec(pv).get("volumeMode") or "Filesystem")


def reclaim_policy(pv: PV) -> str:
    return str(_spec(pv).get("persistentVolumeReclaimPolicy", "Delete"))


def capacity(pv: PV) -> str:
    """The PV's `spec.capacity.storage` as written, "" when absent."""
    return str((_spec(pv).get("capacity") or {}).get("storage") or "")


_BINARY = {"Ki": 1 << 10, "Mi": 1 << 20, "Gi": 1 << 30, "Ti": 1 << 40, "Pi": 1 << 50,
           "Ei": 1 << 60}
_DECIMAL = {"k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "P": 10**15, "E": 10**18}


def quantity_bytes(text: str) -> int | None:
    """A whole-number Kubernetes quantity ("10Gi", "500M", "1073741824") in bytes; None for
    anything else (fractions, exponents, milli-units), which the agent never writes and so
    never compares."""
    text = text.strip()
    for table in (_BINARY, _DECIMAL):
        for suffix, unit in table.items():
            if text.endswith(suffix) and text[:-len(suffix)].isdigit():
                return int(text[:-len(suffix)]) * unit
    return int(text) if text.isdigit() else None


def local_path(pv: PV) -> str | None:
    path = (_spec(pv).get("local") or {}).get("path")
    return path if isinstance(path, str) else None


def identity(pv: PV) -> dict[str, str]:
    """The disk identity recorded on the PV (`localpv-agent.io/<key>` annotations)."""
    return identity_from_annotations(annotations_of(pv))


def affinity_hostnames(pv: PV) -> set[str]:
    """Hostnames the PV's required nodeAffinity pins it to (any term)."""
    required = (_spec(pv).get("nodeAffinity") or {}).get("required") or {}
    names: set[str] = set()
    for term in required.get("nodeSelectorTerms") or []:
        for expr in term.get("matchExpressions") or []:
            if expr.get("key") == HOSTNAME_LABEL and expr.get("operator") == "In":
                names.update(expr.get("values") or [])
    return names


def is_this_nodes(pv: PV, node: NodeInfo) -> bool:
    """Made by a provisioner of this node (by name, not UID: the Node may have been recreated)
    and pinned to this node. Both checks, since one node's name can prefix another's."""
    annotation = annotations_of(pv).get(PROVISIONED_BY, "")
    prefix = f"local-volume-provisioner-{node.name}"
    made_here = annotation == prefix or annotation.startswith(prefix + "-")
    return made_here and node.hostname_label in affinity_hostnames(pv) and bool(local_path(pv))


def selector_labels(node: NodeInfo) -> dict[str, str]:
    """The labels every PV of this agent on this node carries; its watch selects on them."""
    return {MANAGED_BY_LABEL: MANAGED_BY, HOSTNAME_LABEL: node.hostname_label}


def label_selector(node: NodeInfo) -> str:
    return ",".join(f"{k}={v}" for k, v in selector_labels(node).items())


def missing_labels(pv: PV, wanted: Mapping[str, str]) -> dict[str, str]:
    """The wanted labels the PV lacks (or holds with another value): what adoption adds."""
    have = labels_of(pv)
    return {k: v for k, v in wanted.items() if have.get(k) != v}


def newer(a: PV, b: PV) -> bool:
    """Whether `a` is a later version of the same object than `b`. Resource versions are
    opaque, but etcd's are increasing integers; anything else is never called newer."""
    if uid(a) != uid(b):
        return False
    va, vb = resource_version(a), resource_version(b)
    return va.isdigit() and vb.isdigit() and int(va) > int(vb)


def rfc3339(when: float) -> str:
    """A UTC timestamp to the second, as the agent writes them in records."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(when))


class CleaningState(StrEnum):
    NONE = ""
    RUNNING = "running"  # an agent instance (`by`) cleans it and renews `heartbeat`
    FAILED = "failed"  # the last attempt failed; the next may start after `retry_after`


@dataclass(frozen=True)
class CleaningRecord:
    """The durable record of a Released PV's clean, in the `localpv-agent.io/cleaning`
    annotation: written before the first byte is removed, so a restarted or twin agent finds
    it and resumes (or leaves a live clean to its owner)."""

    state: CleaningState = CleaningState.NONE
    by: str = ""  # the agent instance (node/random id) that runs it
    heartbeat: float = 0.0  # epoch seconds the owner last proved it is alive
    attempts: int = 0  # earlier failed attempts
    retry_after: float = 0.0  # epoch seconds
    since: str = ""
    error: str = ""

    @classmethod
    def running(cls, by: str, attempts: int, now: float) -> CleaningRecord:
        return cls(CleaningState.RUNNING, by=by, heartbeat=now, attempts=attempts,
                   since=rfc3339(now))

    @classmethod
    def failed(cls, attempts: int, retry_after: float, error: str) -> CleaningRecord:
        return cls(CleaningState.FAILED, attempts=attempts, retry_after=retry_after,
                   error=error[:500])

    def renewed(self, now: float) -> CleaningRecord:
        return replace(self, heartbeat=now)

    def live_elsewhere(self, me: str, now: float, stale_after: float) -> bool:
        """Another agent instance runs this clean and beat its heart recently."""
        return (self.state is CleaningState.RUNNING and self.by != me
                and now - self.heartbeat < stale_after)

    def to_annotation(self) -> str:
        raw: dict[str, Any] = {"state": self.state.value}
        if self.by:
            raw["by"] = self.by
        if self.heartbeat:
            raw["heartbeat"] = self.heartbeat
        raw["attempts"] = self.attempts
        if self.since:
            raw["since"] = self.since
        if self.retry_after:
            raw["retryAfter"] = self.retry_after
        if self.error:
            raw["error"] = self.error
        return json.dumps(raw)

    @classmethod
    def from_annotation(cls, text: str | None) -> CleaningRecord:
        """The record in the annotation's text; an empty record when absent or malformed."""
        try:
            raw = json.loads(text) if text else {}
        except ValueError:
            return cls()
        if not isinstance(raw, dict):
            return cls()
        try:
            state = raw.get("state", "")
            return cls(
                state=CleaningState(state) if state in set(CleaningState) else CleaningState.NONE,
                by=str(raw.get("by", "")),
                heartbeat=float(raw.get("heartbeat") or 0),
                attempts=int(raw.get("attempts") or 0),
                retry_after=float(raw.get("retryAfter") or 0),
                since=raw["since"] if isinstance(raw.get("since"), str) else "",
                error=raw["error"] if isinstance(raw.get("error"), str) else "",
            )
        except (TypeError, ValueError, OverflowError):
            return cls()

    @classmethod
    def of(cls, pv: PV) -> CleaningRecord:
        return cls.from_annotation(annotations_of(pv).get(CLEANING_ANNOTATION))
