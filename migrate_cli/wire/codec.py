"""Codecs: a table of compressors keyed by name and by wire id.

Contract (QEMU's MultiFDMethods, borg's compressor table):
- A worker thread must create its Compressor or Decompressor once, when it starts, and use it for every batch
  until it exits. Never one per page or per batch, never shared between threads.
- ``Compressor.compress(batch)`` must return bytes that one ``Decompressor.decompress`` call turns back into
  ``batch``, on any worker, in any order: batches are independent (zlib: a reused raw-deflate stream ended with
  Z_FULL_FLUSH, so no back-reference crosses a batch; zstd: one frame per batch from a reused context).
- ``Decompressor.decompress(data, size)`` must return exactly ``size`` bytes, never more, or raise
  IntegrityError: library errors never escape as their own types.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import zstandard
from zlib_ng import zlib_ng

from ..errors import IntegrityError
from .frames import Encoding

Buffer = bytes | bytearray | memoryview


class Compressor(Protocol):
    def compress(self, batch: Buffer) -> bytes: ...


class Decompressor(Protocol):
    def decompress(self, data: Buffer, size: int) -> bytes: ...


@dataclass(frozen=True)
class Codec:
    name: str
    wire_id: Encoding
    levels: range
    default_level: int
    compressor: Callable[[int], Compressor]
    decompressor: Callable[[], Decompressor]
    # True when the compressor itself passes over incompressible input quickly (zstd, ~4 GB/s): the sender then
    # does not look for such pages first (entropy.py).
    skips_incompressible: bool = False
    # Bytes of earlier input a compressor at a level searches for matches (0: none). What a sample of pages must
    # span to compress as a whole batch does (sender/downtime.py).
    window: Callable[[int], int] = lambda _level: 0


# --- zlib: ISA-L where it is faster, zlib-ng elsewhere -------------------------------------------------------------
#
# Both engines write and read the same raw-deflate streams, so a sender with either engine talks to a receiver with
# either. ISA-L (the `isal` package, wheels for x86-64 and aarch64) compresses ~3x faster than zlib-ng at level 1
# with a better ratio (docs/PERFORMANCE.md), and inflates somewhat faster; its levels 1 and 2 serve zlib levels 1
# and 2. Its level 3 is slower than its 1 for a ratio barely better, and it has nothing above: zlib levels 3-9 stay
# on zlib-ng. Where `isal` does not install, zlib-ng does everything.

try:
    from isal import isal_zlib as _isal
except ImportError:  # pragma: no cover - isal ships wheels for the platforms vmmig runs on
    _isal = None

ISAL_LEVELS = range(1, 3)  # zlib levels ISA-L serves, each as the same ISA-L level


def deflate_engine(level: int | None = None) -> str:
    """Which library handles zlib at ``level`` (None: inflation) on this host: "isal" or "zlib-ng"."""
    if _isal is not None and (level is None or level in ISAL_LEVELS):
        return "isal"
    return "zlib-ng"


def _engine(level: int | None) -> Any:
    return _isal if deflate_engine(level) == "isal" else zlib_ng


class _ZlibCompressor:
    def __init__(self, level: int) -> None:
        engine = _engine(level)
        self._flush_mode = engine.Z_FULL_FLUSH
        self._stream = engine.compressobj(level, engine.DEFLATED, -15)

    def compress(self, batch: Buffer) -> bytes:
        # Z_FULL_FLUSH resets the window: the next batch never refers back into this one.
        return self._stream.compress(batch) + self._stream.flush(self._flush_mode)


class _ZlibDecompressor:
    def __init__(self) -> None:
        self._engine = _engine(None)
        self._stream = self._engine.decompressobj(-15)

    def decompress(self, data: Buffer, size: int) -> bytes:
        try:
            out = self._stream.decompress(data, size)
            leftover = len(self._stream.unconsumed_tail)
            # All input consumed and exactly `size` out is not enough: a match crossing `size` leaves output
            # pending inside the stream, which must be empty at a batch boundary.
            if not leftover and len(out) == size:
                leftover = len(self._stream.decompress(b"", 1))
        except self._engine.error as exc:
            self._stream = self._engine.decompressobj(-15)  # the old stream's state is undefined after an error
            raise IntegrityError(f"zlib decompression failed: {exc}") from None
        if len(out) != size or leftover:
            self._stream = self._engine.decompressobj(-15)
            raise IntegrityError(
                f"zlib batch decompressed to {len(out)}{'+' if leftover else ''} bytes, expected {size}"
            )
        return out


# --- zstd ---------------------------------------------------------------------------------------------------------


class _ZstdCompressor:
    def __init__(self, level: int) -> None:
        self._ctx = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=False)

    def compress(self, batch: Buffer) -> bytes:
        return self._ctx.compress(batch)


class _ZstdDecompressor:
    def __init__(self) -> None:
        self._ctx = zstandard.ZstdDecompressor()

    def decompress(self, data: Buffer, size: int) -> bytes:
        try:
            params = zstandard.get_frame_parameters(data)
            if params.content_size != size:
                raise IntegrityError(f"zstd batch announces {params.content_size} bytes, expected {size}")
            out = self._ctx.decompress(data, max_output_size=size)
        except zstandard.ZstdError as exc:
            raise IntegrityError(f"zstd decompression failed: {exc}") from None
        if len(out) != size:
            raise IntegrityError(f"zstd batch decompressed to {len(out)} bytes, expected {size}")
        return out


# --- none ---------------------------------------------------------------------------------------------------------


class _RawCompressor:
    def __init__(self, level: int = 0) -> None:
        pass

    def compress(self, batch: Buffer) -> bytes:
        raise AssertionError("the none codec sends batches raw and never calls compress")


class _RawDecompressor:
    def decompress(self, data: Buffer, size: int) -> bytes:
        if len(data) != size:
            raise IntegrityError(f"raw batch holds {len(data)} bytes, expected {size}")
        return bytes(data)


# --- the table ----------------------------------------------------------------------------------------------------

_BY_NAME: dict[str, Codec] = {}
_BY_WIRE_ID: dict[int, Codec] = {}


def register(codec: Codec) -> None:
    if codec.name in _BY_NAME or codec.wire_id in _BY_WIRE_ID:
        raise ValueError(f"codec {codec.name!r} / wire id {int(codec.wire_id)} registered twice")
    _BY_NAME[codec.name] = codec
    _BY_WIRE_ID[codec.wire_id] = codec


register(Codec("none", Encoding.RAW, range(0, 1), 0, _RawCompressor, _RawDecompressor, True))
register(Codec("zlib", Encoding.ZLIB, range(1, 10), 1, _ZlibCompressor, _ZlibDecompressor, window=lambda _l: 1 << 15))
register(
    Codec(
        "zstd",
        Encoding.ZSTD,
        range(1, 20),
        1,
        _ZstdCompressor,
        _ZstdDecompressor,
        True,
        window=lambda level: 1 << zstandard.ZstdCompressionParameters.from_level(level).window_log,
    )
)

DEFAULT_CODEC = "zlib"


def names() -> list[str]:
    return list(_BY_NAME)


def by_name(name: str) -> Codec:
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}: choose one of {', '.join(_BY_NAME)}") from None


def by_wire_id(wire_id: int) -> Codec | None:
    """The codec for a wire id, or None: the caller blames the peer (a protocol error)."""
    return _BY_WIRE_ID.get(wire_id)
