"""Parse and validate the provisioner configuration.

The format is the upstream local-static-provisioner ConfigMap, so existing deployments keep
working: either a directory with one YAML fragment per key (the ConfigMap mounted as a volume)
or one YAML file holding the same keys. Everything is validated up front, and every error names
the key path and the bad value, because a typo in a ConfigMap is the most common way to lose a
node's volumes.

This module only parses the texts it is given; `agent.configfiles` reads them. The config is
untrusted input: it is size-capped before parsing (`MAX_CONFIG_BYTES`, applied while reading),
duplicate YAML keys are errors, discovery directories must be clean absolute paths outside
system directories, and every check stays linear in the config's size.
"""

from __future__ import annotations

import fnmatch
import math
import posixpath
import re
import reprlib
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

DEFAULT_CONFIG_PATH = "/etc/provisioner/config"
DEFAULT_BLOCK_CLEANER = ("/scripts/quick_reset.sh",)
VOLUME_MODES = ("Filesystem", "Block")
ACCESS_MODES = ("ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod")
SELECTOR_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt")
DEFAULT_RESYNC_SECONDS = 300.0
MAX_RESYNC_SECONDS = 24 * 3600.0  # a longer "periodic" resync is no safety net at all
# A ConfigMap cannot hold more than 1 MiB, so no config that works as a ConfigMap is refused;
# checked before parsing, because parsing (not reading) is what a huge config makes slow.
MAX_CONFIG_BYTES = 1 << 20
MAX_CLASSES = 1000
MAX_WARNINGS = 100

CLASS_KEYS = (
    "hostDir",
    "mountDir",
    "blockCleanerCommand",
    "volumeMode",
    "accessMode",
    "fsType",
    "namePattern",
    "selector",
    # The agent's own keys (a system directory as hostDir/mountDir; a filesystem cleaner
    # command). The upstream decodes its config non-strictly and ignores keys it does not
    # know, so a shared ConfigMap still works.
    "allowSystemDir",
    "fsCleanerCommand",
)
TOP_KEYS = (
    "storageClassMap",
    "nodeLabelsForPV",
    "labelsForPV",
    "setPVOwnerRef",
    "useNodeNameOnly",
    "minResyncPeriod",
    "useJobForCleaning",
    "jobTolerations",
    "removeNodeNotReadyTaint",
    "provisionerNotReadyNodeTaintKey",
    "useAlphaAPI",
)

# Directories whose entries are never disks to hand out: offering them as PVs and cleaning a
# released one would delete system files (`hostDir: /` offers /dev; `/dev` with Block offers
# every loop device). A directory equal to or under one of these is refused...
SYSTEM_DIR_TREES = (
    "/proc", "/sys", "/dev", "/etc", "/boot", "/usr", "/bin", "/sbin", "/lib", "/lib32",
    "/lib64", "/libx32", "/run", "/var/run", "/snap", "/var/lib/kubelet",
)
# ...and these only themselves: their first-level entries are often mount points holding
# someone's data (/var/lib/containerd, /var/log, automounted homes), while directories under
# them (/var/lib/localpv, /home/ops/disks) are fine discovery directories.
SYSTEM_DIR_EXACT = ("/", "/var", "/var/lib", "/home", "/root")
PATH_MAX_BYTES = 4095  # Linux PATH_MAX, 4096 with the terminating NUL
NAME_MAX_BYTES = 255

_YAML11_TRUE = {"y", "yes", "true", "on"}
_YAML11_FALSE = {"n", "no", "false", "off"}
_DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_LABEL_NAME = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?)$")
_CONTROL_CHAR = re.compile(r"[\x00-\x1f\x7f-\x9f]")  # exactly Unicode category Cc
_LONG_COMPONENT = re.compile(r"[^/]{64,}")  # over 255 UTF-8 bytes takes 64 characters or more
_GLOB_PREFIX_END = re.compile(r"[*?\[]")
_GLOB_SUFFIX_START = re.compile(r"[*?\]]")
_GO_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_GO_DURATION_UNITS = {
    "ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0,
}


class ConfigError(ValueError):
    """A configuration problem, located by its key path (e.g. `storageClassMap.fast.volumeMode`)."""

    def __init__(self, key_path: str, value: object, problem: str) -> None:
        self.key_path = key_path
        self.value = value
        self.problem = problem
        super().__init__(f"{key_path}: {problem} (got {_REPR.repr(value)})")


def _bounded_repr() -> reprlib.Repr:
    """repr() for error messages: a 1 MiB string or a deep structure stays a short line."""
    r = reprlib.Repr()
    r.maxstring = r.maxother = 160
    r.maxlevel = 4
    r.maxlong = 40
    return r


_REPR = _bounded_repr()


@dataclass(frozen=True)
class ClassConfig:
    """One entry of `storageClassMap`: where a StorageClass's volumes are discovered."""

    name: str
    host_dir: str
    mount_dir: str
    volume_mode: str = "Filesystem"
    access_mode: str = "ReadWriteOnce"
    fs_type: str | None = None
    name_patterns: tuple[str, ...] = ("*",)
    block_cleaner_command: tuple[str, ...] = DEFAULT_BLOCK_CLEANER
    selector: tuple[Mapping[str, Any], ...] = ()
    allow_system_dir: bool = False
    fs_cleaner_command: tuple[str, ...] = ()  # empty: the built-in filesystem cleaner

    def matches(self, entry_name: str) -> bool:
        """Whether an entry of `mount_dir` belongs to this class (`namePattern` globs)."""
        if "*" in self.name_patterns:  # the default: every name, without a glob per entry
            return True
        return any(fnmatch.fnmatchcase(entry_name, p) for p in self.name_patterns)


@dataclass(frozen=True)
class Config:
    """The whole provisioner configuration, with upstream defaults applied."""

    classes: tuple[ClassConfig, ...] = ()
    node_labels_for_pv: tuple[str, ...] = ()
    labels_for_pv: tuple[tuple[str, str], ...] = ()
    set_pv_owner_ref: bool = False
    use_node_name_only: bool = False
    min_resync_period: float = DEFAULT_RESYNC_SECONDS
    use_job_for_cleaning: bool = False
    job_tolerations: tuple[Mapping[str, Any], ...] = ()
    remove_node_not_ready_taint: bool = False
    provisioner_not_ready_node_taint_key: str = ""
    use_alpha_api: bool = False
    warnings: tuple[str, ...] = field(default=(), compare=False)

    def storage_class(self, name: str) -> ClassConfig | None:
        return next((c for c in self.classes if c.name == name), None)


def parse_config_texts(texts: Mapping[str, str]) -> Config:
    """Validate a ConfigMap given as its keys' YAML texts (one file per key when mounted)."""
    return parse_config({name: _load_yaml(text, name) for name, text in texts.items()})


def parse_config_file(text: str, where: str) -> Config:
    """Validate one YAML document holding all the keys; `where` names it in errors."""
    data = _load_yaml(text, where)
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(where, _short(data), "the file must hold a mapping of config keys")
    return parse_config(data)


def parse_config(raw: Mapping[str, Any]) -> Config:
    """Validate already-parsed config keys."""
    warnings = [f"{key}: unknown key, ignored" for key in raw if key not in TOP_KEYS]
    classes_raw = raw.get("storageClassMap") or {}
    _expect(isinstance(classes_raw, Mapping), "storageClassMap", classes_raw, "must be a mapping")
    _expect(len(classes_raw) <= MAX_CLASSES, "storageClassMap", len(classes_raw),
            f"{len(classes_raw)} storage classes, over the limit of {MAX_CLASSES}")
    classes = []
    for name, body in classes_raw.items():
        cls, cls_warnings = _parse_class(str(name), body)
        classes.append(cls)
        warnings.extend(cls_warnings)
    if not classes:
        warnings.append("storageClassMap: no storage classes, nothing will be discovered")
    warnings.extend(_overlap_warnings(classes))
    node_labels = _string_list(raw.get("nodeLabelsForPV"), "nodeLabelsForPV")
    for i, key in enumerate(node_labels):
        _check_label_key(key, f"nodeLabelsForPV[{i}]")
    labels = _labels(raw.get("labelsForPV"), "labelsForPV")
    tolerations = raw.get("jobTolerations") or []
    _expect(isinstance(tolerations, list) and all(isinstance(t, Mapping) for t in tolerations),
            "jobTolerations", tolerations, "must be a list of toleration mappings")
    taint_key = raw.get("provisionerNotReadyNodeTaintKey") or ""
    use_alpha_api = _bool(raw.get("useAlphaAPI"), "useAlphaAPI")
    if use_alpha_api:
        warnings.append(
            "useAlphaAPI: ignored; with it the upstream writes node affinity only as the "
            "annotation volume.alpha.kubernetes.io/node-affinity, which current Kubernetes no "
            "longer reads (its PVs then carry no node affinity and a pod can start on the wrong "
            "node); this agent always writes spec.nodeAffinity")
    _expect(isinstance(taint_key, str), "provisionerNotReadyNodeTaintKey", taint_key,
            "must be a string")
    min_resync = _duration(raw.get("minResyncPeriod"), "minResyncPeriod", warnings)
    return Config(
        classes=tuple(classes),
        node_labels_for_pv=tuple(node_labels),
        labels_for_pv=tuple(sorted(labels.items())),
        set_pv_owner_ref=_bool(raw.get("setPVOwnerRef"), "setPVOwnerRef"),
        use_node_name_only=_bool(raw.get("useNodeNameOnly"), "useNodeNameOnly"),
        min_resync_period=min_resync,
        use_job_for_cleaning=_bool(raw.get("useJobForCleaning"), "useJobForCleaning"),
        job_tolerations=tuple(tolerations),
        remove_node_not_ready_taint=_bool(
            raw.get("removeNodeNotReadyTaint"), "removeNodeNotReadyTaint"),
        provisioner_not_ready_node_taint_key=taint_key,
        use_alpha_api=use_alpha_api,
        warnings=tuple(_cap_warnings(warnings)),
    )


def _parse_class(name: str, body: Any) -> tuple[ClassConfig, list[str]]:
    where = f"storageClassMap.{name}"
    _expect(bool(_DNS_SUBDOMAIN.match(name)) and len(name) <= 253, where, name,
            "a StorageClass name must be a lowercase DNS subdomain")
    _expect(isinstance(body, Mapping), where, _short(body), "must be a mapping")
    warnings = [f"{where}.{k}: unknown key, ignored" for k in body if k not in CLASS_KEYS]

    allow_system = _bool(body.get("allowSystemDir"), f"{where}.allowSystemDir")
    host_dir = body.get("hostDir")
    _expect(isinstance(host_dir, str) and bool(host_dir), f"{where}.hostDir", host_dir,
            "required, an absolute path on the host")
    host_dir = _check_dir(host_dir, f"{where}.hostDir", "on the host", allow_system)
    mount_dir = body.get("mountDir") or host_dir
    _expect(isinstance(mount_dir, str), f"{where}.mountDir", _short(mount_dir),
            "must be an absolute path in the agent's container")
    mount_dir = _check_dir(mount_dir, f"{where}.mountDir", "in the agent's container",
                           allow_system)

    volume_mode = body.get("volumeMode") or "Filesystem"
    _expect(volume_mode in VOLUME_MODES, f"{where}.volumeMode", volume_mode,
            "unknown volume mode, want Filesystem or Block")
    access_mode = body.get("accessMode") or "ReadWriteOnce"
    _expect(access_mode in ACCESS_MODES, f"{where}.accessMode", access_mode,
            f"unknown access mode, want one of {', '.join(ACCESS_MODES)}")
    fs_type = body.get("fsType") or None
    _expect(fs_type is None or isinstance(fs_type, str), f"{where}.fsType", fs_type,
            "must be a string")

    pattern = body.get("namePattern")
    pattern = "*" if pattern is None or pattern == "" else pattern
    _expect(isinstance(pattern, str), f"{where}.namePattern", pattern,
            "must be a string of comma-separated globs")
    patterns = tuple(p.strip() for p in pattern.split(",") if p.strip())
    _expect(bool(patterns), f"{where}.namePattern", pattern, "holds no glob")
    for glob in patterns:
        at = _unclosed_bracket(glob)
        _expect(at is None, f"{where}.namePattern", pattern,
                f"the glob {glob!r} has an unclosed '[' at index {at} (Go's filepath.Match, "
                "which the upstream uses, rejects it too); write [[] for a literal '['")

    cleaner = body.get("blockCleanerCommand")
    if cleaner is None:
        cleaner_cmd = DEFAULT_BLOCK_CLEANER
    else:
        _expect(isinstance(cleaner, list) and all(isinstance(a, str) for a in cleaner),
                f"{where}.blockCleanerCommand", cleaner, "must be a list of strings")
        _expect(len(cleaner) > 0, f"{where}.blockCleanerCommand", cleaner,
                "an explicitly empty cleaner command would leave old data on reused disks")
        cleaner_cmd = tuple(cleaner)
    fs_cleaner, fs_warnings = _fs_cleaner(body.get("fsCleanerCommand"), where, volume_mode)
    warnings += fs_warnings

    selector = body.get("selector") or []
    _expect(isinstance(selector, list), f"{where}.selector", _short(selector),
            "must be a list of node selector terms")
    for i, term in enumerate(selector):
        _check_selector_term(term, f"{where}.selector[{i}]")

    normalized = ClassConfig(
        name=name,
        host_dir=host_dir,
        mount_dir=mount_dir,
        volume_mode=volume_mode,
        access_mode=access_mode,
        fs_type=fs_type,
        name_patterns=patterns,
        block_cleaner_command=cleaner_cmd,
        selector=tuple(selector),
        allow_system_dir=allow_system,
        fs_cleaner_command=fs_cleaner,
    )
    return normalized, warnings


def _fs_cleaner(value: object, where: str, volume_mode: str) -> tuple[tuple[str, ...], list[str]]:
    """`fsCleanerCommand`: what empties a released filesystem volume instead of the built-in
    cleaner, given as `blockCleanerCommand` is (a list, the executable first)."""
    key = f"{where}.fsCleanerCommand"
    if value is None:
        return (), []
    _expect(isinstance(value, list) and all(isinstance(a, str) for a in value), key,
            _short(value), "must be a list of strings, the executable first")
    assert isinstance(value, list)
    _expect(len(value) > 0, key, value,
            "an empty command cleans nothing; leave the key out for the built-in cleaner")
    _expect(bool(value[0].strip()), key, value, "the first element must name the executable")
    _expect(all("\0" not in a for a in value), key, _short(value), "holds a NUL character")
    warnings = []
    if volume_mode == "Block":
        warnings.append(f"{key}: unused in a Block class (its volumes are cleaned by "
                        "blockCleanerCommand)")
    return tuple(value), warnings


def _cap_warnings(warnings: list[str]) -> list[str]:
    """At most `MAX_WARNINGS`: each is logged (and a config can hold 100k unknown keys)."""
    if len(warnings) <= MAX_WARNINGS:
        return warnings
    rest = len(warnings) - MAX_WARNINGS + 1
    return [*warnings[:MAX_WARNINGS - 1], f"... and {rest} more warnings like these"]


def _overlap_warnings(classes: list[ClassConfig]) -> list[str]:
    """Classes sharing a discovery directory, or one nested in another: a warning, not an error.

    The upstream accepts both, and neither provably loses data here: discovery gives one disk
    one PV across all classes (a duplicate is excluded with a reason), and the cleaner never
    crosses into a nested mount. But which class a disk lands in is then easy to get wrong, so
    it is worth saying. Same directory with provably disjoint namePatterns (`nvme*` and `sd*`)
    is a normal setup and says nothing; so is a nested directory that the outer class's
    patterns do not match. One warning per class, naming the first class it overlaps.
    """
    views = [_ClassView(c) for c in classes]
    warnings: list[str] = []
    warned: set[str] = set()
    for attr, key in (("host_dir", "hostDir"), ("mount_dir", "mountDir")):
        # A trie of path components keeps this linear in the total path length, however deep:
        # a config is untrusted input.
        root = _DirNode()
        for view in views:
            node = root
            for part in _parts(getattr(view.cls, attr)):
                child = node.children.get(part)
                if child is None:
                    child = node.children[part] = _DirNode()
                node = child
            node.classes.append(view)
        for view in views:
            name, path = view.cls.name, getattr(view.cls, attr)
            if name in warned:  # one warning per class: mountDir usually repeats hostDir
                continue
            problem = _overlap(view, path, key, root, only_moved=attr == "mount_dir")
            if problem is not None:
                warned.add(name)
                warnings.append(
                    f"storageClassMap.{name}.{key}: {path!r} {problem}; each disk still gets "
                    "one PV (an existing PV wins, else the first class by name), but give each "
                    "class its own directory or disjoint namePatterns")
    return warnings


class _ClassView:
    """A class with its namePatterns compiled once, for many comparisons."""

    def __init__(self, cls: ClassConfig) -> None:
        self.cls = cls
        self.match = re.compile("|".join(f"(?:{fnmatch.translate(p)})"
                                         for p in cls.name_patterns)).match
        self.affixes = [_glob_affixes(p) for p in cls.name_patterns]
        self.moved = cls.mount_dir != cls.host_dir


@dataclass
class _DirNode:
    children: dict[str, _DirNode] = field(default_factory=dict)
    classes: list[_ClassView] = field(default_factory=list)


def _parts(path: str) -> list[str]:
    return [p for p in path.split("/") if p]


def _overlap(view: _ClassView, path: str, key: str, root: _DirNode,
             only_moved: bool) -> str | None:
    """How a class listed before `view`'s overlaps its `key` directory; None if none does.
    `only_moved`: skip pairs whose mountDirs both equal their hostDirs (already compared)."""
    node, parts = root, _parts(path)
    for depth, part in enumerate(parts):
        for other in node.classes:
            if only_moved and not (view.moved or other.moved):
                continue
            if other.match(part):
                outer = "/" + "/".join(parts[:depth])
                return (f"is inside the {key} {outer!r} of class {other.cls.name}, whose "
                        f"namePattern matches its entry {part!r}")
        node = node.children[part]
    for other in node.classes:
        if other is view:
            break  # only classes listed before: the pair is reported once, on the later one
        if only_moved and not (view.moved or other.moved):
            continue
        if not _globs_disjoint(view.affixes, other.affixes):
            return (f"is also the {key} of class {other.cls.name}, and their namePatterns may "
                    "match the same entries")
    return None


def _globs_disjoint(ours: list[tuple[str, str]], theirs: list[tuple[str, str]]) -> bool:
    """True only when no name can match a glob of both lists (given as `_glob_affixes`): for
    every pair, the literal prefixes or suffixes disagree. False means "may overlap"."""
    return all(
        not (pa.startswith(pb) or pb.startswith(pa)) or not (sa.endswith(sb) or sb.endswith(sa))
        for pa, sa in ours for pb, sb in theirs)


def _glob_affixes(glob: str) -> tuple[str, str]:
    """The literal text every match of `glob` starts with, and ends with."""
    return _GLOB_PREFIX_END.split(glob, maxsplit=1)[0], _GLOB_SUFFIX_START.split(glob)[-1]


def _check_selector_term(term: Any, where: str) -> None:
    _expect(isinstance(term, Mapping), where, _short(term), "must be a mapping")
    unknown = set(term) - {"matchExpressions", "matchFields"}
    _expect(not unknown, where, sorted(unknown), "want matchExpressions and/or matchFields")
    _expect(bool(term), where, term, "an empty term matches no node")
    for kind in ("matchExpressions", "matchFields"):
        exprs = term.get(kind) or []
        _expect(isinstance(exprs, list), f"{where}.{kind}", _short(exprs), "must be a list")
        for j, expr in enumerate(exprs):
            at = f"{where}.{kind}[{j}]"
            _expect(isinstance(expr, Mapping), at, _short(expr), "must be a mapping")
            _expect(isinstance(expr.get("key"), str) and bool(expr.get("key")), f"{at}.key",
                    expr.get("key"), "required")
            _expect(expr.get("operator") in SELECTOR_OPERATORS, f"{at}.operator",
                    expr.get("operator"), f"want one of {', '.join(SELECTOR_OPERATORS)}")
            values = expr.get("values", [])
            _expect(isinstance(values, list) and all(isinstance(v, str) for v in values),
                    f"{at}.values", values, "must be a list of strings")


class _UniqueKeys(yaml.constructor.SafeConstructor):
    """YAML 1.1 safe loading, but a key repeated in one mapping is an error, not last-wins:
    a repeated class name or `hostDir` silently dropping the first is how volumes get lost."""

    def construct_mapping(
        self, node: yaml.MappingNode, deep: bool = False
    ) -> dict[Hashable, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _value in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base` then overriding a merged key is normal YAML
            key = self.construct_object(key_node, deep=deep)
            try:
                first = seen.setdefault(key, key_node)
            except TypeError:
                continue  # an unhashable key: the base class reports it
            if first is not key_node:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found duplicate key {_REPR.repr(key)} (first at line "
                    f"{first.start_mark.line + 1})", key_node.start_mark)
        return super().construct_mapping(node, deep=deep)


class _PyLoader(_UniqueKeys, yaml.SafeLoader):
    pass


_LOADER: type[Any] = _PyLoader
if yaml.__with_libyaml__:  # the C parser: several times faster on a large config
    class _CLoader(_UniqueKeys, yaml.CSafeLoader):
        pass

    _LOADER = _CLoader


def _load_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_LOADER)  # a SafeLoader: plain data only
    except RecursionError:
        raise ConfigError(where, text[:40], "YAML nested too deeply") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(where, text[:40], f"invalid YAML{line}: {problem}") from None


def _expect(ok: bool, key_path: str, value: object, problem: str) -> None:
    if not ok:
        raise ConfigError(key_path, value, problem)


def _bool(value: Any, where: str) -> bool:
    """YAML 1.1 booleans, also when quoted: a ConfigMap often carries `"true"`."""
    if value is None:
        return False
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in _YAML11_TRUE | _YAML11_FALSE:
        return value.strip().lower() in _YAML11_TRUE
    raise ConfigError(where, value, "must be a boolean (true/false, yes/no)")


def _duration(value: Any, where: str, warnings: list[str]) -> float:
    """A Go duration string (`5m0s`) or a number of seconds: finite, > 0, at most 24h.

    0 is the one special value: the upstream passes it to its informers, where it means "no
    periodic resync". This agent's full resync is its safety net for missed events, so it
    cannot honour that: it warns and uses the default.
    """
    if value is None or value == "":
        return DEFAULT_RESYNC_SECONDS
    if isinstance(value, bool):
        raise ConfigError(where, value, "must be a duration such as 5m or 30s")
    if isinstance(value, int | float):
        try:
            seconds = float(value)
        except OverflowError:  # an int past float range
            seconds = math.inf
    elif isinstance(value, str):
        text = value.strip()
        _expect(len(text) <= 64, where, value, "too long for a duration such as 5m or 30s")
        sign = -1.0 if text.startswith("-") else 1.0
        text = text[1:] if text[:1] in "+-" else text  # Go accepts a sign
        parts = _GO_DURATION_PART.findall(text)
        if text == "0":
            seconds = 0.0
        elif not parts or "".join(n + u for n, u in parts) != text:
            raise ConfigError(where, value, "must be a duration such as 5m or 30s")
        else:
            seconds = sign * sum(float(n) * _GO_DURATION_UNITS[u] for n, u in parts)
    else:
        raise ConfigError(where, _short(value), "must be a duration such as 5m or 30s")
    _expect(not math.isnan(seconds), where, value, "is not a number (NaN); want e.g. 5m")
    _expect(seconds >= 0, where, value, "must not be negative")
    _expect(seconds <= MAX_RESYNC_SECONDS, where, value,
            "longer than the maximum of 24h" + (" (it is infinite)" if math.isinf(seconds) else ""))
    if seconds == 0:
        warnings.append(
            f"{where}: 0 means no periodic resync to the upstream; this agent needs one to catch "
            f"missed events, so it uses the default {DEFAULT_RESYNC_SECONDS:g}s")
        return DEFAULT_RESYNC_SECONDS
    return seconds


def _string_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    _expect(isinstance(value, list) and all(isinstance(v, str) for v in value), where,
            _short(value), "must be a list of strings")
    return list(value)


def _labels(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    _expect(isinstance(value, Mapping), where, _short(value), "must be a mapping of labels")
    labels = {}
    for key, val in value.items():
        _check_label_key(str(key), f"{where}.{key}")
        text = "" if val is None else str(val) if not isinstance(val, bool) else str(val).lower()
        _expect(len(text) <= 63 and (text == "" or bool(_LABEL_NAME.match(text))),
                f"{where}.{key}", val, "not a valid label value")
        labels[str(key)] = text
    return labels


def _check_label_key(key: str, where: str) -> None:
    prefix, _, name = key.rpartition("/")
    ok = bool(_LABEL_NAME.match(name)) and len(name) <= 63
    if prefix:
        ok = ok and bool(_DNS_SUBDOMAIN.match(prefix)) and len(prefix) <= 253
    _expect(ok, where, key, "not a valid label key")


def _unclosed_bracket(glob: str) -> int | None:
    """Where `glob` opens a `[` set that never closes (fnmatch would silently take it
    literally, Go's filepath.Match returns ErrBadPattern); None when every set closes."""
    i = 0
    while i < len(glob):
        if glob[i] == "[":
            j = i + 1
            if glob[j:j + 1] == "!":
                j += 1
            if glob[j:j + 1] == "]":  # a `]` first in a set is a literal
                j += 1
            j = glob.find("]", j)
            if j < 0:
                return i
            i = j
        i += 1
    return None


def _check_dir(path: str, where: str, place: str, allow_system: bool) -> str:
    """A discovery directory: absolute, normalised, printable, and no system directory.

    Returns the path without a trailing slash. A trailing slash is the one non-normal form
    accepted, because it is common in ConfigMaps and harmless: the upstream joins entry names
    with Go's filepath.Join, which drops it too, so PV paths (and names) stay the same.
    """
    bad = _CONTROL_CHAR.search(path)
    _expect(bad is None, where, path,
            f"holds a control character (NUL, newline, ...) at index {bad and bad.start()}")
    _expect(path.startswith("/"), where, path, f"must be an absolute path {place}")
    _expect(len(path.encode()) <= PATH_MAX_BYTES, where, path,
            f"longer than {PATH_MAX_BYTES} bytes (PATH_MAX)")
    normal = "/" + posixpath.normpath(path).lstrip("/")  # normpath keeps a leading "//"
    _expect(path in (normal, normal + "/"), where, path,
            f"not a normalised path ('.', '..' or '//' in it): its normalised form is "
            f"{normal!r}; write that if you mean it")
    long_name = next((m for m in _LONG_COMPONENT.findall(normal)
                      if len(m.encode()) > NAME_MAX_BYTES), None)
    _expect(long_name is None, where, path,
            f"a path component is longer than {NAME_MAX_BYTES} bytes (NAME_MAX)")
    system = _system_dir(normal)
    _expect(allow_system or system is None, where, path,
            f"{'is' if system == normal else 'is under'} the system directory {system}: its "
            "entries are not disks to hand out, and cleaning a released one would delete "
            "system files (set allowSystemDir: true on the class to override)")
    return normal


def _system_dir(path: str) -> str | None:
    """The system directory `path` is or is under, if any."""
    if path in SYSTEM_DIR_EXACT:
        return path
    return next((d for d in SYSTEM_DIR_TREES if path == d or path.startswith(d + "/")), None)


def _short(value: object) -> object:
    text = _REPR.repr(value)  # bounded: a value can be nested 1000 deep
    return value if len(text) <= 60 else text[:57] + "..."
