"""`vmmig analyze IMAGE`: a dry run on the source only — what is in the image, what each codec does with it on
this machine, how fast a running guest dirties it, and which options to migrate it with.

Sampling: ``sample_bytes`` of the image in batch-sized pieces spread evenly over it (``--full``: all of it). The
zero-page share, codec ratios and speeds come from those pieces; speeds are measured with one compressor per
thread, as the sender runs them. The dirty rate comes from the fingerprint tracker: one scan a second for
``--dirty-for``, changed pages per second of the whole image.

The recommendation models the sender as the slower of two limits, per image byte: compression (non-zero share /
codec speed × threads) and the wire (non-zero share / ratio / link rate). The link rate is --max-bandwidth when
given, else 10 Gb/s (1.25 GB/s), as stated in the report.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..units import format_bytes, format_rate
from ..wire import codec as codecs
from ..wire.digest import fingerprint_image
from .options import DEFAULT_BATCH_SIZE
from .source import SourceImage

DEFAULT_LINK = 1.25e9  # 10 Gb/s
BATCH_BYTES = DEFAULT_BATCH_SIZE  # as send's default --batch-size


@dataclass
class CodecResult:
    name: str
    level: int
    ratio: float
    mb_per_s_one_thread: float
    mb_per_s_all_threads: float

    def as_json(self) -> dict[str, Any]:
        return {
            "codec": self.name,
            "level": self.level,
            "ratio": round(self.ratio, 3),
            "compress-mbytes-per-second-1-thread": round(self.mb_per_s_one_thread, 1),
            "compress-mbytes-per-second-all-threads": round(self.mb_per_s_all_threads, 1),
        }


def sample_batches(source: SourceImage, sample_bytes: int | None) -> list[np.ndarray]:
    """Batch-sized pieces spread evenly over the image (all of it when ``sample_bytes`` is None)."""
    batch = max(source.page_size, BATCH_BYTES - BATCH_BYTES % source.page_size)
    count = source.size // batch or 1
    wanted = count if sample_bytes is None else max(1, min(count, sample_bytes // batch))
    starts = np.linspace(0, source.size - min(batch, source.size), wanted).astype(np.int64)
    starts -= starts % source.page_size
    return [source.array[s : s + min(batch, source.size)] for s in np.unique(starts).tolist()]


def zero_share(pieces: list[np.ndarray], page_size: int) -> float:
    pages = zero = 0
    for piece in pieces:
        rows = piece.view(np.uint64).reshape(-1, page_size // 8)
        pages += rows.shape[0]
        zero += int(rows.shape[0] - np.count_nonzero(rows.any(axis=1)))
    return zero / pages if pages else 0.0


def nonzero_pieces(pieces: list[np.ndarray], page_size: int) -> list[bytes]:
    out = []
    for piece in pieces:
        rows = piece.reshape(-1, page_size)
        keep = rows.view(np.uint64).any(axis=1)
        if keep.any():
            out.append(rows[keep].tobytes())
    return out


def measure_codec(name: str, level: int, data: list[bytes], threads: int) -> CodecResult:
    codec = codecs.by_name(name)
    total = sum(len(d) for d in data)

    def run(chunk: list[bytes]) -> tuple[int, float]:
        compressor = codec.compressor(level)  # one per thread, reused for every batch, as the sender does
        started = time.perf_counter()
        size = sum(min(len(compressor.compress(d)), len(d)) for d in chunk)  # batches that grow go raw
        return size, time.perf_counter() - started

    packed, seconds = run(data)
    with ThreadPoolExecutor(threads) as pool:
        started = time.perf_counter()
        list(pool.map(run, [data[i::threads] for i in range(threads)]))
        parallel = time.perf_counter() - started
    return CodecResult(name, level, total / max(packed, 1), total / seconds / 1e6, total / parallel / 1e6)


def dirty_rate(source: SourceImage, seconds: float, threads: int) -> tuple[float, list[float]]:
    """Bytes per second of pages that change, from a fingerprint scan once a second."""
    before = fingerprint_image(source.array, source.page_size, threads)
    rates: list[float] = []
    started = last = time.monotonic()
    while time.monotonic() - started < seconds:
        time.sleep(max(0.0, 1.0 - (time.monotonic() - last)))
        now = time.monotonic()
        after = fingerprint_image(source.array, source.page_size, threads)
        rates.append(int(np.count_nonzero(after != before)) * source.page_size / (now - last))
        before, last = after, now
    return (float(np.mean(rates)) if rates else 0.0), rates


def predict(result: CodecResult | None, nonzero: float, threads: int, link: float) -> float:
    """Image bytes per second the sender could reach with this codec (None: uncompressed)."""
    if nonzero <= 0:
        return link * 100  # all zero: nothing to compress or send
    if result is None:
        return link / nonzero
    compress_limit = result.mb_per_s_all_threads * 1e6 / nonzero
    wire_limit = link * result.ratio / nonzero
    return min(compress_limit, wire_limit)


def analyze(
    path: str,
    page_size: int,
    sample_bytes: int | None,
    threads: int,
    dirty_for: float | None,
    max_bandwidth: int | None,
) -> dict[str, Any]:
    with SourceImage(path, page_size) as source:
        pieces = sample_batches(source, sample_bytes)
        sampled = sum(p.size for p in pieces)
        zeros = zero_share(pieces, page_size)
        data = nonzero_pieces(pieces, page_size)
        results = [measure_codec(name, 1, data, threads) for name in ("zlib", "zstd")] if data else []
        dirty = dirty_rate(source, dirty_for, threads) if dirty_for else None
        size = source.size
    link = float(max_bandwidth or DEFAULT_LINK)
    nonzero = 1.0 - zeros
    predictions = {"none": predict(None, nonzero, threads, link)}
    predictions.update({r.name: predict(r, nonzero, threads, link) for r in results})
    best = max(predictions, key=lambda name: predictions[name])
    recommendation: dict[str, Any] = {
        "codec": best,
        "level": 1 if best != "none" else 0,
        "threads": threads,
        "predicted-image-mbytes-per-second": round(predictions[best] / 1e6, 1),
        "link": {"bytes-per-second": link, "assumed": max_bandwidth is None},
    }
    report: dict[str, Any] = {
        "image": path,
        "image-bytes": size,
        "page-size": page_size,
        "sampled-bytes": sampled,
        "zero-page-share": round(zeros, 4),
        "codecs": [r.as_json() for r in results],
        "predicted-image-mbytes-per-second": {k: round(v / 1e6, 1) for k, v in predictions.items()},
        "recommendation": recommendation,
    }
    if dirty is not None:
        rate, per_second = dirty
        # Dirty pages are non-zero pages: the wire carries them at the codec's ratio.
        chosen = next((r for r in results if r.name == best), None)
        achieved = predict(chosen, 1.0, threads, link)
        verdict = "yes" if rate < 0.5 * achieved else ("marginal" if rate < achieved else "no")
        report["dirty-bytes-per-second"] = round(rate)
        report["dirty-bytes-per-second-each-scan"] = [round(r) for r in per_second]
        recommendation["converges"] = verdict
        recommendation["achieved-dirty-page-mbytes-per-second"] = round(achieved / 1e6, 1)
        if verdict != "yes":
            recommendation["advice"] = (
                f"dirty {format_rate(rate)} vs {format_rate(achieved)} achievable: use --auto-converge"
                + (" or a higher --max-bandwidth" if max_bandwidth else "")
            )
    return report


def render(report: dict[str, Any]) -> str:
    rec = report["recommendation"]
    lines = [
        f"image {report['image']}: {format_bytes(report['image-bytes'])}, "
        f"sampled {format_bytes(report['sampled-bytes'])}",
        f"zero pages: {100 * report['zero-page-share']:.1f}%",
    ]
    for c in report["codecs"]:
        lines.append(
            f"{c['codec']:>5} level {c['level']}: ratio {c['ratio']:.2f}, "
            f"{c['compress-mbytes-per-second-1-thread']:.0f} MB/s on 1 thread, "
            f"{c['compress-mbytes-per-second-all-threads']:.0f} MB/s on {rec['threads']}"
        )
    link = rec["link"]
    lines.append(
        "predicted image MB/s at "
        + format_rate(link["bytes-per-second"])
        + (" (assumed link: give --max-bandwidth)" if link["assumed"] else "")
        + ": "
        + ", ".join(f"{k} {v:.0f}" for k, v in report["predicted-image-mbytes-per-second"].items())
    )
    if "dirty-bytes-per-second" in report:
        lines.append(f"dirty rate: {format_rate(report['dirty-bytes-per-second'])} (a scan a second)")
    advice = (
        f"recommended: --compress {rec['codec']}"
        + (f" --level {rec['level']}" if rec["codec"] != "none" else "")
        + f" --compress-threads {rec['threads']}"
    )
    lines.append(advice)
    if "converges" in rec:
        detail = f" — {rec['advice']}" if "advice" in rec else ""
        lines.append(f"live migration converges: {rec['converges']}{detail}")
    return "\n".join(lines)
