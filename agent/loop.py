"""The reconcile loop: observe the host and the API, plan, apply the difference.

Level-driven: every pass recomputes everything from the host and from a watch-fed cache of this
node's PVs only, so a missed wake-up costs latency, never correctness, and two passes over an
unchanged host write nothing. Wake-ups (watch events, the periodic resync) only shorten the
wait. API failures back off and never end the loop.

This module keeps the pass and the wiring; the jobs around them live in their own modules: when
passes run (`runloop`), the PV cache and its watch (`pvcache`), the PV writes (`apply`), recycling
(`recycler`, with `safety`, `jobclean` and `heartbeats`), Events (`events`), StorageClasses
(`classes`) and config reloads (`reload`).
See docs/architecture.md for the threads and the invariants.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agent import pv as pvs
from agent.apply import PVWriter
from agent.classes import StorageClasses
from agent.cleaner import Cleaner, CleanJob, CleanOutcome, DirtyStore
from agent.config import Config
from agent.context import Context
from agent.discovery import Discovery, HostSnapshot, HostView, VolumeState, discover
from agent.events import EventRecorder
from agent.host import HostReader, SnapshotInterrupted
from agent.kube import PV, ApiError, Kube
from agent.notices import Notice, Scope
from agent.plan import Plan, Recycling, exclusion_notices, offered_all, plan
from agent.pvcache import PVCache, PVStore, PVWatcher
from agent.recycler import Recycler
from agent.reload import ConfigReloader
from agent.runloop import PassResult, RunLoop
from agent.safety import comparable
from agent.settings import RunSettings
from agent.sources import Waker
from agent.volumes import NodeInfo
from agent.wakeup import PassSchedule

log = logging.getLogger(__name__)

# reported again after they clear
CONDITIONS = frozenset({Scope.MISSING, Scope.CHANGED, Scope.CAPACITY, Scope.CLASS_REMOVED})
EVENTS_DRAIN = 1.0  # seconds queued Events get to be posted when the loop stops
AVAILABLE_SETTLE = 2.0  # seconds a "new PV became Available" wake-up waits for company


@dataclass(frozen=True)
class LoopStatus:
    """What the state metrics show, taken from the loop at scrape time (any thread)."""

    node: NodeInfo
    pvs: Mapping[str, PV]  # this node's PVs
    last_pass: PassResult | None
    first_sync_done: bool
    held: Mapping[str, int]  # dirty volumes held for an operator, by why
    config_reloads: Mapping[str, int]
    wakeups: Mapping[str, int]
    source_failures: Mapping[str, int]
    sources_active: Mapping[str, bool]


@dataclass(frozen=True)
class Hooks:
    """Where the loop reports to (metrics)."""

    on_pass: Callable[[PassResult, float], None] | None = None  # each pass, with its seconds
    on_clean: Callable[[CleanOutcome], None] | None = None  # each clean attempt's outcome


class Reconciler:
    """Keeps exactly one PV per discovered volume of one node."""

    def __init__(  # noqa: PLR0913 - the wiring's six inputs; the parts get one Context each
            self, kube: Kube, reader: HostReader, config: Config, settings: RunSettings, *,
            dirty: DirtyStore | None = None, hooks: Hooks | None = None) -> None:
        self.reader = reader
        self.hooks = hooks = hooks or Hooks()
        self.stop = threading.Event()
        self.wake = threading.Event()
        self.waker = Waker(self.wake, PassSchedule(
            settings.debounce, settings.pass_burst, settings.pass_rate,
            settle={"inotify": settings.entry_settle, "pv-available": AVAILABLE_SETTLE}))
        self.cache = PVCache()
        self.events = EventRecorder(kube, lambda: self.ctx.node)
        self.ctx = Context(kube, PVStore(kube, self.cache, self.wake.set), self.events,
                           self.waker, settings, NodeInfo(name=settings.node_name), config,
                           f"{settings.node_name}/{uuid.uuid4().hex[:12]}", self.stop)
        self.classes = StorageClasses(self.ctx)
        self.writer = PVWriter(self.ctx)
        self.recycler = Recycler(self.ctx, dirty, hooks.on_clean)
        self.reloader = ConfigReloader(settings.config_path, self.events,
                                       lambda: self.ctx.node.name)
        self.runner = RunLoop(self.ctx, lambda: self.sync().errors, self.classes, self.reloader)
        self.state = self.runner.state
        self.watcher: PVWatcher | None = None
        self.taint_checked = False  # the startup taint is gone (or was never there)
        self._wrote = False  # the last pass wrote PVs: the next one holds Events throughout

    @property
    def settings(self) -> RunSettings:
        return self.ctx.settings

    @property
    def config(self) -> Config:
        return self.ctx.config

    @property
    def node(self) -> NodeInfo:
        return self.ctx.node

    @property
    def cleaner(self) -> Cleaner | None:
        return self.recycler.cleaner

    def attach_cleaner(self, cleaner: Cleaner) -> None:
        self.recycler.attach(cleaner)

    def confirm_clean(self, job: CleanJob) -> None:
        """The cleaner's last check under the volume's lock (see DiskGuard.confirm_clean)."""
        self.recycler.guard.confirm_clean(job)

    # -- lifecycle -----------------------------------------------------------------------------

    def shutdown(self) -> None:
        """Ask `run` to return; safe from a signal handler."""
        self.stop.set()
        self.wake.set()

    def close(self) -> None:
        """After `run`, or instead of waiting for it: nothing more is posted or logged."""
        self.events.close()

    def run(self) -> None:
        """Run until `stop` is set. Startup steps retry with backoff until they succeed."""
        try:
            if self.runner.retry(self._start):
                self.runner.run()
        finally:
            self.events.close(EVENTS_DRAIN)

    def wedged(self, bound: float) -> bool:
        return self.state.wedged(bound)

    def status(self) -> LoopStatus:
        node = self.node
        wakeups, failures, active = self.waker.counts()
        return LoopStatus(
            node, {n: pv for n, pv in self.cache.snapshot().items() if pvs.is_this_nodes(pv, node)},
            self.state.last_pass, self.state.first_sync_done,
            dict(Counter(self.recycler.guard.held.values())), self.reloader.counts(), wakeups,
            failures, active)

    def note_progress(self) -> None:
        """The loop made progress (an API request answered or failed in time)."""
        self.state.heartbeat = time.monotonic()

    def _start(self) -> None:
        self.ctx.node = node = self.ctx.kube.get_node(self.settings.node_name)
        log.info("serving node %s (uid %s, hostname %s)", node.name, node.uid,
                 node.hostname_label)
        self.classes.refresh()
        self.writer.adopt_upstream()
        selector = pvs.label_selector(node)
        found, version = self.ctx.kube.list_pv_snapshot(selector)
        self.cache.replace(found, version)
        self.watcher = PVWatcher(self.ctx.kube, self.cache, selector, self.stop, self._watched)
        self.watcher.start()

    def _watched(self, source: str) -> None:
        """The watch saw something worth a pass (in poll mode, only a fresh list is)."""
        if not source:
            self.wake.set()
        elif not self.settings.poll_period:
            self.waker.wake(source)

    # -- one pass ------------------------------------------------------------------------------

    def sync(self) -> PassResult:
        """One level-driven pass: host → desired PVs → plan against the cache → apply. Events
        wait during its writes and, right after a pass that wrote PVs (many disks arriving),
        during all of it: the API is kept for the PVs, yet passes that write nothing (the PV
        controller marking a thousand new PVs Available) never hold the Events back."""
        with self.events.held() if self._wrote else contextlib.nullcontext():
            result = self._sync()
        self._wrote = result.plan.writes > 0
        return result

    def _sync(self) -> PassResult:
        started = time.monotonic()
        woken_at = self.waker.take_first_wake()
        self.recycler.collect()
        try:
            cached, ours, (snapshot, found, states) = self._look(self.waker.wants_pass_now)
        except SnapshotInterrupted:
            # A mount or an entry changed while the host was read: nothing is decided yet, so
            # read it all over now rather than act on a stale look and make a second pass due
            # (once: a host that never stops changing still gets its passes).
            again = self.waker.take_first_wake(restart=True)
            woken_at = again if woken_at is None else min(woken_at, again or woken_at)
            log.debug("pass restarted: a wake-up arrived while the host was read")
            cached, ours, (snapshot, found, states) = self._look(None)
        volumes = {v.host_path: v for v in found.volumes}
        errors = self.recycler.guard.record_identities(ours, states, volumes)
        recycling = self.recycler.decide(ours, states, volumes)
        desired = self.classes.desired(found, recycling.hold)
        configured = (frozenset(c.name for c in self.config.classes)
                      if self.settings.withdraw_removed_classes else None)
        the_plan = plan(desired, cached, self.node, states, self.settings.withdraw_missing,
                        classes=configured)
        # never let queued or running work touch a disk that is not the PV's any more
        self.recycler.cancel((pvs.local_path(cached[n]) or "" for n in the_plan.changed_disk),
                             "a different disk is there")
        done = self.writer.apply(the_plan)
        errors += done.errors + self.recycler.start(recycling.clean, found, snapshot)
        if not errors:
            errors += self._clear_startup_taint(desired)
        result = PassResult(found, the_plan, done.created_by_mode, done.adopted, done.withdrawn,
                            recycling.cleaning, errors, woken_at, done.resized)
        self._report(the_plan, recycling, found)
        self.state.first_sync_done = True
        self.state.last_pass = result
        self.state.passes += 1
        if self.hooks.on_pass is not None:
            self.hooks.on_pass(result, time.monotonic() - started)
        return result

    def _clear_startup_taint(self, desired: Sequence[Mapping[str, Any]]) -> int:
        """`removeNodeNotReadyTaint`: once every volume this pass could offer has its PV (not
        before), remove the startup taint from this Node, so pods that need local volumes are
        scheduled here only when they are offered. Once per run; 1 when the API failed (the
        pass backs off and the next one tries again)."""
        config = self.config
        if self.taint_checked or not config.remove_node_not_ready_taint:
            return 0
        if not offered_all(desired, self.cache.snapshot(), self.node):
            return 0
        key = config.provisioner_not_ready_node_taint_key
        self.taint_checked = True
        if not key:
            log.warning("removeNodeNotReadyTaint is set without provisionerNotReadyNodeTaintKey: "
                        "no taint to remove")
            return 0
        try:
            removed = self.ctx.kube.remove_node_taint(self.node.name, key)
        except ApiError as exc:
            self.taint_checked = False
            log.warning("removing taint %s from node %s: %s", key, self.node.name, exc)
            return 1
        log.info("node %s: every volume has its PV; taint %s %s", self.node.name, key,
                 "removed" if removed else "was not there")
        return 0

    def _look(self, interrupted: Callable[[], bool] | None) -> tuple[
            dict[str, PV], dict[str, PV],
            tuple[HostSnapshot, Discovery, dict[str, tuple[VolumeState, Mapping[str, str]]]]]:
        """The PVs cached (all, and this node's) and what `_observe` sees of the host;
        SnapshotInterrupted when `interrupted` says so before it is all read (then nothing
        was decided yet)."""
        cached = self.cache.snapshot()
        ours = {n: pv for n, pv in cached.items() if pvs.is_this_nodes(pv, self.node)}
        observed = self._observe(ours, interrupted)
        if interrupted is not None and interrupted():
            raise SnapshotInterrupted
        return cached, ours, observed

    def _observe(self, ours: Mapping[str, PV], interrupted: Callable[[], bool] | None = None
                 ) -> tuple[HostSnapshot, Discovery,
                            dict[str, tuple[VolumeState, Mapping[str, str]]]]:
        """The host now, and for each of this node's PVs whether its disk is there; raises
        SnapshotInterrupted when `interrupted` says so before the host was read."""
        snapshot = self.reader.snapshot(self.config, interrupted)
        keep = frozenset(p for p in map(pvs.local_path, ours.values()) if p)
        found = discover(self.config, snapshot, keep, self.recycler.dirty_paths())
        view = HostView(self.config, snapshot, found)
        volumes = {v.host_path: v for v in found.volumes}
        states: dict[str, tuple[VolumeState, Mapping[str, str]]] = {}
        for name, pv in ours.items():
            path = pvs.local_path(pv) or ""
            state, observed = view.state(pvs.storage_class(pv), path)
            states[name] = (state, comparable(observed, volumes.get(path)))
        return snapshot, found, states

    def _report(self, the_plan: Plan, recycling: Recycling, found: Discovery) -> None:
        self.events.report(recycling.notices)
        for when in recycling.recheck:
            self.waker.wake_at(time.monotonic() + max(0.0, when - time.time()) + 0.1)
        def lasts(notice: Notice) -> bool:
            return notice.once is not None and notice.once.scope in CONDITIONS

        self.events.report(n for n in the_plan.notices if not lasts(n))
        self.events.report((n for n in the_plan.notices if lasts(n)), scopes=CONDITIONS)
        self.events.report(exclusion_notices(found.exclusions, self.node),
                           scopes={Scope.EXCLUDED})
