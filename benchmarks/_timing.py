"""Reusable timing helper for the benchmarks: medians of interleaved repetitions.

Interleaving (A, B, C, A, B, C, ...) exposes every candidate to the same drift in
clock frequency, cache state and background load, so ratios computed from one run
compare like with like. Medians, not minimums, are reported.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

__all__ = ["interleaved_times", "medians", "machine_info"]


def interleaved_times(
    funcs: Mapping[str, Callable[[], object]],
    *,
    repeats: int = 30,
    warmup: int = 3,
    min_time: float = 0.0,
) -> dict[str, list[float]]:
    """Time each callable ``repeats`` times, round-robin, after ``warmup`` rounds.

    Parameters
    ----------
    funcs : mapping of str to callable
        Zero-argument callables, timed in the mapping's order within each round.
    repeats : int, default=30
        Timed rounds.
    warmup : int, default=3
        Untimed rounds first (JIT compilation, page faults, cache warm-up).
    min_time : float, default=0.0
        Keep running rounds until the total timed wall time reaches this many
        seconds (at least ``repeats`` rounds either way).

    Returns
    -------
    dict of str to list of float
        Seconds per call, one entry per round.
    """
    for _ in range(warmup):
        for f in funcs.values():
            f()
    times: dict[str, list[float]] = {name: [] for name in funcs}
    start = time.perf_counter()
    rounds = 0
    while rounds < repeats or time.perf_counter() - start < min_time:
        for name, f in funcs.items():
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
        rounds += 1
    return times


def medians(times: Mapping[str, list[float]]) -> dict[str, float]:
    """Median seconds per callable."""
    return {name: statistics.median(t) for name, t in times.items()}


def machine_info() -> dict[str, str]:
    """CPU model, library versions and thread settings, for the report header."""
    import os
    import platform

    import numba
    import numpy as np

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "logical_cpus": str(os.cpu_count()),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
    }
    try:
        import llvmlite.binding as ll

        info["llvm_cpu"] = ll.get_host_cpu_name()
    except Exception:  # noqa: BLE001 - purely informative
        pass
    try:
        from threadpoolctl import threadpool_info

        info["blas"] = "; ".join(
            f"{p.get('internal_api')} {p.get('version')} {p.get('architecture')} "
            f"threads={p.get('num_threads')}"
            for p in threadpool_info()
            if p.get("user_api") == "blas"
        )
    except ImportError:
        pass
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        info[var] = os.environ.get(var, "(unset)")
    return info
