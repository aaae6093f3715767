"""--metrics FILE: the Prometheus text format, parsed back with prometheus_client's own parser; written whole and
replaced atomically (never through a planted name); vmmig_up 1 while a real migration runs, then its final values
with vmmig_up 0 and the exit code, after success, a failure and a signal."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from migrate_cli.errors import ExitCode, NetworkError, UsageError
from migrate_cli.metrics import EXIT_CODE, METRICS, UP, MetricsFile, render
from migrate_cli.stats import Snapshot, Stats

from .conftest import ROOT, Processes, make_image

ISSUE_NAMES = {
    "vmmig_transferred_bytes_total", "vmmig_image_bytes_total", "vmmig_remaining_bytes", "vmmig_zero_pages_total",
    "vmmig_pass", "vmmig_dirty_rate_bytes_per_second", "vmmig_expected_downtime_seconds", "vmmig_throttle_ratio",
    "vmmig_max_bandwidth_bytes_per_second", "vmmig_up", "vmmig_exit_code",
}  # fmt: skip
ALL_NAMES = {m.name for m in METRICS} | {UP[0], EXIT_CODE[0]}


def parse(text: str) -> dict[str, tuple[str, str, list[tuple[dict[str, str], float]]]]:
    """Sample name -> (type, help, [(labels, value)]), as prometheus_client reads the text."""
    found: dict[str, tuple[str, str, list[tuple[dict[str, str], float]]]] = {}
    for family in text_string_to_metric_families(text):
        name = family.name + ("_total" if family.type == "counter" else "")  # the parser drops a counter's _total
        found[name] = (family.type, family.documentation, [(s.labels, s.value) for s in family.samples])
    return found


def values(path: Path) -> dict[str, float]:
    """The one sample of each metric in FILE (a metric without a sample is left out)."""
    return {name: samples[0][1] for name, (_t, _h, samples) in parse(path.read_text()).items() if samples}


def labels_of(path: Path) -> dict[str, str]:
    return parse(path.read_text())["vmmig_up"][2][0][0]


def test_the_exposition_parses_back_with_help_type_labels_and_values() -> None:
    snap = Snapshot(
        elapsed=2.0, image_bytes=1 << 20, done_bytes=3 << 18, wire_bytes=700_000, zero_pages=17, normal_pages=175,
        page_size=4096, raw_batches=1, compressed_batches=2, payload_bytes=600_000, pass_number=2,
        pass_total_bytes=1 << 19, pass_done_bytes=1 << 18, status="active", dirty_rate=12_345.5,
        expected_downtime=0.25, throttle=30, cap=4_000_000,
    )  # fmt: skip
    labels = {"role": "send", "session": 'odd "name" \\ with\nnewline', "codec": "zstd"}
    parsed = parse(render(snap, labels, None))
    assert ISSUE_NAMES - {"vmmig_exit_code"} <= set(parsed), "every metric the issue names is there"
    for name, (kind, help_text, samples) in parsed.items():
        assert kind == ("counter" if name.endswith("_total") else "gauge"), name
        assert help_text, f"{name} has a HELP line"
        assert all(sample_labels == labels for sample_labels, _value in samples), f"{name}: labels round-trip"
    got = {name: samples[0][1] for name, (_k, _h, samples) in parsed.items() if samples}
    assert got == {
        "vmmig_transferred_bytes_total": 700_000,
        "vmmig_image_bytes_total": 3 << 18,
        "vmmig_image_size_bytes": 1 << 20,
        "vmmig_remaining_bytes": 1 << 18,
        "vmmig_zero_pages_total": 17,
        "vmmig_pass": 2,
        "vmmig_dirty_rate_bytes_per_second": 12_345.5,
        "vmmig_expected_downtime_seconds": 0.25,
        "vmmig_throttle_ratio": 0.3,
        "vmmig_max_bandwidth_bytes_per_second": 4_000_000,
        "vmmig_up": 1,
    }, "while running: no exit code sample"


def test_the_final_exposition_says_down_with_the_exit_code_and_leaves_unknown_estimates_out() -> None:
    parsed = parse(render(Stats().snapshot(), {"role": "recv", "session": "", "codec": ""}, 5))
    assert parsed["vmmig_up"][2][0][1] == 0 and parsed["vmmig_exit_code"][2][0][1] == 5
    assert parsed["vmmig_expected_downtime_seconds"][2] == [], "no estimate: HELP and TYPE, no sample"


def test_the_file_holds_up_1_while_the_body_runs_and_the_exit_code_after(tmp_path: Path) -> None:
    path = tmp_path / "vmmig.prom"
    metrics = MetricsFile(str(path), "send")
    stats = Stats(image_bytes=8192)
    metrics.follow(stats, lambda: {"session": "ab" * 16, "codec": "zlib"})

    def body() -> str:
        seen = values(path)  # the first write is made before the body starts
        assert seen["vmmig_up"] == 1 and "vmmig_exit_code" not in seen and seen["vmmig_image_size_bytes"] == 8192
        stats.add_wire(1234)
        return "done"

    assert metrics.around(body) == "done"
    final = values(path)
    assert final["vmmig_up"] == 0 and final["vmmig_exit_code"] == 0 and final["vmmig_transferred_bytes_total"] == 1234
    assert labels_of(path) == {"role": "send", "session": "ab" * 16, "codec": "zlib"}
    assert stat.S_IMODE(path.stat().st_mode) == 0o644, "node_exporter reads it as another user"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vmmig.prom"], "no temporary file is left behind"


@pytest.mark.parametrize(
    ("error", "code"), [(NetworkError("lost"), 5), (ValueError("a bug"), 1)], ids=["migrate-error", "a-bug"]
)
def test_a_failing_body_leaves_the_exit_code_the_cli_gives_it(tmp_path: Path, error: Exception, code: int) -> None:
    path = tmp_path / "vmmig.prom"

    def body() -> None:
        raise error

    with pytest.raises(type(error)):
        MetricsFile(str(path), "recv").around(body)
    assert values(path)["vmmig_exit_code"] == code and values(path)["vmmig_up"] == 0


def test_a_name_planted_at_file_is_replaced_never_written_through(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    path = tmp_path / "vmmig.prom"
    path.symlink_to(victim)
    MetricsFile(str(path), "send").around(lambda: None)
    assert victim.read_text() == "precious\n"
    assert not path.is_symlink() and values(path)["vmmig_exit_code"] == 0


def test_a_file_that_cannot_be_written_is_a_usage_error_naming_the_option(tmp_path: Path) -> None:
    path = tmp_path / "no-such-dir" / "vmmig.prom"
    with pytest.raises(UsageError, match=r"^--metrics .*no-such-dir/vmmig\.prom: cannot write it"):
        MetricsFile(str(path), "send").around(lambda: None)


def test_every_metric_is_documented_in_stats_md() -> None:
    text = (ROOT / "docs" / "STATS.md").read_text()
    documented = set(re.findall(r"^\| `(vmmig_[a-z_]+)` \|", text, re.M))
    assert documented == ALL_NAMES, "docs/STATS.md's metric table lists exactly the metrics written"


# --- real processes -------------------------------------------------------------------------------------------


def wait_for_up(path: Path, proc: Any, what: str, moving: bool = False, timeout: float = 30) -> dict[str, float]:
    """The first write of FILE saying vmmig_up 1 (the process still running); ``moving``: with bytes transferred."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            seen = values(path)
            if seen.get("vmmig_up") == 1 and (not moving or seen.get("vmmig_transferred_bytes_total", 0) > 0):
                return seen
        assert proc.popen.poll() is None, f"{what} exited before its metrics said it was up: {proc.wait()}"
        time.sleep(0.02)
    raise AssertionError(f"{what}: {path} never said vmmig_up 1")


def test_both_ends_expose_a_running_migration_and_keep_its_final_values(procs: Processes, tmp_path: Path) -> None:
    image = make_image(tmp_path / "random.img", 12 << 20, profile="random")
    send_prom, recv_prom = tmp_path / "send.prom", tmp_path / "recv.prom"
    recv = procs.recv(tmp_path / "dest.img", "--metrics", str(recv_prom), "--json", "-q")
    assert wait_for_up(recv_prom, recv, "recv")["vmmig_transferred_bytes_total"] == 0, "waiting for a sender"
    # The cap stretches the transfer over ~3 s: the sender is caught while it moves pages (a write a second).
    send = procs.send(image, recv.address, "--metrics", str(send_prom), "--max-bandwidth", "4M", "--json", "-q")
    during = wait_for_up(send_prom, send, "send", moving=True)
    assert during["vmmig_max_bandwidth_bytes_per_second"] == 4_000_000 and "vmmig_exit_code" not in during
    assert during["vmmig_transferred_bytes_total"] < 12 << 20
    code, out, err = send.wait()
    assert code == 0, err
    recv_code, recv_out, recv_err = recv.wait()
    assert recv_code == 0, recv_err
    for path, report in ((send_prom, json.loads(out)), (recv_prom, json.loads(recv_out))):
        final = values(path)
        assert final["vmmig_up"] == 0 and final["vmmig_exit_code"] == 0, path.name
        assert final["vmmig_transferred_bytes_total"] == report["transferred"], "the report's own figure"
        assert final["vmmig_image_size_bytes"] == 12 << 20 and final["vmmig_remaining_bytes"] == 0
    send_labels, recv_labels = labels_of(send_prom), labels_of(recv_prom)
    assert send_labels["role"] == "send" and recv_labels["role"] == "recv"
    assert re.fullmatch(r"[0-9a-f]{32}", send_labels["session"]) and send_labels["session"] == recv_labels["session"]
    assert send_labels["codec"] == recv_labels["codec"] == "zlib"


def test_a_failed_send_leaves_its_exit_code(procs: Processes, tmp_path: Path) -> None:
    image = make_image(tmp_path / "small.img", 1 << 20)
    with socket.create_server(("127.0.0.1", 0)) as unused:
        port = unused.getsockname()[1]  # closed at once: nobody listens there
    prom = tmp_path / "send.prom"
    code, _out, err = procs.run(
        "send", str(image), f"127.0.0.1:{port}", "--connect-timeout", "0.5s", "--metrics", str(prom), "-q"
    )
    assert code == ExitCode.NETWORK, err
    final = values(prom)
    assert final["vmmig_up"] == 0 and final["vmmig_exit_code"] == ExitCode.NETWORK


def test_a_receiver_stopped_by_sigterm_leaves_exit_code_143(procs: Processes, tmp_path: Path) -> None:
    prom = tmp_path / "recv.prom"
    recv = procs.recv(tmp_path / "dest.img", "--metrics", str(prom), "-q")
    wait_for_up(prom, recv, "recv")
    os.kill(recv.popen.pid, signal.SIGTERM)
    code, _out, err = recv.wait()
    assert code == ExitCode.SIGTERM, err
    final = values(prom)
    assert final["vmmig_up"] == 0 and final["vmmig_exit_code"] == ExitCode.SIGTERM
