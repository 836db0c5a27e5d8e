"""Thread control for the Numba kernels (private module).

**Threading layer.** Numba runs its parallel kernels on Intel TBB when the ``tbb``
package is installed (a dependency of cpusparse on Linux x86-64), else on OpenMP,
else on its own ``workqueue``. TBB is the one that is both thread-safe (Dask's and
joblib's thread workers may call kernels concurrently; ``workqueue`` is not) and
fork-safe (process pools that fork; GNU OpenMP is not), and its idle workers sleep
instead of spinning, so they neither slow a busy machine down nor fight PyTorch's
OpenMP threads in the same process. That is Numba's own default order; cpusparse does
not change it, so ``NUMBA_THREADING_LAYER`` and ``NUMBA_THREADING_LAYER_PRIORITY``
work as for any Numba program. :func:`threading_layer` says which layer runs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numba
import numpy as np

__all__ = ["effective_n_jobs", "numba_threads", "threading_layer"]


def effective_n_jobs(n_jobs: int | None) -> int:
    """The number of threads ``n_jobs`` asks for, as in scikit-learn.

    None means 1; -1 means every core Numba may use (``NUMBA_NUM_THREADS``, by default
    the machine's cores), -2 all but one, and so on; positive values are capped at
    that number.
    """
    # numba.config sets NUMBA_NUM_THREADS from the environment at import time, in a
    # way type checkers cannot see: read it from the module's namespace.
    max_threads: int = vars(numba.config)["NUMBA_NUM_THREADS"]
    if n_jobs is None:
        return 1
    n = int(n_jobs)
    if n == 0:
        raise ValueError("n_jobs == 0 has no meaning; use None or 1 for one thread, -1 for all")
    if n < 0:
        return max(max_threads + 1 + n, 1)
    return min(n, max_threads)


def threading_layer() -> str:
    """The Numba threading layer the kernels run on (``"tbb"``, ``"omp"``, ``"workqueue"``).

    Runs a tiny parallel kernel first if none has run yet (Numba picks the layer on
    the first parallel launch).
    """
    try:
        return str(numba.threading_layer())
    except ValueError:  # no parallel region has run yet
        _touch(np.zeros(2))
        return str(numba.threading_layer())


@numba.njit(parallel=True)
def _touch(a):  # pragma: no cover - compiled
    # The smallest parallel kernel: makes Numba choose its threading layer.
    for i in numba.prange(a.shape[0]):
        a[i] = 0.0


@contextlib.contextmanager
def numba_threads(n_jobs: int | None) -> Iterator[int]:
    """Run the enclosed kernels, Numba's and BLAS's, on ``n_jobs`` threads.

    See :func:`effective_n_jobs` for the count. The Numba kernels' results do not
    depend on the number of threads: every reduction has a fixed order. BLAS (the
    dense blocks of neuron and channel masks, the dense layers, the gradient norm's
    dot products) makes no such promise; OpenBLAS splits a product over the rows and
    columns of its output, not over the summed dimension, and its results for 1 and
    2 threads were the same on every shape measured here (``cpusparse bench`` and
    the tests check it again), but another BLAS or CPU may differ in the last bits.
    """
    n = effective_n_jobs(n_jobs)
    from threadpoolctl import threadpool_limits

    previous = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        with threadpool_limits(limits=n, user_api="blas"):
            yield n
    finally:
        numba.set_num_threads(previous)
