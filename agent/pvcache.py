"""This node's PVs: a cache kept current by list-then-watch, and the agent's own PV writes.

The cache holds only the PVs carrying this agent's labels for this node, so its size follows the
node, not the cluster. `PVWatcher` feeds it on its own thread the way the upstream's informer
and kopf's watcher do: list, then watch from the list's resourceVersion; a watch that ends is
resumed from the last version seen, one that expired (410 Gone) or failed lists again, with
backoff, so the cache never silently goes stale. `PVStore` makes this agent's writes and records
each response in the cache at once (a watch event may overtake the response, or lag behind it).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping

from agent import pv as pvs
from agent.backoff import Backoff
from agent.kube import PV, ApiError, Kube

log = logging.getLogger(__name__)

GONE_KEPT = 1000  # deleted UIDs remembered (a response overtaken by its DELETED event)
RELIST_PAUSE_MAX = 5.0  # seconds: a watch expiring again and again never makes a tight loop


class PVCache:
    """This node's PVs by name, thread-safe; `version` is the resourceVersion to watch from
    ("" when a fresh list is needed)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pvs: dict[str, PV] = {}
        self._deleted: set[str] = set()  # UIDs this agent deleted, until their DELETED event
        # UIDs the watch saw deleted, the latest GONE_KEPT: a write's response or a re-read
        # that arrives after the DELETED event must not bring the object back (it would stay
        # in the cache, and hide that its disk has no PV, until the next relist)
        self._gone: dict[str, None] = {}
        self.version = ""

    def replace(self, found: Mapping[str, PV], version: str) -> None:
        with self._lock:
            self._pvs = {n: pv for n, pv in found.items() if pvs.uid(pv) not in self._deleted}
            self.version = version

    def apply(self, event_type: str, pv: PV) -> None:
        with self._lock:
            name, uid = pvs.name(pv), pvs.uid(pv)
            if event_type == "DELETED":
                cached = self._pvs.get(name)
                if cached is not None and pvs.uid(cached) in (uid, ""):
                    del self._pvs[name]  # not a newer object of the same name
                self._deleted.discard(uid)
                if uid:
                    self._gone[uid] = None
                    if len(self._gone) > GONE_KEPT:
                        del self._gone[next(iter(self._gone))]
            elif (event_type in ("ADDED", "MODIFIED") and uid not in self._deleted
                  and uid not in self._gone):
                self._pvs[name] = pv
            self.version = pvs.resource_version(pv) or self.version

    def expire(self) -> None:
        """The watch cannot resume: the next round lists afresh."""
        with self._lock:
            self.version = ""

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
            cached = self._pvs.get(pvs.name(pv))
        if cached is not None and pvs.newer(cached, pv):
            return
        self.apply("ADDED", pv)

    def get(self, name: str) -> PV | None:
        with self._lock:
            return self._pvs.get(name)

    def snapshot(self) -> dict[str, PV]:
        with self._lock:
            return dict(self._pvs)


class PVStore:
    """The agent's writes to its PVs, each recorded in the cache at once."""

    def __init__(self, kube: Kube, cache: PVCache, wake: Callable[[], None]) -> None:
        self.kube = kube
        self.cache = cache
        self._wake = wake
        self._annotations = threading.Lock()  # one read-modify-write of annotations at a time

    def patch_labels(self, name: str, uid: str, labels: Mapping[str, str]) -> None:
        self.cache.put(self.kube.patch_pv_labels(name, uid, labels))

    def patch_annotations(self, name: str, resource_version: str,
                          annotations: Mapping[str, str | None]) -> None:
        """Patch exactly the version decided on; ApiError(409) when it changed since."""
        with self._annotations:
            self.cache.put(self.kube.patch_pv_annotations(name, resource_version, annotations))

    def update_annotations(self, name: str,
                           change: Callable[[PV], Mapping[str, str | None] | None]) -> bool:
        """Read the cached PV and patch what `change` makes of it, as one step against the
        other writers of this agent (the loop, the heartbeats). False when there is no such
        PV or `change` returns None; ApiError when the API refuses."""
        with self._annotations:
            pv = self.cache.get(name)
            wanted = change(pv) if pv is not None else None
            if pv is None or wanted is None:
                return False
            self.cache.put(self.kube.patch_pv_annotations(name, pvs.resource_version(pv),
                                                          wanted))
            return True

    def deleted(self, name: str, uid: str) -> None:
        self.cache.forget(name, uid)

    def refresh(self, name: str) -> None:
        """A precondition failed: the cached copy is stale (a watch event can overtake the
        response of our own write). Read the PV again and decide once more on the next pass."""
        try:
            fresh = self.kube.get_pv(name)
        except ApiError as exc:
            log.warning("re-reading PV %s: %s", name, exc)
            return
        if fresh is None:
            self.cache.forget(name, pvs.uid(self.cache.get(name) or {}))
        else:
            self.cache.put(fresh)
        self._wake()


class PVWatcher:
    """Keeps a PVCache current on its own thread until `stop` is set."""

    def __init__(self, kube: Kube, cache: PVCache, selector: str, stop: threading.Event,
                 on_change: Callable[[str], None]) -> None:
        self.kube = kube
        self.cache = cache
        self.selector = selector
        self.stop = stop
        # worth a pass: "" after a fresh list (it may show anything), "pv-deleted" or
        # "pv-modified" for a watch event that changed a PV's existence, phase or claim
        self.on_change = on_change
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="pv-watch", daemon=True)
        self._thread.start()

    def run(self) -> None:
        backoff = Backoff()
        while not self.stop.is_set():
            try:
                self.round()
                backoff.reset()
            except ApiError as exc:
                self.cache.expire()  # the relist also proves the API is back
                if self.stop.is_set():
                    return  # the agent is stopping: its requests fail, quietly
                if exc.gone:
                    log.info("PV watch expired; listing again")
                    self.stop.wait(min(backoff.next_delay(), RELIST_PAUSE_MAX))
                    continue
                delay = backoff.next_delay()
                log.warning("PV watch failed, retrying in %.0fs with a fresh list: %s", delay, exc)
                self.stop.wait(delay)
            except Exception:  # the cache must not silently go stale: log, relist, go on
                log.exception("PV watch crashed; listing again")
                self.cache.expire()
                self.stop.wait(backoff.next_delay())

    def round(self) -> None:
        """List when needed, then follow one watch request until it ends."""
        if not self.cache.version:
            found, version = self.kube.list_pv_snapshot(self.selector)
            self.cache.replace(found, version)
            self.on_change("")
        for event_type, pv in self.kube.watch_pvs(self.selector, self.cache.version):
            if self.stop.is_set():
                return
            if event_type == "BOOKMARK":
                self.cache.version = pvs.resource_version(pv) or self.cache.version
                continue
            before = self.cache.get(pvs.name(pv))
            self.cache.apply(event_type, pv)
            if _phase_changed(event_type, before, pv):
                # a PV deleted by hand is recreated now, a Released one cleaned now
                self.on_change("pv-" + event_type.lower())


def _phase_changed(event_type: str, before: PV | None, after: PV) -> bool:
    """Whether a watch event is worth a pass: a PV gone, or its phase or claim changed."""
    if event_type == "DELETED":
        return True
    if before is None:
        return False  # ADDED: usually this agent's own create
    return (pvs.phase(before), pvs.claim_ref(before)) != (pvs.phase(after), pvs.claim_ref(after))
