"""Numba kernels over the flat score vector (private module).

Passes over one array of keep probabilities, as long as the dense network at weight
granularity: they must cost a few passes over memory, not a sort. Like every kernel,
they validate nothing and draw no random numbers (the projection's pivot sampling is a
fixed linear congruential sequence); they allocate only small per-chunk scratch.
"""

import numpy as np
from numba import njit, prange

__all__: list[str] = []


@njit(cache=True, nogil=True, inline="always")
def _inner_breakpoint(x, lo, hi):
    # A breakpoint of unit x's term inside (lo, hi), if it has one; else lo or hi.
    if lo < x < hi:
        return x
    return min(max(x - 1.0, lo), hi)


@njit(cache=True, nogil=True, inline="always")
def _term(x, v):
    # clip(x - v, 0, 1)
    t = x - v
    if t >= 1.0:
        return 1.0
    if t <= 0.0:
        return 0.0
    return t


@njit(cache=True, nogil=True, inline="always")
def _unit(s, work, j, first):
    # The score of the j-th undecided unit (in the first round every unit is undecided).
    return np.float64(s[j]) if first else np.float64(s[work[j]])


# Sample size of a selection round, and the ranks kept on each side of the estimate
# (about 1.5 standard deviations of a sampled rank, sqrt(1024) = 32).
_SAMPLE, _MARGIN = 1024, 48


@njit(cache=True, nogil=True)
def _pivots(s, work, m, first, lo, hi, base, n_lin, budget, seed):
    """Two breakpoints that likely bracket the root (Floyd and Rivest's sampling).

    From a sample of the undecided units, estimate f at the sample's sorted breakpoints
    and take the ones ``_MARGIN`` ranks either side of where the estimate crosses the
    budget. When the sample is every undecided unit the estimate is f itself, and the
    two breakpoints either side of the crossing bracket the root exactly.
    """
    r = min(m, _SAMPLE)
    xs = np.empty(r)
    bps = np.empty(r)
    for j in range(r):
        seed = (seed * 1103515245 + 12345) % 2147483648
        x = _unit(s, work, (j * m) // r + seed % max(m // r, 1), first)
        xs[j] = x
        bps[j] = _inner_breakpoint(x, lo, hi)
    bps.sort()
    scale = m / r
    a, b = 0, r - 1  # binary search for the first breakpoint whose estimate is <= budget
    while a < b:
        mid = (a + b) // 2
        v = bps[mid]
        est = base - v * n_lin
        for j in range(r):
            est += scale * _term(xs[j], v)
        if est > budget:
            a = mid + 1
        else:
            b = mid
    if r == m:
        return bps[max(a - 1, 0)], bps[a]
    return bps[max(a - _MARGIN, 0)], bps[min(a + _MARGIN, r - 1)]


# Units per chunk of the projection's parallel passes: a fixed partition, so that the
# partial sums, added in chunk order, do not depend on the number of threads.
_CHUNK = 16384


@njit(cache=True, nogil=True, inline="always")
def _evaluate_range(s, work, start, stop, first, p, q):
    # Units start .. stop - 1's parts of f(p) and f(q), in two lanes each.
    fp0 = fp1 = fq0 = fq1 = 0.0
    j = start
    while j + 1 < stop:
        x0 = _unit(s, work, j, first)
        x1 = _unit(s, work, j + 1, first)
        fp0 += min(max(x0 - p, 0.0), 1.0)
        fp1 += min(max(x1 - p, 0.0), 1.0)
        fq0 += min(max(x0 - q, 0.0), 1.0)
        fq1 += min(max(x1 - q, 0.0), 1.0)
        j += 2
    if j < stop:
        x = _unit(s, work, j, first)
        fp0 += min(max(x - p, 0.0), 1.0)
        fq0 += min(max(x - q, 0.0), 1.0)
    return fp0 + fp1, fq0 + fq1


@njit(cache=True, nogil=True, parallel=True)
def _evaluate(s, work, m, first, p, q):
    """The m undecided units' parts of f(p) and f(q): chunk sums added in chunk order."""
    n_chunks = (m + _CHUNK - 1) // _CHUNK
    fp_parts = np.empty(n_chunks)
    fq_parts = np.empty(n_chunks)
    for c in prange(n_chunks):
        fp_parts[c], fq_parts[c] = _evaluate_range(
            s, work, c * _CHUNK, min((c + 1) * _CHUNK, m), first, p, q
        )
    fp = fq = 0.0
    for c in range(n_chunks):
        fp += fp_parts[c]
        fq += fq_parts[c]
    return fp, fq


@njit(cache=True, nogil=True, inline="always")
def _classify_range(s, work, start, stop, first, lo, hi):
    # Units start .. stop - 1 sorted by their term on [lo, hi]; the undecided ones are
    # compacted into work[start:start + kept]. The linear units' scores are summed in
    # two Kahan-compensated lanes (the threshold is solved from this sum, and a plain
    # sum of many equal scores drifts by more than the budget's 1e-9).
    n_one = 0
    n_lin = 0
    sum0 = sum1 = comp0 = comp1 = 0.0
    kept = start
    for j in range(start, stop):
        i = j if first else work[j]
        x = np.float64(s[i])
        x1 = x - 1.0
        one = x1 >= hi
        linear = (x >= hi) & (x1 <= lo)
        undecided = (x > lo) & ~one & ~linear
        n_one += one
        n_lin += linear
        term = x if linear else 0.0
        if j % 2:
            y = term - comp1
            t = sum1 + y
            comp1 = (t - sum1) - y
            sum1 = t
        else:
            y = term - comp0
            t = sum0 + y
            comp0 = (t - sum0) - y
            sum0 = t
        work[kept] = i  # kept <= j: the entry was read already
        kept += undecided
    return n_one, n_lin, sum0, sum1, -(comp0 + comp1), kept - start


@njit(cache=True, nogil=True, parallel=True)
def _classify(s, work, m, first, lo, hi):
    """Sort the m undecided units by their term on ``[lo, hi]``.

    A term is 0, 1, linear, or still undecided (a breakpoint inside); the last are
    compacted into ``work[:kept]``, in order. Returns ``(n_one, n_lin, lin_sum, kept)``;
    chunks run in parallel, their totals are added in chunk order.
    """
    n_chunks = (m + _CHUNK - 1) // _CHUNK
    ones = np.empty(n_chunks, dtype=np.int64)
    lins = np.empty(n_chunks, dtype=np.int64)
    sums = np.empty((n_chunks, 3))  # two lane sums and their compensation
    kept = np.empty(n_chunks, dtype=np.int64)
    for c in prange(n_chunks):
        ones[c], lins[c], sums[c, 0], sums[c, 1], sums[c, 2], kept[c] = _classify_range(
            s, work, c * _CHUNK, min((c + 1) * _CHUNK, m), first, lo, hi
        )
    n_one = 0
    n_lin = 0
    lin_sum = 0.0
    lin_comp = 0.0  # Neumaier compensation over the chunks' parts
    total = 0
    for c in range(n_chunks):  # the chunks' undecided units, moved together in order
        n_one += ones[c]
        n_lin += lins[c]
        for part in range(3):
            x = sums[c, part]
            u = lin_sum + x
            if abs(lin_sum) >= abs(x):
                lin_comp += (lin_sum - u) + x
            else:
                lin_comp += (x - u) + lin_sum
            lin_sum = u
        base = c * _CHUNK
        for t in range(kept[c]):
            work[total + t] = work[base + t]
        total += kept[c]
    return n_one, n_lin, lin_sum + lin_comp, total


@njit(cache=True, nogil=True)
def projection_threshold(s, budget, s_max, work):
    """The threshold ``v`` with ``sum_i clip(s_i - v, 0, 1) = budget``, in O(n).

    ``f(v) = sum_i clip(s_i - v, 0, 1)`` decreases, piecewise linearly, with breakpoints
    at the ``s_i`` and ``s_i - 1``. A selection over the breakpoints keeps an interval
    ``[lo, hi]`` with ``f(lo) > budget >= f(hi)``, starting from ``[0, max s]``. Each
    round takes two breakpoints of undecided units that likely bracket the root (from a
    sample of 1,024 of them, as in Floyd and Rivest's selection), evaluates ``f`` at both,
    narrows the interval, and moves every unit whose term is now constant (0 or 1) or
    linear on the whole interval into running totals: a round usually keeps a few
    percent of the units, and a group of tied scores is decided at once (a bisection
    of the interval could not separate them). When no breakpoint is left inside,
    ``f`` is linear on ``[lo, hi]``, ``f(v) = n_1 + sum_A s_i - v |A|`` (``n_1`` units
    at 1, ``A`` the linear ones), solved for ``v`` and clamped to ``[lo, hi]``. Sums are
    float64 in a fixed order; ``sum_A`` is compensated (Kahan within chunks, Neumaier
    over chunks and rounds).
    """
    # NOTE: s float 1-D (read as float64), sum clip(s, 0, 1) > budget >= 0, so
    # s_max = max s > 0; work an int array of len(s) (scratch).
    if budget == 0.0:
        return s_max  # f > 0 below max s and f(max s) = 0
    lo, hi = 0.0, s_max
    n_one = 0  # units at 1 on the whole interval
    n_lin = 0  # units at s_i - v on the whole interval
    lin_sum = 0.0
    lin_comp = 0.0
    m = s.shape[0]
    first = True
    seed = 12345
    while m > 0:
        # f(v) = base - v n_lin + the undecided units' terms.
        base = n_one + (lin_sum + lin_comp)
        p, q = _pivots(s, work, m, first, lo, hi, base, n_lin, budget, seed)
        seed = (seed * 69069 + 1) % 2147483648
        fp, fq = _evaluate(s, work, m, first, p, q)
        fp += base - p * n_lin
        fq += base - q * n_lin
        if fq > budget:
            lo = q
        elif fp > budget:
            lo, hi = p, q
        else:
            hi = p
        ones, lins, lin, m = _classify(s, work, m, first, lo, hi)
        n_one += ones
        n_lin += lins
        u = lin_sum + lin  # Neumaier-compensated over the rounds too
        if abs(lin_sum) >= abs(lin):
            lin_comp += (lin_sum - u) + lin
        else:
            lin_comp += (lin - u) + lin_sum
        lin_sum = u
        first = False
    if n_lin == 0:  # pragma: no cover - f is not flat where it crosses the budget
        return hi
    v = ((n_one - budget) + (lin_sum + lin_comp)) / n_lin
    return min(max(v, lo), hi)


@njit(cache=True, nogil=True, parallel=True)
def clipped_sum(s):
    """``(sum_i clip(s_i, 0, 1), max_i s_i, all finite)`` in one parallel pass.

    Each chunk sums in two lanes (unit ``i`` in lane ``i % 2``); the chunks' sums are
    added in chunk order, so the result does not depend on the number of threads.
    """
    n = s.shape[0]
    n_chunks = (n + _CHUNK - 1) // _CHUNK
    sums = np.empty(n_chunks)
    tops = np.empty(n_chunks)
    bad = np.empty(n_chunks)
    for c in prange(n_chunks):
        acc0 = acc1 = 0.0
        top = -np.inf
        nan = 0.0  # x - x is 0 for finite x and NaN otherwise
        for i in range(c * _CHUNK, min((c + 1) * _CHUNK, n)):
            x = np.float64(s[i])
            nan += x - x
            top = max(top, x)
            if i % 2:
                acc1 += min(max(x, 0.0), 1.0)
            else:
                acc0 += min(max(x, 0.0), 1.0)
        sums[c] = acc0 + acc1
        tops[c] = top
        bad[c] = nan
    total = 0.0
    top = -np.inf
    finite = True
    for c in range(n_chunks):
        total += sums[c]
        top = max(top, tops[c])
        finite = finite and bad[c] == 0.0
    return total, top, finite


@njit(cache=True, nogil=True, parallel=True)
def shift_clip(s, v, out):
    """``out[i] = clip(s_i - v, 0, 1)`` computed in float64, stored in out's dtype."""
    # NOTE: s float 1-D, out float 1-D of the same length (may be s itself).
    for i in prange(s.shape[0]):
        out[i] = min(max(np.float64(s[i]) - v, 0.0), 1.0)


# Units per chunk of the VR-PGE pass: the loops over the K masks run inside a chunk, over
# contiguous rows, which the compiler vectorises (a unit at a time it does not).
_VRPGE_CHUNK = 2048


@njit(cache=True, nogil=True, parallel=True)
def vrpge_scores(masks, centered, score, sqrt_scaling, out):
    """VR-PGE of every unit in one pass: no ``(K, n)`` temporaries.

    ``out[i] = (sum_k c_k (m_ki - mbar_i)) / (K - 1) / d_i`` with
    ``mbar_i = (sum_k m_ki) / K``, the sum over ``k`` accumulated in order from 0,
    ``d_i = s_i (1 - s_i)`` (or its square root), all in float64, and 0 where ``s_i``
    is 0 or 1: the operations, in the order, of ``cpusparse.method.vrpge_grad``. A
    division by a power of two is done as the multiplication by its inverse, which is
    the same correctly rounded number.
    """
    # NOTE: masks bool (K, n) C-contiguous; centered float64 (K,); score float (n,);
    # out float (n,): the float64 result is rounded to its dtype as it is stored.
    n_masks, n = masks.shape
    bits = masks.view(np.uint8)
    k = float(n_masks)
    k1 = float(n_masks - 1)
    k_pow2 = (n_masks & (n_masks - 1)) == 0
    k1_pow2 = ((n_masks - 1) & (n_masks - 2)) == 0
    inv_k = 1.0 / k
    inv_k1 = 1.0 / k1
    n_chunks = (n + _VRPGE_CHUNK - 1) // _VRPGE_CHUNK
    for chunk in prange(n_chunks):
        lo = chunk * _VRPGE_CHUNK
        hi = min(lo + _VRPGE_CHUNK, n)
        m = hi - lo
        mbar = np.zeros(m)
        total = np.zeros(m)
        for j in range(n_masks):
            row = bits[j, lo:hi]
            for i in range(m):
                mbar[i] += row[i]  # the count, exact
        if k_pow2:
            for i in range(m):
                mbar[i] = mbar[i] * inv_k
        else:
            for i in range(m):
                mbar[i] = mbar[i] / k
        for j in range(n_masks):
            row = bits[j, lo:hi]
            c = centered[j]
            for i in range(m):
                total[i] += c * (row[i] - mbar[i])
        s_chunk = score[lo:hi]
        out_chunk = out[lo:hi]
        for i in range(m):
            s = np.float64(s_chunk[i])
            var = s * (1.0 - s)
            denom = np.sqrt(var) if sqrt_scaling else var
            t = total[i] * inv_k1 if k1_pow2 else total[i] / k1
            g = t / denom
            out_chunk[i] = g if (s > 0.0 and s < 1.0) else 0.0
