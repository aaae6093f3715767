"""The `vmmig` command line: parse options, build a frozen options object, call the library, map errors to exits.

This layer is thin on purpose: no migration logic lives here. Every error becomes one line on stderr
(``vmmig send: <reason>``) and the exit code its class carries (errors.py); --debug adds the traceback.
Options of send and recv can also come from VMMIG_* variables (environment.py).
"""

from . import recv_command, send_command, snapshot_commands, tool_commands  # noqa: F401  (each registers its commands on main)
from .app import main
from .environment import read_environment

read_environment(main)  # after every command registered its options, whoever added them

__all__ = ["main"]
