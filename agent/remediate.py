"""What `localpv-agent remediate` decides when a node holding local PVs is lost.

Pure: Nodes, PVs, claims, pods and StatefulSets come in as the API's dicts, decisions go out as
frozen dataclasses; the controller (`agent.remediator`) reads and writes the API. A local PV pins
its pod to one node; when that node is gone for good, the pod waits in Pending forever. For a
replicated system the way out is to give the replica a fresh claim elsewhere and let it
re-replicate, so the bound claim is deleted (the StatefulSet controller recreates it and the
scheduler binds it to a free PV) and the lost node's PV object is removed. The data itself is
never touched: the disk is gone, or its own agent recycles it if the node comes back.

Everything here leans towards doing nothing:

- only PVs of the opted-in StorageClasses, pinned to exactly one hostname, are considered;
- a node counts as lost only through an enabled trigger (deleted and not back within the delay,
  the out-of-service taint on a node that is not Ready, NotReady past a timeout), and a PV whose
  node is Ready is never touched;
- a claim is deleted only while every pod using it cannot run (Pending and unscheduled, or being
  deleted on the lost node), only when a StatefulSet owns those pods and the claim is one of its
  templates' (so something recreates it), and never when the claim or the StatefulSet opts out;
- when more nodes are down at once than the budget allows (a partition, not a lost node), or the
  rate limit is reached, nothing is deleted.
"""

from __future__ import annotations

import argparse
import math
import re
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal

from agent.volumes import ANNOTATION_PREFIX, HOSTNAME_LABEL

Obj = Mapping[str, Any]

OPT_OUT_ANNOTATION = ANNOTATION_PREFIX + "remediate"  # "false" on a claim or a StatefulSet
OUT_OF_SERVICE_TAINT = "node.kubernetes.io/out-of-service"
DEFAULT_LEASE = "localpv-agent-remediate"
TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})


class Trigger(StrEnum):
    NODE_DELETED = "node_deleted"
    OUT_OF_SERVICE = "out_of_service"
    NOT_READY = "not_ready"


# -- options ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """How many opted-in nodes may be down at once before the guard stops everything: a count,
    or a percent of the nodes holding opted-in PVs (rounded down, never below 1)."""

    count: int | None = None
    percent: float | None = None

    @classmethod
    def parse(cls, text: str) -> Budget:
        value = text.strip()
        try:
            if value.endswith("%"):
                percent = float(value[:-1])
                if not 0 <= percent <= 100 or math.isnan(percent):
                    raise ValueError
                return cls(percent=percent)
            count = int(value)
            if count < 0:
                raise ValueError
            return cls(count=count)
        except ValueError:
            raise ValueError(f"want a node count (2) or a percent (10%), got {text!r}") from None

    def allowed(self, total: int) -> int:
        if self.count is not None:
            return self.count
        return max(1, math.floor((self.percent or 0.0) * total / 100 + 1e-9))

    def __str__(self) -> str:
        return str(self.count) if self.count is not None else f"{self.percent:g}%"


@dataclass(frozen=True)
class Options:
    storage_classes: frozenset[str] = frozenset()
    deletion_delay: float = 60.0  # seconds a deleted Node has to come back
    trigger_deleted: bool = True
    trigger_out_of_service: bool = True
    trigger_not_ready: bool = False
    not_ready_timeout: float = 300.0
    max_unavailable: Budget = Budget(percent=10.0)
    max_claims_per_minute: int = 10
    dry_run: bool = False


# -- nodes --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeView:
    name: str
    hostname: str  # its kubernetes.io/hostname label, else its name
    ready: bool
    out_of_service: bool


def node_view(node: Obj) -> NodeView:
    meta = node.get("metadata") or {}
    name = str(meta.get("name", ""))
    labels = meta.get("labels") or {}
    conditions = (node.get("status") or {}).get("conditions") or []
    ready = any(c.get("type") == "Ready" and c.get("status") == "True" for c in conditions)
    taints = (node.get("spec") or {}).get("taints") or []
    oos = any(t.get("key") == OUT_OF_SERVICE_TAINT for t in taints)
    return NodeView(name, str(labels.get(HOSTNAME_LABEL) or name), ready, oos)


def pinned_hostname(pv: Obj) -> str | None:
    """The one hostname a local PV is pinned to: every required term must say
    `kubernetes.io/hostname In [h]` with the same single h. Anything looser (a class selector
    term without the hostname, several values) could run elsewhere: None, never lost."""
    spec = pv.get("spec") or {}
    if not (spec.get("local") or {}).get("path"):
        return None
    terms = ((spec.get("nodeAffinity") or {}).get("required") or {}).get("nodeSelectorTerms")
    found: set[str] = set()
    for term in terms or []:
        values = [tuple(e.get("values") or ()) for e in term.get("matchExpressions") or []
                  if e.get("key") == HOSTNAME_LABEL and e.get("operator") == "In"]
        if len(values) != 1 or len(values[0]) != 1:
            return None
        found.add(str(values[0][0]))
    return found.pop() if len(found) == 1 else None


def opted_in(pv: Obj, options: Options) -> bool:
    spec = pv.get("spec") or {}
    return spec.get("storageClassName") in options.storage_classes and \
        pinned_hostname(pv) is not None


@dataclass(frozen=True)
class Memory:
    """What the controller saw across passes, on its own monotonic clock (never the API's
    timestamps, so clock skew cannot shorten a delay; a restart starts each wait again)."""

    missing_since: Mapping[str, float] = field(default_factory=dict)  # hostname -> no Node since
    not_ready_since: Mapping[str, float] = field(default_factory=dict)  # node -> not Ready since
    names: Mapping[str, frozenset[str]] = field(default_factory=dict)  # hostname -> Node names


def observe(memory: Memory, nodes: Iterable[Obj], hostnames: Iterable[str], now: float) -> Memory:
    """Fold one look at the Nodes into the memory. `hostnames`: those holding opted-in PVs."""
    views = [node_view(n) for n in nodes]
    present: dict[str, set[str]] = {}
    for v in views:
        present.setdefault(v.hostname, set()).add(v.name)
        present.setdefault(v.name, set()).add(v.name)  # a PV pinned to the name: also present
    missing = {h: memory.missing_since.get(h, now) for h in hostnames if h not in present}
    not_ready = {v.name: memory.not_ready_since.get(v.name, now) for v in views if not v.ready}
    names = {h: frozenset(n) for h, n in present.items()}
    for h in missing:  # remember the names of deleted Nodes: their pods still name them
        names.setdefault(h, memory.names.get(h, frozenset({h})))
    return Memory(missing, not_ready, names)


# -- assessment ---------------------------------------------------------------------------------

HostStateName = Literal["healthy", "lost", "waiting", "down"]


@dataclass(frozen=True)
class HostState:
    """One hostname holding opted-in PVs: healthy, lost (a trigger fired), waiting (a trigger
    will fire at `due` unless it recovers) or down (not Ready, but no enabled trigger)."""

    hostname: str
    state: HostStateName
    detail: str
    trigger: Trigger | None = None
    due: float | None = None
    node_names: frozenset[str] = frozenset()

    @property
    def unavailable(self) -> bool:
        return self.state != "healthy"


@dataclass(frozen=True)
class ClaimCandidate:
    """A bound PV on a lost node: its claim may be deleted, see `decide_claim`."""

    pv: str
    pv_uid: str
    namespace: str
    claim: str
    claim_uid: str
    hostname: str
    trigger: Trigger


@dataclass(frozen=True)
class VolumeRemoval:
    """An unbound PV (Available, or Released with Delete) of a lost node: delete exactly this
    version of it."""

    pv: str
    uid: str
    resource_version: str
    phase: str
    hostname: str
    trigger: Trigger


@dataclass(frozen=True)
class Assessment:
    hosts: Mapping[str, HostState]
    unavailable: int
    allowed: int
    claims: tuple[ClaimCandidate, ...] = ()
    removals: tuple[VolumeRemoval, ...] = ()
    kept: tuple[tuple[str, str], ...] = ()  # (PV, why) of lost nodes, left alone
    next_due: float | None = None

    @property
    def blocked(self) -> bool:
        """The partition guard: more nodes down at once than allowed; nothing may be deleted."""
        return self.unavailable > self.allowed

    @property
    def lost(self) -> dict[str, HostState]:
        return {h: s for h, s in self.hosts.items() if s.state == "lost"}


def host_state(hostname: str, views: Sequence[NodeView], memory: Memory, options: Options,  # noqa: PLR0911 - one answer per state of a host, in order of precedence
               now: float) -> HostState:
    names = frozenset(v.name for v in views) or memory.names.get(hostname, frozenset({hostname}))
    if not views:
        since = memory.missing_since.get(hostname, now)
        if not options.trigger_deleted:
            return HostState(hostname, "down", "no Node (the node-deleted trigger is off)",
                             node_names=names)
        due = since + options.deletion_delay
        if now >= due:
            return HostState(hostname, "lost", f"its Node was deleted {now - since:.0f}s ago",
                             Trigger.NODE_DELETED, node_names=names)
        return HostState(hostname, "waiting", "its Node was deleted; waiting "
                         f"{options.deletion_delay:g}s for it to come back",
                         Trigger.NODE_DELETED, due, names)
    if any(v.ready for v in views):
        if any(v.out_of_service for v in views):
            return HostState(hostname, "down", f"{OUT_OF_SERVICE_TAINT} taint on a Ready Node: "
                             "never remediated while it is Ready", node_names=names)
        return HostState(hostname, "healthy", "Ready", node_names=names)
    if any(v.out_of_service for v in views):
        if options.trigger_out_of_service:
            return HostState(hostname, "lost", f"not Ready, with the {OUT_OF_SERVICE_TAINT} "
                             "taint", Trigger.OUT_OF_SERVICE, node_names=names)
        return HostState(hostname, "down", "out of service (that trigger is off)",
                         node_names=names)
    since = min((memory.not_ready_since.get(v.name, now) for v in views), default=now)
    if not options.trigger_not_ready:
        return HostState(hostname, "down", "not Ready (the not-ready trigger is off)",
                         node_names=names)
    due = since + options.not_ready_timeout
    if now >= due:
        return HostState(hostname, "lost", f"not Ready for {now - since:.0f}s",
                         Trigger.NOT_READY, node_names=names)
    return HostState(hostname, "waiting", f"not Ready; lost after {options.not_ready_timeout:g}s",
                     Trigger.NOT_READY, due, names)


def assess(nodes: Iterable[Obj], pvs: Iterable[Obj], memory: Memory, options: Options,
           now: float) -> Assessment:
    """Which opted-in hosts are lost, what to do with their PVs, and whether the guard holds.
    `memory` must already include this look at the nodes (`observe`)."""
    views: dict[str, list[NodeView]] = {}
    for n in nodes:
        v = node_view(n)
        views.setdefault(v.hostname, []).append(v)
        if v.name != v.hostname:
            views.setdefault(v.name, []).append(v)
    ours = [pv for pv in pvs if opted_in(pv, options)]
    hosts = {h: host_state(h, views.get(h, []), memory, options, now)
             for h in sorted({pinned_hostname(pv) or "" for pv in ours})}
    unavailable = sum(1 for s in hosts.values() if s.unavailable)
    allowed = options.max_unavailable.allowed(len(hosts))
    claims: list[ClaimCandidate] = []
    removals: list[VolumeRemoval] = []
    kept: list[tuple[str, str]] = []
    for pv in sorted(ours, key=lambda p: str(p["metadata"]["name"])):
        state = hosts[pinned_hostname(pv) or ""]
        if state.state != "lost" or state.trigger is None:
            continue
        meta, spec = pv["metadata"], pv.get("spec") or {}
        name = str(meta["name"])
        phase = (pv.get("status") or {}).get("phase", "")
        if meta.get("deletionTimestamp"):
            continue
        ref = spec.get("claimRef") or {}
        if phase == "Bound" and ref.get("name"):
            claims.append(ClaimCandidate(name, str(meta.get("uid", "")),
                                         str(ref.get("namespace", "")), str(ref["name"]),
                                         str(ref.get("uid", "")), state.hostname, state.trigger))
        elif phase == "Available" or (
                phase == "Released" and spec.get("persistentVolumeReclaimPolicy") == "Delete"):
            removals.append(VolumeRemoval(name, str(meta.get("uid", "")),
                                          str(meta.get("resourceVersion", "")), phase,
                                          state.hostname, state.trigger))
        else:
            policy = spec.get("persistentVolumeReclaimPolicy", "")
            kept.append((name, f"phase {phase or 'unknown'}, reclaim policy {policy}: "
                               "left for an operator"))
    dues = [s.due for s in hosts.values() if s.due is not None]
    return Assessment(hosts, unavailable, allowed, tuple(claims), tuple(removals), tuple(kept),
                      min(dues) if dues else None)


# -- claims -------------------------------------------------------------------------------------

Verdict = Literal["delete", "wait", "skip", "done"]


@dataclass(frozen=True)
class ObjectRef:
    """An object an Event is about."""

    kind: str
    name: str
    namespace: str = ""
    uid: str = ""
    api_version: str = "v1"

    def involved(self) -> dict[str, str]:
        ref = {"kind": self.kind, "name": self.name, "apiVersion": self.api_version}
        if self.namespace:
            ref["namespace"] = self.namespace
        if self.uid:
            ref["uid"] = self.uid
        return ref


@dataclass(frozen=True)
class ClaimDecision:
    verdict: Verdict  # delete now; wait (may change); skip (never, say so once); done (gone)
    reason: str
    result: str = ""  # the metric's result for a skip: opted_out, not_statefulset
    resource_version: str = ""  # of the claim decided on, for the delete precondition
    owner: ObjectRef | None = None  # the StatefulSet, for Events
    pods: tuple[str, ...] = ()


def opted_out(obj: Obj | None) -> bool:
    annotations = ((obj or {}).get("metadata") or {}).get("annotations") or {}
    return str(annotations.get(OPT_OUT_ANNOTATION, "")).strip().lower() in (
        "false", "no", "off", "0", "disabled")


def pods_using(pods: Iterable[Obj], claim: str) -> list[Obj]:
    """Pods not finished that mount the claim."""
    return [p for p in pods
            if (p.get("status") or {}).get("phase") not in TERMINAL_PHASES
            and any((v.get("persistentVolumeClaim") or {}).get("claimName") == claim
                    for v in (p.get("spec") or {}).get("volumes") or [])]


def cannot_run(pod: Obj, lost_nodes: frozenset[str]) -> bool:
    """Pending and unscheduled (its PV pins it to the lost node), or being deleted on the lost
    node (no kubelet will ever confirm it). A pod still shown running on the lost node is not:
    it may be a partition, and its eviction comes first."""
    meta, spec = pod.get("metadata") or {}, pod.get("spec") or {}
    node = spec.get("nodeName")
    if not node:
        return (pod.get("status") or {}).get("phase") == "Pending" and \
            not meta.get("deletionTimestamp")
    return node in lost_nodes and bool(meta.get("deletionTimestamp"))


def controller_of(obj: Obj) -> tuple[str, str, str] | None:
    """(kind, name, uid) of the object's controller owner."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return str(ref.get("kind", "")), str(ref.get("name", "")), str(ref.get("uid", ""))
    return None


def statefulsets_to_read(pods: Iterable[Obj], claim: str) -> set[str]:
    """Names of the StatefulSets controlling the pods that use the claim."""
    return {ref[1] for p in pods_using(pods, claim)
            if (ref := controller_of(p)) is not None and ref[0] == "StatefulSet"}


def decide_claim(candidate: ClaimCandidate, claim: Obj | None, pods: Sequence[Obj],  # noqa: PLR0911 - one reason to wait or delete per return, in order of precedence
                 statefulsets: Mapping[str, Obj | None],
                 lost_nodes: frozenset[str]) -> ClaimDecision:
    """Whether to delete a lost node's bound claim now. `pods`: the claim's namespace's pods;
    `statefulsets`: by name, those `statefulsets_to_read` named (None when not found)."""
    meta = (claim or {}).get("metadata") or {}
    if claim is None or (candidate.claim_uid and meta.get("uid") != candidate.claim_uid):
        return ClaimDecision("done", "the claim is gone or was replaced")
    if meta.get("deletionTimestamp"):
        return ClaimDecision("done", "the claim is being deleted")
    if opted_out(claim):
        return ClaimDecision("skip", f"the claim opts out ({OPT_OUT_ANNOTATION})", "opted_out")
    users = pods_using(pods, candidate.claim)
    names = tuple(sorted(str(p["metadata"]["name"]) for p in users))
    if not users:
        return ClaimDecision("wait", "no pod uses it: nothing to recover yet")
    running = [p for p in users if not cannot_run(p, lost_nodes)]
    if running:
        p = running[0]
        where = (p.get("spec") or {}).get("nodeName") or "no node"
        return ClaimDecision("wait", f"pod {p['metadata']['name']} may still run "
                             f"({(p.get('status') or {}).get('phase', '?')} on {where})",
                             pods=names)
    owner: ObjectRef | None = None
    for pod in users:
        ref = controller_of(pod)
        if ref is None or ref[0] != "StatefulSet":
            return ClaimDecision("skip", f"pod {pod['metadata']['name']} is not a StatefulSet's:"
                                 " nothing would recreate the claim", "not_statefulset",
                                 pods=names)
        sts = statefulsets.get(ref[1])
        if sts is None:
            return ClaimDecision("wait", f"StatefulSet {ref[1]} not found", pods=names)
        sts_meta = sts.get("metadata") or {}
        owner = ObjectRef("StatefulSet", ref[1], str(sts_meta.get("namespace", "")),
                          str(sts_meta.get("uid", "")), "apps/v1")
        if opted_out(sts):
            return ClaimDecision("skip", f"StatefulSet {ref[1]} opts out ({OPT_OUT_ANNOTATION})",
                                 "opted_out", owner=owner, pods=names)
        templates = {str((t.get("metadata") or {}).get("name", ""))
                     for t in (sts.get("spec") or {}).get("volumeClaimTemplates") or []}
        if not any(candidate.claim == f"{t}-{pod['metadata']['name']}" for t in templates):
            return ClaimDecision("skip", f"not a claim of StatefulSet {ref[1]}'s templates: "
                                 "nothing would recreate it", "not_statefulset", owner=owner,
                                 pods=names)
    return ClaimDecision("delete", "every pod using it cannot run", "",
                         str(meta.get("resourceVersion", "")), owner, names)


# -- rate limit ---------------------------------------------------------------------------------


class RateWindow:
    """At most `per_minute` deletions in any 60 s (a sliding window)."""

    def __init__(self, per_minute: int, window: float = 60.0) -> None:
        self.per_minute = per_minute
        self.window = window
        self._stamps: deque[float] = deque()

    def _expire(self, now: float) -> None:
        while self._stamps and self._stamps[0] <= now - self.window:
            self._stamps.popleft()

    def allow(self, now: float) -> bool:
        self._expire(now)
        return len(self._stamps) < self.per_minute

    def record(self, now: float) -> None:
        self._stamps.append(now)

    def next_free(self, now: float) -> float | None:
        """When `allow` turns true again: None if it is now, infinity for a limit of 0."""
        self._expire(now)
        if len(self._stamps) < self.per_minute:
            return None
        if self.per_minute <= 0:
            return math.inf
        return self._stamps[len(self._stamps) - self.per_minute] + self.window


# -- leader election ----------------------------------------------------------------------------

LeaseVerb = Literal["create", "update", "follow"]


@dataclass(frozen=True)
class Observed:
    """The lease version last seen, and when (monotonic): a holder that has not renewed for a
    whole lease duration of our own clock is gone."""

    resource_version: str
    holder: str
    since: float


@dataclass(frozen=True)
class LeaseStep:
    verb: LeaseVerb
    body: dict[str, Any] | None
    observed: Observed | None
    holder: str  # who holds it if the step succeeds (or holds it now, for follow)


def lease_step(lease: Obj | None, me: str, name: str, namespace: str, duration: int,  # noqa: PLR0913, PLR0917 - a pure step: the Lease, who asks, and the clock, all explicit
               observed: Observed | None, now: float, wall: str) -> LeaseStep:
    """One round of leader election on a coordination.k8s.io Lease, written with plain
    get/create/update and the resourceVersion (an update on a stale version fails with 409).
    `wall`: the current time as a MicroTime string, for the record only."""
    if lease is None:
        body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                "metadata": {"name": name, "namespace": namespace},
                "spec": {"holderIdentity": me, "leaseDurationSeconds": duration,
                         "acquireTime": wall, "renewTime": wall, "leaseTransitions": 0}}
        return LeaseStep("create", body, None, me)
    meta, spec = lease.get("metadata") or {}, dict(lease.get("spec") or {})
    version = str(meta.get("resourceVersion", ""))
    holder = str(spec.get("holderIdentity") or "")
    if observed is None or observed.resource_version != version:
        observed = Observed(version, holder, now)
    if holder == me:
        spec.update(renewTime=wall, leaseDurationSeconds=duration)
    else:
        expired = now - observed.since >= float(spec.get("leaseDurationSeconds") or duration)
        if holder and not expired:
            return LeaseStep("follow", None, observed, holder)
        spec.update(holderIdentity=me, leaseDurationSeconds=duration, acquireTime=wall,
                    renewTime=wall, leaseTransitions=int(spec.get("leaseTransitions") or 0) + 1)
    body = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": name, "namespace": namespace, "resourceVersion": version},
            "spec": spec}
    return LeaseStep("update", body, observed, me)


def released(lease: Obj, me: str, wall: str) -> dict[str, Any] | None:
    """The lease handed back on shutdown (no holder, so a standby takes it at once), or None if
    it is not ours."""
    spec = dict(lease.get("spec") or {})
    if spec.get("holderIdentity") != me:
        return None
    spec.update(holderIdentity="", leaseDurationSeconds=1, renewTime=wall)
    meta = lease.get("metadata") or {}
    return {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": meta.get("name"), "namespace": meta.get("namespace"),
                         "resourceVersion": meta.get("resourceVersion")}, "spec": spec}



# -- command line ----------------------------------------------------------------------------------

_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h)")
_DURATION_UNITS = {"ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds, as a plain number (`60`, the upstream's reading) or a Go duration (`1m30s`)."""
    value = text.strip()
    try:
        seconds = float(value)
    except ValueError:
        parts = _DURATION_PART.findall(value)
        if not parts or "".join(n + u for n, u in parts) != value:
            raise ValueError(f"want seconds (60) or a duration (1m30s), got {text!r}") from None
        seconds = sum(float(n) * _DURATION_UNITS[u] for n, u in parts)
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"want a finite, non-negative duration, got {text!r}")
    return seconds


def add_arguments(parser: argparse.ArgumentParser, env: Mapping[str, str]) -> None:
    """The `remediate` subcommand's flags (the upstream's names where it has them); `env`
    gives the defaults of KUBECONFIG, MY_NAMESPACE and POD_NAME."""
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    parser.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="log lines as text or as one JSON object each")
    parser.add_argument("--kubeconfig", default=env.get("KUBECONFIG"),
                        help="kubeconfig file (default: $KUBECONFIG, else in-cluster)")
    parser.add_argument("--storageclass-names", action="append", default=[],
                        help="comma-separated StorageClasses whose PVs may be remediated; "
                             "nothing is without it (repeatable)")
    parser.add_argument("--pvc-deletion-delay", type=parse_duration, default=60.0,
                        help="seconds (or 1m30s) a deleted Node has to come back (default: 60)")
    parser.add_argument("--stale-pv-discovery-interval", type=parse_duration, default=10.0,
                        help="seconds between passes when nothing changes: stale PVs of deleted "
                             "Nodes are found and claims waiting on pods checked (default: 10)")
    parser.add_argument("--trigger-node-deleted", action=argparse.BooleanOptionalAction,
                        default=True, help="a deleted Node not back within the delay is lost "
                                           "(default: on)")
    parser.add_argument("--trigger-out-of-service", action=argparse.BooleanOptionalAction,
                        default=True, help="a NotReady Node with the node.kubernetes.io/"
                                           "out-of-service taint is lost (default: on)")
    parser.add_argument("--trigger-not-ready", action=argparse.BooleanOptionalAction,
                        default=False, help="a Node NotReady for --not-ready-timeout is lost "
                                            "(default: off)")
    parser.add_argument("--not-ready-timeout", type=parse_duration, default=300.0,
                        help="seconds NotReady before --trigger-not-ready fires (default: 300)")
    parser.add_argument("--max-unavailable-nodes", type=Budget.parse, default=Budget(percent=10),
                        help="nodes holding opted-in PVs that may be down at once, a count or a "
                             "percent (never below 1); beyond it nothing is remediated "
                             "(default: 10%%)")
    parser.add_argument("--max-claims-per-minute", type=int, default=10,
                        help="claims deleted in any minute at most (default: %(default)s)")
    parser.add_argument("--dry-run", action="store_true",
                        help="delete nothing; log and post Events for what would be deleted")
    parser.add_argument("--leader-elect", action=argparse.BooleanOptionalAction, default=True,
                        help="elect one acting replica through a Lease (default: on)")
    parser.add_argument("--lease-name", default=DEFAULT_LEASE)
    parser.add_argument("--lease-namespace", default=env.get("MY_NAMESPACE") or "localpv-agent")
    parser.add_argument("--lease-duration", type=int, default=15,
                        help="seconds a silent leader keeps the Lease (default: %(default)s)")
    parser.add_argument("--renew-deadline", type=float, default=10.0,
                        help="seconds after its last renewal a leader stops acting "
                             "(default: %(default)s)")
    parser.add_argument("--retry-period", type=float, default=2.0,
                        help="seconds between leader election rounds (default: %(default)s)")
    parser.add_argument("--id", default=env.get("POD_NAME") or "",
                        help="this replica's identity in the Lease (default: $POD_NAME, else "
                             "the host name and a random suffix)")
    parser.add_argument("--listen-address", default=":8080",
                        help="address for /metrics, /healthz and /ready; empty to disable")
    parser.add_argument("--port-file", default=None,
                        help="write the bound HTTP port here (useful with port 0)")
