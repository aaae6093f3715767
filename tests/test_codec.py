"""Codecs: a table with wire ids; every codec round-trips self-contained batches, in any order, on any thread."""

import os
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
