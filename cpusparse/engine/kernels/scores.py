"""Numba kernels over the flat score vector (private module).

Passes over one float64 array of keep probabilities, as long as the dense network at
weight granularity: they must cost a few passes over memory, not a sort. Like every
kernel, they validate nothing, allocate nothing and draw no random numbers.
"""

import numpy as np
from numba import njit

__all__: list[str] = []


# What a unit's term clip(s_i - v, 0, 1) is on an interval [lo, hi] of v.
_ZERO, _ONE, _LINEAR, _UNDECIDED = 0, 1, 2, 3


@njit(cache=True, nogil=True, inline="always")
def _classify(x, lo, hi):
    # 0 on the whole interval, 1 on it, s_i - v on it, or a breakpoint inside it.
    if x <= lo:
        return _ZERO
    if x - hi >= 1.0:
        return _ONE
    if x >= hi and x - lo <= 1.0:
        return _LINEAR
    return _UNDECIDED


@njit(cache=True, nogil=True)
def threshold_bracket(s, budget, work):
    """Narrow the projection's threshold to an interval free of most breakpoints.

    ``f(v) = sum_i clip(s_i - v, 0, 1)`` decreases, piecewise linearly, with
    breakpoints at the ``s_i`` and ``s_i - 1``. Starting from ``[0, max s]``, bisect
    ``v`` keeping ``f(lo) > budget >= f(hi)``; every unit whose term is constant or
    linear on the current interval goes into running totals and leaves the work list,
    so each bisection step only visits the units with a breakpoint inside
    ``(lo, hi)``: about ``2n`` visits in all instead of one pass per step.

    Returns ``(lo, hi, m)``: the interval and the number of undecided units left in
    ``work[:m]`` (their indices): 0, unless ``lo`` and ``hi`` became adjacent floats
    first (the root sits on a breakpoint shared by tied scores).
    """
    # NOTE: s float64 1-D, f(0) > budget >= 0 (so max s > 0); work int64 of len(s).
    n = s.shape[0]
    hi = 0.0
    for i in range(n):
        if s[i] > hi:
            hi = s[i]
    lo = 0.0
    n_one = 0  # units at 1 on the whole interval
    n_lin = 0  # units at s_i - v on the whole interval
    lin_sum = 0.0
    # Every unit starts undecided; the first bisection step sorts them out.
    for i in range(n):
        work[i] = i
    m = n
    while m > 0:
        mid = 0.5 * (lo + hi)
        if mid <= lo or mid >= hi:
            break
        total = n_one + lin_sum - mid * n_lin
        for j in range(m):
            t = s[work[j]] - mid
            if t >= 1.0:
                total += 1.0
            elif t > 0.0:
                total += t
        if total > budget:
            lo = mid
        else:
            hi = mid
        kept = 0
        for j in range(m):
            i = work[j]
            kind = _classify(s[i], lo, hi)
            if kind == _ONE:
                n_one += 1
            elif kind == _LINEAR:
                n_lin += 1
                lin_sum += s[i]
            elif kind == _UNDECIDED:
                work[kept] = i
                kept += 1
        m = kept
    return lo, hi, m


@njit(cache=True, nogil=True)
def enclosing_breakpoints(s, lo, hi, s_max):
    """The largest breakpoint ``<= lo`` and the smallest ``>= hi`` of ``f``.

    Breakpoints are ``0``, ``max s`` and every ``s_i`` and ``s_i - 1`` in ``[0, max s]``.
    """
    # NOTE: s float64 1-D; 0 <= lo <= hi <= s_max.
    left = 0.0
    right = s_max
    for i in range(s.shape[0]):
        for b in (s[i], s[i] - 1.0):
            if 0.0 <= b <= s_max:
                if left < b <= lo:
                    left = b
                if hi <= b < right:
                    right = b
    return left, right


@njit(cache=True, nogil=True)
def vrpge_scores(masks, centered, score, sqrt_scaling, out):
    """VR-PGE of every unit in one pass: no ``(K, n)`` temporaries.

    ``out[i] = (sum_k c_k (m_ki - mbar_i)) / (K - 1) / d_i`` with
    ``mbar_i = (sum_k m_ki) / K``, the sum over ``k`` accumulated in order from 0,
    ``d_i = s_i (1 - s_i)`` (or its square root), all in float64, and 0 where ``s_i``
    is 0 or 1: the operations, in the order, of ``cpusparse.method.vrpge_grad``.
    """
    # NOTE: masks bool (K, n) C-contiguous; centered float64 (K,); score float (n,);
    # out float64 (n,).
    n_masks, n = masks.shape
    for i in range(n):
        s = float(score[i])
        if not (s > 0.0 and s < 1.0):
            out[i] = 0.0
            continue
        count = 0
        for k in range(n_masks):
            if masks[k, i]:
                count += 1
        mbar = count / n_masks
        total = 0.0
        for k in range(n_masks):
            total += centered[k] * ((1.0 if masks[k, i] else 0.0) - mbar)
        var = s * (1.0 - s)
        denom = np.sqrt(var) if sqrt_scaling else var
        out[i] = (total / (n_masks - 1)) / denom
