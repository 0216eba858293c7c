"""The development kit: what the tests, `scripts/demo`, `scripts/cluster` and the benchmarks run
the agent against. A real control plane on 127.0.0.1 with KWOK nodes (controlplane), a real node
(realnode), systemd-udevd, Prometheus, loop disks (disks), agents and the remediation controller
as processes (agents, remediation). See README.md here.

Installed by the editable dev install (`make venv`) and never shipped: the image's build context
(.dockerignore) holds only the agent package. It works from a checkout: REPO is that checkout.
"""

from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
"""The repository this package runs from (daemonset.yaml, scripts/, config/ are read there)."""
