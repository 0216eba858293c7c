"""What the parts of the reconcile loop share, built once by the loop.

The API, this node's PVs (the watch-fed cache and the agent's writes), the Event recorder, the
wake-up funnel, the run settings and the stop flag never change. `node` and `config` are
replaced by the loop thread only (at start, on a config reload); other threads read them whole.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass

from agent.config import Config
from agent.events import EventRecorder
from agent.kube import Kube
from agent.pvcache import PVStore
from agent.settings import RunSettings
from agent.sources import Waker
from agent.volumes import NodeInfo


@dataclass
class Context:
    kube: Kube
    pvs: PVStore
    events: EventRecorder
    waker: Waker
    settings: RunSettings
    node: NodeInfo
    config: Config
    instance: str  # node/random id: tells a twin agent from this one after a restart
    stop: threading.Event  # set once: the agent is stopping
