"""Native thread pools sized for a media server, set before numpy loads its BLAS.

The per-frame maths here works on small arrays (a mouth region, a mel window), where a
multi-threaded BLAS only adds hand-offs and, worse, pool threads that spin between calls
and take the cores the event loop and the encoders need. One BLAS thread per caller;
model runtimes size their own pools (``intra_op_threads``)."""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
