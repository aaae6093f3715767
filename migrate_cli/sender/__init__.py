"""The sending end: source image, batches, compression workers, passes, live pre-copy, dirty tracking."""
