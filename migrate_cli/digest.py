"""Page fingerprints and the end-to-end image digest.

A page's fingerprint is xxh3_64 of its bytes. The image digest is xxh3_128 over the fingerprints of all pages in
page order, each as 8 little-endian bytes: 128 bits that cover exactly what DEST must hold.

The sender fingerprints each page from the private copy it compresses (the bytes that went on the wire, never the
live page), so the digest describes what was sent even while a guest writes. The receiver recomputes the digest
from DEST itself after flushing it.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import xxhash


def zero_fingerprint(page_size: int) -> int:
    return xxhash.xxh3_64_intdigest(bytes(page_size))


def fingerprint_pages(data: np.ndarray | memoryview | bytes, page_size: int, out: np.ndarray) -> None:
    """Write the fingerprint of each page of ``data`` into ``out`` (uint64, one slot per page).

    All-zero pages are found with one vectorised scan and get the constant zero fingerprint without hashing.
    """
    arr = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data
    count = arr.size // page_size
    nonzero = arr.view(np.uint64).reshape(count, page_size // 8).any(axis=1)
    out[:count] = zero_fingerprint(page_size)
    idx = np.flatnonzero(nonzero)
    if idx.size == 0:
        return
    mv = memoryview(arr)
    out[idx] = np.fromiter(
        map(xxhash.xxh3_64_intdigest, [mv[i * page_size : (i + 1) * page_size] for i in idx.tolist()]),
        dtype=np.uint64,
        count=idx.size,
    )


def image_digest(fingerprints: np.ndarray) -> bytes:
    return xxhash.xxh3_128_digest(fingerprints.astype("<u8", copy=False).tobytes())


def digest_of_image(array: np.ndarray, page_size: int, threads: int = 1, chunk_pages: int = 8192) -> bytes:
    """Fingerprint a whole mapped image (split over ``threads``) and return its digest."""
    pages = array.size // page_size
    fps = np.empty(pages, dtype=np.uint64)

    def work(first: int) -> None:
        last = min(pages, first + chunk_pages)
        fingerprint_pages(array[first * page_size : last * page_size], page_size, fps[first:last])

    with ThreadPoolExecutor(max_workers=max(1, threads)) as pool:
        list(pool.map(work, range(0, pages, chunk_pages)))  # list(): re-raise worker exceptions here
    return image_digest(fps)
