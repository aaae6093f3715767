"""The wire: frames (sans-IO), the codec table, page fingerprints and the image digest."""
