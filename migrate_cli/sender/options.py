"""What one `vmmig send` is asked to do: every option of the library's sender, checked together once.

The CLI (cli/send_command.py) parses and converts units; ``SendOptions.check`` rejects combinations that cannot
work (QEMU's migrate_caps_check does the same for its capabilities) before anything is opened or connected.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError
from ..guest.libvirt import domain_name
from ..guest.virsh import check_local_uri
from ..net.endpoints import EXEC, TCP, Endpoint, parse_endpoint
from ..net.tls import TlsOptions
from ..net.transport import parse_address
from ..wire import codec as codecs
from ..wire.frames import DEFAULT_PAGE_SIZE, MAX_BATCH_BYTES
from .state_file import default_sender_state_path

# Pages are read, compressed, framed and checksummed a batch at a time. Per-batch costs (Python glue, frame,
# queue hops, the receiver's dispatch) fall with size: 4 MiB cost 7% less CPU than 1 MiB for zstd (docs/PERFORMANCE.md).
DEFAULT_BATCH_SIZE = 4 * 1024 * 1024
MIN_DEFAULT_BATCH_SIZE = 1024 * 1024
SENDER_BUFFER_BUDGET = 96 * 1024 * 1024  # the sender's gather buffers (RING per worker) stay under this by default


def default_batch_size(threads: int, ring: int) -> int:
    """4 MiB, halved (not below 1 MiB) until ``ring`` buffers per compression thread (send_pipeline.RING) fit the
    budget: a 64-thread host would otherwise hold 768 MiB of batch buffers on the sender."""
    size = DEFAULT_BATCH_SIZE
    while size > MIN_DEFAULT_BATCH_SIZE and ring * threads * size > SENDER_BUFFER_BUDGET:
        size //= 2
    return size


@dataclass(frozen=True)
class SendOptions:
    source: str
    destination: str  # HOST:PORT, unix:PATH or exec:COMMAND (net/endpoints.py)
    codec: str = codecs.DEFAULT_CODEC
    level: int | None = None
    threads: int = 0  # 0 = number of usable CPUs
    max_bandwidth: int | None = None
    page_size: int = DEFAULT_PAGE_SIZE
    batch_size: int | None = None  # None: image.default_batch_size, or with --resume the interrupted session's
    connect_timeout: float = 10.0
    io_timeout: float = 30.0
    progress_timeout: float | None = None  # give up (exit 17) when no page is sent and no pass ends this long
    channels: int = 1
    json: bool = False
    quiet: bool = False
    # live migration
    live: bool = False
    pause_pid: int | None = None
    qmp: str | None = None
    pause_cmd: str | None = None
    unpause_cmd: str | None = None
    hook_timeout: float = 30.0
    dirty_tracking: str = "fingerprint"
    downtime_limit: float = 0.3
    max_passes: int = 30
    max_time: float | None = None
    on_no_converge: str = "abort"
    auto_converge: bool = False
    qemu_handoff: bool = False
    libvirt_uri: str | None = None  # libvirt:DOMAIN sources: the local libvirt connection (None: libvirt's default)
    # security
    tls: TlsOptions | None = None
    handshake_timeout: float = 10.0
    # statistics and control
    control: str | None = None
    stats_path: str | None = None
    metrics_path: str | None = None  # --metrics FILE (metrics.py)
    verbose: bool = False
    # resume (resume.py)
    resume: bool = False  # continue the interrupted session recorded in the state file
    retries: int = 0  # reconnect and resume this many times after a link fault
    retry_delay: float = 2.0
    state_file: str | None = None  # default: $XDG_STATE_HOME/vmmig/send-<key>.json
    bind: str | None = None  # the local address to connect from (HOST or HOST:PORT; TCP only)

    def check(self) -> None:
        """Reject option combinations once, up front (QEMU's migrate_caps_check)."""
        pausers = [x for x in (self.pause_pid, self.qmp, self.pause_cmd, self.libvirt_domain) if x is not None]
        if len(pausers) > 1:
            raise UsageError(
                "choose one of --pause-pid, --qmp and --pause-cmd (a libvirt: source is paused through libvirt)"
            )
        if self.libvirt_uri is not None and self.libvirt_domain is None:
            raise UsageError("--libvirt-uri is the connection of a libvirt:DOMAIN source")
        if self.libvirt_uri is not None:
            check_local_uri(self.libvirt_uri)  # a remote one: refused before anything is said or started
        if (self.pause_cmd is None) != (self.unpause_cmd is None):
            raise UsageError("--pause-cmd and --unpause-cmd go together")
        if self.live and not pausers:
            raise UsageError("--live needs a way to pause the guest: --pause-pid, --qmp or --pause-cmd")
        if self.auto_converge and self.pause_pid is None and self.qmp is None and self.libvirt_domain is None:
            raise UsageError(
                "--auto-converge needs --pause-pid (a SIGSTOP duty cycle) or --qmp (a CPU quota on QEMU's vCPU threads)"
            )
        if self.dirty_tracking == "soft-dirty" and self.pause_pid is None:
            raise UsageError("--dirty-tracking soft-dirty needs --pause-pid (the process whose writes are tracked)")
        if self.batch_size is not None and not self.page_size <= self.batch_size <= MAX_BATCH_BYTES:
            raise UsageError("--batch-size must be between the page size and 16MiB")
        if self.max_passes < 1:
            raise UsageError("--max-passes must be at least 1")
        if self.qemu_handoff and self.qmp is None and self.libvirt_domain is None:
            raise UsageError("--qemu-handoff needs --qmp (the source QEMU's monitor) or a libvirt:DOMAIN source")
        if not 1 <= self.channels <= 16:
            raise UsageError("--channels must be between 1 and 16")
        if self.retries < 0:
            raise UsageError("--retries must be 0 or more")
        if self.libvirt_domain is not None and (self.resume or self.retries):
            raise UsageError("a libvirt: source cannot be resumed: drop --resume and --retries")
        if self.qemu_handoff and (self.resume or self.retries):
            raise UsageError("--qemu-handoff cannot be resumed: drop --resume and --retries")
        self._check_destination()

    def _check_destination(self) -> None:
        """What each scheme of the destination allows."""
        where = parse_endpoint(self.destination)
        if where.scheme != TCP and self.qemu_handoff:
            raise UsageError(
                f"--qemu-handoff over {where.scheme}: is refused: QEMU's own migration of the device state connects "
                "the source QEMU to the receiver's host over TCP (send to HOST:PORT)"
            )
        if where.scheme != TCP and self.bind is not None:
            raise UsageError(f"--bind is the local address of a TCP connection: not for {where.scheme}:")
        if self.bind is not None:
            parse_address(self.bind, default_port=0)
        if where.scheme == EXEC and self.channels > 1:
            raise UsageError("exec: carries one channel (the command's standard input and output): drop --channels")
        if where.scheme == EXEC and self.tls is not None:
            raise UsageError("exec: runs COMMAND and speaks through it (ssh encrypts and authenticates): no TLS")

    @property
    def libvirt_domain(self) -> str | None:
        """DOMAIN of a ``libvirt:DOMAIN`` source (guest/libvirt.py)."""
        return domain_name(self.source)

    def endpoint(self) -> Endpoint:
        return parse_endpoint(self.destination)

    def bind_address(self) -> tuple[str, int] | None:
        return None if self.bind is None else parse_address(self.bind, default_port=0)

    def state_path(self) -> str:
        return self.state_file or default_sender_state_path(self.source)
