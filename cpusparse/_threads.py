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
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import numba
import numpy as np

__all__ = ["effective_n_jobs", "numba_threads", "threading_layer", "run_tasks"]

T = TypeVar("T")
R = TypeVar("R")


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
    """Run the enclosed work on ``n_jobs`` threads (see :func:`effective_n_jobs`).

    The Numba kernels run on that many threads, and cpusparse runs independent pieces
    of work as tasks on them (:func:`run_tasks`): the K mask passes of a training step,
    and the fixed-size batch chunks of a channel-masked convolution. BLAS itself is
    held to one thread inside: its own threads spin after each call (OpenBLAS's for
    about 0.1 s) and took the core from the Numba kernels that followed, and a BLAS
    call's summation order could depend on its thread count. Results therefore do not
    depend on ``n_jobs``: every Numba reduction has a fixed order, and every BLAS call
    computes the same piece whatever the thread count. A single pass (fine-tuning,
    prediction) uses the threads only in its Numba kernels and convolutions.
    """
    n = effective_n_jobs(n_jobs)
    from threadpoolctl import threadpool_limits

    previous = numba.get_num_threads()
    numba.set_num_threads(n)
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            yield n
    finally:
        numba.set_num_threads(previous)


_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def _reset_pools() -> None:  # pragma: no cover - runs in a forked child
    # A forked child inherits the pool objects but not their threads.
    _pools.clear()


os.register_at_fork(after_in_child=_reset_pools)


def _pool(n: int) -> ThreadPoolExecutor:
    with _pools_lock:
        if n not in _pools:
            _pools[n] = ThreadPoolExecutor(n, thread_name_prefix="cpusparse")
        return _pools[n]


def _single_threaded(fn: Callable[[T], R]) -> Callable[[T], R]:
    def run(task: T) -> R:
        numba.set_num_threads(1)  # thread-local: this worker's kernels run serially
        return fn(task)

    return run


def run_tasks(fn: Callable[[T], R], tasks: Sequence[T]) -> list[R]:
    """``[fn(task) for task in tasks]``, on the calling thread's Numba thread count.

    The tasks run on a pool of that many Python threads (NumPy's BLAS calls and
    cpusparse's kernels release the GIL), each running its Numba kernels on one
    thread; with one thread, one task, or Numba's ``workqueue`` layer (which does not
    allow concurrent callers), they run in order on the calling thread.
    Results come back in task order, so a caller that combines them in that order
    gets the same bits for any thread count. Tasks must write to disjoint places.
    """
    n = min(numba.get_num_threads(), len(tasks))
    if n <= 1 or threading_layer() == "workqueue":  # workqueue: one caller at a time
        return [fn(task) for task in tasks]
    return list(_pool(n).map(_single_threaded(fn), tasks))
