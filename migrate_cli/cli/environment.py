"""Options from the environment: `VMMIG_SEND_MAX_BANDWIDTH=350M vmmig send ...`, for fleets and CI jobs.

Every option of `vmmig send` and `vmmig recv` can be set as VMMIG_<COMMAND>_<OPTION> (the long name upper-cased,
hyphens to underscores), shown in `--help`; an option on the command line wins. A new option gets its variable
here without being listed, unless it authorises, destroys or names what to act on: those are in DENIED and must
be typed on the command line of the migration they are meant for, never left over in a shell or a unit file.
"""

from __future__ import annotations

import click

PREFIX = "VMMIG"
COMMANDS = ("send", "recv")  # the migrations; ctl, tls init and analyze are one-off commands people type

# Read by both ends (after the command's own name): a host has one TLS directory and one name in it.
SHARED = {"--tls-dir": f"{PREFIX}_TLS_DIR", "--tls-host": f"{PREFIX}_TLS_HOST"}

DENIED: dict[str, str] = {
    "--force": "destroys: overwrites DEST and removes a leftover DEST.partial",
    "--insecure": "authorises guest memory to cross the network unencrypted",
    "--in-place": "destroys: writes over an existing DEST",
    "--resume": "authorises adopting or continuing an interrupted session",
    "--discard": "keeps nothing of the migration",
    "--tls-peer-name": "authorises: which certificate name the peer may present",
    "--pause-pid": "names the process to stop: a leftover value would stop another",
    "--qmp": "names the QEMU to stop, or to load the guest into",
    "--pause-cmd": "a command that pauses a guest: it runs",
    "--unpause-cmd": "a command that resumes a guest: it runs",
    "--on-failure": "destroys: quit-dest quits the destination QEMU",
    "--state-file": "names one migration's session record: a shared one would mix sessions",
    "--stdio": "turns standard input and output into the migration stream: a leftover value would hijack them",
}


def variable(command: str, option: str) -> str:
    """``variable("send", "--max-bandwidth")`` -> ``VMMIG_SEND_MAX_BANDWIDTH``."""
    return f"{PREFIX}_{command.upper()}_{option.removeprefix('--').upper().replace('-', '_')}"


def long_name(option: click.Option) -> str | None:
    return next((name for name in option.opts if name.startswith("--")), None)


def read_environment(group: click.Group) -> None:
    """Give each option of the migration commands its variable (shown in --help); take it from the denied ones."""
    for name in COMMANDS:
        command = group.commands[name]
        for param in command.params:
            option = long_name(param) if isinstance(param, click.Option) else None
            if option is None or option == "--help":
                continue
            assert isinstance(param, click.Option)
            if option in DENIED:
                param.envvar, param.allow_from_autoenv, param.show_envvar = None, False, False
                continue
            own = variable(name, option)
            param.envvar = [own, SHARED[option]] if option in SHARED else own
            param.show_envvar = True
