"""Following a list-then-watch until told to stop: the one retry policy of every watch.

Each round lists when the cache needs it, then follows one watch request; a watch that ends is
resumed by the next round from the last version seen. One that expired (410 Gone) lists again
after a short pause, one that failed lists again after a backoff with jitter, and an unexpected
exception is logged and treated as a failure: a cache never silently goes stale, and many
agents that lose the apiserver together do not all come back at the same moment.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from agent.backoff import Backoff
from agent.kube import ApiError

log = logging.getLogger(__name__)

RELIST_PAUSE_MAX = 5.0  # seconds: a watch expiring again and again never makes a tight loop
# A relist waits its backoff delay shortened by up to 90% at random (other retries: 20%). What
# makes a fleet relist together is the apiserver coming back and answering every waiting
# request at once; a spread of 90% of the delay lets that crowd arrive over seconds, not a
# fraction of one, and no agent waits longer than before.
RELIST_JITTER = 0.9


def follow(what: str, one_round: Callable[[], None], expire: Callable[[], None],
           stop: threading.Event) -> None:
    """Run `one_round` until `stop` is set; after a failure, `expire` makes the next list."""
    backoff = Backoff(jitter=RELIST_JITTER)
    while not stop.is_set():
        try:
            one_round()
            backoff.reset()
        except ApiError as exc:
            expire()  # the relist also proves the API is back
            if stop.is_set():
                return  # stopping: its requests fail, quietly
            if exc.gone:
                log.info("%s watch expired; listing again", what)
                stop.wait(min(backoff.next_delay(), RELIST_PAUSE_MAX))
                continue
            delay = backoff.next_delay()
            log.warning("%s watch failed, listing again in %.0fs: %s", what, delay, exc)
            stop.wait(delay)
        except Exception:  # a cache must not silently go stale: log, relist, go on
            log.exception("%s watch crashed; listing again", what)
            expire()
            stop.wait(backoff.next_delay())
