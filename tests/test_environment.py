"""Options of `vmmig send` and `vmmig recv` from VMMIG_SEND_* / VMMIG_RECV_* variables, never those that authorise
or destroy; and the stop-and-copy notice. (tests/conftest.py clears every VMMIG_* variable for every test.)"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

import click
import pytest

from migrate_cli.cli import environment, main

from .conftest import ROOT, Processes, json_report

ALWAYS_DENIED = ["--force", "--insecure", "--in-place", "--resume", "--discard"]


def options_of(name: str) -> dict[str, click.Option]:
    command = main.commands[name]
    found = {}
    for param in command.params:
        if isinstance(param, click.Option) and (long := environment.long_name(param)) is not None:
            found[long] = param
    return found


def help_of(name: str) -> str:
    command = main.commands[name]
    return command.get_help(click.Context(command, info_name=name))


def test_the_suite_runs_with_no_vmmig_variable_set() -> None:
    assert not [name for name in os.environ if name.startswith("VMMIG_")]


def test_a_send_option_is_read_from_its_variable_and_the_command_line_wins(
    procs: Processes, tmp_path: Path, image_8m: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VMMIG_SEND_MAX_BANDWIDTH", "1Gbit")
    monkeypatch.setenv("VMMIG_SEND_COMPRESS", "zstd")
    monkeypatch.setenv("VMMIG_SEND_JSON", "1")
    recv = procs.recv(tmp_path / "dest.img")
    code, out, err = procs.send(image_8m, recv.address, "--compress", "none").wait()
    assert code == 0, err
    assert recv.wait()[0] == 0
    report = json_report(out)  # --json came from VMMIG_SEND_JSON
    assert report["max-bandwidth"] == 125_000_000
    assert report["codec"] == "none"


def test_a_recv_option_is_read_from_its_variable(
    procs: Processes, tmp_path: Path, image_8m: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ready = tmp_path / "ready"
    dest = tmp_path / "dest.img"
    monkeypatch.setenv("VMMIG_RECV_LISTEN", "127.0.0.1:0")
    monkeypatch.setenv("VMMIG_RECV_READY_FILE", str(ready))
    recv = procs.start("recv", str(dest))
    deadline = time.monotonic() + 20
    while not ready.exists():
        assert recv.popen.poll() is None and time.monotonic() < deadline, "recv did not write VMMIG_RECV_READY_FILE"
        time.sleep(0.05)
    address = ready.read_text().strip()
    assert address.startswith("127.0.0.1:") and not address.endswith(":4444"), "port 0 came from VMMIG_RECV_LISTEN"
    code, _, err = procs.send(image_8m, address).wait()
    assert code == 0, err
    assert recv.wait()[0] == 0
    assert dest.read_bytes() == image_8m.read_bytes()


def test_a_bad_value_in_a_variable_is_a_usage_error_naming_the_variable(
    procs: Processes, image_8m: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VMMIG_SEND_MAX_BANDWIDTH", "100Mb")
    code, _, err = procs.send(image_8m, "127.0.0.1:9").wait()
    assert code == 2
    assert "VMMIG_SEND_MAX_BANDWIDTH" in err and "write 100MB for bytes or 100Mbit for bits" in err


def test_force_and_insecure_are_not_read_from_the_environment(
    procs: Processes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for option in ALWAYS_DENIED:
        monkeypatch.setenv(environment.variable("recv", option), "1")
    dest = tmp_path / "dest.img"
    dest.write_bytes(b"kept")
    code, _, err = procs.run("recv", "--listen", "127.0.0.1:0", str(dest))
    assert code == 4 and "--force" in err, err  # not forced, not discarded, not resumed: DEST exists
    assert dest.read_bytes() == b"kept"
    code, _, err = procs.run("recv", "--listen", "0.0.0.0:0", str(tmp_path / "other.img"))
    assert code == 2 and "without TLS" in err, err


@pytest.mark.parametrize("name", environment.COMMANDS)
def test_options_that_authorise_or_destroy_have_no_variable(name: str) -> None:
    options = options_of(name)
    for option in ALWAYS_DENIED:
        assert option in environment.DENIED
    for option in sorted(set(environment.DENIED) & set(options)):
        param = options[option]
        assert param.envvar is None and not param.allow_from_autoenv, f"vmmig {name} {option}"
        assert not re.search(rf"\b{environment.variable(name, option)}\b", help_of(name)), f"vmmig {name} {option}"


@pytest.mark.parametrize("name", environment.COMMANDS)
def test_every_other_option_has_a_variable_named_after_it_shown_in_help(name: str) -> None:
    shown = help_of(name)
    for option, param in options_of(name).items():
        if option in environment.DENIED or option == "--help":
            continue
        wanted = environment.variable(name, option)
        envvars = [param.envvar] if isinstance(param.envvar, str) else list(param.envvar or [])
        assert envvars[0] == wanted, f"vmmig {name} {option}"
        assert wanted in shown, f"vmmig {name} --help does not show {wanted}"
    assert environment.variable(name, "--max-bandwidth" if name == "send" else "--listen") in shown


@pytest.mark.parametrize("name", environment.COMMANDS)
def test_the_tls_directory_and_host_variables_are_shared_by_both_ends(name: str) -> None:
    options = options_of(name)
    assert options["--tls-dir"].envvar == [f"VMMIG_{name.upper()}_TLS_DIR", "VMMIG_TLS_DIR"]
    assert options["--tls-host"].envvar == [f"VMMIG_{name.upper()}_TLS_HOST", "VMMIG_TLS_HOST"]


def test_cli_md_lists_exactly_the_options_never_read_from_the_environment() -> None:
    text = (ROOT / "docs" / "CLI.md").read_text()
    start = text.index("\n## Environment\n")
    section = text[start : text.index("\n## ", start + 1)]
    listed = set(re.findall(r"`(--[a-z-]+)`", section.split("Never read from the environment", 1)[1]))
    assert listed == set(environment.DENIED)


# --- the stop-and-copy notice ----------------------------------------------------------------------------------------

NOTICE = "vmmig send: stop-and-copy: the guest stays paused for the whole transfer (--live migrates it while it runs)"
HOOKS = ["--pause-cmd", "true", "--unpause-cmd", "true"]


@pytest.mark.parametrize(
    ("extra", "notices"),
    [
        pytest.param(HOOKS, 1, id="pause-hooks-without-live"),
        pytest.param([*HOOKS, "--quiet"], 0, id="quiet"),
        pytest.param([*HOOKS, "--live"], 0, id="live"),
        pytest.param([], 0, id="no-pause-option"),
    ],
)
def test_a_pause_option_without_live_says_once_that_the_guest_stays_paused(
    procs: Processes, tmp_path: Path, image_8m: Path, extra: list[str], notices: int
) -> None:
    recv = procs.recv(tmp_path / "dest.img")
    code, _, err = procs.send(image_8m, recv.address, *extra).wait()
    assert code == 0, err
    assert recv.wait()[0] == 0
    assert err.splitlines().count(NOTICE) == notices, err
