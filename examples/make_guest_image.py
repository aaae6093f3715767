#!/usr/bin/env python3
"""Write a deterministic, realistic-looking guest RAM image for trying out and benchmarking vmmig.

Usage::

    python examples/make_guest_image.py OUTPUT --size 256MiB [--seed 1] [--profile mixed] [--page-size 4096] [--stats]

Layout
------
The image is a sequence of pages of four classes:

* ``zero``   -- all-zero pages (never touched, or freed and scrubbed by the guest);
* ``text``   -- ASCII pages: English-like prose, C- and Python-like source lines and syslog-like lines
  (zlib level 1 compresses them roughly 3:1);
* ``code``   -- x86-64-like machine code: a skewed byte distribution, recurring opcode patterns, small immediates and
  frame offsets, int3/nop/zero padding and small-integer tables (roughly 2-2.5:1);
* ``random`` -- bytes straight from the generator, like encrypted or already compressed data (incompressible).

Pages come in RUNS of 1 to 512 pages whose length is log-uniform (every power-of-two range of lengths is equally
likely), as in real guests where memory is touched in extents rather than page by page. The profile's weights fix the
page budget of each class exactly (largest-remainder rounding of ``weight * pages``); every class's budget is cut into
runs and the runs of all classes are shuffled together. The class shares therefore equal the weights for any image
size, while the order of the runs is random.

Text and code pages are copies of pages from a pool of up to 256 distinct text pages and 256 code pages that is built
once per image, picked by generator-drawn indices. Every copy gets a 16-byte field at a generator-chosen offset that is
derived from its page number and the seed (``0x`` + 14 hex digits in text pages, two little-endian 64-bit words at an
8-byte aligned offset in code pages), so no two non-zero pages of an image are identical and the compression ratios
are not changed. Zero runs are holes: the file is truncated to its full size first and only non-zero data is written,
in chunks of at most 64 MiB from one preallocated buffer, so memory use stays flat whatever the image size.

Determinism
-----------
All randomness comes from numpy's PCG64 bit generator seeded with ``--seed`` (independent streams for the layout,
the pools, the picks and the page fields are spawned from ``SeedSequence(seed)``). Only the raw 64-bit output of
PCG64 is used, mapped to integers with fixed integer arithmetic, never floating point nor the higher-level
``Generator`` methods whose streams numpy does not promise to keep across versions. Each stream is consumed in page
order, independently of the chunking. The same seed, size, profile and page size therefore give a byte-identical
image on any machine and any numpy version.

Import ``parse_size`` and ``generate`` from this file (for example with ``importlib.util.spec_from_file_location``) to
create images from tests and benchmarks.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Generic, TypeVar

import numpy as np

from migrate_cli.units import parse_size

# Class weights per profile, in any integer scale (they are normalised). Add profiles here.
PROFILES: dict[str, dict[str, int]] = {
    "mixed": {"zero": 40, "text": 25, "code": 20, "random": 15},
    "zero": {"zero": 100},
    "random": {"random": 100},
    "text": {"text": 100},
    "code": {"code": 100},
    "idle": {"zero": 80, "text": 10, "code": 10},
}

CLASSES: tuple[str, ...] = ("zero", "text", "code", "random")
DEFAULT_PAGE_SIZE = 4096
MIN_PAGE_SIZE = 512
MAX_PAGE_SIZE = 2 * 1024 * 1024
MAX_RUN_PAGES = 512  # runs are 1..MAX_RUN_PAGES pages long
POOL_PAGES = 256  # distinct text pages and code pages per image (fewer for very large pages)
POOL_BYTES_MAX = 4 * 1024 * 1024  # cap on the size of each pool
CHUNK_BYTES = 64 * 1024 * 1024  # largest single write (and the size of the one output buffer)
RANDOM_BYTES = 4 * 1024 * 1024  # random bytes are drawn this many at a time
FIELD_BYTES = 16  # per-page unique field


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)  # odd, so page -> page * _GOLDEN + salt is a bijection mod 2**64
_MASK56 = np.uint64((1 << 56) - 1)
_HEX = np.frombuffer(b"0123456789abcdef", dtype=np.uint8)
_T = TypeVar("_T")


# --------------------------------------------------------------------------------------------------------------------
# Randomness: integer-only helpers over the raw PCG64 stream (stable across platforms and numpy versions).


class _Stream:
    """One independent PCG64 stream; every helper consumes exactly one 64-bit word per value drawn."""

    def __init__(self, seed_seq: np.random.SeedSequence) -> None:
        self._bits = np.random.PCG64(seed_seq)

    def raw(self, count: int) -> np.ndarray:
        return np.asarray(self._bits.random_raw(count), dtype=np.uint64)

    def below(self, bound: int, count: int) -> np.ndarray:
        """``count`` integers in ``[0, bound)`` (int64), by multiply-shift of the top 32 bits; bound < 2**32."""
        if not 0 < bound <= 0xFFFFFFFF:
            raise ValueError(f"bound {bound} out of range")
        return (((self.raw(count) >> np.uint64(32)) * np.uint64(bound)) >> np.uint64(32)).astype(np.int64)

    def weighted(self, weights: np.ndarray, count: int) -> np.ndarray:
        """``count`` indices into ``weights`` (non-negative integers), drawn with those weights."""
        cumulative = np.cumsum(np.asarray(weights, dtype=np.int64))
        return np.searchsorted(cumulative, self.below(int(cumulative[-1]), count), side="right")

    def bytes(self, count: int) -> np.ndarray:
        """``count`` uniformly random bytes (uint8); count must be a multiple of 8."""
        return self.raw(count // 8).astype("<u8", copy=False).view(np.uint8)


class _Streams:
    """The named streams of one image; adding a stream at the end never changes the existing ones."""

    NAMES = ("layout", "text_pool", "code_pool", "text_pick", "code_pick", "text_field", "code_field", "random")

    def __init__(self, seed: int) -> None:
        children = np.random.SeedSequence(seed).spawn(len(self.NAMES))
        self._streams = {name: _Stream(child) for name, child in zip(self.NAMES, children, strict=True)}

    def __getitem__(self, name: str) -> _Stream:
        return self._streams[name]


# --------------------------------------------------------------------------------------------------------------------
# Layout: exact class budgets cut into log-uniform runs, shuffled.


def _class_budgets(pages: int, weights: dict[str, int]) -> dict[str, int]:
    """Pages per class: ``weight * pages`` rounded by largest remainder (ties in CLASSES order); sums to ``pages``."""
    total = sum(weights.get(name, 0) for name in CLASSES)
    exact = {name: pages * weights.get(name, 0) for name in CLASSES}
    budgets = {name: value // total for name, value in exact.items()}
    left = pages - sum(budgets.values())
    by_remainder = sorted(CLASSES, key=lambda name: (-(exact[name] % total), CLASSES.index(name)))
    for name in by_remainder[:left]:
        budgets[name] += 1
    return budgets


def _run_lengths(stream: _Stream, count: int) -> np.ndarray:
    """Log-uniform lengths in [1, MAX_RUN_PAGES]: octave ``e`` uniform, then uniform within ``[2**e, 2**(e+1))``."""
    octaves = MAX_RUN_PAGES.bit_length() - 1  # 9 octaves for 512: [1,2) [2,4) ... [256,512]
    exponent = stream.below(octaves, count)
    low = np.left_shift(1, exponent)
    width = np.where(exponent == octaves - 1, low + 1, low)  # the last octave includes MAX_RUN_PAGES itself
    offset = ((stream.raw(count) >> np.uint64(32)) * width.astype(np.uint64)) >> np.uint64(32)
    return low + offset.astype(np.int64)


def _plan_runs(stream: _Stream, budgets: dict[str, int]) -> tuple[np.ndarray, np.ndarray]:
    """Return (class index per run, pages per run), in image order, with adjacent runs of one class merged."""
    classes: list[np.ndarray] = []
    lengths: list[np.ndarray] = []
    for index, name in enumerate(CLASSES):
        budget = budgets[name]
        drawn: list[np.ndarray] = []
        total = 0
        while total < budget:
            batch = _run_lengths(stream, (budget - total) // 64 + 16)
            drawn.append(batch)
            total += int(batch.sum())
        if not drawn:
            continue
        runs = np.concatenate(drawn)
        ends = np.cumsum(runs)
        keep = int(np.searchsorted(ends, budget)) + 1  # first run reaching the budget is the last one
        runs = runs[:keep].copy()
        runs[-1] -= int(ends[keep - 1]) - budget
        classes.append(np.full(keep, index, dtype=np.int64))
        lengths.append(runs)
    if not classes:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    run_class = np.concatenate(classes)
    run_pages = np.concatenate(lengths)
    order = np.argsort(stream.raw(len(run_class)), kind="stable")
    run_class, run_pages = run_class[order], run_pages[order]
    # Merge neighbours of the same class (fewer, larger writes; the bytes are the same).
    starts = np.flatnonzero(np.r_[True, run_class[1:] != run_class[:-1]])
    return run_class[starts], np.add.reduceat(run_pages, starts)


# --------------------------------------------------------------------------------------------------------------------
# Text pool.


def _words(text: str) -> list[str]:
    return text.split()


_ENGLISH = _words("""
the of and to a in is it that for was on are as with his they at be this from have or by one had not but what all
were when we there can an your which their said if do will each about how up out them then she many some so these
would other into has more her two like him see time could no make than first been its who now people my made over
did down only way find use may water long little very after words called just where most know get through back much
before go good new write our used me man too any day same right look think also around another came come work three
word must because does part even place well such here take why things help put years different away again off went
old number great tell men say small every found still between name should home big give air line set own under read
last never us left end along while might next sound below saw something thought both few those always looked show
large often together asked house world going want school important until form food keep children feet land side
without boy once animals life enough took sometimes four head above kind began almost live page got earth need far
hand high year mother light parts country father let night following picture being study second eyes soon times
story boys since white days ever paper hard near sentence better best across during today others however sure means
knew try told young miles sun ways thing whole hear example heard several change answer room sea against top turned
learn point city play toward five using himself usually memory guest host migration page table kernel process
""")

_IDENTS_A = _words("""
buf len ctx node page mem vm dev irq addr size count flags list entry next prev data ret err lock state queue map
table offset idx tmp val key ptr head tail cfg opt req resp file path name id mode type dirty slot region bitmap
""")
_IDENTS_B = _words("""
get set init free alloc find update check read write copy send recv start stop flush sync lookup insert remove
reset map unmap lock unlock count index base limit mask total
""")

# Line templates per style. Fields: {i} indent, {a} {b} {c} local names, {f} function, {s} struct, {S} class name,
# {B} constant, {E} errno, {n} {m} small numbers, {p} {q} larger numbers, {w} {x} {y} words, {W} capitalised word,
# {t} {T} clock and uptime (both rising through a block), {k} key.
_C_LINES = (
    "{i}if (!{a})",
    "{i}\treturn -{E};",
    "{i}{a} = {b}->{c};",
    "{i}{a}->{b} = {c};",
    "{i}for (i = 0; i < {a}->{b}; i++) {{",
    "{i}}}",
    "{i}{a} = {f}({b}, {c});",
    "{i}{f}(&{a}->{b});",
    "{i}if ({a}->flags & {B})",
    "{i}\tgoto out;",
    "{i}unsigned long {a};",
    "{i}struct {s} *{a} = {b}->{c};",
    "{i}/* {W} the {w} {x} {y}. */",
    "{i}return {a};",
    "{i}{a} += {n};",
    "{i}}} else {{",
    "",
    "static int {f}(struct {s} *{a}, unsigned long {b})",
    "{{",
    "}}",
    "#define {B}\t{n}",
    "{i}spin_lock(&{a}->lock);",
    "{i}spin_unlock(&{a}->lock);",
    "{i}memset({a}, 0, sizeof(*{a}));",
    "{i}if (unlikely({a} == NULL)) {{",
    "{i}ret = {f}({a}, {b}, GFP_KERNEL);",
    "{i}if (ret < 0)",
    "{i}\tgoto err_free_{a};",
    "{i}list_for_each_entry({a}, &{b}->list, list) {{",
    "{i}WARN_ON_ONCE(!{a});",
    "static const struct {s}_operations {a}_ops = {{",
    "\t.{a}\t\t= {f}_{a},",
    "\t.{b}\t\t= {f}_{b},",
    " * {W} the {w} {x}.",
    " */",
    "/**",
    " * {f}() - {W} {w} {x}",
    " * @{a}: the {s} to {y}",
    '{i}pr_debug("{f}: {w} {x} %lu\\n", {a}->{b});',
)
_PY_LINES = (
    "{i}def {f}(self, {a}, {b}=None):",
    "{i}    {a} = self.{b}.get({c!r})",
    "{i}    if {a} is None:",
    "{i}        return {b}",
    "{i}    for {a} in self.{b}:",
    "{i}        {a}.{f}({b}, {c})",
    "{i}    self.{a} = {b}",
    '{i}    """{W} the {w} {x} {y}."""',
    '{i}    raise ValueError(f"{w} {x} {{{a}}}")',
    "{i}    return {a}[{n}]",
    "",
    "class {S}:",
    "import {a}",
    "from {a} import {b}",
)
_LOG_LINES = (
    "Nov 26 02:{t} guest kernel: [{T}] {f}: {w} {x} {a}={n} {b}={m}",
    "Nov 26 02:{t} guest systemd[1]: Started {S} service.",
    "Nov 26 02:{t} guest systemd[1]: {S}.service: Deactivated successfully.",
    "Nov 26 02:{t} guest sshd[{p}]: Accepted publickey for {a} from 10.0.{n}.{m} port {q} ssh2",
    "Nov 26 02:{t} guest sshd[{p}]: pam_unix(sshd:session): session opened for user {a}(uid={p}) by (uid=0)",
    "Nov 26 02:{t} guest kernel: [{T}] {a}: {w} {x} {y}",
    "Nov 26 02:{t} guest CRON[{p}]: ({a}) CMD (/usr/lib/{b}/{c} --{w})",
)
_CONFIG_LINES = (
    "{k}.{a} = {n}",
    "{k}.{b} = {c}",
    '    "{a}": {n},',
    '    "{b}": "{c}",',
    "[{k}]",
    "# {W} {w} {x}",
    "{a}_{b}=yes",
)
_TEXT_STYLES: dict[str, int] = {"prose": 15, "c": 30, "python": 20, "log": 20, "config": 15}


class _Draws(Generic[_T]):
    """Values from ``table`` drawn (optionally with ``weights``) in batches of 8192 from ``stream``, one at a time."""

    def __init__(self, stream: _Stream, table: Sequence[_T], weights: np.ndarray | None = None) -> None:
        self._stream, self._table, self._weights = stream, table, weights
        self._batch: list[_T] = []
        self._index = 0

    def __call__(self) -> _T:
        if self._index == len(self._batch):
            if self._weights is None:
                picks = self._stream.below(len(self._table), 8192)
            else:
                picks = self._stream.weighted(self._weights, 8192)
            self._batch = [self._table[j] for j in picks.tolist()]
            self._index = 0
        self._index += 1
        return self._batch[self._index - 1]


def _text_blocks(stream: _Stream, needed: int) -> Iterator[str]:
    """Yield blocks of prose, C, Python, log and config lines until at least ``needed`` characters were produced."""
    zipf = np.array([1_000_000 // (rank + 4) for rank in range(len(_ENGLISH))], dtype=np.int64)
    idents = [f"{a}_{b}" for a in _IDENTS_A for b in _IDENTS_B]
    project = _IDENTS_A + [idents[j] for j in stream.below(len(idents), len(_IDENTS_A) * 2).tolist()]
    word = _Draws(stream, _ENGLISH, zipf)
    ident = _Draws(stream, project)
    small = _Draws(stream, list(range(64)))
    style = _Draws(stream, list(_TEXT_STYLES), np.array(list(_TEXT_STYLES.values())))
    templates = {
        "c": (_Draws(stream, list(_C_LINES)), "\t"),
        "python": (_Draws(stream, list(_PY_LINES)), "    "),
        "log": (_Draws(stream, list(_LOG_LINES)), ""),
        "config": (_Draws(stream, list(_CONFIG_LINES)), ""),
    }
    produced = 0
    while produced < needed:
        kind = style()
        lines: list[str] = []
        if kind == "prose":  # a paragraph, wrapped at 80 columns
            line = ""
            for _ in range(3 + small() % 6):
                count = 6 + small() % 14
                sentence = [word() for _ in range(count)]
                sentence[0] = sentence[0].capitalize()
                if count > 10:
                    sentence[count // 2] += ","
                sentence[-1] += "."
                for token in sentence:
                    if len(line) + len(token) + 1 > 80:
                        lines.append(line)
                        line = token
                    else:
                        line = f"{line} {token}" if line else token
            lines.extend((line, ""))
        else:
            template, indent = templates[kind]
            local = [ident() for _ in range(5)]  # a block reuses a few names and words, as real files do
            topic = [word() for _ in range(6)]
            shapes = [template() for _ in range(8)]  # and a few kinds of line
            section = ident()
            clock = small() * 60 + small()  # seconds into the hour, rising through the block
            uptime = 1000 * (1 + small()) + small()
            for _ in range(4 + small() % 24):
                n = small()
                clock = (clock + n // 16) % 3600
                uptime += n // 8
                lines.append(
                    shapes[small() % 8].format(
                        i=indent * (1 + n % 3),
                        a=local[n % 5],
                        b=local[(n + 1) % 5],
                        c=local[small() % 5],
                        f=local[0],
                        s=local[1],
                        S=local[2].title().replace("_", ""),
                        B=local[3].upper(),
                        E=("EINVAL", "ENOMEM", "EBUSY", "EIO", "EAGAIN")[n % 5],
                        k=section,
                        n=n * (1 + n % 4),
                        m=small(),
                        p=1000 + 61 * small() + small(),
                        q=f"{small() * 15361 % 1000000:06d}",
                        w=topic[n % 6],
                        x=topic[(n + 2) % 6],
                        y=word(),
                        W=topic[(n + 4) % 6].capitalize(),
                        t=f"{clock // 60:02d}:{clock % 60:02d}",
                        T=f"{uptime:5d}.{small() * 15361 % 1000000:06d}",
                    )
                )
        text = "\n".join(lines) + "\n"
        produced += len(text)
        yield text


def _text_pool(stream: _Stream, pages: int, page_size: int) -> np.ndarray:
    """``pages`` distinct ASCII pages cut from one long mixed text."""
    needed = pages * page_size
    blob = "".join(_text_blocks(stream, needed)).encode("ascii")
    return np.frombuffer(blob, dtype=np.uint8, count=needed).reshape(pages, page_size).copy()


# --------------------------------------------------------------------------------------------------------------------
# Code pool: x86-64-like instructions from weighted templates.
#
# Template bytes are hex literals or slot letters: D = frame/struct displacement (disp8), I = small immediate,
# R = any byte, S = sign extension (00 or ff, one choice per instruction), Z = 00.

_DATA = 4  # weight of each data template (instructions weigh 1..18)
_CODE_TEMPLATES: tuple[tuple[int, str], ...] = (
    (12, "55"),  # push rbp
    (10, "48 89 e5"),  # mov rbp, rsp
    (8, "f3 0f 1e fa"),  # endbr64
    (4, "41 54"),
    (4, "41 55"),
    (4, "41 56"),
    (4, "41 57"),
    (6, "53"),
    (6, "5b"),
    (10, "5d"),
    (3, "41 5c"),
    (3, "41 5d"),
    (3, "41 5e"),
    (3, "41 5f"),
    (12, "c3"),  # ret
    (3, "c9"),  # leave
    (8, "48 83 ec I"),
    (6, "48 83 c4 I"),
    (10, "48 89 45 D"),
    (6, "48 89 5d D"),
    (6, "48 89 7d D"),
    (6, "48 89 75 D"),
    (6, "89 45 D"),
    (5, "89 7d D"),
    (12, "48 8b 45 D"),
    (6, "48 8b 55 D"),
    (8, "8b 45 D"),
    (6, "48 8b 7d D"),
    (8, "48 89 c7"),
    (6, "48 89 de"),
    (6, "48 89 df"),
    (5, "4c 89 e7"),
    (6, "48 89 c6"),
    (5, "89 c2"),
    (5, "89 d0"),
    (10, "48 8b 47 D"),
    (8, "48 8b 43 D"),
    (6, "48 8b 40 D"),
    (6, "8b 47 D"),
    (6, "48 89 47 D"),
    (5, "89 43 D"),
    (6, "48 8d 45 D"),
    (5, "48 8d 3d R R S S"),  # lea rdi, [rip+disp32]
    (4, "48 8d 35 R R S S"),
    (18, "e8 R R S S"),  # call rel32
    (4, "e9 R R S S"),  # jmp rel32
    (6, "eb I"),
    (10, "74 I"),
    (10, "75 I"),
    (3, "7e I"),
    (3, "7f I"),
    (4, "0f 84 R Z Z Z"),
    (4, "0f 85 R Z Z Z"),
    (10, "48 85 c0"),
    (8, "85 c0"),
    (4, "84 c0"),
    (6, "48 83 f8 I"),
    (5, "83 f8 I"),
    (4, "48 39 c3"),
    (3, "3c I"),
    (3, "80 7d D I"),
    (8, "31 c0"),
    (4, "31 d2"),
    (3, "31 f6"),
    (6, "b8 I Z Z Z"),
    (5, "bf I Z Z Z"),
    (4, "be I Z Z Z"),
    (4, "ba I Z Z Z"),
    (5, "c7 45 D I Z Z Z"),
    (5, "48 8b 05 R R S S"),  # mov rax, [rip+disp32]
    (3, "48 89 05 R R S S"),
    (5, "48 83 c0 I"),
    (4, "83 c0 I"),
    (4, "48 01 d0"),
    (3, "48 29 c8"),
    (3, "48 c1 e0 I"),
    (4, "0f b6 45 D"),
    (4, "0f b6 c0"),
    (3, "0f 94 c0"),
    (2, "48 0f 44 c2"),
    (3, "90"),
    (2, "0f 1f 00"),
    (2, "0f 1f 40 00"),
    (3, "0f 1f 44 00 00"),
    (3, "66 0f 1f 44 00 00"),
    (2, "0f 1f 80 00 00 00 00"),
    (2, "66 2e 0f 1f 84 00 00 00 00 00"),
    (4, "cc cc cc cc"),
    (2, "cc cc cc cc cc cc cc cc cc cc cc"),
    # Binary data next to the code (.rodata, GOT, heap objects): NULLs, small ints, -1, pointers, zero padding.
    (_DATA, "Z Z Z Z Z Z Z Z"),
    (_DATA, "I Z Z Z Z Z Z Z"),
    (_DATA, "I Z Z Z I Z Z Z I Z Z Z I Z Z Z"),
    (_DATA // 2, "ff ff ff ff ff ff ff ff"),
    (_DATA, "R R R R 56 55 Z Z"),  # heap pointer (0x00005556........)
    (_DATA // 2, "R R R R R 7f Z Z"),  # user-space stack/library pointer
    (_DATA // 2, "R R R R ff ff ff ff"),  # kernel text address
    (_DATA // 2, " ".join(["00"] * 16)),
    (_DATA // 4, " ".join(["00"] * 64)),
)
_DISP8 = np.array([0xF8, 0xF0, 0xE8, 0xE0, 0xD8, 0xD0, 0xC8, 0xC0, 0xFC, 0xEC, 0x08, 0x10, 0x18, 0x20, 0x28, 0x30,
                   0x38, 0x40, 0x48, 0x50, 0x58, 0x60, 0x68, 0x70, 0x78], dtype=np.uint8)  # fmt: skip
_DISP8_WEIGHTS = np.array([20, 18, 14, 12, 10, 8, 6, 5, 4, 3, 14, 12, 10, 9, 8, 7, 6, 5, 4, 3, 3, 2, 2, 2, 2])
_IMM8 = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8, 0x10, 0x18, 0x20, 0x28, 0x30, 0x38, 0x40, 0x0C, 0xFF, 0x0A, 0x1F],
                 dtype=np.uint8)  # fmt: skip
_IMM8_WEIGHTS = np.array([14, 18, 10, 6, 8, 4, 3, 3, 12, 8, 6, 6, 4, 3, 2, 3, 3, 5, 2, 2])
_LITERAL, _SLOT_D, _SLOT_I, _SLOT_R, _SLOT_S = 0, 1, 2, 3, 4


def _compile_templates() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Flatten the templates: (weights, start, length, byte values, slot kinds)."""
    kinds_of = {"D": _SLOT_D, "I": _SLOT_I, "R": _SLOT_R, "S": _SLOT_S, "Z": _LITERAL}
    weights, starts, lengths, values, kinds = [], [], [], [], []
    for weight, text in _CODE_TEMPLATES:
        tokens = text.split()
        weights.append(weight)
        starts.append(len(values))
        lengths.append(len(tokens))
        for token in tokens:
            if token in kinds_of:
                values.append(0)
                kinds.append(kinds_of[token])
            else:
                values.append(int(token, 16))
                kinds.append(_LITERAL)
    return (
        np.array(weights, dtype=np.int64),
        np.array(starts, dtype=np.int64),
        np.array(lengths, dtype=np.int64),
        np.array(values, dtype=np.uint8),
        np.array(kinds, dtype=np.uint8),
    )


_TEMPLATES = _compile_templates()
CODE_IDIOMS = 256  # distinct idioms per image
CODE_IDIOM_PERCENT = 55  # share of idioms among the units of the code stream


def _expand(stream: _Stream, chosen: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bytes of the instructions ``chosen`` (template indices) with their slots filled; also each one's length."""
    _, starts, lengths, values, kinds = _TEMPLATES
    sizes = lengths[chosen]
    total = int(sizes.sum())
    instruction = np.repeat(np.arange(len(chosen)), sizes)
    source = np.repeat(starts[chosen] - (np.cumsum(sizes) - sizes), sizes) + np.arange(total)
    out = values[source]
    kind = kinds[source]
    np.copyto(out, _DISP8[stream.weighted(_DISP8_WEIGHTS, total)], where=kind == _SLOT_D)
    np.copyto(out, _IMM8[stream.weighted(_IMM8_WEIGHTS, total)], where=kind == _SLOT_I)
    np.copyto(out, stream.bytes((total + 7) // 8 * 8)[:total], where=kind == _SLOT_R)
    sign = np.where(stream.below(3, len(chosen)) == 0, np.uint8(0xFF), np.uint8(0))
    np.copyto(out, sign[instruction], where=kind == _SLOT_S)
    return out, sizes


def _gather(source: np.ndarray, starts: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Concatenate ``source[starts[i] : starts[i] + sizes[i]]`` for all i, without a Python loop."""
    total = int(sizes.sum())
    return source[np.repeat(starts - (np.cumsum(sizes) - sizes), sizes) + np.arange(total)]


def _code_pool(stream: _Stream, pages: int, page_size: int) -> np.ndarray:
    """``pages`` distinct pages of machine-code-like bytes, built without per-instruction Python loops.

    The byte stream interleaves fresh instructions with "idioms": short instruction sequences (2-8 instructions)
    drawn once per image and then repeated byte for byte with Zipf-like frequencies, as compilers repeat prologues,
    epilogues and call/test/branch sequences.
    """
    weights = _TEMPLATES[0]
    # The idiom library.
    idiom_instructions = stream.below(7, CODE_IDIOMS) + 2
    library, library_sizes = _expand(stream, stream.weighted(weights, int(idiom_instructions.sum())))
    group_starts = np.cumsum(idiom_instructions) - idiom_instructions
    idiom_sizes = np.add.reduceat(library_sizes, group_starts)
    idiom_starts = np.cumsum(idiom_sizes) - idiom_sizes
    idiom_weights = np.array([100_000 // (rank + 4) for rank in range(CODE_IDIOMS)], dtype=np.int64)
    # The stream: units that are either an idiom or one fresh instruction.
    needed = pages * page_size
    units = needed // 6 + 64  # units average about 9 bytes
    while True:
        is_idiom = stream.below(100, units) < CODE_IDIOM_PERCENT
        idiom = stream.weighted(idiom_weights, units)[is_idiom]
        fresh, fresh_sizes = _expand(stream, stream.weighted(weights, int((~is_idiom).sum())))
        unit_starts = np.empty(units, dtype=np.int64)
        unit_sizes = np.empty(units, dtype=np.int64)
        unit_starts[is_idiom] = idiom_starts[idiom]
        unit_sizes[is_idiom] = idiom_sizes[idiom]
        unit_starts[~is_idiom] = len(library) + np.cumsum(fresh_sizes) - fresh_sizes
        unit_sizes[~is_idiom] = fresh_sizes
        if int(unit_sizes.sum()) >= needed:
            break
        units *= 2  # only if the estimate was short; the retry draws fresh values
    out = _gather(np.concatenate([library, fresh]), unit_starts, unit_sizes)
    return out[:needed].reshape(pages, page_size)


# --------------------------------------------------------------------------------------------------------------------
# Page filling and writing.


def _stamp(rows: np.ndarray, first_page: int, salt: np.uint64, stream: _Stream, ascii_field: bool) -> None:
    """Overwrite a 16-byte field, unique to each page number, at a random offset of every row."""
    count, page_size = rows.shape
    page = np.arange(first_page, first_page + count, dtype=np.uint64)
    with np.errstate(over="ignore"):
        value = page * _GOLDEN + salt
    if ascii_field:  # "0x" + 14 hex digits: a bijection of the page number (mod 2**56)
        offset = stream.below(page_size - FIELD_BYTES + 1, count)
        shifts = np.arange(13, -1, -1, dtype=np.uint64) * np.uint64(4)
        digits = _HEX[((value & _MASK56)[:, None] >> shifts[None, :]) & np.uint64(15)]
        field = np.concatenate([np.broadcast_to(np.frombuffer(b"0x", dtype=np.uint8), (count, 2)), digits], axis=1)
    else:  # two little-endian words at an aligned offset, like a pointer pair or a counter
        offset = stream.below((page_size - FIELD_BYTES) // 8 + 1, count) * 8
        field = np.stack([value, page], axis=1).astype("<u8").view(np.uint8).reshape(count, FIELD_BYTES)
    rows[np.arange(count)[:, None], offset[:, None] + np.arange(FIELD_BYTES)[None, :]] = field


def _check_page_size(page_size: int) -> None:
    if page_size & (page_size - 1) or not MIN_PAGE_SIZE <= page_size <= MAX_PAGE_SIZE:
        raise ValueError(f"page size {page_size} must be a power of two from {MIN_PAGE_SIZE} to {MAX_PAGE_SIZE} bytes")


def _validate(size: int, seed: int, profile: str, page_size: int) -> None:
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r} (choose from {', '.join(PROFILES)})")
    _check_page_size(page_size)
    if size <= 0 or size % page_size:
        raise ValueError(f"size {size} bytes is not a positive multiple of the page size ({page_size} bytes)")
    if seed < 0:
        raise ValueError(f"seed {seed} must not be negative")


def generate(
    path: str | os.PathLike[str], size: int, seed: int = 1, profile: str = "mixed", page_size: int = DEFAULT_PAGE_SIZE
) -> dict[str, int]:
    """Write the image of ``size`` bytes to ``path`` (created or truncated); return the page count of each class.

    Raises ValueError for an unknown profile, a page size that is not a power of two from 512 bytes to 2 MiB, a size
    that is not a positive multiple of the page size, or a negative seed.
    """
    _validate(size, seed, profile, page_size)
    pages = size // page_size
    streams = _Streams(seed)
    budgets = _class_budgets(pages, PROFILES[profile])
    run_class, run_pages = _plan_runs(streams["layout"], budgets)

    pool_pages = max(2, min(POOL_PAGES, POOL_BYTES_MAX // page_size))
    pools: dict[str, np.ndarray] = {}
    salts: dict[str, np.uint64] = {}
    if budgets["text"]:
        pools["text"] = _text_pool(streams["text_pool"], pool_pages, page_size)
        salts["text"] = streams["text_field"].raw(1)[0]
    if budgets["code"]:
        pools["code"] = _code_pool(streams["code_pool"], pool_pages, page_size)
        salts["code"] = streams["code_field"].raw(1)[0]

    chunk_pages = max(1, min(pages, CHUNK_BYTES // page_size))
    buffer = np.empty((chunk_pages, page_size), dtype=np.uint8)  # untouched (no RSS) while only zeros are written
    random_pages = max(1, RANDOM_BYTES // page_size)

    with open(path, "wb", buffering=0) as out:
        out.truncate(size)  # zero runs stay holes; they read back as zeros
        filled = 0  # rows of buffer holding data for pages [buffer_page, buffer_page + filled)
        buffer_page = 0

        def flush() -> None:
            nonlocal filled
            if filled:
                view = memoryview(buffer[:filled]).cast("B")
                out.seek(buffer_page * page_size)
                while view:
                    view = view[out.write(view) :]
                filled = 0

        page = 0
        for class_index, length in zip(run_class.tolist(), run_pages.tolist(), strict=True):
            name = CLASSES[class_index]
            if name == "zero":
                flush()
                page += length
                continue
            remaining = length
            while remaining:
                if filled == 0:
                    buffer_page = page
                count = min(remaining, chunk_pages - filled)
                rows = buffer[filled : filled + count]
                if name == "random":  # in slices, to bound the temporary array
                    for first in range(0, count, random_pages):
                        part = rows[first : first + random_pages]
                        part[...] = streams["random"].bytes(part.size).reshape(part.shape)
                else:
                    pool = pools[name]
                    picks = streams[f"{name}_pick"].below(len(pool), count)
                    np.take(pool, picks, axis=0, out=rows, mode="clip")  # "clip" writes to rows without a temporary
                    _stamp(rows, page, salts[name], streams[f"{name}_field"], ascii_field=name == "text")
                filled += count
                page += count
                remaining -= count
                if filled == chunk_pages:
                    flush()
        flush()
    return budgets


# --------------------------------------------------------------------------------------------------------------------
# Command line.


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description="Write a deterministic, realistic-looking guest RAM image (zero, text, code and random pages).",
        epilog="Profiles: "
        + "; ".join(
            f"{name} = " + ", ".join(f"{weight}% {cls}" for cls, weight in weights.items())
            for name, weights in PROFILES.items()
        ),
    )
    parser.add_argument("output", metavar="OUTPUT", help="file to write (created or truncated), e.g. /dev/shm/g.img")
    parser.add_argument("--size", required=True, help="image size: bytes, K/M/G/T (10^n) or KiB/MiB/GiB/TiB (2^n)")
    parser.add_argument("--seed", type=int, default=1, help="generator seed (default: 1)")
    parser.add_argument("--profile", choices=list(PROFILES), default="mixed", help="page class mix (default: mixed)")
    parser.add_argument("--page-size", default=str(DEFAULT_PAGE_SIZE), help="page size (default: 4096)")
    parser.add_argument("--stats", action="store_true", help="print one JSON line with the page counts to stdout")
    parser.add_argument("-q", "--quiet", action="store_true", help="no summary line on stderr")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    prog = parser.prog
    try:
        page_size = parse_size(args.page_size)
        _check_page_size(page_size)
        size = parse_size(args.size)
    except ValueError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    if size <= 0 or size % page_size:
        print(
            f"{prog}: error: size {args.size} ({size} bytes) is not a positive multiple of the page size "
            f"({page_size} bytes)",
            file=sys.stderr,
        )
        return 2
    started = time.perf_counter()
    try:
        counts = generate(args.output, size, seed=args.seed, profile=args.profile, page_size=page_size)
    except ValueError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"{prog}: error: cannot write {args.output}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    elapsed = time.perf_counter() - started
    if args.stats:
        record = {"size": size, "page_size": page_size, "pages": size // page_size, "profile": args.profile,
                  "seed": args.seed, "counts": counts}  # fmt: skip
        print(json.dumps(record))
    if not args.quiet:
        summary = ", ".join(f"{count} {name}" for name, count in counts.items() if count)
        print(f"wrote {size} bytes to {args.output} in {elapsed:.2f} s ({summary} pages)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
