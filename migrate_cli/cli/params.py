"""Option types (sizes, rates, durations), the options every command shares, and how a command's outcome
becomes one stderr line and an exit code."""

from __future__ import annotations

import signal
import sys
import traceback
from collections.abc import Callable
from types import FrameType
from typing import Any, NoReturn

import click

from ..errors import ExitCode, Interrupted, MigrateError
from ..units import parse_duration, parse_rate, parse_size
from ..wire.frames import DEFAULT_PAGE_SIZE, check_page_size


class UnitType(click.ParamType):
    """A click type for one of units.py's parsers (sizes, rates, durations): its error is click's usage error.

    ``positive``: 0 is refused too (a timeout of 0 would make a socket non-blocking, or give up before trying)."""

    def __init__(self, name: str, parse: Callable[[str], Any], parsed: type, positive: bool = False) -> None:
        self.name = name
        self._parse = parse
        self._parsed = parsed  # a value of this type (a default given as a number) is taken as it is
        self._positive = positive

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value is None:
            return value
        if not isinstance(value, self._parsed):
            try:
                value = self._parse(str(value))
            except ValueError as exc:
                self.fail(str(exc), param, ctx)
        if self._positive and not value > 0:
            self.fail(f"must be more than 0, not {value:g}", param, ctx)
        return value


SIZE = UnitType("SIZE", parse_size, int)
RATE = UnitType("RATE", parse_rate, int)
DURATION = UnitType("DURATION", parse_duration, float)
TIMEOUT = UnitType("DURATION", parse_duration, float, positive=True)  # a bound on a wait: 0 is not one


def page_size_option(ctx: click.Context, param: click.Parameter, value: int) -> int:
    try:
        check_page_size(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


def tls_options(
    cert: str | None,
    key: str | None,
    ca: str | None,
    peer_name: str | None,
    directory: str | None = None,
    host: str | None = None,
) -> Any:
    from ..net.tls import TlsOptions

    try:
        return TlsOptions.from_cli(cert, key, ca, peer_name, directory, host)
    except MigrateError as exc:
        raise click.UsageError(str(exc)) from None


_signalled: list[int] = []  # the first SIGINT/SIGTERM of this process, once it arrived


def raise_interrupted(signum: int, frame: FrameType | None) -> None:
    """The first signal stops the migration (cleanup runs as after any error); later ones are ignored, because
    raising again would cut that cleanup short, and it is what resumes a paused guest. SIGKILL still ends us."""
    if _signalled:
        return
    _signalled.append(signum)
    raise Interrupted(signum, signal.Signals(signum).name)


def execute(command: str, debug: bool, call: Callable[[], Any]) -> NoReturn:
    """Run a command body; turn its outcome into one stderr line and an exit code."""
    signal.signal(signal.SIGINT, raise_interrupted)
    signal.signal(signal.SIGTERM, raise_interrupted)
    code = int(ExitCode.OK)
    try:
        call()
    except MigrateError as exc:
        if debug:
            traceback.print_exc()
            detail = getattr(exc, "detail", None)
            if detail:
                print(detail, file=sys.stderr)
        print(f"vmmig {command}: {exc}", file=sys.stderr)
        code = int(exc.exit_code)
    except Exception as exc:  # a bug: say so, in one line unless --debug
        if debug:
            traceback.print_exc()
        print(f"vmmig {command}: internal error: {type(exc).__name__}: {exc} (rerun with --debug)", file=sys.stderr)
        code = int(ExitCode.INTERNAL)
    # Only exiting is left. CPython puts the default handlers back while it shuts down, so a signal arriving now
    # would kill the process with the wrong status after its cleanup is done; ignored handlers it leaves alone.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sys.exit(code)


EXIT_CODES_HELP = "\b\nExit codes:\n" + "\n".join(
    f"  {int(c):>3}  {c.name.lower().replace('_', '-')}" for c in ExitCode
)

common_options = [
    click.option(
        "--io-timeout", type=TIMEOUT, default="30s", show_default=True, help="Fail when the peer is silent this long."
    ),
    click.option("--json", "json_output", is_flag=True, help="Print one final JSON report on stdout."),
    click.option("--quiet", "-q", is_flag=True, help="No progress display and no summary line (errors still print)."),
    click.option("--debug", is_flag=True, help="Show tracebacks with errors."),
    click.option(
        "--verbose", "-v", is_flag=True, help="Without a terminal: also print each phase (connected, allocated, ...)."
    ),
    click.option(
        "--tls-dir",
        type=click.Path(file_okay=False),
        default=None,
        metavar="DIR",
        help="TLS from a `vmmig tls init` directory: DIR/ca.pem and this host's DIR/HOST.pem and DIR/HOST.key. "
        "--tls-cert, --tls-key and --tls-ca, when given, win over its files.",
    ),
    click.option(
        "--tls-host",
        default=None,
        metavar="HOST",
        help="Which HOST.pem/HOST.key pair of --tls-dir is this end's [default: the only one there].",
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
        type=TIMEOUT,
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
    click.option(
        "--metrics",
        "metrics_path",
        type=click.Path(dir_okay=False),
        default=None,
        metavar="FILE",
        help="Write Prometheus metrics to FILE (text format, replaced atomically once a second and at exit, for "
        "node_exporter's textfile collector; docs/STATS.md).",
    ),
]


def with_common(func: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(common_options):
        func = option(func)
    return func


# Options that mean the same on several commands (send and save; recv and restore): one definition each, so that
# their help, defaults and checks cannot drift apart. A click decorator makes a new Option each time it is applied.
level_option = click.option(
    "--level", type=int, default=None, help="Compression level (zlib 1-9, zstd 1-19; default 1)."
)
compress_threads_option = click.option(
    "--compress-threads",
    "threads",
    type=click.IntRange(min=1, max=256),
    default=None,
    help="Worker threads for zero-page scanning and compression [default: CPUs available].",
)
decompress_threads_option = click.option(
    "--decompress-threads",
    "threads",
    type=click.IntRange(min=1, max=256),
    default=None,
    help="Worker threads for decompression [default: CPUs available].",
)
page_size_opt = click.option(
    "--page-size",
    type=SIZE,
    default=str(DEFAULT_PAGE_SIZE),
    show_default=True,
    callback=page_size_option,
    help="Page size: a power of two; the image must be a whole number of pages.",
)
sparse_option = click.option(
    "--sparse", is_flag=True, help="Do not preallocate: zero pages stay holes on disk file systems."
)
libvirt_uri_option = click.option(
    "--libvirt-uri",
    default=None,
    metavar="URI",
    help="The libvirt connection of a libvirt:DOMAIN guest: a local one (qemu:///system, qemu:///session; a remote "
    "URI is refused, since vmmig maps the guest's RAM on this host). [default: libvirt's own, LIBVIRT_DEFAULT_URI "
    "included]",
)
