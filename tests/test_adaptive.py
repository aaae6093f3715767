"""`--compress auto`: the per-batch decision, from measured speeds, and end to end on real processes."""

from __future__ import annotations

import json
from pathlib import Path

from migrate_cli.sender.adaptive import AutoPolicy

from .conftest import Processes, make_image


def test_before_any_measurement_batches_are_compressed() -> None:
    policy = AutoPolicy(threads=2)
    assert not policy.link_faster()
    assert policy.worth_compressing(2.0)


def test_incompressible_samples_go_raw() -> None:
    policy = AutoPolicy(threads=2)
    assert not policy.worth_compressing(1.01)
    assert policy.stats.raw_incompressible == 1


def test_a_link_faster_than_the_compressors_gets_raw_pages() -> None:
    policy = AutoPolicy(threads=2)
    policy.note_compression(200_000_000, 1.0)  # 200 MB/s per worker: 400 MB/s together
    policy.note_wire(2_000_000_000, 1.0)  # loopback: 2 GB/s
    assert policy.link_faster() and policy.stats.raw_link_faster == 1


def test_a_slow_link_or_a_cap_makes_compression_pay() -> None:
    policy = AutoPolicy(threads=2, cap=100_000_000)
    policy.note_compression(200_000_000, 1.0)
    policy.note_wire(2_000_000_000, 1.0)  # bursts look fast, but the cap is 100 MB/s
    assert not policy.link_faster()
    policy.cap = None
    assert policy.link_faster()  # `ctl set max-bandwidth 0` lifts the cap: raw wins again


def migrate_auto(procs: Processes, tmp_path: Path, image: Path, *args: str) -> dict:
    recv = procs.recv(tmp_path / "dest.img")
    code, out, err = procs.send(image, recv.address, "--compress", "auto", "--json", *args).wait()
    assert code == 0, err
    assert recv.wait()[0] == 0
    assert (tmp_path / "dest.img").read_bytes() == image.read_bytes()
    return json.loads(out)


def test_auto_under_a_cap_compresses_text_and_code(procs: Processes, tmp_path: Path) -> None:
    image = make_image(tmp_path / "text.img", 8 << 20, profile="text")
    report = migrate_auto(procs, tmp_path, image, "--max-bandwidth", "40M")
    assert report["codec"] == "auto"
    assert report["auto-compressed-batches"] > 0.9 * report["compressed-batches"] > 0
    assert report["transferred"] < 0.6 * report["normal-bytes"]


def test_auto_sends_random_pages_raw(procs: Processes, tmp_path: Path) -> None:
    image = make_image(tmp_path / "random.img", 8 << 20, profile="random")
    report = migrate_auto(procs, tmp_path, image, "--max-bandwidth", "40M")
    assert report["auto-raw-incompressible"] > 0
    assert report["auto-compressed-batches"] <= 2  # the first batches before anything is measured, at most
