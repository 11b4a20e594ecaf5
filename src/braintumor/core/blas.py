"""One BLAS thread for NumPy and SciPy in processes that also run a model runtime.

On these 2-core machines the NumPy/SciPy work beside a model (scikit-learn fits, the OOD
distance, the NumPy Grad-CAM of an exported model) is small matrix algebra, and it runs
right after the runtime's own worker threads (TensorFlow's, LiteRT's) have spun on the
cores. OpenBLAS's threads then busy-wait against them. Measured here on a busy machine,
after a Keras predict: the label audit's five out-of-fold logistic-regression fits of the
training images (4,098 x 1,280 features) took 37-82 s with OpenBLAS's default 2 threads
and 4-7 s with one; the served one-pass Grad-CAM took 24.6 ms per upload against 0.8 ms.
TensorFlow, JAX and torch do not compute with NumPy's OpenBLAS: training is unaffected.
"""

from __future__ import annotations

import os


def single_thread_blas() -> None:
    """Limit the BLAS libraries already loaded (NumPy's OpenBLAS) to one thread, and tell
    those loaded later (SciPy's own OpenBLAS, read at load time) the same through
    ``OPENBLAS_NUM_THREADS``; an explicit setting of that variable is kept."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl is in every lock (scikit-learn's)
        return
    threadpool_limits(int(os.environ["OPENBLAS_NUM_THREADS"] or 1), user_api="blas")
