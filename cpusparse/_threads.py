"""Thread control for the Numba kernels (private module)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import numba


@contextlib.contextmanager
def numba_threads(n_jobs: int | None) -> Iterator[int]:
    """Run the enclosed kernels on ``n_jobs`` threads (None: 1), then restore.

    Results do not depend on the number of threads: every reduction of the Numba
    kernels has a fixed order, and BLAS (the dense layers' products, the gradient
    norm's dot products), whose results can change with its thread count, runs on
    one thread inside. Only the speed depends on ``n_jobs``. One thread is the
    default because Numba's OpenMP workers busy-wait, which slows everything down
    many times over when the machine's cores are already busy.
    """
    # numba.config sets NUMBA_NUM_THREADS from the environment at import time, in a
    # way type checkers cannot see: read it from the module's namespace.
    max_threads: int = vars(numba.config)["NUMBA_NUM_THREADS"]
    n = 1 if n_jobs is None else min(int(n_jobs), max_threads)
    from threadpoolctl import threadpool_limits

    previous = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            yield n
    finally:
        numba.set_num_threads(previous)
