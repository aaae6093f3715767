"""`vmmig analyze`: a dry run that reports what is in an image and how to migrate it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from .conftest import ROOT, Processes, make_image


def test_analyze_reports_zero_share_codecs_and_a_recommendation(procs: Processes, tmp_path: Path) -> None:
    image = make_image(tmp_path / "mixed.img", 32 << 20)
    code, out, err = procs.run("analyze", str(image), "--full", "--json", "--max-bandwidth", "100M")
    assert code == 0, err
    report = json.loads(out)
    assert 0.35 <= report["zero-page-share"] <= 0.45  # the mixed profile is 40% zero pages
    ratios = {c["codec"]: c["ratio"] for c in report["codecs"]}
    assert set(ratios) == {"zlib", "zstd"} and all(r > 1.5 for r in ratios.values())
    rec = report["recommendation"]
    assert rec["codec"] in ("zlib", "zstd")  # at 100 MB/s compression pays on this image
    assert rec["link"] == {"bytes-per-second": 100_000_000, "assumed": False}


def test_analyze_of_random_data_recommends_no_compression_on_a_fast_link(procs: Processes, tmp_path: Path) -> None:
    image = make_image(tmp_path / "random.img", 16 << 20, profile="random")
    code, out, _ = procs.run("analyze", str(image), "--json", "--max-bandwidth", "2G")
    assert code == 0
    assert json.loads(out)["recommendation"]["codec"] == "none"


def test_analyze_measures_the_dirty_rate_of_a_running_guest(procs: Processes, tmp_path: Path) -> None:
    image = make_image(tmp_path / "vm.ram", 16 << 20)
    pid_file = tmp_path / "guest.pid"
    guest = subprocess.Popen(
        [sys.executable, str(ROOT / "examples" / "guest_workload.py"), str(image), "--rate", "8M",
         "--threads", "2", "--pid-file", str(pid_file)],
        stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        while not pid_file.exists():
            time.sleep(0.02)
        code, out, err = procs.run("analyze", str(image), "--dirty-for", "2s", "--max-bandwidth", "1M", "--json")
    finally:
        os.kill(guest.pid, signal.SIGKILL)
        guest.wait()
    assert code == 0, err
    report = json.loads(out)
    assert report["dirty-bytes-per-second"] > 1_000_000
    assert report["recommendation"]["converges"] == "no" and "--auto-converge" in report["recommendation"]["advice"]


def test_analyze_prints_words_without_json(procs: Processes, tmp_path: Path) -> None:
    image = make_image(tmp_path / "mixed.img", 4 << 20)
    code, out, _ = procs.run("analyze", str(image))
    assert code == 0 and "zero pages:" in out and "recommended: --compress" in out
