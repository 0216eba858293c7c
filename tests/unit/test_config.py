"""Config parsing: upstream defaults, YAML 1.1 booleans, and one clear error per mistake."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from agent.config import (
    DEFAULT_BLOCK_CLEANER,
    MAX_CONFIG_BYTES,
    MAX_WARNINGS,
    ConfigError,
    fingerprint,
    load_config,
    parse_config,
)

MINIMAL = {"storageClassMap": {"local-storage": {"hostDir": "/mnt/disks"}}}


def test_defaults_follow_upstream() -> None:
    config = parse_config(MINIMAL)
    (cls,) = config.classes
    assert cls.name == "local-storage"
    assert cls.host_dir == cls.mount_dir == "/mnt/disks"
    assert cls.volume_mode == "Filesystem"
    assert cls.access_mode == "ReadWriteOnce"
    assert cls.name_patterns == ("*",)
    assert cls.block_cleaner_command == DEFAULT_BLOCK_CLEANER == ("/scripts/quick_reset.sh",)
    assert cls.fs_type is None and cls.selector == ()
    assert not config.set_pv_owner_ref and not config.use_node_name_only
    assert config.min_resync_period == 300.0
    assert config.warnings == ()


def test_all_keys_parsed() -> None:
    config = parse_config({
        "storageClassMap": {
            "fast": {
                "hostDir": "/mnt/fast/", "mountDir": "/host/mnt/fast",
                "volumeMode": "Block", "accessMode": "ReadWriteOncePod", "fsType": "xfs",
                "namePattern": "nvme*, ssd*", "blockCleanerCommand": ["/scripts/shred.sh", "2"],
                "selector": [{"matchExpressions": [
                    {"key": "zone", "operator": "In", "values": ["a"]}]}],
            },
        },
        "nodeLabelsForPV": ["topology.kubernetes.io/zone"],
        "labelsForPV": {"team": "storage", "tier": 1},
        "setPVOwnerRef": "yes", "useNodeNameOnly": "on", "minResyncPeriod": "1m30s",
        "useJobForCleaning": True, "jobTolerations": [{"operator": "Exists"}],
    })
    cls = config.classes[0]
    assert (cls.host_dir, cls.mount_dir) == ("/mnt/fast", "/host/mnt/fast")
    assert cls.name_patterns == ("nvme*", "ssd*")
    assert cls.matches("nvme0n1") and cls.matches("ssd-a") and not cls.matches("sda")
    assert cls.block_cleaner_command == ("/scripts/shred.sh", "2")
    assert config.labels_for_pv == (("team", "storage"), ("tier", "1"))
    assert config.set_pv_owner_ref and config.use_node_name_only and config.use_job_for_cleaning
    assert config.min_resync_period == 90.0


@pytest.mark.parametrize(("text", "expected"), [
    ("true", True), ("yes", True), ("Yes", True), ("on", True), ('"true"', True),
    ('"yes"', True), ("false", False), ("no", False), ("off", False), ('"no"', False),
])
def test_yaml11_booleans(tmp_path: Path, text: str, expected: bool) -> None:
    (tmp_path / "storageClassMap").write_text("local-storage:\n  hostDir: /mnt/disks\n")
    (tmp_path / "setPVOwnerRef").write_text(text + "\n")
    assert load_config(tmp_path).set_pv_owner_ref is expected


def test_configmap_directory_skips_kubelet_bookkeeping(tmp_path: Path) -> None:
    data = tmp_path / "..2026_11_26_10_00_00.123"
    data.mkdir()
    (data / "storageClassMap").write_text("sc1:\n  hostDir: /mnt/disks\n")
    (data / "useNodeNameOnly").write_text("true")
    (tmp_path / "..data").symlink_to(data.name)
    for key in ("storageClassMap", "useNodeNameOnly"):
        (tmp_path / key).symlink_to(f"..data/{key}")
    config = load_config(tmp_path)
    assert [c.name for c in config.classes] == ["sc1"]
    assert config.use_node_name_only
    assert config.warnings == ()


def test_single_file_and_unknown_keys_warn(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(
        "storageClassMap:\n  sc1:\n    hostDir: /mnt/disks\n    hostdir: /typo\n"
        "useAlphaApi: true\n"
    )
    config = load_config(path)
    assert config.warnings == (
        "useAlphaApi: unknown key, ignored",
        "storageClassMap.sc1.hostdir: unknown key, ignored",
    )


@pytest.mark.parametrize(("raw", "key_path", "words"), [
    ({"storageClassMap": {"sc1": {"hostDir": "/d", "volumeMode": "Blok"}}},
     "storageClassMap.sc1.volumeMode", "unknown volume mode"),
    ({"storageClassMap": {"sc1": {"hostDir": "/d", "blockCleanerCommand": []}}},
     "storageClassMap.sc1.blockCleanerCommand", "explicitly empty"),
    ({"storageClassMap": {"sc1": {"hostDir": "/d", "blockCleanerCommand": "wipe"}}},
     "storageClassMap.sc1.blockCleanerCommand", "list of strings"),
    ({"storageClassMap": {"sc1": {"mountDir": "/d"}}},
     "storageClassMap.sc1.hostDir", "required"),
    ({"storageClassMap": {"sc1": {"hostDir": "relative/dir"}}},
     "storageClassMap.sc1.hostDir", "absolute"),
    ({"storageClassMap": {"Bad_Name": {"hostDir": "/d"}}},
     "storageClassMap.Bad_Name", "DNS subdomain"),
    ({"storageClassMap": {"sc1": {"hostDir": "/d", "accessMode": "RWO"}}},
     "storageClassMap.sc1.accessMode", "unknown access mode"),
    ({"storageClassMap": {"sc1": {"hostDir": "/d", "namePattern": " , "}}},
     "storageClassMap.sc1.namePattern", "no glob"),
    ({"storageClassMap": {"sc1": {"hostDir": "/d", "selector": [
        {"matchExpressions": [{"key": "k", "operator": "Equals", "values": []}]}]}}},
     "storageClassMap.sc1.selector[0].matchExpressions[0].operator", "want one of"),
    ({"storageClassMap": {"sc1": "/mnt/disks"}}, "storageClassMap.sc1", "must be a mapping"),
    ({"storageClassMap": ["sc1"]}, "storageClassMap", "must be a mapping"),
    ({"setPVOwnerRef": "maybe"}, "setPVOwnerRef", "must be a boolean"),
    ({"minResyncPeriod": "five minutes"}, "minResyncPeriod", "duration"),
    ({"nodeLabelsForPV": "zone"}, "nodeLabelsForPV", "list of strings"),
    ({"nodeLabelsForPV": ["bad key!"]}, "nodeLabelsForPV[0]", "label key"),
    ({"labelsForPV": {"team": "a b"}}, "labelsForPV.team", "label value"),
    ({"jobTolerations": "all"}, "jobTolerations", "toleration"),
])
def test_each_error_names_key_path_and_value(
    raw: dict[str, object], key_path: str, words: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(raw)
    assert caught.value.key_path == key_path
    message = str(caught.value)
    assert message.startswith(f"{key_path}: ") and words in message
    assert "got " in message


def test_invalid_yaml_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "storageClassMap").write_text("sc1:\n  hostDir: [unclosed\n")
    with pytest.raises(ConfigError, match=r"^storageClassMap: invalid YAML at line \d+"):
        load_config(tmp_path)


def test_missing_path_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "absent")


@pytest.mark.parametrize(("value", "seconds"), [
    ("5m", 300.0), ("5m0s", 300.0), ("1h", 3600.0), ("250ms", 0.25), (45, 45.0),
    ("+90s", 90.0), ("24h", 86400.0), (86400, 86400.0), (" 1h30m ", 5400.0), ("", 300.0),
])
def test_durations(value: object, seconds: float) -> None:
    assert parse_config({"minResyncPeriod": value}).min_resync_period == seconds


REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["filesystem.yaml", "block.yaml", "two-classes.yaml",
                                  "configmap"])
def test_shipped_examples_load_cleanly(name: str) -> None:
    config = load_config(REPO / "config" / name)
    assert config.classes and config.warnings == ()


def test_daemonset_configmap_loads_as_mounted(tmp_path: Path) -> None:
    docs = yaml.safe_load_all((REPO / "daemonset.yaml").read_text())
    (configmap,) = [d for d in docs if d and d["kind"] == "ConfigMap"]
    for key, text in configmap["data"].items():
        (tmp_path / key).write_text(text)
    config = load_config(tmp_path)
    assert [c.name for c in config.classes] == ["local-storage"]
    assert config.classes[0].mount_dir == "/mnt/disks" and config.warnings == ()


def one_class(**body: object) -> dict[str, object]:
    return {"storageClassMap": {"sc1": body}}


@pytest.mark.parametrize(("body", "key", "words"), [
    ({"hostDir": "/mnt/disks\x00x"}, "hostDir", "control character"),
    ({"hostDir": "/mnt/disks\nx"}, "hostDir", "control character"),
    ({"hostDir": "/mnt/\x7fdisks"}, "hostDir", "control character"),
    ({"hostDir": "/mnt/disks", "mountDir": "/host/disks\x00"}, "mountDir", "control character"),
    ({"hostDir": "mnt/disks"}, "hostDir", "absolute path on the host"),
    ({"hostDir": "/mnt/disks", "mountDir": "host/disks"}, "mountDir", "absolute path in the"),
    ({"hostDir": "/tmp/x/../../../etc"}, "hostDir", "normalised form is '/etc'"),
    ({"hostDir": "/mnt/disks/.."}, "hostDir", "normalised form is '/mnt'"),
    ({"hostDir": "/mnt/./disks"}, "hostDir", "normalised form is '/mnt/disks'"),
    ({"hostDir": "/mnt//disks"}, "hostDir", "normalised form is '/mnt/disks'"),
    ({"hostDir": "//mnt/disks"}, "hostDir", "normalised form is '/mnt/disks'"),
    ({"hostDir": "/mnt/disks//"}, "hostDir", "normalised form is '/mnt/disks'"),
    ({"hostDir": "/mnt/disks", "mountDir": "/host/../disks"}, "mountDir", "normalised form"),
    ({"hostDir": "/" + "d/" * 2048}, "hostDir", "PATH_MAX"),
    ({"hostDir": "/mnt/" + "d" * 256}, "hostDir", "NAME_MAX"),
    ({"hostDir": "/"}, "hostDir", "is the system directory /:"),
    ({"hostDir": "/dev"}, "hostDir", "is the system directory /dev:"),
    ({"hostDir": "/dev/", "volumeMode": "Block"}, "hostDir", "system directory /dev:"),
    ({"hostDir": "/dev/disk/by-id"}, "hostDir", "is under the system directory /dev:"),
    ({"hostDir": "/etc"}, "hostDir", "system directory /etc"),
    ({"hostDir": "/proc/1/root"}, "hostDir", "system directory /proc"),
    ({"hostDir": "/sys/block"}, "hostDir", "system directory /sys"),
    ({"hostDir": "/usr/local/disks"}, "hostDir", "system directory /usr"),
    ({"hostDir": "/run/disks"}, "hostDir", "system directory /run"),
    ({"hostDir": "/var/run"}, "hostDir", "system directory /var/run"),
    ({"hostDir": "/lib64"}, "hostDir", "system directory /lib64"),
    ({"hostDir": "/boot"}, "hostDir", "system directory /boot"),
    ({"hostDir": "/var/lib"}, "hostDir", "system directory /var/lib:"),
    ({"hostDir": "/var/lib/kubelet/pods"}, "hostDir", "system directory /var/lib/kubelet"),
    ({"hostDir": "/home"}, "hostDir", "system directory /home"),
    ({"hostDir": "/mnt/disks", "mountDir": "/dev"}, "mountDir", "system directory /dev"),
    ({"hostDir": "/dev", "allowSystemDir": "maybe"}, "allowSystemDir", "boolean"),
    ({"hostDir": 7}, "hostDir", "required"),
    ({"hostDir": ""}, "hostDir", "required"),
])
def test_discovery_dir_errors(body: dict[str, object], key: str, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(one_class(**body))
    assert caught.value.key_path == f"storageClassMap.sc1.{key}"
    assert words in str(caught.value) and "got " in str(caught.value)
    assert caught.value.value == body[key]


@pytest.mark.parametrize(("host_dir", "expected"), [
    ("/mnt/disks", "/mnt/disks"), ("/mnt/disks/", "/mnt/disks"), ("/mnt", "/mnt"),
    ("/var/lib/localpv", "/var/lib/localpv"), ("/var/localpv", "/var/localpv"),
    ("/home/ops/disks", "/home/ops/disks"), ("/tmp/pytest/disks", "/tmp/pytest/disks"),
    ("/devices", "/devices"), ("/etcd-disks", "/etcd-disks"), ("/srv/disks", "/srv/disks"),
])
def test_ordinary_discovery_dirs_accepted(host_dir: str, expected: str) -> None:
    (cls,) = parse_config(one_class(hostDir=host_dir)).classes
    assert cls.host_dir == cls.mount_dir == expected
    assert not cls.allow_system_dir


@pytest.mark.parametrize("host_dir", ["/dev/disk/by-id", "/", "/var/lib", "/run/disks"])
def test_allow_system_dir_overrides(host_dir: str) -> None:
    config = parse_config(one_class(hostDir=host_dir, allowSystemDir=True))
    assert config.classes[0].host_dir == host_dir and config.classes[0].allow_system_dir
    assert config.warnings == ()


@pytest.mark.parametrize(("classes", "expected"), [
    ({"a": {"hostDir": "/mnt/d"}, "b": {"hostDir": "/mnt/d/"}},
     ["storageClassMap.b.hostDir: '/mnt/d' is also the hostDir of class a"]),
    ({"b": {"hostDir": "/mnt/d"}, "a": {"hostDir": "/mnt/d"}, "c": {"hostDir": "/mnt/d"}},
     ["storageClassMap.a.hostDir: '/mnt/d' is also the hostDir of class b",
      "storageClassMap.c.hostDir: '/mnt/d' is also the hostDir of class b"]),
    ({"a": {"hostDir": "/mnt/d", "namePattern": "nvme*"},
      "b": {"hostDir": "/mnt/d", "namePattern": "n*"}},
     ["storageClassMap.b.hostDir: '/mnt/d' is also the hostDir of class a"]),
    ({"a": {"hostDir": "/mnt/d", "namePattern": "*-fast"},
      "b": {"hostDir": "/mnt/d", "namePattern": "disk*"}},
     ["storageClassMap.b.hostDir: '/mnt/d' is also the hostDir of class a"]),
    ({"a": {"hostDir": "/mnt"}, "b": {"hostDir": "/mnt/disks/x"}},
     ["storageClassMap.b.hostDir: '/mnt/disks/x' is inside the hostDir '/mnt' of class a, "
      "whose namePattern matches its entry 'disks'"]),
    ({"b": {"hostDir": "/mnt/disks"}, "a": {"hostDir": "/mnt"}},
     ["storageClassMap.b.hostDir: '/mnt/disks' is inside the hostDir '/mnt' of class a"]),
    ({"a": {"hostDir": "/mnt/a", "mountDir": "/c"}, "b": {"hostDir": "/mnt/b", "mountDir": "/c"}},
     ["storageClassMap.b.mountDir: '/c' is also the mountDir of class a"]),
    ({"a": {"hostDir": "/mnt/a", "mountDir": "/c"}, "b": {"hostDir": "/c/x"}},
     ["storageClassMap.b.mountDir: '/c/x' is inside the mountDir '/c' of class a"]),
    # Same dir, disjoint patterns; nested but unmatched; siblings; a shared prefix only.
    ({"a": {"hostDir": "/mnt/d", "namePattern": "nvme*,ssd*"},
      "b": {"hostDir": "/mnt/d", "namePattern": "sd*"}}, []),
    ({"a": {"hostDir": "/mnt/d", "namePattern": "*-fast"},
      "b": {"hostDir": "/mnt/d", "namePattern": "*-slow"}}, []),
    ({"a": {"hostDir": "/mnt", "namePattern": "disk?"}, "b": {"hostDir": "/mnt/fast"}}, []),
    ({"a": {"hostDir": "/mnt/a"}, "b": {"hostDir": "/mnt/b"}}, []),
    ({"a": {"hostDir": "/mnt/disks"}, "b": {"hostDir": "/mnt/disks-fast"}}, []),
])
def test_shared_or_nested_dirs_warn_naming_both_classes(
    classes: dict[str, object], expected: list[str]
) -> None:
    warnings = parse_config({"storageClassMap": classes}).warnings
    assert len(warnings) == len(expected)
    for warning, start in zip(warnings, expected, strict=True):
        assert warning.startswith(start) and "each disk still gets one PV" in warning


def test_many_overlapping_classes_one_warning_each() -> None:
    same = {f"c{i}": {"hostDir": "/mnt/d"} for i in range(60)}
    assert len(parse_config({"storageClassMap": same}).warnings) == 59
    chain = {f"c{i}": {"hostDir": "/mnt" + "/d" * i} for i in range(60)}
    assert len(parse_config({"storageClassMap": chain}).warnings) == 59


@pytest.mark.parametrize("value", ["0", 0, "0s", "0h0m", 0.0, "-0"])
def test_zero_resync_period_warns_and_uses_the_default(value: object) -> None:
    config = parse_config({**MINIMAL, "minResyncPeriod": value})
    assert config.min_resync_period == 300.0
    (warning,) = config.warnings
    assert warning.startswith("minResyncPeriod: 0 means no periodic resync to the upstream")


@pytest.mark.parametrize(("value", "words"), [
    (float("nan"), "is not a number (NaN)"),
    (float("inf"), "maximum of 24h (it is infinite)"),
    (float("-inf"), "must not be negative"),
    (1e20, "maximum of 24h"),
    (10**400, "maximum of 24h"),
    ("100000000000000000000h", "maximum of 24h"),
    ("24h0m1s", "maximum of 24h"),
    (86401, "maximum of 24h"),
    ("-5m", "must not be negative"),
    (-1, "must not be negative"),
    ("1e20h", "duration such as 5m"),
    (".nan", "duration such as 5m"),
    ("5 minutes", "duration such as 5m"),
    ("5", "duration such as 5m"),
    ("9" * 65 + "s", "too long"),
    (True, "duration such as 5m"),
    ([300], "duration such as 5m"),
])
def test_bad_durations(value: object, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config({"minResyncPeriod": value})
    assert caught.value.key_path == "minResyncPeriod"
    assert words in str(caught.value) and "got " in str(caught.value)


def test_nan_from_yaml_is_named_as_such(tmp_path: Path) -> None:
    (tmp_path / "minResyncPeriod").write_text(".nan\n")
    with pytest.raises(ConfigError, match=r"^minResyncPeriod: is not a number \(NaN\)"):
        load_config(tmp_path)


@pytest.mark.parametrize(("pattern", "glob", "index"), [
    ("[abc", "[abc", 0), ("nvme*,sd[a-", "sd[a-", 2), ("x[!]", "x[!]", 1), ("[]", "[]", 0),
    ("ok[a]x[", "ok[a]x[", 6),
])
def test_unclosed_glob_bracket_is_an_error(pattern: str, glob: str, index: int) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(one_class(hostDir="/mnt/d", namePattern=pattern))
    assert caught.value.key_path == "storageClassMap.sc1.namePattern"
    assert caught.value.value == pattern
    assert f"the glob {glob!r} has an unclosed '[' at index {index}" in str(caught.value)


@pytest.mark.parametrize(("pattern", "matches", "misses"), [
    ("[[]x", "[x", "x"), ("[]]", "]", "a"), ("[!]]", "a", "]"), ("sd[a-c]", "sdb", "sdd"),
    ("a]b", "a]b", "ab"),
])
def test_valid_brackets_still_accepted(pattern: str, matches: str, misses: str) -> None:
    (cls,) = parse_config(one_class(hostDir="/mnt/d", namePattern=pattern)).classes
    assert cls.matches(matches) and not cls.matches(misses)


@pytest.mark.parametrize(("value", "warns"), [(True, True), ("yes", True), (False, False)])
def test_use_alpha_api_warns_that_it_is_ignored(value: object, warns: bool) -> None:
    config = parse_config({**MINIMAL, "useAlphaAPI": value})
    assert config.use_alpha_api is warns
    assert [w for w in config.warnings if w.startswith("useAlphaAPI: ignored")] == (
        [config.warnings[0]] if warns else [])
    if warns:
        assert "volume.alpha.kubernetes.io/node-affinity" in config.warnings[0]
        assert "spec.nodeAffinity" in config.warnings[0]


def test_warnings_are_capped() -> None:
    config = parse_config({**MINIMAL, **{f"unknown{i}": 1 for i in range(500)}})
    assert len(config.warnings) == MAX_WARNINGS
    assert config.warnings[-1] == "... and 401 more warnings like these"


def test_two_mib_file_rejected_by_size_before_parsing(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    # Invalid YAML up front: any parse would fail with "invalid YAML" instead.
    path.write_text("storageClassMap: [unclosed\n" + "#" * (2 << 20))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.key_path == str(path)
    assert caught.value.value == path.stat().st_size
    assert "over the 1 MiB limit (1048576 bytes" in str(caught.value)
    assert "nothing was parsed" in str(caught.value)


def test_configmap_directory_size_counts_all_keys(tmp_path: Path) -> None:
    (tmp_path / "storageClassMap").write_text("sc1:\n  hostDir: /mnt/disks\n")
    (tmp_path / "labelsForPV").write_text("a: [unclosed\n" + "#" * (600 << 10))
    (tmp_path / "nodeLabelsForPV").write_text("#" * (600 << 10))
    with pytest.raises(ConfigError, match=r"keys and values hold \d+ bytes, over the 1 MiB"):
        load_config(tmp_path)
    (tmp_path / "nodeLabelsForPV").unlink()  # one 600 KiB file alone is within the limit
    with pytest.raises(ConfigError, match=r"^labelsForPV: invalid YAML"):
        load_config(tmp_path)


def test_config_of_exactly_the_limit_is_read(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    head = "storageClassMap:\n  sc1:\n    hostDir: /mnt/disks\n"
    path.write_text(head + "#" * (MAX_CONFIG_BYTES - len(head)))
    assert [c.name for c in load_config(path).classes] == ["sc1"]
    path.write_text(head + "#" * (MAX_CONFIG_BYTES - len(head) + 1))
    with pytest.raises(ConfigError, match="over the 1 MiB limit"):
        load_config(path)


def test_class_count_is_capped(tmp_path: Path) -> None:
    classes = {f"c{i}": {"hostDir": f"/mnt/d{i}"} for i in range(300_000)}
    with pytest.raises(ConfigError) as caught:
        parse_config({"storageClassMap": classes})
    assert caught.value.key_path == "storageClassMap" and caught.value.value == 300_000
    assert "300000 storage classes, over the limit of 1000" in str(caught.value)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"storageClassMap": dict(list(classes.items())[:1000])}))
    assert len(load_config(path).classes) == 1000


@pytest.mark.parametrize(("text", "key", "line", "first"), [
    ("storageClassMap:\n  sc1:\n    hostDir: /mnt/a\n    hostDir: /mnt/b\n", "'hostDir'", 4, 3),
    ("storageClassMap:\n  sc1: {hostDir: /mnt/a}\n  sc1: {hostDir: /mnt/b}\n", "'sc1'", 3, 2),
    ("setPVOwnerRef: true\nstorageClassMap: {}\nsetPVOwnerRef: false\n", "'setPVOwnerRef'", 3, 1),
    ("labelsForPV: {a: x, b: y, a: z}\n", "'a'", 1, 1),
])
def test_duplicate_yaml_keys_are_errors(
    tmp_path: Path, text: str, key: str, line: int, first: int
) -> None:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert caught.value.key_path == str(path)
    assert (f"invalid YAML at line {line}: found duplicate key {key} (first at line {first})"
            in str(caught.value))


def test_duplicate_key_in_a_configmap_file_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "storageClassMap").write_text("sc1:\n  hostDir: /mnt/a\nsc1:\n  hostDir: /b\n")
    with pytest.raises(ConfigError, match=r"^storageClassMap: invalid YAML at line 3: found "
                                          r"duplicate key 'sc1' \(first at line 1\)"):
        load_config(tmp_path)


def test_yaml_merge_keys_may_still_be_overridden(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("storageClassMap:\n  base: &base {hostDir: /mnt/a, volumeMode: Block}\n"
                    "  sc1:\n    <<: *base\n    hostDir: /mnt/b\n")
    config = load_config(path)
    cls = config.storage_class("sc1")
    assert cls is not None and (cls.host_dir, cls.volume_mode) == ("/mnt/b", "Block")


def test_error_messages_stay_short_for_huge_values() -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(one_class(hostDir="/mnt/" + "a" * 900_000))
    assert len(str(caught.value)) < 400 and caught.value.key_path == "storageClassMap.sc1.hostDir"
    nested: list[object] = []
    for _ in range(5000):
        nested = [nested]
    with pytest.raises(ConfigError) as caught:
        parse_config({"minResyncPeriod": nested})
    assert len(str(caught.value)) < 400


def test_fingerprint_reads_a_bounded_prefix_and_the_size(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(b"#" * (3 << 20))
    before = fingerprint(path)
    path.write_bytes(b"#" * ((3 << 20) + 1))
    assert fingerprint(path) != before
    path.write_bytes(b"storageClassMap: {}\n")
    assert fingerprint(path) != before and fingerprint(path) == fingerprint(path)


def test_fs_cleaner_command_is_the_agents_own_key_and_off_by_default() -> None:
    (cls,) = parse_config(MINIMAL).classes
    assert cls.fs_cleaner_command == ()  # the built-in cleaner
    config = parse_config(one_class(hostDir="/mnt/d",
                                    fsCleanerCommand=["/scripts/fsclean.sh", "--quick"]))
    assert config.classes[0].fs_cleaner_command == ("/scripts/fsclean.sh", "--quick")
    assert config.warnings == ()


@pytest.mark.parametrize(("value", "words"), [
    ([], "empty command cleans nothing"),
    ("/scripts/fsclean.sh", "list of strings"),
    (["/scripts/fsclean.sh", 2], "list of strings"),
    ([["/bin/sh"]], "list of strings"),
    ({"cmd": "x"}, "list of strings"),
    ([" ", "x"], "first element must name the executable"),
    (["/bin/rm\0", "-rf"], "NUL"),
])
def test_bad_fs_cleaner_commands_are_errors(value: object, words: str) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(one_class(hostDir="/mnt/d", fsCleanerCommand=value))
    assert caught.value.key_path == "storageClassMap.sc1.fsCleanerCommand"
    assert words in str(caught.value) and "got " in str(caught.value)


def test_fs_cleaner_command_in_a_block_class_warns() -> None:
    config = parse_config(one_class(hostDir="/mnt/d", volumeMode="Block",
                                    fsCleanerCommand=["/x"]))
    assert config.warnings == ("storageClassMap.sc1.fsCleanerCommand: unused in a Block class "
                               "(its volumes are cleaned by blockCleanerCommand)",)
