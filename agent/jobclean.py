"""`useJobForCleaning`: block volumes cleaned by the upstream's cleanup Job, and its outcome.

The Job's pod cannot tell a swapped or busy disk, so everything the in-process cleaner checks
under the volume's lock is checked here before the Job is created. The Job's name is the lock
between agents: a second agent cannot create a second Job for the same PV. Jobs are not
watched; running ones are looked at every `job_poll` seconds.
"""

from __future__ import annotations

import contextlib
import logging
import posixpath
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

from agent.cleaner import CleanError, CleanJob, CleanOutcome, DiskChangedError, verify_block_device
from agent.context import Context
from agent.jobs import JobState, cleanup_job, job_failure, job_name, job_state
from agent.kube import ApiError
from agent.notices import Once, Scope
from agent.safety import DiskGuard

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobStart:
    handled: bool  # False: clean in-process instead
    failure: CleanOutcome | None = None  # a check failed before the Job was created


@dataclass(frozen=True)
class JobResult:
    outcome: CleanOutcome
    first: bool  # the first time this outcome is seen (a failed Job stays until deleted)


class JobCleaning:
    """The cleaning Jobs this agent started and still follows, by volume."""

    def __init__(self, ctx: Context, guard: DiskGuard) -> None:
        self.ctx = ctx
        self.guard = guard
        self._jobs: dict[str, tuple[CleanJob, float]] = {}  # key -> (job, monotonic start)
        self._failed: set[str] = set()  # keys whose Job failure was already seen

    def running(self) -> frozenset[str]:
        """Volumes with a Job, running or failed (a failed one waits for an admin)."""
        return frozenset(self._jobs)

    def start(self, job: CleanJob, check_identity: Callable[[CleanJob], None]) -> JobStart:
        """Clean in a Kubernetes Job; not handled when it must be cleaned in-process."""
        settings = self.ctx.settings
        cls = self.ctx.config.storage_class(job.class_name)
        if not settings.job_image or cls is None or job.pv_name is None:
            log.warning("useJobForCleaning needs the cleaner image (--job-image or "
                        "JOB_CONTAINER_IMAGE); cleaning %s in-process", job.key)
            return JobStart(handled=False)
        device = posixpath.join(cls.mount_dir, posixpath.basename(job.key))
        try:  # the Job's pod cannot tell a swapped or busy disk: check here, before it starts
            self.guard.confirm_clean(job)
            verify_block_device(job.container_path, job.device)
            check_identity(job)
        except DiskChangedError as exc:
            log.warning("not cleaning PV %s: %s", job.pv_name, exc)
            return JobStart(handled=True)
        except (CleanError, OSError) as exc:
            return JobStart(handled=True, failure=CleanOutcome(job, False, 0.0, str(exc)))
        manifest = cleanup_job(job.pv_name, job.pv_uid, self.ctx.node, cls, device,
                               settings.job_image, settings.namespace,
                               self.ctx.config.job_tolerations)
        try:
            self.ctx.kube.create_job(manifest)
            log.info("cleaning %s in Job %s/%s", job.key, settings.namespace,
                     job_name(job.pv_name))
        except ApiError as exc:
            if not exc.conflict:  # a Job of that name already runs: it is the lock
                log.warning("creating the cleaning Job for PV %s: %s", job.pv_name, exc)
                return JobStart(handled=True)  # retried on a later pass
        self._jobs[job.key] = (replace(job, via_job=True), time.monotonic())
        self.ctx.waker.wake_at(time.monotonic() + settings.job_poll)
        return JobStart(handled=True)

    def collect(self) -> list[JobResult]:
        """Finished cleaning Jobs: a succeeded one is deleted (then its PV may go); a failed
        one is reported on every call and left for an admin (deleting it starts a new clean)."""
        results = []
        namespace, kube = self.ctx.settings.namespace, self.ctx.kube
        for key, (job, started) in list(self._jobs.items()):
            assert job.pv_name is not None
            name = job_name(job.pv_name)
            try:
                found = kube.get_job(namespace, name)
            except ApiError as exc:
                log.warning("reading cleaning Job for PV %s: %s", job.pv_name, exc)
                continue
            if found is None:
                self._drop(key, job)  # deleted by an admin: decided again on this pass
                continue
            if (found["metadata"].get("labels") or {}).get("pvuuid") != job.pv_uid:
                # Left from an earlier PV of the same name: it says nothing about this one.
                log.warning("Job %s belongs to an earlier PV %s; deleting it", name, job.pv_name)
                with contextlib.suppress(ApiError):
                    kube.delete_job(namespace, name)
                self._drop(key, job)
                continue
            state = job_state(found)
            if state is JobState.RUNNING:
                continue
            ok = state is JobState.SUCCEEDED
            outcome = CleanOutcome(job, ok, time.monotonic() - started,
                                   "Job succeeded" if ok else job_failure(found))
            if ok:
                try:
                    kube.delete_job(namespace, name)
                except ApiError as exc:
                    log.warning("deleting the finished Job for PV %s: %s", job.pv_name, exc)
                    continue
                self._drop(key, job)
                results.append(JobResult(outcome, first=True))
            else:
                results.append(JobResult(outcome, first=key not in self._failed))
                self._failed.add(key)
        if self._jobs:  # Jobs are not watched: look at them again shortly
            self.ctx.waker.wake_at(time.monotonic() + self.ctx.settings.job_poll)
        return results

    def _drop(self, key: str, job: CleanJob) -> None:
        self._jobs.pop(key, None)
        if key in self._failed:  # a new Job, if it fails too, is reported anew
            self._failed.discard(key)
            self.ctx.events.forget(Once(Scope.JOB_FAILED, job.pv_uid))
