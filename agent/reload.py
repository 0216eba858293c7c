"""Live config: notice an edited config file, apply a valid edit, reject a bad one.

The kubelet swaps a `..data` symlink when a mounted ConfigMap changes, so edits are noticed by
content (`fingerprint`), not mtimes. A bad edit is rejected with a `ConfigRejected` Event and the
last good config stays in force; a good one gets a Normal `ConfigReloaded` Event. A reload
never rewrites existing PVs.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Callable

from agent.config import Config, ConfigError
from agent.configfiles import fingerprint, load_config
from agent.events import EventRecorder
from agent.notices import Notice, Reason

log = logging.getLogger(__name__)


class ConfigReloader:
    """Watches one config path for edits; `check` is called by the loop thread."""

    def __init__(self, path: str | None, events: EventRecorder,
                 node_name: Callable[[], str]) -> None:
        self.path = path
        self.events = events
        self.node_name = node_name
        self._fingerprint = fingerprint(path) if path else ""
        self._lock = threading.Lock()
        self._results: Counter[str] = Counter()  # "applied" | "rejected"

    def counts(self) -> dict[str, int]:
        """Reloads by result, for metrics (read from another thread)."""
        with self._lock:
            return dict(self._results)

    def check(self, current: Config) -> Config | None:
        """The edited config when the file changed and the edit is valid; None otherwise."""
        if not self.path:
            return None
        now = fingerprint(self.path)
        if now == self._fingerprint:
            return None
        self._fingerprint = now
        try:
            config = load_config(self.path)
        except (ConfigError, OSError, ValueError, RecursionError) as exc:
            self._count("rejected")
            self.events.post(Notice(
                "Node", self.node_name(), Reason.CONFIG_REJECTED,
                f"the edited config {self.path} is invalid, the previous one stays in force: "
                f"{exc}"))
            return None
        before = {c.name for c in current.classes}
        after = {c.name for c in config.classes}
        self._count("applied")
        what = (f"classes {sorted(after)} (added {sorted(after - before) or 'none'}, removed "
                f"{sorted(before - after) or 'none'})")
        log.info("config reloaded: %s", what)
        self.events.post(Notice("Node", self.node_name(), Reason.CONFIG_RELOADED,
                                f"the edited config {self.path} is in force: {what}"))
        for warning in config.warnings:
            log.warning("config %s: %s", self.path, warning)
        return config

    def _count(self, result: str) -> None:
        with self._lock:
            self._results[result] += 1
