"""A live agent's scrape against the upstream provisioner's metrics, side by side.

The reference below is the upstream's, written down from a live scrape of it: every metric
name it shares with the agent, its type, its label names, and the buckets of its histograms
(the Go client's defaults, spelled as Go writes them). The agent is driven until it has
produced every one of them: PVs of both modes created, a filesystem volume cleaned, a block
clean failing, a failed API request (a class whose StorageClass does not exist).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.volumes import pv_name
from devkit.agents import Agent, bind_claim, node_for_test, pvs_of, wait_for
from devkit.controlplane import ControlPlane
from devkit.disks import disks

P = "local_volume_provisioner_"
UPSTREAM: dict[str, tuple[str, tuple[str, ...]]] = {
    P + "persistentvolume_discovery_total": ("counter", ("mode",)),
    P + "persistentvolume_discovery_duration_seconds": ("histogram", ("mode",)),
    P + "persistentvolume_delete_total": ("counter", ("mode", "type")),
    P + "persistentvolume_delete_failed_total": ("counter", ("mode", "type")),
    P + "persistentvolume_delete_duration_seconds":
        ("histogram", ("mode", "type", "capacity", "cleanup_command")),
    P + "persistentvolume_capacity_bytes": ("gauge", ("mode",)),
    P + "apiserver_requests_total": ("counter", ("method",)),
    P + "apiserver_requests_failed_total": ("counter", ("method",)),
    P + "apiserver_requests_duration_seconds": ("histogram", ("method",)),
    P + "proctable_running": ("gauge", ()),
    P + "proctable_succeeded": ("gauge", ()),
    P + "proctable_failed": ("gauge", ()),
}
GO_BUCKETS = ["0.005", "0.01", "0.025", "0.05", "0.1", "0.25", "0.5", "1", "2.5", "5", "10",
              "+Inf"]
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse(text: str) -> tuple[dict[str, str], list[tuple[str, dict[str, str], str]]]:
    """The text format, kept exactly as written: types by name, and every sample."""
    types, samples = {}, []
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            types[name] = kind
        elif line and not line.startswith("#"):
            match = SAMPLE.match(line)
            assert match, line
            samples.append((match[1], dict(LABEL.findall(match[2] or "")), match[3]))
    return types, samples


def family_of(sample: str, types: dict[str, str]) -> str:
    if sample in types:
        return sample
    for suffix in ("_bucket", "_sum", "_count"):
        if sample.endswith(suffix) and types.get(sample[:-len(suffix)]) == "histogram":
            return sample[:-len(suffix)]
    return sample


def diff(scrape: str) -> list[str]:
    """Every way the scrape's upstream-named series differ from the upstream's."""
    types, samples = parse(scrape)
    problems = []
    for name, kind in types.items():
        if name.startswith(P) and name not in UPSTREAM:
            problems.append(f"{name}: not an upstream metric")
        elif name in UPSTREAM and kind != UPSTREAM[name][0]:
            problems.append(f"{name}: type {kind}, upstream {UPSTREAM[name][0]}")
    seen: set[str] = set()
    buckets: dict[tuple[str, tuple[tuple[str, str], ...]], list[str]] = {}
    for sample, labels, _ in samples:
        family = family_of(sample, types)
        if not sample.startswith(P):
            continue
        if family not in UPSTREAM:
            problems.append(f"{sample}: a series the upstream does not have")
            continue
        seen.add(family)
        kind, names = UPSTREAM[family]
        want = set(names) | ({"le"} if sample.endswith("_bucket") and kind == "histogram"
                             else set())
        if set(labels) != want:
            problems.append(f"{sample}{labels}: labels {sorted(labels)}, upstream "
                            f"{sorted(want)}")
        if sample.endswith("_bucket"):
            key = (family, tuple(sorted((k, v) for k, v in labels.items() if k != "le")))
            buckets.setdefault(key, []).append(labels.get("le", ""))
    problems += [f"{name}: missing from the scrape" for name in UPSTREAM if name not in seen]
    for (family, series), les in buckets.items():
        if les != GO_BUCKETS:
            problems.append(f"{family}{dict(series)}: buckets {les}, upstream {GO_BUCKETS}")
    for family, (kind, _) in UPSTREAM.items():
        if kind == "histogram" and family in seen and not any(k[0] == family for k in buckets):
            problems.append(f"{family}: no buckets")
    return problems


def test_the_reference_diff_catches_what_prometheus_client_writes_by_default() -> None:
    """The checker itself: `le="1.0"`, an extra bucket and `_created` are all reported."""
    base = (f"# TYPE {P}apiserver_requests_duration_seconds histogram\n"
            + "".join(f'{P}apiserver_requests_duration_seconds_bucket{{le="{le}",method="get"}} 1'
                      f"\n" for le in ["0.005", "0.01", "0.025", "0.05", "0.075", "0.1", "0.25",
                                       "0.5", "0.75", "1.0", "2.5", "5.0", "7.5", "10.0",
                                       "+Inf"])
            + f"# TYPE {P}apiserver_requests_created gauge\n"
            + f'{P}apiserver_requests_created{{method="get"}} 1.7e9\n')
    problems = diff(base)
    assert any("buckets" in p and "0.075" in p for p in problems)
    assert any("apiserver_requests_created" in p for p in problems)


@pytest.fixture
def node(cluster: ControlPlane, request: pytest.FixtureRequest) -> Iterator[str]:
    name = node_for_test(cluster, request.node.name)
    yield name
    for suffix in ("fs", "blk"):
        cluster.api("DELETE", f"/api/v1/namespaces/default/persistentvolumeclaims/"
                              f"{name[:30]}-{suffix}")
    for pv in pvs_of(cluster, name):
        cluster.api("DELETE", f"/api/v1/persistentvolumes/{pv['metadata']['name']}")


def test_a_live_scrape_matches_the_upstreams_names_types_labels_and_buckets(
        cluster: ControlPlane, agent_kubeconfig: Path, tmp_path: Path, node: str) -> None:
    fs_dir, block_dir, none_dir = tmp_path / "disks", tmp_path / "block", tmp_path / "none"
    for d in (fs_dir, block_dir, none_dir):
        d.mkdir()
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"storageClassMap": {
        "local-storage": {"hostDir": "/mnt/disks", "mountDir": str(fs_dir)},
        "local-block": {"hostDir": "/mnt/block", "mountDir": str(block_dir),
                        "volumeMode": "Block", "blockCleanerCommand": ["/bin/false"]},
        "parity-no-such-class": {"hostDir": "/mnt/none", "mountDir": str(none_dir)},
    }}))
    with disks(tmp_path) as d:
        d.mount(d.loop("fsvol", fs="ext4"), fs_dir / "vol")
        (block_dir / "raw").symlink_to(d.loop("blkvol", size_mib=16))
        agent = Agent(node, config, agent_kubeconfig, tmp_path, "--clean-retry-base", "1",
                      "--clean-stale-after", "3").start()
        try:
            agent.wait_ready()
            fs_pv = wait_for(lambda: _pv(cluster, pv_name("vol", node, "local-storage")), 30,
                             "the filesystem PV")
            blk_pv = wait_for(lambda: _pv(cluster, pv_name("raw", node, "local-block")), 30,
                              "the block PV")
            bind_claim(cluster, fs_pv, f"{node[:30]}-fs")
            bind_claim(cluster, blk_pv, f"{node[:30]}-blk")
            for suffix in ("fs", "blk"):
                status, _ = cluster.api("DELETE", "/api/v1/namespaces/default/"
                                        f"persistentvolumeclaims/{node[:30]}-{suffix}")
                assert status == 200
            wait_for(lambda: (pv := _pv(cluster, fs_pv["metadata"]["name"])) is not None
                     and pv["metadata"]["uid"] != fs_pv["metadata"]["uid"], 60,
                     "the filesystem volume cleaned and offered again", on_timeout=agent.log)

            def complete() -> str:
                _, text = agent.get("/metrics")
                return text if ("persistentvolume_delete_failed_total{" in text
                                and "apiserver_requests_failed_total{" in text) else ""

            scrape = wait_for(complete, 60, "a failed block clean and a failed API request",
                              on_timeout=agent.log)
        finally:
            agent.kill()
    assert diff(scrape) == []
    # The upstream's cleanup_command: the class's blockCleanerCommand[0], for filesystem
    # cleans too (the default one here).
    _, samples = parse(scrape)
    (fs_clean,) = {s[1]["cleanup_command"] for s in samples
                   if s[0] == P + "persistentvolume_delete_duration_seconds_count"}
    assert fs_clean == "/scripts/quick_reset.sh"
    capacity = {s[1]["mode"] for s in samples if s[0] == P + "persistentvolume_capacity_bytes"}
    assert capacity == {"Filesystem", "Block"}


def _pv(cluster: ControlPlane, name: str) -> dict[str, Any] | None:
    status, body = cluster.api("GET", f"/api/v1/persistentvolumes/{name}")
    return body if status == 200 else None
