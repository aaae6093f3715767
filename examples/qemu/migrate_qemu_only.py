#!/usr/bin/env python3
"""Prove the x-ignore-shared handoff with QEMU alone (no vmmig): the RAM file is copied by this script instead.

Scenarios (``--scenarios``, comma-separated; default ``handoff,failure``):

``handoff``
    Boot the source; start the destination with ``-S -incoming defer`` and its own RAM file; set ``x-ignore-shared``
    on both and ``migrate-incoming tcp:127.0.0.1:PORT`` on the destination; ``stop`` the source; copy the source
    RAM file over the destination's *in place* (the file the destination QEMU already maps: open r+b, overwrite,
    no truncation; this is the step vmmig is meant to do); ``migrate`` the source (only device state travels);
    wait for ``completed`` on the source and for the destination to leave ``inmigrate``; ``cont`` the destination.
    Asserts: the heartbeat numbers of the source log followed by the destination log are consecutive (the
    destination resumes at the source's last n + 1, with no reboot), the destination's heartbeats
    and only ``DATA OK`` (>= 3 of them) over >= 10 s of its own uptime while watched for ``--observe``
    seconds, and the source ends in ``postmigrate``.

``failure``
    As ``handoff`` up to the copy, then SIGKILL the destination QEMU; ``migrate`` the source anyway (it must fail
    fast: connection refused), ``cont`` the source and assert that its heartbeats go on from where they stopped
    with ``DATA OK``.

``dest-after``
    Experiment: copy the stopped source's RAM into a NEW destination file first and start the destination QEMU only
    then (the order a receiver that writes ``DEST.partial`` and renames it would need). Same assertions as
    ``handoff``: shows whether the destination QEMU's own start-up (reset, ROM loading) leaves guest RAM alone.

``rename``
    Experiment expected to FAIL the handoff: like ``handoff``, but the copy is written to ``RAM.partial`` and renamed
    over the destination's RAM file, as ``vmmig recv`` does today. The destination QEMU keeps mapping the old,
    replaced inode, so the guest resumes on the wrong memory. This scenario passes when the handoff breaks.

Usage::

    examples/qemu/build_guest.sh                         # once: kernel + initramfs in examples/qemu/build/
    .venv/bin/python examples/qemu/migrate_qemu_only.py [--scenarios handoff,failure,dest-after,rename]
        [--write-mb N] [--observe 14] [--workdir DIR] [--ram-dir /dev/shm] [--json FILE] [--keep]

Exits 0 when every scenario passed. Prints a summary with the timings: boot (QEMU start -> ``HEARTBEAT 3``),
downtime (``stop`` sent -> ``cont`` returned) with its parts, and the bytes QEMU sent (``query-migrate``
``ram.transferred``).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from run_guest import (
    GuestProcess,
    Qmp,
    data_checks,
    heartbeat_times,
    heartbeats,
    partial_tail,
    start_guest,
    wait_for_line,
)

BOOT_TIMEOUT = 180.0
MIN_OBSERVED_GUEST_S = 10.0  # the resumed guest must run at least this long (its own uptime) with DATA OK
MIGRATE_TIMEOUT = 60.0
COPY_CHUNK = 16 * 1024 * 1024


class CheckFailed(AssertionError):
    pass


def check(cond: bool, what: str) -> None:
    if not cond:
        raise CheckFailed(what)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def copy_in_place(src: Path, dst: Path) -> int:
    """Overwrite the existing file ``dst`` with ``src`` without truncating or replacing it (same inode)."""
    size = src.stat().st_size
    check(dst.stat().st_size == size, f"{dst} is {dst.stat().st_size} bytes, {src} is {size}")
    buf = bytearray(COPY_CHUNK)
    view = memoryview(buf)
    done = 0
    with open(src, "rb", buffering=0) as fi, open(dst, "r+b", buffering=0) as fo:
        while (n := fi.readinto(buf)) > 0:
            fo.write(view[:n])
            done += n
    return done


def copy_new_file(src: Path, dst: Path) -> int:
    """Write ``src`` to ``dst`` as a brand-new file (``dst.partial`` then rename), like ``vmmig recv``."""
    partial = dst.with_name(dst.name + ".partial")
    with contextlib.suppress(FileNotFoundError):
        partial.unlink()
    partial.touch()
    os.truncate(partial, src.stat().st_size)
    n = copy_in_place(src, partial)
    os.rename(partial, dst)
    return n


def differing_pages(a: Path, b: Path, page: int = 4096) -> list[int]:
    """Indices of the ``page``-sized pages that differ between two equally long files."""
    diff: list[int] = []
    with open(a, "rb") as fa, open(b, "rb") as fb:
        base = 0
        while True:
            ca, cb = fa.read(COPY_CHUNK), fb.read(COPY_CHUNK)
            if not ca and not cb:
                return diff
            if ca != cb:
                offsets = range(0, max(len(ca), len(cb)), page)
                diff += [(base + o) // page for o in offsets if ca[o : o + page] != cb[o : o + page]]
            base += len(ca)


def wait_until(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.02) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def status(q: Qmp) -> str:
    s: str = q.execute("query-status")["status"]
    return s


def set_ignore_shared(q: Qmp) -> None:
    q.execute("migrate-set-capabilities", capabilities=[{"capability": "x-ignore-shared", "state": True}])


def poll_migration(q: Qmp, timeout: float = MIGRATE_TIMEOUT) -> dict[str, Any]:
    """query-migrate on the source until completed or failed; returns the last answer."""

    def done() -> dict[str, Any] | None:
        info: dict[str, Any] = q.execute("query-migrate")
        return info if info.get("status") in ("completed", "failed", "cancelled") else None

    result: dict[str, Any] = wait_until(done, timeout, "query-migrate to finish")
    return result


def boot(workdir: Path, ram: Path, name: str, write_mb: int) -> tuple[GuestProcess, float]:
    g = start_guest(workdir, ram, "source", write_mb, name=name)
    wait_for_line(g.serial_log, r"^HEARTBEAT 3 ", BOOT_TIMEOUT, proc=g)
    return g, time.monotonic() - g.started


def continuity(src_log: Path, dest_log: Path | None = None) -> dict[str, Any]:
    """Heartbeats of the source log and, if given, the destination log read as ONE console stream.

    A line the guest was printing when it was stopped is split between the two files; concatenating the bytes
    rejoins it, so the combined sequence must be exactly 1, 2, 3, ... with no gap and no restart.
    """
    src_bytes = src_log.read_bytes()
    dest_bytes = dest_log.read_bytes() if dest_log is not None else b""
    combined = src_log.with_name(src_log.name + ".combined")
    combined.write_bytes(src_bytes + dest_bytes)
    all_hb = heartbeats(combined)
    src_hb = heartbeats(src_log)
    return {
        "src_last": src_hb[-1] if src_hb else None,
        "split_line": partial_tail(src_log) if dest_log is not None else "",
        "heartbeats_total": len(all_hb),
        "consecutive": all_hb == list(range(1, len(all_hb) + 1)),
        "restarts": sum(1 for a, b in itertools.pairwise(all_hb) if b <= a),
    }


def observe(g: GuestProcess, seconds: float, after: int) -> dict[str, Any]:
    """Watch ``g`` for ``seconds``; returns its new heartbeats (those > after) and data checks."""
    time.sleep(seconds)
    check(g.alive(), f"{g.role} QEMU died: {g.stderr_text()}")
    hb = [(n, t) for n, t in heartbeat_times(g.serial_log) if n > after]
    checks = data_checks(g.serial_log)
    new_checks = [c for c in checks if c[1] > after]
    return {
        "new_heartbeats": [n for n, _ in hb],
        "guest_seconds": round(hb[-1][1] - hb[0][1], 2) if hb else 0.0,
        "data_ok": sum(1 for c in new_checks if c[0] == "OK"),
        "data_bad": sum(1 for c in new_checks if c[0] == "BAD"),
    }


@contextlib.contextmanager
def guests() -> Iterator[list[GuestProcess]]:
    procs: list[GuestProcess] = []
    try:
        yield procs
    finally:
        for g in procs:
            g.kill()


def scenario_handoff(
    workdir: Path, ram_dir: Path, write_mb: int, observe_s: float, mode: str = "handoff", verify_ram: bool = True
) -> dict[str, Any]:
    """mode: 'handoff' (copy in place), 'rename' (copy to .partial + rename), 'dest-after' (start dest after copy)."""
    tag = {"handoff": "h", "rename": "r", "dest-after": "a"}[mode]
    src_ram = ram_dir / f"vmmig-qemu-{os.getpid()}-{tag}-src.ram"
    dst_ram = ram_dir / f"vmmig-qemu-{os.getpid()}-{tag}-dst.ram"
    res: dict[str, Any] = {"scenario": mode, "write_mb": write_mb, "src_ram": str(src_ram), "dst_ram": str(dst_ram)}
    port = free_port()
    uri = f"tcp:127.0.0.1:{port}"
    procs_seen: list[GuestProcess] = []
    try:
        with guests() as procs:
            procs_seen = procs
            src, boot_s = boot(workdir, src_ram, f"{tag}-source", write_mb)
            procs.append(src)
            res["boot_s"] = round(boot_s, 2)
            sq = src.qmp()
            set_ignore_shared(sq)

            def start_dest() -> tuple[GuestProcess, Qmp]:
                d = start_guest(workdir, dst_ram, "dest", write_mb, name=f"{tag}-dest")
                procs.append(d)
                dq = d.qmp()
                check(status(dq) == "inmigrate", f"destination status {status(dq)}, expected inmigrate")
                set_ignore_shared(dq)
                dq.execute("migrate-incoming", uri=uri)
                return d, dq

            if mode != "dest-after":
                dst, dq = start_dest()
            time.sleep(1.5)  # let a few more heartbeats (and, with --write-mb, dirtying) happen

            t_stop = time.monotonic()
            sq.execute("stop")
            t_stopped = time.monotonic()
            if mode in ("rename", "dest-after"):  # a new file (.partial + rename), as vmmig recv writes it
                copied = copy_new_file(src_ram, dst_ram)
            else:
                copied = copy_in_place(src_ram, dst_ram)
            t_copied = time.monotonic()
            if mode == "dest-after":
                dst, dq = start_dest()
            t_dest_up = time.monotonic()
            sq.execute("migrate", uri=uri)
            info = poll_migration(sq)
            t_migrated = time.monotonic()
            ram = info.get("ram", {})
            res.update(
                migrate_status=info.get("status"),
                copied_bytes=copied,
                ram_transferred=ram.get("transferred"),
                ram_total=ram.get("total"),
                ram_normal_pages=ram.get("normal"),
                ram_duplicate_pages=ram.get("duplicate"),
                qemu_downtime_ms=info.get("downtime"),
                qemu_total_time_ms=info.get("total-time"),
            )
            check(info["status"] == "completed", f"source migration {info['status']}: {info.get('error-desc')}")
            dest_state = wait_until(lambda: (s := status(dq)) != "inmigrate" and s, MIGRATE_TIMEOUT, "dest")
            t_dest_ready = time.monotonic()
            res["dest_status_after_migration"] = dest_state
            excluded = 0.0
            if verify_ram:  # did the destination QEMU write into guest RAM while starting or loading device state?
                t_verify = time.monotonic()
                diff = differing_pages(src_ram, dst_ram)
                res["ram_pages_differing_before_cont"] = len(diff)
                res["ram_differing_page_numbers"] = diff[:32]
                excluded = time.monotonic() - t_verify  # the comparison is not part of the downtime
                res["ram_compare_s"] = round(excluded, 3)
            dq.execute("cont")
            t_cont = time.monotonic()
            res.update(
                downtime_s=round(t_cont - t_stop - excluded, 3),
                downtime_parts_s={
                    "stop": round(t_stopped - t_stop, 3),
                    "copy_ram": round(t_copied - t_stopped, 3),
                    "start_dest": round(t_dest_up - t_copied, 3),
                    "migrate_device_state": round(t_migrated - t_dest_up, 3),
                    "dest_leaves_inmigrate": round(t_dest_ready - t_migrated, 3),
                    "cont": round(t_cont - t_dest_ready - excluded, 3),
                },
            )
            res["source_status"] = status(sq)
            src_last = heartbeats(src.serial_log)[-1]
            obs = observe(dst, observe_s, after=0)
            res["dest_status"] = status(dq)
            res.update(continuity(src.serial_log, dst.serial_log))
            new = obs["new_heartbeats"]
            res["dest_first_heartbeat"] = new[0] if new else None
            res["dest_heartbeats"] = len(new)
            res["dest_guest_seconds"] = obs["guest_seconds"]
            res["dest_data_ok"] = obs["data_ok"]
            res["dest_data_bad"] = obs["data_bad"]
            sq.close()
            dq.close()
            checks_ok = (
                res["consecutive"]
                and res["restarts"] == 0
                and new
                and new[0] in (src_last + 1, src_last + 2)
                and obs["guest_seconds"] >= MIN_OBSERVED_GUEST_S
                and obs["data_ok"] >= 3
                and obs["data_bad"] == 0
                and res["source_status"] == "postmigrate"
                and res["dest_status"] == "running"
            )
            res["handoff_worked"] = bool(checks_ok)
            res["passed"] = (not checks_ok) if mode == "rename" else bool(checks_ok)
    except (CheckFailed, TimeoutError, RuntimeError, OSError) as exc:
        res["error"] = f"{type(exc).__name__}: {exc}"
        for g in procs_seen:
            if g.popen.poll() is not None and (err := g.stderr_text().strip()):
                res["error"] += f"; {g.role} QEMU exited {g.popen.returncode}: {err}"
        res["handoff_worked"] = False
        res["passed"] = mode == "rename"
    finally:
        for p in (src_ram, dst_ram):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    return res


def scenario_failure(workdir: Path, ram_dir: Path, write_mb: int, observe_s: float) -> dict[str, Any]:
    src_ram = ram_dir / f"vmmig-qemu-{os.getpid()}-f-src.ram"
    dst_ram = ram_dir / f"vmmig-qemu-{os.getpid()}-f-dst.ram"
    res: dict[str, Any] = {"scenario": "failure", "write_mb": write_mb}
    uri = f"tcp:127.0.0.1:{free_port()}"
    try:
        with guests() as procs:
            src, boot_s = boot(workdir, src_ram, "f-source", write_mb)
            procs.append(src)
            res["boot_s"] = round(boot_s, 2)
            sq = src.qmp()
            set_ignore_shared(sq)
            dst = start_guest(workdir, dst_ram, "dest", write_mb, name="f-dest")
            procs.append(dst)
            dq = dst.qmp()
            set_ignore_shared(dq)
            dq.execute("migrate-incoming", uri=uri)
            time.sleep(1.5)

            t_stop = time.monotonic()
            sq.execute("stop")
            copy_in_place(src_ram, dst_ram)
            dq.close()
            res["dest_exit"] = dst.kill()  # SIGKILL: the destination host dies
            src_last = heartbeats(src.serial_log)[-1]
            res["src_last_before_stop"] = src_last
            sq.execute("migrate", uri=uri)
            info = poll_migration(sq)
            res["migrate_status"] = info.get("status")
            res["migrate_error"] = info.get("error-desc")
            res["status_after_failed_migrate"] = status(sq)
            sq.execute("cont")
            t_cont = time.monotonic()
            res["paused_s"] = round(t_cont - t_stop, 3)
            res["status_after_cont"] = status(sq)
            obs = observe(src, observe_s, after=src_last)
            res.update(continuity(src.serial_log))
            new = obs["new_heartbeats"]
            res["resumed_first_heartbeat"] = new[0] if new else None
            res["resumed_heartbeats"] = len(new)
            res["resumed_guest_seconds"] = obs["guest_seconds"]
            res["resumed_data_ok"] = obs["data_ok"]
            res["resumed_data_bad"] = obs["data_bad"]
            sq.close()
            res["passed"] = bool(
                res["migrate_status"] == "failed"
                and res["status_after_cont"] == "running"
                and res["consecutive"]
                and new
                and new[0] == src_last + 1
                and obs["guest_seconds"] >= MIN_OBSERVED_GUEST_S
                and obs["data_ok"] >= 3
                and obs["data_bad"] == 0
            )
    except (CheckFailed, TimeoutError, RuntimeError, OSError) as exc:
        res["error"] = f"{type(exc).__name__}: {exc}"
        res["passed"] = False
    finally:
        for p in (src_ram, dst_ram):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    return res


def summarize(r: dict[str, Any]) -> str:
    g = r.get
    verdict = "PASS" if g("passed") else "FAIL"
    if r["scenario"] == "failure":
        parts = [
            f"[{verdict}] failure (write_mb={g('write_mb')}): boot {g('boot_s')}s; destination SIGKILLed",
            f"migrate -> {g('migrate_status')} ({g('migrate_error')})",
            f"source {g('status_after_failed_migrate')} -> cont -> {g('status_after_cont')} (paused {g('paused_s')}s)",
            f"heartbeats: last before stop {g('src_last_before_stop')}, first after cont {g('resumed_first_heartbeat')}"
            f", {g('resumed_heartbeats')} more over {g('resumed_guest_seconds')} guest s, "
            f"consecutive={g('consecutive')}",
            f"DATA OK x{g('resumed_data_ok')}, BAD x{g('resumed_data_bad')}",
        ]
    else:
        parts = [
            f"[{verdict}] {r['scenario']} (write_mb={g('write_mb')}): boot {g('boot_s')}s; "
            f"handoff_worked={g('handoff_worked')}",
            f"heartbeats: source last {g('src_last')}, destination first {g('dest_first_heartbeat')} "
            f"(split line {g('split_line')!r}), {g('dest_heartbeats')} on the destination over "
            f"{g('dest_guest_seconds')} guest s, consecutive={g('consecutive')}, restarts={g('restarts')}",
            f"DATA OK x{g('dest_data_ok')}, BAD x{g('dest_data_bad')}",
            f"source {g('source_status')}, destination {g('dest_status')}; RAM files differ in "
            f"{g('ram_pages_differing_before_cont')} pages before cont {g('ram_differing_page_numbers')}",
            f"downtime {g('downtime_s')}s {g('downtime_parts_s')}",
            f"QEMU sent {g('ram_transferred')} bytes (ram.total {g('ram_total')}, QEMU's downtime "
            f"{g('qemu_downtime_ms')} ms)",
        ]
    if "error" in r:
        parts = [p for p in parts if "None" not in p]  # the steps the run did not reach
        parts.append(f"error: {r['error']}")
    return "\n    ".join(parts)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--scenarios", default="handoff,failure", help="comma-separated: handoff,failure,dest-after,rename")
    ap.add_argument("--write-mb", type=int, default=0, help="guest dirties this many MiB/s (vmmig_write_mb)")
    ap.add_argument("--observe", type=float, default=14.0, help="seconds to watch the resumed guest")
    ap.add_argument("--workdir", type=Path, help="logs and sockets (default: a new directory under /tmp)")
    ap.add_argument("--ram-dir", type=Path, default=Path("/dev/shm"), help="where the RAM files go")
    ap.add_argument("--no-verify-ram", action="store_true", help="skip comparing the RAM files before cont")
    ap.add_argument("--json", type=Path, help="also write the results as JSON here")
    args = ap.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="vmmig-qemu-"))
    workdir.mkdir(parents=True, exist_ok=True)
    names = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    unknown = set(names) - {"handoff", "failure", "dest-after", "rename"}
    if unknown:
        ap.error(f"unknown scenarios: {', '.join(sorted(unknown))}")
    print(f"workdir {workdir} (serial logs, QMP sockets, QEMU stderr)", flush=True)
    results = []
    for name in names:
        t0 = time.monotonic()
        if name == "failure":
            r = scenario_failure(workdir, args.ram_dir, args.write_mb, args.observe)
        else:
            r = scenario_handoff(
                workdir, args.ram_dir, args.write_mb, args.observe, mode=name, verify_ram=not args.no_verify_ram
            )
        r["wall_s"] = round(time.monotonic() - t0, 1)
        results.append(r)
        print(summarize(r), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    passed = sum(1 for r in results if r.get("passed"))
    print(f"{passed} passed, {len(results) - passed} failed")
    return 0 if passed == len(results) else 1


if __name__ == "__main__":
    sys.exit(main())
