"""The upstream's metric names come out as the upstream writes them: Go's default buckets
spelled as Go spells them, no `_created` series, both modes' capacity, the process table."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from prometheus_client.exposition import generate_latest

from agent.cleaner import Cleaner, CleanJob
from agent.metrics import GO_DEFAULT_BUCKETS, PREFIX, AgentSample, Metrics, go_float

GO_LE = ["0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10", "+Inf"]


@pytest.mark.parametrize(("value", "text"), [
    (1.0, "1"), (10.0, "10"), (0.005, "0.005"), (2.5, "2.5"), (float("inf"), "+Inf"),
    (1e21, "1e+21"),
])
def test_floats_are_written_as_go_writes_them(value: float, text: str) -> None:
    assert go_float(value) == text


def scrape(metrics: Metrics) -> list[str]:
    return generate_latest(metrics.registry).decode().splitlines()


def test_upstream_histograms_have_go_default_buckets_spelled_like_go() -> None:
    metrics = Metrics()
    metrics.observe_request("create", "ok", 0.3)
    metrics.observe_pass({"Filesystem": 1}, 0.007, None)
    metrics.observe_clean("c", "Filesystem", True, 1.0, "500G", "/scripts/quick_reset.sh")
    lines = scrape(metrics)
    for name, series in (
        ("apiserver_requests_duration_seconds", 'method="create"'),
        ("persistentvolume_discovery_duration_seconds", 'mode="Filesystem"'),
        ("persistentvolume_delete_duration_seconds",
         'capacity="500G",cleanup_command="/scripts/quick_reset.sh"'),
    ):
        buckets = [line for line in lines if line.startswith(f"{PREFIX}_{name}_bucket{{")]
        assert [b.split('le="')[1].split('"')[0] for b in buckets] == GO_LE
        assert all(series in b for b in buckets)
    le_1 = next(x for x in lines if x.startswith(f"{PREFIX}_apiserver_requests_duration_seconds_"
                                                 'bucket{le="1"'))
    assert le_1.endswith(" 1.0")  # 0.3 s is under 1
    assert len(GO_DEFAULT_BUCKETS) == 11


def test_no_created_series_on_upstream_names() -> None:
    metrics = Metrics()
    metrics.watch_state(AgentSample)
    metrics.observe_request("get", "error", 0.1)
    metrics.observe_clean("c", "Block", False, 1.0, "500G", "/x")
    upstream = [line for line in scrape(metrics) if PREFIX in line]
    assert upstream and not [line for line in upstream if "_created" in line]


def test_capacity_for_both_modes_and_the_process_table() -> None:
    metrics = Metrics()
    metrics.watch_state(lambda: AgentSample(offered={("c", "Filesystem"): 7}, proctable=(2, 1, 0)))
    lines = scrape(metrics)
    assert f'{PREFIX}_persistentvolume_capacity_bytes{{mode="Block"}} 0.0' in lines
    assert f'{PREFIX}_persistentvolume_capacity_bytes{{mode="Filesystem"}} 7.0' in lines
    assert f"{PREFIX}_proctable_running 2.0" in lines
    assert f"{PREFIX}_proctable_succeeded 1.0" in lines
    assert f"{PREFIX}_proctable_failed 0.0" in lines


def test_the_cleaner_counts_its_table_as_the_upstream_does(tmp_path: Path) -> None:
    """Running until the clean ends; then succeeded or failed until the loop released it."""
    volume = tmp_path / "disks" / "vol"
    volume.mkdir(parents=True)
    gate, done = threading.Event(), threading.Event()
    cleaner = Cleaner(concurrency=2, on_done=done.set, mountinfo="/dev/null",
                      identify=lambda job: {"fs-uuid": "u"}, confirm=lambda job: gate.wait(30))

    def job(key: str, path: Path) -> CleanJob:
        return CleanJob(key=key, pv_name=None, pv_uid="", class_name="c", mode="Filesystem",
                        raw_device=False, container_path=str(path),
                        mount_dir=str(tmp_path / "disks"), device="0:0", command=("x",),
                        identity={"fs-uuid": "u"})

    assert cleaner.submit(job("/mnt/disks/vol", volume))  # fails: device 0:0 is not it
    assert cleaner.table() == (1, 0, 0)
    gate.set()
    assert done.wait(30)
    assert cleaner.table() == (0, 0, 1)
    cleaner.collect()
    assert cleaner.table() == (0, 0, 1)  # collected, not yet acted on
    cleaner.release("/mnt/disks/vol")
    assert cleaner.table() == (0, 0, 0)
    cleaner.shutdown()
