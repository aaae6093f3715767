"""One parser for every size, rate and duration on the command line.

Sizes: a number with an optional suffix. ``K M G T`` are powers of 10 (350M = 350,000,000), ``KiB MiB GiB TiB``
(also ``Ki Mi Gi Ti``) are powers of 2, ``B`` or no suffix means bytes. Rates are sizes per second (a trailing
``/s`` is accepted). Durations need a unit: ``ms s m h``. Reports use MB = 10^6 bytes.
"""

from __future__ import annotations

import re

_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")
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
_DURATION_UNITS: dict[str, float] = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_size(text: str) -> int:
    """Parse ``"350M"`` -> 350_000_000, ``"1GiB"`` -> 1_073_741_824, ``"4096"`` -> 4096."""
    match = _SIZE_RE.match(text)
    if not match:
        raise ValueError(f"invalid size {text!r}: expected a number with an optional unit such as 4KiB, 350M, 1GiB")
    number, unit = match.groups()
    factor = _SIZE_UNITS.get(unit.lower())
    if factor is None:
        raise ValueError(f"invalid size {text!r}: unknown unit {unit!r} (use K, M, G, T or KiB, MiB, GiB, TiB)")
    value = float(number) * factor
    if value != int(value):
        raise ValueError(f"invalid size {text!r}: not a whole number of bytes")
    return int(value)


def parse_rate(text: str) -> int | None:
    """Parse a bandwidth in bytes per second; ``0`` or ``unlimited`` means no cap (None)."""
    stripped = text.strip()
    if stripped.lower() in ("unlimited", "none", "inf"):
        return None
    if stripped.lower().endswith("/s"):
        stripped = stripped[:-2]
    value = parse_size(stripped)
    return value or None


def parse_duration(text: str) -> float:
    """Parse ``"300ms"`` -> 0.3, ``"2s"`` -> 2.0, ``"1m"`` -> 60.0. A unit is required, except for a plain 0."""
    if text.strip() == "0":
        return 0.0
    match = _DURATION_RE.match(text)
    if not match:
        raise ValueError(f"invalid duration {text!r}: a number with a unit is required, such as 300ms, 2s, 1m, 1h")
    number, unit = match.groups()
    return float(number) * _DURATION_UNITS[unit]


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
