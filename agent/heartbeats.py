"""Cleaning heartbeats: proof, on the PV, that the agent cleaning it is alive.

A twin agent (two pods of the DaemonSet on one node during a rollout) leaves a clean alone while
its record's heartbeat is fresh, and resumes it once the heartbeat is older than
`clean_stale_after`. Heartbeats are PV patches, so they run on a thread of their own: an API
that stalls delays a heartbeat, never the loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping

from agent import pv as pvs
from agent.kube import PV, ApiError
from agent.pv import CLEANING_ANNOTATION, CleaningRecord
from agent.pvcache import PVStore

log = logging.getLogger(__name__)


class Heartbeats:
    """Renews the cleaning record of the PVs cleaned in this process, every third of
    `stale_after`, while their volume is being cleaned."""

    def __init__(self, store: PVStore, running: Callable[[], frozenset[str]],
                 stale_after: float, stop: threading.Event) -> None:
        self.store = store
        self.running = running  # host paths cleaned in this process now
        self.every = stale_after / 3
        self.stop = stop
        self._lock = threading.Lock()
        self._last: dict[str, float] = {}  # PV name -> monotonic time of its last renewal
        self._thread: threading.Thread | None = None

    def track(self, name: str) -> None:
        """The PV's record was just written: renew it from now on."""
        with self._lock:
            self._last[name] = time.monotonic()
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="clean-heartbeat",
                                                daemon=True)
                self._thread.start()

    def forget(self, name: str) -> None:
        with self._lock:
            self._last.pop(name, None)

    def tracked(self) -> frozenset[str]:
        with self._lock:
            return frozenset(self._last)

    def renew_due(self) -> None:
        """One round: renew the records that are due; forget PVs no longer cleaned here."""
        running = self.running()
        due = time.monotonic() - self.every
        with self._lock:
            last = dict(self._last)
        for name, when in sorted(last.items()):
            pv = self.store.cache.get(name)
            if pv is None or pvs.local_path(pv) not in running:
                self.forget(name)
                continue
            if when > due:
                continue
            try:
                if self.store.update_annotations(name, self._renewal(name)):
                    with self._lock:
                        if name in self._last:
                            self._last[name] = time.monotonic()
            except ApiError as exc:
                if not self.stop.is_set():
                    log.warning("renewing the cleaning record of PV %s: %s", name, exc)

    def _renewal(self, name: str) -> Callable[[PV], Mapping[str, str | None] | None]:
        def renew(pv: PV) -> Mapping[str, str | None] | None:
            with self._lock:
                if name not in self._last:  # the outcome was recorded meanwhile
                    return None
            record = CleaningRecord.of(pv).renewed(time.time())
            return {CLEANING_ANNOTATION: record.to_annotation()}
        return renew

    def _run(self) -> None:
        tick = max(0.05, min(2.0, self.every / 2))
        while not self.stop.wait(tick):
            try:
                self.renew_due()
            except Exception:  # a bug must not end the heartbeats of every later clean
                log.exception("renewing cleaning records failed")
