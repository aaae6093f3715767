"""`vmmig recv`: the receiving session, from listening to the final error or report.

Order matters and is the safety argument:
1. refuse an existing DEST / leftover DEST.partial (the option combinations were checked by RecvOptions.check),
   then listen and print the ready line (and --ready-file);
2. attempts (attempt.py), one per connection of the sender, until one verifies: each admits the first sender this
   session can take, with all its channels (strangers and senders it cannot take are turned away, the receiver
   goes on waiting), allocates DEST.partial, receives and verifies, and only then renames it to DEST;
3. a link fault parks the session (DEST.partial and its state kept; the sender has --resume-window to come back)
   or, before any page, starts over; any other failure removes DEST.partial (unless --keep-partial) and tells
   the sender why with ABORT (failure_rules.py). The phases and their moves are in lifecycle.py.
"""

from __future__ import annotations

import gc
import socket
import sys
import time
from dataclasses import replace
from typing import Any

from ..cpus import usable_cpus
from ..errors import CancelledError, MigrateError, Stalled
from ..failure import Failure
from ..guest.libvirt import LibvirtDomain, domain_name
from ..guest.qemu import DestHandoff
from ..metrics import MetricsFile
from ..net.endpoints import bound_name, listen_at, parse_endpoint
from ..net.stdio import STDIO, StdioListener, take_stdio
from ..net.tls import preflight
from ..report import print_json
from ..stats import Stats
from .attempt import Attempt
from .dest_checks import check_destination
from .destination import DestinationImage, InPlaceDestination
from .discard import DiscardSink
from .failure_rules import StartOver, StreamLost, final_status, kept_error, leave_on_disk
from .lifecycle import Lifecycle, Phase
from .options import RecvOptions
from .reporting import Reporter
from .state_file import ReceiverState, hold_state, kept_for_stdio


class Receiver:
    """One receiving session: what it owns across attempts (DEST, its state file, the QEMU handoff, the statistics,
    the lifecycle); each Attempt reads and moves them."""

    def __init__(self, opts: RecvOptions, libvirt: LibvirtDomain | None = None) -> None:
        self.opts = opts
        self.libvirt = libvirt  # DEST libvirt:DOMAIN: the domain, over one virsh session (guest/libvirt.py)
        self.threads = opts.threads or usable_cpus()
        self.failure = Failure()  # the current attempt's latch (`vmmig ctl cancel` sets it)
        self.stats = Stats()
        self.reporter = Reporter(opts, self.stats, self.threads)
        # --resume (or --stdio finding a kept session): parked from the start, waiting for its sender
        self.adopting = opts.resume or kept_for_stdio(opts)
        self.lifecycle = Lifecycle(Phase.PARKED if self.adopting else Phase.LISTENING, self.reporter.show_phase)
        self.dest: DestinationImage | InPlaceDestination | DiscardSink | None = None
        self.state: ReceiverState | None = None  # the session kept on disk for a resume (state_file.py)
        self.handoff: DestHandoff | None = None
        self.resumes = 0
        self.lost: MigrateError | None = None  # what dropped the link the session waits to resume after
        self.accept_end: float | None = None  # --accept-timeout: when waiting for a (new) sender gives up
        self.state_lock: int | None = None  # the kept session's state file, locked while this receiver holds it

    def run(self) -> dict[str, Any]:
        """The session: listen, then attempts until one verifies; a dropped link parks the session for a resume."""
        opts = self.opts
        where = None if opts.stdio else parse_endpoint(opts.listen, exec_ok=False)
        if self.adopting:
            self.state = ReceiverState.load(opts.destination)
            self.state_lock = hold_state(opts.destination, opts.handshake_timeout)
            self.dest = DestinationImage.adopt(opts.destination, self.state.image_size, self.state.page_size)
        elif not opts.discard:
            check_destination(opts.destination, opts.force, in_place=opts.in_place)
        try:
            # bad TLS files fail now, not at the first sender
            preflight(opts.tls, server=True, warn=self.reporter.notice)
            listener = StdioListener(take_stdio()) if where is None else listen_at(where)
        except BaseException:
            if self.dest is not None:
                self.dest.close()
            raise
        self.reporter.open_control({"status": self._ctl_status, "cancel": self._ctl_cancel})
        bound = STDIO if where is None else bound_name(where, listener)
        self.reporter.announce(bound)
        self._restart_accept_clock()
        self.reporter.stats_log.start()
        try:
            result = self._attempts(listener, bound)
        except BaseException as exc:
            error = exc if isinstance(exc, MigrateError) else self.failure.error or exc
            self.lifecycle.fail()
            error = leave_on_disk(exc, error, self.lifecycle, self.dest, self.lost, opts)
            self.stats.finish(final_status(error))
            self.reporter.close({"status": self.stats.status, "error": str(error), "role": "recv"})
            raise error from None
        self.reporter.close(result)
        if opts.json:
            print_json(result)
        return result

    def _attempts(self, listener: socket.socket | StdioListener, bound: str) -> dict[str, Any]:
        """Attempts until one verifies: after a start over the receiver waits afresh, after a park for at most
        --resume-window (a new listening socket each time: the last one refused further connections). With --stdio
        there is one attempt: the stream is the one sender there will be, so nothing is waited for after it."""
        window_end: float | None = None
        try:
            while True:
                self.failure = Failure()
                try:
                    return Attempt(self, self.failure).run(listener, bound, window_end)
                except StartOver as over:
                    listener.close()
                    if self.opts.stdio:
                        raise over.error from None
                    self.reporter.notice(
                        f"{over.error}: nothing was received, DEST.partial removed; waiting for a sender"
                    )
                    window_end = None
                    self._restart_accept_clock()
                    listener = listen_at(parse_endpoint(bound, exec_ok=False))
                except StreamLost as lost:
                    listener.close()
                    self.lost = lost.error
                    no_wait = self.opts.resume_window <= 0 or self.opts.stdio
                    if no_wait or isinstance(lost.error, Stalled):  # our stall: no waiting
                        raise kept_error(lost.error, self.lost, self.opts, self.dest) from None
                    window_end = time.monotonic() + self.opts.resume_window
                    self.reporter.notice(
                        f"{lost.error}: keeping {self.dest.partial if self.dest else 'DEST.partial'}; waiting up to "
                        f"{self.opts.resume_window:g}s for the sender to resume (send --resume or --retries)"
                    )
                    listener = listen_at(parse_endpoint(bound, exec_ok=False))
        finally:
            listener.close()

    def _restart_accept_clock(self) -> None:
        if self.opts.accept_timeout is not None:
            self.accept_end = time.monotonic() + self.opts.accept_timeout

    def _ctl_status(self, _request: dict[str, Any]) -> dict[str, Any]:
        return self.reporter.status()

    def _ctl_cancel(self, _request: dict[str, Any]) -> str:
        self.failure.set(CancelledError("cancelled by vmmig ctl"))
        return "cancelling"


def run(opts: RecvOptions) -> dict[str, Any]:
    opts.check()
    libvirt = None
    if (name := domain_name(opts.destination)) is not None:
        libvirt = LibvirtDomain(name, opts.libvirt_uri)
        try:
            ram, _ = libvirt.find_ram()
        except BaseException:
            libvirt.close()
            raise
        if not opts.quiet:
            print(f"vmmig recv: libvirt:{name} ({libvirt.virsh.uri}): RAM is the {ram.how}", file=sys.stderr)
        opts = replace(opts, destination=ram.path, in_place=True, libvirt_domain=name)
    try:
        gc.freeze()  # everything imported so far lives as long as the process: out of the collector's sight
        receiver = Receiver(opts, libvirt)
        metrics = MetricsFile(opts.metrics_path, "recv")  # from listening to the exit code (metrics.py)
        metrics.follow(receiver.stats, receiver.reporter.metric_labels)
        return metrics.around(receiver.run)
    finally:
        if libvirt is not None:
            libvirt.close()
