"""What one `vmmig recv` is asked to do: every option of the library's receiver, checked together once.

The CLI (cli/recv_command.py) parses and converts units; ``RecvOptions.check`` rejects combinations that cannot
work before anything is opened, bound or read (like ``SendOptions.check`` on the other end).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError
from ..guest.libvirt import domain_name
from ..guest.virsh import check_local_uri
from ..net.endpoints import TCP, UNIX, parse_endpoint
from ..net.tls import TlsOptions
from ..net.transport import is_loopback


@dataclass(frozen=True)
class RecvOptions:
    destination: str
    listen: str = "127.0.0.1:4444"
    insecure: bool = False
    force: bool = False
    keep_partial: bool = False
    sparse: bool = False
    threads: int = 0
    ready_file: str | None = None
    io_timeout: float = 30.0
    progress_timeout: float | None = None  # give up (exit 17) when no page lands and no pass ends this long
    json: bool = False
    quiet: bool = False
    discard: bool = False
    in_place: bool = False
    qmp: str | None = None
    libvirt_uri: str | None = None  # a libvirt:DOMAIN destination's local libvirt connection (None: the default)
    libvirt_domain: str | None = None  # set when DEST libvirt:DOMAIN is resolved to the domain's RAM (session.py)
    on_failure: str = "keep"  # QEMU mode: "keep" the destination QEMU as it is, or "quit-dest"
    tls: TlsOptions | None = None
    handshake_timeout: float = 10.0
    control: str | None = None
    stats_path: str | None = None
    metrics_path: str | None = None  # --metrics FILE (metrics.py)
    verbose: bool = False
    resume: bool = False  # adopt DEST.partial and its state file left by an interrupted migration
    resume_window: float = 60.0  # seconds to wait for the sender to come back after the link drops
    stdio: bool = False  # speak on standard input and output (one sender, `ssh host vmmig recv --stdio`)
    accept_timeout: float | None = None  # give up (exit 18) when no sender completes a handshake this long

    @property
    def qemu_mode(self) -> bool:
        """The destination is a QEMU guest (--qmp, or DEST libvirt:DOMAIN) that the sender hands over."""
        return self.qmp is not None or self.libvirt_domain is not None or domain_name(self.destination) is not None

    def check(self) -> None:
        """Reject option combinations once, up front; a malformed --listen is refused here too. (Whether DEST was
        given at all, or --discard instead, is the CLI's: here an absent DEST and an empty one look the same.)"""
        if self.qmp and not self.in_place:
            raise UsageError("--qmp (QEMU mode) writes into the destination QEMU's RAM: add --in-place")
        if domain_name(self.destination) is not None and (self.qmp or self.discard or self.sparse):
            raise UsageError(
                "DEST libvirt:DOMAIN is the domain's own RAM, through libvirt: drop --qmp, --discard, --sparse"
            )
        if self.libvirt_uri is not None and domain_name(self.destination) is None and self.libvirt_domain is None:
            raise UsageError("--libvirt-uri is the connection of a libvirt:DOMAIN destination")
        if self.libvirt_uri is not None:
            check_local_uri(self.libvirt_uri)  # a remote one: refused before anything is said or started
        if self.in_place and (self.discard or self.sparse or self.keep_partial):
            raise UsageError("--in-place writes into DEST itself: it excludes --discard, --sparse and --keep-partial")
        if self.stdio:
            self._check_stdio()
            return
        where = parse_endpoint(self.listen, exec_ok=False)
        if where.scheme == UNIX and self.qemu_mode:
            raise UsageError(
                "--qmp over unix: is refused: the QEMU handoff connects the source QEMU to this host's address over "
                "TCP (listen on HOST:PORT)"
            )
        if where.scheme == TCP and not self.insecure and self.tls is None and not is_loopback(where.host):
            raise UsageError(
                f"refusing to listen on non-loopback address {where.host} without TLS (--tls-cert, --tls-key, "
                "--tls-ca) or --insecure: guest memory would cross the network unencrypted"
            )
        if self.resume and (self.discard or self.in_place or self.qemu_mode):
            raise UsageError("--resume cannot be combined with --discard, --in-place or --qmp")

    def _check_stdio(self) -> None:
        """Standard output is the stream: nothing else may be written there, and there is no address to listen on."""
        if self.json or self.stats_path == "-":
            raise UsageError("--stdio speaks the protocol on standard output: drop --json and --stats - (--stats FILE)")
        if self.tls is not None:
            raise UsageError("--stdio runs under the command that started it (ssh encrypts and authenticates): no TLS")
        if self.qemu_mode:
            raise UsageError(
                "--qmp (or libvirt:) over --stdio is refused: the QEMU handoff needs a TCP address on this host"
            )
        if self.resume and (self.discard or self.in_place):
            raise UsageError("--resume cannot be combined with --discard or --in-place")
