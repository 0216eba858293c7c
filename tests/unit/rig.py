"""A Reconciler wired to the in-memory API, a fake host and a cleaner that touches nothing.

`Rig.pass_()` runs one pass the way the loop does, after feeding the cache everything the watch
would have delivered, so a test reads as a sequence of passes over a changing host and API.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from agent.cleaner import Cleaner, CleanError, CleanJob, CleanOutcome, DirtyStore
from agent.configfiles import load_config
from agent.loop import Hooks, Reconciler
from agent.pvcache import PVWatcher
from agent.runloop import PassResult
from agent.settings import RunSettings
from agent.volumes import pv_name
from devkit.fake_kube import FakeKube
from tests.unit.fake_host import FakeHost

NODE, HOSTNAME, CLASS = "node-1", "host-1", "local-storage"


class FakeCleaner(Cleaner):
    """The real Cleaner (locks, queue, confirm and identity checks under the lock), with a
    clean that removes nothing: it records the volume, or fails when told to."""

    def __init__(self, host: FakeHost, lock_dir: str | None = None) -> None:
        self.done = threading.Semaphore(0)
        super().__init__(1, 60.0, identify=lambda job: host.read_identity(job.device),
                         on_done=self.done.release, lock_dir=lock_dir)
        self.cleaned: list[str] = []
        self.failure = ""  # the next cleans fail with this

    def _verify_and_clean(self, job: CleanJob, label: str) -> str:
        self.check_identity(job)
        if self.failure:
            raise CleanError(self.failure)
        self.cleaned.append(job.key)
        return "emptied (fake)"

    def wait(self, count: int = 1, timeout: float = 10.0) -> None:
        """Until `count` more outcomes are ready to be collected."""
        for _ in range(count):
            assert self.done.acquire(timeout=timeout), "no clean finished in time"


class Rig:
    def __init__(self, tmp_path: Path, classes: dict[str, dict[str, Any]] | None = None,
                 cleaner: bool = True, kube: FakeKube | None = None, **settings: Any) -> None:
        self.tmp = tmp_path
        self.kube = kube or FakeKube(watch_timeout=0.0)
        self.kube.add_node(NODE, labels={"kubernetes.io/hostname": HOSTNAME})
        self.classes = classes or {CLASS: {"hostDir": "/mnt/disks"}}
        for name in self.classes:
            self.kube.add_storage_class(name)
        self.config_path = tmp_path / "config.yaml"
        self.write_config(self.classes)
        self.host = FakeHost()
        self.passes: list[PassResult] = []
        self.outcomes: list[CleanOutcome] = []
        self.dirty = DirtyStore(str(tmp_path / "state"))
        self.loop = Reconciler(
            self.kube, self.host, load_config(self.config_path),  # type: ignore[arg-type]
            RunSettings(NODE, config_path=str(self.config_path), **settings), dirty=self.dirty,
            hooks=Hooks(on_pass=lambda r, _: self.passes.append(r),
                        on_clean=self.outcomes.append))
        self.cleaner: FakeCleaner | None = None
        if cleaner:
            self.cleaner = FakeCleaner(self.host, str(tmp_path / "state" / "locks"))
            self.cleaner.confirm = self.loop.confirm_clean
            self.loop.attach_cleaner(self.cleaner)

    def write_config(self, classes: dict[str, dict[str, Any]], **top: Any) -> None:
        edit = self.config_path.with_suffix(".new")  # replaced whole, as the kubelet does
        edit.write_text(yaml.safe_dump({"storageClassMap": classes, **top}))
        edit.rename(self.config_path)

    def start(self) -> Rig:
        """The loop's startup, with the watch run by `pump` instead of a thread."""
        start = PVWatcher.start
        PVWatcher.start = lambda self: None  # type: ignore[method-assign]
        try:
            self.loop._start()
        finally:
            PVWatcher.start = start  # type: ignore[method-assign]
        return self

    def pump(self) -> None:
        """Deliver to the cache every watch event there is (or relist, like the watcher)."""
        assert self.loop.watcher is not None
        self.loop.watcher.round()

    def pass_(self) -> PassResult:
        self.pump()
        result = self.loop.sync()
        assert self.loop.events.drain(10)
        return result

    def name(self, entry: str, cls: str = CLASS) -> str:
        return pv_name(entry, NODE, cls)

    def pv(self, entry: str, cls: str = CLASS) -> dict[str, Any] | None:
        return self.kube.pvs.get(self.name(entry, cls))

    def events(self, reason: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.kube.events if reason is None or e["reason"] == reason]

    def reasons(self) -> list[str]:
        return self.kube.reasons()

    def close(self) -> None:
        self.loop.shutdown()
        self.loop.close()
        if self.cleaner is not None:
            self.cleaner.shutdown()
        self.kube.close()


def eventually(check: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    import time  # noqa: PLC0415

    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what or check}"
        time.sleep(0.01)
