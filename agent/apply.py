"""The pass's PV writes: create, adopt, resize, withdraw, each exactly as the plan decided.

Every write names the object it was decided on (a create fails on a name that exists; a label
patch carries the UID; a capacity patch and a delete carry UID and resourceVersion
preconditions), so a PV that
changed since the pass looked is never overwritten or deleted: the write fails, the PV is read
again, and the next pass decides anew.

The writes of one kind are independent of each other (each names its own PV), so up to
`api_concurrency` of them are in flight at once: a thousand disks mounted together become PVs
in about the time of a thousand / N round trips instead of a thousand. The kinds still run one
after another, as before, and the pass's Events are queued only once its writes are done, so
they never take the API from the PVs.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

from agent import pv as pvs
from agent.context import Context
from agent.kube import ApiError
from agent.notices import Notice, Once, Reason, Scope
from agent.plan import Plan, Resize, Withdrawal, upstream_adoptions
from agent.volumes import MANAGED_BY_LABEL

log = logging.getLogger(__name__)


@dataclass
class Applied:
    created_by_mode: dict[str, int] = field(default_factory=dict)
    adopted: int = 0
    withdrawn: int = 0
    resized: int = 0
    errors: int = 0  # failed writes (a precondition that failed is not an error)

    def add(self, written: Written) -> None:
        if written.counted == "created":
            self.created_by_mode[written.mode] = self.created_by_mode.get(written.mode, 0) + 1
        elif written.counted in ("adopted", "withdrawn", "resized", "errors"):
            setattr(self, written.counted, getattr(self, written.counted) + 1)


@dataclass(frozen=True)
class Written:
    """What one write did, merged into `Applied` by the loop thread (workers share nothing)."""

    counted: str = ""  # "created", "adopted", "resized", "withdrawn", "errors"; "": none of them
    mode: str = ""  # a created PV's volumeMode
    notice: Notice | None = None  # posted once every write of the pass is done


NOTHING = Written()


def run_all(writes: Sequence[Callable[[], Written]], concurrency: int,
            stop: threading.Event) -> list[Written]:
    """Run the writes, up to `concurrency` at once on short-lived daemon threads (a write hung
    on the API never holds the agent's exit), and give their results in their order. Writes not
    started when `stop` is set are skipped. A bug in one write does not stop the others; the
    first is raised once all are done, as the sequential loop would have raised it."""
    results = [NOTHING] * len(writes)
    if concurrency <= 1 or len(writes) <= 1:
        for i, write in enumerate(writes):
            if stop.is_set():
                break
            results[i] = write()
        return results
    indices = iter(range(len(writes)))
    lock = threading.Lock()
    crashed: list[BaseException] = []

    def worker() -> None:
        while not stop.is_set():
            with lock:
                i = next(indices, None)
            if i is None:
                return
            try:
                results[i] = writes[i]()
            except Exception as exc:  # raised by the caller, after the other writes
                with lock:
                    crashed.append(exc)

    threads = [threading.Thread(target=worker, name=f"reconcile-write-{n}", daemon=True)
               for n in range(min(concurrency, len(writes)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if crashed:
        raise crashed[0]
    return results


class PVWriter:
    def __init__(self, ctx: Context) -> None:
        self.ctx = ctx

    def apply(self, the_plan: Plan) -> Applied:
        """Adopt, create, resize, withdraw: the writes of each kind concurrently, the kinds in
        that order; then the pass's Events, in the order of its writes."""
        done = Applied()
        notices: list[Notice] = []
        concurrency = self.ctx.settings.api_concurrency
        with self.ctx.events.held():  # Events queued earlier wait while the PVs are written
            for writes in (
                    [partial(self._adopt, a.name, a.uid, a.labels) for a in the_plan.adopt],
                    [partial(self._create, m) for m in the_plan.create],
                    [partial(self._resize, r) for r in the_plan.resize],
                    [partial(self._withdraw, w) for w in the_plan.withdraw]):
                for written in run_all(writes, concurrency, self.ctx.stop):
                    done.add(written)
                    if written.notice is not None:
                        notices.append(written.notice)
        for notice in notices:
            self.ctx.events.post(notice)
        return done

    def _adopt(self, name: str, uid: str, labels: Mapping[str, str]) -> Written:
        try:
            self.ctx.pvs.patch_labels(name, uid, labels)
        except ApiError as exc:
            log.warning("adopting PV %s: %s", name, exc)
            return Written("errors")
        log.info("adopted PV %s: labelled %s", name, dict(labels))
        return Written("adopted")

    def adopt_upstream(self) -> None:
        """Once at start: label this node's PVs made by the upstream provisioner as ours.

        Only PVs without the agent's label are listed, page by page and not kept: once a cluster
        is migrated this lists nothing, and memory stays flat in the cluster's size.
        """
        kube = self.ctx.kube
        listed = (pv for pv, _ in kube.list_pvs(f"!{MANAGED_BY_LABEL}", limit=250))
        for adoption in upstream_adoptions(listed, self.ctx.node):
            kube.patch_pv_labels(adoption.name, adoption.uid, adoption.labels)
            log.info("adopted upstream PV %s for %s", adoption.name, adoption.path)

    def _create(self, manifest: Mapping[str, Any]) -> Written:
        name, path = manifest["metadata"]["name"], manifest["spec"]["local"]["path"]
        try:
            created = self.ctx.kube.create_pv(manifest)
        except ApiError as exc:
            if exc.conflict:
                return self._resolve_conflict(name, path)
            log.warning("creating PV %s for %s: %s", name, path, exc)
            return Written("errors")
        self.ctx.pvs.cache.put(created)
        capacity = manifest["spec"]["capacity"]["storage"]
        log.info("created PV %s for %s (%s, %s)", name, path,
                 manifest["spec"]["storageClassName"], capacity)
        return Written("created", manifest["spec"]["volumeMode"], Notice(
            "PersistentVolume", name, Reason.PROVISIONED,
            f"created for {path} on node {self.ctx.node.name} ({capacity})",
            uid=pvs.uid(created)))

    def _resize(self, resize: Resize) -> Written:
        """Give an Available PV its disk's new size, only if nobody touched it since we looked
        (a claim bound meanwhile was matched against the old size: that PV is left)."""
        try:
            updated = self.ctx.kube.patch_pv_capacity(resize.name, resize.uid,
                                                      resize.resource_version, resize.capacity)
        except ApiError as exc:
            if exc.conflict or exc.not_found:
                log.info("not resizing PV %s: it changed meanwhile", resize.name)
                self.ctx.pvs.refresh(resize.name)
                return NOTHING
            log.warning("resizing PV %s: %s", resize.name, exc)
            return Written("errors")
        self.ctx.pvs.cache.put(updated)
        log.info("PV %s for %s: capacity %s -> %s", resize.name, resize.path, resize.old,
                 resize.capacity)
        return Written("resized", notice=Notice(
            "PersistentVolume", resize.name, Reason.CAPACITY_UPDATED,
            f"capacity {resize.old} -> {resize.capacity}: the disk at {resize.path} changed "
            "size", uid=resize.uid))

    def _withdraw(self, withdrawal: Withdrawal) -> Written:
        """Delete an unbound PV whose disk is gone (or whose class was removed), only if nobody
        touched it since we looked."""
        try:
            self.ctx.kube.delete_pv(withdrawal.name, withdrawal.uid, withdrawal.resource_version)
        except ApiError as exc:
            if exc.conflict or exc.not_found:  # bound or changed meanwhile: decide again
                log.info("not withdrawing PV %s: it changed meanwhile", withdrawal.name)
                self.ctx.pvs.refresh(withdrawal.name)
                return NOTHING
            log.warning("withdrawing PV %s: %s", withdrawal.name, exc)
            return Written("errors")
        self.ctx.pvs.deleted(withdrawal.name, withdrawal.uid)
        why = withdrawal.why or f"the disk behind {withdrawal.path} is gone"
        log.warning("withdrew PV %s (%s): %s and the PV was unbound", withdrawal.name,
                    withdrawal.path, why)
        return Written("withdrawn", notice=Notice(
            "Node", self.ctx.node.name, Reason.VOLUME_WITHDRAWN,
            f"PV {withdrawal.name} ({withdrawal.path}) deleted: {why} and nothing had "
            "claimed it"))

    def _resolve_conflict(self, name: str, path: str) -> Written:
        """The name exists already: adopt it when it is this node's PV for the same path."""
        try:
            existing = self.ctx.kube.get_pv(name)
        except ApiError as exc:
            log.warning("reading PV %s after its create conflicted: %s", name, exc)
            return Written("errors")
        if existing is None:
            return NOTHING  # deleted meanwhile; the next pass creates it
        if pvs.deleting(existing):  # e.g. this agent's own delete, held by pv-protection
            log.info("PV %s for %s is still being deleted; it is created again once gone",
                     name, path)
            return NOTHING  # its DELETED event wakes the pass that creates it
        if pvs.is_this_nodes(existing, self.ctx.node) and pvs.local_path(existing) == path:
            self.ctx.pvs.cache.put(existing)
            log.info("PV %s for %s already exists; adopting it", name, path)
            return NOTHING
        self.ctx.events.report([Notice(
            "PersistentVolume", name, Reason.NAME_CONFLICT,
            f"PV {name} exists but is not this node's PV for {path!r}; leaving it alone",
            Once(Scope.NAME_CONFLICT, f"{name}/{path}"))])
        return NOTHING
