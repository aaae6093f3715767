"""Codecs: a table with wire ids; every codec round-trips self-contained batches, in any order, on any thread."""

import os
import random
from concurrent.futures import ThreadPoolExecutor

import pytest

from migrate_cli.errors import IntegrityError
from migrate_cli.wire import codec as codecs
from migrate_cli.wire.frames import Encoding

COMPRESSING = [n for n in codecs.names() if n != "none"]


def batches(n: int = 12) -> list[bytes]:
    text = (b"the quick brown fox jumps over the lazy dog; def f(x): return x * 2\n" * 4000)[: 64 * 1024]
    return [text[i:] + os.urandom(i * 100) + text[: 64 * 1024 - i - i * 100] for i in range(n)]


def test_registry_maps_names_and_wire_ids_both_ways() -> None:
    for name in codecs.names():
        codec = codecs.by_name(name)
        assert codecs.by_wire_id(codec.wire_id) is codec
    assert codecs.by_name("none").wire_id == Encoding.RAW
    assert codecs.by_wire_id(200) is None
    with pytest.raises(ValueError, match="unknown codec 'lz77'"):
        codecs.by_name("lz77")


def test_registering_a_duplicate_wire_id_is_refused() -> None:
    zlib = codecs.by_name("zlib")
    with pytest.raises(ValueError, match="registered twice"):
        codecs.register(codecs.Codec("other", zlib.wire_id, range(1), 0, zlib.compressor, zlib.decompressor))


@pytest.mark.parametrize("name", COMPRESSING)
def test_batches_from_one_reused_compressor_decode_out_of_order(name: str) -> None:
    codec = codecs.by_name(name)
    compressor = codec.compressor(codec.default_level)
    data = batches()
    packed = [compressor.compress(b) for b in data]
    assert all(len(p) < len(b) for p, b in zip(packed, data, strict=True))
    decompressor = codec.decompressor()
    for i in [5, 0, 11, 3, 3, 7]:
        assert decompressor.decompress(packed[i], len(data[i])) == data[i]


@pytest.mark.parametrize("name", COMPRESSING)
def test_decompression_never_yields_more_than_announced(name: str) -> None:
    codec = codecs.by_name(name)
    data = batches(1)[0]
    packed = codec.compressor(1).compress(data)
    with pytest.raises(IntegrityError, match="expected 1000"):
        codec.decompressor().decompress(packed, 1000)


@pytest.mark.parametrize("name", COMPRESSING)
def test_corrupt_batches_raise_integrity_errors_not_library_errors(name: str) -> None:
    codec = codecs.by_name(name)
    data = batches(1)[0]
    packed = bytearray(codec.compressor(1).compress(data))
    packed[len(packed) // 2] ^= 0xFF
    packed[5] ^= 0x55
    with pytest.raises(IntegrityError):
        codec.decompressor().decompress(bytes(packed), len(data))
    with pytest.raises(IntegrityError):
        codec.decompressor().decompress(b"\x00garbage" * 10, len(data))


@pytest.mark.parametrize("name", COMPRESSING)
def test_threads_each_owning_a_codec_never_corrupt_each_other(name: str) -> None:
    """Regression guard in the style of borg's test_lz4_threaded: 8 threads, distinct data, 30 rounds each."""
    codec = codecs.by_name(name)

    def worker(seed: int) -> bool:
        compressor, decompressor = codec.compressor(1), codec.decompressor()
        for round_ in range(30):
            data = (seed.to_bytes(2, "big") * 5000 + os.urandom(round_ * 50) + bytes(2000))[:12000]
            assert decompressor.decompress(compressor.compress(data), len(data)) == data
        return True

    with ThreadPoolExecutor(8) as pool:
        assert all(pool.map(worker, range(8)))  # map re-raises worker exceptions here


def test_none_codec_checks_the_length() -> None:
    none = codecs.by_name("none").decompressor()
    assert none.decompress(b"abcd", 4) == b"abcd"
    with pytest.raises(IntegrityError):
        none.decompress(b"abc", 4)


def _guest_like_batches() -> list[bytes]:
    """Four 256 KiB batches of text, code-like runs and zeros: compressible, each different."""
    rng = random.Random(7)
    words = [bytes(rng.choice(b"abcdefghijklmnop ") for _ in range(rng.randint(2, 9))) for _ in range(300)]
    return [b" ".join(rng.choice(words) for _ in range(40000))[: 256 << 10].ljust(256 << 10, b"\0") for _ in range(4)]


@pytest.mark.parametrize("level", [1, 2, 6])
def test_zlib_streams_of_either_engine_decode_with_the_other_out_of_order(level: int) -> None:
    """ISA-L and zlib-ng write and read the same raw-deflate batches: a sender with one and a receiver with the
    other interoperate, whichever serves a level."""
    from isal import isal_zlib
    from zlib_ng import zlib_ng

    batches = _guest_like_batches()
    for writer, reader in [(isal_zlib, zlib_ng), (zlib_ng, isal_zlib)]:
        stream = writer.compressobj(min(level, 3) if writer is isal_zlib else level, writer.DEFLATED, -15)
        encoded = [stream.compress(b) + stream.flush(writer.Z_FULL_FLUSH) for b in batches]
        for index in (3, 0, 2, 1):
            assert reader.decompressobj(-15).decompress(encoded[index], len(batches[index])) == batches[index]


def test_zlib_levels_1_and_2_use_isal_higher_levels_and_inflation_as_documented() -> None:
    assert [codecs.deflate_engine(level) for level in range(1, 10)] == ["isal", "isal"] + ["zlib-ng"] * 7
    assert codecs.deflate_engine(None) == "isal"


def test_zlib_level_1_compresses_at_least_as_well_as_zlib_ng_level_1() -> None:
    """--level 1 never maps to a level whose ratio is worse than zlib-ng's level 1."""
    from zlib_ng import zlib_ng

    data = b"".join(_guest_like_batches())
    ours = codecs.by_name("zlib").compressor(1).compress(data)
    reference = zlib_ng.compressobj(1, zlib_ng.DEFLATED, -15)
    theirs = reference.compress(data) + reference.flush(zlib_ng.Z_FULL_FLUSH)
    assert len(ours) <= len(theirs)
