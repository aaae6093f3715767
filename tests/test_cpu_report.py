"""The final --json reports split each process's CPU: start-up (before the migration's first connection), the
migration (from then to the verified result) and, on the receiver, the allocation of DEST."""

from __future__ import annotations

import json
import resource
from pathlib import Path

from .conftest import Processes, make_image

SPLIT = ("cpu-startup-seconds", "cpu-migration-seconds")


def children_cpu() -> float:
    """User + system CPU seconds of every child this test process has reaped so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def test_both_reports_split_the_process_cpu_and_never_exceed_it(procs: Processes, tmp_path: Path) -> None:
    """Each field is a number >= 0; the receiver also reports its allocation's CPU, which is part of the migration's;
    start-up and migration together are at most what the processes used in all (their rusage once reaped)."""
    image = make_image(tmp_path / "image.img", 32 << 20)
    dest = tmp_path / "dest.img"
    before = children_cpu()
    recv = procs.recv(dest, "--json", "--quiet")
    send_code, send_out, send_err = procs.send(image, recv.address, "--json", "--quiet").wait()
    recv_code, recv_out, recv_err = recv.wait()
    whole = children_cpu() - before  # both vmmig processes, now reaped
    assert (send_code, recv_code) == (0, 0), send_err + recv_err
    sent, received = json.loads(send_out), json.loads(recv_out)
    for report in (sent, received):
        for name in SPLIT:
            assert isinstance(report[name], float | int) and report[name] >= 0, (name, report.get(name))
        assert report["cpu-startup-seconds"] > 0, "interpreter start-up and imports cost CPU before any connection"
    assert isinstance(received["cpu-allocation-seconds"], float | int)
    assert 0 <= received["cpu-allocation-seconds"] <= received["cpu-migration-seconds"]
    assert "cpu-allocation-seconds" not in sent
    split = sum(report[name] for report in (sent, received) for name in SPLIT)
    assert sent["cpu-migration-seconds"] + received["cpu-migration-seconds"] <= whole
    assert split <= whole, f"start-up + migration ({split:.3f} s) above the processes' rusage ({whole:.3f} s)"
