"""How many worker threads an end runs by default: the CPUs this process may use (its affinity), not the host's."""

from __future__ import annotations

import os


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
