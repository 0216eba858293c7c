"""Compare the PVs this node should have with the PVs that exist, and decide what to write.

Pure. The invariant it protects: one volume is identified by (node, `local.path`), and there is
never more than one PV for it, in any phase. So an existing PV of this node for a path, whoever
made it (this agent, an earlier run, the upstream provisioner), always wins over creating one,
and nothing here ever decides to modify or delete a PV the agent does not own.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent.discovery import Exclusion, VolumeState
from agent.identity import Match, compare
from agent.volumes import (
    ANNOTATION_PREFIX,
    HOSTNAME_LABEL,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    PROVISIONED_BY,
    NodeInfo,
    identity_from_annotations,
)

PV = Mapping[str, Any]
CLEANING_ANNOTATION = ANNOTATION_PREFIX + "cleaning"
RETRY_BASE, RETRY_MAX = 30.0, 3600.0


@dataclass(frozen=True)
class Notice:
    """An Event worth emitting once: `key` deduplicates it across passes."""

    kind: str  # of the involved object: Node, PersistentVolume, PersistentVolumeClaim
    name: str
    event_type: str  # Normal or Warning
    reason: str
    message: str
    key: str
    namespace: str = ""  # for namespaced objects (a claim)
    uid: str = ""


@dataclass(frozen=True)
class Adoption:
    """A PV of this node made by someone else (the upstream provisioner): label it as ours."""

    name: str
    uid: str
    labels: Mapping[str, str]


@dataclass(frozen=True)
class Withdrawal:
    """An unbound PV whose disk is gone: delete exactly this version of it, nothing newer."""

    name: str
    uid: str
    resource_version: str
    path: str


@dataclass(frozen=True)
class Plan:
    create: tuple[Mapping[str, Any], ...] = ()
    adopt: tuple[Adoption, ...] = ()
    withdraw: tuple[Withdrawal, ...] = ()
    notices: tuple[Notice, ...] = ()
    missing: tuple[str, ...] = ()  # PVs whose disk is gone (withdrawn or kept)
    changed_disk: tuple[str, ...] = ()  # PVs whose path now holds a different disk

    @property
    def writes(self) -> int:
        return len(self.create) + len(self.adopt) + len(self.withdraw)


def selector_labels(node: NodeInfo) -> dict[str, str]:
    """The labels every PV of this agent on this node carries; its watch selects on them."""
    return {MANAGED_BY_LABEL: MANAGED_BY, HOSTNAME_LABEL: node.hostname_label}


def label_selector(node: NodeInfo) -> str:
    return ",".join(f"{k}={v}" for k, v in selector_labels(node).items())


def local_path(pv: PV) -> str | None:
    path = (pv.get("spec") or {}).get("local", {}).get("path")
    return path if isinstance(path, str) else None


def affinity_hostnames(pv: PV) -> set[str]:
    """Hostnames the PV's required nodeAffinity pins it to (any term)."""
    required = ((pv.get("spec") or {}).get("nodeAffinity") or {}).get("required") or {}
    names: set[str] = set()
    for term in required.get("nodeSelectorTerms") or []:
        for expr in term.get("matchExpressions") or []:
            if expr.get("key") == HOSTNAME_LABEL and expr.get("operator") == "In":
                names.update(expr.get("values") or [])
    return names


def is_this_nodes(pv: PV, node: NodeInfo) -> bool:
    """Made by a provisioner of this node (by name, not UID: the Node may have been recreated)
    and pinned to this node. Both checks, since one node's name can prefix another's."""
    annotation = ((pv.get("metadata") or {}).get("annotations") or {}).get(PROVISIONED_BY, "")
    prefix = f"local-volume-provisioner-{node.name}"
    made_here = annotation == prefix or annotation.startswith(prefix + "-")
    return made_here and node.hostname_label in affinity_hostnames(pv) and bool(local_path(pv))


def plan(
    desired: Sequence[Mapping[str, Any]],
    actual: Mapping[str, PV],
    node: NodeInfo,
    states: Mapping[str, tuple[VolumeState, Mapping[str, str]]] | None = None,
    withdraw_missing: bool = True,
) -> Plan:
    """What to write so every desired volume has exactly one PV, and what to say about the
    PVs whose disk went away (`states`: by PV name, what the host shows at its path)."""
    ours = [pv for pv in actual.values() if is_this_nodes(pv, node)]
    by_path: dict[str, list[PV]] = defaultdict(list)
    for pv in ours:
        by_path[local_path(pv) or ""].append(pv)

    creates: list[Mapping[str, Any]] = []
    adoptions: list[Adoption] = []
    notices: list[Notice] = list(_duplicate_notices(by_path))
    wanted_labels = selector_labels(node)
    for manifest in desired:
        path = manifest["spec"]["local"]["path"]
        existing = by_path.get(path)
        if existing:
            adoptions.extend(_adoptions(existing, wanted_labels))
            continue
        name = manifest["metadata"]["name"]
        if name in actual:
            other = actual[name]
            notices.append(Notice(
                "PersistentVolume", name, "Warning", "NameConflict",
                f"PV {name} exists for path {local_path(other)!r} on another node or owner; "
                f"not creating it for {path!r}", key=f"name-conflict/{name}/{path}"))
            continue
        creates.append(manifest)

    withdrawals: list[Withdrawal] = []
    missing: list[str] = []
    changed: list[str] = []
    for pv in sorted(ours, key=lambda p: p["metadata"]["name"]):
        state, identity = (states or {}).get(pv["metadata"]["name"], (VolumeState.UNKNOWN, {}))
        if state is VolumeState.GONE:
            missing.append(pv["metadata"]["name"])
            gone = _gone(pv, withdraw_missing)
            if isinstance(gone, Withdrawal):
                withdrawals.append(gone)
            else:
                notices.extend(gone)
        elif state is VolumeState.PRESENT:
            differs = _identity_changes(pv, identity)
            if differs:
                changed.append(pv["metadata"]["name"])
                notices.append(_changed_disk_notice(pv, differs))
    return Plan(tuple(creates), tuple(adoptions), tuple(withdrawals), tuple(notices),
                tuple(missing), tuple(changed))


def _gone(pv: PV, withdraw_missing: bool) -> Withdrawal | list[Notice]:
    """An unclaimed PV is withdrawn so nothing binds to a missing disk; a claimed one is kept
    (its data may come back) and reported on the PV and its claim."""
    meta, spec = pv["metadata"], pv.get("spec") or {}
    phase = (pv.get("status") or {}).get("phase", "")
    claim = spec.get("claimRef")
    path = local_path(pv) or ""
    if claim is None and phase in ("Available", "Pending", "") and withdraw_missing:
        if not meta.get("deletionTimestamp"):
            return Withdrawal(meta["name"], meta.get("uid", ""), meta.get("resourceVersion", ""),
                              path)
        return []
    what = f"the disk behind {path!r} is gone"
    uid = meta.get("uid", "")
    notices = [Notice("PersistentVolume", meta["name"], "Warning", "VolumeMissing",
                      f"{what}; the PV ({phase or 'unbound'}) is kept until it returns",
                      key=f"missing/{meta['name']}/{uid}", uid=uid)]
    if claim and claim.get("name"):
        notices.append(Notice(
            "PersistentVolumeClaim", claim["name"], "Warning", "VolumeMissing",
            f"{what} (PV {meta['name']}); pods using this claim cannot start on its node",
            key=f"missing/{meta['name']}/{uid}/claim", namespace=claim.get("namespace", ""),
            uid=claim.get("uid", "")))
    return notices


def _identity_changes(pv: PV, found: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    recorded = identity_from_annotations((pv.get("metadata") or {}).get("annotations") or {})
    return {k: (v, found[k]) for k, v in recorded.items() if k in found and found[k] != v}


def _changed_disk_notice(pv: PV, differs: Mapping[str, tuple[str, str]]) -> Notice:
    meta = pv["metadata"]
    what = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in sorted(differs.items()))
    return Notice("PersistentVolume", meta["name"], "Warning", "DiskChanged",
                  f"a different disk is at {local_path(pv)!r} ({what}); the PV is left "
                  "untouched and the new disk is not offered",
                  key=f"changed/{meta['name']}/{meta.get('uid', '')}/{what}",
                  uid=meta.get("uid", ""))


def exclusion_notices(exclusions: Iterable[Exclusion], node: NodeInfo) -> list[Notice]:
    """One Warning on the Node per excluded entry and reason."""
    return [
        Notice("Node", node.name, "Warning", "VolumeExcluded",
               f"{e.class_name}: {e.path}: {e.reason.value}: {e.detail}",
               key=f"excluded/{e.class_name}/{e.entry_name}/{e.reason.value}")
        for e in exclusions
    ]


def _adoptions(existing: Iterable[PV], wanted: Mapping[str, str]) -> list[Adoption]:
    found = []
    for pv in existing:
        meta = pv.get("metadata") or {}
        labels = meta.get("labels") or {}
        if meta.get("deletionTimestamp"):
            continue
        missing = {k: v for k, v in wanted.items() if labels.get(k) != v}
        if missing:
            found.append(Adoption(meta["name"], meta.get("uid", ""), missing))
    return found


def _duplicate_notices(by_path: Mapping[str, Sequence[PV]]) -> Iterable[Notice]:
    for path, pvs in sorted(by_path.items()):
        if len(pvs) > 1:
            names = sorted(pv["metadata"]["name"] for pv in pvs)
            for name in names:
                yield Notice("PersistentVolume", name, "Warning", "DuplicateVolume",
                             f"{len(pvs)} PVs for one volume at {path!r}: {', '.join(names)}; "
                             "none is deleted automatically",
                             key=f"duplicate/{path}/{','.join(names)}")


@dataclass(frozen=True)
class CleanDecision:
    """Clean the volume at `key` (a host path); then delete its PV, if it has one."""

    key: str
    pv_name: str | None
    pv_uid: str = ""
    resource_version: str = ""
    attempts: int = 0  # earlier failed attempts


@dataclass(frozen=True)
class Recycling:
    clean: tuple[CleanDecision, ...] = ()
    hold: frozenset[str] = frozenset()  # host paths not to offer: dirty, not cleaned yet
    cleaning: frozenset[str] = frozenset()  # PV names with a clean running or pending retry
    notices: tuple[Notice, ...] = ()
    recheck: tuple[float, ...] = ()  # epoch times when a waiting clean may start


def cleaning_state(pv: PV) -> dict[str, Any]:
    """The durable cleaning record on a PV (`{}` when none)."""
    raw = ((pv.get("metadata") or {}).get("annotations") or {}).get(CLEANING_ANNOTATION)
    try:
        record = json.loads(raw) if raw else {}
    except ValueError:
        return {}
    if not isinstance(record, dict):
        return {}
    try:  # anyone who may patch PVs can write it: only well-typed values count
        return {
            "state": str(record.get("state", "")), "by": str(record.get("by", "")),
            "heartbeat": float(record.get("heartbeat") or 0),
            "retryAfter": float(record.get("retryAfter") or 0),
            "attempts": int(record.get("attempts") or 0),
            **{k: record[k] for k in ("since", "error") if isinstance(record.get(k), str)},
        }
    except (TypeError, ValueError):
        return {}


def retry_delay(attempts: int, base: float = RETRY_BASE) -> float:
    return float(min(RETRY_MAX, base * 2 ** max(0, attempts - 1)))


def recycle(
    ours: Mapping[str, PV],
    states: Mapping[str, tuple[VolumeState, Mapping[str, str]]],
    present: frozenset[str],
    dirty: frozenset[str],
    running: frozenset[str],
    now: float,
    retry_at: Mapping[str, float] | None = None,
    me: str = "",
    stale_after: float = 60.0,
    cleanable: frozenset[str] | None = None,
) -> Recycling:
    """Which released or dirty volumes to clean now, and which volumes not to offer.

    A Released PV with reclaim policy Delete is cleaned only when its disk is present and
    recognised as the one recorded on the PV (`states` holds the identities observed). A
    dirty volume without a PV (deleted by hand) is held, and cleaned before it is offered
    when it is in `cleanable` (its disk recognised as the recorded one; None: all).
    A clean recorded on the PV by another agent instance (`me` is this one) whose heartbeat is
    younger than `stale_after` is that instance's; an older one was interrupted and resumes.
    """
    decisions: list[CleanDecision] = []
    notices: list[Notice] = []
    cleaning: set[str] = set()
    recheck: list[float] = []
    pv_paths = {local_path(pv) for pv in ours.values()}
    for name, pv in sorted(ours.items()):
        meta, spec = pv["metadata"], pv.get("spec") or {}
        if (pv.get("status") or {}).get("phase") != "Released" or meta.get("deletionTimestamp"):
            continue
        policy = spec.get("persistentVolumeReclaimPolicy", "Delete")
        if policy == "Retain":
            continue
        uid = meta.get("uid", "")
        if policy != "Delete":
            notices.append(Notice("PersistentVolume", name, "Warning",
                                  "VolumeUnsupportedReclaimPolicy",
                                  f"reclaim policy {policy!r} is not supported; the volume is "
                                  "left as it is", key=f"policy/{name}/{uid}", uid=uid))
            continue
        path = local_path(pv) or ""
        state, identity = states.get(name, (VolumeState.UNKNOWN, {}))
        if state is not VolumeState.PRESENT:
            continue  # missing: reported elsewhere, never cleaned
        recorded = identity_from_annotations(meta.get("annotations") or {})
        verdict = compare(recorded, identity, raw_device=False)  # `identity` holds what counts
        if verdict.match is Match.DIFFERENT:
            continue  # a different disk: reported as DiskChanged, never cleaned
        if verdict.match is Match.UNKNOWN:
            notices.append(Notice(
                "PersistentVolume", name, "Warning", "VolumeUnverified",
                f"the disk at {path!r} cannot be recognised as the one of this PV (recorded: "
                f"{recorded or 'nothing'}; found: {dict(identity) or 'nothing'}), so it is not "
                "cleaned automatically: wipe it by hand, then delete the PV",
                key=f"unverified/{name}/{uid}", uid=uid))
            continue
        record = cleaning_state(pv)
        if path in running:
            cleaning.add(name)
            continue
        if (record.get("state") == "running" and record.get("by") != me
                and now - float(record.get("heartbeat", 0)) < stale_after):
            cleaning.add(name)  # another live instance (a twin during a rollout) cleans it
            recheck.append(float(record.get("heartbeat", 0)) + stale_after)
            continue
        if record.get("state") == "failed" and float(record.get("retryAfter", 0)) > now:
            cleaning.add(name)
            recheck.append(float(record.get("retryAfter", 0)))
            continue
        cleaning.add(name)
        decisions.append(CleanDecision(path, name, uid, meta.get("resourceVersion", ""),
                                       int(record.get("attempts", 0))))
    hold = frozenset(p for p in dirty if p not in pv_paths)
    for path in sorted(hold & present):
        if path in running or (retry_at or {}).get(path, 0) > now:
            continue
        if cleanable is not None and path not in cleanable:
            continue
        decisions.append(CleanDecision(path, None))
    return Recycling(tuple(decisions), hold, frozenset(cleaning), tuple(notices),
                     tuple(recheck))
