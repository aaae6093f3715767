"""`vmmig send`: options parsed into the library's options object, then the library runs."""

from __future__ import annotations

import click
from click.core import ParameterSource

from ..sender.options import DEFAULT_BATCH_SIZE
from ..wire import codec as codecs
from .app import main
from .params import (
    DURATION,
    RATE,
    SIZE,
    TIMEOUT,
    compress_threads_option,
    execute,
    level_option,
    libvirt_uri_option,
    page_size_opt,
    tls_options,
    with_common,
)


@main.command()
@click.argument("source", metavar="IMAGE")
@click.argument("destination", metavar="DESTINATION")
@click.option(
    "--compress",
    "codec",
    type=click.Choice([*codecs.names(), "auto"]),
    default=codecs.DEFAULT_CODEC,
    show_default=True,
    help="Codec for page batches; a batch that does not shrink is sent raw whatever the codec. 'auto': zlib, "
    "but each batch goes raw when measurement says compressing it costs more than it saves.",
)
@level_option
@compress_threads_option
@click.option(
    "--max-bandwidth",
    type=RATE,
    default="0",
    show_default=True,
    help="Cap on wire bytes per second, e.g. 350M or 100MiB, or in bits 1Gbit; 0 or 'unlimited' for none.",
)
@page_size_opt
@click.option(
    "--batch-size",
    type=SIZE,
    default=None,
    help="Bytes of pages per batch: the unit of compression and framing.  "
    f"[default: {DEFAULT_BATCH_SIZE >> 20}MiB, down to 1MiB with more than 8 --compress-threads; with --resume, "
    "the interrupted session's]",
)
@click.option(
    "--channels",
    type=click.IntRange(min=1, max=16),
    default=1,
    show_default=True,
    help="TCP connections for this migration (like QEMU's multifd); batches spread over them, one cap for all.",
)
@click.option(
    "--connect-timeout",
    type=TIMEOUT,
    default="10s",
    show_default=True,
    help="Keep retrying the connection this long (the receiver may start later).",
)
@click.option(
    "--progress-timeout",
    type=TIMEOUT,
    default=None,
    help="Give up when no page is sent and no pass ends for this long, keepalives or not (a receiver that takes "
    "no data, a wedged source; any time counts, a pause step or a scan between passes too): exit 17, the guest "
    "resumed, the session kept for --resume, and --retries does not retry it. [default: off]",
)
@click.option(
    "--live",
    is_flag=True,
    help="Live migration: copy while the guest runs, re-send changed pages pass after pass, then pause it "
    "for the last pages. Needs --pause-pid, --qmp or --pause-cmd.",
)
@click.option(
    "--pause-pid",
    type=int,
    default=None,
    metavar="PID",
    help="Pause the guest process with SIGSTOP/SIGCONT. Without --live: stop-and-copy.",
)
@click.option(
    "--qmp",
    type=click.Path(),
    default=None,
    metavar="SOCKET",
    help="Pause a QEMU guest with QMP stop/cont on this monitor socket (preferred for QEMU).",
)
@click.option("--pause-cmd", default=None, metavar="CMD", help="Shell command that pauses the guest.")
@click.option("--unpause-cmd", default=None, metavar="CMD", help="Shell command that resumes the guest.")
@click.option(
    "--hook-timeout",
    type=TIMEOUT,
    default="30s",
    show_default=True,
    help="Bound on --pause-cmd/--unpause-cmd and on QMP replies.",
)
@click.option(
    "--dirty-tracking",
    type=click.Choice(["fingerprint", "soft-dirty"]),
    default="fingerprint",
    show_default=True,
    help="How changed pages are found: 'fingerprint' hashes every page each pass (any mapping); 'soft-dirty' is "
    "EXPERIMENTAL (needs --pause-pid and kernel support; falls back to fingerprint with a notice).",
)
@click.option(
    "--downtime-limit",
    type=DURATION,
    default="300ms",
    show_default=True,
    help="Switch over once the expected downtime fits this.",
)
@click.option(
    "--max-passes",
    type=click.IntRange(min=1),
    default=30,
    show_default=True,
    help="Passes before --on-no-converge applies.",
)
@click.option("--max-time", type=DURATION, default=None, help="Time before --on-no-converge applies [default: none].")
@click.option(
    "--on-no-converge",
    type=click.Choice(["abort", "switchover"]),
    default="abort",
    show_default=True,
    help="abort: the guest keeps running and DEST is not published (exit 10); switchover: pause anyway.",
)
@click.option(
    "--qemu-handoff",
    is_flag=True,
    help="QEMU mode (with --qmp): after the RAM is verified, hand the VM over with QEMU's own migration of its "
    "device state (x-ignore-shared); the receiver, started with --qmp --in-place, resumes it there.",
)
@click.option(
    "--auto-converge",
    is_flag=True,
    help="Throttle the guest (20%, +10% a pass, max 99%) while its dirty rate outruns the link: with --pause-pid "
    "a SIGSTOP/SIGCONT duty cycle over 100 ms; with --qmp a CPU quota on QEMU's vCPU threads alone (cgroup "
    "vmmig-PID; QEMU never stops; without the rights to make the cgroup: exit 14).",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue the interrupted migration of IMAGE to DESTINATION (after a dropped link or a killed vmmig): "
    "only pages the receiver lacks or that changed since are sent. Same image and options required.",
)
@click.option(
    "--retries",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="After a link fault (lost connection, silence, corrupted frame), reconnect and resume up to N times.",
)
@click.option("--retry-delay", type=DURATION, default="2s", show_default=True, help="Wait this long before each retry.")
@click.option(
    "--state-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Where the session is recorded for --resume [default: $XDG_STATE_HOME/vmmig/send-<hash>.json, "
    "~/.local/state without XDG_STATE_HOME].",
)
@click.option(
    "--bind",
    default=None,
    metavar="ADDR",
    help="Local address to connect from (HOST or HOST:PORT; a dedicated migration network). TCP only.",
)
@libvirt_uri_option
@with_common
def send(
    source: str,
    destination: str,
    codec: str,
    level: int | None,
    threads: int | None,
    max_bandwidth: int | None,
    page_size: int,
    batch_size: int | None,
    channels: int,
    connect_timeout: float,
    progress_timeout: float | None,
    live: bool,
    pause_pid: int | None,
    qmp: str | None,
    pause_cmd: str | None,
    unpause_cmd: str | None,
    hook_timeout: float,
    dirty_tracking: str,
    downtime_limit: float,
    max_passes: int,
    max_time: float | None,
    on_no_converge: str,
    qemu_handoff: bool,
    auto_converge: bool,
    resume: bool,
    retries: int,
    retry_delay: float,
    state_file: str | None,
    bind: str | None,
    libvirt_uri: str | None,
    io_timeout: float,
    json_output: bool,
    quiet: bool,
    debug: bool,
    verbose: bool,
    tls_dir: str | None,
    tls_host: str | None,
    tls_cert: str | None,
    tls_key: str | None,
    tls_ca: str | None,
    tls_peer_name: str | None,
    handshake_timeout: float,
    control: str | None,
    stats_path: str | None,
    metrics_path: str | None,
) -> None:
    """Send the memory image IMAGE to a `vmmig recv` at DESTINATION: HOST:PORT, unix:PATH, or exec:COMMAND (run
    COMMAND, e.g. `ssh dsthost vmmig recv --stdio DEST`, and migrate through its standard input and output; its
    stderr is relayed here, prefixed with the host; one channel; the command runs without a terminal, so ssh must
    authenticate by key or agent).

    IMAGE is a regular file (e.g. /dev/shm/vm.ram behind QEMU's memory-backend-file), a hugetlbfs file, a memfd
    as /proc/PID/fd/N, or a block device. It is mapped read-only, never read whole into memory. Zero pages are
    skipped; other pages are copied out, compressed in worker threads and streamed in self-contained batches.

    IMAGE may also be snapshot:FILE, a file `vmmig save` wrote (with its bases, if incremental): its frames go as
    stored, each checked first (a damaged one: exit 7, never retried), without recompressing, unless --compress
    names another codec (then FILE is decompressed once into memory and sent as an image). The pause, live and
    tracking options do not apply to it.

    IMAGE may also be libvirt:DOMAIN, a QEMU guest libvirt runs on this host (--libvirt-uri): vmmig finds its RAM
    (a shared memfd or file backend, said on stderr) and pauses it through libvirt; with --qemu-handoff libvirt's
    QEMU hands the device state over, and once the destination runs the source domain is destroyed through
    libvirt, so that it can never be resumed beside the new copy (docs/LIBVIRT.md).

    Without --live the image must not change while it is sent: a final re-scan fails the run otherwise. With a
    pause option and no --live, the guest is paused first (stop-and-copy). With --live it keeps running until the
    rest fits --downtime-limit. After success a paused guest stays paused (the destination holds its memory);
    after a failure it is resumed, except when the verdict was lost in transit (exit 11).

    A link fault after the receiver accepted the session leaves it resumable: the receiver keeps DEST.partial and
    waits (recv --resume-window), and `vmmig send --resume` with the same arguments sends only what is missing or
    changed; --retries does that automatically. A live guest paused for the switchover is resumed at once and
    the resumed session starts again in pre-copy.

    \b
    Examples:
      vmmig send /dev/shm/vm.ram desthost:4444
      vmmig send /dev/shm/vm.ram 'exec:ssh desthost vmmig recv --stdio /dev/shm/vm.ram'
      vmmig send /dev/shm/vm.ram unix:/run/vmmig.sock
      vmmig send /proc/4242/fd/7 [fd00::2]:4444 --compress zstd --max-bandwidth 350M
      vmmig send vm.img 127.0.0.1:4444 --json --quiet > report.json
      vmmig send --live /dev/shm/vm.ram desthost:4444 --pause-pid 4242 --downtime-limit 300ms
      vmmig send --live /proc/4242/fd/7 desthost:4444 --qmp /run/vm1.qmp
      vmmig send --live vm.ram desthost:4444 --pause-cmd 'virsh suspend vm1' --unpause-cmd 'virsh resume vm1'
      vmmig send /dev/shm/vm.ram desthost:4444 --retries 5 --retry-delay 2s
      vmmig send /dev/shm/vm.ram desthost:4444 --resume        # after a kill or a lost link
      vmmig send snapshot:vm.snap desthost:4444                 # a saved snapshot, frames as stored
      vmmig send --live libvirt:vm1 desthost:4444 --qemu-handoff  # a libvirt guest, whole
    """
    selected = codecs.by_name(codecs.DEFAULT_CODEC if codec == "auto" else codec)
    if level is not None and level not in selected.levels:
        raise click.BadParameter(
            f"{codec} takes levels {selected.levels.start}-{selected.levels.stop - 1}, not {level}",
            param_hint="--level",
        )
    from ..sender.options import SendOptions
    from ..sender.session import run
    from ..sender.sources import resolve_source

    opts = SendOptions(
        source=source,
        destination=destination,
        codec=codec,
        level=level,
        threads=threads or 0,
        max_bandwidth=max_bandwidth,
        page_size=page_size,
        batch_size=batch_size,
        connect_timeout=connect_timeout,
        channels=channels,
        io_timeout=io_timeout,
        progress_timeout=progress_timeout,
        json=json_output,
        quiet=quiet,
        live=live,
        pause_pid=pause_pid,
        qmp=qmp,
        pause_cmd=pause_cmd,
        unpause_cmd=unpause_cmd,
        hook_timeout=hook_timeout,
        dirty_tracking=dirty_tracking,
        downtime_limit=downtime_limit,
        max_passes=max_passes,
        max_time=max_time,
        on_no_converge=on_no_converge,
        auto_converge=auto_converge,
        qemu_handoff=qemu_handoff,
        libvirt_uri=libvirt_uri,
        control=control,
        stats_path=stats_path,
        metrics_path=metrics_path,
        verbose=verbose,
        tls=tls_options(tls_cert, tls_key, tls_ca, tls_peer_name, tls_dir, tls_host),
        handshake_timeout=handshake_timeout,
        resume=resume,
        retries=retries,
        retry_delay=retry_delay,
        state_file=state_file,
        bind=bind,
    )
    ctx = click.get_current_context()  # what the operator set: a snapshot source sets the rest itself
    given = {name for name in ("codec", "page_size", "batch_size") if ctx.get_parameter_source(name) != DEFAULT}
    execute("send", debug, lambda: run(resolve_source(opts, given)))


DEFAULT = ParameterSource.DEFAULT  # an option the operator did not set
