"""One parser for every size, rate and duration on the command line.

Sizes: a number with an optional suffix. ``K M G T`` are powers of 10 (350M = 350,000,000), ``KiB MiB GiB TiB``
(also ``Ki Mi Gi Ti``) are powers of 2, ``B`` or no suffix means bytes. Rates are sizes per second (a trailing
``/s`` or ``ps`` is accepted) or bits per second: ``bit Kbit Mbit Gbit Tbit`` (``Kibit`` ...), ``bps Kbps Mbps``.
A lowercase ``b`` right after a prefix (``100Mb``, ``1Mib``) is refused: it reads as bits to some and bytes to
others, and the two differ eightfold. Durations need a unit: ``ms s m h``. Reports use MB = 10^6 bytes.

Every parser raises ValueError with a one-line message for any text it refuses, a huge number included (never
OverflowError): the CLI turns it into a usage error, `vmmig ctl ... set` into a refused request.
"""

from __future__ import annotations

import math
import re
from fractions import Fraction

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
# A rate: a size's number and unit, then optionally "/s" or "ps" (Mbps, MBps); the unit is matched lazily so
# that "ps" goes to the last group.
_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*?)(/s|ps)?\s*$", re.IGNORECASE)
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)\s*$")

_SIZE_UNITS: dict[str, int] = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "m": 10**6,
    "g": 10**9,
    "t": 10**12,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "ki": 2**10,
    "mi": 2**20,
    "gi": 2**30,
    "ti": 2**40,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_PREFIXES = ("k", "m", "g", "t", "ki", "mi", "gi", "ti")  # the keys of _SIZE_UNITS that a "B" or "bit" may follow
_DURATION_UNITS: dict[str, float] = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}

MAX_SIZE = 2**63 - 1  # bytes, and bytes per second: what a signed 64-bit field or an off_t holds
MAX_DURATION = 365 * 24 * 3600.0  # a year: far beyond any timeout, and well inside what time functions take
_MAX_DIGITS = 40  # a number longer than this is refused before it is converted (no 4,300-digit int parsing)


def parse_size(text: str) -> int:
    """Parse ``"350M"`` -> 350_000_000, ``"1GiB"`` -> 1_073_741_824, ``"4096"`` -> 4096. Bits are refused."""
    shown = _shown(text)
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(f"invalid size {shown}: expected a number with an optional unit such as 4KiB, 350M, 1GiB")
    number, unit = match.groups()
    if unit.lower().endswith("bit") or _lowercase_b(unit):
        bytes_unit = _prefix_shown(unit.lower().removesuffix("bit").removesuffix("b")) + "B"
        raise ValueError(
            f"invalid size {shown}: a size is in bytes, and {unit!r} reads as bits: write {number}{bytes_unit} "
            "(bits are for rates only)"
        )
    return _bytes(shown, number, unit, Fraction(1), "size")


def _bytes(shown: str, number: str, unit: str, scale: Fraction, kind: str) -> int:
    """``number`` times ``unit``'s factor times ``scale`` (1/8 for bits), checked whole and in range."""
    factor = _SIZE_UNITS.get(unit.lower())
    if factor is None:
        raise ValueError(f"invalid {kind} {shown}: unknown unit {unit!r} (use K, M, G, T or KiB, MiB, GiB, TiB)")
    _check_digits(shown, number, kind)
    value = Fraction(number) * factor * scale  # exact: 1.1G is 1,100,000,000 bytes, not a float near it
    if value.denominator != 1:
        bits = " (8 bits each)" if scale != 1 else ""
        raise ValueError(f"invalid {kind} {shown}: not a whole number of bytes{bits}")
    if value > MAX_SIZE:
        raise ValueError(f"invalid {kind} {shown}: more than the maximum of {MAX_SIZE} bytes")
    return int(value)


def _lowercase_b(unit: str) -> bool:
    """``unit`` is a prefix and a lowercase b (Mb, kb, Mib): bits to network people, bytes to others."""
    return unit.endswith("b") and unit[:-1].lower() in _PREFIXES


def _prefix_shown(prefix: str) -> str:
    """A prefix as the docs write it: K M G T, Ki Mi Gi Ti."""
    return prefix[:1].upper() + prefix[1:].lower()


def _shown(text: str) -> str:
    """The text as quoted in an error: a 400-digit argument is not echoed whole."""
    return repr(text) if len(text) <= _MAX_DIGITS else repr(text[:_MAX_DIGITS]) + "..."


def _check_digits(shown: str, number: str, kind: str) -> None:
    if len(number) > _MAX_DIGITS:
        raise ValueError(f"invalid {kind} {shown}: a number of more than {_MAX_DIGITS} digits")


def parse_rate(text: str) -> int | None:
    """Parse a bandwidth into bytes per second; ``0`` or ``unlimited`` means no cap (None).

    Bytes as for sizes (``350M``, ``100MiB/s``, ``100MBps``) or bits (``100Mbit``, ``100Mbit/s``, ``100Mbps``,
    ``10Gbit``): a bit rate must come to a whole number of bytes. ``100Mb`` is refused, naming both readings.
    Errors of the byte forms say "invalid size", as they always did: scripts match on that.
    """
    stripped = text.strip()
    if stripped.lower() in ("unlimited", "none", "inf"):
        return None
    shown = _shown(text)
    match = _RATE_RE.match(stripped)
    if match is None:
        return parse_size(stripped) or None  # its error names the malformed text
    number, unit, per = match.groups()
    lowered = unit.lower()
    if lowered.endswith("bit") and lowered[:-3] in ("", *_PREFIXES):
        value = _bytes(shown, number, lowered[:-3], Fraction(1, 8), "rate")
    elif per is not None and per.lower() == "ps" and unit.endswith("b") and lowered[:-1] in ("", *_PREFIXES):
        value = _bytes(shown, number, lowered[:-1], Fraction(1, 8), "rate")  # bps, Mbps: bits by convention
    elif _lowercase_b(unit):
        prefix, suffix = _prefix_shown(unit[:-1]), per or ""
        raise ValueError(
            f"invalid rate {shown}: {unit!r} is bits to some and bytes to others: "
            f"write {number}{prefix}B{suffix} for bytes or {number}{prefix}bit{suffix} for bits"
        )
    elif per is not None and per.lower() == "ps" and not unit:
        raise ValueError(f"invalid rate {shown}: 'ps' needs a unit before it, as in 100Mbps or 100MBps")
    else:
        value = parse_size(f"{number}{unit}")  # its errors say "invalid size": scripts match on that
    return value or None


def parse_duration(text: str) -> float:
    """Parse ``"300ms"`` -> 0.3, ``"2s"`` -> 2.0, ``"1m"`` -> 60.0. A unit is required, except for a plain 0."""
    if text.strip() == "0":
        return 0.0
    shown = _shown(text)
    match = _DURATION_RE.match(text)
    if not match:
        raise ValueError(f"invalid duration {shown}: a number with a unit is required, such as 300ms, 2s, 1m, 1h")
    number, unit = match.groups()
    _check_digits(shown, number, "duration")
    seconds = float(number) * _DURATION_UNITS[unit]
    if not math.isfinite(seconds) or seconds > MAX_DURATION:
        raise ValueError(f"invalid duration {shown}: more than the maximum of a year (8760h)")
    return seconds


def format_bytes(value: float) -> str:
    """Human size with binary units, as shown in progress lines (``1.5 GiB``)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_rate(bytes_per_second: float) -> str:
    """Rates in decimal MB/s, as in every report (MB = 10^6 bytes)."""
    return f"{bytes_per_second / 1e6:.1f} MB/s"
