"""The `vmmig` command line: parse options, build a frozen options object, call the library, map errors to exits.

This layer is thin on purpose: no migration logic lives here. Every error becomes one line on stderr
(``vmmig send: <reason>``) and the exit code its class carries (errors.py); --debug adds the traceback.
"""

from __future__ import annotations

import signal
import sys
import traceback
from collections.abc import Callable
from types import FrameType
from typing import Any, NoReturn

import click

from . import __version__
from . import codec as codecs
from .errors import ExitCode, Interrupted, MigrateError
from .image import DEFAULT_PAGE_SIZE, check_page_size
from .protocol import PROTOCOL_VERSION
from .units import parse_duration, parse_rate, parse_size


class SizeType(click.ParamType):
    name = "SIZE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        try:
            return parse_size(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class RateType(click.ParamType):
    name = "RATE"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int | None:
        if value is None or isinstance(value, int):
            return value
        try:
            return parse_rate(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


class DurationType(click.ParamType):
    name = "DURATION"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> float:
        if isinstance(value, float):
            return value
        try:
            return parse_duration(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


SIZE, RATE, DURATION = SizeType(), RateType(), DurationType()


def _page_size(ctx: click.Context, param: click.Parameter, value: int) -> int:
    try:
        check_page_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


def tls_options(cert: str | None, key: str | None, ca: str | None, peer_name: str | None) -> Any:
    from .tls import TlsOptions

    try:
        return TlsOptions.from_cli(cert, key, ca, peer_name)
    except MigrateError as exc:
        raise click.UsageError(str(exc)) from None


def _raise_interrupted(signum: int, frame: FrameType | None) -> NoReturn:
    raise Interrupted(signum, signal.Signals(signum).name)


def _execute(command: str, debug: bool, call: Callable[[], Any]) -> NoReturn:
    """Run a command body; turn its outcome into one stderr line and an exit code."""
    signal.signal(signal.SIGINT, _raise_interrupted)
    signal.signal(signal.SIGTERM, _raise_interrupted)
    try:
        call()
    except MigrateError as exc:
        if debug:
            traceback.print_exc()
            detail = getattr(exc, "detail", None)
            if detail:
                print(detail, file=sys.stderr)
        print(f"vmmig {command}: {exc}", file=sys.stderr)
        sys.exit(int(exc.exit_code))
    except Exception as exc:  # a bug: say so, in one line unless --debug
        if debug:
            traceback.print_exc()
        print(f"vmmig {command}: internal error: {type(exc).__name__}: {exc} (rerun with --debug)", file=sys.stderr)
        sys.exit(int(ExitCode.INTERNAL))
    sys.exit(0)


EXIT_CODES_HELP = "\b\nExit codes:\n" + "\n".join(
    f"  {int(c):>3}  {c.name.lower().replace('_', '-')}" for c in ExitCode
)

common_options = [
    click.option(
        "--io-timeout", type=DURATION, default="30s", show_default=True, help="Fail when the peer is silent this long."
    ),
    click.option("--json", "json_output", is_flag=True, help="Print one final JSON report on stdout."),
    click.option("--quiet", "-q", is_flag=True, help="No progress display and no summary line (errors still print)."),
    click.option("--debug", is_flag=True, help="Show tracebacks with errors."),
    click.option(
        "--verbose", "-v", is_flag=True, help="Without a terminal: also print each phase (connected, allocated, ...)."
    ),
    click.option("--tls-cert", type=click.Path(dir_okay=False), default=None, help="This end's certificate (PEM)."),
    click.option("--tls-key", type=click.Path(dir_okay=False), default=None, help="This end's private key (PEM)."),
    click.option(
        "--tls-ca", type=click.Path(dir_okay=False), default=None, help="CA that signed the peer's certificate (PEM)."
    ),
    click.option(
        "--tls-peer-name",
        default=None,
        metavar="NAME",
        help="Name the peer's certificate must carry (send: default the host connected to; recv: checked if given).",
    ),
    click.option(
        "--handshake-timeout",
        type=DURATION,
        default="10s",
        show_default=True,
        help="Bound on the whole handshake, TLS included.",
    ),
    click.option(
        "--control",
        type=click.Path(dir_okay=False),
        default=None,
        metavar="SOCKET",
        help="Open a unix control socket (mode 0600) for `vmmig ctl SOCKET status|set|cancel`.",
    ),
    click.option(
        "--stats",
        "stats_path",
        type=click.Path(dir_okay=False, allow_dash=True),
        default=None,
        metavar="FILE",
        help="Write NDJSON statistics to FILE ('-' for stdout): one object a second and one per pass (docs/STATS.md).",
    ),
]


def with_common(func: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(common_options):
        func = option(func)
    return func


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.version_option(__version__, prog_name="vmmig", message=f"%(prog)s %(version)s (protocol {PROTOCOL_VERSION})")
def main() -> None:
    """Move a virtual machine's memory image to another host: compressed, capped and verified end to end.

    \b
    On the destination:  vmmig recv --listen 0.0.0.0:4444 --insecure /dev/shm/vm.ram
    On the source:       vmmig send /dev/shm/vm.ram desthost:4444 --max-bandwidth 350M

    Both exit 0 only when the destination holds a byte-identical image, checked by a 128-bit digest on both
    ends. Sizes take K/M/G/T (powers of 10) or KiB/MiB/GiB/TiB (powers of 2); durations need a unit (300ms, 2s).
    """


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("source", metavar="IMAGE")
@click.argument("destination", metavar="HOST:PORT")
@click.option(
    "--compress",
    "codec",
    type=click.Choice([*codecs.names(), "auto"]),
    default=codecs.DEFAULT_CODEC,
    show_default=True,
    help="Codec for page batches; a batch that does not shrink is sent raw whatever the codec. 'auto': zlib, "
    "but each batch goes raw when measurement says compressing it costs more than it saves.",
)
@click.option("--level", type=int, default=None, help="Compression level (zlib 1-9, zstd 1-19; default 1).")
@click.option(
    "--compress-threads",
    "threads",
    type=click.IntRange(min=1, max=256),
    default=None,
    help="Worker threads for zero-page scanning and compression [default: CPUs available].",
)
@click.option(
    "--max-bandwidth",
    type=RATE,
    default="0",
    show_default=True,
    help="Cap on wire bytes per second, e.g. 350M or 100MiB; 0 or 'unlimited' for none.",
)
@click.option(
    "--page-size",
    type=SIZE,
    default=str(DEFAULT_PAGE_SIZE),
    show_default=True,
    callback=_page_size,
    help="Page size: a power of two; the image must be a whole number of pages.",
)
@click.option(
    "--batch-size",
    type=SIZE,
    default="1MiB",
    show_default=True,
    help="Bytes of pages per batch: the unit of compression, framing and CRC.",
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
    type=DURATION,
    default="10s",
    show_default=True,
    help="Keep retrying the connection this long (the receiver may start later).",
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
    type=DURATION,
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
    help="Throttle the guest (SIGSTOP/SIGCONT duty cycle: 20%, +10% a pass, max 99%) while its dirty rate "
    "outruns the link. Needs --pause-pid.",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Continue the interrupted migration of IMAGE to HOST:PORT (after a dropped link or a killed vmmig): "
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
@with_common
def send(
    source: str,
    destination: str,
    codec: str,
    level: int | None,
    threads: int | None,
    max_bandwidth: int | None,
    page_size: int,
    batch_size: int,
    channels: int,
    connect_timeout: float,
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
    io_timeout: float,
    json_output: bool,
    quiet: bool,
    debug: bool,
    verbose: bool,
    tls_cert: str | None,
    tls_key: str | None,
    tls_ca: str | None,
    tls_peer_name: str | None,
    handshake_timeout: float,
    control: str | None,
    stats_path: str | None,
) -> None:
    """Send the memory image IMAGE to a `vmmig recv` listening at HOST:PORT.

    IMAGE is a regular file (e.g. /dev/shm/vm.ram behind QEMU's memory-backend-file), a hugetlbfs file, a memfd
    as /proc/PID/fd/N, or a block device. It is mapped read-only, never read whole into memory. Zero pages are
    skipped; other pages are copied out, compressed in worker threads and streamed in self-contained batches.

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
      vmmig send /proc/4242/fd/7 [fd00::2]:4444 --compress zstd --max-bandwidth 350M
      vmmig send vm.img 127.0.0.1:4444 --json --quiet > report.json
      vmmig send --live /dev/shm/vm.ram desthost:4444 --pause-pid 4242 --downtime-limit 300ms
      vmmig send --live /proc/4242/fd/7 desthost:4444 --qmp /run/vm1.qmp
      vmmig send --live vm.ram desthost:4444 --pause-cmd 'virsh suspend vm1' --unpause-cmd 'virsh resume vm1'
      vmmig send /dev/shm/vm.ram desthost:4444 --retries 5 --retry-delay 2s
      vmmig send /dev/shm/vm.ram desthost:4444 --resume        # after a kill or a lost link
    """
    selected = codecs.by_name(codecs.DEFAULT_CODEC if codec == "auto" else codec)
    if level is not None and level not in selected.levels:
        raise click.BadParameter(
            f"{codec} takes levels {selected.levels.start}-{selected.levels.stop - 1}, not {level}",
            param_hint="--level",
        )
    if batch_size < page_size or batch_size > 16 * 1024 * 1024:
        raise click.BadParameter("must be between the page size and 16MiB", param_hint="--batch-size")
    from .send import SendOptions, run

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
        control=control,
        stats_path=stats_path,
        verbose=verbose,
        tls=tls_options(tls_cert, tls_key, tls_ca, tls_peer_name),
        handshake_timeout=handshake_timeout,
        resume=resume,
        retries=retries,
        retry_delay=retry_delay,
        state_file=state_file,
    )
    _execute("send", debug, lambda: run(opts))


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("destination", metavar="DEST", required=False)
@click.option(
    "--listen",
    "listen_address",
    default="127.0.0.1:4444",
    show_default=True,
    metavar="HOST:PORT",
    help="Address to listen on; port 0 picks a free one; IPv6 as [::1]:4444.",
)
@click.option(
    "--insecure",
    is_flag=True,
    help="Allow a non-loopback listen address: guest memory then crosses the network unencrypted.",
)
@click.option("--force", is_flag=True, help="Overwrite an existing DEST and remove a leftover DEST.partial.")
@click.option("--keep-partial", is_flag=True, help="On failure keep DEST.partial for inspection.")
@click.option("--sparse", is_flag=True, help="Do not preallocate: zero pages stay holes on disk file systems.")
@click.option(
    "--decompress-threads",
    "threads",
    type=click.IntRange(min=1, max=256),
    default=None,
    help="Worker threads for decompression [default: CPUs available].",
)
@click.option(
    "--ready-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write the bound HOST:PORT here once accepting connections (for scripts using port 0).",
)
@click.option(
    "--qmp",
    type=click.Path(),
    default=None,
    metavar="SOCKET",
    help="QEMU mode: the destination QEMU's monitor (started with -incoming defer -S). Needs --in-place on its RAM.",
)
@click.option(
    "--on-failure",
    type=click.Choice(["keep", "quit-dest"]),
    default="keep",
    show_default=True,
    help="QEMU mode: after a failure leave the destination QEMU as it is, or quit it.",
)
@click.option(
    "--in-place",
    is_flag=True,
    help="Write into an existing DEST (file, memfd /proc/PID/fd/N, block device) of exactly the image size: no "
    ".partial, no rename. A failure leaves it modified and unverified (exit 13).",
)
@click.option(
    "--discard",
    is_flag=True,
    help="Decode and verify everything but keep nothing (no DEST): measures the link and the pipeline.",
)
@click.option(
    "--resume",
    is_flag=True,
    help="Adopt DEST.partial and its state file left by an interrupted migration and wait for its sender "
    "(vmmig send --resume, or --retries) to continue it.",
)
@click.option(
    "--resume-window",
    type=DURATION,
    default="60s",
    show_default=True,
    help="After the link drops, keep listening this long for the same session to resume (0: exit at once). "
    "DEST.partial and its state file are kept either way.",
)
@with_common
def recv(
    destination: str | None,
    listen_address: str,
    insecure: bool,
    force: bool,
    keep_partial: bool,
    sparse: bool,
    threads: int | None,
    ready_file: str | None,
    qmp: str | None,
    on_failure: str,
    in_place: bool,
    discard: bool,
    resume: bool,
    resume_window: float,
    io_timeout: float,
    json_output: bool,
    quiet: bool,
    debug: bool,
    verbose: bool,
    tls_cert: str | None,
    tls_key: str | None,
    tls_ca: str | None,
    tls_peer_name: str | None,
    handshake_timeout: float,
    control: str | None,
    stats_path: str | None,
) -> None:
    """Receive one migration into DEST, then exit.

    Pages are written into DEST.partial (created beside DEST, allocated at full size before the sender starts),
    which is renamed to DEST only after its digest matches the sender's. DEST is never created unverified.
    When the link drops (lost connection, silence, a corrupted frame), DEST.partial and DEST.partial.state are
    kept and the receiver waits --resume-window for the sender to resume; `vmmig recv --resume DEST` adopts them
    later (after a crash too). Any other failure removes DEST.partial (unless --keep-partial). A ready line with
    the bound address goes to stderr.

    \b
    Examples:
      vmmig recv /dev/shm/vm.ram                                   # 127.0.0.1:4444
      vmmig recv --listen 0.0.0.0:4444 --insecure /dev/shm/vm.ram
      vmmig recv --listen 127.0.0.1:0 --ready-file port.txt out.img
      vmmig recv --discard --control /run/vmmig-recv.sock          # measure the link, keep nothing
      vmmig recv --resume /dev/shm/vm.ram                          # continue an interrupted migration
    """
    from .recv import RecvOptions, run

    if (destination is None) == (not discard):
        raise click.UsageError("give DEST, or --discard to keep nothing (not both)")
    if qmp and not in_place:
        raise click.UsageError("--qmp (QEMU mode) writes into the destination QEMU's RAM: add --in-place")
    if in_place and (discard or sparse or keep_partial):
        raise click.UsageError("--in-place writes into DEST itself: it excludes --discard, --sparse and --keep-partial")

    opts = RecvOptions(
        destination=destination or "",
        listen=listen_address,
        insecure=insecure,
        force=force,
        keep_partial=keep_partial,
        sparse=sparse,
        threads=threads or 0,
        ready_file=ready_file,
        io_timeout=io_timeout,
        json=json_output,
        quiet=quiet,
        discard=discard,
        in_place=in_place,
        qmp=qmp,
        on_failure=on_failure,
        control=control,
        stats_path=stats_path,
        verbose=verbose,
        tls=tls_options(tls_cert, tls_key, tls_ca, tls_peer_name),
        handshake_timeout=handshake_timeout,
        resume=resume,
        resume_window=resume_window,
    )
    _execute("recv", debug, lambda: run(opts))


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("socket_path", metavar="SOCKET")
@click.argument("command", type=click.Choice(["status", "set", "cancel"]))
@click.argument("args", nargs=-1)
@click.option("--debug", is_flag=True, help="Show tracebacks with errors.")
def ctl(socket_path: str, command: str, args: tuple[str, ...], debug: bool) -> None:
    """Control a running `vmmig send` or `vmmig recv` started with --control SOCKET.

    \b
    vmmig ctl SOCKET status                        the current statistics as JSON (docs/STATS.md)
    vmmig ctl SOCKET set max-bandwidth 200M        change the cap (send; 0 = unlimited)
    vmmig ctl SOCKET set downtime-limit 500ms      change the downtime target (send --live)
    vmmig ctl SOCKET cancel                        clean abort: guest resumed, DEST not published, both ends exit 9

    Changes take effect within 200 ms. Prints the reply as JSON on stdout.
    """
    import json

    from .control import request

    if command == "set" and len(args) != 2:
        raise click.UsageError("usage: vmmig ctl SOCKET set NAME VALUE (max-bandwidth, downtime-limit)")
    if command != "set" and args:
        raise click.UsageError(f"{command} takes no arguments")
    message: dict[str, Any] = {"command": command}
    if command == "set":
        message.update(name=args[0], value=args[1])

    def call() -> None:
        print(json.dumps(request(socket_path, message), indent=2))

    _execute("ctl", debug, call)


@main.group()
def tls() -> None:
    """Certificates for mutually authenticated TLS between vmmig hosts."""


@tls.command("init")
@click.argument("directory", metavar="DIR")
@click.option(
    "--host",
    "hosts",
    multiple=True,
    required=True,
    metavar="NAME",
    help="A host name or IP address to issue a certificate for (repeat for each host).",
)
@click.option(
    "--days", type=click.IntRange(min=1), default=825, show_default=True, help="Validity of host certificates."
)
@click.option("--force", is_flag=True, help="Overwrite existing files.")
@click.option("--debug", is_flag=True, help="Show tracebacks with errors.")
def tls_init(directory: str, hosts: tuple[str, ...], days: int, force: bool, debug: bool) -> None:
    """Create a small CA and a certificate and key per host in DIR.

    \b
    Files: DIR/ca.pem (give to every host), DIR/ca.key (keep it safe: it signs certificates),
           DIR/NAME.pem and DIR/NAME.key for each --host NAME (keys are mode 0600).
    Certificates carry NAME as subject alternative name (DNS name, or IP address when NAME is one), are valid
    for both ends (server and client) and for --days days; keys are ECDSA P-256.

    \b
    Example (two hosts):
      vmmig tls init pki --host src.example --host dst.example
      # copy pki/ca.pem + pki/dst.example.{pem,key} to dst, pki/ca.pem + pki/src.example.{pem,key} to src
      dst$ vmmig recv --listen 0.0.0.0:4444 --tls-cert dst.example.pem --tls-key dst.example.key --tls-ca ca.pem \\
              --tls-peer-name src.example /dev/shm/vm.ram
      src$ vmmig send /dev/shm/vm.ram dst.example:4444 --tls-cert src.example.pem --tls-key src.example.key \\
              --tls-ca ca.pem
    """

    def call() -> None:
        from .tls import init

        for path in init(directory, list(hosts), force=force, days=days):
            print(path)

    _execute("tls init", debug, call)


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("image", metavar="IMAGE")
@click.option("--full", is_flag=True, help="Read the whole image instead of a sample.")
@click.option("--sample", "sample_bytes", type=SIZE, default="64MiB", show_default=True, help="How much to sample.")
@click.option("--dirty-for", type=DURATION, default=None, help="Also measure the dirty rate for this long (e.g. 10s).")
@click.option("--max-bandwidth", type=RATE, default="0", help="The link you will migrate over (for the forecast).")
@click.option("--threads", type=click.IntRange(min=1, max=256), default=None, help="[default: CPUs available]")
@click.option("--page-size", type=SIZE, default=str(DEFAULT_PAGE_SIZE), show_default=True, callback=_page_size)
@click.option("--json", "json_output", is_flag=True, help="Print the report as JSON on stdout.")
@click.option("--debug", is_flag=True, help="Show tracebacks with errors.")
def analyze(
    image: str,
    full: bool,
    sample_bytes: int,
    dirty_for: float | None,
    max_bandwidth: int | None,
    threads: int | None,
    page_size: int,
    json_output: bool,
    debug: bool,
) -> None:
    """A dry run on the source: zero pages, each codec's ratio and speed here, the dirty rate, and advice.

    Nothing is sent. With --dirty-for, the image is fingerprinted once a second while the guest runs, and the
    report says whether a live migration at --max-bandwidth will converge.

    \b
    Examples:
      vmmig analyze /dev/shm/vm.ram
      vmmig analyze /dev/shm/vm.ram --dirty-for 10s --max-bandwidth 350M --json
    """

    def call() -> None:
        import json

        from .analyze import analyze as run
        from .analyze import render
        from .send import usable_cpus

        report = run(
            image, page_size, None if full else sample_bytes, threads or usable_cpus(), dirty_for, max_bandwidth
        )
        print(json.dumps(report, indent=2) if json_output else render(report))

    _execute("analyze", debug, call)
