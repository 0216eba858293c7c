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
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping

from agent import pv as pvs
from agent.backoff import watch_timeout
from agent.kube import PV, ApiError, Kube
from agent.watching import follow

log = logging.getLogger(__name__)

# Deleted UIDs are remembered only as long as something about them can still arrive: a write's
# response (30 s request timeout) or a watch event read before the deletion but applied after
# it, or a list answered meanwhile. Ten times the request timeout, and at most this many (a
# node's PVs, many times over): a UID per deleted PV for ever would grow without bound.
GONE_SECONDS = 300.0
GONE_KEPT = 1_000


class PVCache:
    """This node's PVs by name, thread-safe; `version` is the resourceVersion to watch from
    ("" when a fresh list is needed)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._lock = threading.Lock()
        self._pvs: dict[str, PV] = {}
        # UIDs deleted (by this agent, or seen DELETED) -> when: a UID never comes back, so a
        # late event or write response about one must not bring it back. Oldest first;
        # forgotten after GONE_SECONDS, or sooner beyond GONE_KEPT of them.
        self._deleted: OrderedDict[str, float] = OrderedDict()
        self._clock = clock
        self.version = ""

    def replace(self, found: Mapping[str, PV], version: str) -> None:
        with self._lock:
            self._gone("")  # forget what is old enough, even when nothing is deleted any more
            self._pvs = {n: pv for n, pv in found.items() if pvs.uid(pv) not in self._deleted}
            self.version = version

    def apply(self, event_type: str, pv: PV) -> None:
        with self._lock:
            self._apply(event_type, pv)

    def _apply(self, event_type: str, pv: PV) -> None:
        name, uid = pvs.name(pv), pvs.uid(pv)
        if event_type == "DELETED":
            if pvs.uid(self._pvs.get(name) or {}) in ("", uid):
                self._pvs.pop(name, None)
            self._gone(uid)
        elif event_type in ("ADDED", "MODIFIED") and uid not in self._deleted:
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
            self._gone(uid)

    def _gone(self, uid: str) -> None:
        now = self._clock()
        if uid:
            self._deleted[uid] = now
            self._deleted.move_to_end(uid)  # seen again: remembered from now
        while self._deleted and (len(self._deleted) > GONE_KEPT
                                 or next(iter(self._deleted.values())) <= now - GONE_SECONDS):
            self._deleted.popitem(last=False)

    def put(self, pv: PV) -> None:
        """The response of this agent's own write. The watch may already have delivered a
        newer version of the object; an older response must not replace it. One step under the
        lock: the watch thread and the pass's writers put PVs at the same time."""
        with self._lock:
            cached = self._pvs.get(pvs.name(pv))
            if cached is None or not pvs.newer(cached, pv):
                self._apply("ADDED", pv)

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
        # worth a pass: "" after a fresh list (it may show anything), "pv-deleted",
        # "pv-modified" or "pv-available" for a watch event that changed a PV's existence,
        # phase or claim (see _wake_source)
        self.on_change = on_change
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self.run, name="pv-watch", daemon=True)
        self._thread.start()

    def run(self) -> None:
        follow("PV", self.round, self.cache.expire, self.stop)

    def round(self) -> None:
        """List when needed, then follow one watch request until it ends."""
        if not self.cache.version:
            found, version = self.kube.list_pv_snapshot(self.selector)
            self.cache.replace(found, version)
            self.on_change("")
        for event_type, pv in self.kube.watch_pvs(self.selector, self.cache.version,
                                                  timeout_seconds=watch_timeout()):
            if self.stop.is_set():
                return
            if event_type == "BOOKMARK":
                self.cache.version = pvs.resource_version(pv) or self.cache.version
                continue
            before = self.cache.get(pvs.name(pv))
            self.cache.apply(event_type, pv)
            source = _wake_source(event_type, before, pv)
            if source is not None:
                # a PV deleted by hand is recreated now, a Released one cleaned now
                self.on_change(source)


def _wake_source(event_type: str, before: PV | None, after: PV) -> str | None:
    """Whether a watch event is worth a pass, and as which wake-up source: a PV gone
    ("pv-deleted"), its phase or claim changed ("pv-modified"), or a new unclaimed PV made
    Available by the PV controller ("pv-available": worth a pass only for the rare change its
    disk saw meanwhile, so those wake-ups settle: a thousand new PVs are not a thousand
    passes)."""
    if event_type == "DELETED":
        return "pv-deleted"
    if before is None:
        return None  # ADDED: usually this agent's own create
    was, now = (pvs.phase(before), pvs.claim_ref(before)), (pvs.phase(after), pvs.claim_ref(after))
    if was == now:
        return None
    if was[0] in ("", "Pending") and now[0] == "Available" and was[1] is None is now[1]:
        return "pv-available"
    return "pv-modified"
