"""Spec of the sender's incompressible-page test (migrate_cli/entropy.py): which pages go raw without compressing
them, and how a batch is cut into runs of one kind."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
from hypothesis import given
from hypothesis import strategies as st
from zlib_ng import zlib_ng

from migrate_cli.sender.entropy import MIN_RUN, incompressible, incompressible_batch, runs

from .conftest import make_image

PAGE = 4096


def pages_of(path: Path) -> np.ndarray:
    return np.frombuffer(path.read_bytes(), dtype=np.uint8).reshape(-1, PAGE)


def zlib_ratio(page: np.ndarray) -> float:
    stream = zlib_ng.compressobj(1, zlib_ng.DEFLATED, -15)
    return PAGE / len(stream.compress(page) + stream.flush(zlib_ng.Z_FULL_FLUSH))


def test_random_pages_are_incompressible(tmp_path: Path) -> None:
    pages = pages_of(make_image(tmp_path / "r.img", 1 << 20, profile="random"))
    assert incompressible(pages).all()


def test_text_code_and_zero_pages_are_compressed(tmp_path: Path) -> None:
    for profile in ("text", "code", "zero"):
        pages = pages_of(make_image(tmp_path / f"{profile}.img", 1 << 20, profile=profile))
        assert not incompressible(pages).any(), profile


def test_the_verdict_agrees_with_zlib_on_a_mixed_image(tmp_path: Path) -> None:
    """Raw exactly where zlib-ng level 1 would not shrink a page by 5%: the mistake the test exists to avoid."""
    pages = pages_of(make_image(tmp_path / "m.img", 8 << 20, profile="mixed"))
    pages = pages[np.bitwise_or.reduce(pages.view(np.uint64), axis=1) != 0]
    verdict = incompressible(pages)
    would_not_shrink = np.array([zlib_ratio(page) <= 1.05 for page in pages])
    assert verdict.any() and not verdict.all()
    assert np.array_equal(verdict, would_not_shrink)


def test_a_page_with_few_distinct_bytes_is_compressed_even_if_scrambled() -> None:
    rng = np.random.default_rng(7)
    scrambled_text = rng.choice(np.frombuffer(b"etaoin shrdlu", dtype=np.uint8), size=(4, PAGE))
    assert not incompressible(scrambled_text).any()


def test_a_batch_whose_probes_agree_is_taken_as_uniform_and_one_that_mixes_is_tested_page_by_page(
    tmp_path: Path,
) -> None:
    random = pages_of(make_image(tmp_path / "r.img", 1 << 20, profile="random"))
    text = pages_of(make_image(tmp_path / "t.img", 1 << 20, profile="text"))
    assert incompressible_batch(random).all() and not incompressible_batch(text).any()
    mixed = np.concatenate([text[:100], random[:60], text[100:196]])
    assert np.array_equal(incompressible_batch(mixed), incompressible(mixed))
    assert incompressible_batch(mixed)[100:160].all() and not incompressible_batch(mixed)[:100].any()


def test_the_probes_keep_their_spacing_in_a_large_batch_so_a_short_random_run_is_still_found(tmp_path: Path) -> None:
    random = pages_of(make_image(tmp_path / "r.img", 1 << 20, profile="random"))
    text = pages_of(make_image(tmp_path / "t.img", 4 << 20, profile="text"))
    # 4 MiB: a run of 20 random pages at 520..539 covers a probe (page 528) only if probes stay 16 pages apart
    big = np.concatenate([text[:520], random[:20], text[520:1004]])
    verdicts = incompressible_batch(big)
    assert verdicts[520:540].all() and not verdicts[:520].any() and not verdicts[540:].any()


def test_an_empty_batch_has_no_verdicts() -> None:
    assert incompressible(np.zeros((0, PAGE), dtype=np.uint8)).size == 0


def test_runs_of_one_kind_become_one_run() -> None:
    assert runs(np.zeros(100, dtype=bool)) == [(0, 100, False)]
    assert runs(np.ones(100, dtype=bool)) == [(0, 100, True)]
    assert runs(np.ones(3, dtype=bool)) == [(0, 3, True)]  # a lone short run keeps its kind


def test_a_few_random_pages_among_text_are_compressed_with_it() -> None:
    kinds = np.zeros(64, dtype=bool)
    kinds[20 : 20 + MIN_RUN - 1] = True
    assert runs(kinds) == [(0, 64, False)]


def test_a_long_random_run_is_cut_out() -> None:
    kinds = np.zeros(64, dtype=bool)
    kinds[20:40] = True
    assert runs(kinds) == [(0, 20, False), (20, 40, True), (40, 64, False)]


def test_a_few_text_pages_between_random_runs_go_raw_with_them() -> None:
    kinds = np.ones(64, dtype=bool)
    kinds[30:33] = False
    assert runs(kinds) == [(0, 64, True)]


@given(st.lists(st.booleans(), max_size=300), st.integers(min_value=1, max_value=16))
def test_runs_partition_the_batch_into_alternating_runs_no_shorter_than_min_run(
    kinds: list[bool], min_run: int
) -> None:
    result = runs(np.array(kinds, dtype=bool), min_run)
    if not kinds:
        assert result == []
        return
    assert [r[0] for r in result] == [0, *(r[1] for r in result[:-1])]
    assert result[-1][1] == len(kinds)
    assert all(a[2] != b[2] for a, b in itertools.pairwise(result))
    if len(result) > 1:
        assert all(end - first >= min_run for first, end, _ in result)
