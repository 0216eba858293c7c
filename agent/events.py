"""Posting Events, off the loop thread, and reporting each lasting condition once.

An API that stalls must not stall the loop: Events are queued and posted by a thread of their
own, in order, and they wait while a pass writes PVs (`held`): an Event never delays a PV.
A lasting condition (`Notice.once`) is posted once while it lasts; when the API
refuses it, it is forgotten again, so the next pass that reports it tries again. A pass that
reports the complete current set of a `Scope` also clears the conditions of that scope that are
gone, so each is reported anew when it comes back. Nothing but Events depends on this: metrics
count what happened, never what was posted.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Collection, Iterable, Iterator

from agent.kube import ApiError, Kube
from agent.notices import Notice, Once, Scope
from agent.volumes import NodeInfo

log = logging.getLogger(__name__)

# Events waiting to be posted; beyond it new ones are dropped (and logged). Room for a
# Provisioned Event per volume of a few thousand mounted at once, plus their conditions.
QUEUE_LIMIT = 5000
HOLD_MAX = 10.0  # seconds an Event waits for the pass's writes (`held`) before going anyway


class EventRecorder:
    """A queue of Events and the thread that posts them; `report` never waits for the API."""

    def __init__(self, kube: Kube, node: Callable[[], NodeInfo],
                 limit: int = QUEUE_LIMIT) -> None:
        self.kube = kube
        self.node = node  # the Node this agent serves, for the source and Node Events' UID
        self._queue: queue.Queue[Notice | None] = queue.Queue(limit)
        self._lock = threading.Condition()
        self._reported: set[Once] = set()
        self._pending = 0
        self._closed = False
        self._dropping = False
        self._holds = 0  # passes writing PVs now: Events wait for them (`held`)
        self._thread: threading.Thread | None = None
        self.posted = 0
        self.failed = 0

    # -- what the loop calls ---------------------------------------------------------------------

    def report(self, notices: Iterable[Notice], scopes: Collection[Scope] = ()) -> None:
        """Post each notice not reported yet. With `scopes`, `notices` is the complete current
        set of those scopes: conditions of them not in it have cleared and are forgotten."""
        notices = list(notices)
        with self._lock:
            if scopes:
                current = {n.once for n in notices}
                cleared = {k for k in self._reported if k.scope in scopes and k not in current}
                for key in sorted(cleared, key=str):
                    log.info("condition cleared: %s", key)
                self._reported -= cleared
            fresh = [n for n in notices if n.once is None or n.once not in self._reported]
            self._reported.update(n.once for n in fresh if n.once is not None)
        for notice in fresh:
            self._enqueue(notice)

    def post(self, notice: Notice) -> None:
        """Post it whatever was reported before (a one-off: a PV created, a volume cleaned)."""
        self._enqueue(notice)

    def forget(self, key: Once) -> None:
        """The condition is over: if it comes back, it is reported again."""
        with self._lock:
            self._reported.discard(key)

    def reported(self, key: Once) -> bool:
        with self._lock:
            return key in self._reported

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """While a pass writes its PVs, Events wait (at most HOLD_MAX seconds each): they are
        worth less than the PVs and must not take the API from them."""
        with self._lock:
            self._holds += 1
        try:
            yield
        finally:
            with self._lock:
                self._holds -= 1
                self._lock.notify_all()

    # -- lifecycle ------------------------------------------------------------------------------

    def drain(self, timeout: float) -> bool:
        """Wait until every queued Event was posted or refused; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._pending:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
        return True

    def close(self, timeout: float = 0.0) -> None:
        """Post what is queued for up to `timeout` seconds, then stop quietly: an Event that
        did not make it is lost, as it would be in a crash."""
        self.drain(timeout)
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)

    # -- the posting thread ---------------------------------------------------------------------

    def _enqueue(self, notice: Notice) -> None:
        if notice.event_type == "Warning":
            log.warning("%s %s: %s", notice.reason.value, notice.name, notice.message)
        with self._lock:
            if self._closed:
                return
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="events", daemon=True)
                self._thread.start()
            try:
                self._queue.put_nowait(notice)
            except queue.Full:
                if notice.once is not None:
                    self._reported.discard(notice.once)  # reported again by a later pass
                if not self._dropping:
                    log.warning("%d Events wait to be posted; dropping new ones until the API "
                                "takes them", self._queue.qsize())
                self._dropping = True
                return
            self._pending += 1

    def _run(self) -> None:
        while (notice := self._queue.get()) is not None:
            with self._lock:
                self._lock.wait_for(lambda: not self._holds or self._closed, HOLD_MAX)
            ok = self._send(notice)
            with self._lock:
                self._pending -= 1
                if ok:
                    self.posted += 1
                    self._dropping = False
                else:
                    self.failed += 1
                    if notice.once is not None:
                        self._reported.discard(notice.once)  # tried again on the next pass
                self._lock.notify_all()

    def _send(self, notice: Notice) -> bool:
        node = self.node()
        ref = {"kind": notice.kind, "name": notice.name, "apiVersion": "v1"}
        uid = notice.uid or (node.uid if notice.kind == "Node" else "")
        if uid:
            ref["uid"] = uid
        if notice.namespace:
            ref["namespace"] = notice.namespace
        try:
            self.kube.emit_event(ref, notice.event_type, notice.reason.value, notice.message,
                                 node.name)
        except ApiError as exc:
            with self._lock:
                quiet = self._closed
            if not quiet:
                log.warning("event %s on %s %s: %s", notice.reason.value, notice.kind,
                            notice.name, exc)
            return False
        except Exception:  # a bug must not end the thread: every later Event would be lost
            log.exception("posting event %s on %s %s", notice.reason.value, notice.kind,
                          notice.name)
            return False
        return True
