"""The documentation stays complete and short: every option of every command is in docs/CLI.md, every option
docs/CLI.md lists for send and recv exists, and README.md starts with `make demo` / `make test` and stays brief."""

from __future__ import annotations

import re
from pathlib import Path

import click
import pytest

from migrate_cli.cli import main

ROOT = Path(__file__).resolve().parent.parent
CLI_MD = ROOT / "docs" / "CLI.md"
README = ROOT / "README.md"
README_MAX_LINES = 160

# The commands docs/CLI.md documents, by their path under `vmmig`, with the heading of their section there.
COMMANDS = {
    ("send",): "## vmmig send",
    ("recv",): "## vmmig recv",
    ("ctl",): "## vmmig ctl",
    ("tls", "init"): "## vmmig tls init",
    ("analyze",): "## vmmig analyze",
    ("save",): "## vmmig save",
    ("restore",): "## vmmig restore",
}
OPTION = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def command(path: tuple[str, ...]) -> click.Command:
    found: click.Command = main
    for name in path:
        assert isinstance(found, click.Group), f"{found.name} has no subcommands"
        found = found.commands[name]
    return found


def long_options(cmd: click.Command) -> set[str]:
    """The long option names the command accepts (aliases included; --help is click's own)."""
    names = {"--help"}
    for param in cmd.params:
        if isinstance(param, click.Option):
            names.update(n for n in param.opts + param.secondary_opts if n.startswith("--"))
    return names


def section(heading: str) -> str:
    """The text of docs/CLI.md from ``heading`` to the next heading of the same level."""
    text = CLI_MD.read_text()
    start = text.index(heading + "\n")
    end = text.find("\n## ", start + len(heading))
    return text[start : end if end != -1 else len(text)]


def first_column_options(text: str) -> set[str]:
    """The options named in the first cell of the section's table rows: the options the section documents (a
    mention in another option's meaning does not count)."""
    found: set[str] = set()
    for line in text.splitlines():
        if line.startswith("|") and not line.startswith("|---"):
            found.update(OPTION.findall(line.split("|")[1]))
    return found


def test_every_command_documented_here_is_still_a_command() -> None:
    for path in COMMANDS:
        assert isinstance(command(path), click.Command)


@pytest.mark.parametrize("path", list(COMMANDS), ids=" ".join)
def test_every_option_of_a_command_has_a_row_in_its_cli_md_section(path: tuple[str, ...]) -> None:
    documented = first_column_options(section(COMMANDS[path]))
    missing = sorted(long_options(command(path)) - documented)
    assert not missing, f"vmmig {' '.join(path)}: options missing from docs/CLI.md ({COMMANDS[path]}): {missing}"


@pytest.mark.parametrize("path", [("send",), ("recv",)], ids=" ".join)
def test_every_option_cli_md_lists_for_send_and_recv_exists(path: tuple[str, ...]) -> None:
    listed = first_column_options(section(COMMANDS[path]))
    assert listed, "the section's option table was not found"
    unknown = sorted(listed - long_options(command(path)))
    assert not unknown, f"docs/CLI.md lists options vmmig {' '.join(path)} does not take: {unknown}"


def test_every_command_in_the_group_is_documented() -> None:
    """A new command (or subcommand) gets a section in docs/CLI.md too."""

    def paths(group: click.Group, prefix: tuple[str, ...]) -> list[tuple[str, ...]]:
        found = []
        for name, cmd in group.commands.items():
            if isinstance(cmd, click.Group):
                found += paths(cmd, (*prefix, name))
            else:
                found.append((*prefix, name))
        return found

    assert sorted(paths(main, ())) == sorted(COMMANDS)


def readme_commands() -> list[str]:
    """The commands in README.md's fenced code blocks, in order, without comments or blank lines."""
    commands, in_block = [], False
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            in_block = not in_block
            continue
        if in_block:
            text = line.split("#", 1)[0].strip()
            if text:
                commands.append(text)
    return commands


def test_readme_starts_with_make_demo_then_make_test() -> None:
    assert readme_commands()[:2] == ["make demo", "make test"]


def test_readme_is_short() -> None:
    lines = len(README.read_text().splitlines())
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines: move reference material to docs/"


def anchors(path: Path) -> set[str]:
    """The anchors GitHub makes of a Markdown file's headings: lower case, punctuation dropped, spaces to hyphens."""
    found, in_block = set(), False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            in_block = not in_block
        elif not in_block and line.startswith("#"):
            title = line.lstrip("#").strip().lower()
            found.add(re.sub(r"[^\w\- ]", "", title).replace(" ", "-"))
    return found


@pytest.mark.parametrize("page", [README, *sorted((ROOT / "docs").glob("*.md"))], ids=lambda p: p.name)
def test_code_blocks_are_closed_and_relative_links_resolve(page: Path) -> None:
    text = page.read_text()
    fences = [line for line in text.splitlines() if line.startswith("```")]
    assert len(fences) % 2 == 0, f"{page.name} has an unclosed code block"
    for target, anchor in re.findall(r"\]\(([^):#]*)(?:#([^)]*))?\)", text):
        linked = (page.parent / target).resolve() if target else page
        assert linked.is_file(), f"{page.name} links to {target}, which does not exist"
        if anchor and linked.suffix == ".md":
            assert anchor in anchors(linked), f"{page.name} links to {target}#{anchor}: no such heading"
