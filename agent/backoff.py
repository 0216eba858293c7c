"""Waiting after failures, and between resyncs: exponential, bounded, with jitter.

Pure (the randomness is injectable). Every retry of the agent waits through `exponential`, so
agents that failed together (an API restart) do not all come back at the same moment; the
periodic resync picks a random period between the minimum and twice it, as the upstream
provisioner does, for the same reason.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

JITTER = 0.2  # a delay is shortened by up to this fraction, at random: never made longer
MAX_DOUBLINGS = 62  # keeps 2**n a sane number however many attempts failed


def exponential(attempt: int, base: float, cap: float, jitter: float = JITTER,
                rand: Callable[[], float] = random.random) -> float:
    """The delay before retry number `attempt` (1 for the first): `base` doubling per
    attempt, at most `cap`, then shortened by up to `jitter` of itself."""
    delay = min(cap, base * 2.0 ** min(MAX_DOUBLINGS, max(0, attempt - 1)))
    return float(delay * (1.0 - jitter * rand()))


def resync_period(minimum: float, rand: Callable[[], float] = random.random) -> float:
    """A random period in [minimum, 2 * minimum), drawn afresh for each resync."""
    return float(minimum * (1.0 + rand()))


WATCH_TIMEOUT = 300  # seconds: the shortest watch request asked for (client-go's minimum too)


def watch_timeout(minimum: int = WATCH_TIMEOUT, rand: Callable[[], float] = random.random) -> int:
    """The length in [minimum, 2 * minimum) seconds to ask for a watch request, drawn afresh
    for each, as client-go's reflector does: watches that began together (every agent after an
    API restart) then do not all end, and come back, together every `minimum` seconds."""
    return int(minimum * (1.0 + rand()))


@dataclass
class Backoff:
    """Consecutive failures of one activity, and the delay after the latest; a success resets."""

    initial: float = 1.0
    maximum: float = 60.0
    jitter: float = JITTER
    rand: Callable[[], float] = field(default=random.random, repr=False)
    failures: int = 0

    def next_delay(self) -> float:
        self.failures += 1
        return exponential(self.failures, self.initial, self.maximum, self.jitter, self.rand)

    def reset(self) -> None:
        self.failures = 0
