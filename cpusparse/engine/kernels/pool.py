"""Numba kernels of the 2-D pooling layers (private module).

Images are channel-major, ``(C, N, H, W)``, C-contiguous. Every kernel runs in
parallel over the ``(channel, sample)`` planes of the channels listed in
``channels`` (the live ones) and writes only those planes, so the caller allocates
zeroed outputs and the other channels stay 0. A plane is computed by one thread,
in one fixed order (outputs in row-major order, each window in row-major order), so
the results are bit-identical for any number of threads. No ``fastmath``.

Window ``(i, j)`` of a plane covers the input rows ``i*sh - ph .. i*sh - ph + kh - 1``
and columns ``j*sw - pw .. j*sw - pw + kw - 1``; the positions outside the image are
padding, which never wins a maximum (PyTorch pads max pooling with -inf) and adds 0
to a sum (average pooling counts them in the divisor, ``count_include_pad=True``).
"""

import numpy as np
from numba import njit, prange

__all__: list[str] = []


@njit(cache=True, nogil=True, parallel=True)
def max_pool_forward(x, channels, kh, kw, sh, sw, ph, pw, out, argmax):
    """``out`` = window maxima, ``argmax`` = position ``h*W + w`` of each in its plane.

    Ties go to the first maximum in row-major window order (strict ``>``), as in
    PyTorch.
    """
    # NOTE: x (C, N, H, W) finite; out (C, N, Ho, Wo) of x's dtype and argmax
    # (C, N, Ho, Wo) int32, both written on the planes of `channels` only; every
    # window holds at least one position inside the image.
    n_batch, height, width = x.shape[1], x.shape[2], x.shape[3]
    h_out, w_out = out.shape[2], out.shape[3]
    for q in prange(channels.shape[0] * n_batch):
        c = channels[q // n_batch]
        n = q % n_batch
        plane = x[c, n]
        for i in range(h_out):
            h0 = i * sh - ph
            for j in range(w_out):
                w0 = j * sw - pw
                best = -np.inf
                where = -1
                for a in range(max(h0, 0), min(h0 + kh, height)):
                    for b in range(max(w0, 0), min(w0 + kw, width)):
                        v = plane[a, b]
                        if v > best:
                            best = v
                            where = a * width + b
                out[c, n, i, j] = best
                argmax[c, n, i, j] = where


@njit(cache=True, nogil=True, parallel=True)
def max_pool_backward(dout, channels, argmax, dx):
    """``dx`` += each output's gradient at the position of its maximum."""
    # NOTE: dout, argmax (C, N, Ho, Wo) from max_pool_forward; dx (C, N, H, W) zeroed,
    # written on the planes of `channels` only.
    n_batch, width = dx.shape[1], dx.shape[3]
    h_out, w_out = dout.shape[2], dout.shape[3]
    for q in prange(channels.shape[0] * n_batch):
        c = channels[q // n_batch]
        n = q % n_batch
        for i in range(h_out):
            for j in range(w_out):
                k = argmax[c, n, i, j]
                dx[c, n, k // width, k % width] += dout[c, n, i, j]


@njit(cache=True, nogil=True, parallel=True)
def avg_pool_forward(x, channels, kh, kw, sh, sw, ph, pw, out):
    """``out`` = window sums (row-major order) divided by ``kh * kw``."""
    # NOTE: x (C, N, H, W); out (C, N, Ho, Wo) of x's dtype, written on the planes of
    # `channels` only; windows end inside the padded image (floor mode).
    n_batch, height, width = x.shape[1], x.shape[2], x.shape[3]
    h_out, w_out = out.shape[2], out.shape[3]
    count = x.dtype.type(kh * kw)
    for q in prange(channels.shape[0] * n_batch):
        c = channels[q // n_batch]
        n = q % n_batch
        plane = x[c, n]
        for i in range(h_out):
            h0 = i * sh - ph
            for j in range(w_out):
                w0 = j * sw - pw
                total = x.dtype.type(0)
                for a in range(max(h0, 0), min(h0 + kh, height)):
                    for b in range(max(w0, 0), min(w0 + kw, width)):
                        total += plane[a, b]
                out[c, n, i, j] = total / count


@njit(cache=True, nogil=True, parallel=True)
def avg_pool_backward(dout, channels, kh, kw, sh, sw, ph, pw, dx):
    """``dx`` += each output's gradient divided by ``kh * kw`` over its window."""
    # NOTE: dout (C, N, Ho, Wo); dx (C, N, H, W) zeroed, of dout's dtype, written on the
    # planes of `channels` only.
    n_batch, height, width = dx.shape[1], dx.shape[2], dx.shape[3]
    h_out, w_out = dout.shape[2], dout.shape[3]
    count = dx.dtype.type(kh * kw)
    for q in prange(channels.shape[0] * n_batch):
        c = channels[q // n_batch]
        n = q % n_batch
        for i in range(h_out):
            h0 = i * sh - ph
            for j in range(w_out):
                w0 = j * sw - pw
                g = dout[c, n, i, j] / count
                for a in range(max(h0, 0), min(h0 + kh, height)):
                    for b in range(max(w0, 0), min(w0 + kw, width)):
                        dx[c, n, a, b] += g
