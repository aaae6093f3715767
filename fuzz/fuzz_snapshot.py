"""Fuzz the snapshot reader (migrate_cli/snapshot/): mutated snapshots through `restore --check`, in this process.

    python fuzz/fuzz_snapshot.py --seconds 300 [--seed N]

Seeds are small valid snapshots (each codec, a few page sizes); each input is a seed with 1 to 6 mutations
(flipped bits, random bytes, insertions, deletions, duplicated spans, truncation). Properties:

1. nothing but SourceError (exit 3: truncated, foreign) or IntegrityError (exit 7: corrupt) escapes the reader;
2. an input it accepts has exactly the seed's digest (a damage it lets through changed nothing that matters);
3. every refusal is one line that names where (a frame, the header, trailer or footer, with an offset) or the file.

A violation prints the seed and the mutated input's hex and the run exits 1.
"""

from __future__ import annotations

import argparse
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from migrate_cli.errors import IntegrityError, SourceError  # noqa: E402
from migrate_cli.snapshot import format as fmt  # noqa: E402
from migrate_cli.snapshot.restore import RestoreOptions, restore  # noqa: E402
from migrate_cli.snapshot.writer import SaveOptions, save  # noqa: E402
from tests.conftest import make_image  # noqa: E402


def seeds(work: Path) -> list[bytes]:
    found = []
    for i, (codec, page_size) in enumerate([("none", 4096), ("zlib", 4096), ("zstd", 4096), ("zstd", 512)]):
        image = make_image(work / f"img{i}", 256 * 1024, seed=i + 1, page_size=page_size)
        snap = work / f"seed{i}.snap"
        save(SaveOptions(str(image), str(snap), codec, threads=1, page_size=page_size))
        found.append(snap.read_bytes())
    return found


def mutate(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 6)):
        if not buf:
            break
        kind, at = rng.randrange(6), rng.randrange(len(buf))
        if kind == 0:
            buf[at] ^= 1 << rng.randrange(8)
        elif kind == 1:
            buf[at : at + 8] = rng.randbytes(min(8, len(buf) - at))
        elif kind == 2:
            buf[at:at] = rng.randbytes(rng.randint(1, 16))
        elif kind == 3:
            del buf[at : at + rng.randint(1, 16)]
        elif kind == 4:
            buf[at:at] = buf[at : at + rng.randint(1, 64)]
        else:
            del buf[at:]
    return bytes(buf)


def check(path: Path, data: bytes, digest: bytes) -> None:
    path.write_bytes(data)
    try:
        restore(RestoreOptions(str(path), None, threads=1))
    except (SourceError, IntegrityError) as exc:
        text = str(exc)
        if "\n" in text or not text.startswith(f"snapshot {path}"):
            raise AssertionError(f"refusal is not one line naming the file: {text!r}") from None
        return
    footer = fmt.decode_footer(data[-fmt.FOOTER_SIZE :], len(data))
    assert footer is not None, "accepted without a footer"
    trailer = fmt.decode_trailer(data[footer.trailer_offset : -fmt.FOOTER_SIZE], footer.trailer_offset, "t")
    if trailer.digest != digest:
        raise AssertionError("accepted a snapshot of another image")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=None)
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(1 << 32)
    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="vmmig-fuzz-snapshot-") as tmp:
        work = Path(tmp)
        pool = seeds(work)
        digests = [fmt.decode_trailer(s[fmt.decode_footer(s[-32:], len(s)).trailer_offset : -32], 0, "t").digest  # type: ignore[union-attr]
                   for s in pool]  # fmt: skip
        deadline, tried, failures = time.monotonic() + args.seconds, 0, 0
        while time.monotonic() < deadline:
            which = rng.randrange(len(pool))
            data = mutate(pool[which], rng)
            tried += 1
            try:
                check(work / "input.snap", data, digests[which])
            except Exception:
                failures += 1
                print(f"fuzz-snapshot: finding (seed snapshot {which}, {len(data)} bytes): {data.hex()[:2048]}")
                traceback.print_exc()
    print(f"fuzz-snapshot: {tried} inputs tried in {args.seconds:.0f} s (seed {seed}), {failures} findings")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
