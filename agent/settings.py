"""How one agent runs: the settings of `localpv-agent run` that the loop and its parts read.

Pure. One frozen value, built once from the command line; the config file (which can change
while the agent runs) is separate.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class RunSettings:
    node_name: str
    resync_period: float = 300.0  # minimum seconds between full resyncs (jittered up to 2x)
    debounce: float = 0.0  # seconds from a wake-up to its pass; 0: at once (leading edge)
    pass_burst: int = 20  # passes that wake-ups may start back to back ...
    pass_rate: float = 10.0  # ... then this many a second (agent.wakeup.PassSchedule)
    entry_settle: float = 0.2  # seconds a new directory entry gets to be mounted on first
    poll_period: float | None = None  # poll like the upstream: a pass every period
    withdraw_missing: bool = True  # delete an unbound PV whose disk is gone
    withdraw_removed_classes: bool = False  # delete unbound PVs of classes no longer configured
    clean_stale_after: float = 60.0  # another instance's clean without a heartbeat is dead
    clean_retry_base: float = 30.0  # first delay after a failed clean, doubling to an hour
    config_path: str | None = None  # re-read on edits; None: the config never changes
    job_image: str | None = None  # useJobForCleaning's image
    namespace: str = "default"  # of cleaning Jobs
    job_poll: float = 5.0  # seconds between looks at running cleaning Jobs
    api_concurrency: int = 8  # PV writes of a pass in flight at once; 1: one after another
