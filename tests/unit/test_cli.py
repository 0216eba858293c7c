"""The command line without a cluster or root: config errors, `scan` output, `run` wired to the
in-memory API, and the state metrics read from the loop."""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent import cli
from agent.discovery import Discovery, Exclusion, Reason, Volume
from agent.volumes import NodeInfo, pv_manifest
from devkit.fake_kube import FakeKube
from tests.unit.rig import CLASS, Rig, eventually


@pytest.fixture
def disks(tmp_path: Path) -> tuple[Path, Path]:
    """A discovery dir holding what a non-root test can make: nothing mounted."""
    mount_dir = tmp_path / "disks"
    mount_dir.mkdir()
    (mount_dir / "not-mounted").mkdir()
    (mount_dir / "notes.txt").write_text("x")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"storageClassMap": {CLASS: {
        "hostDir": "/mnt/disks", "mountDir": str(mount_dir)}}}))
    return mount_dir, config


def test_a_bad_config_is_one_line_and_exit_code_2(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("storageClassMap: {a: {hostDir: /mnt/x, volumeMode: Blok}}\n")
    assert cli.main(["scan", "--config", str(bad)]) == cli.EXIT_CONFIG
    assert "volumeMode" in capsys.readouterr().err
    assert cli.main(["scan", "--config", str(tmp_path / "missing")]) == cli.EXIT_CONFIG


def test_scan_prints_pvs_and_explains_every_exclusion(
        disks: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    _, config = disks
    for output in ("yaml", "json", "table"):
        code = cli.main(["scan", "--config", str(config), "--node-name", "n1", "-o", output,
                         "--log-format", "json"])
        assert code == cli.EXIT_OK
        out, err = capsys.readouterr()
        assert "not_mount_point" in err and "unsupported_type" in err
        if output == "json":
            assert json.loads(out)["kind"] == "List"
        if output == "table":
            assert out.startswith("NAME") and "(excluded)" in out


def test_scan_needs_the_node_uid_for_owner_references(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"setPVOwnerRef": True, "storageClassMap": {
        CLASS: {"hostDir": "/mnt/disks", "mountDir": str(tmp_path)}}}))
    assert cli.main(["scan", "--config", str(config), "--node-name", "n1"]) == cli.EXIT_CONFIG
    assert "--node-uid" in capsys.readouterr().err


def test_scan_of_an_unreadable_mount_table_or_directory_exits_1(
        disks: tuple[Path, Path], tmp_path: Path) -> None:
    mount_dir, config = disks
    assert cli.main(["scan", "--config", str(config), "--node-name", "n1",
                     "--mountinfo", str(tmp_path / "nope")]) == cli.EXIT_UNREADABLE_DIR
    mount_dir.rename(tmp_path / "moved")
    assert cli.main(["scan", "--config", str(config), "--node-name", "n1"]) == \
        cli.EXIT_UNREADABLE_DIR


def test_the_table_lists_volumes_then_exclusions_one_line_each() -> None:
    volume = Volume(CLASS, "a", "/mnt/disks/a", "/mnt/disks/a", "Filesystem", False,
                    20 << 30, "7:0", {"fs-uuid": "u1"})
    found = Discovery((volume,), (Exclusion(CLASS, "b\n", "/mnt/disks/b\n",
                                            Reason.NOT_MOUNT_POINT, "a plain directory"),))
    from agent.config import parse_config  # noqa: PLC0415

    config = parse_config({"storageClassMap": {CLASS: {"hostDir": "/mnt/disks"}}})
    table = cli.render_table(found, [pv_manifest(volume, NodeInfo("n1"), config)])
    lines = table.splitlines()
    assert len(lines) == 3 and "20Gi" in lines[1] and "fs-uuid=u1" in lines[1]
    assert "/mnt/disks/b\\n" in lines[2]


def test_json_log_lines_are_objects() -> None:
    formatter = cli.JsonFormatter()
    try:
        raise ValueError("boom")
    except ValueError:
        record = logging.LogRecord("x", logging.WARNING, __file__, 1, "a %s", ("b",),
                                   sys.exc_info())
    entry = json.loads(formatter.format(record))
    assert entry["message"] == "a b" and entry["level"] == "WARNING"
    assert "ValueError" in entry["exception"]


def test_run_needs_a_node_name_and_a_usable_kubeconfig(
        disks: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    _, config = disks
    monkeypatch.delenv("MY_NODE_NAME", raising=False)
    assert cli.main(["run", "--config", str(config)]) == cli.EXIT_CONFIG
    assert "MY_NODE_NAME" in capsys.readouterr().err
    assert cli.main(["run", "--config", str(config), "--node-name", "n1", "--kubeconfig",
                     str(tmp_path / "missing")]) == cli.EXIT_CONFIG
    assert "API client" in capsys.readouterr().err


@pytest.fixture
def restore_signals() -> Iterator[None]:
    saved = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for signum, handler in saved.items():
        signal.signal(signum, handler)


def test_run_serves_the_node_until_sigterm(
        disks: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        restore_signals: None) -> None:
    _, config = disks
    fake = FakeKube(watch_timeout=0.05)
    fake.add_node("n1")
    fake.add_storage_class(CLASS)
    monkeypatch.setattr("agent.kube.Kube", lambda *a, **kw: fake)
    samples: list[Any] = []
    real_sample = cli.sample_state

    def sampled(reconciler: Any, kube: Any) -> Any:
        samples.append(real_sample(reconciler, kube))
        return samples[-1]

    monkeypatch.setattr(cli, "sample_state", sampled)

    def stop_when_served() -> None:
        eventually(lambda: fake.calls["list_pv_snapshot"] and fake.events, timeout=30,
                   what="the first pass")
        os.kill(os.getpid(), signal.SIGTERM)

    stopper = threading.Thread(target=stop_when_served)
    stopper.start()
    code = cli.main(["run", "--config", str(config), "--node-name", "n1",
                     "--listen-address", "", "--discovery-mode", "poll",
                     "--discovery-period", "0.1", "--state-dir", str(tmp_path / "state"),
                     "--resync-period", "60"])
    stopper.join(10)
    assert code == cli.EXIT_OK
    assert fake.reasons() == ["VolumeExcluded", "VolumeExcluded"]
    assert (tmp_path / "state" / "dirty").is_dir()


def test_run_with_event_sources_starts_them(
        disks: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        restore_signals: None, caplog: pytest.LogCaptureFixture) -> None:
    _, config = disks
    fake = FakeKube(watch_timeout=0.05)
    fake.add_node("n1")
    monkeypatch.setattr("agent.kube.Kube", lambda *a, **kw: fake)
    stopper = threading.Timer(0.5, lambda: os.kill(os.getpid(), signal.SIGINT))
    stopper.start()
    with caplog.at_level(logging.INFO):
        assert cli.main(["run", "--config", str(config), "--node-name", "n1",
                         "--listen-address", "", "--state-dir", str(tmp_path / "state")]) == 0
    assert "discovery: events from" in caplog.text
    assert "received SIGINT, stopping" in caplog.text


def test_an_unusable_state_dir_is_a_config_error(
        disks: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, config = disks
    monkeypatch.setattr("agent.kube.Kube", lambda *a, **kw: FakeKube())
    (tmp_path / "file").write_text("")
    assert cli.main(["run", "--config", str(config), "--node-name", "n1",
                     "--state-dir", str(tmp_path / "file")]) == cli.EXIT_CONFIG


def test_state_metrics_are_read_from_the_loop(tmp_path: Path) -> None:
    rig = Rig(tmp_path)
    try:
        rig.host.add(CLASS, "a")
        rig.host.add(CLASS, "b")
        rig.start()
        rig.pass_()
        rig.kube.bind(rig.name("a"))
        rig.host.unmount(CLASS, "a")
        rig.pass_()
        sample = cli.sample_state(rig.loop, rig.kube)  # type: ignore[arg-type]
        states = {v.name: v.state for v in sample.volumes}
        assert states == {rig.name("a"): "missing", rig.name("b"): "available"}
        assert sample.offered == {(CLASS, "Filesystem"): 20 << 30}
        assert sample.excluded == {(CLASS, "not_mount_point"): 1}
        assert sample.ready and sample.config_reloads == {} and sample.held == {}
    finally:
        rig.close()


@pytest.fixture
def one_volume(tmp_path: Path) -> tuple[Path, Path]:
    """A discovery dir with one entry that a mount table (a fixture file) lists as mounted."""
    entry = tmp_path / "disks" / "vol"
    entry.mkdir(parents=True)
    dev = os.stat(entry).st_dev
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text(f"36 1 {os.major(dev)}:{os.minor(dev)} / {entry} rw shared:1 - ext4 "
                         "/dev/fake rw\n")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({
        "nodeLabelsForPV": ["topology.kubernetes.io/zone"],
        "storageClassMap": {
            CLASS: {"hostDir": "/mnt/disks", "mountDir": str(entry.parent)},
            "other": {"hostDir": "/mnt/other", "mountDir": str(tmp_path / "disks"),
                      "namePattern": "vol"},
        }}))
    return config, mountinfo


def scan_yaml(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, list[Any], str]:
    code = cli.main(["scan", *args])
    out, err = capsys.readouterr()
    return code, [d for d in yaml.safe_load_all(out) if d], err


def test_scan_takes_node_labels_mount_options_and_policy_from_flags(
        one_volume: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    config, mountinfo = one_volume
    code, pvs, _ = scan_yaml(["--config", str(config), "--node-name", "n1", "--mountinfo",
                              str(mountinfo), "--node-label", "topology.kubernetes.io/zone=z1",
                              "--node-label", "kubernetes.io/hostname=host-1", "--node-uid", "u1",
                              "--mount-option", f"{CLASS}=noatime",
                              "--mount-option", f"{CLASS}=nodiratime",
                              "--reclaim-policy", "Retain"], capsys)
    assert code == cli.EXIT_OK
    (pv,) = [p for p in pvs if p["spec"]["storageClassName"] == CLASS]
    assert pv["metadata"]["labels"]["topology.kubernetes.io/zone"] == "z1"
    assert pv["metadata"]["labels"]["kubernetes.io/hostname"] == "host-1"
    assert pv["metadata"]["annotations"]["pv.kubernetes.io/provisioned-by"] == \
        "local-volume-provisioner-n1-u1"
    assert pv["spec"]["mountOptions"] == ["noatime", "nodiratime"]
    assert pv["spec"]["persistentVolumeReclaimPolicy"] == "Retain"
    (term,) = pv["spec"]["nodeAffinity"]["required"]["nodeSelectorTerms"]
    assert term["matchExpressions"][0]["values"] == ["host-1"]


@pytest.mark.parametrize(("flags", "words"), [
    (["--node-label", "zone"], "expected KEY=VALUE"),
    (["--mount-option", "noatime"], "expected CLASS=OPTION"),
    (["--mount-option", "nope=noatime"], "no class nope"),
])
def test_scan_rejects_malformed_flags(one_volume: tuple[Path, Path], flags: list[str],
                                      words: str, capsys: pytest.CaptureFixture[str]) -> None:
    config, mountinfo = one_volume
    code, _, err = scan_yaml(["--config", str(config), "--node-name", "n1", "--mountinfo",
                              str(mountinfo), *flags], capsys)
    assert code == cli.EXIT_CONFIG and words in err


def test_scan_with_a_kubeconfig_reads_the_node_and_storage_classes_as_run_does(
        one_volume: tuple[Path, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """The Node's UID and labels, the StorageClass's policy and mount options; a class whose
    StorageClass is missing is left out, as run leaves it out."""
    from tests.unit.fake_apiserver import serving  # noqa: PLC0415

    config, mountinfo = one_volume
    fake = FakeKube()
    fake.add_node("n1", uid="uid-1", labels={"kubernetes.io/hostname": "host-1",
                                             "topology.kubernetes.io/zone": "z1"})
    fake.add_storage_class(CLASS, reclaim_policy="Retain", mount_options=("noatime",))
    with serving(fake, tmp_path) as (kubeconfig, _):
        code, pvs, err = scan_yaml(["--config", str(config), "--node-name", "n1",
                                    "--mountinfo", str(mountinfo),
                                    "--kubeconfig", str(kubeconfig)], capsys)
        assert code == cli.EXIT_OK, err
        (pv,) = pvs
        assert "StorageClass other does not exist" in err
        assert pv["metadata"]["labels"]["topology.kubernetes.io/zone"] == "z1"
        assert pv["metadata"]["annotations"]["pv.kubernetes.io/provisioned-by"] == \
            "local-volume-provisioner-n1-uid-1"
        assert pv["spec"]["mountOptions"] == ["noatime"]
        assert pv["spec"]["persistentVolumeReclaimPolicy"] == "Retain"
        # A flag given overrides what the API says.
        code, pvs, _ = scan_yaml(["--config", str(config), "--node-name", "n1",
                                  "--mountinfo", str(mountinfo), "--kubeconfig",
                                  str(kubeconfig), "--mount-option", f"{CLASS}=sync"], capsys)
        assert pvs[0]["spec"]["mountOptions"] == ["sync"]
        code, _, err = scan_yaml(["--config", str(config), "--node-name", "missing-node",
                                  "--mountinfo", str(mountinfo),
                                  "--kubeconfig", str(kubeconfig)], capsys)
        assert code == cli.EXIT_UNREADABLE_DIR and "cannot read the Node" in err


def test_scan_reclaim_policy_for_all_classes_or_one(
        one_volume: tuple[Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    config, mountinfo = one_volume
    base = ["--config", str(config), "--node-name", "n1", "--mountinfo", str(mountinfo)]
    _, pvs, _ = scan_yaml([*base], capsys)
    assert pvs[0]["spec"]["persistentVolumeReclaimPolicy"] == "Delete"
    _, pvs, _ = scan_yaml([*base, "--reclaim-policy", "Retain", "--reclaim-policy",
                           f"{CLASS}=Recycle"], capsys)
    assert pvs[0]["spec"]["persistentVolumeReclaimPolicy"] == "Recycle"
    _, pvs, _ = scan_yaml([*base, "--reclaim-policy", "other=Recycle"], capsys)
    assert pvs[0]["spec"]["persistentVolumeReclaimPolicy"] == "Delete"
    for bad in ("Keep", "nope=Retain"):
        code, _, err = scan_yaml([*base, "--reclaim-policy", bad], capsys)
        assert code == cli.EXIT_CONFIG and "[CLASS=]POLICY" in err
