"""The sender's compression workers run on their own, for tests that check the frames they produce byte by byte."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from migrate_cli.failure import Failure
from migrate_cli.sender.pipeline import Batch, EncodedBatch, SendPipeline
from migrate_cli.sender.source import SourceImage
from migrate_cli.wire import codec as codecs


def encode_batches(
    image: Path, codec: str, batches: list[Batch], threads: int = 1, batch_pages: int = 256
) -> tuple[list[EncodedBatch], np.ndarray]:
    """``batches`` of ``image`` through a SendPipeline at level 1: the encoded batches in the order they came out,
    their parts copied to bytes, and the pipeline's page fingerprints after them."""
    with SourceImage(str(image)) as source:
        pipeline = SendPipeline(source, codecs.by_name(codec), 1, threads, batch_pages, Failure())
        pipeline.start()
        try:
            pipeline.feed(batches)
            out = []
            for _ in batches:
                batch = pipeline.out.get(timeout=10)
                batch.parts = [bytes(part) for part in batch.parts]  # raw data is a view of the worker's buffer
                if batch.release:
                    batch.release()  # the worker has few buffers: hand each back as a network thread would
                out.append(batch)
            return out, pipeline.fingerprints.copy()
        finally:
            pipeline.stop()
