"""The checks between a decision to clean and the first byte removed.

A local-volume agent destroys data by design, so every destructive step asks one question
first: is the disk there now the one whose former tenant's data is to go? The answers come from
identities recorded while the disk was known (on the PV while it is Available or Bound; in the
host's dirty record when a claim binds) and from the device itself right before a wipe. Whatever
cannot be proven the same is held, reported, and left to an operator: never cleaned, never
offered.
"""

from __future__ import annotations

import logging
import posixpath
from collections.abc import Callable, Mapping

from agent import pv as pvs
from agent.cleaner import CleanError, CleanJob, DirtyRecord, DirtyStore
from agent.context import Context
from agent.discovery import Volume, VolumeState
from agent.identity import Match, compare, identifiable, relevant_keys
from agent.kube import PV, ApiError
from agent.notices import Notice, Once, Reason, Scope
from agent.volumes import identity_annotations, pv_name

log = logging.getLogger(__name__)

States = Mapping[str, tuple[VolumeState, Mapping[str, str]]]  # PV name -> what the host shows


def comparable(observed: Mapping[str, str], volume: Volume | None) -> dict[str, str]:
    """The observed identity keys that can tell a disk apart: a raw device's filesystem UUID
    is whatever its last tenant formatted, so only its hardware keys count."""
    raw = volume.is_block_device if volume is not None else False
    return {k: v for k, v in observed.items() if k in relevant_keys(raw)}


class DiskGuard:
    """Records disk identities, marks dirty volumes, and vets every clean against them."""

    def __init__(self, ctx: Context, dirty: DirtyStore | None,
                 cancel: Callable[[str, str], None]) -> None:
        self.ctx = ctx
        self.dirty = dirty
        self.cancel = cancel  # ends any queued or running clean of a path
        self.held: dict[str, str] = {}  # dirty paths neither cleaned nor offered -> why

    def record_identities(self, ours: Mapping[str, PV], states: States,
                          volumes: Mapping[str, Volume]) -> int:
        """Write the disk identity on PVs that lack one (adopted from the upstream, or made
        before identities were recorded), from the disk present now, while the PV is
        Available or Bound: a Released PV's disk may already be another one. Returns the
        number of failed writes."""
        errors = 0
        for name, pv in sorted(ours.items()):
            volume = volumes.get(pvs.local_path(pv) or "")
            state, observed = states.get(name, (VolumeState.UNKNOWN, {}))
            if (pvs.phase(pv) not in ("Available", "Bound") or pvs.deleting(pv)
                    or volume is None or state is not VolumeState.PRESENT):
                continue
            raw = volume.is_block_device
            recorded = pvs.identity(pv)
            if identifiable(recorded, raw) or not identifiable(volume.identity, raw) \
                    or compare(recorded, observed, raw).match is Match.DIFFERENT:
                continue
            try:
                self.ctx.pvs.patch_annotations(name, pvs.resource_version(pv),
                                               identity_annotations(volume.identity))
                log.info("recorded the identity of the disk of PV %s: %s", name,
                         dict(volume.identity))
            except ApiError as exc:
                if exc.conflict:
                    self.ctx.pvs.refresh(name)
                else:
                    errors += 1
                    log.warning("recording the disk identity of PV %s: %s", name, exc)
        return errors

    def mark_dirty(self, ours: Mapping[str, PV], volumes: Mapping[str, Volume]) -> None:
        """A claimed volume holds someone's data from now on: remember it on the host, with
        the identity of the disk that holds it."""
        if self.dirty is None:
            return
        dirty = self.dirty.paths()
        problems = []
        for name, pv in sorted(ours.items()):
            path = pvs.local_path(pv)
            if not path or path in dirty or not pvs.claim_ref(pv):
                continue
            volume = volumes.get(path)
            recorded = pvs.identity(pv)
            raw = volume.is_block_device if volume else False
            identity = recorded if identifiable(recorded, raw) or volume is None \
                else {**recorded, **volume.identity}
            try:
                self.dirty.mark(path, name, identity)
            except OSError as exc:  # other volumes go on; this one is reported until it works
                problems.append(Notice(
                    "Node", self.ctx.node.name, Reason.STATE_DIR_UNWRITABLE,
                    f"cannot record that {path} holds data of PV {name} in "
                    f"{self.dirty.dir}: {exc.strerror or exc}", Once(Scope.STATE_DIR, path)))
        self.ctx.events.report(problems, scopes={Scope.STATE_DIR})

    def verified_dirty(self, dirty: Mapping[str, DirtyRecord],
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
                self.cancel(path, "a different disk is there")
                message = (f"a different disk is at {path} ({verdict.describe()}) than the one "
                           f"that held the data of PV {record.pv}: it is neither cleaned nor "
                           f"offered; {manual}")
                reason = Reason.DISK_CHANGED
            else:
                why = ("was recorded without the disk's identity"
                       if record.identity is None else "names a disk that cannot be recognised")
                message = (f"{path} held the data of PV {record.pv} (since {record.since}) and "
                           f"its record {why}: it is neither cleaned nor offered "
                           f"automatically; {manual}")
                reason = Reason.VOLUME_UNVERIFIED
            notices.append(Notice("Node", self.ctx.node.name, reason, message,
                                  Once(Scope.DIRTY, f"{path}/{verdict.match}")))
            held[path] = "disk_changed" if verdict.match is Match.DIFFERENT else "unverified"
        self.held = held  # read by metrics from another thread: replaced whole
        self.ctx.events.report(notices, scopes={Scope.DIRTY})
        return frozenset(ok)

    def confirm_clean(self, job: CleanJob) -> None:
        """Called by a cleaning worker under the volume's lock, right before the first byte is
        removed: the decision still holds. For a PV, it is the same object (UID) and still
        Released; without a PV, none exists for the path and the volume is still dirty with
        the same disk recorded. Raises CleanError otherwise."""
        if job.pv_name is not None:
            try:
                current = self.ctx.kube.get_pv(job.pv_name)
            except ApiError as exc:
                raise CleanError(f"cannot re-read PV {job.pv_name}: {exc}") from None
            if current is None or pvs.uid(current) != job.pv_uid \
                    or pvs.phase(current) != "Released" or pvs.deleting(current) \
                    or pvs.local_path(current) != job.key:
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
        node = self.ctx.node
        names = {pv_name(posixpath.basename(path), node.name, class_name), recorded_pv}
        kube = self.ctx.kube
        try:
            for name in sorted(n for n in names if n):
                found = kube.get_pv(name)
                if found is not None and pvs.local_path(found) == path and \
                        node.hostname_label in pvs.affinity_hostnames(found):
                    log.warning("not cleaning %s: PV %s still exists for it (without this "
                                "agent's labels?)", path, name)
                    return True
            for pv, _ in kube.list_pvs(limit=500):
                if pvs.local_path(pv) == path and \
                        node.hostname_label in pvs.affinity_hostnames(pv):
                    log.warning("not cleaning %s: PV %s still exists for it", path,
                                pvs.name(pv))
                    return True
        except ApiError as exc:
            log.warning("not cleaning %s now: cannot check for its PV: %s", path, exc)
            return True
        return False
