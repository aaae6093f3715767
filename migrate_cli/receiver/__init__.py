"""The receiving end: admission, decompression workers, the destination image and its allocation."""
