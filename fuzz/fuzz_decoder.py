"""A long fuzzing run against vmmig's sans-IO wire decoder (migrate_cli/wire/protocol.py) and the batch decompressors.

    python fuzz/fuzz_decoder.py --seconds 600 [--corpus DIR] [--findings DIR] [--engine auto|atheris|hypothesis]
    python fuzz/fuzz_decoder.py --make-corpus DIR       # write the seed corpus: valid frames and streams
    python fuzz/fuzz_decoder.py --reproduce FILE...     # run saved inputs through the checks, print the verdicts

One input is one byte stream, as it would arrive on a socket. For each input, both ``Decoder(Role.RECEIVER)`` and
``Decoder(Role.SENDER)`` get it whole and in chunks of pseudo-random sizes (seeded by the input), and:

1. nothing but ``ProtocolError`` or ``IntegrityError`` escapes the decoder;
2. chunking does not matter: the same frames, then the same error (type and message), whole or in chunks;
3. a failed decoder stays failed: the next call raises the same exception again;
4. every PAGES / PAGE_LIST frame goes through ``validate_pages`` against a fixed session (page size 4096, 64 pages,
   batches of 16), which may only raise ``ProtocolError``;
5. a batch that validates is decompressed with its codec (``codec.by_wire_id(frame.encoding)``) by a decompressor
   reused across the input's batches (as a receiver worker does) and by a fresh one; only ``IntegrityError`` may
   escape, and an accepted batch is exactly ``normal_count * 4096`` bytes;
6. exactness (docs/PROTOCOL.md: decompression must yield exactly normal × page_size bytes, "the receiver fails
   otherwise"): a zlib batch a fresh decompressor accepts must not inflate past that size;
7. the decoded batch is applied to a ``DiscardSink`` for the session (protocol 3: which checks each page against
   the frame's fingerprint): it raises ``CorruptFrame`` naming a page exactly when a page's fingerprint differs
   from the one the frame carries, and nothing else; an accepted batch leaves the frame's fingerprints in the sink.

Frames are built and re-framed the protocol-3 way (tests/encoded.py): each batch carries its pages' fingerprints, and
the CRC covers everything but page data, so a mutation of page data passes the decoder and reaches property 7.

A violation is a finding: saved as ``<findings>/<id>.bin`` (the raw input) and ``<id>.txt`` (hex and traceback),
counted once per distinct signature, and the run goes on. The last line printed says how many inputs were tried
and how many crashes (distinct findings) were found; the exit status is 1 if there were any.

Engines: atheris (libFuzzer, coverage-guided, with a frame-aware mutator that keeps lengths and CRCs right most of
the time so mutations reach the payload decoders) when it imports; otherwise hypothesis with a large
``max_examples``, drawing raw bytes and mutated seed streams.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import random
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import zlib
from collections.abc import Callable, Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

try:
    import atheris
except ImportError:  # the hypothesis engine needs nothing more
    atheris = None

WORKER_FLAG = "--atheris-worker"

# The atheris worker instruments vmmig's modules as they are imported, for coverage; every other run imports them plain.
_instrumented = atheris is not None and WORKER_FLAG in sys.argv
with atheris.instrument_imports(include=["migrate_cli"]) if _instrumented else contextlib.nullcontext():
    import numpy as np
    from zlib_ng import zlib_ng

    from migrate_cli.errors import CorruptFrame, IntegrityError, ProtocolError
    from migrate_cli.receiver.discard import DiscardSink
    from migrate_cli.wire import codec as codecs
    from migrate_cli.wire import frames as wire
    from migrate_cli.wire.conversation import Role
    from migrate_cli.wire.digest import fingerprint_pages, image_digest
    from migrate_cli.wire.protocol import Decoder, encode, validate_pages
    from tests.encoded import fingerprinted, framed


PAGE_SIZE = 4096
SESSION_PAGES = 64
SESSION_BATCH = 16
MAX_INPUT = 1 << 16  # bytes: libFuzzer's -max_len, and the largest seed


def session_hello(codec: int = wire.Encoding.ZLIB, page_size: int = PAGE_SIZE) -> wire.Hello:
    return wire.Hello(page_size, SESSION_PAGES * page_size, codec, 1, b"fuzz-session-id!", batch_pages=SESSION_BATCH)


SESSION_HELLO = encode(session_hello())
WELCOME = encode(wire.Welcome())


class PropertyViolation(AssertionError):
    """One of the properties in the module docstring does not hold for an input."""


# --- the checks ------------------------------------------------------------------------------------------------


def chunks_of(data: bytes) -> list[bytes]:
    """Split ``data`` at pseudo-random points chosen from the data itself (reproducible: same input, same chunks)."""
    rng = random.Random(zlib.crc32(data))
    sizes = [1, 2, 3, 5, 11, 12, 13, 44, 56, 100, 4096, 4108, 65536]
    out: list[bytes] = []
    pos = 0
    while pos < len(data):
        size = rng.choice(sizes) if rng.random() < 0.8 else rng.randint(1, len(data))
        out.append(data[pos : pos + size])
        pos += size
    return out


def decode(role: Role, pieces: Iterable[bytes]) -> tuple[list[wire.Frame], Exception | None]:
    """Feed ``pieces`` to a fresh decoder, draining frames after each; return the frames and the error, if any."""
    decoder = Decoder(role)
    frames: list[wire.Frame] = []
    try:
        for piece in pieces:
            decoder.receive_data(piece)
            frames.extend(decoder.frames())
    except (ProtocolError, IntegrityError) as exc:
        try:
            decoder.next_frame()
        except (ProtocolError, IntegrityError) as again:
            if again is not exc:
                raise PropertyViolation(f"a failed decoder raised a new error: {again!r} after {exc!r}") from None
        else:
            raise PropertyViolation(f"a failed decoder decoded again after {exc!r}") from None
        return frames, exc
    return frames, None


def check_batch(frame: wire.Pages, reused: dict[str, codecs.Decompressor], sink: DiscardSink) -> None:
    """Properties 4 to 7 for one decoded PAGES or PAGE_LIST frame."""
    try:
        validate_pages(frame, PAGE_SIZE, SESSION_PAGES, SESSION_BATCH)
    except ProtocolError:
        return
    codec = codecs.by_wire_id(frame.encoding)
    if codec is None:
        return  # the receiver refuses it against the session's codec: a ProtocolError (receiver/pipeline.py)
    size = frame.normal_count * PAGE_SIZE
    decompressor = reused.setdefault(codec.name, codec.decompressor())
    decoded: bytes | None = None
    for which, worker in (("reused", decompressor), ("fresh", codec.decompressor())):
        try:
            out = worker.decompress(frame.data, size)
        except IntegrityError:
            continue
        if len(out) != size:
            raise PropertyViolation(f"{codec.name} ({which}) returned {len(out)} bytes for a {size}-byte batch")
        if which == "fresh":
            decoded = out
            if codec.wire_id == wire.Encoding.ZLIB and size:
                inflated = len(zlib_ng.decompressobj(-15).decompress(bytes(frame.data), size + 1))
                if inflated > size:
                    raise PropertyViolation(
                        f"zlib batch accepted as {size} bytes although it inflates past them (to {inflated}+)"
                    )
    if decoded is not None:
        apply_batch(frame, decoded, sink)


def apply_batch(frame: wire.Pages, decoded: bytes, sink: DiscardSink) -> None:
    """Property 7: the sink refuses the batch exactly when a page differs from its fingerprint, naming the first."""
    landed = np.empty(frame.normal_count, dtype=np.uint64)
    fingerprint_pages(decoded, PAGE_SIZE, landed)
    sent = frame.fingerprint_array()
    bad = np.flatnonzero(landed != sent)
    try:
        sink.write_batch(frame, decoded)
    except CorruptFrame as exc:
        if not bad.size:
            raise PropertyViolation(f"a batch whose pages match their fingerprints was refused: {exc}") from None
        first = int(frame.index_array()[np.flatnonzero(~zero_mask(frame))[bad[0]]])
        if not str(exc).startswith(f"page {first} "):
            raise PropertyViolation(f"page {first} differs from its fingerprint, but the sink said: {exc}") from None
        return
    if bad.size:
        raise PropertyViolation(f"{bad.size} pages that differ from their fingerprints were accepted")
    ids = frame.index_array()[~zero_mask(frame)]
    if not np.array_equal(sink.fingerprints[ids], sent):
        raise PropertyViolation("an accepted batch left other fingerprints in the sink than the frame's")


def zero_mask(frame: wire.Pages) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(frame.zero_bitmap, np.uint8), count=frame.count, bitorder="little")
    return bits.astype(bool)


def check(data: bytes) -> None:
    """Every property of the module docstring for one input; raises on a violation.

    Each role reads the input twice: as the very first bytes of a connection, and right after a valid first frame
    (the session's HELLO, or a WELCOME), so that a single hostile PAGES frame reaches the batch checks too.
    """
    for role, first in (
        (Role.RECEIVER, b""),
        (Role.RECEIVER, SESSION_HELLO),
        (Role.SENDER, b""),
        (Role.SENDER, WELCOME),
    ):
        stream = first + data
        pieces = chunks_of(stream)
        whole_frames, whole_error = decode(role, [stream])
        frames, error = decode(role, pieces)
        if frames != whole_frames or repr(error) != repr(whole_error):
            raise PropertyViolation(
                f"{role.value}: chunking changed the outcome: {len(whole_frames)} frames then {whole_error!r} "
                f"whole, {len(frames)} frames then {error!r} in {len(pieces)} chunks"
            )
        reused: dict[str, codecs.Decompressor] = {}
        sink = DiscardSink(SESSION_PAGES * PAGE_SIZE, PAGE_SIZE)
        for frame in frames:
            if isinstance(frame, wire.Pages):
                check_batch(frame, reused, sink)


# --- findings --------------------------------------------------------------------------------------------------


def signature(exc: BaseException) -> str:
    """What makes two findings the same bug: the exception type, where it was raised, the message's shape."""
    frames = traceback.extract_tb(exc.__traceback__)
    where = f"{Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else "?"
    shape = re.sub(r"\d+", "N", str(exc))[:120]
    return f"{type(exc).__name__} at {where}: {shape}"


class Findings:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.seen: set[str] = set()

    def record(self, data: bytes, exc: BaseException) -> None:
        sig = signature(exc)
        if sig in self.seen:
            return
        self.seen.add(sig)
        name = "finding-" + hashlib.sha1(sig.encode()).hexdigest()[:12]
        if (self.directory / f"{name}.bin").exists():
            return  # found by an earlier worker of this run
        (self.directory / f"{name}.bin").write_bytes(data)
        text = "".join(traceback.format_exception(exc))
        (self.directory / f"{name}.txt").write_text(f"{sig}\n\ninput ({len(data)} bytes):\n{data.hex()}\n\n{text}")
        print(f"fuzz: FINDING {sig} ({len(data)} bytes): {data[:256].hex()}", file=sys.stderr, flush=True)


def crash_files(directory: Path) -> list[Path]:
    """Findings of the checks, and libFuzzer's own artifacts (a native crash, a timeout, running out of memory)."""
    ours = sorted(directory.glob("finding-*.bin"))
    native = sorted(p for p in directory.iterdir() if re.match(r"(crash|timeout|oom|leak)-", p.name))
    return ours + native


# --- seeds and mutations ---------------------------------------------------------------------------------------


def batch(pages: list[bytes], start: int, codec: str, indices: list[int] | None = None) -> wire.Pages:
    bitmap = sum(1 << i for i, page in enumerate(pages) if not any(page)).to_bytes((len(pages) + 7) // 8, "little")
    normal = b"".join(page for page in pages if any(page))
    chosen = codecs.by_name(codec)
    data = normal if codec == "none" or not normal else chosen.compressor(chosen.default_level).compress(normal)
    encoding = chosen.wire_id if data is not normal else wire.Encoding.RAW
    packed = None if indices is None else b"".join(struct.pack("!Q", i) for i in indices)
    return fingerprinted(wire.Pages(start, len(pages), encoding, bitmap, data, packed), PAGE_SIZE)


def page(kind: int) -> bytes:
    if kind == 0:
        return bytes(PAGE_SIZE)
    if kind == 1:
        return (b"vmmig fuzz page %d " % kind * 300)[:PAGE_SIZE]
    return random.Random(kind).randbytes(16) * (PAGE_SIZE // 16)


def digest(pages: list[bytes]) -> bytes:
    fingerprints = np.empty(len(pages), dtype=np.uint64)
    fingerprint_pages(b"".join(pages), PAGE_SIZE, fingerprints)
    return image_digest(fingerprints)


def seeds() -> dict[str, bytes]:
    """Valid frames and streams for both directions, plus a few near-misses worth mutating."""
    image = [page(i % 5) for i in range(SESSION_PAGES)]
    first = [batch(image[i : i + SESSION_BATCH], i, "zlib") for i in range(0, SESSION_PAGES, SESSION_BATCH)]
    dirty = [3, 9, 10, 40, 63]
    second = batch([page(7) for _ in dirty], dirty[0], "zlib", dirty)
    final = [*image]
    for i in dirty:
        final[i] = page(7)
    too_long = zlib_ng.compressobj(9, zlib_ng.DEFLATED, -15)
    inflating_past = too_long.compress(b"\x01" * (2 * PAGE_SIZE + 300)) + too_long.flush(zlib_ng.Z_FULL_FLUSH)
    frames: dict[str, wire.Frame] = {
        "hello-zlib": session_hello(),
        "hello-zstd": session_hello(wire.Encoding.ZSTD),
        "hello-raw": session_hello(wire.Encoding.RAW),
        "hello-512": session_hello(page_size=512),
        "welcome": wire.Welcome(),
        "keepalive": wire.Keepalive(),
        "pages-raw": batch([page(2)], 5, "none"),
        "pages-zlib": first[0],
        "pages-zstd": batch(image[16:32], 16, "zstd"),
        "pages-all-zero": batch([bytes(PAGE_SIZE)] * 16, 48, "zlib"),
        "page-list-zlib": second,
        "page-list-raw": batch([page(3)], 63, "none", [63]),
        "pages-inflating-past": fingerprinted(wire.Pages(0, 2, wire.Encoding.ZLIB, b"\x00", inflating_past)),
        "pages-wrong-fingerprint": dataclasses.replace(
            batch([page(2), page(3)], 5, "none"), fingerprints=bytes(8) + batch([page(3)], 6, "none").fingerprints
        ),
        "pass-end": wire.PassEnd(1, 4),
        "pass-landed": wire.PassLanded(1),
        "end": wire.End(SESSION_PAGES, 5, digest(final)),
        "result-ok": wire.Result(0, digest(final)),
        "result-mismatch": wire.Result(1, bytes(16)),
        "abort": wire.Abort(6, "bad frame magic 0x1603 (not a vmmig stream, or out of step)"),
        "handoff": wire.Handoff("tcp:127.0.0.1:4445"),
        "handoff-done": wire.HandoffDone(1, "the destination QEMU did not start"),
    }
    out = {name: encode(frame) for name, frame in frames.items()}
    stream = [
        session_hello(),
        *first,
        wire.PassEnd(1, 4),
        second,
        wire.PassEnd(2, 1),
        wire.End(SESSION_PAGES, 5, digest(final)),
    ]
    out["stream-receiver-zlib"] = b"".join(encode(f) for f in stream)
    zstd_stream = [session_hello(wire.Encoding.ZSTD), batch(image[:16], 0, "zstd"), wire.PassEnd(1, 1)]
    out["stream-receiver-zstd"] = b"".join(encode(f) for f in zstd_stream)
    out["stream-sender"] = b"".join(
        encode(f) for f in (wire.Welcome(), wire.Keepalive(), wire.Keepalive(), wire.Result(0, digest(final)))
    )
    landing = (wire.Welcome(features=4), wire.PassLanded(1), wire.Keepalive(), wire.PassLanded(2))
    out["stream-sender-live"] = b"".join(encode(f) for f in (*landing, wire.Result(0, digest(final))))
    handing_off = (
        wire.Welcome(),
        wire.Handoff("tcp:[::1]:4446"),
        wire.Keepalive(),
        wire.Result(0, digest(final)),
        wire.HandoffDone(0),
    )
    out["stream-sender-handoff"] = b"".join(encode(f) for f in handing_off)
    assert all(len(seed) <= MAX_INPUT for seed in out.values())
    return out


INTERESTING = [0, 1, 2, 7, 8, 15, 16, 17, 63, 64, 65, 255, 256, 4095, 4096, 4097, 65535, 65536, 65537, 2**31 - 1]
INTERESTING += [2**31, 2**32 - 1, 2**63 - 1, 2**64 - 1, 17309704, 17309705, 1 << 50]


def split_frames(data: bytes) -> tuple[list[tuple[int, int, bytes]], bytes]:
    """The frames of a stream as (type, flags, payload), following each header's length; the rest as trailing."""
    frames: list[tuple[int, int, bytes]] = []
    pos = 0
    while len(data) - pos >= wire.HEADER.size:
        magic, frame_type, flags, length, _crc = wire.HEADER.unpack_from(data, pos)
        end = pos + wire.HEADER.size + length
        if magic != wire.FRAME_MAGIC or end > len(data):
            break
        frames.append((frame_type, flags, data[pos + wire.HEADER.size : end]))
        pos = end
    return frames, data[pos:]


def join_frames(frames: list[tuple[int, int, bytes]], trailing: bytes) -> bytes:
    """Frames with right lengths and CRCs (whatever their type, flags and payload; a batch's CRC over all but its
    page data, as its own count and bitmap say), then the trailing bytes."""
    return (
        b"".join(framed(frame_type & 0xFF, payload, flags & 0xFF) for frame_type, flags, payload in frames) + trailing
    )


def set_field(rng: random.Random, payload: bytes) -> bytes:
    """Overwrite a 1, 2, 4 or 8-byte big-endian field in the first 48 bytes with an interesting value."""
    width = rng.choice([1, 2, 4, 8])
    if len(payload) < width:
        return payload
    offset = rng.randrange(0, min(len(payload) - width, 48) + 1)
    value = (rng.choice(INTERESTING) + rng.choice([0, 0, 0, -1, 1])) % (1 << (8 * width))
    return payload[:offset] + value.to_bytes(width, "big") + payload[offset + width :]


def byte_mutation(rng: random.Random, data: bytes, max_size: int) -> bytes:
    """A plain byte-level mutation (the hypothesis engine's stand-in for libFuzzer's)."""
    buf = bytearray(data)
    kind = rng.randrange(6)
    if kind == 0 and buf:
        buf[rng.randrange(len(buf))] ^= 1 << rng.randrange(8)
    elif kind == 1 and buf:
        buf[rng.randrange(len(buf))] = rng.randrange(256)
    elif kind == 2:
        at = rng.randint(0, len(buf))
        buf[at:at] = rng.randbytes(rng.randint(1, 16))
    elif kind == 3 and buf:
        at = rng.randrange(len(buf))
        del buf[at : at + rng.randint(1, 16)]
    elif kind == 4 and buf:
        at = rng.randrange(len(buf))
        buf[at:at] = buf[at : at + rng.randint(1, 64)]
    else:
        del buf[rng.randint(0, len(buf)) :]
    return bytes(buf[:max_size])


def structured_mutation(
    data: bytes, max_size: int, rng: random.Random, mutate_bytes: Callable[[bytes, int], bytes], pool: list[bytes]
) -> bytes:
    """Mutate one frame of the stream and make its length and CRC right again (most of the time), so that the
    mutation reaches the payload decoder instead of dying at the CRC check."""
    frames, trailing = split_frames(data)
    choice = rng.random()
    if not frames or choice < 0.12:
        return mutate_bytes(data, max_size)  # raw: lengths and CRCs may break, on purpose
    i = rng.randrange(len(frames))
    frame_type, flags, payload = frames[i]
    if choice < 0.45:
        payload = mutate_bytes(payload, min(max_size, len(payload) + 64))
    elif choice < 0.65:
        payload = set_field(rng, payload)
    elif choice < 0.72:
        payload = payload[: max(0, len(payload) - rng.randint(1, 12))]  # cut a batch's data short
    elif choice < 0.76:
        frame_type = rng.choice([*map(int, wire.FrameType), rng.randrange(256)])
    elif choice < 0.78:
        flags = rng.randrange(256)
    elif choice < 0.84:
        frames.insert(rng.randint(0, len(frames)), frames[i])
    elif choice < 0.89:
        del frames[i]
        return join_frames(frames, trailing)[:max_size]
    else:
        donor, _ = split_frames(rng.choice(pool))
        if donor:
            frames.insert(rng.randint(0, len(frames)), rng.choice(donor))
    if i < len(frames):
        frames[i] = (frame_type, flags, payload)
    return join_frames(frames, trailing)[:max_size]


# --- engines ---------------------------------------------------------------------------------------------------


class Counter:
    """Inputs tried by this process, written to ``path`` now and then (the parent adds up its workers)."""

    def __init__(self, path: Path | None) -> None:
        self.runs = 0
        self.path = path
        self._last = 0.0

    def tick(self) -> None:
        self.runs += 1
        now = time.monotonic()
        if self.path is not None and now - self._last > 1.0:
            self.flush()
            self._last = now

    def flush(self) -> None:
        if self.path is not None:
            self.path.write_text(str(self.runs))


def run_atheris_worker(findings_dir: Path, counter_path: Path, libfuzzer_args: list[str]) -> None:
    """Inside the libFuzzer child: register the target and the frame-aware mutator, then fuzz until told to stop."""
    assert atheris is not None
    findings = Findings(findings_dir)
    counter = Counter(counter_path)
    pool = list(seeds().values())

    def test_one_input(data: bytes) -> None:
        counter.tick()
        try:
            check(data)
        except Exception as exc:  # every escape is a finding; keep fuzzing
            findings.record(data, exc)

    def mutator(data: bytes, max_size: int, seed: int) -> bytes:
        rng = random.Random(seed)
        return structured_mutation(data, max_size, rng, lambda d, n: atheris.Mutate(d, max(n, 1)), pool)

    import atexit

    atexit.register(counter.flush)
    atheris.Setup([sys.argv[0], *libfuzzer_args], test_one_input, custom_mutator=mutator)
    atheris.Fuzz()


def run_atheris(seconds: float, corpus: Path | None, findings_dir: Path) -> int:
    """Run libFuzzer workers until ``seconds`` have passed (a worker that dies is restarted); return inputs tried."""
    work = Path(tempfile.mkdtemp(prefix="vmmig-fuzz-corpus-"))
    try:
        return fuzz_with_workers(seconds, corpus, findings_dir, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def fuzz_with_workers(seconds: float, corpus: Path | None, findings_dir: Path, work: Path) -> int:
    """libFuzzer children until the time is up; ``work`` holds the growing corpus (seeds are only read)."""
    seed_dir = corpus if corpus is not None else work / "seeds"
    if corpus is None:
        make_corpus(seed_dir)
    live = work / "live"
    live.mkdir()
    log = findings_dir / "libfuzzer.log"
    deadline = time.monotonic() + seconds
    total = 0
    worker = 0
    while (remaining := int(deadline - time.monotonic())) >= 2:
        counter_path = work / f"runs-{worker}"
        args = [
            str(live),
            str(seed_dir),
            f"-max_total_time={remaining}",
            f"-max_len={MAX_INPUT}",
            "-timeout=20",
            "-rss_limit_mb=3072",
            "-use_value_profile=1",
            "-print_final_stats=1",
            f"-artifact_prefix={findings_dir}/",
        ]
        command = [sys.executable, str(Path(__file__).resolve()), WORKER_FLAG, str(findings_dir), str(counter_path)]
        began = time.monotonic()
        with open(log, "a") as out:
            proc = subprocess.Popen([*command, "--", *args], stdout=out, stderr=subprocess.PIPE, text=True)
            assert proc.stderr is not None
            done = None
            for line in proc.stderr:
                out.write(line)
                if m := re.match(r"Done (\d+) runs", line):
                    done = int(m.group(1))
                if re.search(r"pulse|DONE|Done \d+|ERROR|FINDING|deadly|Timeout|out-of-memory", line):
                    print(line.rstrip()[:400], file=sys.stderr, flush=True)
            proc.wait()
        counted = int(counter_path.read_text()) if counter_path.exists() else 0
        total += max(done or 0, counted)
        if proc.returncode != 0:
            if time.monotonic() - began < 5:  # dies at start-up (on a corpus input?): restarting would not help
                print(f"fuzz: worker {worker} exited {proc.returncode} at once; see {log}", file=sys.stderr)
                break
            print(f"fuzz: worker {worker} exited {proc.returncode}; restarting", file=sys.stderr, flush=True)
        worker += 1
    return total


def run_hypothesis(seconds: float, corpus: Path | None, findings_dir: Path) -> int:
    """The fallback: hypothesis draws raw bytes and mutated seeds, round after round, until ``seconds`` pass."""
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import strategies as st

    pool = [p.read_bytes() for p in sorted(corpus.iterdir())] if corpus is not None else list(seeds().values())
    findings = Findings(findings_dir)
    counter = Counter(None)

    def mutated(seed: bytes, rng: random.Random, rounds: int) -> bytes:
        data = seed
        for _ in range(rounds):
            data = structured_mutation(data, MAX_INPUT, rng, lambda d, n: byte_mutation(rng, d, n), pool)
        return data

    inputs = st.one_of(
        st.binary(max_size=512),
        st.builds(mutated, st.sampled_from(pool), st.randoms(use_true_random=True), st.integers(1, 6)),
        st.lists(st.sampled_from(pool), min_size=1, max_size=4).map(b"".join),
    )

    deadline = time.monotonic() + seconds

    # Rounds of a few hundred examples until the clock runs out: ending one endless round with an exception made
    # hypothesis print "You can reproduce this failure by adding @seed(...)" after every clean run.
    @settings(
        max_examples=500,
        deadline=None,
        database=None,
        phases=[Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @given(inputs)
    def fuzz(data: bytes) -> None:
        if time.monotonic() > deadline:
            return  # the rest of this round is skipped, not checked
        counter.tick()
        try:
            check(data)
        except Exception as exc:
            findings.record(data, exc)

    while time.monotonic() < deadline:
        fuzz()
    return counter.runs


def make_corpus(directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for name, data in seeds().items():
        (directory / name).write_bytes(data)


def reproduce(paths: list[Path]) -> int:
    bad = 0
    for path in paths:
        data = path.read_bytes()
        try:
            check(data)
        except Exception as exc:
            bad += 1
            print(f"{path}: {signature(exc)}")
            traceback.print_exception(exc)
        else:
            print(f"{path}: ok ({len(data)} bytes)")
    return 1 if bad else 0


def main(argv: list[str]) -> int:
    if argv[:1] == [WORKER_FLAG]:
        split = argv.index("--")
        run_atheris_worker(Path(argv[1]), Path(argv[2]), argv[split + 1 :])
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=600.0, help="how long to fuzz (default 600)")
    parser.add_argument("--corpus", type=Path, help="seed corpus directory (default: the built-in seeds)")
    parser.add_argument("--findings", type=Path, help="where findings go (default: a new temporary directory)")
    parser.add_argument("--engine", choices=["auto", "atheris", "hypothesis"], default="auto")
    parser.add_argument("--make-corpus", type=Path, metavar="DIR", help="write the seed corpus to DIR and exit")
    parser.add_argument("--reproduce", type=Path, nargs="+", metavar="FILE", help="check saved inputs and exit")
    args = parser.parse_args(argv)
    if args.make_corpus:
        make_corpus(args.make_corpus)
        print(f"fuzz: wrote {len(seeds())} seeds to {args.make_corpus}")
        return 0
    if args.reproduce:
        return reproduce(args.reproduce)
    engine = args.engine
    if engine == "auto":
        engine = "atheris" if atheris is not None else "hypothesis"
    if engine == "atheris" and atheris is None:
        parser.error("atheris does not import here: pip install atheris, or use --engine hypothesis")
    findings_dir = args.findings or Path(tempfile.mkdtemp(prefix="vmmig-fuzz-findings-"))
    findings_dir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    runner = run_atheris if engine == "atheris" else run_hypothesis
    tried = runner(args.seconds, args.corpus, findings_dir)
    elapsed = time.monotonic() - started
    crashes = crash_files(findings_dir)
    for crash in crashes:
        data = crash.read_bytes()
        shown = data[:1024].hex() + ("..." if len(data) > 1024 else "")
        print(f"fuzz: crash {crash} ({len(data)} bytes): {shown}")
    with contextlib.suppress(OSError):
        findings_dir.rmdir()  # nothing found and no log: leave no empty directory behind
    where = f" (findings and log in {findings_dir})" if findings_dir.exists() else ""
    print(f"fuzz: {tried} inputs tried in {elapsed:.0f} s with {engine}, {len(crashes)} crashes found{where}")
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
