"""Snapshots: a guest's memory saved to a file (`vmmig save`) and restored from it (`vmmig restore`).

format.py is the file format (sans-IO), writer.py writes one from a source image with the sender's pipeline,
reader.py walks one frame by frame as the receiver's pipeline reads a channel, restore.py restores or checks one.
docs/SNAPSHOT.md describes every byte.
"""
