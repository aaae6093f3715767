"""`vmmig recv`: options parsed into the library's options object, then the library runs."""

from __future__ import annotations

import click
from click.core import ParameterSource

from .app import main
from .command import Command
from .params import (
    DURATION,
    TIMEOUT,
    decompress_threads_option,
    execute,
    libvirt_uri_option,
    sparse_option,
    tls_options,
    with_common,
)


@main.command(cls=Command, usage_args="(DEST | --discard)")
@click.argument("destination", metavar="DEST", required=False)
@click.option(
    "--listen",
    "listen_address",
    default="127.0.0.1:4444",
    show_default=True,
    metavar="HOST:PORT|unix:PATH",
    help="Address to listen on; port 0 picks a free one; IPv6 as [::1]:4444; unix:PATH a unix socket (created "
    "0600, removed at exit).",
)
@click.option(
    "--stdio",
    is_flag=True,
    help="Speak the protocol on standard input and output (`vmmig send IMAGE 'exec:ssh HOST vmmig recv --stdio "
    "DEST'`): one sender, no listening, no waiting after it; excludes --listen, --json and --stats -. A kept "
    "DEST.partial is continued only by a sender resuming that same session.",
)
@click.option(
    "--accept-timeout",
    type=TIMEOUT,
    default=None,
    help="Give up when no sender completes a handshake within this long (exit 18): a CI job never hangs on a "
    "sender that never comes. [default: wait forever]",
)
@click.option(
    "--insecure",
    is_flag=True,
    help="Allow a non-loopback listen address: guest memory then crosses the network unencrypted.",
)
@click.option("--force", is_flag=True, help="Overwrite an existing DEST and remove a leftover DEST.partial.")
@click.option("--keep-partial", is_flag=True, help="On failure keep DEST.partial for inspection.")
@sparse_option
@decompress_threads_option
@click.option(
    "--ready-file",
    type=click.Path(dir_okay=False),
    default=None,
    help="Write the bound HOST:PORT (or unix:PATH) here once accepting connections (for scripts using port 0).",
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
@click.option(
    "--progress-timeout",
    type=TIMEOUT,
    default=None,
    help="Give up when no page lands in DEST and no pass ends for this long, keepalives or not (a sender that "
    "sends nothing): exit 17 at once, without waiting --resume-window; DEST.partial and its state file are kept "
    "for `recv --resume` once they hold pages. [default: off]",
)
@libvirt_uri_option
@with_common
def recv(
    destination: str | None,
    listen_address: str,
    stdio: bool,
    accept_timeout: float | None,
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
    progress_timeout: float | None,
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
    """Receive one migration into DEST, then exit.

    Pages are written into DEST.partial (created beside DEST; its first 16 MiB allocated before the sender starts,
    the rest while pages arrive), which is renamed to DEST only once it is fully allocated and its digest matches
    the sender's. DEST is never created unverified.
    When the link drops (lost connection, silence, a corrupted frame), DEST.partial and DEST.partial.state are
    kept and the receiver waits --resume-window for the sender to resume; `vmmig recv --resume DEST` adopts them
    later (after a crash too). Any other failure removes DEST.partial (unless --keep-partial). A ready line with
    the bound address goes to stderr.

    DEST may be libvirt:DOMAIN, a destination QEMU guest libvirt runs on this host, started paused with
    -incoming defer (docs/LIBVIRT.md): its RAM is written in place (--in-place implied) and, once the sender's
    --qemu-handoff has brought the device state, the domain runs through libvirt (`virsh resume`).

    \b
    Examples:
      vmmig recv /dev/shm/vm.ram                                   # 127.0.0.1:4444
      vmmig recv --listen 0.0.0.0:4444 --insecure /dev/shm/vm.ram
      vmmig recv --listen 127.0.0.1:0 --ready-file port.txt out.img
      vmmig recv --discard --control /run/vmmig-recv.sock          # measure the link, keep nothing
      vmmig recv --resume /dev/shm/vm.ram                          # continue an interrupted migration
      vmmig recv --listen unix:/run/vmmig.sock /dev/shm/vm.ram
      vmmig recv --listen 10.0.0.2:4444 --insecure libvirt:vm1      # a libvirt guest's RAM, then its devices
      vmmig recv --stdio /dev/shm/vm.ram            # run by `vmmig send IMAGE 'exec:ssh HOST vmmig recv ...'`
    """
    from ..receiver.options import RecvOptions
    from ..receiver.session import run

    if stdio and click.get_current_context().get_parameter_source("listen_address") is ParameterSource.COMMANDLINE:
        raise click.UsageError("--stdio speaks on standard input and output: it listens nowhere (drop --listen)")
    if (destination is None) == (not discard):  # an argument given or not: only click sees it (RecvOptions.check)
        raise click.UsageError("give DEST, or --discard to keep nothing (not both)")
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
        progress_timeout=progress_timeout,
        json=json_output,
        quiet=quiet,
        discard=discard,
        in_place=in_place,
        qmp=qmp,
        libvirt_uri=libvirt_uri,
        on_failure=on_failure,
        control=control,
        stats_path=stats_path,
        metrics_path=metrics_path,
        verbose=verbose,
        tls=tls_options(tls_cert, tls_key, tls_ca, tls_peer_name, tls_dir, tls_host),
        handshake_timeout=handshake_timeout,
        resume=resume,
        resume_window=resume_window,
        stdio=stdio,
        accept_timeout=accept_timeout,
    )
    execute("recv", debug, lambda: run(opts))  # run checks the option combinations first (RecvOptions.check)
