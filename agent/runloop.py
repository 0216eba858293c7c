"""When passes run: the loop around the pass, its backoff and its waits.

A pass that fails (the API's fault or a bug) is retried after an exponential, jittered backoff,
and never ends the loop. Between passes the loop sleeps until a wake-up makes a pass due, the
jittered resync comes round or the poll period (if any) ends; while it sleeps it beats the heart
that `/healthz` reads and applies config edits, so a config that breaks every pass is fixed by
editing it, without a restart. See docs/architecture.md for the threads.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from agent.backoff import Backoff, resync_period
from agent.classes import StorageClasses
from agent.context import Context
from agent.discovery import Discovery
from agent.kube import ApiError
from agent.plan import Plan
from agent.reload import ConfigReloader

log = logging.getLogger(__name__)

WAIT_TICK = 2.0  # seconds between heartbeats (and config checks) while waiting


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
    resized: int = 0


@dataclass
class LoopState:
    """What health endpoints and metrics read; written only by the loop."""

    heartbeat: float = field(default_factory=time.monotonic)
    first_sync_done: bool = False
    failing_since: float | None = None  # monotonic start of a streak of failed passes
    failing_for_api: bool = False  # the streak is the API's fault, not the agent's
    last_pass: PassResult | None = None
    passes: int = 0

    def failed(self, api: bool) -> None:
        """A pass failed; a long streak not caused by the API fails /healthz."""
        if self.failing_since is None:
            self.failing_since = time.monotonic()
            self.failing_for_api = api
        else:
            self.failing_for_api = self.failing_for_api and api

    def wedged(self, bound: float) -> bool:
        """Passes have failed for longer than `bound`, and not only because the API is away:
        a restart may help, so liveness says so. An unreachable API never counts: restarting
        every agent of a cluster during an API outage helps nobody."""
        since = self.failing_since
        return (since is not None and not self.failing_for_api
                and time.monotonic() - since > bound)


class RunLoop:
    """Runs `one_pass` (which returns its count of failed API writes) until `ctx.stop`."""

    def __init__(self, ctx: Context, one_pass: Callable[[], int], classes: StorageClasses,
                 reloader: ConfigReloader) -> None:
        self.ctx = ctx
        self.one_pass = one_pass
        self.classes = classes
        self.reloader = reloader
        self.state = LoopState()

    def run(self) -> None:
        backoff = Backoff()
        settings, stop = self.ctx.settings, self.ctx.stop
        next_resync = time.monotonic() + resync_period(settings.resync_period)
        while not stop.is_set():
            self.state.heartbeat = now = time.monotonic()
            if now >= next_resync:
                next_resync = now + resync_period(settings.resync_period)
                try:
                    self.classes.refresh()
                except ApiError as exc:
                    log.warning("resync: %s", exc)
            try:
                errors = self.one_pass()
            except (ApiError, OSError) as exc:
                delay = self._failed(backoff, api=isinstance(exc, ApiError))
                log.warning("pass failed, retrying in %.0fs: %s", delay, exc)
                self.backoff_wait(delay)
                continue
            except Exception:  # a bug must not stop every volume of the node: log, back off
                delay = self._failed(backoff, api=False)
                log.exception("pass crashed, retrying in %.0fs", delay)
                self.backoff_wait(delay)
                continue
            if errors:
                delay = self._failed(backoff, api=True)
                log.warning("%d API writes failed, retrying in %.0fs", errors, delay)
                self.backoff_wait(delay)
                continue
            backoff.reset()
            self.state.failing_since = None
            deadline = next_resync
            if settings.poll_period:
                deadline = min(deadline, time.monotonic() + settings.poll_period)
            self.wait_until(deadline)

    def retry(self, step: Callable[[], None]) -> bool:
        """Run a startup step until it succeeds (True) or the agent stops (False)."""
        backoff = Backoff()
        while not self.ctx.stop.is_set():
            try:
                step()
                return True
            except ApiError as exc:
                delay = backoff.next_delay()
                log.warning("startup: %s; retrying in %.0fs", exc, delay)
                self.ctx.stop.wait(delay)
        return False

    def _failed(self, backoff: Backoff, api: bool) -> float:
        self.state.failed(api)
        return backoff.next_delay()

    def reload_config(self) -> bool:
        """Apply an edited config (a bad edit is rejected, the last good one kept); True when
        a pass should run now. Existing PVs are never rewritten by a reload."""
        config = self.reloader.check(self.ctx.config)
        if config is None:
            return False
        self.ctx.config = config
        try:
            self.classes.refresh()
        except ApiError as exc:
            log.warning("reading StorageClasses after a reload: %s", exc)
        return True

    def backoff_wait(self, delay: float) -> None:
        """Wait out a backoff, still picking up config edits: a config that breaks every pass
        is fixed by editing it, without a restart."""
        stop = self.ctx.stop
        deadline = time.monotonic() + delay
        while not stop.is_set() and time.monotonic() < deadline:
            self.state.heartbeat = time.monotonic()
            try:
                if self.reload_config():
                    return
            except Exception:
                log.exception("reloading the config failed")
            stop.wait(min(1.0, max(0.0, deadline - time.monotonic())))

    def wait_until(self, deadline: float, tick: float = WAIT_TICK) -> None:
        """Sleep until a wake-up makes a pass due (`PassSchedule`: at once, unless passes ran
        back to back), stopped or the deadline, beating the heart every `tick`."""
        waker = self.ctx.waker
        deadline = min(deadline, waker.next_alarm())
        while not self.ctx.stop.is_set():
            self.state.heartbeat = time.monotonic()
            try:
                if self.reload_config():
                    break
            except Exception:  # housekeeping must never end the loop
                log.exception("housekeeping between passes failed")
            remaining = min(deadline, waker.due()) - time.monotonic()
            if remaining <= 0:
                break
            waker.event.wait(min(remaining, tick))
