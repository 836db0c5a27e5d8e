"""Thread control for the Numba kernels (private module)."""

from __future__ import annotations

import contextlib

import numba


@contextlib.contextmanager
def numba_threads(n_jobs):
    """Run the enclosed kernels on ``n_jobs`` threads (None: 1), then restore.

    Results do not depend on the number of threads (every reduction has a fixed
    order); only the speed does. One thread is the default because Numba's OpenMP
    workers busy-wait, which slows everything down many times over when the
    machine's cores are already busy.
    """
    n = 1 if n_jobs is None else min(int(n_jobs), numba.config.NUMBA_NUM_THREADS)
    previous = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        yield n
    finally:
        numba.set_num_threads(previous)
