"""Specification of examples/make_guest_image.py, the deterministic guest RAM image generator.

Pages are classified the way a migration tool sees them: all-zero pages; random pages (zlib level 1 cannot shrink
them: ratio < 1.05); text pages (printable ASCII only); everything else is code.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import subprocess
import sys
import zlib
from collections import Counter
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from .conftest import load_script

SCRIPT = Path(__file__).resolve().parent.parent / "examples" / "make_guest_image.py"
PAGE = 4096
MiB = 1024 * 1024
TEXT_BYTES = frozenset(range(32, 127)) | {9, 10}  # printable ASCII, tab, newline


@pytest.fixture(scope="module")
def mgi() -> ModuleType:
    return load_script(SCRIPT)


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pages_of(path: Path, page_size: int = PAGE) -> np.ndarray:
    return np.fromfile(path, dtype=np.uint8).reshape(-1, page_size)


def zlib_ratio(page: np.ndarray) -> float:
    data = page.tobytes()
    return len(data) / len(zlib.compress(data, 1))


def classify(page: np.ndarray) -> str:
    if not page.any():
        return "zero"
    if zlib_ratio(page) < 1.05:
        return "random"
    if set(np.unique(page).tolist()) <= TEXT_BYTES:
        return "text"
    return "code"


def overall_ratio(pages: np.ndarray) -> float:
    """Bytes over zlib-1 compressed bytes, compressing page by page as a migration stream does."""
    return pages.size / sum(len(zlib.compress(page.tobytes(), 1)) for page in pages)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(SCRIPT), *args], check=False, capture_output=True, text=True, timeout=60)


# --- sizes -----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("4096", 4096),
        ("4096B", 4096),
        ("1K", 1000),
        ("350M", 350_000_000),
        ("2G", 2_000_000_000),
        ("1T", 10**12),
        ("4KiB", 4096),
        ("256MiB", 256 * MiB),
        ("1GiB", 1 << 30),
        ("1TiB", 1 << 40),
        ("1.5KiB", 1536),
        (" 64 MiB ", 64 * MiB),
    ],
)
def test_parse_size_accepts_decimal_and_binary_units(mgi: ModuleType, text: str, expected: int) -> None:
    assert mgi.parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "MiB", "-4096", "12 parsecs", "0.5", "1.0001K"])
def test_parse_size_rejects_garbage_and_fractional_bytes(mgi: ModuleType, text: str) -> None:
    with pytest.raises(ValueError, match="invalid size"):
        mgi.parse_size(text)


@pytest.mark.parametrize("size", [PAGE, 5 * PAGE, 3 * MiB])
def test_image_has_exactly_the_requested_size(mgi: ModuleType, tmp_path: Path, size: int) -> None:
    out = tmp_path / "guest.img"
    counts = mgi.generate(out, size, seed=1)
    assert out.stat().st_size == size
    assert sum(counts.values()) == size // PAGE


def test_existing_file_is_replaced_not_extended(mgi: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "guest.img"
    out.write_bytes(b"\xaa" * (4 * MiB))
    mgi.generate(out, MiB, seed=1, profile="zero")
    assert out.read_bytes() == bytes(MiB)


def test_cli_rejects_size_that_is_not_a_multiple_of_the_page_size(tmp_path: Path) -> None:
    out = tmp_path / "guest.img"
    result = run_cli(str(out), "--size", "10M")  # 10,000,000 bytes is not a multiple of 4096
    assert result.returncode == 2
    assert result.stdout == ""
    assert len(result.stderr.strip().splitlines()) == 1
    assert "10M" in result.stderr and "10000000" in result.stderr and "4096" in result.stderr
    assert not out.exists()


def test_cli_rejects_a_bad_page_size_and_an_unparsable_size(tmp_path: Path) -> None:
    out = tmp_path / "guest.img"
    for args in (["--size", "1MiB", "--page-size", "1000"], ["--size", "lots"]):
        result = run_cli(str(out), *args)
        assert result.returncode == 2, args
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert not out.exists()


def test_generate_rejects_invalid_arguments(mgi: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "guest.img"
    with pytest.raises(ValueError, match="multiple of the page size"):
        mgi.generate(out, PAGE + 1)
    with pytest.raises(ValueError, match="power of two"):
        mgi.generate(out, 3 * 1000, page_size=1000)
    with pytest.raises(ValueError, match="profile"):
        mgi.generate(out, PAGE, profile="no-such-profile")


# --- command line output -----------------------------------------------------------------------------------------


def test_cli_stats_prints_one_json_line_and_nothing_without_it(tmp_path: Path) -> None:
    out = tmp_path / "guest.img"
    result = run_cli(str(out), "--size", "2MiB", "--seed", "7", "--stats")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 1
    stats = json.loads(lines[0])
    assert stats["size"] == 2 * MiB
    assert stats["page_size"] == PAGE
    assert sum(stats["counts"].values()) == 2 * MiB // PAGE
    assert set(stats["counts"]) == {"zero", "text", "code", "random"}

    quiet = run_cli(str(out), "--size", "2MiB", "--seed", "7")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout == ""
    assert out.stat().st_size == 2 * MiB


# --- determinism -------------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_bytes_and_another_seed_does_not(mgi: ModuleType, tmp_path: Path) -> None:
    first, again, other = tmp_path / "a.img", tmp_path / "b.img", tmp_path / "c.img"
    mgi.generate(first, 8 * MiB, seed=1)
    mgi.generate(again, 8 * MiB, seed=1)
    mgi.generate(other, 8 * MiB, seed=2)
    assert sha256(first) == sha256(again)
    assert sha256(first) != sha256(other)


def test_cli_and_function_write_the_same_image(mgi: ModuleType, tmp_path: Path) -> None:
    by_function, by_cli = tmp_path / "f.img", tmp_path / "c.img"
    mgi.generate(by_function, 2 * MiB, seed=11, profile="idle")
    result = run_cli(str(by_cli), "--size", "2MiB", "--seed", "11", "--profile", "idle", "--quiet")
    assert result.returncode == 0, result.stderr
    assert sha256(by_function) == sha256(by_cli)


def test_output_does_not_depend_on_the_write_chunk_size(
    mgi: ModuleType, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    big_chunks, small_chunks = tmp_path / "big.img", tmp_path / "small.img"
    mgi.generate(big_chunks, 8 * MiB, seed=5)
    monkeypatch.setattr(mgi, "CHUNK_BYTES", 3 * PAGE)
    monkeypatch.setattr(mgi, "RANDOM_BYTES", 2 * PAGE)
    mgi.generate(small_chunks, 8 * MiB, seed=5)
    assert sha256(big_chunks) == sha256(small_chunks)


# --- layout --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mixed_32mib(mgi: ModuleType, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, int], list[str]]:
    out = tmp_path_factory.mktemp("mixed") / "guest.img"
    counts = mgi.generate(out, 32 * MiB, seed=1, profile="mixed")
    classes = [classify(page) for page in pages_of(out)]
    out.unlink()
    return counts, classes


def test_mixed_profile_shares_are_close_to_the_weights(mgi: ModuleType, mixed_32mib: tuple) -> None:
    counts, classes = mixed_32mib
    found = Counter(classes)
    assert found == Counter({name: count for name, count in counts.items() if count})  # reported = what is there
    weights = mgi.PROFILES["mixed"]
    assert weights == {"zero": 40, "text": 25, "code": 20, "random": 15}
    for name, weight in weights.items():
        share = found[name] / len(classes)
        assert abs(share - weight / 100) <= 0.08, (name, share)


def test_pages_come_in_runs_not_interleaved(mixed_32mib: tuple) -> None:
    _, classes = mixed_32mib
    changes = sum(1 for before, after in itertools.pairwise(classes) if before != after)
    assert 10 <= changes < len(classes) / 4
    runs: list[int] = [1]
    for before, after in itertools.pairwise(classes):
        if before == after:
            runs[-1] += 1
        else:
            runs.append(1)
    assert len(set(runs)) > 5 and max(runs) >= 64  # lengths vary, and some runs are long


@pytest.mark.parametrize("profile", ["mixed", "zero", "random", "text", "code", "idle"])
def test_every_profile_gets_its_weights(mgi: ModuleType, tmp_path: Path, profile: str) -> None:
    size = 16 * MiB
    counts = mgi.generate(tmp_path / "guest.img", size, seed=3, profile=profile)
    weights = mgi.PROFILES[profile]
    total = sum(weights.values())
    for name, count in counts.items():
        assert abs(count - size // PAGE * weights.get(name, 0) / total) <= 1, (name, count)


def test_zero_profile_is_all_zeros(mgi: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "guest.img"
    mgi.generate(out, 4 * MiB, profile="zero")
    assert not pages_of(out).any()


def test_no_two_nonzero_pages_are_identical(mgi: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "guest.img"
    mgi.generate(out, 16 * MiB, seed=1)
    digests = [hashlib.sha256(page.tobytes()).digest() for page in pages_of(out) if page.any()]
    assert len(digests) > 1000
    assert len(set(digests)) == len(digests)


@pytest.mark.parametrize("page_size", [512, 65536])
def test_other_page_sizes_keep_the_classes_and_no_page_repeats(mgi: ModuleType, tmp_path: Path, page_size: int) -> None:
    out = tmp_path / "guest.img"
    counts = mgi.generate(out, 4 * MiB, seed=1, page_size=page_size)
    pages = pages_of(out, page_size)
    assert sum(counts.values()) == len(pages)
    assert Counter(classify(page) for page in pages) == Counter({k: v for k, v in counts.items() if v})
    nonzero = [page.tobytes() for page in pages if page.any()]
    assert len(set(nonzero)) == len(nonzero)


# --- content -------------------------------------------------------------------------------------------------------


def test_text_pages_are_ascii_and_compress_at_least_2_5x(mgi: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "guest.img"
    mgi.generate(out, 8 * MiB, seed=1, profile="text")
    pages = pages_of(out)
    assert set(np.unique(pages).tolist()) <= TEXT_BYTES
    assert overall_ratio(pages) >= 2.5


def test_code_pages_compress_at_least_1_6x_but_less_than_text(mgi: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "guest.img"
    mgi.generate(out, 8 * MiB, seed=1, profile="code")
    pages = pages_of(out)
    assert all(classify(page) == "code" for page in pages)
    assert 1.6 <= overall_ratio(pages) < 2.8
    histogram = np.bincount(pages.ravel(), minlength=256) / pages.size
    assert histogram.max() > 0.1  # skewed like machine code (zero bytes and REX prefixes dominate)


def test_random_pages_are_incompressible(mgi: ModuleType, tmp_path: Path) -> None:
    out = tmp_path / "guest.img"
    mgi.generate(out, 2 * MiB, seed=1, profile="random")
    assert overall_ratio(pages_of(out)) < 1.01
