"""Philox4x32-10, the counter-based generator of the masks' uniforms (private module).

Salmon, Moraes, Dror and Shaw, "Parallel random numbers: as easy as 1, 2, 3" (SC 2011):
a keyed bijection of a 128-bit counter, so the uniforms of any block of units can be
computed on any thread, in any order, with the same result. It is the generator of
cuRAND's ``curand_Philox4x32_10`` and of the Random123 library, whose known-answer
vectors the tests check.

Layout (see :func:`cpusparse.method.sample_masks`): with the 64-bit step key
``(k0, k1)`` (low and high words), the uniforms of units ``4c .. 4c + 3`` of mask ``k``
are the four output words of ``philox4x32_10(ctr=(c mod 2^32, c div 2^32, k, 0),
key=(k0, k1))``, each times ``2^-32``.
"""

import numpy as np
from numba import njit, prange

__all__: list[str] = []

_M0 = np.uint64(0xD2511F53)
_M1 = np.uint64(0xCD9E8D57)
_W0 = np.uint64(0x9E3779B9)
_W1 = np.uint64(0xBB67AE85)
_LOW = np.uint64(0xFFFFFFFF)
_SHIFT = np.uint64(32)
_SCALE = 2.0**-32


@njit(cache=True, nogil=True, inline="always")
def _philox(c0, c1, c2, c3, k0, k1):
    # Ten rounds on 32-bit words held in uint64 (all values stay below 2^32).
    for _ in range(10):
        p0 = _M0 * c0
        p1 = _M1 * c2
        c0, c1, c2, c3 = (
            (p1 >> _SHIFT) ^ c1 ^ k0,
            p1 & _LOW,
            (p0 >> _SHIFT) ^ c3 ^ k1,
            p0 & _LOW,
        )
        k0 = (k0 + _W0) & _LOW
        k1 = (k1 + _W1) & _LOW
    return c0, c1, c2, c3


@njit(cache=True, nogil=True)
def philox4x32_10(counter, key, out):
    """``out[:] = philox4x32_10(counter, key)``: four uint32 words from four and two."""
    # NOTE: counter (4,) and key (2,) integer arrays of 32-bit values; out uint32 (4,).
    r = _philox(
        np.uint64(counter[0]),
        np.uint64(counter[1]),
        np.uint64(counter[2]),
        np.uint64(counter[3]),
        np.uint64(key[0]),
        np.uint64(key[1]),
    )
    for j in range(4):
        out[j] = r[j]


# Counters per chunk: the rounds run over arrays of this many blocks, a loop the
# compiler vectorises (a block at a time it does not).
_CHUNK = 256


@njit(cache=True, nogil=True, inline="always")
def _philox_chunk(start, m, k, k0, k1, c0, c1, c2, c3):
    # The words of blocks start .. start + m - 1 of mask k into c0..c3[:m].
    for j in range(m):
        c = np.uint64(start + j)
        c0[j] = c & _LOW
        c1[j] = c >> _SHIFT
        c2[j] = k
        c3[j] = np.uint64(0)
    for _ in range(10):
        for j in range(m):
            p0 = _M0 * c0[j]
            p1 = _M1 * c2[j]
            n0 = (p1 >> _SHIFT) ^ c1[j] ^ k0
            n2 = (p0 >> _SHIFT) ^ c3[j] ^ k1
            c1[j] = p1 & _LOW
            c3[j] = p0 & _LOW
            c0[j] = n0
            c2[j] = n2
        k0 = (k0 + _W0) & _LOW
        k1 = (k1 + _W1) & _LOW


@njit(cache=True, nogil=True, parallel=True)
def philox_masks(score, k0, k1, out, uniforms, store_uniforms):
    """``out[k, i] = uniform(k, i) < score[i]`` (compared in float64).

    With ``store_uniforms`` the uniforms (float64 in [0, 1)) go to ``uniforms`` too;
    otherwise they are never stored (``uniforms`` may then be empty).
    """
    # NOTE: score float (n,); k0, k1 uint64 below 2^32; out bool (K, n) and uniforms
    # float64 (K, n) or empty, C-contiguous.
    n_masks, n = out.shape
    n_blocks = (n + 3) // 4
    n_chunks = (n_blocks + _CHUNK - 1) // _CHUNK
    for k in range(n_masks):
        row = out[k]
        for chunk in prange(n_chunks):
            words = np.empty((4, _CHUNK), dtype=np.uint64)
            start = chunk * _CHUNK
            m = min(_CHUNK, n_blocks - start)
            _philox_chunk(start, m, np.uint64(k), k0, k1, words[0], words[1], words[2], words[3])
            if store_uniforms:
                u_row = uniforms[k]
                for j in range(m):
                    for w in range(4):
                        i = 4 * (start + j) + w
                        if i < n:
                            u_row[i] = words[w, j] * _SCALE
            if 4 * (start + m) <= n:
                for j in range(m):
                    i = 4 * (start + j)
                    row[i] = words[0, j] * _SCALE < np.float64(score[i])
                    row[i + 1] = words[1, j] * _SCALE < np.float64(score[i + 1])
                    row[i + 2] = words[2, j] * _SCALE < np.float64(score[i + 2])
                    row[i + 3] = words[3, j] * _SCALE < np.float64(score[i + 3])
            else:  # the last chunk, with a partial block
                for j in range(m):
                    for w in range(4):
                        i = 4 * (start + j) + w
                        if i < n:
                            row[i] = words[w, j] * _SCALE < np.float64(score[i])
