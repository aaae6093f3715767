"""`vmmig ctl`, `vmmig tls init` and `vmmig analyze`: options parsed, then the library runs."""

from __future__ import annotations

from typing import Any

import click

from ..wire.frames import DEFAULT_PAGE_SIZE
from .app import main
from .command import Command
from .params import DURATION, RATE, SIZE, execute, page_size_option

SETTABLE = ("max-bandwidth", "downtime-limit", "auto-converge")  # what `ctl SOCKET set NAME VALUE` can change


def complete_ctl_words(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """Tab completion after `vmmig ctl SOCKET set`: the settable names, then on/off for auto-converge."""
    if ctx.params.get("command") != "set":
        return []
    words = ctx.params.get("args") or ()
    choices = SETTABLE if not words else ("on", "off") if len(words) == 1 and words[0] == "auto-converge" else ()
    return [word for word in choices if word.startswith(incomplete)]


@main.command(cls=Command, usage_args="SOCKET (status | set NAME VALUE | switchover | cancel)")
@click.argument("socket_path", metavar="SOCKET")
@click.argument("command", type=click.Choice(["status", "set", "switchover", "cancel"]))
@click.argument("args", nargs=-1, shell_complete=complete_ctl_words)
@click.option("--debug", is_flag=True, help="Show tracebacks with errors.")
def ctl(socket_path: str, command: str, args: tuple[str, ...], debug: bool) -> None:
    """Control a running `vmmig send` or `vmmig recv` started with --control SOCKET.

    \b
    vmmig ctl SOCKET status                        the current statistics as JSON (docs/STATS.md)
    vmmig ctl SOCKET set max-bandwidth 200M        change the cap (send; 0 = unlimited)
    vmmig ctl SOCKET set downtime-limit 500ms      change the downtime target (send --live)
    vmmig ctl SOCKET set auto-converge on          throttle the guest while it dirties too fast (send --live;
                                                   off: stop throttling; needs --pause-pid or --qmp)
    vmmig ctl SOCKET switchover                    pause now and finish, whatever the estimate says (send
                                                   --live; after the pass under way)
    vmmig ctl SOCKET cancel                        clean abort: guest resumed, DEST not published, both ends exit 9

    Changes take effect within 200 ms. Prints the reply as JSON on stdout.
    """
    import json

    from ..control import request

    if command == "set" and len(args) != 2:
        raise click.UsageError(f"usage: vmmig ctl SOCKET set NAME VALUE ({', '.join(SETTABLE)})")
    if command != "set" and args:
        raise click.UsageError(f"{command} takes no arguments")
    message: dict[str, Any] = {"command": command}
    if command == "set":
        message.update(name=args[0], value=args[1])

    def call() -> None:
        print(json.dumps(request(socket_path, message), indent=2))

    execute("ctl", debug, call)


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
    help="A DNS name or IP address to issue a certificate for (repeat for each host; not 'ca', each once).",
)
@click.option(
    "--days",
    type=click.IntRange(min=1, max=36500),
    default=825,
    show_default=True,
    help="Validity of host certificates.",
)
@click.option("--force", is_flag=True, help="Overwrite existing files.")
@click.option("--debug", is_flag=True, help="Show tracebacks with errors.")
def tls_init(directory: str, hosts: tuple[str, ...], days: int, force: bool, debug: bool) -> None:
    """Create a small CA and a certificate and key per host in DIR.

    \b
    Files: DIR/ca.pem (give to every host), DIR/ca.key (keep it safe: it signs certificates),
           DIR/NAME.pem and DIR/NAME.key for each --host NAME (keys are mode 0600).
    Certificates carry NAME as subject alternative name (DNS name, or IP address when NAME is one), are valid
    for both ends (server and client) and for --days days; keys are ECDSA P-256. NAME must be a DNS name (letters,
    digits and hyphens in dot-separated labels) or an IP address. The files are written all or none, never through
    a symlink found in DIR; existing ones are replaced only with --force.

    \b
    Example (two hosts):
      vmmig tls init pki --host src.example --host dst.example
      # copy pki/ca.pem + pki/dst.example.{pem,key} to dst:/etc/vmmig/tls, pki/ca.pem + pki/src.example.{pem,key}
      # to src:/etc/vmmig/tls; keep pki/ca.key off both
      dst$ vmmig recv --listen 0.0.0.0:4444 --tls-dir /etc/vmmig/tls --tls-peer-name src.example /dev/shm/vm.ram
      src$ vmmig send /dev/shm/vm.ram dst.example:4444 --tls-dir /etc/vmmig/tls
    """

    def call() -> None:
        from ..net.tls import init

        for path in init(directory, list(hosts), force=force, days=days):
            print(path)

    execute("tls init", debug, call)


@main.command()
@click.argument("image", metavar="IMAGE")
@click.option("--full", is_flag=True, help="Read the whole image instead of a sample.")
@click.option("--sample", "sample_bytes", type=SIZE, default="64MiB", show_default=True, help="How much to sample.")
@click.option("--dirty-for", type=DURATION, default=None, help="Also measure the dirty rate for this long (e.g. 10s).")
@click.option("--max-bandwidth", type=RATE, default="0", help="The link you will migrate over (for the forecast).")
@click.option("--threads", type=click.IntRange(min=1, max=256), default=None, help="[default: CPUs available]")
@click.option("--page-size", type=SIZE, default=str(DEFAULT_PAGE_SIZE), show_default=True, callback=page_size_option)
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

        from ..cpus import usable_cpus
        from ..sender.analyze import analyze as run
        from ..sender.analyze import render

        report = run(
            image, page_size, None if full else sample_bytes, threads or usable_cpus(), dirty_for, max_bandwidth
        )
        print(json.dumps(report, indent=2) if json_output else render(report))

    execute("analyze", debug, call)
