"""`vmmig save` and `vmmig restore`: a guest's memory to a snapshot file and back (docs/SNAPSHOT.md)."""

from __future__ import annotations

import json
import sys

import click

from ..wire import codec as codecs
from ..wire.frames import DEFAULT_PAGE_SIZE
from .app import main
from .params import EXIT_CODES_HELP, SIZE, execute, page_size_option


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("image", metavar="IMAGE")
@click.argument("file", metavar="FILE")
@click.option(
    "--compress",
    "codec",
    type=click.Choice(codecs.names()),
    default=codecs.DEFAULT_CODEC,
    show_default=True,
    help="Codec for page batches; a batch that does not shrink is stored raw whatever the codec.",
)
@click.option("--level", type=int, default=None, help="Compression level (zlib 1-9, zstd 1-19; default 1).")
@click.option(
    "--compress-threads",
    "threads",
    type=click.IntRange(min=1, max=256),
    default=None,
    help="Worker threads for zero-page scanning and compression [default: CPUs available].",
)
@click.option(
    "--page-size",
    type=SIZE,
    default=str(DEFAULT_PAGE_SIZE),
    show_default=True,
    callback=page_size_option,
    help="Page size: a power of two; the image must be a whole number of pages.",
)
@click.option("--force", is_flag=True, help="Replace an existing FILE and remove a leftover FILE.partial.")
@click.option("--json", "json_output", is_flag=True, help="Print one final JSON report on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No summary line (errors still print).")
@click.option("--debug", is_flag=True, help="Show tracebacks with errors.")
def save(
    image: str,
    file: str,
    codec: str,
    level: int | None,
    threads: int | None,
    page_size: int,
    force: bool,
    json_output: bool,
    quiet: bool,
    debug: bool,
) -> None:
    """Save the memory image IMAGE to the snapshot FILE: compressed frames, each page's fingerprint, an index and
    the image digest (docs/SNAPSHOT.md). Zero pages take no room.

    IMAGE must not change while it is saved (a stopped guest, or a copy). FILE is written as FILE.partial (created
    new) and renamed to FILE only once complete, synced and read back; an existing FILE is kept unless --force.

    \b
    Example:
      vmmig save /dev/shm/vm.ram vm.snap --compress zstd
      vmmig restore vm.snap /dev/shm/vm.ram
    """
    if level is not None:
        try:
            allowed = codecs.by_name(codec).levels
        except ValueError as exc:
            raise click.UsageError(str(exc)) from None
        if level not in allowed:
            raise click.UsageError(f"--level {level} is outside {allowed.start}..{allowed.stop - 1} for {codec}")

    def call() -> None:
        from ..cpus import usable_cpus
        from ..snapshot.writer import SaveOptions
        from ..snapshot.writer import save as run
        from ..units import format_bytes

        report = run(SaveOptions(image, file, codec, level, threads or usable_cpus(), page_size, force))
        if json_output:
            print(json.dumps({"outcome": "saved", **report.__dict__}, indent=2))
        elif not quiet:
            rate = report.image_bytes / max(report.seconds, 1e-9)
            print(
                f"vmmig save: {image} → {file}: {format_bytes(report.image_bytes)} in {format_bytes(report.file_bytes)}"
                f" ({report.zero_pages} of {report.pages} pages zero), codec {report.codec}:{report.level}, "
                f"{report.seconds:.2f} s, {format_bytes(rate)}/s",
                file=sys.stderr,
            )

    execute("save", debug, call)


@main.command(epilog=EXIT_CODES_HELP)
@click.argument("file", metavar="FILE")
@click.argument("dest", metavar="DEST", required=False)
@click.option("--check", is_flag=True, help="Verify FILE completely without writing anything (no DEST).")
@click.option(
    "--in-place",
    is_flag=True,
    help="Write into an existing DEST (file, memfd /proc/PID/fd/N, block device) of exactly the image size: no "
    "DEST.partial, no rename; on failure DEST is left modified (exit 13).",
)
@click.option("--force", is_flag=True, help="Overwrite an existing DEST and remove a leftover DEST.partial.")
@click.option("--sparse", is_flag=True, help="Do not preallocate: zero pages stay holes on disk file systems.")
@click.option(
    "--decompress-threads",
    "threads",
    type=click.IntRange(min=1, max=256),
    default=None,
    help="Worker threads for decompression [default: CPUs available].",
)
@click.option("--json", "json_output", is_flag=True, help="Print one final JSON report on stdout.")
@click.option("--quiet", "-q", is_flag=True, help="No summary line (errors still print).")
@click.option("--debug", is_flag=True, help="Show tracebacks with errors.")
def restore(
    file: str,
    dest: str | None,
    check: bool,
    in_place: bool,
    force: bool,
    sparse: bool,
    threads: int | None,
    json_output: bool,
    quiet: bool,
    debug: bool,
) -> None:
    """Restore the snapshot FILE into DEST, or verify it with --check.

    Every frame is checked as it is read, every page against its fingerprint as it lands, and the image digest
    at the end; DEST is written as DEST.partial and renamed only then. A truncated or foreign FILE is exit 3, a
    corrupt one exit 7, each naming the frame and its file offset; nothing is published.

    \b
    Examples:
      vmmig restore vm.snap /dev/shm/vm.ram
      vmmig restore --check vm.snap
    """
    if check == (dest is not None):
        raise click.UsageError("give DEST, or --check without DEST")
    if check and (in_place or force or sparse):
        raise click.UsageError("--check writes nothing: --in-place, --force and --sparse do not apply")
    if in_place and sparse:
        raise click.UsageError("--sparse allocates a new DEST: it does not apply with --in-place")

    def call() -> None:
        from ..cpus import usable_cpus
        from ..snapshot.restore import RestoreOptions
        from ..snapshot.restore import restore as run
        from ..units import format_bytes

        report = run(RestoreOptions(file, dest, threads or usable_cpus(), in_place, force, sparse))
        outcome = "verified" if dest is None else "restored"
        if json_output:
            print(json.dumps({"outcome": outcome, **report.__dict__}, indent=2))
        elif not quiet:
            rate = report.image_bytes / max(report.seconds, 1e-9)
            target = f" → {dest}" if dest is not None else ""
            print(
                f"vmmig restore: {file}{target}: {outcome}, {format_bytes(report.image_bytes)} "
                f"({report.frames} frames), codec {report.codec}, {report.seconds:.2f} s, {format_bytes(rate)}/s",
                file=sys.stderr,
            )

    execute("restore", debug, call)
