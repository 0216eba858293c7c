"""Recycling: a Released volume is cleaned, then its PV deleted, so the disk is offered again.

The state machine per volume, driven by the loop's passes:

    Released PV ──decide──▶ record "running" on the PV ──▶ clean (in-process, or a Job)
        ├─ ok ─────────▶ delete the PV (same UID, still Released), clear the dirty record
        ├─ failed ─────▶ record "failed" with attempts and retryAfter; decided again after it
        └─ disk changed ▶ nothing touched; the pass reports DiskChanged

A dirty volume whose PV is gone (deleted by hand) is cleaned the same way, without a PV, when
its disk is recognised as the one its dirty record names. The volume's lock is held from the
decision until the outcome has been acted on, and the decision is confirmed under it right
before the first byte (`DiskGuard.confirm_clean`).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterable, Mapping

from agent import pv as pvs
from agent.cleaner import Cleaner, CleanJob, CleanOutcome, DirtyStore
from agent.context import Context
from agent.discovery import Discovery, HostSnapshot, Volume
from agent.heartbeats import Heartbeats
from agent.jobclean import JobCleaning, JobResult
from agent.jobs import job_name
from agent.kube import PV, ApiError
from agent.notices import Notice, Once, Reason, Scope
from agent.plan import CleanDecision, Recycling, recycle, retry_delay
from agent.pv import CLEANING_ANNOTATION, CleaningRecord
from agent.safety import DiskGuard, States

log = logging.getLogger(__name__)


class Recycler:
    """Owns the cleaner, the dirty store, cleaning Jobs, retries and heartbeats."""

    def __init__(self, ctx: Context, dirty: DirtyStore | None,
                 on_clean: Callable[[CleanOutcome], None] | None = None) -> None:
        self.ctx = ctx
        self.dirty = dirty
        self.on_clean = on_clean  # every attempt's outcome, for metrics
        self.cleaner: Cleaner | None = None
        self.guard = DiskGuard(ctx, dirty, self._cancel)
        self.jobs = JobCleaning(ctx, self.guard)
        self.heartbeats = Heartbeats(ctx.pvs, self._running_here,
                                     ctx.settings.clean_stale_after, ctx.stop)
        self._retry: dict[str, tuple[float, int]] = {}  # PV-less volumes: (when, attempts)

    def attach(self, cleaner: Cleaner) -> None:
        self.cleaner = cleaner

    def running(self) -> frozenset[str]:
        """Volumes being cleaned: in this process (until their outcome is acted on) or in Jobs."""
        return self._running_here() | self.jobs.running()

    def dirty_paths(self) -> frozenset[str]:
        return self.dirty.paths() if self.dirty is not None else frozenset()

    # -- deciding ---------------------------------------------------------------------------------

    def decide(self, ours: Mapping[str, PV], states: States,
               volumes: Mapping[str, Volume]) -> Recycling:
        """Mark claimed volumes dirty; then which volumes to clean now and which to hold."""
        self.guard.mark_dirty(ours, volumes)
        dirty = self.dirty.records() if self.dirty is not None else {}
        cleanable = self.guard.verified_dirty(dirty, volumes)
        settings = self.ctx.settings
        return recycle(ours, states, frozenset(volumes), frozenset(dirty), self.running(),
                       now=time.time(), retry_at={k: t for k, (t, _) in self._retry.items()},
                       me=self.ctx.instance, stale_after=settings.clean_stale_after,
                       cleanable=cleanable)

    def cancel(self, paths: Iterable[str], why: str) -> None:
        for path in paths:
            self._cancel(path, why)

    def start(self, decisions: Iterable[CleanDecision], found: Discovery,
              snapshot: HostSnapshot) -> int:
        """Start the decided cleans; returns the number of failed API writes."""
        if self.cleaner is None:
            return 0
        return sum(self._start(d, found, snapshot, self.cleaner) for d in decisions)

    def _start(self, decision: CleanDecision, found: Discovery, snapshot: HostSnapshot,
               cleaner: Cleaner) -> int:
        job = self._job(decision, found, snapshot)
        if job is None:
            return 0
        # The volume's lock, from this decision until its outcome has been acted on.
        lock = cleaner.lock(decision.key)
        if lock is None:
            log.info("not cleaning %s now: another agent on this node holds its lock",
                     decision.key)
            self._look_again(self.ctx.settings.clean_stale_after / 3)
            return 0
        begun, errors = self._begin(decision, job)
        if not begun:
            lock.release()
            return errors
        if cleaner.submit(job, lock):
            log.info("cleaning %s (%s) for %s", decision.key,
                     "block cleaner" if job.raw_device else "filesystem",
                     f"released PV {decision.pv_name}" if decision.pv_name
                     else "a volume whose PV was deleted before it was cleaned")
        return 0

    def _job(self, decision: CleanDecision, found: Discovery,
             snapshot: HostSnapshot) -> CleanJob | None:
        """Everything the clean needs, fixed at the decision; None when the volume is gone."""
        volume = next((v for v in found.volumes if v.host_path == decision.key), None)
        cls = self.ctx.config.storage_class(volume.class_name) if volume else None
        if volume is None or cls is None:
            return None
        real = os.path.realpath(volume.mount_path).rstrip("/") + "/"
        nested = tuple(m.mount_point for m in snapshot.mounts
                       if m.mount_point.startswith(real))
        if decision.pv_name is not None:
            recorded = pvs.identity(self.ctx.pvs.cache.get(decision.pv_name) or {})
        else:
            record = self.dirty.get(decision.key) if self.dirty is not None else None
            recorded = dict(record.identity or {}) if record is not None else {}
        return CleanJob(
            key=decision.key, pv_name=decision.pv_name, pv_uid=decision.pv_uid,
            class_name=cls.name, mode=volume.volume_mode, raw_device=volume.is_block_device,
            container_path=volume.mount_path,
            mount_dir=snapshot.real_dirs.get(cls.name, cls.mount_dir), device=volume.device,
            command=cls.block_cleaner_command, identity=recorded, nested_mounts=nested,
            capacity_bytes=volume.capacity_bytes, fs_command=cls.fs_cleaner_command)

    def _begin(self, decision: CleanDecision, job: CleanJob) -> tuple[bool, int]:
        """Record a PV's clean durably before it starts (a restart finds it and resumes);
        hand a block volume to a cleaning Job when configured. (False, _): do not clean here."""
        if decision.pv_name is not None:
            record = CleaningRecord.running(self.ctx.instance, decision.attempts, time.time())
            try:  # durable first: a restart finds the record and cleans again
                self.ctx.pvs.patch_annotations(decision.pv_name, decision.resource_version,
                                               {CLEANING_ANNOTATION: record.to_annotation()})
            except ApiError as exc:
                log.info("not cleaning PV %s now: %s", decision.pv_name, exc)
                if exc.conflict:
                    self.ctx.pvs.refresh(decision.pv_name)
                    return False, 0
                return False, 1
            self.heartbeats.track(decision.pv_name)
        if self.ctx.config.use_job_for_cleaning and job.raw_device and decision.pv_name \
                and self.cleaner is not None:
            started = self.jobs.start(job, self.cleaner.check_identity)
            if started.failure is not None:
                self._failed(started.failure)
            return not started.handled, 0
        return True, 0

    # -- outcomes ---------------------------------------------------------------------------------

    def collect(self) -> None:
        """Act on finished cleanings: delete the PV and forget the dirt, or record the failure."""
        for result in self.jobs.collect():
            self._job_finished(result)
        if self.cleaner is None:
            return
        for outcome in self.cleaner.collect():
            try:  # the lock is held until the outcome is acted on: the PV deleted, the
                # dirty record cleared, or the failure recorded
                if self.on_clean is not None and not (outcome.busy or outcome.disk_changed):
                    self.on_clean(outcome)
                if outcome.ok:
                    self._succeeded(outcome)
                elif outcome.disk_changed:
                    self.ctx.waker.event.set()  # the pass reports it; nothing was touched
                else:
                    self._failed(outcome)
            finally:
                self.cleaner.release(outcome.job.key)

    def _job_finished(self, result: JobResult) -> None:
        outcome, job = result.outcome, result.outcome.job
        if result.first and self.on_clean is not None:
            self.on_clean(outcome)
        if outcome.ok:
            self._succeeded(outcome)
            return
        namespace = self.ctx.settings.namespace
        self.ctx.events.report([Notice(
            "PersistentVolume", job.pv_name or "", Reason.VOLUME_FAILED_DELETE,
            f"cleaning Job {namespace}/{job_name(job.pv_name or '')} failed ({outcome.detail}); "
            "the PV stays Released. Delete the Job to try again",
            Once(Scope.JOB_FAILED, job.pv_uid),
            uid=job.pv_uid)])

    def _succeeded(self, outcome: CleanOutcome) -> None:
        job = outcome.job
        if job.pv_name is not None:
            self.heartbeats.forget(job.pv_name)
            kube = self.ctx.kube
            try:
                current = kube.get_pv(job.pv_name)
                if current is not None and pvs.uid(current) == job.pv_uid:
                    if pvs.phase(current) != "Released":
                        log.warning("cleaned %s but PV %s is %s now, no longer Released: not "
                                    "deleting it", job.key, job.pv_name,
                                    pvs.phase(current) or None)
                        return
                    kube.delete_pv(job.pv_name, job.pv_uid, pvs.resource_version(current))
            except ApiError as exc:
                if not exc.not_found:
                    log.warning("cleaned %s but deleting PV %s failed: %s; cleaning again later",
                                job.key, job.pv_name, exc)
                    return
            self.ctx.pvs.deleted(job.pv_name, job.pv_uid)
        if self.dirty is not None:
            self.dirty.clear(job.key)
        self._retry.pop(job.key, None)
        what = f"PV {job.pv_name} deleted" if job.pv_name else "no PV existed"
        self.ctx.events.post(Notice(
            "Node", self.ctx.node.name, Reason.VOLUME_CLEANED,
            f"{job.key} cleaned in {outcome.seconds:.1f}s ({outcome.detail}); {what}; it is "
            "offered again"))
        self.ctx.waker.event.set()  # offer it again now

    def _failed(self, outcome: CleanOutcome) -> None:
        job = outcome.job
        stale_after, base = self.ctx.settings.clean_stale_after, self.ctx.settings.clean_retry_base
        if outcome.busy:  # another instance cleans it now: look again later, quietly
            self._look_again(stale_after / 3)
            return
        if job.pv_name is None:
            _, attempts = self._retry.get(job.key, (0.0, 0))
            delay = retry_delay(attempts + 1, base)
            self._retry[job.key] = (time.time() + delay, attempts + 1)
            self._look_again(delay)
            self.ctx.events.report([Notice(
                "Node", self.ctx.node.name, Reason.VOLUME_FAILED_DELETE,
                f"cleaning {job.key} failed: {outcome.detail}",
                Once(Scope.CLEAN_FAILED, f"{job.key}/{attempts + 1}"))])
            return
        self.heartbeats.forget(job.pv_name)
        pv = self.ctx.pvs.cache.get(job.pv_name)
        if pv is None:
            return
        attempts = CleaningRecord.of(pv).attempts + 1
        delay = retry_delay(attempts, base)
        record = CleaningRecord.failed(attempts, time.time() + delay, outcome.detail)
        try:
            self.ctx.pvs.update_annotations(
                job.pv_name, lambda _: {CLEANING_ANNOTATION: record.to_annotation()})
        except ApiError as exc:
            log.warning("recording the failed clean of PV %s: %s", job.pv_name, exc)
        self._look_again(delay)
        self.ctx.events.report([Notice(
            "PersistentVolume", job.pv_name, Reason.VOLUME_FAILED_DELETE,
            f"cleaning {job.key} failed (attempt {attempts}, next in {delay:.0f}s): "
            f"{outcome.detail}", Once(Scope.CLEAN_FAILED, f"{job.pv_name}/{attempts}"),
            uid=pvs.uid(pv))])

    # -- plumbing ---------------------------------------------------------------------------------

    def _running_here(self) -> frozenset[str]:
        return self.cleaner.running() if self.cleaner is not None else frozenset()

    def _cancel(self, path: str, why: str) -> None:
        if self.cleaner is not None:
            self.cleaner.cancel(path, why)

    def _look_again(self, seconds: float) -> None:
        self.ctx.waker.wake_at(time.monotonic() + seconds)
