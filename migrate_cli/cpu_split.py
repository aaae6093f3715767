"""The process's CPU split for the final report: before the migration's first connection, and from then on.

Why: a benchmark compares vmmig's CPU with QEMU's, which counts only the migration (from `migrate` to the end),
while a vmmig process also pays for interpreter start-up and imports. The mark is taken once per process (the
sender's first connect, the receiver's first admitted sender), so a retry or a resume does not move it.
"""

from __future__ import annotations

import time

_mark: float | None = None  # process CPU seconds when the migration's first connection was made


def mark_migration_start() -> None:
    """Remember the process CPU now, unless an earlier connection of this process did already."""
    global _mark
    if _mark is None:
        _mark = time.process_time()


def fields() -> dict[str, float]:
    """``cpu-startup-seconds`` (before the mark) and ``cpu-migration-seconds`` (since it): process CPU, all threads,
    user and system. Without a mark (never connected) all of it counts as start-up."""
    now = time.process_time()
    mark = now if _mark is None else _mark
    return {"cpu-startup-seconds": round(mark, 4), "cpu-migration-seconds": round(now - mark, 4)}
