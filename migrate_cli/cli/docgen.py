"""Generate the command reference from the click definitions: the marked regions of docs/CLI.md (per command its
usage line and options table) and the man pages docs/man/vmmig.1 and docs/man/vmmig-<command>.1.

    python -m migrate_cli.cli.docgen            # rewrite what is stale (`make docs`)
    python -m migrate_cli.cli.docgen --check    # exit 1 naming each stale file (tests/test_docgen.py)

A developer tool: vmmig never imports it. Only text between ``<!-- BEGIN GENERATED: <command> options -->`` (or
``synopsis``: every usage line) and ``<!-- END GENERATED -->`` in docs/CLI.md is replaced; the narrative around it
is written by hand.
"""

from __future__ import annotations

import argparse
import inspect
import re
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import click

from ..errors import ExitCode
from . import main
from .environment import COMMANDS as ENV_COMMANDS
from .environment import PREFIX, SHARED

ROOT = Path(__file__).resolve().parents[2]
REGION = re.compile(r"(<!-- BEGIN GENERATED: (?P<name>[a-z ]+) -->\n).*?(<!-- END GENERATED -->)", re.S)
EXTRA = re.compile(r"\s*\[(?P<extra>[^\[\]]*)\]\s*$")  # click's "[env var: ...; default: ...]" after a help text


@dataclass(frozen=True)
class OptionDoc:
    names: str  # "-q, --quiet" or "--listen HOST:PORT|unix:PATH"
    help: str
    env: str
    default: str


def commands(
    group: click.Group = main, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], click.Command]]:
    """Every command under ``vmmig`` by its path (("tls", "init") for a nested group's), sorted by name."""
    for name in sorted(group.commands):
        cmd = group.commands[name]
        if isinstance(cmd, click.Group):
            yield from commands(cmd, (*prefix, name))
        else:
            yield (*prefix, name), cmd


def context(path: tuple[str, ...]) -> click.Context:
    ctx = click.Context(main, info_name="vmmig", **main.context_settings)  # -h beside --help, as vmmig has
    group: click.Command = main
    for name in path:
        assert isinstance(group, click.Group)
        group = group.commands[name]
        ctx = click.Context(group, info_name=name, parent=ctx)
    return ctx


def usage(path: tuple[str, ...]) -> str:
    ctx = context(path)
    return " ".join(["vmmig", *path, *ctx.command.collect_usage_pieces(ctx)])


def options(path: tuple[str, ...]) -> list[OptionDoc]:
    """The options as `--help` shows them, with click's bracketed extras split into env variable and default."""
    ctx = context(path)
    found = []
    for param in ctx.command.get_params(ctx):
        record = param.get_help_record(ctx) if isinstance(param, click.Option) else None
        if record is None:
            continue
        names, text = record
        env = default = ""
        while (match := EXTRA.search(text)) is not None:
            text = text[: match.start()]
            for part in match.group("extra").split("; "):
                key, _, value = part.partition(": ")
                if key == "env var":
                    env = value
                elif key == "default":
                    default = value
                elif key == "required":
                    default = "required"
        found.append(OptionDoc(names, " ".join(text.split()), env, default))
    return found


def short_help(cmd: click.Command) -> str:
    """The docstring's first paragraph (click's short help would cut it at an "e.g.")."""
    return paragraphs(cmd)[0][1].rstrip(".")


def paragraphs(cmd: click.Command) -> list[tuple[bool, str]]:
    """The command's docstring as (preformatted, text) paragraphs: click's ``\\b`` marks one to keep as it is."""
    text = inspect.cleandoc((cmd.help or "").split("\f", 1)[0])
    found = []
    for block in re.split(r"\n\s*\n", text.strip()):
        if block.startswith("\b"):
            found.append((True, block[1:].strip("\n")))
        elif block.strip():
            found.append((False, " ".join(block.split())))
    return found


# docs/CLI.md


def cell(text: str) -> str:
    return text.replace("|", "\\|")


def markdown(path: tuple[str, ...]) -> str:
    lines = ["```", usage(path), "```", "", "| option | env variable | default | help |", "|---|---|---|---|"]
    for opt in options(path):
        env = ", ".join(f"`{name}`" for name in opt.env.split(", ")) if opt.env else ""
        default = f"`{opt.default}`" if opt.default else ""
        lines.append(f"| `{cell(opt.names)}` | {env} | {cell(default)} | {cell(opt.help)} |")
    return "\n".join(lines) + "\n"


def synopsis() -> str:
    lines = ["```", *(usage(path) for path, _ in commands())]
    lines += ["vmmig --version        # also prints the wire protocol version"]
    lines += ["vmmig COMMAND --help   # or -h; man vmmig-COMMAND (docs/man)", "```"]
    return "\n".join(lines) + "\n"


def cli_md(text: str) -> str:
    """docs/CLI.md with each marked region rewritten; a command without a region, or a region without a command,
    is an error (the reference would silently miss it)."""
    wanted = {f"{' '.join(path)} options": path for path, _ in commands()}
    seen = set()

    def fill(match: re.Match[str]) -> str:
        name = match.group("name")
        if name == "synopsis":
            return match.group(1) + synopsis() + match.group(3)
        if name not in wanted:
            raise SystemExit(f"docs/CLI.md: a generated region {name!r}, but there is no such vmmig command")
        seen.add(name)
        return match.group(1) + markdown(wanted[name]) + match.group(3)

    result = REGION.sub(fill, text)
    missing = sorted(set(wanted) - seen)
    if missing:
        raise SystemExit(f"docs/CLI.md: no '<!-- BEGIN GENERATED: ... -->' region for {missing}")
    return result


# man pages


def roff(text: str) -> str:
    """Escape for roff: backslashes and hyphens, and a line that would start with a control character."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return "\n".join("\\&" + line if line.startswith((".", "'")) else line for line in text.split("\n"))


def man_name(path: tuple[str, ...]) -> str:
    return "-".join(("vmmig", *path))


def man_description(cmd: click.Command) -> list[str]:
    lines = [".SH DESCRIPTION"]
    for preformatted, text in paragraphs(cmd):
        lines += [".PP", ".nf", roff(text), ".fi"] if preformatted else [".PP", roff(text)]
    return lines


def man_header(name: str, summary: str) -> list[str]:
    return [
        '.\\" Generated by python -m migrate_cli.cli.docgen from the click definitions: do not edit.',
        f'.TH {name.upper()} 1 "" "vmmig" "vmmig manual"',
        ".SH NAME",
        f"{roff(name)} \\- {roff(summary)}",
    ]


def see_also(own: str) -> list[str]:
    pages = ["vmmig", *(man_name(path) for path, _ in commands())]
    return [".SH SEE ALSO", ",\n".join(f".BR {page} (1)" for page in pages if page != own), "", "docs/CLI.md"]


def man_page(path: tuple[str, ...], cmd: click.Command) -> str:
    name = man_name(path)
    lines = man_header(name, short_help(cmd))
    lines += [".SH SYNOPSIS", f".B {roff(usage(path))}", *man_description(cmd), ".SH OPTIONS"]
    docs = options(path)
    for opt in docs:
        extra = f" [default: {opt.default}]" if opt.default else ""
        lines += [".TP", f".B {roff(opt.names)}", roff(opt.help + extra)]
    if path and path[0] in ENV_COMMANDS:
        lines += [
            ".SH ENVIRONMENT",
            roff(
                f"Each option below can be set as {PREFIX}_{path[0].upper()}_<OPTION>; an option on the command "
                "line wins. Those that authorise, destroy or name a guest have no variable."
            ),
        ]
        for opt in docs:
            if opt.env:
                lines += [".TP", f".B {roff(opt.env)}", roff(opt.names.split()[0])]
    lines += [".SH EXIT STATUS", "See", ".BR vmmig (1)."]
    return "\n".join(lines + see_also(name)) + "\n"


def main_page() -> str:
    lines = man_header("vmmig", short_help(main))
    lines += [".SH SYNOPSIS", ".B vmmig [OPTIONS] COMMAND [ARGS]...", *man_description(main), ".SH COMMANDS"]
    for path, cmd in commands():
        lines += [".TP", f".BR {man_name(path)} (1)", roff(f"vmmig {' '.join(path)}: {short_help(cmd)}.")]
    lines += [".SH OPTIONS"]
    for opt in options(()):
        lines += [".TP", f".B {roff(opt.names)}", roff(opt.help)]
    shared = ", ".join(SHARED.values())
    lines += [
        ".SH ENVIRONMENT",
        roff(
            f"Options of send and recv can be set as {PREFIX}_SEND_<OPTION> and {PREFIX}_RECV_<OPTION> (the long "
            f"name upper-cased, hyphens to underscores), and {shared} for both; see each command's page."
        ),
        ".SH EXIT STATUS",
    ]
    for code in ExitCode:
        lines += [".TP", f".B {int(code)}", roff(code.name.lower().replace("_", "-"))]
    lines += [".PP", roff("The causes of each: docs/CLI.md, section Exit codes.")]
    return "\n".join(lines + see_also("vmmig")) + "\n"


def render(root: Path) -> dict[Path, str]:
    """Every generated file under ``root`` with the content it should have."""
    files = {root / "docs" / "CLI.md": cli_md((root / "docs" / "CLI.md").read_text())}
    files[root / "docs" / "man" / "vmmig.1"] = main_page()
    for path, cmd in commands():
        files[root / "docs" / "man" / f"{man_name(path)}.1"] = man_page(path, cmd)
    return files


def stale(root: Path) -> tuple[dict[Path, str], list[Path]]:
    """The files whose content differs from what the click definitions give, and man pages of no command."""
    files = render(root)
    changed = {path: text for path, text in files.items() if not path.is_file() or path.read_text() != text}
    extra = sorted(set((root / "docs" / "man").glob("vmmig*.1")) - set(files))
    return changed, extra


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m migrate_cli.cli.docgen", description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 naming each stale file")
    parser.add_argument("--root", type=Path, default=ROOT, help="the source tree (default: this checkout)")
    args = parser.parse_args(argv)
    changed, extra = stale(args.root)
    for path in [*changed, *extra]:
        name = path.relative_to(args.root)
        if args.check:
            print(f"stale: {name} (run `make docs`)", file=sys.stderr)
        elif path in changed:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(changed[path])
            print(f"wrote {name}")
        else:
            path.unlink()
            print(f"removed {name}")
    return 1 if args.check and (changed or extra) else 0


if __name__ == "__main__":
    sys.exit(run())
