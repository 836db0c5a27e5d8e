"""Numba kernels of the convolutions: im2col and its adjoint, col2im.

Private module; the conventions of :mod:`cpusparse.engine.kernels.csr` hold (raw
arrays in, results written into arrays given, nothing validated). Images are
channel-major, ``x[c, n, h, w]`` of shape ``(C, N, H, W)``, and the column matrix of a
``kh x kw`` convolution has one row per ``(c, i, j)`` (in that order, the row-major
flattening of a PyTorch weight ``(C_out, C_in, kh, kw)``) and one column per output
position ``(n, oh, ow)``, so ``W.reshape(C_out, -1) @ cols`` is the output in the
same channel-major layout.

:func:`col2im` adds into each input element in one fixed order (the kernel offsets
``(i, j)`` ascending), and each thread owns whole channels, so its results do not
depend on the number of threads. :func:`im2col` only copies.
"""

import numpy as np
from numba import njit, prange

__all__: list[str] = []


@njit(cache=True, nogil=True, parallel=True)
def im2col(x, chans, n0, kh, kw, sh, sw, ph, pw, ho, wo, cols):  # pragma: no cover - compiled
    """``cols[(c, i, j), (n, oh, ow)] = x[chans[c], n0 + n, oh*sh - ph + i, ow*sw - pw + j]``.

    Zero where the input position falls in the padding. ``cols`` has shape
    ``(len(chans) * kh * kw, nb * ho * wo)`` for the ``nb`` samples from ``n0``: only
    the channels ``chans`` are read. One thread per channel copies each image into a
    zero-padded buffer, then each window row.
    """
    # NOTE: x (C, N, H, W) C-contiguous; chans int in [0, C); cols C-contiguous, written
    # entirely.
    _, _, height, width = x.shape
    n_channels = chans.shape[0]
    nb = cols.shape[1] // (ho * wo)
    for c in prange(n_channels):
        pad = np.zeros((height + 2 * ph, width + 2 * pw), dtype=x.dtype)
        for n in range(nb):
            pad[ph : ph + height, pw : pw + width] = x[chans[c], n0 + n]
            for i in range(kh):
                for j in range(kw):
                    row = cols[(c * kh + i) * kw + j]
                    for oh in range(ho):
                        base = (n * ho + oh) * wo
                        src = pad[oh * sh + i]
                        if sw == 1:  # contiguous: a block copy
                            row[base : base + wo] = src[j : j + wo]
                        else:
                            for ow in range(wo):
                                row[base + ow] = src[j + ow * sw]


@njit(cache=True, nogil=True, parallel=True)
def col2im(cols, chans, n0, kh, kw, sh, sw, ph, pw, ho, wo, dx):  # pragma: no cover - compiled
    """The adjoint of :func:`im2col`: ``dx[chans[c], n0 + n, h, w] += cols[(c, i, j), .]``.

    Adds into ``dx`` (zero it first for a plain col2im). One thread per channel; each
    image's contributions are summed in a zero-padded buffer in ascending ``(i, j)``,
    then added to ``dx``: the order is fixed.
    """
    # NOTE: dx (C, N, H, W) C-contiguous; chans distinct ints in [0, C); cols
    # (len(chans) * kh * kw, nb * ho * wo).
    _, _, height, width = dx.shape
    n_channels = chans.shape[0]
    nb = cols.shape[1] // (ho * wo)
    for c in prange(n_channels):
        pad = np.empty((height + 2 * ph, width + 2 * pw), dtype=dx.dtype)
        for n in range(nb):
            pad[:, :] = 0.0
            for i in range(kh):
                for j in range(kw):
                    row = cols[(c * kh + i) * kw + j]
                    for oh in range(ho):
                        base = (n * ho + oh) * wo
                        dst = pad[oh * sh + i]
                        if sw == 1:  # contiguous: a vectorised add
                            for ow in range(wo):
                                dst[j + ow] += row[base + ow]
                        else:
                            for ow in range(wo):
                                dst[j + ow * sw] += row[base + ow]
            img = dx[chans[c], n0 + n]
            for h in range(height):
                for w in range(width):
                    img[h, w] += pad[ph + h, pw + w]
