"""Compare the PVs this node should have with the PVs that exist, and decide what to write.

Pure. The invariant it protects: one volume is identified by (node, `local.path`), and there is
never more than one PV for it, in any phase. So an existing PV of this node for a path, whoever
made it (this agent, an earlier run, the upstream provisioner), always wins over creating one,
and nothing here ever decides to modify or delete a PV the agent does not own.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent import pv as pvs
from agent.backoff import exponential
from agent.discovery import Exclusion, VolumeState
from agent.identity import Match, compare
from agent.notices import Notice, Once, Reason, Scope
from agent.pv import PV, CleaningRecord, CleaningState, local_path
from agent.volumes import NodeInfo

RETRY_BASE, RETRY_MAX = 30.0, 3600.0


@dataclass(frozen=True)
class Adoption:
    """A PV of this node made by someone else (the upstream provisioner): label it as ours."""

    name: str
    uid: str
    labels: Mapping[str, str]
    path: str = ""


@dataclass(frozen=True)
class Withdrawal:
    """An unbound PV whose disk is gone (or whose class was removed, `why`): delete exactly
    this version of it, nothing newer."""

    name: str
    uid: str
    resource_version: str
    path: str
    why: str = ""  # "": the disk is gone


@dataclass(frozen=True)
class Resize:
    """An Available PV whose disk changed size: write the new capacity on exactly this version
    of it, so a PV bound meanwhile keeps the size its claim was matched against."""

    name: str
    uid: str
    resource_version: str
    capacity: str
    old: str
    path: str


@dataclass(frozen=True)
class Plan:
    create: tuple[Mapping[str, Any], ...] = ()
    adopt: tuple[Adoption, ...] = ()
    withdraw: tuple[Withdrawal, ...] = ()
    notices: tuple[Notice, ...] = ()
    missing: tuple[str, ...] = ()  # PVs whose disk is gone (withdrawn or kept)
    changed_disk: tuple[str, ...] = ()  # PVs whose path now holds a different disk
    resize: tuple[Resize, ...] = ()
    capacity_differs: tuple[str, ...] = ()  # claimed PVs left with a capacity their disk lacks

    @property
    def writes(self) -> int:
        return len(self.create) + len(self.adopt) + len(self.withdraw) + len(self.resize)


def plan(  # noqa: PLR0913 - every fact of the pass it decides on, as plain values
    desired: Sequence[Mapping[str, Any]],
    actual: Mapping[str, PV],
    node: NodeInfo,
    states: Mapping[str, tuple[VolumeState, Mapping[str, str]]] | None = None,
    withdraw_missing: bool = True,
    *,
    classes: frozenset[str] | None = None,
) -> Plan:
    """What to write so every desired volume has exactly one PV of its disk's size, and what
    to say about the PVs whose disk went away (`states`: by PV name, what the host shows at
    its path). With `classes` (the configured ones), unclaimed PVs of any other class are
    withdrawn (`--withdraw-removed-classes`); None leaves them, as the upstream does."""
    ours = [pv for pv in actual.values() if pvs.is_this_nodes(pv, node)]
    by_path: dict[str, list[PV]] = defaultdict(list)
    for pv in ours:
        by_path[local_path(pv) or ""].append(pv)

    creates: list[Mapping[str, Any]] = []
    adoptions: list[Adoption] = []
    sizes: list[tuple[str, Resize | Notice | None]] = []
    notices: list[Notice] = list(_duplicate_notices(by_path))
    wanted_labels = pvs.selector_labels(node)
    for manifest in desired:
        path = manifest["spec"]["local"]["path"]
        existing = by_path.get(path)
        if existing:
            adoptions.extend(_adoptions(existing, wanted_labels))
            sizes.extend((pvs.name(pv), _capacity(pv, manifest)) for pv in existing)
            continue
        name = manifest["metadata"]["name"]
        if name in actual:
            other = actual[name]
            notices.append(Notice(
                "PersistentVolume", name, Reason.NAME_CONFLICT,
                f"PV {name} exists for path {local_path(other)!r} on another node or owner; "
                f"not creating it for {path!r}", Once(Scope.NAME_CONFLICT, f"{name}/{path}")))
            continue
        creates.append(manifest)

    resizes = [s for _, s in sizes if isinstance(s, Resize)]
    sized_apart = [name for name, s in sizes if isinstance(s, Notice)]
    notices.extend(s for _, s in sizes if isinstance(s, Notice))
    removed = {pvs.name(pv): _removed_class(pv) for pv in sorted(ours, key=pvs.name)
               if classes is not None and pvs.storage_class(pv) not in classes}
    withdrawals = [w for w in removed.values() if isinstance(w, Withdrawal)]
    notices.extend(n for n in removed.values() if isinstance(n, Notice))
    missing: list[str] = []
    changed: list[str] = []
    for pv in sorted(ours, key=pvs.name):
        if pvs.name(pv) in removed:
            continue  # its class is gone: decided above
        state, identity = (states or {}).get(pvs.name(pv), (VolumeState.UNKNOWN, {}))
        if state is VolumeState.GONE:
            missing.append(pvs.name(pv))
            gone = _gone(pv, withdraw_missing)
            if isinstance(gone, Withdrawal):
                withdrawals.append(gone)
            else:
                notices.extend(gone)
        elif state is VolumeState.PRESENT:
            differs = _identity_changes(pv, identity)
            if differs:
                changed.append(pvs.name(pv))
                notices.append(_changed_disk_notice(pv, differs))
    return Plan(tuple(creates), tuple(adoptions), tuple(withdrawals), tuple(notices),
                tuple(missing), tuple(changed), tuple(resizes), tuple(sized_apart))


def unclaimed(pv: PV) -> bool:
    """Available and promised to no claim: the only PV the agent may resize or withdraw."""
    return (pvs.phase(pv) == "Available" and pvs.claim_ref(pv) is None
            and not pvs.deleting(pv))


def _capacity(pv: PV, manifest: Mapping[str, Any]) -> Resize | Notice | None:
    """A PV whose capacity is not its disk's size any more (grown, shrunk, replaced by a
    bigger disk at the same path): an unclaimed one takes the new size; a claimed one keeps
    what its claim was matched against and is reported. Sizes that cannot be read, and PVs of
    another class at the path, are left alone."""
    spec = manifest["spec"]
    if pvs.storage_class(pv) != spec["storageClassName"]:
        return None
    wanted, have = spec["capacity"]["storage"], pvs.capacity(pv)
    new, old = pvs.quantity_bytes(wanted), pvs.quantity_bytes(have)
    if new is None or old is None or new == old:
        return None
    name, uid, path = pvs.name(pv), pvs.uid(pv), local_path(pv) or ""
    if unclaimed(pv):
        return Resize(name, uid, pvs.resource_version(pv), wanted, have, path)
    if pvs.deleting(pv):
        return None
    return Notice("PersistentVolume", name, Reason.CAPACITY_CHANGED,
                  f"the disk at {path!r} now holds {wanted} but the PV "
                  f"({pvs.phase(pv) or 'no phase yet'}) says {have}; only an Available PV "
                  "is resized, so this one is left as it is",
                  Once(Scope.CAPACITY, f"{name}/{uid}/{wanted}"), uid=uid)


def _removed_class(pv: PV) -> Withdrawal | Notice | None:
    """A PV of a class no longer configured: withdrawn when unclaimed, so nothing new binds to
    it; a claimed one is left to its claim and reported."""
    name, uid, cls = pvs.name(pv), pvs.uid(pv), pvs.storage_class(pv)
    path = local_path(pv) or ""
    if unclaimed(pv):
        return Withdrawal(name, uid, pvs.resource_version(pv), path,
                          f"its class {cls} is no longer in the config")
    if pvs.deleting(pv):
        return None
    return Notice("PersistentVolume", name, Reason.CLASS_REMOVED,
                  f"class {cls} is no longer in the config; only an Available PV is "
                  f"withdrawn, so this one ({pvs.phase(pv) or 'no phase yet'}) at {path!r} "
                  "is left as it is", Once(Scope.CLASS_REMOVED, f"{name}/{uid}"), uid=uid)


def offered_all(desired: Iterable[Mapping[str, Any]], actual: Mapping[str, PV],
                node: NodeInfo) -> bool:
    """Every volume the pass could offer has its PV: the node's first complete pass, after
    which its startup taint may go (`removeNodeNotReadyTaint`)."""
    paths = {local_path(pv) for pv in actual.values()
             if pvs.is_this_nodes(pv, node) and not pvs.deleting(pv)}
    return all(m["spec"]["local"]["path"] in paths for m in desired)


def _gone(pv: PV, withdraw_missing: bool) -> Withdrawal | list[Notice]:
    """An unclaimed PV is withdrawn so nothing binds to a missing disk; a claimed one is kept
    (its data may come back) and reported on the PV and its claim."""
    name, uid, phase, claim = pvs.name(pv), pvs.uid(pv), pvs.phase(pv), pvs.claim_ref(pv)
    path = local_path(pv) or ""
    if claim is None and phase in ("Available", "Pending", "") and withdraw_missing:
        if not pvs.deleting(pv):
            return Withdrawal(name, uid, pvs.resource_version(pv), path)
        return []
    what = f"the disk behind {path!r} is gone"
    notices = [Notice("PersistentVolume", name, Reason.VOLUME_MISSING,
                      f"{what}; the PV ({phase or 'unbound'}) is kept until it returns",
                      Once(Scope.MISSING, f"{name}/{uid}"), uid=uid)]
    if claim and claim.get("name"):
        notices.append(Notice(
            "PersistentVolumeClaim", claim["name"], Reason.VOLUME_MISSING,
            f"{what} (PV {name}); pods using this claim cannot start on its node",
            Once(Scope.MISSING, f"{name}/{uid}/claim"), namespace=claim.get("namespace", ""),
            uid=claim.get("uid", "")))
    return notices


def _identity_changes(pv: PV, found: Mapping[str, str]) -> dict[str, tuple[str, str]]:
    recorded = pvs.identity(pv)
    return {k: (v, found[k]) for k, v in recorded.items() if k in found and found[k] != v}


def _changed_disk_notice(pv: PV, differs: Mapping[str, tuple[str, str]]) -> Notice:
    name, uid = pvs.name(pv), pvs.uid(pv)
    what = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in sorted(differs.items()))
    return Notice("PersistentVolume", name, Reason.DISK_CHANGED,
                  f"a different disk is at {local_path(pv)!r} ({what}); the PV is left "
                  "untouched and the new disk is not offered",
                  Once(Scope.CHANGED, f"{name}/{uid}/{what}"), uid=uid)


def exclusion_notices(exclusions: Iterable[Exclusion], node: NodeInfo) -> list[Notice]:
    """One Warning on the Node per excluded entry and reason."""
    return [
        Notice("Node", node.name, Reason.VOLUME_EXCLUDED,
               f"{e.class_name}: {e.path}: {e.reason.value}: {e.detail}",
               Once(Scope.EXCLUDED, f"{e.class_name}/{e.entry_name}/{e.reason.value}"))
        for e in exclusions
    ]


def _adoptions(existing: Iterable[PV], wanted: Mapping[str, str]) -> list[Adoption]:
    found = []
    for pv in existing:
        if pvs.deleting(pv):
            continue
        missing = pvs.missing_labels(pv, wanted)
        if missing:
            found.append(Adoption(pvs.name(pv), pvs.uid(pv), missing, local_path(pv) or ""))
    return found


def upstream_adoptions(candidates: Iterable[PV], node: NodeInfo) -> list[Adoption]:
    """Of PVs listed without the agent's label, this node's (made by the upstream
    provisioner, or by this agent before someone removed its labels): label them as ours."""
    return _adoptions((pv for pv in candidates if pvs.is_this_nodes(pv, node)),
                      pvs.selector_labels(node))


def _duplicate_notices(by_path: Mapping[str, Sequence[PV]]) -> Iterable[Notice]:
    for path, found in sorted(by_path.items()):
        if len(found) > 1:
            names = sorted(pvs.name(pv) for pv in found)
            for name in names:
                yield Notice("PersistentVolume", name, Reason.DUPLICATE_VOLUME,
                             f"{len(found)} PVs for one volume at {path!r}: "
                             f"{', '.join(names)}; none is deleted automatically",
                             Once(Scope.DUPLICATE, f"{path}/{','.join(names)}"))


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


def retry_delay(attempts: int, base: float = RETRY_BASE,
                rand: Callable[[], float] = random.random) -> float:
    """How long after failed clean number `attempts` the next one may start."""
    return exponential(attempts, base, RETRY_MAX, rand=rand)


def recycle(  # noqa: PLR0913 - every fact of the pass it decides on, as plain values
    ours: Mapping[str, PV],
    states: Mapping[str, tuple[VolumeState, Mapping[str, str]]],
    present: frozenset[str],
    dirty: frozenset[str],
    running: frozenset[str],
    *,
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
        if pvs.phase(pv) != "Released" or pvs.deleting(pv):
            continue
        policy = pvs.reclaim_policy(pv)
        if policy == "Retain":
            continue
        uid = pvs.uid(pv)
        if policy != "Delete":
            notices.append(Notice("PersistentVolume", name,
                                  Reason.VOLUME_UNSUPPORTED_RECLAIM_POLICY,
                                  f"reclaim policy {policy!r} is not supported; the volume is "
                                  "left as it is", Once(Scope.POLICY, f"{name}/{uid}"), uid=uid))
            continue
        path = local_path(pv) or ""
        state, identity = states.get(name, (VolumeState.UNKNOWN, {}))
        if state is not VolumeState.PRESENT:
            continue  # missing: reported elsewhere, never cleaned
        recorded = pvs.identity(pv)
        verdict = compare(recorded, identity, raw_device=False)  # `identity` holds what counts
        if verdict.match is Match.DIFFERENT:
            continue  # a different disk: reported as DiskChanged, never cleaned
        if verdict.match is Match.UNKNOWN:
            notices.append(Notice(
                "PersistentVolume", name, Reason.VOLUME_UNVERIFIED,
                f"the disk at {path!r} cannot be recognised as the one of this PV (recorded: "
                f"{recorded or 'nothing'}; found: {dict(identity) or 'nothing'}), so it is not "
                "cleaned automatically: wipe it by hand, then delete the PV",
                Once(Scope.UNVERIFIED, f"{name}/{uid}"), uid=uid))
            continue
        record = CleaningRecord.of(pv)
        cleaning.add(name)
        if path in running:
            continue
        if record.live_elsewhere(me, now, stale_after):
            # another live instance (a twin during a rollout) cleans it
            recheck.append(record.heartbeat + stale_after)
            continue
        if record.state is CleaningState.FAILED and record.retry_after > now:
            recheck.append(record.retry_after)
            continue
        decisions.append(CleanDecision(path, name, uid, pvs.resource_version(pv),
                                       record.attempts))
    hold = frozenset(p for p in dirty if p not in pv_paths)
    decisions.extend(
        CleanDecision(path, None) for path in sorted(hold & present)
        if path not in running and (retry_at or {}).get(path, 0) <= now
        and (cleanable is None or path in cleanable))
    return Recycling(tuple(decisions), hold, frozenset(cleaning), tuple(notices),
                     tuple(recheck))
