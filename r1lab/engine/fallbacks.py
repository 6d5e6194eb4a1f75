"""One logged line whenever a fast path declines, once per reason per process.

A fast path that quietly falls back to a slow one keeps results right and makes runs
slow with no trace (issue 11: the 1.5B benchmark's passes ran as eager elementwise
kernels and nothing said so). Every decline goes through `declined(path, reason)`: the
first time a (path, reason) pair is seen it is logged as a warning on the `r1lab.engine`
logger (shown on stderr even where logging is not configured); repeats are only counted,
so a decode loop or a training step does not flood the log.
"""

from __future__ import annotations

import logging
from collections import Counter

log = logging.getLogger("r1lab.engine")
_SEEN: Counter = Counter()


def declined(path: str, reason: str) -> None:
    """Record that the fast path `path` did not run, and why; log it the first time."""
    key = (path, reason)
    if key not in _SEEN:
        log.warning("%s: not used: %s", path, reason)
    _SEEN[key] += 1


def declines(path: str | None = None) -> dict[tuple[str, str], int]:
    """How often each (path, reason) was declined in this process (all paths by default)."""
    return {k: n for k, n in _SEEN.items() if path is None or k[0] == path}


def forget() -> None:
    """Clear the record (tests), so the next decline of each reason is logged again."""
    _SEEN.clear()
