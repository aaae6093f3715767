"""What one `vmmig recv` is asked to do: every option of the library's receiver (cli/recv_command.py fills it)."""

from __future__ import annotations

from dataclasses import dataclass

from ..net.tls import TlsOptions


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
    json: bool = False
    quiet: bool = False
    discard: bool = False
    in_place: bool = False
    qmp: str | None = None
    on_failure: str = "keep"  # QEMU mode: "keep" the destination QEMU as it is, or "quit-dest"
    tls: TlsOptions | None = None
    handshake_timeout: float = 10.0
    control: str | None = None
    stats_path: str | None = None
    verbose: bool = False
    resume: bool = False  # adopt DEST.partial and its state file left by an interrupted migration
    resume_window: float = 60.0  # seconds to wait for the sender to come back after the link drops
