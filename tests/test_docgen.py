"""The reference made from the click definitions stays in step with them: docs/CLI.md's generated regions and the
man pages are what `make docs` writes, usage lines say what each command accepts, the exit-code table is in the
group's help only, and `vmmig ctl SOCKET <TAB>` completes its commands."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from migrate_cli.cli import main
from migrate_cli.cli.docgen import commands, man_name

ROOT = Path(__file__).resolve().parent.parent
VMMIG = str(Path(sys.executable).with_name("vmmig"))


def docgen(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "migrate_cli.cli.docgen", *args], capture_output=True, text=True, timeout=60
    )


def copy_docs(tmp_path: Path) -> Path:
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    return tmp_path


def test_the_generated_docs_and_man_pages_are_up_to_date() -> None:
    result = docgen("--check")
    assert result.returncode == 0, f"run `make docs` and commit the result:\n{result.stderr}"


def test_the_check_names_a_stale_file_and_writing_makes_it_current(tmp_path: Path) -> None:
    root = copy_docs(tmp_path)
    page = root / "docs" / "man" / "vmmig-recv.1"
    page.write_text(page.read_text().replace("Receive one migration", "Take one migration"))
    cli_md = root / "docs" / "CLI.md"
    cli_md.write_text(cli_md.read_text().replace("`VMMIG_SEND_MAX_BANDWIDTH`", "`VMMIG_SEND_CAP`"))

    stale = docgen("--check", "--root", str(root))
    assert stale.returncode == 1
    assert "docs/man/vmmig-recv.1" in stale.stderr and "docs/CLI.md" in stale.stderr
    assert "vmmig-send.1" not in stale.stderr

    assert docgen("--root", str(root)).returncode == 0
    assert docgen("--check", "--root", str(root)).returncode == 0
    assert "Receive one migration" in page.read_text()


def test_the_generator_rewrites_only_the_marked_regions_of_cli_md(tmp_path: Path) -> None:
    root = copy_docs(tmp_path)
    cli_md = root / "docs" / "CLI.md"
    text = cli_md.read_text().replace("## Addresses\n", "## Addresses\n\nA hand-written line stays.\n")
    cli_md.write_text(text)
    assert docgen("--root", str(root)).returncode == 0
    assert cli_md.read_text() == text


def test_every_command_has_a_man_page_and_a_man_page_for_no_command_is_stale(tmp_path: Path) -> None:
    pages = {p.name for p in (ROOT / "docs" / "man").glob("*.1")}
    assert pages == {"vmmig.1", *(f"{man_name(path)}.1" for path, _ in commands())}
    assert "vmmig-tls-init.1" in pages
    root = copy_docs(tmp_path)
    (root / "docs" / "man" / "vmmig-gone.1").write_text(".TH VMMIG-GONE 1\n")
    stale = docgen("--check", "--root", str(root))
    assert stale.returncode == 1 and "docs/man/vmmig-gone.1" in stale.stderr


def help_text(*path: str) -> str:
    result = CliRunner().invoke(main, [*path, "--help"], prog_name="vmmig")
    assert result.exit_code == 0, result.output
    return result.output


def test_the_exit_code_table_is_in_the_group_help_and_not_repeated_under_each_command() -> None:
    assert "Exit codes:" in help_text()
    for path, _ in commands():
        assert "Exit codes:" not in help_text(*path), path


def test_usage_lines_say_what_an_option_replaces() -> None:
    assert "Usage: vmmig recv [OPTIONS] (DEST | --discard)" in help_text("recv")
    assert "Usage: vmmig restore [OPTIONS] FILE (DEST | --check)" in help_text("restore")
    ctl = " ".join(help_text("ctl").split())
    assert "Usage: vmmig ctl [OPTIONS] SOCKET (status | set NAME VALUE | switchover | cancel)" in ctl


def complete(line: str) -> list[str]:
    """What bash completion offers for the last word of ``line`` (empty when it ends in a space)."""
    words = line.split()
    cword = len(words) if line.endswith(" ") else len(words) - 1
    env = {**os.environ, "COMP_WORDS": line, "COMP_CWORD": str(cword), "_VMMIG_COMPLETE": "bash_complete"}
    out = subprocess.run([VMMIG], env=env, capture_output=True, text=True, timeout=60, check=True).stdout
    return [row.split(",", 1)[1] for row in out.splitlines()]


def test_ctl_completes_its_commands_then_the_settable_names() -> None:
    assert complete("vmmig ctl /tmp/s ") == ["status", "set", "switchover", "cancel"]
    assert complete("vmmig ctl /tmp/s s") == ["status", "set", "switchover"]
    assert complete("vmmig ctl /tmp/s set ") == ["max-bandwidth", "downtime-limit", "auto-converge"]
    assert complete("vmmig ctl /tmp/s set auto-converge ") == ["on", "off"]
