"""`vmmig save` and `vmmig restore`: a guest's memory to a snapshot file and back (docs/SNAPSHOT.md)."""

from __future__ import annotations

import json
import sys

import click

from ..wire import codec as codecs
from .app import main
from .command import Command
from .params import (
    DURATION,
    TIMEOUT,
    compress_threads_option,
    decompress_threads_option,
    execute,
    level_option,
    page_size_opt,
    sparse_option,
)


@main.command()
@click.argument("image", metavar="IMAGE")
@click.argument("file", metavar="FILE")
@click.option(
    "--compress",
    "codec",
    type=click.Choice(codecs.names()),
    default=codecs.DEFAULT_CODEC,
    show_default=True,
    help="Codec for page batches; a batch that does not shrink is stored raw whatever the codec.",
)
@level_option
@compress_threads_option
@page_size_opt
@click.option("--force", is_flag=True, help="Replace an existing FILE and remove a leftover FILE.partial.")
@click.option(
    "--base",
    default=None,
    metavar="OLD",
    help="Incremental: store only the pages whose fingerprints differ from the snapshot OLD's; FILE records OLD's "
    "digest and its path relative to FILE, and restore needs OLD.",
)
@click.option(
    "--live",
    is_flag=True,
    help="Save while the guest runs: pre-copy passes as `send --live`, each appending the pages that changed, then "
    "pause for the last ones. Needs --pause-pid, --qmp or --pause-cmd.",
)
@click.option("--pause-pid", type=int, default=None, metavar="PID", help="Pause the guest process with SIGSTOP.")
@click.option("--qmp", type=click.Path(), default=None, metavar="SOCKET", help="Pause a QEMU guest with QMP stop.")
@click.option(
    "--qemu-handoff",
    is_flag=True,
    help="With --qmp: IMAGE is the QEMU's shared RAM; also store its device state (QEMU's migrate with "
    "x-ignore-shared, taken after the last pages), so that `restore --qmp` runs the guest on.",
)
@click.option("--pause-cmd", default=None, metavar="CMD", help="Shell command that pauses the guest.")
@click.option("--unpause-cmd", default=None, metavar="CMD", help="Shell command that resumes the guest.")
@click.option(
    "--hook-timeout", type=TIMEOUT, default="30s", show_default=True, help="Bound on the hooks and QMP replies."
)
@click.option(
    "--leave-running", is_flag=True, help="Resume the guest once FILE is published (default: it stays paused)."
)
@click.option(
    "--downtime-limit",
    type=DURATION,
    default="300ms",
    show_default=True,
    help="--live: pause once the expected time to write the last pages fits this.",
)
@click.option(
    "--max-passes", type=click.IntRange(min=1), default=30, show_default=True, help="--live: passes before "
    "--on-no-converge applies.",
)  # fmt: skip
@click.option("--max-time", type=DURATION, default=None, help="--live: time before --on-no-converge applies.")
@click.option(
    "--on-no-converge",
    type=click.Choice(["abort", "switchover"]),
    default="abort",
    show_default=True,
    help="--live: abort (exit 10, the guest keeps running, no FILE) or pause anyway.",
)
@click.option("--json", "json_output", is_flag=True, help="Print one final JSON report on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No summary line (errors still print).")
@click.option("--debug", is_flag=True, help="Show tracebacks with errors.")
def save(
    image: str,
    file: str,
    codec: str,
    level: int | None,
    threads: int | None,
    page_size: int,
    force: bool,
    base: str | None,
    live: bool,
    pause_pid: int | None,
    qmp: str | None,
    qemu_handoff: bool,
    pause_cmd: str | None,
    unpause_cmd: str | None,
    hook_timeout: float,
    leave_running: bool,
    downtime_limit: float,
    max_passes: int,
    max_time: float | None,
    on_no_converge: str,
    json_output: bool,
    quiet: bool,
    debug: bool,
) -> None:
    """Save the memory image IMAGE to the snapshot FILE: compressed frames, each page's fingerprint, an index and
    the image digest (docs/SNAPSHOT.md). Zero pages take no room.

    Without a pause option IMAGE must not change while it is saved (a stopped guest, or a copy). With --pause-pid,
    --qmp or pause hooks the guest is paused for the copy (stop-and-copy) or, with --live, only for the last pages;
    it stays paused afterwards unless --leave-running. FILE is written as FILE.partial (created new) and renamed to
    FILE only once complete, synced and read back; an existing FILE is kept unless --force.

    \b
    Examples:
      vmmig save /dev/shm/vm.ram vm.snap --compress zstd
      vmmig save --live /dev/shm/vm.ram vm.snap --pause-pid 4242 --leave-running
      vmmig save /dev/shm/vm.ram vm-2.snap --base vm.snap
      vmmig save --live /dev/shm/vm.ram vm.snap --qmp /run/vm.qmp --qemu-handoff
      vmmig restore vm.snap /dev/shm/vm.ram
    """
    if level is not None:
        try:
            allowed = codecs.by_name(codec).levels
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
        if level not in allowed:
            raise click.UsageError(f"--level {level} is outside {allowed.start}..{allowed.stop - 1} for {codec}")
    if (pause_cmd is None) != (unpause_cmd is None):
        raise click.UsageError("--pause-cmd and --unpause-cmd go together")
    pausers = sum(x is not None for x in (pause_pid, qmp, pause_cmd))
    if pausers > 1:
        raise click.UsageError("give one of --pause-pid, --qmp, --pause-cmd")
    if (live or leave_running) and not pausers:
        raise click.UsageError("--live and --leave-running need --pause-pid, --qmp or --pause-cmd/--unpause-cmd")
    if qemu_handoff and qmp is None:
        raise click.UsageError("--qemu-handoff needs --qmp")

    def call() -> None:
        from ..cpus import usable_cpus
        from ..guest.pause import make_pauser
        from ..sender.precopy import ConvergencePolicy
        from ..snapshot.passes import LivePlan
        from ..snapshot.writer import SaveOptions
        from ..snapshot.writer import save as run
        from ..units import format_bytes

        pauser = make_pauser(pause_pid, qmp, pause_cmd, unpause_cmd, hook_timeout)
        kind = pauser.kind if pauser is not None else "pid"
        plan = LivePlan(live, ConvergencePolicy(downtime_limit, max_passes, max_time), on_no_converge == "abort", kind)
        options = SaveOptions(
            image, file, codec, level, threads or usable_cpus(), page_size, force, pauser, plan, leave_running, base,
            qemu_handoff,
        )  # fmt: skip
        report = run(options)
        if json_output:
            print(json.dumps({"outcome": "saved", **report.__dict__}, indent=2))
        elif not quiet:
            rate = report.image_bytes / max(report.seconds, 1e-9)
            qemu_state = f"device state {format_bytes(report.device_state_bytes)}, " if qemu_handoff else ""
            print(
                f"vmmig save: {image} → {file}: {format_bytes(report.image_bytes)} in {format_bytes(report.file_bytes)}"
                f" ({report.zero_pages} of {report.pages} pages zero), codec {report.codec}:{report.level}, "
                f"{report.passes} pass{'es' if report.passes != 1 else ''}, {report.pages_stored} pages stored, "
                f"guest {'paused' if report.paused else 'running'}, {qemu_state}"
                f"{report.seconds:.2f} s, {format_bytes(rate)}/s",
                file=sys.stderr,
            )

    execute("save", debug, call)


@main.command(cls=Command, usage_args="FILE (DEST | --check)")
@click.argument("file", metavar="FILE")
@click.argument("dest", metavar="DEST", required=False)
@click.option("--check", is_flag=True, help="Verify FILE completely without writing anything (no DEST).")
@click.option(
    "--in-place",
    is_flag=True,
    help="Write into an existing DEST (file, memfd /proc/PID/fd/N, block device) of exactly the image size: no "
    "DEST.partial, no rename; on failure DEST is left modified (exit 13).",
)
@click.option("--force", is_flag=True, help="Overwrite an existing DEST and remove a leftover DEST.partial.")
@sparse_option
@click.option(
    "--base-dir",
    type=click.Path(file_okay=False),
    default=None,
    metavar="DIR",
    help="Look for an incremental FILE's bases in DIR (where they moved) instead of where FILE records them.",
)
@click.option(
    "--qmp",
    type=click.Path(),
    default=None,
    metavar="SOCKET",
    help="DEST is the RAM of a QEMU started with -incoming defer (needs --in-place): check it, restore the RAM, "
    "feed it the device state FILE holds (save --qemu-handoff) and run the guest.",
)
@decompress_threads_option
@click.option("--json", "json_output", is_flag=True, help="Print one final JSON report on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No summary line (errors still print).")
@click.option("--debug", is_flag=True, help="Show tracebacks with errors.")
def restore(
    file: str,
    dest: str | None,
    check: bool,
    in_place: bool,
    force: bool,
    sparse: bool,
    base_dir: str | None,
    qmp: str | None,
    threads: int | None,
    json_output: bool,
    quiet: bool,
    debug: bool,
) -> None:
    """Restore the snapshot FILE into DEST, or verify it with --check.

    Every frame is checked as it is read, every page against its fingerprint as it lands, and the image digest
    at the end; DEST is written as DEST.partial and renamed only then. A truncated or foreign FILE is exit 3, a
    corrupt one exit 7, each naming the frame and its file offset; nothing is published.

    With --qmp, DEST is the RAM of a QEMU started with -incoming defer: it is checked before any page is written,
    and once the RAM is verified QEMU gets the device state FILE holds (save --qemu-handoff) and the guest runs on.

    \b
    Examples:
      vmmig restore vm.snap /dev/shm/vm.ram
      vmmig restore --check vm.snap
      vmmig restore vm.snap /dev/shm/new.ram --in-place --qmp /run/new.qmp
    """
    if check == (dest is not None):
        raise click.UsageError("give DEST, or --check without DEST")
    if check and (in_place or force or sparse):
        raise click.UsageError("--check writes nothing: --in-place, --force and --sparse do not apply")
    if in_place and sparse:
        raise click.UsageError("--sparse allocates a new DEST: it does not apply with --in-place")
    if qmp is not None and not in_place:
        raise click.UsageError("--qmp restores into a QEMU's RAM: it needs DEST and --in-place")

    def call() -> None:
        from ..cpus import usable_cpus
        from ..snapshot.restore import RestoreOptions
        from ..snapshot.restore import restore as run
        from ..units import format_bytes

        report = run(RestoreOptions(file, dest, threads or usable_cpus(), in_place, force, sparse, base_dir, qmp))
        outcome = "verified" if dest is None else "running" if qmp is not None else "restored"
        if json_output:
            print(json.dumps({"outcome": outcome, **report.__dict__}, indent=2))
        elif not quiet:
            rate = report.image_bytes / max(report.seconds, 1e-9)
            target = f" → {dest}" if dest is not None else ""
            print(
                f"vmmig restore: {file}{target}: {outcome}, {format_bytes(report.image_bytes)} "
                f"({report.frames} frames), codec {report.codec}, {report.seconds:.2f} s, {format_bytes(rate)}/s",
                file=sys.stderr,
            )

    execute("restore", debug, call)
