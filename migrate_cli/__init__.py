"""vmmig: move a guest memory image between hosts over TCP, compressed, capped and verified end to end.

The package is layered; imports point one way:
cli -> send / recv -> sender / receiver pipelines, transport -> codec, protocol, image, digest, units, errors.
"""

import gc
import os

__version__ = "0.3.0"

# numpy's OpenBLAS starts a spinning thread per core when it is imported; vmmig never calls BLAS, and with both
# ends on two cores those threads took ~5% of a migration's CPU (perf). Set for numpy's import only, so hooks and
# other children see the environment they were given.
_BLAS_VARS = [var for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS") if var not in os.environ]
os.environ.update(dict.fromkeys(_BLAS_VARS, "1"))
import numpy  # noqa: E402,F401

for _var in _BLAS_VARS:
    del os.environ[_var]

# The hot path allocates few cyclic objects, but the collector ran often enough to take ~2% of a migration's CPU
# (perf): collect less often; send and recv also freeze what the imports created (gc.freeze).
gc.set_threshold(20_000, 50, 100)

from .wire.frames import PROTOCOL_VERSION  # noqa: E402

__all__ = ["PROTOCOL_VERSION", "__version__"]
