"""Element-wise Numba passes over parameter-sized arrays (private module).

The optimizers' updates, one parallel pass per array instead of a chain of NumPy
expressions with full-size temporaries. Each element is computed with the operations,
in the order and in the dtype of the NumPy expression it replaces (no fast-math, no
fused multiply-add), so the results are the same bits, for any number of threads.
"""

import numpy as np
from numba import njit, prange

__all__: list[str] = []


@njit(cache=True, nogil=True, parallel=True)
def adam_update(p, g, m, v, decay, one_minus_beta1, beta2, one_minus_beta2, step, bias2, eps):
    """One Adam step in place, element by element in ``p``'s dtype.

    ``d = g + decay p`` (``decay`` 0: ``d = g``); ``m += (1 - b1) (d - m)``;
    ``v = b2 v + (1 - b2) d^2``; ``p -= step m / (sqrt(v) / bias2 + eps)``.
    """
    # NOTE: p, g, m, v 1-D of one float dtype, same length; scalars of that dtype.
    for i in prange(p.shape[0]):
        d = g[i] + decay * p[i] if decay != 0 else g[i]
        mi = m[i] + one_minus_beta1 * (d - m[i])
        vi = v[i] * beta2 + one_minus_beta2 * (d * d)
        m[i] = mi
        v[i] = vi
        p[i] = p[i] - step * mi / (np.sqrt(vi) / bias2 + eps)


@njit(cache=True, nogil=True, parallel=True)
def sgd_update(p, g, buf, lr, decay, momentum, nesterov):
    """One SGD step in place (``buf`` unused without momentum), in ``p``'s dtype."""
    # NOTE: p, g, buf 1-D of one float dtype (buf may be empty without momentum).
    for i in prange(p.shape[0]):
        d = g[i] + decay * p[i] if decay != 0 else g[i]
        if momentum != 0:
            b = buf[i] * momentum + d
            buf[i] = b
            d = d + momentum * b if nesterov else b
        p[i] = p[i] - lr * d


@njit(cache=True, nogil=True, parallel=True)
def accumulate_moments(g, total, total_sq):
    """``total += g`` and ``total_sq += g * g`` in float64, in place, in one pass."""
    # NOTE: g float (n,); total, total_sq float64 (n,).
    for i in prange(g.shape[0]):
        x = np.float64(g[i])
        total[i] += x
        total_sq[i] += x * x
