"""Command line: `localpv-agent scan` (no cluster needed) and `localpv-agent run`.

Builds the real adapters and hands them to the pure core. Errors a user can fix (bad config,
unreadable discovery directory) end in one clear line and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import os
import select
import signal
import socket
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

import yaml

from agent.config import DEFAULT_CONFIG_PATH, Config, ConfigError
from agent.configfiles import load_config
from agent.discovery import Discovery, discover
from agent.host import HostReader
from agent.volumes import (
    ClassPolicy,
    NodeInfo,
    format_quantity,
    policy_of,
    pv_manifest,
    round_capacity,
)

if TYPE_CHECKING:  # the run-only modules load lazily, so `scan` stays light
    from agent.cleaner import Cleaner
    from agent.kube import Kube
    from agent.loop import Reconciler
    from agent.metrics import AgentSample
    from agent.settings import RunSettings

log = logging.getLogger("localpv-agent")

EXIT_OK, EXIT_UNREADABLE_DIR, EXIT_CONFIG = 0, 1, 2
SHUTDOWN_GRACE = 2.0  # seconds the loop gets to finish its step on SIGTERM
WEDGED_AFTER = 600.0  # seconds of failing passes (not the API's fault) before /healthz fails
RECLAIM_POLICIES = ("Delete", "Retain", "Recycle")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "remediate":  # cluster-wide: no node, no ConfigMap
        from agent.remediator import main as remediate  # noqa: PLC0415
        return remediate(args)
    args.node_name_given = bool(args.node_name)
    args.node_name = args.node_name or socket.gethostname()
    log_handler = logging.StreamHandler(sys.stderr)
    log_handler.setFormatter(JsonFormatter() if args.log_format == "json" else logging.Formatter(
        "%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        handlers=[log_handler])
    # The agent retries with its own backoff and logs each failure once.
    logging.getLogger("urllib3").setLevel(logging.ERROR)
    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(f"localpv-agent: invalid config {args.config}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except OSError as exc:
        print(f"localpv-agent: cannot read config {args.config}: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    for warning in config.warnings:
        log.warning("config %s: %s", args.config, warning)
    handler = {"scan": scan, "run": run}[args.command]
    return handler(args, config)


def run(args: argparse.Namespace, config: Config) -> int:
    """Keep this node's PVs in line with its disks until SIGTERM."""
    # Imported here so `scan` works without touching the API client at all.
    from agent.cleaner import CleanOutcome, DirtyStore, capacity_breakdown  # noqa: PLC0415
    from agent.kube import Kube  # noqa: PLC0415
    from agent.loop import Hooks, Reconciler  # noqa: PLC0415
    from agent.metrics import HealthServer, Metrics, stalled_after  # noqa: PLC0415
    from agent.runloop import PassResult  # noqa: PLC0415

    if not args.node_name_given:
        print("localpv-agent: run needs the node name: set MY_NODE_NAME or --node-name",
              file=sys.stderr)
        return EXIT_CONFIG
    metrics = Metrics()
    loop_progress: list[Callable[[], None]] = []

    def observe_request(verb: str, outcome: str, seconds: float) -> None:
        metrics.observe_request(verb, outcome, seconds)
        # answered or failed in time, on the loop thread or one of its writers
        if threading.current_thread().name.startswith("reconcile"):
            for note in loop_progress:
                note()

    try:
        kube = Kube(args.kubeconfig or None, observe=observe_request,
                    connections=args.api_concurrency)
    except Exception as exc:  # the client raises several unrelated types for a bad kubeconfig
        print(f"localpv-agent: cannot configure the API client: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    resync = args.resync_period if args.resync_period is not None else config.min_resync_period

    def on_pass(result: PassResult, seconds: float) -> None:
        metrics.observe_pass(result.created_by_mode, seconds, result.woken_at)

    def on_clean(outcome: CleanOutcome) -> None:
        job = outcome.job
        # The upstream's label: the class's blockCleanerCommand[0], for filesystem cleans too.
        command = job.command[0] if job.command else ""
        metrics.observe_clean(job.class_name, job.mode, outcome.ok, outcome.seconds,
                              capacity_breakdown(job.capacity_bytes), command,
                              "job" if job.via_job else "process")

    try:
        dirty = DirtyStore(args.state_dir)
    except OSError as exc:
        print(f"localpv-agent: cannot use the state dir {args.state_dir}: {exc}",
              file=sys.stderr)
        return EXIT_CONFIG
    reconciler = Reconciler(kube, _host_reader(args), config, _settings(args, resync),
                            dirty=dirty, hooks=Hooks(on_pass=on_pass, on_clean=on_clean))
    loop_progress.append(reconciler.note_progress)
    reconciler.attach_cleaner(_cleaner(args, reconciler))
    metrics.watch_state(lambda: sample_state(reconciler, kube))
    _start_sources(reconciler, args)
    server = None
    # Alive: the loop beat its heart (between passes, or an API call in a pass answered or
    # failed) within a minute; an API that stalls makes calls fail in 30 s, not the loop.
    alive = stalled_after(60.0, lambda: reconciler.state.heartbeat)
    if args.listen_address:
        try:
            server = HealthServer(
                args.listen_address, metrics,
                healthy=lambda: alive() and not reconciler.wedged(WEDGED_AFTER),
                ready=lambda: reconciler.state.first_sync_done and kube.reachable,
            )
        except (ValueError, OSError) as exc:  # a malformed address, or one taken or unknown
            print(f"localpv-agent: --listen-address: {exc}", file=sys.stderr)
            reconciler.shutdown()  # the sources started above
            return EXIT_CONFIG
        server.start()
        if args.port_file:
            Path(args.port_file).write_text(f"{server.port}\n")

    # Everything built so far (modules, the API client, metrics) lives as long as the
    # process: out of the collector's sight, a full collection no longer walks it all, which
    # took up to 0.1 s in the middle of a pass.
    gc.freeze()
    _run_until_stopped(reconciler)
    if server is not None:
        server.stop()
    log.info("stopped")
    return EXIT_OK


def _settings(args: argparse.Namespace, resync: float | None) -> RunSettings:
    from agent.settings import RunSettings  # noqa: PLC0415

    poll = args.discovery_mode == "poll"
    return RunSettings(
        node_name=args.node_name, resync_period=resync or 300.0,
        poll_period=args.discovery_period if poll else None,
        withdraw_missing=args.withdraw_missing,
        withdraw_removed_classes=args.withdraw_removed_classes,
        clean_stale_after=args.clean_stale_after,
        clean_retry_base=args.clean_retry_base, config_path=args.config,
        job_image=args.job_image, namespace=args.namespace, debounce=args.debounce,
        api_concurrency=args.api_concurrency)


def _run_until_stopped(reconciler: Reconciler) -> None:
    """Run the loop until SIGTERM, then stop within a few seconds whatever the API or the
    disks do: cleaners are killed (their volumes stay dirty and resume after the restart) and
    a loop stuck in a call is left behind, since every decision is made again anyway."""
    # A daemon thread: a loop stuck in an API call or on a disk never holds the exit.
    loop = threading.Thread(target=reconciler.run, name="reconcile", daemon=True)
    loop.start()
    signum = _wait_for_stop_signal(loop)
    if signum is not None:
        log.info("received %s, stopping", signal.Signals(signum).name)
    reconciler.shutdown()
    if reconciler.cleaner is not None:
        reconciler.cleaner.shutdown()
    loop.join(SHUTDOWN_GRACE)
    if loop.is_alive():
        log.warning("the loop did not stop within %gs (a hung API call or disk); exiting "
                    "anyway", SHUTDOWN_GRACE)
    reconciler.close()


def _cleaner(args: argparse.Namespace, reconciler: Reconciler) -> Cleaner:
    """The cleaner, checking under each volume's lock the reconciler's decision and the disk's
    identity read from the device itself."""
    from agent.cleaner import Cleaner  # noqa: PLC0415

    reader = reconciler.reader
    return Cleaner(args.clean_concurrency, args.clean_timeout,
                   identify=lambda job: reader.read_identity(job.device),
                   confirm=reconciler.confirm_clean,
                   on_done=lambda: reconciler.waker.wake("cleaner"),
                   mountinfo=args.mountinfo, lock_dir=os.path.join(args.state_dir, "locks"))


def _wait_for_stop_signal(loop: threading.Thread) -> int | None:
    """Block until SIGTERM or SIGINT (or the loop ends); return the signal.

    The handlers do nothing but let Python write the signal number to a pipe: taking any lock
    in a signal handler (as setting a threading.Event does) can deadlock the thread it
    interrupted. The main thread reads the pipe and stops the loop in plain code.
    """
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    signal.set_wakeup_fd(write_end)
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: None)
    try:
        while loop.is_alive():
            ready, _, _ = select.select([read_end], [], [], 1.0)
            if ready:
                return os.read(read_end, 1)[0]
        return None
    finally:
        signal.set_wakeup_fd(-1)
        os.close(read_end)
        os.close(write_end)


def _start_sources(reconciler: Reconciler, args: argparse.Namespace) -> None:
    """The wake-up sources of events mode; poll mode has none but its timer."""
    from agent.sources import InotifySource, MountTableSource  # noqa: PLC0415
    from agent.udev import UdevSource  # noqa: PLC0415

    if args.discovery_mode == "poll":
        log.info("discovery: polling every %gs", args.discovery_period)
        return
    waker, stop = reconciler.waker, reconciler.stop

    def dirs() -> list[str]:  # where discovery looks: wake-ups elsewhere cost no pass
        return [p for c in reconciler.config.classes for p in (c.host_dir, c.mount_dir)]

    wanted = dirs if args.wake_filter else None
    sources = [
        UdevSource(waker, stop, receive_buffer=args.udev_buffer_size, dirs=wanted,
                   mountinfo=args.mountinfo),
        MountTableSource(waker, stop, args.mountinfo, dirs=wanted,
                         read_rate=args.mount_read_rate),
        InotifySource(waker, stop, lambda: [os.path.realpath(c.mount_dir)
                                            for c in reconciler.config.classes]),
    ]
    active = [s.name for s in sources if s.start()]
    log.info("discovery: events from %s, plus a full resync every %g to %gs",
             ", ".join(active) or "no source", reconciler.settings.resync_period,
             2 * reconciler.settings.resync_period)


def scan(args: argparse.Namespace, config: Config, out: TextIO | None = None) -> int:
    """Print the PVs this node would get; explain every entry that would not get one.

    What `run` reads from the API (the Node's UID and labels, each class's StorageClass) comes
    from it with `--kubeconfig`, else from flags, so the PVs printed are the ones run creates.
    """
    out = out or sys.stdout
    try:
        node, policies = _scan_inputs(args, config)
    except ScanInputError as bad:
        print(f"localpv-agent: {bad}", file=sys.stderr)
        return bad.code
    if config.set_pv_owner_ref and not node.uid:
        print("localpv-agent: setPVOwnerRef is on: pass --node-uid (or --kubeconfig) to scan",
              file=sys.stderr)
        return EXIT_CONFIG
    reader = _host_reader(args)
    try:
        snapshot = reader.snapshot(config)
    except OSError as unreadable:  # the mount table itself unreadable or hung
        print(f"localpv-agent: cannot read the host: {unreadable}", file=sys.stderr)
        return EXIT_UNREADABLE_DIR
    found = discover(config, snapshot)
    for name in sorted(c.name for c in config.classes if policies.get(c.name) is None):
        print(f"localpv-agent: class {name}: StorageClass {name} does not exist; run offers "
              "none of its volumes until it does", file=sys.stderr)
    offered = {name: policy for name, policy in policies.items() if policy is not None}
    found = replace(found, volumes=tuple(v for v in found.volumes if v.class_name in offered))
    manifests = [pv_manifest(v, node, config, offered[v.class_name]) for v in found.volumes]

    if args.output == "yaml":
        yaml.safe_dump_all(manifests, out, sort_keys=False, explicit_start=True)
    elif args.output == "json":
        json.dump({"apiVersion": "v1", "kind": "List", "items": manifests}, out, indent=2)
        out.write("\n")
    else:
        out.write(render_table(found, manifests))
    out.flush()
    for exc in found.exclusions:
        print(f"excluded: {exc.class_name}/{_printable(exc.entry_name)} "
              f"({_printable(exc.path)}): {exc.reason.value}: {_printable(exc.detail)}",
              file=sys.stderr)
    for cls_name, error in sorted(snapshot.dir_errors.items()):
        print(f"localpv-agent: class {cls_name}: {error}", file=sys.stderr)
    return EXIT_UNREADABLE_DIR if snapshot.dir_errors else EXIT_OK


class ScanInputError(Exception):
    """A scan flag or the API cannot give what run would read; `code` is the exit status."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


def _scan_inputs(args: argparse.Namespace,
                 config: Config) -> tuple[NodeInfo, dict[str, ClassPolicy | None]]:
    """The Node and each class's policy (None: its StorageClass is missing), as `run` reads
    them: from the API with `--kubeconfig`; flags given override it."""
    labels = _pairs(args.node_label, "--node-label", "KEY=VALUE")
    reclaim: dict[str, str] = {}
    for value in args.reclaim_policy or ():
        cls_name, _, policy = value.rpartition("=")
        if policy not in RECLAIM_POLICIES or (cls_name and config.storage_class(cls_name) is None):
            raise ScanInputError(f"--reclaim-policy {value!r}: expected [CLASS=]POLICY, a "
                                 f"configured class and one of {', '.join(RECLAIM_POLICIES)}",
                                 EXIT_CONFIG)
        reclaim[cls_name] = policy
    options: dict[str, list[str]] = {}
    for cls_name, option in _pair_list(args.mount_option, "--mount-option", "CLASS=OPTION"):
        if config.storage_class(cls_name) is None:
            raise ScanInputError(f"--mount-option {cls_name}={option}: no class {cls_name} in "
                                 "the config", EXIT_CONFIG)
        options.setdefault(cls_name, []).append(option)
    node = NodeInfo(name=args.node_name)
    policies: dict[str, ClassPolicy | None] = {c.name: ClassPolicy() for c in config.classes}
    if args.kubeconfig:
        node, policies = _read_from_api(args, config)
    node = NodeInfo(name=node.name, uid=args.node_uid or node.uid,
                    hostname=args.hostname_label or node.hostname,
                    labels={**node.labels, **labels})
    for cls_name, policy in policies.items():
        if policy is not None:
            policies[cls_name] = ClassPolicy(
                reclaim_policy=reclaim.get(cls_name) or reclaim.get("")
                or policy.reclaim_policy,
                mount_options=tuple(options.get(cls_name, policy.mount_options)))
    return node, policies


def _read_from_api(args: argparse.Namespace,
                   config: Config) -> tuple[NodeInfo, dict[str, ClassPolicy | None]]:
    """The Node and StorageClasses as run reads them (imported here: scan stays light)."""
    from agent.kube import ApiError, Kube  # noqa: PLC0415

    try:
        kube = Kube(args.kubeconfig)
    except Exception as exc:  # the client raises several unrelated types for a bad kubeconfig
        raise ScanInputError(f"cannot configure the API client: {exc}", EXIT_CONFIG) from None
    try:
        node = kube.get_node(args.node_name)
        policies = {c.name: policy_of(sc) if (sc := kube.get_storage_class(c.name)) else None
                    for c in config.classes}
    except ApiError as exc:
        raise ScanInputError(f"cannot read the Node or StorageClasses from the API: {exc}",
                             EXIT_UNREADABLE_DIR) from None
    return node, policies


def _pair_list(values: Sequence[str] | None, flag: str, form: str) -> list[tuple[str, str]]:
    pairs = []
    for value in values or ():
        key, sep, rest = value.partition("=")
        if not sep or not key:
            raise ScanInputError(f"{flag} {value!r}: expected {form}", EXIT_CONFIG)
        pairs.append((key, rest))
    return pairs


def _pairs(values: Sequence[str] | None, flag: str, form: str) -> dict[str, str]:
    return dict(_pair_list(values, flag, form))


def sample_state(reconciler: Reconciler, kube: Kube) -> AgentSample:
    """What the state metrics show, read from the loop at scrape time."""
    from agent import pv as pvs  # noqa: PLC0415
    from agent.metrics import AgentSample, VolumeSample  # noqa: PLC0415

    status = reconciler.status()
    last = status.last_pass
    missing = set(last.plan.missing) if last else set()
    cleaning = set(last.cleaning) if last else set()
    volumes = []
    for name, pv in sorted(status.pvs.items()):
        volumes.append(VolumeSample(
            name=name, class_name=pvs.storage_class(pv), mode=pvs.volume_mode(pv),
            state=("missing" if name in missing else "cleaning" if name in cleaning
                   else (pvs.phase(pv) or "pending").lower()), path=pvs.local_path(pv) or "",
            identity=pvs.identity(pv)))
    offered: dict[tuple[str, str], int] = {}
    excluded: dict[tuple[str, str], int] = {}
    if last is not None:
        for v in last.discovery.volumes:
            key = (v.class_name, v.volume_mode)
            offered[key] = offered.get(key, 0) + round_capacity(v.capacity_bytes)
        for e in last.discovery.exclusions:
            key = (e.class_name, e.reason.value)
            excluded[key] = excluded.get(key, 0) + 1
    return AgentSample(
        volumes=volumes, offered=offered, excluded=excluded, wakeups=status.wakeups,
        source_failures=status.source_failures, sources_active=status.sources_active,
        api_requests=kube.request_counts(), config_reloads=status.config_reloads,
        held=status.held, ready=status.first_sync_done and kube.reachable,
        proctable=reconciler.cleaner.table() if reconciler.cleaner is not None else (0, 0, 0),
        capacity_differs=len(last.plan.capacity_differs) if last is not None else 0)


def render_table(found: Discovery, manifests: Sequence[dict[str, Any]]) -> str:
    """Volumes first, then excluded entries with their reasons, in fixed-width columns."""
    header = ("NAME", "CLASS", "MODE", "CAPACITY", "PATH", "IDENTITY / REASON")
    rows: list[tuple[str, ...]] = []
    for volume, pv in zip(found.volumes, manifests, strict=True):
        ident = ",".join(f"{k}={v}" for k, v in sorted(volume.identity.items())) or "-"
        rows.append((
            pv["metadata"]["name"], volume.class_name, volume.volume_mode,
            format_quantity(round_capacity(volume.capacity_bytes)),
            _printable(volume.host_path), ident,
        ))
    for exc in found.exclusions:
        rows.append((
            "(excluded)", exc.class_name, "-", "-", _printable(exc.path),
            f"{exc.reason.value}: {_printable(exc.detail)}",
        ))
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header) - 1)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(r[:-1], widths, strict=True)) + "  " + r[-1]
        for r in (header, *rows)
    ]
    return "\n".join(lines) + "\n"


class JsonFormatter(logging.Formatter):
    """One JSON object per log line, for log pipelines."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"), "level": record.levelname,
                 "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value


def _printable(text: str) -> str:
    """Escape control characters and undecodable bytes so one entry stays on one line."""
    if text.isprintable():
        return text
    return text.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace") \
        .replace("\n", "\\n").replace("\t", "\\t")


def _host_reader(args: argparse.Namespace) -> HostReader:
    return HostReader(
        mountinfo=args.mountinfo,
        sys_block=args.sys_block,
        udev_data=args.udev_data,
        dev_dir=args.dev_dir,
        timeout=args.host_timeout,
    )


def _parser() -> argparse.ArgumentParser:
    env = os.environ
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=env.get("LOCALPV_CONFIG", DEFAULT_CONFIG_PATH),
                        help="ConfigMap directory or YAML file (default: %(default)s)")
    common.add_argument("--node-name", default=env.get("MY_NODE_NAME"),
                        help="this Node's name (default: $MY_NODE_NAME; scan: else the host name)")
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    common.add_argument("--log-format", choices=("text", "json"), default="text",
                        help="log lines as text or as one JSON object each")
    host = common.add_argument_group("host paths")
    host.add_argument("--mountinfo", default="/proc/self/mountinfo")
    host.add_argument("--sys-block", default="/sys/dev/block")
    host.add_argument("--udev-data", default="/run/udev/data")
    host.add_argument("--dev-dir", default="/dev")
    host.add_argument("--host-timeout", type=float, default=5.0,
                      help="seconds to wait for a disk's statvfs or open (default: %(default)s)")

    parser = argparse.ArgumentParser(
        prog="localpv-agent",
        description="Turn prepared disks under a discovery directory into local PVs.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    scan_p = sub.add_parser("scan", parents=[common],
                            help="print the PVs this node would get, without a cluster")
    scan_p.add_argument("--kubeconfig", default=None,
                        help="read the Node (UID, labels) and each class's StorageClass "
                             "(reclaimPolicy, mountOptions) from the API, as run does; the "
                             "flags below override what it says")
    scan_p.add_argument("--hostname-label", default=None,
                        help="the Node's kubernetes.io/hostname label (default: the node name)")
    scan_p.add_argument("--node-uid", default=None, help="the Node's UID, for annotations")
    scan_p.add_argument("--node-label", action="append", metavar="KEY=VALUE",
                        help="a label of the Node, for nodeLabelsForPV (repeatable)")
    scan_p.add_argument("--mount-option", action="append", metavar="CLASS=OPTION",
                        help="a mountOptions entry of a class's StorageClass (repeatable)")
    scan_p.add_argument("--reclaim-policy", action="append", metavar="[CLASS=]POLICY",
                        help="the reclaimPolicy of every class's StorageClass, or of one "
                             f"(repeatable; {', '.join(RECLAIM_POLICIES)}; default: Delete, "
                             "or what the API says)")
    scan_p.add_argument("-o", "--output", choices=("yaml", "json", "table"), default="yaml")

    run_p = sub.add_parser("run", parents=[common], help="keep this node's PVs up to date")
    run_p.add_argument("--kubeconfig", default=env.get("KUBECONFIG"),
                       help="kubeconfig file (default: $KUBECONFIG, else in-cluster)")
    run_p.add_argument("--listen-address", default=":8080",
                       help="address for /metrics, /healthz and /ready; empty to disable")
    run_p.add_argument("--port-file", default=None,
                       help="write the bound HTTP port here (useful with port 0)")
    run_p.add_argument("--resync-period", type=float, default=None,
                       help="seconds between full resyncs (default: minResyncPeriod, 5m)")
    run_p.add_argument("--discovery-mode", choices=("events", "poll"), default="events",
                       help="react to udev, mount table and directory events (default), or "
                            "poll like the upstream provisioner")
    run_p.add_argument("--discovery-period", type=float, default=10.0,
                       help="seconds between passes in poll mode (default: %(default)s)")
    run_p.add_argument("--withdraw-missing", action=argparse.BooleanOptionalAction,
                       default=True,
                       help="delete an unbound PV whose disk is gone (default: on)")
    run_p.add_argument("--withdraw-removed-classes", action=argparse.BooleanOptionalAction,
                       default=False,
                       help="delete this node's Available PVs whose class is no longer in the "
                            "config; claimed ones are left, with an Event (default: off)")
    run_p.add_argument("--udev-buffer-size", type=int, default=None, help=argparse.SUPPRESS)
    # Baselines for benchmarks/discovery_latency.py: the former trailing 0.2 s debounce, and
    # a pass for every mount-table change and udev event on the host.
    run_p.add_argument("--debounce", type=float, default=0.0, help=argparse.SUPPRESS)
    run_p.add_argument("--wake-filter", action=argparse.BooleanOptionalAction, default=True,
                       help=argparse.SUPPRESS)
    # ... and the filter reading the mount table on every change (0: no rate)
    run_p.add_argument("--mount-read-rate", type=float, default=None, help=argparse.SUPPRESS)
    run_p.add_argument("--api-concurrency", type=_positive_int, default=8, metavar="N",
                       help="PV writes of a pass sent to the API at once; 1 sends them one "
                            "after another (default: %(default)s)")
    run_p.add_argument("--state-dir", default="/var/lib/localpv-agent",
                       help="host dir remembering volumes not cleaned yet (default: %(default)s)")
    run_p.add_argument("--clean-concurrency", type=int, default=2,
                       help="volumes cleaned at once (default: %(default)s)")
    run_p.add_argument("--clean-timeout", type=float, default=6 * 3600.0,
                       help="seconds a block cleaner may run (default: %(default)s)")
    run_p.add_argument("--clean-stale-after", type=float, default=60.0,
                       help="seconds without a heartbeat after which another instance's "
                            "clean counts as interrupted and resumes (default: %(default)s)")
    run_p.add_argument("--namespace", default=env.get("MY_NAMESPACE") or "default",
                       help="namespace for cleaning Jobs (default: $MY_NAMESPACE)")
    run_p.add_argument("--job-image", default=env.get("JOB_CONTAINER_IMAGE"),
                       help="image of cleaning Jobs with useJobForCleaning "
                            "(default: $JOB_CONTAINER_IMAGE)")
    run_p.add_argument("--clean-retry-base", type=float, default=30.0,
                       help="first retry delay after a failed clean, doubling up to an hour "
                            "(default: %(default)s)")
    from agent.remediate import add_arguments as remediate_arguments  # noqa: PLC0415

    remediate_arguments(sub.add_parser(
        "remediate", help="cluster-wide controller: give a lost node's StatefulSet replicas "
                          "fresh claims on other nodes (opt-in per StorageClass)"), env)
    return parser


if __name__ == "__main__":
    sys.exit(main())
