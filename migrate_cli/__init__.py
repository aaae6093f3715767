"""vmmig: move a guest memory image between hosts over TCP, compressed, capped and verified end to end.

The package is layered; imports point one way:
cli -> send / recv -> sender / receiver pipelines, transport -> codec, protocol, image, digest, units, errors.
"""

__version__ = "0.1.0"

from .protocol import PROTOCOL_VERSION

__all__ = ["PROTOCOL_VERSION", "__version__"]
