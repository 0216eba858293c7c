"""The reconcile loop: observe the host and the API, plan, apply the difference.

Level-driven: every pass recomputes everything from the host and from a watch-fed cache of this
node's PVs only, so a missed wake-up costs latency, never correctness, and two passes over an
unchanged host write nothing. Wake-ups (watch events, the periodic resync) only shorten the
wait. API failures back off exponentially and never end the loop.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from agent.cleaner import (
    Cleaner,
    CleanError,
    CleanJob,
    CleanOutcome,
    DirtyRecord,
    DirtyStore,
    DiskChangedError,
    verify_block_device,
)
from agent.config import Config, ConfigError, fingerprint, load_config
from agent.discovery import Discovery, HostSnapshot, HostView, Volume, VolumeState, discover
from agent.host import HostReader
from agent.identity import Match, compare, identifiable, relevant_keys
from agent.jobs import JobState, cleanup_job, job_failure, job_name, job_state
from agent.kube import PV, ApiError, Kube
from agent.plan import (
    CLEANING_ANNOTATION,
    CleanDecision,
    Notice,
    Plan,
    Withdrawal,
    affinity_hostnames,
    cleaning_state,
    exclusion_notices,
    is_this_nodes,
    label_selector,
    local_path,
    plan,
    recycle,
    retry_delay,
)
from agent.sources import Waker
from agent.volumes import (
    MANAGED_BY_LABEL,
    ClassPolicy,
    NodeInfo,
    identity_annotations,
    identity_from_annotations,
    pv_manifest,
    pv_name,
)

log = logging.getLogger(__name__)

JOB_POLL = 5.0  # seconds between looks at running cleaning Jobs


@dataclass
class Backoff:
    """Exponential delay after failures, reset by a success."""

    initial: float = 1.0
    maximum: float = 60.0
    failures: int = 0

    def next_delay(self) -> float:
        self.failures += 1
        return float(min(self.maximum, self.initial * 2 ** (self.failures - 1)))

    def reset(self) -> None:
        self.failures = 0


@dataclass
class PassResult:
    discovery: Discovery
    plan: Plan
    created_by_mode: dict[str, int] = field(default_factory=dict)
    adopted: int = 0
    withdrawn: int = 0
    cleaning: frozenset[str] = frozenset()  # PV names being cleaned or waiting to retry
    errors: int = 0
    woken_at: float | None = None  # when the wake-up this pass answers arrived


@dataclass
class LoopState:
    """What health endpoints and metrics read; written only by the loop."""

    heartbeat: float = field(default_factory=time.monotonic)
    first_sync_done: bool = False
    failing_since: float | None = None  # monotonic start of a streak of failed passes
    failing_for_api: bool = False  # the streak is the API's fault, not the agent's
    last_pass: PassResult | None = None
    passes: int = 0


class PVCache:
    """This node's PVs, kept current by list + watch on the agent's own labels."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pvs: dict[str, PV] = {}
        self._deleted: set[str] = set()  # UIDs this agent deleted, until their DELETED event
        self.version = ""

    def replace(self, pvs: Mapping[str, PV], version: str) -> None:
        with self._lock:
            self._pvs = {n: pv for n, pv in pvs.items()
                         if pv["metadata"].get("uid") not in self._deleted}
            self.version = version

    def apply(self, event_type: str, pv: PV) -> None:
        with self._lock:
            meta = pv["metadata"]
            if event_type == "DELETED":
                self._pvs.pop(meta["name"], None)
                self._deleted.discard(meta.get("uid", ""))
            elif event_type in ("ADDED", "MODIFIED") and meta.get("uid") not in self._deleted:
                self._pvs[meta["name"]] = pv
            self.version = meta.get("resourceVersion") or self.version

    def forget(self, name: str, uid: str) -> None:
        """This agent deleted the PV: late events about that object must not bring it back."""
        with self._lock:
            self._pvs.pop(name, None)
            if uid:
                self._deleted.add(uid)
            if len(self._deleted) > 10_000:  # DELETED events normally empty it; bound it anyway
                self._deleted.clear()

    def put(self, pv: PV) -> None:
        """The response of this agent's own write. The watch may already have delivered a
        newer version of the object; an older response must not replace it."""
        with self._lock:
            cached = self._pvs.get(pv["metadata"]["name"])
        if cached is not None and _newer(cached, pv):
            return
        self.apply("ADDED", pv)

    def get(self, name: str) -> PV | None:
        with self._lock:
            return self._pvs.get(name)

    def snapshot(self) -> dict[str, PV]:
        with self._lock:
            return dict(self._pvs)


class Reconciler:
    """Keeps exactly one PV per discovered volume of one node."""

    def __init__(
        self,
        kube: Kube,
        reader: HostReader,
        config: Config,
        node_name: str,
        resync_period: float = 300.0,
        debounce: float = 0.2,
        on_pass: Callable[[PassResult, float], None] | None = None,
        poll_period: float | None = None,
        withdraw_missing: bool = True,
        cleaner: Cleaner | None = None,
        dirty: DirtyStore | None = None,
        on_clean: Callable[[CleanOutcome], None] | None = None,
        clean_stale_after: float = 60.0,
        clean_retry_base: float = 30.0,
        config_path: str | None = None,
        job_image: str | None = None,
        namespace: str = "default",
    ) -> None:
        self.kube = kube
        self.reader = reader
        self.config = config
        self.node_name = node_name
        self.resync_period = resync_period
        self.debounce = debounce
        self.on_pass = on_pass
        self.poll_period = poll_period  # the upstream's behaviour: a pass every period
        self.withdraw_missing = withdraw_missing
        self.cleaner = cleaner
        self.dirty = dirty
        self.on_clean = on_clean
        self._clean_retry: dict[str, tuple[float, int]] = {}  # PV-less volumes: (when, attempts)
        self.instance = f"{node_name}/{uuid.uuid4().hex[:12]}"  # tells a twin from a restart
        self.clean_stale_after = clean_stale_after
        self.config_path = config_path
        self._config_fingerprint = fingerprint(config_path) if config_path else ""
        self.config_reloads: Counter[str] = Counter()  # "applied" | "rejected"
        self.clean_retry_base = clean_retry_base
        self.job_image = job_image
        self.namespace = namespace
        self._jobs: dict[str, tuple[CleanJob, float]] = {}  # key -> (job, monotonic start)
        self._heartbeats: dict[str, float] = {}  # PV name -> when its record was last renewed
        self.node = NodeInfo(name=node_name)
        self.cache = PVCache()
        self.state = LoopState()
        self.stop = threading.Event()
        self.wake = threading.Event()
        self.waker = Waker(self.wake)
        self._policies: dict[str, ClassPolicy | None] = {}
        self._emitted: set[str] = set()
        self._watcher: threading.Thread | None = None
        self.held: dict[str, str] = {}  # dirty volumes neither cleaned nor offered -> why

    # -- lifecycle -----------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Ask `run` to return; safe from a signal handler."""
        self.stop.set()
        self.wake.set()

    def run(self) -> None:
        """Run until `stop` is set. Startup steps retry with backoff until they succeed."""
        if not self._retry(self._start):
            return
        backoff = Backoff()
        next_resync = time.monotonic() + self.resync_period
        while not self.stop.is_set():
            self.state.heartbeat = time.monotonic()
            now = time.monotonic()
            if now >= next_resync:
                next_resync = now + self.resync_period
                try:
                    self.refresh_storage_classes()
                except ApiError as exc:
                    log.warning("resync: %s", exc)
            try:
                result = self.sync()
            except ApiError as exc:
                delay = self._failed(backoff, api=True)
                log.warning("pass failed, retrying in %.0fs: %s", delay, exc)
                self._backoff_wait(delay)
                continue
            except OSError as exc:
                delay = self._failed(backoff, api=False)
                log.warning("pass failed, retrying in %.0fs: %s", delay, exc)
                self._backoff_wait(delay)
                continue
            except Exception:  # a bug must not stop every volume of the node: log, back off
                delay = self._failed(backoff, api=False)
                log.exception("pass crashed, retrying in %.0fs", delay)
                self._backoff_wait(delay)
                continue
            if result.errors:
                delay = self._failed(backoff, api=True)
                log.warning("%d API writes failed, retrying in %.0fs", result.errors, delay)
                self._backoff_wait(delay)
                continue
            backoff.reset()
            self.state.failing_since = None
            deadline = next_resync
            if self.poll_period:
                deadline = min(deadline, time.monotonic() + self.poll_period)
            self._wait_until(deadline)

    def _failed(self, backoff: Backoff, api: bool) -> float:
        """Record a failed pass; a long streak not caused by the API fails /healthz."""
        if self.state.failing_since is None:
            self.state.failing_since = time.monotonic()
            self.state.failing_for_api = api
        else:
            self.state.failing_for_api = self.state.failing_for_api and api
        return backoff.next_delay()

    def wedged(self, bound: float) -> bool:
        """Passes have failed for longer than `bound`, and not only because the API is away:
        a restart may help, so liveness says so. An unreachable API never counts: restarting
        every agent of a cluster during an API outage helps nobody."""
        since = self.state.failing_since
        return (since is not None and not self.state.failing_for_api
                and time.monotonic() - since > bound)

    def note_progress(self) -> None:
        """The loop made progress (an API request answered or failed in time)."""
        self.state.heartbeat = time.monotonic()

    def _backoff_wait(self, delay: float) -> None:
        """Wait out a backoff, still picking up config edits: a config that breaks every pass
        is fixed by editing it, without a restart."""
        deadline = time.monotonic() + delay
        while not self.stop.is_set() and time.monotonic() < deadline:
            self.state.heartbeat = time.monotonic()
            try:
                if self._reload_config():
                    return
            except Exception:
                log.exception("reloading the config failed")
            self.stop.wait(min(1.0, max(0.0, deadline - time.monotonic())))

    def _start(self) -> None:
        self.node = self.kube.get_node(self.node_name)
        log.info("serving node %s (uid %s, hostname %s)", self.node.name, self.node.uid,
                 self.node.hostname_label)
        self.refresh_storage_classes()
        self.adopt_upstream_pvs()
        pvs, version = self.kube.list_pv_snapshot(label_selector(self.node))
        self.cache.replace(pvs, version)
        self._watcher = threading.Thread(target=self._watch_forever, name="pv-watch", daemon=True)
        self._watcher.start()

    def _retry(self, step: Callable[[], None]) -> bool:
        backoff = Backoff()
        while not self.stop.is_set():
            try:
                step()
                return True
            except ApiError as exc:
                delay = backoff.next_delay()
                log.warning("startup: %s; retrying in %.0fs", exc, delay)
                self._sleep(delay)
        return False

    # -- one pass ------------------------------------------------------------------------------

    def sync(self) -> PassResult:
        """One level-driven pass: host → desired PVs → plan against the cache → apply."""
        started = time.monotonic()
        woken_at = self.waker.take_first_wake()
        self._collect_cleanings()
        cached = self.cache.snapshot()
        ours = {n: pv for n, pv in cached.items() if is_this_nodes(pv, self.node)}
        snapshot, found, states = self._observe(ours)
        volumes = {v.host_path: v for v in found.volumes}
        errors = self._record_identities(ours, states, volumes)
        self._mark_dirty(ours, volumes)
        dirty = self.dirty.records() if self.dirty is not None else {}
        cleanable = self._verified_dirty(dirty, volumes)
        recycling = recycle(
            ours, states, frozenset(volumes), frozenset(dirty), self._running_cleans(),
            time.time(), {k: when for k, (when, _) in self._clean_retry.items()},
            self.instance, self.clean_stale_after, cleanable)
        desired = self._desired(found, recycling.hold)
        the_plan = plan(desired, cached, self.node, states, self.withdraw_missing)
        result = PassResult(found, the_plan, woken_at=woken_at, cleaning=recycling.cleaning,
                            errors=errors)
        if self.cleaner is not None:
            for name in the_plan.changed_disk:  # never let queued or running work touch it
                self.cleaner.cancel(local_path(cached[name]) or "", "a different disk is there")
        for adoption in the_plan.adopt:
            try:
                self.cache.put(self.kube.patch_pv_labels(adoption.name, adoption.uid,
                                                         adoption.labels))
                result.adopted += 1
                log.info("adopted PV %s: labelled %s", adoption.name, dict(adoption.labels))
            except ApiError as exc:
                result.errors += 1
                log.warning("adopting PV %s: %s", adoption.name, exc)
        for manifest in the_plan.create:
            self._create(manifest, result)
        for withdrawal in the_plan.withdraw:
            self._withdraw(withdrawal, result)
        if self.cleaner is not None:
            for decision in recycling.clean:
                self._start_clean(decision, found, snapshot, result)
        self._notify(list(recycling.notices))
        for when in recycling.recheck:
            self.waker.wake_at(time.monotonic() + max(0.0, when - time.time()) + 0.1)
        conditions = ("missing/", "changed/")  # re-reported after they clear and come back
        self._notify([n for n in the_plan.notices if not n.key.startswith(conditions)])
        self._notify([n for n in the_plan.notices if n.key.startswith(conditions)],
                     scope=conditions)
        self._notify(exclusion_notices(found.exclusions, self.node), scope="excluded/")
        self.state.first_sync_done = True
        self.state.last_pass = result
        self.state.passes += 1
        if self.on_pass is not None:
            self.on_pass(result, time.monotonic() - started)
        return result

    def _observe(self, ours: Mapping[str, PV]) -> tuple[
            HostSnapshot, Discovery, dict[str, tuple[VolumeState, Mapping[str, str]]]]:
        """The host now, and for each of this node's PVs whether its disk is there."""
        snapshot = self.reader.snapshot(self.config)
        keep = frozenset(p for p in map(local_path, ours.values()) if p)
        dirty = self.dirty.paths() if self.dirty is not None else frozenset()
        found = discover(self.config, snapshot, keep, dirty)
        view = HostView(self.config, snapshot, found)
        volumes = {v.host_path: v for v in found.volumes}
        states: dict[str, tuple[VolumeState, Mapping[str, str]]] = {}
        for name, pv in ours.items():
            state, observed = view.state(pv["spec"].get("storageClassName", ""),
                                         local_path(pv) or "")
            states[name] = (state, _comparable(observed, volumes.get(local_path(pv) or "")))
        return snapshot, found, states

    def _desired(self, found: Discovery, hold: frozenset[str]) -> list[dict[str, Any]]:
        """The PVs the volumes should have. A class whose volumes cannot be turned into PVs
        (a bug, or a config the checks missed) is left out alone, with an Event."""
        desired = []
        failed: dict[str, str] = {}
        for volume in found.volumes:
            if volume.host_path in hold:
                continue  # holds a former tenant's data until it is cleaned
            policy = self._policies.get(volume.class_name)
            if policy is None or volume.class_name in failed:
                continue  # StorageClass missing: that class is disabled
            try:
                desired.append(pv_manifest(volume, self.node, self.config, policy))
            except Exception as exc:
                log.exception("class %s: building the PV for %s failed", volume.class_name,
                              volume.host_path)
                failed[volume.class_name] = f"{type(exc).__name__}: {exc}"
        self._notify([Notice("Node", self.node.name, "Warning", "ClassFailed",
                             f"class {name} is skipped in this pass: {why}",
                             key=f"class-failed/{name}") for name, why in failed.items()],
                     scope="class-failed/")
        return desired

    def _record_identities(self, ours: Mapping[str, PV],
                           states: Mapping[str, tuple[VolumeState, Mapping[str, str]]],
                           volumes: Mapping[str, Volume]) -> int:
        """Write the disk identity on PVs that lack one (adopted from the upstream, or made
        before identities were recorded), from the disk present now, while the PV is
        Available or Bound: a Released PV's disk may already be another one."""
        errors = 0
        for name, pv in sorted(ours.items()):
            meta = pv["metadata"]
            volume = volumes.get(local_path(pv) or "")
            state, observed = states.get(name, (VolumeState.UNKNOWN, {}))
            if ((pv.get("status") or {}).get("phase") not in ("Available", "Bound")
                    or meta.get("deletionTimestamp") or volume is None
                    or state is not VolumeState.PRESENT):
                continue
            raw = volume.is_block_device
            recorded = identity_from_annotations(meta.get("annotations") or {})
            if identifiable(recorded, raw) or not identifiable(volume.identity, raw) \
                    or compare(recorded, observed, raw).match is Match.DIFFERENT:
                continue
            try:
                self.cache.put(self.kube.patch_pv_annotations(
                    name, meta.get("resourceVersion", ""),
                    identity_annotations(volume.identity)))
                log.info("recorded the identity of the disk of PV %s: %s", name,
                         dict(volume.identity))
            except ApiError as exc:
                if exc.conflict:
                    self._refresh(name)
                else:
                    errors += 1
                    log.warning("recording the disk identity of PV %s: %s", name, exc)
        return errors

    def _mark_dirty(self, ours: Mapping[str, PV], volumes: Mapping[str, Volume]) -> None:
        """A claimed volume holds someone's data from now on: remember it on the host, with
        the identity of the disk that holds it."""
        if self.dirty is None:
            return
        dirty = self.dirty.paths()
        problems = []
        for name, pv in sorted(ours.items()):
            path = local_path(pv)
            if not path or path in dirty or not (pv.get("spec") or {}).get("claimRef"):
                continue
            volume = volumes.get(path)
            recorded = identity_from_annotations(pv["metadata"].get("annotations") or {})
            raw = volume.is_block_device if volume else False
            identity = recorded if identifiable(recorded, raw) or volume is None \
                else {**recorded, **volume.identity}
            try:
                self.dirty.mark(path, name, identity)
            except OSError as exc:  # other volumes go on; this one is reported until it works
                problems.append(Notice(
                    "Node", self.node.name, "Warning", "StateDirUnwritable",
                    f"cannot record that {path} holds data of PV {name} in "
                    f"{self.dirty.dir}: {exc.strerror or exc}", key=f"state-dir/{path}"))
        self._notify(problems, scope="state-dir/")

    def _verified_dirty(self, dirty: Mapping[str, DirtyRecord],
                        volumes: Mapping[str, Volume]) -> frozenset[str]:
        """Dirty volumes without a PV that may be cleaned: only where the disk there now is
        the one the record names. Any other is held (never offered, never cleaned) and
        reported, with the manual step that releases it."""
        ok: set[str] = set()
        notices = []
        held: dict[str, str] = {}
        for path, record in sorted(dirty.items()):
            volume = volumes.get(path)
            if volume is None:
                continue
            verdict = compare(record.identity or {}, volume.identity, volume.is_block_device)
            if record.identity is not None and verdict.match is Match.SAME:
                ok.add(path)
                continue
            manual = (f"once its contents are wiped or known to be disposable, delete "
                      f"{self.dirty.file_of(path) if self.dirty else 'its record'} to offer it")
            if verdict.match is Match.DIFFERENT:
                if self.cleaner is not None:
                    self.cleaner.cancel(path, "a different disk is there")
                message = (f"a different disk is at {path} ({verdict.describe()}) than the one "
                           f"that held the data of PV {record.pv}: it is neither cleaned nor "
                           f"offered; {manual}")
                reason = "DiskChanged"
            else:
                why = ("was recorded without the disk's identity"
                       if record.identity is None else "names a disk that cannot be recognised")
                message = (f"{path} held the data of PV {record.pv} (since {record.since}) and "
                           f"its record {why}: it is neither cleaned nor offered "
                           f"automatically; {manual}")
                reason = "VolumeUnverified"
            notices.append(Notice("Node", self.node.name, "Warning", reason, message,
                                  key=f"dirty/{path}/{verdict.match}"))
            held[path] = "disk_changed" if verdict.match is Match.DIFFERENT else "unverified"
        self.held = held  # read by metrics from another thread: replaced whole
        self._notify(notices, scope="dirty/")
        return frozenset(ok)

    def _create(self, manifest: Mapping[str, Any], result: PassResult) -> None:
        name, path = manifest["metadata"]["name"], manifest["spec"]["local"]["path"]
        try:
            created = self.kube.create_pv(manifest)
        except ApiError as exc:
            if exc.conflict:
                self._resolve_conflict(name, path, result)
                return
            result.errors += 1
            log.warning("creating PV %s for %s: %s", name, path, exc)
            return
        self.cache.put(created)
        mode = manifest["spec"]["volumeMode"]
        result.created_by_mode[mode] = result.created_by_mode.get(mode, 0) + 1
        capacity = manifest["spec"]["capacity"]["storage"]
        log.info("created PV %s for %s (%s, %s)", name, path,
                 manifest["spec"]["storageClassName"], capacity)
        self._emit(Notice("PersistentVolume", name, "Normal", "Provisioned",
                          f"created for {path} on node {self.node.name} ({capacity})", key="",
                          uid=created["metadata"].get("uid", "")))

    # -- recycling ----------------------------------------------------------------------------

    def _start_clean(self, decision: CleanDecision, found: Discovery, snapshot: HostSnapshot,
                     result: PassResult) -> None:
        assert self.cleaner is not None
        volume = next((v for v in found.volumes if v.host_path == decision.key), None)
        cls = self.config.storage_class(volume.class_name) if volume else None
        if volume is None or cls is None:
            return
        mount_dir = snapshot.real_dirs.get(cls.name, cls.mount_dir)
        real = os.path.realpath(volume.mount_path)
        nested = tuple(m.mount_point for m in snapshot.mounts
                       if m.mount_point.startswith(real.rstrip("/") + "/"))
        if decision.pv_name is not None:
            pv = self.cache.get(decision.pv_name) or {}
            recorded = identity_from_annotations(
                (pv.get("metadata") or {}).get("annotations") or {})
        else:
            record = self.dirty.get(decision.key) if self.dirty is not None else None
            recorded = dict(record.identity or {}) if record is not None else {}
        job = CleanJob(
            key=decision.key, pv_name=decision.pv_name, pv_uid=decision.pv_uid,
            class_name=cls.name, mode=volume.volume_mode, raw_device=volume.is_block_device,
            container_path=volume.mount_path, mount_dir=mount_dir, device=volume.device,
            command=cls.block_cleaner_command, identity=recorded, nested_mounts=nested,
            capacity_bytes=volume.capacity_bytes)
        # The volume's lock, from this decision until its outcome has been acted on.
        lock = self.cleaner.lock(decision.key)
        if lock is None:
            log.info("not cleaning %s now: another agent on this node holds its lock",
                     decision.key)
            self.waker.wake_at(time.monotonic() + self.clean_stale_after / 3)
            return
        if not self._begin_clean(decision, job, result):
            lock.release()
            return
        if self.cleaner.submit(job, lock):
            log.info("cleaning %s (%s) for %s", decision.key,
                     "block cleaner" if job.raw_device else "filesystem",
                     f"released PV {decision.pv_name}" if decision.pv_name
                     else "a volume whose PV was deleted before it was cleaned")

    def _begin_clean(self, decision: CleanDecision, job: CleanJob, result: PassResult) -> bool:
        """Record a PV's clean durably before it starts (a restart finds it and resumes);
        hand a block volume to a cleaning Job when configured. False: do not clean here."""
        if decision.pv_name is not None:
            record = {"state": "running", "by": self.instance, "heartbeat": time.time(),
                      "attempts": decision.attempts,
                      "since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            try:  # durable first: a restart finds the record and cleans again
                self.cache.put(self.kube.patch_pv_annotations(
                    decision.pv_name, decision.resource_version,
                    {CLEANING_ANNOTATION: json.dumps(record)}))
            except ApiError as exc:
                if exc.conflict:
                    self._refresh(decision.pv_name)
                else:
                    result.errors += 1
                log.info("not cleaning PV %s now: %s", decision.pv_name, exc)
                return False
            self._heartbeats[decision.pv_name] = time.monotonic()
        return not (self.config.use_job_for_cleaning and job.raw_device and decision.pv_name
                    and self._start_job(job))

    def confirm_clean(self, job: CleanJob) -> None:
        """Called by a cleaning worker under the volume's lock, right before the first byte is
        removed: the decision still holds. For a PV, it is the same object (UID) and still
        Released; without a PV, none exists for the path and the volume is still dirty with
        the same disk recorded. Raises CleanError otherwise."""
        if job.pv_name is not None:
            try:
                current = self.kube.get_pv(job.pv_name)
            except ApiError as exc:
                raise CleanError(f"cannot re-read PV {job.pv_name}: {exc}") from None
            meta = (current or {}).get("metadata") or {}
            phase = ((current or {}).get("status") or {}).get("phase")
            if current is None or meta.get("uid") != job.pv_uid or phase != "Released" \
                    or meta.get("deletionTimestamp") or local_path(current) != job.key:
                raise CleanError(f"PV {job.pv_name} is no longer the Released PV (uid "
                                 f"{job.pv_uid}) the clean was decided for; not cleaning")
            return
        record = self.dirty.get(job.key) if self.dirty is not None else None
        if record is None or dict(record.identity or {}) != dict(job.identity):
            raise CleanError(f"{job.key} is no longer recorded as dirty with the same disk "
                             "(another agent instance cleaned it?); not cleaning")
        if self._pv_exists_for(job.key, job.class_name, record.pv):
            raise CleanError(f"a PV exists for {job.key} again; not cleaning")

    def _pv_exists_for(self, path: str, class_name: str, recorded_pv: str) -> bool:
        """Before cleaning a dirty volume that has no PV in the cache, ask the API itself: a
        PV whose labels were edited drops out of the watch but may still be bound and in use."""
        names = {pv_name(posixpath.basename(path), self.node.name, class_name), recorded_pv}
        try:
            for name in sorted(n for n in names if n):
                found = self.kube.get_pv(name)
                if found is not None and local_path(found) == path and \
                        self.node.hostname_label in affinity_hostnames(found):
                    log.warning("not cleaning %s: PV %s still exists for it (without this "
                                "agent's labels?)", path, name)
                    return True
            for pv, _ in self.kube.list_pvs(limit=500):
                if local_path(pv) == path and self.node.hostname_label in affinity_hostnames(pv):
                    log.warning("not cleaning %s: PV %s still exists for it", path,
                                pv["metadata"]["name"])
                    return True
        except ApiError as exc:
            log.warning("not cleaning %s now: cannot check for its PV: %s", path, exc)
            return True
        return False

    def _running_cleans(self) -> frozenset[str]:
        running = self.cleaner.running() if self.cleaner else frozenset()
        return running | frozenset(self._jobs)

    def _start_job(self, job: CleanJob) -> bool:
        """Clean in a Kubernetes Job; False to clean in-process instead."""
        cls = self.config.storage_class(job.class_name)
        if not self.job_image or cls is None or job.pv_name is None:
            log.warning("useJobForCleaning needs the cleaner image (--job-image or "
                        "JOB_CONTAINER_IMAGE); cleaning %s in-process", job.key)
            return False
        device = posixpath.join(cls.mount_dir, posixpath.basename(job.key))
        try:  # the Job's pod cannot tell a swapped or busy disk: check here, before it starts
            self.confirm_clean(job)
            verify_block_device(job.container_path, job.device)
            if self.cleaner is not None:
                self.cleaner.check_identity(job)
        except DiskChangedError as exc:
            log.warning("not cleaning PV %s: %s", job.pv_name, exc)
            return True
        except (CleanError, OSError) as exc:
            self._clean_failed(CleanOutcome(job, False, 0.0, str(exc)))
            return True
        manifest = cleanup_job(job.pv_name, job.pv_uid, self.node, cls, device, self.job_image,
                               self.namespace, self.config.job_tolerations)
        try:
            self.kube.create_job(manifest)
            log.info("cleaning %s in Job %s/%s", job.key, self.namespace, job_name(job.pv_name))
        except ApiError as exc:
            if not exc.conflict:  # a Job of that name already runs: it is the lock
                log.warning("creating the cleaning Job for PV %s: %s", job.pv_name, exc)
                return True  # retried on a later pass
        self._jobs[job.key] = (replace(job, via_job=True), time.monotonic())
        self.waker.wake_at(time.monotonic() + JOB_POLL)
        return True

    def _collect_jobs(self) -> None:
        """Finished cleaning Jobs: delete a succeeded one, then its PV; report a failed one
        (it is left for an admin; deleting it starts a new clean)."""
        for key, (job, started) in list(self._jobs.items()):
            assert job.pv_name is not None
            try:
                found = self.kube.get_job(self.namespace, job_name(job.pv_name))
            except ApiError as exc:
                log.warning("reading cleaning Job for PV %s: %s", job.pv_name, exc)
                continue
            if found is None:
                self._jobs.pop(key)  # deleted by an admin: decided again on this pass
                continue
            if (found["metadata"].get("labels") or {}).get("pvuuid") != job.pv_uid:
                # Left from an earlier PV of the same name: it says nothing about this one.
                log.warning("Job %s belongs to an earlier PV %s; deleting it",
                            job_name(job.pv_name), job.pv_name)
                with contextlib.suppress(ApiError):
                    self.kube.delete_job(self.namespace, job_name(job.pv_name))
                self._jobs.pop(key)
                continue
            state = job_state(found)
            if state is JobState.RUNNING:
                continue
            outcome = CleanOutcome(job, state is JobState.SUCCEEDED,
                                   time.monotonic() - started,
                                   "Job succeeded" if state is JobState.SUCCEEDED
                                   else job_failure(found))
            if state is JobState.SUCCEEDED:
                try:
                    self.kube.delete_job(self.namespace, job_name(job.pv_name))
                except ApiError as exc:
                    log.warning("deleting the finished Job for PV %s: %s", job.pv_name, exc)
                    continue
                self._jobs.pop(key)
                if self.on_clean is not None:
                    self.on_clean(outcome)
                self._clean_succeeded(outcome)
            else:
                if f"job-failed/{job.pv_uid}" not in self._emitted and self.on_clean:
                    self.on_clean(outcome)
                self._notify([Notice("PersistentVolume", job.pv_name, "Warning",
                                     "VolumeFailedDelete",
                                     f"cleaning Job {self.namespace}/{job_name(job.pv_name)} "
                                     f"failed ({outcome.detail}); the PV stays Released. Delete "
                                     "the Job to try again", key=f"job-failed/{job.pv_uid}",
                                     uid=job.pv_uid)])
        if self._jobs:  # Jobs are not watched: look at them again shortly
            self.waker.wake_at(time.monotonic() + JOB_POLL)

    def _renew_cleanings(self) -> None:
        """Keep the heartbeat of running cleans fresh, so a twin agent leaves them alone."""
        if self.cleaner is None:
            return
        due = time.monotonic() - self.clean_stale_after / 3
        cached = self.cache.snapshot()
        running = self.cleaner.running()
        for name, last in list(self._heartbeats.items()):
            pv = cached.get(name)
            if pv is None or local_path(pv) not in running:
                self._heartbeats.pop(name, None)
                continue
            if last > due:
                continue
            record = {**cleaning_state(pv), "heartbeat": time.time()}
            try:
                self.cache.put(self.kube.patch_pv_annotations(
                    name, pv["metadata"].get("resourceVersion", ""),
                    {CLEANING_ANNOTATION: json.dumps(record)}))
                self._heartbeats[name] = time.monotonic()
            except ApiError as exc:
                log.warning("renewing the cleaning record of PV %s: %s", name, exc)

    def _collect_cleanings(self) -> None:
        """Act on finished cleanings: delete the PV and forget the dirt, or record the failure."""
        self._collect_jobs()
        if self.cleaner is None:
            return
        for outcome in self.cleaner.collect():
            try:  # the lock is held until the outcome is acted on: the PV deleted, the
                # dirty record cleared, or the failure recorded
                if self.on_clean is not None and not (outcome.busy or outcome.disk_changed):
                    self.on_clean(outcome)
                if outcome.ok:
                    self._clean_succeeded(outcome)
                elif outcome.disk_changed:
                    self.wake.set()  # the pass reports it; nothing was touched
                else:
                    self._clean_failed(outcome)
            finally:
                self.cleaner.release(outcome.job.key)

    def _clean_succeeded(self, outcome: CleanOutcome) -> None:
        job = outcome.job
        if job.pv_name is not None:
            try:
                current = self.kube.get_pv(job.pv_name)
                if current is not None and current["metadata"].get("uid") == job.pv_uid:
                    if (current.get("status") or {}).get("phase") != "Released":
                        log.warning("cleaned %s but PV %s is %s now, no longer Released: not "
                                    "deleting it", job.key, job.pv_name,
                                    (current.get("status") or {}).get("phase"))
                        return
                    self.kube.delete_pv(job.pv_name, job.pv_uid,
                                        current["metadata"].get("resourceVersion"))
            except ApiError as exc:
                if not exc.not_found:
                    log.warning("cleaned %s but deleting PV %s failed: %s; cleaning again later",
                                job.key, job.pv_name, exc)
                    return
            self.cache.forget(job.pv_name, job.pv_uid)
        if self.dirty is not None:
            self.dirty.clear(job.key)
        self._clean_retry.pop(job.key, None)
        what = f"PV {job.pv_name} deleted" if job.pv_name else "no PV existed"
        self._emit(Notice("Node", self.node.name, "Normal", "VolumeCleaned",
                          f"{job.key} cleaned in {outcome.seconds:.1f}s ({outcome.detail}); "
                          f"{what}; it is offered again", key=""))
        self.wake.set()  # offer it again now

    def _clean_failed(self, outcome: CleanOutcome) -> None:
        job = outcome.job
        if outcome.busy:  # another instance cleans it now: look again later, quietly
            self.waker.wake_at(time.monotonic() + self.clean_stale_after / 3)
            return
        if job.pv_name is None:
            _, attempts = self._clean_retry.get(job.key, (0.0, 0))
            self._clean_retry[job.key] = (
                time.time() + retry_delay(attempts + 1, self.clean_retry_base), attempts + 1)
            self.waker.wake_at(time.monotonic() + retry_delay(attempts + 1, self.clean_retry_base))
            self._notify([Notice("Node", self.node.name, "Warning", "VolumeFailedDelete",
                                 f"cleaning {job.key} failed: {outcome.detail}",
                                 key=f"clean-failed/{job.key}/{attempts + 1}")])
            return
        pv = self.cache.snapshot().get(job.pv_name)
        if pv is None:
            return
        attempts = int(cleaning_state(pv).get("attempts", 0)) + 1
        delay = retry_delay(attempts, self.clean_retry_base)
        record = {"state": "failed", "attempts": attempts, "retryAfter": time.time() + delay,
                  "error": outcome.detail[:500]}
        try:
            self.cache.put(self.kube.patch_pv_annotations(
                job.pv_name, pv["metadata"].get("resourceVersion", ""),
                {CLEANING_ANNOTATION: json.dumps(record)}))
        except ApiError as exc:
            log.warning("recording the failed clean of PV %s: %s", job.pv_name, exc)
        self.waker.wake_at(time.monotonic() + delay)
        self._notify([Notice("PersistentVolume", job.pv_name, "Warning", "VolumeFailedDelete",
                             f"cleaning {job.key} failed (attempt {attempts}, next in "
                             f"{delay:.0f}s): {outcome.detail}",
                             key=f"clean-failed/{job.pv_name}/{attempts}",
                             uid=pv["metadata"].get("uid", ""))])

    def _withdraw(self, withdrawal: Withdrawal, result: PassResult) -> None:
        """Delete an unbound PV whose disk is gone, only if nobody touched it since we looked."""
        try:
            self.kube.delete_pv(withdrawal.name, withdrawal.uid, withdrawal.resource_version)
        except ApiError as exc:
            if exc.conflict or exc.not_found:  # bound or changed meanwhile: decide again
                log.info("not withdrawing PV %s: it changed meanwhile", withdrawal.name)
                self._refresh(withdrawal.name)
                return
            result.errors += 1
            log.warning("withdrawing PV %s: %s", withdrawal.name, exc)
            return
        result.withdrawn += 1
        self.cache.forget(withdrawal.name, withdrawal.uid)
        log.warning("withdrew PV %s: the disk behind %s is gone and the PV was unbound",
                    withdrawal.name, withdrawal.path)
        self._emit(Notice("Node", self.node.name, "Warning", "VolumeWithdrawn",
                          f"PV {withdrawal.name} deleted: the disk behind {withdrawal.path} "
                          "is gone and nothing had claimed it", key=""))

    def _refresh(self, name: str) -> None:
        """A precondition failed: the cached copy is stale (a watch event can overtake the
        response of our own write). Read the PV again and decide once more on the next pass."""
        try:
            fresh = self.kube.get_pv(name)
        except ApiError as exc:
            log.warning("re-reading PV %s: %s", name, exc)
            return
        if fresh is None:
            cached = self.cache.get(name)
            self.cache.forget(name, (cached or {}).get("metadata", {}).get("uid", ""))
        else:
            self.cache.put(fresh)
        self.wake.set()

    def _resolve_conflict(self, name: str, path: str, result: PassResult) -> None:
        """The name exists already: adopt it when it is this node's PV for the same path."""
        existing = self.kube.get_pv(name)
        if existing is None:
            return  # deleted meanwhile; the next pass creates it
        if is_this_nodes(existing, self.node) and local_path(existing) == path:
            self.cache.put(existing)
            log.info("PV %s for %s already exists; adopting it", name, path)
            return
        self._notify([Notice("PersistentVolume", name, "Warning", "NameConflict",
                             f"PV {name} exists but is not this node's PV for {path!r}; "
                             "leaving it alone", key=f"name-conflict/{name}/{path}")])

    # -- StorageClasses and adoption ------------------------------------------------------------

    def refresh_storage_classes(self) -> None:
        policies: dict[str, ClassPolicy | None] = {}
        for cls in self.config.classes:
            sc = self.kube.get_storage_class(cls.name)
            if sc is None:
                policies[cls.name] = None
                self._notify([Notice(
                    "Node", self.node.name, "Warning", "StorageClassMissing",
                    f"StorageClass {cls.name} does not exist; its volumes under "
                    f"{cls.host_dir} are not offered until it does",
                    key=f"sc-missing/{cls.name}")])
                continue
            self._emitted.discard(f"sc-missing/{cls.name}")
            policies[cls.name] = ClassPolicy(
                reclaim_policy=sc.get("reclaimPolicy") or "Delete",
                mount_options=tuple(sc.get("mountOptions") or ()),
            )
        changed = policies != self._policies
        self._policies = policies
        if changed:
            log.info("storage classes: %s", {k: (v.reclaim_policy if v else "missing")
                                             for k, v in policies.items()})

    def adopt_upstream_pvs(self) -> None:
        """Once at start: find this node's PVs made by the upstream provisioner (no labels yet).

        Only PVs without the agent's label are listed, page by page and not kept: once a cluster
        is migrated this lists nothing, and memory stays flat in the cluster's size.
        """
        selector = label_selector(self.node)
        wanted = dict(kv.split("=", 1) for kv in selector.split(","))
        for pv, _ in self.kube.list_pvs(f"!{MANAGED_BY_LABEL}", limit=250):
            labels = pv["metadata"].get("labels") or {}
            if all(labels.get(k) == v for k, v in wanted.items()):
                continue
            if not is_this_nodes(pv, self.node) or pv["metadata"].get("deletionTimestamp"):
                continue
            missing = {k: v for k, v in wanted.items() if labels.get(k) != v}
            self.kube.patch_pv_labels(pv["metadata"]["name"], pv["metadata"]["uid"], missing)
            log.info("adopted upstream PV %s for %s", pv["metadata"]["name"], local_path(pv))

    # -- watch ---------------------------------------------------------------------------------

    def _watch_forever(self) -> None:
        backoff = Backoff()
        selector = label_selector(self.node)
        while not self.stop.is_set():
            try:
                if not self.cache.version:
                    pvs, version = self.kube.list_pv_snapshot(selector)
                    self.cache.replace(pvs, version)
                    self.wake.set()
                for event_type, pv in self.kube.watch_pvs(selector, self.cache.version):
                    if self.stop.is_set():
                        return
                    if event_type == "BOOKMARK":
                        self.cache.version = pv["metadata"]["resourceVersion"]
                        continue
                    before = self.cache.get(pv["metadata"]["name"])
                    self.cache.apply(event_type, pv)
                    if not self.poll_period and _phase_changed(event_type, before, pv):
                        # a PV deleted by hand is recreated now, a Released one cleaned now
                        self.waker.wake("pv-" + event_type.lower())
                backoff.reset()
            except ApiError as exc:
                if exc.gone:
                    log.info("PV watch expired; listing again")
                    self.cache.version = ""
                    self._sleep(min(backoff.next_delay(), 5.0))  # never a tight relist loop
                    continue
                delay = backoff.next_delay()
                log.warning("PV watch failed, retrying in %.0fs with a fresh list: %s", delay, exc)
                self.cache.version = ""  # the relist also proves the API is back
                self._sleep(delay)
            except Exception:  # the cache must not silently go stale: log, relist, go on
                log.exception("PV watch crashed; listing again")
                self.cache.version = ""
                self._sleep(backoff.next_delay())

    # -- events and waiting --------------------------------------------------------------------

    def _notify(self, notices: list[Notice], scope: str | tuple[str, ...] | None = None) -> None:
        """Emit each notice once. With a scope, `notices` is the complete current set for it:
        keys of that scope that no longer apply are forgotten, so a recurrence is reported."""
        if scope is not None:
            current = {n.key for n in notices}
            cleared = {k for k in self._emitted if k.startswith(scope) and k not in current}
            for key in sorted(cleared):
                log.info("condition cleared: %s", key)
            self._emitted -= cleared
        for notice in notices:
            if notice.key not in self._emitted and self._emit(notice):
                self._emitted.add(notice.key)

    def _emit(self, notice: Notice) -> bool:
        """One Event, now; False when the API refused it (it is tried again next pass)."""
        ref = {"kind": notice.kind, "name": notice.name, "apiVersion": "v1"}
        uid = notice.uid or (self.node.uid if notice.kind == "Node" else "")
        if uid:
            ref["uid"] = uid
        if notice.namespace:
            ref["namespace"] = notice.namespace
        if notice.event_type == "Warning":
            log.warning("%s %s: %s", notice.reason, notice.name, notice.message)
        try:
            self.kube.emit_event(ref, notice.event_type, notice.reason, notice.message,
                                 self.node.name)
        except ApiError as exc:
            log.warning("event %s on %s %s: %s", notice.reason, notice.kind, notice.name, exc)
            return False
        return True

    def _reload_config(self) -> bool:
        """Apply an edited config; reject a bad edit with an Event and keep the last good one.

        Existing PVs are never rewritten by a reload: new values apply to PVs created later.
        """
        if not self.config_path:
            return False
        current = fingerprint(self.config_path)
        if current == self._config_fingerprint:
            return False
        self._config_fingerprint = current
        try:
            config = load_config(self.config_path)
        except (ConfigError, OSError, ValueError, RecursionError) as exc:
            self.config_reloads["rejected"] += 1
            self._emit(Notice("Node", self.node.name, "Warning", "ConfigRejected",
                              f"the edited config {self.config_path} is invalid, the previous "
                              f"one stays in force: {exc}", key=""))
            return False
        before = {c.name for c in self.config.classes}
        after = {c.name for c in config.classes}
        self.config = config
        self.config_reloads["applied"] += 1
        log.info("config reloaded: classes %s (added %s, removed %s)", sorted(after),
                 sorted(after - before) or "none", sorted(before - after) or "none")
        for warning in config.warnings:
            log.warning("config %s: %s", self.config_path, warning)
        try:
            self.refresh_storage_classes()
        except ApiError as exc:
            log.warning("reading StorageClasses after a reload: %s", exc)
        return True  # a pass now, with the new config

    def _wait_until(self, deadline: float, tick: float = 2.0) -> None:
        """Sleep until woken, stopped or the deadline, beating the heart every `tick`."""
        deadline = min(deadline, self.waker.next_alarm())
        while not self.stop.is_set():
            self.state.heartbeat = time.monotonic()
            try:
                self._renew_cleanings()
                if self._reload_config():
                    break
            except Exception:  # housekeeping must never end the loop
                log.exception("housekeeping between passes failed")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            if self.wake.wait(min(remaining, tick)):
                self.stop.wait(self.debounce)  # coalesce a burst of wake-ups into one pass
                break
        self.wake.clear()

    def _sleep(self, seconds: float) -> None:
        self.stop.wait(seconds)


def _phase_changed(event_type: str, before: PV | None, after: PV) -> bool:
    """Whether a watch event is worth a pass: a PV gone, or its phase or claim changed."""
    if event_type == "DELETED":
        return True
    if before is None:
        return False  # ADDED: usually this agent's own create

    def key(pv: PV) -> tuple[object, object]:
        return ((pv.get("status") or {}).get("phase"), (pv.get("spec") or {}).get("claimRef"))

    return key(before) != key(after)


def _newer(a: PV, b: PV) -> bool:
    """Whether `a` is a later version of the same object than `b`. Resource versions are
    opaque, but etcd's are increasing integers; anything else is never called newer."""
    if a["metadata"].get("uid") != b["metadata"].get("uid"):
        return False
    va, vb = a["metadata"].get("resourceVersion", ""), b["metadata"].get("resourceVersion", "")
    return va.isdigit() and vb.isdigit() and int(va) > int(vb)


def _comparable(observed: Mapping[str, str], volume: Volume | None) -> dict[str, str]:
    """The observed identity keys that can tell a disk apart: a raw device's filesystem UUID
    is whatever its last tenant formatted, so only its hardware keys count."""
    raw = volume.is_block_device if volume is not None else False
    return {k: v for k, v in observed.items() if k in relevant_keys(raw)}
