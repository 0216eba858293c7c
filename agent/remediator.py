"""`localpv-agent remediate`: the cluster-level controller that gives a lost node's StatefulSet
replicas fresh claims elsewhere. The decisions are in `agent.remediate`; this module keeps the
caches, elects the leader and makes the API calls.

Run as a Deployment of two replicas. Each replica lists and watches Nodes, PVs and Pending pods
and keeps its own memory of when each node went missing or NotReady, so a standby that takes
over acts on time; only the holder of the Lease writes, and it re-checks that it still holds it
before every delete. A pass is level-driven: it recomputes everything from the caches, reads the
claim, the pods and the StatefulSet of each bound PV on a lost node afresh, and deletes with UID
and resourceVersion preconditions, so a decision is never applied to an object that changed.
"""

from __future__ import annotations

import argparse
import logging
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from agent.kube import ApiError, ClusterKube
from agent.metrics import (
    HealthServer,
    Metrics,
    RemediationMetrics,
    RemediationSample,
    stalled_after,
)
from agent.pv import rfc3339
from agent.remediate import (
    DEFAULT_LEASE,
    Assessment,
    Budget,
    ClaimCandidate,
    ClaimDecision,
    Memory,
    ObjectRef,
    Observed,
    Options,
    RateWindow,
    VolumeRemoval,
    assess,
    decide_claim,
    lease_step,
    observe,
    opted_in,
    pinned_hostname,
    released,
    statefulsets_to_read,
)
from agent.watching import follow

log = logging.getLogger("localpv-agent.remediate")

EXIT_OK, EXIT_CONFIG = 0, 2
MIN_PASS_GAP = 0.2  # seconds between passes: a burst of watch events makes one pass


# -- caches -------------------------------------------------------------------------------------


class Informer:
    """All objects of one kind, kept current by list-then-watch; `synced` after the first
    list. A watch that ends resumes from the last version, one that expires or fails lists
    again (with a backoff), and every change calls `on_change` (with the object, if one)."""

    def __init__(self, kube: ClusterKube, kind: str, stop: threading.Event,
                 on_change: Callable[[str, Mapping[str, Any] | None], None],
                 field_selector: str = "") -> None:
        self.kube, self.kind, self.stop = kube, kind, stop
        self.on_change = on_change
        self.field_selector = field_selector
        self._lock = threading.Lock()
        self._objects: dict[str, dict[str, Any]] = {}
        self._version = ""
        self.synced = False
        self._thread = threading.Thread(target=self._run, name=f"watch-{kind}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def items(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._objects.values())

    def load(self, objects: list[dict[str, Any]], version: str = "") -> None:
        """Replace the cache wholesale: a fresh list (also how tests seed it)."""
        with self._lock:
            self._objects = {self.key(o): o for o in objects}
            self._version = version
        self.synced = True

    @staticmethod
    def key(obj: Mapping[str, Any]) -> str:
        meta = obj.get("metadata") or {}
        return f"{meta.get('namespace', '')}/{meta.get('name', '')}"

    def _run(self) -> None:
        follow(self.kind, self._round, self._expire, self.stop)

    def _expire(self) -> None:
        self._version = ""

    def _round(self) -> None:
        if not self._version:
            found, version = self.kube.list_all(self.kind, self.field_selector)
            self.load(found, version)
            self.on_change(f"{self.kind}-listed", None)
        for event_type, obj in self.kube.watch_all(self.kind, self._version, self.field_selector):
            if self.stop.is_set():
                return
            version = str((obj.get("metadata") or {}).get("resourceVersion", ""))
            with self._lock:
                if event_type == "DELETED":
                    self._objects.pop(self.key(obj), None)
                elif event_type in ("ADDED", "MODIFIED"):
                    self._objects[self.key(obj)] = obj
                self._version = version or self._version
            if event_type != "BOOKMARK":
                self.on_change(f"{self.kind}-{event_type.lower()}", obj)


# -- leader election ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LeaseSettings:
    name: str = DEFAULT_LEASE
    namespace: str = "localpv-agent"
    duration: int = 15  # seconds a holder that stopped renewing keeps the Lease
    renew_deadline: float = 10.0  # seconds after the last renewal the leader stops acting
    retry_period: float = 2.0  # seconds between rounds
    enabled: bool = True


def wall_clock() -> str:
    return rfc3339(time.time(), micro=True)


class LeaderElector:
    """Holds or follows the Lease. `is_leader` is true only until `renew_deadline` after the
    last renewal that was sent before it succeeded: shorter than the lease duration, so a
    leader that cannot renew stops acting before anyone else may take over."""

    def __init__(self, kube: ClusterKube, me: str, settings: LeaseSettings,
                 stop: threading.Event, on_lead: Callable[[], None]) -> None:
        self.kube, self.me, self.settings, self.stop = kube, me, settings, stop
        self.on_lead = on_lead
        self.holder = ""
        self._leader_until = 0.0
        self._observed: Observed | None = None
        self._was_leader = False
        self._thread = threading.Thread(target=self._run, name="leader-election", daemon=True)

    def start(self) -> None:
        if not self.settings.enabled:
            log.info("leader election off: this replica acts alone")
            self.holder = self.me
            self._leader_until = float("inf")
            self.on_lead()
            return
        self._thread.start()

    def is_leader(self) -> bool:
        return time.monotonic() < self._leader_until

    def _run(self) -> None:
        while not self.stop.is_set():
            self.round()
            self._note_change()
            self.stop.wait(self.settings.retry_period)
        self._note_change()

    def round(self) -> None:
        s = self.settings
        started = time.monotonic()
        try:
            lease = self.kube.get_lease(s.namespace, s.name)
            step = lease_step(lease, self.me, s.name, s.namespace, s.duration, self._observed,
                              started, wall_clock())
            self._observed = step.observed
            if step.verb == "follow":
                self.holder = step.holder
                self._leader_until = 0.0
                return
            assert step.body is not None
            if step.verb == "create":
                written = self.kube.create_lease(s.namespace, step.body)
            else:
                written = self.kube.replace_lease(s.namespace, s.name, step.body)
            version = str((written.get("metadata") or {}).get("resourceVersion", ""))
            self._observed = Observed(version, self.me, started)
            self.holder = self.me
            self._leader_until = started + s.renew_deadline
        except ApiError as exc:
            if exc.conflict:  # someone else wrote it first: read again next round
                log.info("lease %s/%s: another replica wrote it first", s.namespace, s.name)
            else:
                log.warning("lease %s/%s: %s", s.namespace, s.name, exc)

    def _note_change(self) -> None:
        leader = self.is_leader()
        if leader and not self._was_leader:
            log.info("became the leader (lease %s/%s, identity %s)", self.settings.namespace,
                     self.settings.name, self.me)
            self.on_lead()
        elif self._was_leader and not leader:
            log.warning("no longer the leader (%s): stopped acting",
                        f"held by {self.holder}" if self.holder != self.me else
                        "could not renew the lease")
        self._was_leader = leader

    def release(self) -> None:
        """Hand the Lease back on shutdown, so a standby takes over at once."""
        if not self.settings.enabled or not self.is_leader():
            return
        self._leader_until = 0.0
        s = self.settings
        try:
            lease = self.kube.get_lease(s.namespace, s.name)
            body = released(lease, self.me, wall_clock()) if lease else None
            if body is not None:
                self.kube.replace_lease(s.namespace, s.name, body)
                log.info("released the lease %s/%s", s.namespace, s.name)
        except ApiError as exc:
            log.warning("could not release the lease %s/%s: %s", s.namespace, s.name, exc)


# -- the controller -----------------------------------------------------------------------------


class Remediator:
    """Passes over the caches: observe, assess, and (as the leader) act."""

    def __init__(self, kube: ClusterKube, options: Options, identity: str,  # noqa: PLR0913, PLR0917 - the wiring's inputs, one each
                 lease: LeaseSettings, interval: float,
                 count: Callable[[str, str], None] = lambda trigger, result: None) -> None:
        self.kube = kube
        self.options = options
        self.identity = identity
        self.interval = interval  # seconds between passes when nothing wakes it
        self.stop = threading.Event()
        self._wake = threading.Event()
        self.nodes = Informer(kube, "nodes", self.stop, self.wake)
        self.pvs = Informer(kube, "persistentvolumes", self.stop, self.wake)
        self.pending = Informer(kube, "pods", self.stop, self.wake, "status.phase=Pending")
        self.elector = LeaderElector(kube, identity, lease, self.stop,
                                     lambda: self.wake("lead", None))
        self.memory = Memory()
        self.rate = RateWindow(options.max_claims_per_minute)
        self.last: Assessment | None = None
        self.passes = 0
        self.heartbeat = time.monotonic()
        self.said = Outcomes(kube, identity, count)
        # A claim waiting on its pods is read again after `interval`, or at once when a pod of
        # its namespace changed: a burst of unrelated pod events costs no reads.
        self._recheck_at: dict[str, float] = {}
        self._touched: set[str] = set()  # namespaces of pod events since the last pass
        self._touched_lock = threading.Lock()

    # -- running --------------------------------------------------------------------------------

    def wake(self, why: str, obj: Mapping[str, Any] | None) -> None:
        if obj is not None and why.startswith("pods-"):
            with self._touched_lock:
                self._touched.add(str((obj.get("metadata") or {}).get("namespace", "")))
        self._wake.set()

    @property
    def synced(self) -> bool:
        return self.nodes.synced and self.pvs.synced and self.pending.synced

    def sample(self) -> RemediationSample:
        a = self.last
        return RemediationSample(
            lost_nodes=len(a.lost) if a else 0, unavailable_nodes=a.unavailable if a else 0,
            allowed_unavailable=a.allowed if a else 0, blocked=bool(a and a.blocked),
            leader=self.elector.is_leader(), passes=self.passes,
            ready=self.synced and self.kube.reachable)

    def run(self) -> None:
        for informer in (self.nodes, self.pvs, self.pending):
            informer.start()
        self.elector.start()
        classes = ", ".join(sorted(self.options.storage_classes))
        if classes:
            log.info("remediating PVs of the StorageClasses %s (%s)", classes, self._describe())
        else:
            log.warning("no StorageClass opted in (--storageclass-names): nothing will be "
                        "remediated")
        while not self.stop.is_set():
            self.heartbeat = time.monotonic()
            due: float | None = None
            if self.synced:
                try:
                    due = self.pass_once()
                except ApiError as exc:
                    log.warning("remediation pass failed, retrying: %s", exc)
                except Exception:  # a bug must not end the controller: log and retry
                    log.exception("remediation pass crashed; retrying")
            timeout = self.interval
            if due is not None:
                timeout = min(timeout, max(MIN_PASS_GAP, due - time.monotonic()))
            self._wake.wait(timeout)
            self._wake.clear()
            self.stop.wait(MIN_PASS_GAP)

    def shutdown(self) -> None:
        self.stop.set()
        self._wake.set()
        self.elector.release()

    def _describe(self) -> str:
        o = self.options
        triggers = [name for name, on in (
            (f"node deleted for {o.deletion_delay:g}s", o.trigger_deleted),
            ("out-of-service taint", o.trigger_out_of_service),
            (f"NotReady for {o.not_ready_timeout:g}s", o.trigger_not_ready)) if on]
        return (f"triggers: {', '.join(triggers) or 'none'}; at most {o.max_unavailable} "
                f"nodes down at once; {o.max_claims_per_minute} claims a minute"
                + ("; DRY RUN" if o.dry_run else ""))

    # -- one pass -------------------------------------------------------------------------------

    def pass_once(self) -> float | None:
        """Observe, assess, act if leading; returns when the next pass is due, if sooner than
        the interval."""
        now = time.monotonic()
        nodes, pvs = self.nodes.items(), self.pvs.items()
        hosts = [h for pv in pvs if opted_in(pv, self.options) and (h := pinned_hostname(pv))]
        self.memory = observe(self.memory, nodes, hosts, now)
        a = assess(nodes, pvs, self.memory, self.options, now)
        self.last = a
        self.passes += 1
        self.said.hosts(a)
        dues = [a.next_due] if a.next_due is not None else []
        if not self.elector.is_leader():
            return min(dues, default=None)
        self.said.guard(a, self.options.max_unavailable)
        with self._touched_lock:
            touched, self._touched = self._touched, set()
        waiting = False
        current: set[str] = set()
        for candidate in a.claims:
            current.add(_claim_key(candidate))
            waiting |= self._claim(candidate, a, now, touched)
        for removal in a.removals:
            current.add(_pv_key(removal.pv, removal.uid))
            self._remove(removal, a)
        for name, why in a.kept:
            current.add(f"kept/{name}")
            if self.said.first((f"kept/{name}", why)):
                log.info("PV %s of a lost node is left alone: %s", name, why)
        self.said.keep(current)
        self._recheck_at = {k: t for k, t in self._recheck_at.items() if k in current}
        if waiting:
            dues.append(now + self.interval)
        free = self.rate.next_free(now)
        if free is not None and a.claims:
            dues.append(free)
        return min(dues, default=None)

    def _claim(self, c: ClaimCandidate, a: Assessment, now: float,  # noqa: PLR0911 - one outcome per return, in order of precedence
               touched: set[str]) -> bool:
        """Act on one bound PV of a lost node; True when it waits on something that may
        change without an event this controller watches (a pod being evicted)."""
        key = _claim_key(c)
        if now < self._recheck_at.get(key, 0.0) and c.namespace not in touched:
            return True  # still waiting on its pods; nothing there changed
        self._recheck_at.pop(key, None)
        pvc = self.kube.get_pvc(c.namespace, c.claim)
        pods = self.kube.list_pods(c.namespace) if pvc is not None else []
        sets = {n: self.kube.get_statefulset(c.namespace, n)
                for n in sorted(statefulsets_to_read(pods, c.claim))}
        d = decide_claim(c, pvc, pods, sets, a.hosts[c.hostname].node_names)
        ref = ObjectRef("PersistentVolumeClaim", c.claim, c.namespace, c.claim_uid)
        what = (f"claim {c.namespace}/{c.claim} (PV {c.pv} on lost node {c.hostname}, "
                f"{c.trigger.value})")
        if d.verdict == "done":
            return False
        if d.verdict == "wait":
            if self.said.first((key, "wait", d.reason)):
                log.info("%s: waiting: %s", what, d.reason)
            self._recheck_at[key] = now + self.interval
            return True
        if d.verdict == "skip":
            if self.said.first((key, d.result)):
                self.said.claim(c, d, ref, "Normal", "RemediationSkipped",
                                f"Not deleting {what}: {d.reason}", d.result)
            return False
        if a.blocked:
            if self.said.first((key, "blocked")):
                self.said.claim(c, d, ref, "Warning", "RemediationBlocked",
                                f"Not deleting {what}: too many nodes down at once "
                                f"({a.unavailable}, at most {a.allowed} allowed)", "blocked")
            return False
        if self.options.dry_run:
            if self.said.first((key, "dry_run")):
                self.said.claim(c, d, ref, "Normal", "RemediationDryRun",
                                f"Dry run: would delete {what} so that its StatefulSet "
                                f"recreates it on another node; pods {', '.join(d.pods)} "
                                "cannot run", "dry_run")
            return False
        if not self.rate.allow(now):
            if self.said.first((key, "rate_limited")):
                self.said.claim(c, d, ref, "Warning", "RemediationRateLimited",
                                f"Delaying the deletion of {what}: at most "
                                f"{self.options.max_claims_per_minute} claims a minute "
                                "(--max-claims-per-minute)", "rate_limited")
            return False
        return self._delete_claim(c, d, ref, what)

    def _delete_claim(self, c: ClaimCandidate, d: ClaimDecision, ref: ObjectRef,
                      what: str) -> bool:
        if not self.elector.is_leader():
            return False
        try:
            self.kube.delete_pvc(c.namespace, c.claim, c.claim_uid, d.resource_version)
        except ApiError as exc:
            if exc.conflict or exc.not_found:
                log.info("%s changed before its deletion; deciding again: %s", what, exc)
                self.said.count(c.trigger.value, "conflict")
                return True
            log.warning("could not delete %s: %s", what, exc)
            self.said.count(c.trigger.value, "failed")
            return True
        self.rate.record(time.monotonic())
        self.said.claim(c, d, ref, "Normal", "ClaimRemediated",
                        f"Deleted {what}: pods {', '.join(d.pods)} could not run; its StatefulSet "
                        "recreates the claim and the scheduler binds it to a free PV on another "
                        "node (the replica starts empty and re-replicates)", "claim_deleted")
        return False

    def _remove(self, r: VolumeRemoval, a: Assessment) -> None:
        key = _pv_key(r.pv, r.uid)
        ref = ObjectRef("PersistentVolume", r.pv, uid=r.uid)
        what = f"PV {r.pv} ({r.phase}) of lost node {r.hostname} ({r.trigger.value})"
        trigger = r.trigger.value
        if a.blocked:
            if self.said.first((key, "blocked")):
                self.said.report(ref, "Warning", "RemediationBlocked",
                                 f"Not deleting {what}: too many nodes down at once "
                                 f"({a.unavailable}, at most {a.allowed} allowed)", trigger,
                                 "blocked")
            return
        if self.options.dry_run:
            if self.said.first((key, "dry_run")):
                self.said.report(ref, "Normal", "RemediationDryRun",
                                 f"Dry run: would delete {what}", trigger, "dry_run")
            return
        if not self.elector.is_leader():
            return
        try:
            self.kube.delete_pv(r.pv, r.uid, r.resource_version)
        except ApiError as exc:
            if exc.conflict or exc.not_found:
                log.info("%s changed before its deletion; deciding again: %s", what, exc)
                self.said.count(trigger, "conflict")
                return
            log.warning("could not delete %s: %s", what, exc)
            self.said.count(trigger, "failed")
            return
        self.said.report(ref, "Normal", "VolumeRemediated", f"Deleted {what}; its data was not "
                         "touched (if the node comes back, its agent cleans the disk and offers it "
                         "again as one PV)", trigger, "pv_deleted")


class Outcomes:
    """What the remediator says, each outcome once: logged, counted (`count(trigger, result)`)
    and posted as an Event; the nodes' state and the partition guard when they change."""

    def __init__(self, kube: ClusterKube, identity: str,
                 count: Callable[[str, str], None]) -> None:
        self.kube = kube
        self.identity = identity
        self.count = count
        self._said: set[tuple[str, ...]] = set()  # (object key, outcome)
        self._host_states: dict[str, str] = {}
        self._blocked_logged = False

    def keep(self, current: set[str]) -> None:
        """Forget what is no longer a candidate, so it is said anew if it comes back."""
        self._said = {r for r in self._said if r[0] in current or r[0] == "guard"}

    def hosts(self, a: Assessment) -> None:
        states = {h: f"{s.state}: {s.detail}" for h, s in a.hosts.items()}
        for h, text in sorted(states.items()):
            before = self._host_states.get(h)
            if before != text and not (before is None and text.startswith("healthy")):
                level = logging.INFO if text.startswith("healthy") else logging.WARNING
                log.log(level, "node %s: %s", h, text)
        self._host_states = states

    def guard(self, a: Assessment, max_unavailable: Budget) -> None:
        """The partition guard's state: logged when it starts and ends, an Event on each
        down node once."""
        if not a.blocked:
            if self._blocked_logged:
                log.info("partition guard released: %d of %d nodes holding opted-in PVs down, "
                         "%d allowed", a.unavailable, len(a.hosts), a.allowed)
                self._said = {r for r in self._said if r[0] != "guard"}
            self._blocked_logged = False
            return
        down = sorted(h for h, s in a.hosts.items() if s.unavailable)
        message = (f"{a.unavailable} of {len(a.hosts)} nodes holding opted-in PVs are down at "
                   f"once ({', '.join(down)}); at most {a.allowed} allowed "
                   f"(--max-unavailable-nodes={max_unavailable}): a partition is "
                   "likelier than lost nodes, so nothing is remediated until fewer are down")
        if not self._blocked_logged:
            log.warning("partition guard: %s", message)
            self._blocked_logged = True
        for h in down:
            for name in sorted(a.hosts[h].node_names):
                if self.first(("guard", name)):
                    self.event(ObjectRef("Node", name), "Warning", "RemediationBlocked",
                                message)

    def first(self, key: tuple[str, ...]) -> bool:
        """Whether this outcome is new (then it is said: logged, counted, an Event)."""
        if key in self._said:
            return False
        self._said.add(key)
        return True

    def claim(self, c: ClaimCandidate, d: ClaimDecision, claim_ref: ObjectRef, event_type: str,  # noqa: PLR0913, PLR0917 - an Event's fields, one each
             reason: str, message: str, result: str) -> None:
        """An outcome for a claim: logged, counted, and an Event on the claim and the
        StatefulSet of its pods."""
        self.report(claim_ref, event_type, reason, message, c.trigger.value, result)
        if d.owner is not None:
            self.event(d.owner, event_type, reason, message)

    def report(self, ref: ObjectRef, event_type: str, reason: str, message: str,  # noqa: PLR0913, PLR0917 - an Event's fields, one each
                trigger: str, result: str) -> None:
        log.log(logging.WARNING if event_type == "Warning" else logging.INFO, "%s", message)
        self.count(trigger, result)
        self.event(ref, event_type, reason, message)

    def event(self, ref: ObjectRef, event_type: str, reason: str, message: str) -> None:
        try:
            self.kube.emit_event(ref.involved(), event_type, reason, message, self.identity)
        except ApiError as exc:
            log.warning("could not post the %s Event on %s %s: %s", reason, ref.kind, ref.name,
                        exc)


def _claim_key(c: ClaimCandidate) -> str:
    return f"claim/{c.namespace}/{c.claim}/{c.claim_uid}"


def _pv_key(name: str, uid: str) -> str:
    return f"pv/{name}/{uid}"


# -- command line -------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> int:
    """Run until SIGTERM; exit 2 for bad flags or an unusable kubeconfig."""
    from agent.cli import JsonFormatter  # noqa: PLC0415  (cli is what calls this)

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if args.log_format == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        handlers=[handler])
    logging.getLogger("urllib3").setLevel(logging.ERROR)  # failures are logged once, here
    classes = frozenset(c.strip() for text in args.storageclass_names for c in text.split(",")
                        if c.strip())
    problems = [f"--{name} must be positive" for name, value in (
        ("stale-pv-discovery-interval", args.stale_pv_discovery_interval),
        ("lease-duration", args.lease_duration), ("retry-period", args.retry_period),
        ("renew-deadline", args.renew_deadline)) if value <= 0]
    if args.max_claims_per_minute < 0:
        problems.append("--max-claims-per-minute must not be negative")
    if args.leader_elect and not args.retry_period < args.renew_deadline < args.lease_duration:
        problems.append("want --retry-period < --renew-deadline < --lease-duration")
    if problems:
        print(f"localpv-agent remediate: {'; '.join(problems)}", file=sys.stderr)
        return EXIT_CONFIG
    options = Options(
        storage_classes=classes, deletion_delay=args.pvc_deletion_delay,
        trigger_deleted=args.trigger_node_deleted,
        trigger_out_of_service=args.trigger_out_of_service,
        trigger_not_ready=args.trigger_not_ready, not_ready_timeout=args.not_ready_timeout,
        max_unavailable=args.max_unavailable_nodes,
        max_claims_per_minute=args.max_claims_per_minute, dry_run=args.dry_run)
    lease = LeaseSettings(args.lease_name, args.lease_namespace, args.lease_duration,
                          args.renew_deadline, args.retry_period, args.leader_elect)
    identity = args.id or f"{socket.gethostname()}_{uuid.uuid4().hex[:8]}"
    metrics = Metrics()
    try:
        kube = ClusterKube(args.kubeconfig or None, observe=metrics.observe_request)
    except Exception as exc:  # the client raises several unrelated types for a bad kubeconfig
        print(f"localpv-agent remediate: cannot configure the API client: {exc}",
              file=sys.stderr)
        return EXIT_CONFIG
    controller = Remediator(kube, options, identity, lease, args.stale_pv_discovery_interval)
    controller.said.count = RemediationMetrics(metrics, controller.sample).count
    # SIGTERM and SIGINT are blocked before any thread starts (threads inherit the mask) and
    # taken with sigtimedwait below: no handler runs in a thread holding a lock.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
    server = None
    if args.listen_address:
        alive = stalled_after(max(60.0, 3 * args.stale_pv_discovery_interval),
                              lambda: controller.heartbeat)
        try:
            server = HealthServer(args.listen_address, metrics, healthy=alive,
                                  ready=lambda: controller.synced and kube.reachable)
        except (ValueError, OSError) as exc:
            print(f"localpv-agent remediate: --listen-address: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        server.start()
        if args.port_file:
            Path(args.port_file).write_text(f"{server.port}\n")
    log.info("starting as %s", identity)
    loop = threading.Thread(target=controller.run, name="remediate", daemon=True)
    loop.start()
    while loop.is_alive():
        got = signal.sigtimedwait({signal.SIGTERM, signal.SIGINT}, 1.0)
        if got is not None:
            log.info("received %s, stopping", signal.Signals(got.si_signo).name)
            break
    controller.shutdown()
    loop.join(2.0)
    if server is not None:
        server.stop()
    log.info("stopped")
    return EXIT_OK
