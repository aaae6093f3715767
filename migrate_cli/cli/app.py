"""The `vmmig` command group: the commands register on it (send_command, recv_command, tool_commands)."""

from __future__ import annotations

import click

from .. import __version__
from ..wire.frames import PROTOCOL_VERSION
from .params import EXIT_CODES_HELP


# The exit-code table is here and in docs/CLI.md only: one place to look, not repeated under every command.
@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110}, epilog=EXIT_CODES_HELP)
@click.version_option(__version__, prog_name="vmmig", message=f"%(prog)s %(version)s (protocol {PROTOCOL_VERSION})")
def main() -> None:
    """Move a virtual machine's memory image to another host: compressed, capped and verified end to end.

    \b
    On the destination:  vmmig recv --listen 0.0.0.0:4444 --insecure /dev/shm/vm.ram
    On the source:       vmmig send /dev/shm/vm.ram desthost:4444 --max-bandwidth 350M

    Both exit 0 only when the destination holds a byte-identical image, checked by a 128-bit digest on both
    ends. Sizes take K/M/G/T (powers of 10) or KiB/MiB/GiB/TiB (powers of 2); rates also bits (100Mbit, 1Gbps);
    durations need a unit (300ms, 2s). Options of send and recv can also be set as VMMIG_SEND_<OPTION> and
    VMMIG_RECV_<OPTION> (each --help names them), except those that authorise or destroy.
    """
