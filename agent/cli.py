"""Command line: `localpv-agent scan` (no cluster needed) and `localpv-agent run`.

Builds the real adapters and hands them to the pure core. Errors a user can fix (bad config,
unreadable discovery directory) end in one clear line and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import socket
import sys
from collections.abc import Sequence
from typing import Any, TextIO

import yaml

from agent.config import DEFAULT_CONFIG_PATH, Config, ConfigError, load_config
from agent.discovery import Discovery, discover
from agent.host import HostReader
from agent.volumes import (
    ClassPolicy,
    NodeInfo,
    format_quantity,
    pv_manifest,
    round_capacity,
)

log = logging.getLogger("localpv-agent")

EXIT_OK, EXIT_UNREADABLE_DIR, EXIT_CONFIG = 0, 1, 2
RECLAIM_POLICIES = ("Delete", "Retain", "Recycle")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
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
    handler = {"scan": scan}[args.command]
    return handler(args, config)


def scan(args: argparse.Namespace, config: Config, out: TextIO | None = None) -> int:
    """Print the PVs this node would get; explain every entry that would not get one."""
    out = out or sys.stdout
    node = NodeInfo(
        name=args.node_name,
        uid=args.node_uid or "",
        hostname=args.hostname_label or args.node_name,
    )
    if config.set_pv_owner_ref and not node.uid:
        print("localpv-agent: setPVOwnerRef is on: pass --node-uid to scan", file=sys.stderr)
        return EXIT_CONFIG
    reader = _host_reader(args)
    snapshot = reader.snapshot(config)
    found = discover(config, snapshot)
    policy = ClassPolicy(reclaim_policy=args.reclaim_policy)
    manifests = [pv_manifest(v, node, config, policy) for v in found.volumes]

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
    common.add_argument("--node-name", default=env.get("MY_NODE_NAME") or socket.gethostname(),
                        help="this Node's name (default: $MY_NODE_NAME, else the host name)")
    common.add_argument("-v", "--verbose", action="store_true", help="debug logging")
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
    scan_p.add_argument("--hostname-label", default=None,
                        help="the Node's kubernetes.io/hostname label (default: the node name)")
    scan_p.add_argument("--node-uid", default=None, help="the Node's UID, for annotations")
    scan_p.add_argument("--reclaim-policy", choices=RECLAIM_POLICIES, default="Delete")
    scan_p.add_argument("-o", "--output", choices=("yaml", "json", "table"), default="yaml")
    return parser


if __name__ == "__main__":
    sys.exit(main())
