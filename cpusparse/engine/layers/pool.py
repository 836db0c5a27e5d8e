r"""Pooling and flattening of channel-major images.

:class:`MaxPool2d`, :class:`AvgPool2d`, :class:`GlobalAvgPool2d` and :class:`Flatten`.
Images are ``(C, N, H, W)``, channel-major (see :mod:`~cpusparse.engine.layers.base`).
The pools work on each ``(channel, sample)`` plane alone, so a channel known to be zero
(outside ``live``) stays zero: its output is 0 and no work is spent on it, and
``live`` passes through. The pools take no mask and have no parameters. Their
arithmetic is PyTorch's (``torch.nn.MaxPool2d``, ``torch.nn.AvgPool2d`` with
``count_include_pad=True``, ``ceil_mode=False``): the output size is

.. math::

    H_{out} = \left\lfloor \frac{H + 2 p_h - k_h}{s_h} \right\rfloor + 1

(the same for the width), max pooling pads with :math:`-\infty` and average pooling
with 0, dividing every window by :math:`k_h k_w`. :class:`GlobalAvgPool2d` and
:class:`Flatten` turn an image batch into feature-major ``(n_features, n_batch)``
activations, so that a dense classifier can follow.
"""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from ..._typing import BoolArray, FloatArray, IndexArray
from ..._validation import check_same_dtype
from ..csr import _check_activations
from ..kernels import pool as _kernels
from ._window import output_size, pair
from .base import TRAIN, Layer, Mode, _check_live, check_images

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = [
    "MaxPool2d",
    "AvgPool2d",
    "GlobalAvgPool2d",
    "Flatten",
    "PoolCache",
    "FlattenCache",
]


def _channels(live: BoolArray | None, n_channels: int) -> IndexArray:
    # The channels to compute: the live ones (all without `live`).
    if live is None:
        return np.arange(n_channels, dtype=np.int64)
    return np.flatnonzero(live).astype(np.int64, copy=False)


def _check_grad(dout: npt.ArrayLike, shape: tuple[int, ...], dtype: np.dtype) -> FloatArray:
    # dout of the forward output's shape and dtype, C-contiguous and finite.
    if len(shape) == 4:
        dout = check_images(dout, shape[0], "dout")
    else:
        dout = _check_activations(dout, shape[0], "dout")
    if dout.shape != shape:
        raise ValueError(f"dout must have shape {shape} (the forward output's), got {dout.shape}")
    check_same_dtype(("x", np.empty(0, dtype)), ("dout", dout))
    return dout


class _AnyChannels(Layer):
    """A layer without parameters that takes images with any number of channels."""

    compact_kind = "channelwise"

    def live_outputs(self, mask: BoolArray | None, live: BoolArray | None) -> BoolArray | None:
        """Output channels that may be nonzero: the live input channels."""
        return live

    def forward(
        self,
        x: npt.ArrayLike,
        mask: Any = None,
        *,
        live: npt.ArrayLike | None = None,
        mode: Mode = TRAIN,
    ) -> tuple[FloatArray, object]:
        """Forward pass (validated); see :meth:`Layer.forward`, ``x`` is ``(C, N, H, W)``."""
        x = self._check_input(x)
        mask = self._check_mask(mask)
        return self._forward(x, mask, _check_live(live, x.shape[0]), mode)

    def _check_input(self, x: npt.ArrayLike) -> FloatArray:
        return check_images(x, None, "x")


class PoolCache(NamedTuple):
    """What the backward pass of a pool needs from the forward pass.

    ``channels`` are the channels computed (the live ones); ``argmax`` (max pooling
    only) holds the position ``h * W + w`` of each output's maximum in its plane.
    """

    shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    dtype: np.dtype
    channels: IndexArray
    argmax: npt.NDArray[np.int32] | None


class _Pool2d(_AnyChannels):
    """Shared by the windowed pools: window geometry, sizes, serialisation."""

    def __init__(
        self,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] | None = None,
        padding: int | tuple[int, int] = 0,
    ) -> None:
        self.kernel_size = pair(kernel_size, "kernel_size", 1)
        self.stride = self.kernel_size if stride is None else pair(stride, "stride", 1)
        self.padding = pair(padding, "padding", 0)
        if any(2 * p > k for p, k in zip(self.padding, self.kernel_size, strict=True)):
            raise ValueError(
                f"padding must be at most half of kernel_size {self.kernel_size}, got "
                f"{self.padding}"
            )

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """``(H_out, W_out)`` for inputs of ``height`` by ``width``; an error if too small."""
        return output_size(height, width, self.kernel_size, self.stride, self.padding)

    def output_spatial(self, spatial: tuple[int, int] | None) -> tuple[int, int]:
        """``(H_out, W_out)``; a pool needs a spatial input."""
        if spatial is None:
            raise ValueError("a pool needs inputs of a spatial size (H, W), got None")
        return self.output_size(*spatial)

    def _geometry(self) -> tuple[int, int, int, int, int, int]:
        (kh, kw), (sh, sw), (ph, pw) = self.kernel_size, self.stride, self.padding
        return kh, kw, sh, sw, ph, pw

    def _check_input(self, x: npt.ArrayLike) -> FloatArray:
        x = check_images(x, None, "x")
        self.output_size(x.shape[2], x.shape[3])
        return x

    def _check_dout(self, dout: npt.ArrayLike, cache: PoolCache) -> FloatArray:
        return _check_grad(dout, cache.out_shape, cache.dtype)

    def _out_shape(self, x: FloatArray) -> tuple[int, int, int, int]:
        h_out, w_out = self.output_size(x.shape[2], x.shape[3])
        return x.shape[0], x.shape[1], h_out, w_out

    def config(self) -> dict[str, Any]:
        """JSON-ready settings that rebuild the layer."""
        return {
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": list(self.padding),
        }

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding})"
        )


class MaxPool2d(_Pool2d):
    r"""2-D max pooling of ``(C, N, H, W)`` images, as ``torch.nn.MaxPool2d``.

    Parameters
    ----------
    kernel_size : int or (int, int)
        Window height and width.
    stride : int or (int, int), optional
        Step between windows; default ``kernel_size``.
    padding : int or (int, int), default=0
        Implicit :math:`-\infty` padding on each side, at most half the kernel size.

    Notes
    -----
    The gradient of each output goes to the position of its window's maximum; when
    several positions tie, to the first in row-major order (as PyTorch). The Numba
    kernels run in parallel over the ``(channel, sample)`` planes, each plane in one
    fixed order, so results do not depend on the thread count.

    Examples
    --------
    >>> x = np.arange(16.0).reshape(1, 1, 4, 4)
    >>> out, cache = MaxPool2d(2).forward(x)
    >>> out[0, 0]
    array([[ 5.,  7.],
           [13., 15.]])
    >>> MaxPool2d(2).backward(np.ones_like(out), cache)[0][0, 0]
    array([[0., 0., 0., 0.],
           [0., 1., 0., 1.],
           [0., 0., 0., 0.],
           [0., 1., 0., 1.]])
    """

    def _forward(
        self,
        x: FloatArray,
        mask: BoolArray | None = None,
        live: BoolArray | None = None,
        mode: Mode = TRAIN,
    ) -> tuple[FloatArray, PoolCache]:
        out_shape = self._out_shape(x)
        channels = _channels(live, x.shape[0])
        out = np.zeros(out_shape, dtype=x.dtype)
        argmax = np.zeros(out_shape, dtype=np.int32)
        _kernels.max_pool_forward(x, channels, *self._geometry(), out, argmax)
        return out, PoolCache(x.shape, out_shape, x.dtype, channels, argmax)

    def _backward(
        self, dout: FloatArray, cache: PoolCache, need_dx: bool = True
    ) -> tuple[FloatArray | None, dict[str, FloatArray]]:
        if not need_dx:
            return None, {}
        if cache.argmax is None:
            raise TypeError("cache must come from MaxPool2d.forward, got an average pool's")
        dx = np.zeros(cache.shape, dtype=cache.dtype)
        _kernels.max_pool_backward(dout, cache.channels, cache.argmax, dx)
        return dx, {}


class AvgPool2d(_Pool2d):
    """2-D average pooling of ``(C, N, H, W)`` images, as ``torch.nn.AvgPool2d``.

    Padding counts in the average (``count_include_pad=True``, PyTorch's default):
    every window is divided by ``kh * kw``.

    Parameters
    ----------
    kernel_size : int or (int, int)
        Window height and width.
    stride : int or (int, int), optional
        Step between windows; default ``kernel_size``.
    padding : int or (int, int), default=0
        Implicit zero padding on each side, at most half the kernel size.

    Notes
    -----
    Each window is summed in row-major order in the input's dtype, then divided by
    ``kh * kw``; the backward pass adds ``dout / (kh * kw)`` to every position of the
    window. One thread computes one ``(channel, sample)`` plane in a fixed order, so
    results do not depend on the thread count.

    Examples
    --------
    >>> x = np.arange(16.0).reshape(1, 1, 4, 4)
    >>> out, cache = AvgPool2d(2).forward(x)
    >>> out[0, 0]
    array([[ 2.5,  4.5],
           [10.5, 12.5]])
    >>> float(AvgPool2d(2).backward(np.ones_like(out), cache)[0][0, 0, 0, 0])
    0.25
    """

    def _forward(
        self,
        x: FloatArray,
        mask: BoolArray | None = None,
        live: BoolArray | None = None,
        mode: Mode = TRAIN,
    ) -> tuple[FloatArray, PoolCache]:
        out_shape = self._out_shape(x)
        channels = _channels(live, x.shape[0])
        out = np.zeros(out_shape, dtype=x.dtype)
        _kernels.avg_pool_forward(x, channels, *self._geometry(), out)
        return out, PoolCache(x.shape, out_shape, x.dtype, channels, None)

    def _backward(
        self, dout: FloatArray, cache: PoolCache, need_dx: bool = True
    ) -> tuple[FloatArray | None, dict[str, FloatArray]]:
        if not need_dx:
            return None, {}
        dx = np.zeros(cache.shape, dtype=cache.dtype)
        _kernels.avg_pool_backward(dout, cache.channels, *self._geometry(), dx)
        return dx, {}


class GlobalAvgPool2d(_AnyChannels):
    """The mean of each ``(channel, sample)`` plane: ``(C, N, H, W)`` to ``(C, N)``.

    The output is feature-major (one feature per channel), so a dense classifier can
    follow; channel liveness becomes feature liveness. As
    ``torch.nn.AdaptiveAvgPool2d(1)`` followed by flattening.

    Examples
    --------
    >>> x = np.arange(8.0).reshape(2, 1, 2, 2)
    >>> out, cache = GlobalAvgPool2d().forward(x)
    >>> out
    array([[1.5],
           [5.5]])
    >>> GlobalAvgPool2d().backward(np.ones_like(out), cache)[0][1, 0]
    array([[0.25, 0.25],
           [0.25, 0.25]])
    """

    def output_spatial(self, spatial: tuple[int, int] | None) -> None:
        """None: the outputs are feature vectors."""
        return None

    def _forward(
        self,
        x: FloatArray,
        mask: BoolArray | None = None,
        live: BoolArray | None = None,
        mode: Mode = TRAIN,
    ) -> tuple[FloatArray, PoolCache]:
        n_channels, n_batch, height, width = x.shape
        channels = _channels(live, n_channels)
        out = np.zeros((n_channels, n_batch), dtype=x.dtype)
        kept = x if channels.shape[0] == n_channels else x[channels]
        out[channels] = kept.reshape(channels.shape[0], n_batch, height * width).mean(axis=2)
        return out, PoolCache(x.shape, out.shape, x.dtype, channels, None)

    def _check_dout(self, dout: npt.ArrayLike, cache: PoolCache) -> FloatArray:
        return _check_grad(dout, cache.out_shape, cache.dtype)

    def _backward(
        self, dout: FloatArray, cache: PoolCache, need_dx: bool = True
    ) -> tuple[FloatArray | None, dict[str, FloatArray]]:
        if not need_dx:
            return None, {}
        height, width = cache.shape[2], cache.shape[3]
        dx = np.zeros(cache.shape, dtype=cache.dtype)
        grad = dout[cache.channels] / dout.dtype.type(height * width)
        dx[cache.channels] = grad[:, :, None, None]
        return dx, {}

    def config(self) -> dict[str, Any]:
        """JSON-ready settings that rebuild the layer (none)."""
        return {}

    def __repr__(self) -> str:
        return "GlobalAvgPool2d()"


class FlattenCache(NamedTuple):
    """What :meth:`Flatten.backward` needs: the input's shape and dtype, the live channels."""

    shape: tuple[int, ...]
    dtype: np.dtype
    channels: IndexArray


class Flatten(Layer):
    """``(C, N, H, W)`` images as ``(C*H*W, N)`` feature-major activations.

    Feature ``c*H*W + h*W + w`` of sample ``n`` is ``x[c, n, h, w]``: PyTorch's
    ``torch.flatten(x, 1)`` order on ``(N, C, H, W)``, so a classifier's weight
    transfers unchanged. A channel outside ``live`` gives ``H*W`` features known to be
    zero.

    Parameters
    ----------
    shape : (int, int, int)
        ``(C, H, W)`` of one input image; ``n_in`` is ``C`` and ``n_out`` ``C*H*W``.

    Examples
    --------
    >>> x = np.arange(8.0).reshape(2, 1, 2, 2)
    >>> out, cache = Flatten((2, 2, 2)).forward(x)
    >>> out[:, 0]
    array([0., 1., 2., 3., 4., 5., 6., 7.])
    >>> Flatten((2, 2, 2)).live_outputs(None, np.array([False, True]))
    array([False, False, False, False,  True,  True,  True,  True])
    """

    compact_kind = "channelwise"

    def __init__(self, shape: tuple[int, int, int] | list[int]) -> None:
        if not (
            isinstance(shape, tuple | list)
            and len(shape) == 3
            and all(
                isinstance(v, numbers.Integral) and not isinstance(v, bool | np.bool_)
                for v in shape
            )
        ):
            raise TypeError(f"shape must be a triple of ints (C, H, W), got {shape!r}")
        if min(shape) < 1:
            raise ValueError(f"shape must be positive (C, H, W), got {tuple(shape)}")
        self.shape: tuple[int, int, int] = (int(shape[0]), int(shape[1]), int(shape[2]))

    def output_spatial(self, spatial: tuple[int, int] | None) -> None:
        """None: the outputs are feature vectors."""
        return None

    @property
    def n_in(self) -> int:
        """Number of input channels."""
        return self.shape[0]

    @property
    def n_out(self) -> int:
        """Number of output features, ``C*H*W``."""
        return self.shape[0] * self.shape[1] * self.shape[2]

    def live_outputs(self, mask: BoolArray | None, live: BoolArray | None) -> BoolArray | None:
        """Output features that may be nonzero: the ``H*W`` features of each live channel."""
        if live is None:
            return None
        return np.repeat(live, self.shape[1] * self.shape[2])

    def _check_input(self, x: npt.ArrayLike) -> FloatArray:
        x = check_images(x, self.shape[0], "x")
        if x.shape[2:] != self.shape[1:]:
            raise ValueError(
                f"x must have height {self.shape[1]} and width {self.shape[2]} (Flatten "
                f"shape {self.shape}), got shape {x.shape}"
            )
        return x

    def _check_dout(self, dout: npt.ArrayLike, cache: FlattenCache) -> FloatArray:
        return _check_grad(dout, (self.n_out, cache.shape[1]), cache.dtype)

    def _forward(
        self,
        x: FloatArray,
        mask: BoolArray | None = None,
        live: BoolArray | None = None,
        mode: Mode = TRAIN,
    ) -> tuple[FloatArray, FlattenCache]:
        n_channels, n_batch, height, width = x.shape
        channels = _channels(live, n_channels)
        n_out = n_channels * height * width  # the rows of the kept channels if compact
        if channels.shape[0] == n_channels:
            out = np.ascontiguousarray(x.transpose(0, 2, 3, 1)).reshape(n_out, n_batch)
        else:
            out4 = np.zeros((n_channels, height, width, n_batch), dtype=x.dtype)
            out4[channels] = x[channels].transpose(0, 2, 3, 1)
            out = out4.reshape(n_out, n_batch)
        return out, FlattenCache(x.shape, x.dtype, channels)

    def _backward(
        self, dout: FloatArray, cache: FlattenCache, need_dx: bool = True
    ) -> tuple[FloatArray | None, dict[str, FloatArray]]:
        if not need_dx:
            return None, {}
        n_channels, n_batch, height, width = cache.shape
        dout4 = dout.reshape(n_channels, height, width, n_batch)
        if cache.channels.shape[0] == n_channels:
            return np.ascontiguousarray(dout4.transpose(0, 3, 1, 2)), {}
        dx = np.zeros(cache.shape, dtype=cache.dtype)
        dx[cache.channels] = dout4[cache.channels].transpose(0, 3, 1, 2)
        return dx, {}

    def config(self) -> dict[str, Any]:
        """JSON-ready settings that rebuild the layer."""
        return {"shape": list(self.shape)}

    def __repr__(self) -> str:
        return f"Flatten(shape={self.shape})"
