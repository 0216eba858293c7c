"""The loop under faults, on a minimal stand-in for the API: what keeps a node working.

Only the few calls these paths make are stood in for; the proof on a real control plane is in
tests/e2e/test_faults.py and tests/e2e/test_recycling.py.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from agent.cleaner import DirtyStore
from agent.configfiles import load_config
from agent.host import HostReader
from agent.loop import Reconciler
from agent.settings import RunSettings
from agent.volumes import NodeInfo

CONFIG = """\
storageClassMap:
  local-storage:
    hostDir: {dir}
"""


class FakeKube:
    """Answers the StorageClass reads and records Events."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str]] = []

    def get_storage_class(self, name: str) -> dict[str, Any] | None:
        return {"metadata": {"name": name}, "reclaimPolicy": "Delete"}

    def emit_event(self, ref: dict[str, str], event_type: str, reason: str, message: str,
                   node: str) -> None:
        self.events.append((reason, message))

    def patch_pv_annotations(self, *args: Any) -> dict[str, Any]:
        raise AssertionError("no PV is written here")


def reconciler(tmp_path: Path, kube: FakeKube | None = None,
               dirty: DirtyStore | None = None) -> Reconciler:
    config_path = tmp_path / "config.yaml"
    config_path.write_text(CONFIG.format(dir=tmp_path / "disks"))
    loop = Reconciler(kube or FakeKube(), HostReader(), load_config(config_path),  # type: ignore[arg-type]
                      RunSettings("node-1", config_path=str(config_path)), dirty=dirty)
    loop.ctx.node = NodeInfo(name="node-1", uid="uid-1")
    return loop


def test_a_config_edit_is_picked_up_while_backing_off(tmp_path: Path) -> None:
    """A config that breaks every pass must be fixable by editing it: the backoff wait
    reloads it and ends, so the next pass runs with the repair at once."""
    loop = reconciler(tmp_path)
    waited = threading.Thread(target=loop.runner.backoff_wait, args=(60.0,))
    started = time.monotonic()
    waited.start()
    edit = tmp_path / "config.yaml.new"  # replaced whole, as the kubelet swaps a ConfigMap
    edit.write_text(CONFIG.format(dir=tmp_path / "disks") + "  fast:\n    hostDir: /mnt/fast\n")
    edit.rename(tmp_path / "config.yaml")
    waited.join(30)
    assert not waited.is_alive() and time.monotonic() - started < 30
    assert sorted(c.name for c in loop.config.classes) == ["fast", "local-storage"]


def test_liveness_fails_only_for_a_long_streak_not_caused_by_the_api(tmp_path: Path) -> None:
    loop = reconciler(tmp_path)
    loop.state.failed(api=True)
    loop.state.failing_since = time.monotonic() - 3600  # an hour of API outage
    assert not loop.wedged(600)  # restarting every agent would not bring the API back
    loop.state.failed(api=False)  # and now something else fails too
    assert loop.wedged(600)
    loop.state.failing_since = time.monotonic()
    assert not loop.wedged(600)  # a short streak is backoff's business


def test_an_unwritable_state_dir_is_reported_and_other_volumes_go_on(tmp_path: Path) -> None:
    """ENOSPC on the state dir: the volume it could not record is reported with an Event;
    the pass itself does not fail (every other disk still gets its PV)."""

    class FullStore(DirtyStore):
        def mark(self, path: str, pv_name: str, identity: Any) -> None:
            raise OSError(28, "No space left on device")

    kube = FakeKube()
    loop = reconciler(tmp_path, kube, FullStore(str(tmp_path / "state")))
    claimed = {"metadata": {"name": "local-pv-1", "annotations": {}},
               "spec": {"local": {"path": "/mnt/disks/a"}, "claimRef": {"name": "c"}},
               "status": {"phase": "Bound"}}
    loop.recycler.guard.mark_dirty({"local-pv-1": claimed}, {})
    assert loop.events.drain(10)
    assert [reason for reason, _ in kube.events] == ["StateDirUnwritable"]
    assert "No space left" in kube.events[0][1]


def test_a_dirty_record_names_the_disk_it_was_made_for(tmp_path: Path) -> None:
    store = DirtyStore(str(tmp_path / "state"))
    store.mark("/mnt/disks/a", "local-pv-1", {"fs-uuid": "u1", "loop-backing": "7:0:12"})
    record = DirtyStore(str(tmp_path / "state")).get("/mnt/disks/a")  # a restarted agent
    assert record is not None and record.pv == "local-pv-1"
    assert record.identity == {"fs-uuid": "u1", "loop-backing": "7:0:12"}
    store.clear("/mnt/disks/a")
    assert DirtyStore(str(tmp_path / "state")).paths() == frozenset()
