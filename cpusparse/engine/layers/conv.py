r"""Two-dimensional convolutions with channel or weight masks: :class:`Conv2d`.

The weight has PyTorch's layout ``(C_out, C_in, kh, kw)`` and images are channel-major
``(C, N, H, W)`` (see :mod:`~cpusparse.engine.layers.base`). A convolution is a matrix
product on the im2col matrix: with ``cols`` of shape ``(C_in*kh*kw, N*H_out*W_out)``
(:func:`~cpusparse.engine.kernels.conv.im2col`),

.. math::

    \text{out} = W_{(C_{out},\ C_{in} k_h k_w)} \cdot \text{cols},

which in this layout is the output itself. Everything that depends on what one mask
bit keeps lives in the unit map:

- :class:`ChannelUnits` (``"channel"``, the paper's setting): one bit per output
  filter. The kept filters and the live input channels (those the previous layer did
  not drop) are gathered into a dense block; im2col runs over the live input
  channels only, and BLAS multiplies the block, forward and backward, so the cost is
  ``kept_out * kept_in * kh * kw * N * H_out * W_out`` at BLAS speed.
- :class:`ConvWeightUnits` (``"weight"``): one bit per weight. The weight matrix is a
  full CSR pattern computed with the masked CSR kernels of the linear layers, with
  the im2col columns as the batch.

The im2col matrix of a large batch is large (64 channels, 28 x 28, batch 256, 3 x 3:
460 MB in float32), so passes work on chunks of the batch: fixed 4 MiB chunks on the
channel path (:data:`BLOCK_CHUNK_BYTES`, run in parallel), chunks of
``max_cols_bytes`` on the weight path; a layer keeps its columns for the backward
pass only if they fit in ``max_cols_bytes``, else the backward pass builds them again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from ..._threads import run_tasks
from ..._typing import BoolArray, FloatArray, IndexArray, RNGLike
from ..._validation import check_array, check_choice, check_rng, check_same_dtype
from .. import csr
from ..kernels import conv as _kernels
from ._window import output_size, pair
from .base import TRAIN, Layer, Mode, UnitMap, check_images
from .linear import _check_fan_in_scale, _init_uniform, _init_weight, _kept

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["Conv2d", "ConvCache", "ChannelUnits", "ConvWeightUnits", "CONV_GRANULARITIES"]

MAX_COLS_BYTES = 1 << 26
"""Default bound on the im2col columns a layer keeps for its backward pass, and on the
chunks of the weight path (64 MiB). It holds per layer and per pass, and a step runs
``n_jobs`` mask passes at once."""

BLOCK_CHUNK_BYTES = 1 << 22
"""Columns per task of the channel path (4 MiB): the batch is cut into chunks of this
size, fixed whatever the thread count, each multiplied by one single-threaded BLAS call
while its columns are still in cache; the chunks run on the ``n_jobs`` threads."""


class ConvCache(NamedTuple):
    """What the backward pass of a :class:`Conv2d` needs from its forward pass.

    ``x`` is the input (of which the channels ``chans`` are live), ``cols`` the live
    channels' im2col matrices, one
    per chunk of the batch, when they fit ``max_cols_bytes`` (else None: the backward
    pass builds them again), ``out`` the layer's output, ``pre`` unused (None),
    ``block`` the weight block ``(kept_out, kept_in*kh*kw)`` and ``active`` the
    active CSR pattern (weight path). ``mask``/``unmasked`` are set by a
    straight-through pass. ``w_chans`` (compact input only) are the weight's input
    channels of the rows of ``x``, which then holds the live channels only; ``out``
    then holds the kept filters only when a channel mask was given.
    """

    x: FloatArray
    cols: list[FloatArray] | None
    out: FloatArray
    pre: FloatArray | None
    rows: IndexArray
    chans: IndexArray
    block: FloatArray | None
    active: csr.ActivePattern | None = None
    mask: BoolArray | None = None
    unmasked: FloatArray | None = None
    w_chans: IndexArray | None = None


class ChannelUnits(UnitMap):
    """One mask bit per output channel (filter) of a :class:`Conv2d`.

    ``out[c] = m_c * act(conv(x)[c] + b_c)``: a dropped channel is exactly 0, so the
    layers after it (batch norm, pooling, the next convolution) skip it.
    """

    granularity = "channel"
    zeroes_outputs = True
    thins_fan_in = False
    compact_block = True  # a compact pass is the BLAS block of kept filters

    def __init__(self, layer: Conv2d) -> None:
        self.layer = layer

    @property
    def n_units(self) -> int:
        """Number of mask bits: the output channels."""
        return self.layer.n_out

    @property
    def n_units_full(self) -> int:
        """Number of units of the dense layer."""
        return self.layer.n_out

    def stored_per_unit(self) -> IndexArray:
        """Weights each filter owns, ``C_in * kh * kw``."""
        return np.full(self.n_units, self.layer.weight[0].size, dtype=np.int64)

    def compaction(self, dead: BoolArray) -> tuple[BoolArray, dict[str, BoolArray]]:
        """Nothing is compacted: a dead filter is never computed, and its storage stays."""
        return np.ones(dead.shape[0], dtype=bool), {}

    def live_outputs(self, mask: BoolArray) -> BoolArray | None:
        """The kept channels."""
        return mask

    def kept_weights(self, mask: BoolArray) -> BoolArray:
        """The weights ``mask`` keeps, broadcastable to ``(C_out, C_in, kh, kw)``."""
        return mask[:, None, None, None]

    def forward(
        self, layer: Conv2d, x: FloatArray, mask: BoolArray | None, live: BoolArray | None
    ) -> tuple[FloatArray, ConvCache]:
        """BLAS on the block of kept filters and live input channels."""
        return layer._block_forward(x, _kept(mask, layer.n_out), _kept(live, layer.n_in))

    def backward(
        self, layer: Conv2d, dout: FloatArray, cache: ConvCache, need_dx: bool
    ) -> tuple[FloatArray | None, dict[str, FloatArray]]:
        """Backward of :meth:`forward` on the same block."""
        return layer._block_backward(dout, cache, need_dx)

    def straight_through_forward(
        self, layer: Conv2d, x: FloatArray, mask: BoolArray
    ) -> tuple[FloatArray, ConvCache]:
        """Every filter computed; the output multiplied by the mask."""
        everything = np.arange(layer.n_out, dtype=csr.INDEX_DTYPE)
        unmasked, cache = layer._block_forward(x, everything, _kept(None, layer.n_in))
        out = unmasked * mask[:, None, None, None]
        return out, cache._replace(out=out, mask=mask, unmasked=unmasked)

    def straight_through_backward(
        self, layer: Conv2d, dout: FloatArray, cache: ConvCache, need_dx: bool
    ) -> tuple[FloatArray | None, dict[str, FloatArray]]:
        """Backward of :meth:`straight_through_forward`, with ``grads["mask"]``."""
        if not (cache.mask is not None and cache.unmasked is not None):
            raise RuntimeError("internal error: a straight-through cache holds its mask")
        dmask = np.einsum("cnhw,cnhw->c", dout, cache.unmasked)
        dunmasked = dout * cache.mask[:, None, None, None]
        dx, grads = layer._block_backward(dunmasked, cache._replace(out=cache.unmasked), need_dx)
        return dx, {**grads, "mask": dmask}


class ConvWeightUnits(UnitMap):
    """One mask bit per weight of a :class:`Conv2d`, in the weight's row-major order.

    A filter whose weights are all dropped still outputs ``act(bias)``, so no output
    is known to be zero.
    """

    granularity = "weight"
    compact_block = False  # a compact pass goes through the masked CSR product
    zeroes_outputs = False
    thins_fan_in = True

    def __init__(self, layer: Conv2d) -> None:
        self.layer = layer

    @property
    def n_units(self) -> int:
        """Number of mask bits: every weight."""
        return int(self.layer.weight.size)

    @property
    def n_units_full(self) -> int:
        """Number of units of the dense layer."""
        return self.n_units

    def stored_per_unit(self) -> IndexArray:
        """One stored weight per unit."""
        return np.ones(self.n_units, dtype=np.int64)

    def stored_by(self, units: BoolArray) -> int:
        """Number of stored weights of the units where ``units`` is True: one each."""
        return int(np.count_nonzero(units))

    def compaction(self, dead: BoolArray) -> tuple[BoolArray, dict[str, BoolArray]]:
        """Nothing is compacted (the weight stays dense in PyTorch's layout)."""
        return np.ones(dead.shape[0], dtype=bool), {}

    def dense(self, values: npt.ArrayLike, fill: Any = 0) -> np.ndarray:
        """Per-weight values ``(..., n_units)`` as ``(..., C_out, C_in, kh, kw)``."""
        values = np.asarray(values)
        return values.reshape(values.shape[:-1] + self.layer.weight.shape).copy()

    def live_outputs(self, mask: BoolArray) -> BoolArray | None:
        """Every output may be nonzero."""
        return None

    def kept_weights(self, mask: BoolArray) -> BoolArray:
        """The weights ``mask`` keeps, shape ``(C_out, C_in, kh, kw)``."""
        return mask.reshape(self.layer.weight.shape)

    def forward(
        self, layer: Conv2d, x: FloatArray, mask: BoolArray | None, live: BoolArray | None
    ) -> tuple[FloatArray, ConvCache]:
        """The masked CSR product on the active weights, the im2col columns as batch."""
        return layer._csr_forward(x, mask, live)

    def backward(
        self, layer: Conv2d, dout: FloatArray, cache: ConvCache, need_dx: bool
    ) -> tuple[FloatArray | None, dict[str, FloatArray]]:
        """SDDMM at the active weights and the transposed product, then col2im."""
        return layer._csr_backward(dout, cache, need_dx)

    def straight_through_forward(
        self, layer: Conv2d, x: FloatArray, mask: BoolArray
    ) -> tuple[FloatArray, ConvCache]:
        """A dense pass with the weight ``W * m`` (every weight computed)."""
        m = mask.reshape(layer.weight.shape)
        everything = np.arange(layer.n_out, dtype=csr.INDEX_DTYPE)
        out, cache = layer._block_forward(
            x, everything, _kept(None, layer.n_in), weight=layer.weight * m
        )
        return out, cache._replace(mask=mask)

    def straight_through_backward(
        self, layer: Conv2d, dout: FloatArray, cache: ConvCache, need_dx: bool
    ) -> tuple[FloatArray | None, dict[str, FloatArray]]:
        """Backward of :meth:`straight_through_forward`: ``dL/dm = dL/dW_eff * W``."""
        if not (cache.mask is not None):
            raise RuntimeError("internal error: a straight-through cache holds its mask")
        dx, grads = layer._block_backward(dout, cache, need_dx)
        deff = grads["weight"]
        grads["weight"] = deff * cache.mask.reshape(deff.shape)
        grads["mask"] = (deff * layer.weight).reshape(-1)
        return dx, grads


CONV_GRANULARITIES: dict[str, type[ChannelUnits] | type[ConvWeightUnits]] = {
    "channel": ChannelUnits,
    "weight": ConvWeightUnits,
}
"""The unit maps of :class:`Conv2d` by granularity name."""


class Conv2d(Layer):
    r"""A 2-D convolution computed with a channel or weight mask.

    ``out = act(conv(x, W * m) + b)`` for weight granularity and
    ``out[c] = m_c * act(conv(x, W)[c] + b_c)`` (a dropped filter outputs exactly 0)
    for channel granularity; cross-correlation as in PyTorch's ``Conv2d``, without
    dilation or groups.

    Parameters
    ----------
    weight : ndarray of shape (C_out, C_in, kh, kw)
        PyTorch's layout, C-contiguous.
    bias : ndarray of shape (C_out,) or None
        None: no bias (the usual choice before a batch norm).
    stride, padding : int or pair of ints, default=1 and 0
        Zero padding on each side.
    granularity : {"channel", "weight"} or None, default="channel"
        One mask bit per output channel, or per weight (see :data:`CONV_GRANULARITIES`);
        None makes a dense convolution that takes no mask (``units`` is None), e.g. a
        first convolution left out of the budget.
    activation : {None, "relu"}, default=None
    max_cols_bytes : int, default=MAX_COLS_BYTES
        The layer keeps its im2col columns for the backward pass only if they fit
        (else the backward pass builds them again, chunk by chunk), and the weight
        path computes larger batches in chunks of this size.

    Notes
    -----
    Guarantees: the channel path cuts the batch into chunks of a fixed size
    (:data:`BLOCK_CHUNK_BYTES` of columns), multiplies each with one BLAS call and sums
    the chunks' weight gradients in chunk order; the chunks run on the calling
    thread's Numba thread count (:func:`cpusparse._threads.run_tasks`), so with BLAS
    on one thread (as inside :func:`~cpusparse._threads.numba_threads`) the results do
    not depend on the number of threads. im2col and col2im have a fixed order. The
    weight path uses the fixed-order CSR kernels, bit-identical for any thread count.
    A different BLAS (or CPU) may give different last bits than this one.

    Examples
    --------
    >>> conv = Conv2d.random(2, 4, 3, padding=1, rng=0, dtype=np.float64)
    >>> x = np.ones((2, 5, 8, 8))  # (C, N, H, W)
    >>> out, cache = conv.forward(x, mask=np.array([True, False, True, True]))
    >>> out.shape, float(abs(out[1]).max())
    ((4, 5, 8, 8), 0.0)
    >>> dx, grads = conv.backward(np.ones_like(out), cache)
    >>> dx.shape, grads["weight"].shape
    ((2, 5, 8, 8), (4, 2, 3, 3))
    """

    units: ChannelUnits | ConvWeightUnits | None

    def __init__(
        self,
        weight: npt.ArrayLike,
        bias: npt.ArrayLike | None = None,
        *,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        granularity: str | None = "channel",
        activation: str | None = None,
        max_cols_bytes: int = MAX_COLS_BYTES,
    ) -> None:
        weight = check_array(weight, "weight", finite=True)
        if weight.ndim != 4 or 0 in weight.shape:
            raise ValueError(
                f"weight must be a nonempty 4-D array (C_out, C_in, kh, kw), got shape "
                f"{weight.shape}"
            )
        self.weight = np.ascontiguousarray(weight)
        self.bias = None
        if bias is not None:
            self.bias = check_array(bias, "bias", ndim=1, shape=weight.shape[:1], finite=True)
            check_same_dtype(("weight", self.weight), ("bias", self.bias))
        self.stride = pair(stride, "stride", 1)
        self.padding = pair(padding, "padding", 0)
        check_choice(granularity, "granularity", (*CONV_GRANULARITIES, None))
        self.units = None if granularity is None else CONV_GRANULARITIES[granularity](self)
        self.activation = check_choice(activation, "activation", (None, "relu"))
        if not isinstance(max_cols_bytes, (int, np.integer)) or max_cols_bytes < 1:
            raise ValueError(f"max_cols_bytes must be a positive int, got {max_cols_bytes!r}")
        self.max_cols_bytes = int(max_cols_bytes)

    @classmethod
    def random(
        cls,
        n_in: int,
        n_out: int,
        kernel_size: int | tuple[int, int],
        *,
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        bias: bool = True,
        granularity: str | None = "channel",
        activation: str | None = None,
        init: str = "uniform",
        fan_in_scale: float = 1.0,
        dtype: npt.DTypeLike = np.float32,
        rng: RNGLike = None,
    ) -> Conv2d:
        r"""A layer with random weights, then bias (PyTorch's default or He's normal).

        The fan-in is :math:`f = C_{in} k_h k_w \times` ``fan_in_scale``; see
        :meth:`cpusparse.engine.layers.linear.SparseLinear.random`.
        """
        rng = check_rng(rng)
        kh, kw = pair(kernel_size, "kernel_size", 1)
        _check_fan_in_scale(fan_in_scale)
        fan_in = n_in * kh * kw
        weight = _init_weight(fan_in * n_out, fan_in * fan_in_scale, init, dtype, rng)
        b = _init_uniform(n_out, fan_in, dtype, rng) if bias else None
        return cls(
            weight.reshape(n_out, n_in, kh, kw),
            b,
            stride=stride,
            padding=padding,
            granularity=granularity,
            activation=activation,
        )

    # ------------------------------------------------------------------ structure

    @property
    def granularity(self) -> str | None:
        """Name of the unit map's granularity (None for a dense convolution)."""
        return None if self.units is None else self.units.granularity

    @property
    def n_in(self) -> int:
        """Number of input channels."""
        return int(self.weight.shape[1])

    @property
    def n_out(self) -> int:
        """Number of output channels."""
        return int(self.weight.shape[0])

    @property
    def kernel_size(self) -> tuple[int, int]:
        """``(kh, kw)``."""
        return int(self.weight.shape[2]), int(self.weight.shape[3])

    @property
    def dtype(self) -> np.dtype:
        """Floating-point type of the parameters."""
        return self.weight.dtype

    def params(self) -> dict[str, FloatArray]:
        """The parameter arrays, by name (the same objects, not copies)."""
        if self.bias is None:
            return {"weight": self.weight}
        return {"weight": self.weight, "bias": self.bias}

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """``(H_out, W_out)`` for an input of ``height x width``; ValueError if it is empty."""
        return output_size(height, width, self.kernel_size, self.stride, self.padding)

    def output_spatial(self, spatial: tuple[int, int] | None) -> tuple[int, int]:
        """``(H_out, W_out)``; a convolution needs a spatial input."""
        if spatial is None:
            raise ValueError("a convolution needs inputs of a spatial size (H, W), got None")
        return self.output_size(*spatial)

    def live_outputs(self, mask: BoolArray | None, live: BoolArray | None) -> BoolArray | None:
        """Output channels that may be nonzero: the kept ones (channel granularity)."""
        return None if mask is None or self.units is None else self.units.live_outputs(mask)

    def n_active(
        self, mask: BoolArray | None = None, live: BoolArray | None = None, mode: Mode = TRAIN
    ) -> int:
        """Weights a pass multiplies with (per output position and sample)."""
        if mode.straight_through:
            return int(self.weight.size)
        keep = np.ones(self.weight.shape, dtype=bool)
        if mask is not None and self.units is not None:
            keep &= self.units.kept_weights(mask)
        if live is not None:
            keep &= live[None, :, None, None]
        return int(keep.sum())

    def _check_input(self, x: npt.ArrayLike) -> FloatArray:
        x = check_images(x, self.n_in, "x", self.dtype)
        self.output_size(x.shape[2], x.shape[3])
        return x

    def _check_dout(self, dout: npt.ArrayLike, cache: Any) -> FloatArray:
        dout = check_images(dout, self.n_out, "dout", self.dtype)
        expected = getattr(cache, "out", None)
        if expected is not None and dout.shape != expected.shape:
            raise ValueError(f"dout must have shape {expected.shape}, got {dout.shape}")
        return dout

    # ------------------------------------------------------------------ passes

    def _forward(
        self,
        x: FloatArray,
        mask: BoolArray | None = None,
        live: BoolArray | None = None,
        mode: Mode = TRAIN,
    ) -> tuple[FloatArray, ConvCache]:
        if self.units is None:  # dense: every filter, on the live input channels
            return self._block_forward(x, _kept(None, self.n_out), _kept(live, self.n_in))
        if mode.straight_through:
            if mask is None:
                mask = np.ones(self.units.n_units, dtype=bool)
            return self.units.straight_through_forward(self, x, mask)
        return self.units.forward(self, x, mask, live)

    def _backward(
        self, dout: FloatArray, cache: ConvCache, need_dx: bool = True
    ) -> tuple[FloatArray | None, dict[str, FloatArray]]:
        if not isinstance(cache, ConvCache):
            raise TypeError(
                f"cache must come from this layer's forward, got {type(cache).__name__}"
            )
        if self.units is None:
            return self._block_backward(dout, cache, need_dx)
        if cache.mask is not None:
            return self.units.straight_through_backward(self, dout, cache, need_dx)
        return self.units.backward(self, dout, cache, need_dx)

    compact_kind = "indexed"

    def _forward_compact(
        self, x: FloatArray, mask: BoolArray | None, live: BoolArray | None, mode: Mode
    ) -> tuple[FloatArray, Any]:
        # The channel path (and a dense convolution) on the live channels as they are
        # stored, writing the kept filters only; the other paths on full activations.
        if mode.straight_through or (self.units is not None and not self.units.compact_block):
            return self._forward_via_full(x, mask, live, mode)
        rows = _kept(mask, self.n_out)
        everything_in = np.arange(x.shape[0], dtype=csr.INDEX_DTYPE)
        return self._block_forward(
            x, rows, everything_in, w_chans=_kept(live, self.n_in), compact_out=mask is not None
        )

    def _backward_compact(
        self, dout: FloatArray, cache: Any, need_dx: bool
    ) -> tuple[FloatArray | None, dict[str, FloatArray]]:
        if not isinstance(cache, ConvCache):
            return self._backward_via_full(dout, cache, need_dx)
        return self._block_backward(dout, cache, need_dx)

    def _chunks(
        self, x: FloatArray, budget: int, n_channels: int | None = None
    ) -> tuple[tuple[int, int], list[tuple[int, int]]]:
        # (H_out, W_out) and the batch chunks [n0, n1) whose columns (of n_channels
        # channels, default all) fit ``budget`` bytes.
        _, n_batch, height, width = x.shape
        n_channels = x.shape[0] if n_channels is None else n_channels
        ho, wo = self.output_size(height, width)
        kh, kw = self.kernel_size
        per_sample = max(n_channels * kh * kw * ho * wo * x.itemsize, 1)
        step = max(1, min(n_batch, budget // per_sample))
        return (ho, wo), [(n0, min(n0 + step, n_batch)) for n0 in range(0, n_batch, step)]

    def _keeps_cols(self, x: FloatArray, ho: int, wo: int, n_channels: int) -> bool:
        # Whether the whole batch's columns fit max_cols_bytes (kept for the backward).
        kh, kw = self.kernel_size
        return n_channels * kh * kw * x.shape[1] * ho * wo * x.itemsize <= self.max_cols_bytes

    def _is_identity_im2col(self) -> bool:
        return self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0)

    def _cols(
        self, x: FloatArray, chans: IndexArray, n0: int, n1: int, ho: int, wo: int
    ) -> FloatArray:
        # The im2col matrix of channels ``chans`` of samples [n0, n1) of x (C, N, H, W).
        if self._is_identity_im2col():
            part = x[:, n0:n1] if chans.shape[0] == x.shape[0] else x[chans, n0:n1]
            return np.ascontiguousarray(part).reshape(chans.shape[0], (n1 - n0) * ho * wo)
        kh, kw = self.kernel_size
        cols = np.empty((chans.shape[0] * kh * kw, (n1 - n0) * ho * wo), dtype=x.dtype)
        _kernels.im2col(x, chans, n0, kh, kw, *self.stride, *self.padding, ho, wo, cols)
        return cols

    def _col2im(
        self, dcols: FloatArray, chans: IndexArray, n0: int, ho: int, wo: int, dx: FloatArray
    ) -> None:
        # dx[chans, n0:n0+nb] += col2im(dcols)
        if self._is_identity_im2col():
            nb = dcols.shape[1] // (ho * wo)
            part = dcols.reshape(chans.shape[0], nb, ho, wo)
            if chans.shape[0] == dx.shape[0]:
                dx[:, n0 : n0 + nb] += part
            else:
                dx[chans, n0 : n0 + nb] += part
            return
        kh, kw = self.kernel_size
        _kernels.col2im(dcols, chans, n0, kh, kw, *self.stride, *self.padding, ho, wo, dx)

    def _block(self, weight: FloatArray, rows: IndexArray, chans: IndexArray) -> FloatArray:
        # The (kept_out, kept_in * kh * kw) block of kept filters and live channels.
        block = weight
        if rows.shape[0] != self.n_out:
            block = np.take(block, rows, axis=0)
        if chans.shape[0] != self.n_in:
            block = np.take(block, chans, axis=1)
        kh, kw = self.kernel_size
        return np.ascontiguousarray(block).reshape(rows.shape[0], chans.shape[0] * kh * kw)

    def _block_forward(
        self,
        x: FloatArray,
        rows: IndexArray,
        chans: IndexArray,
        weight: FloatArray | None = None,
        *,
        w_chans: IndexArray | None = None,
        compact_out: bool = False,
    ) -> tuple[FloatArray, ConvCache]:
        # BLAS on the kept block, chunk by chunk of the batch (BLOCK_CHUNK_BYTES of
        # columns, which stay in cache between im2col and the product), the chunks
        # run as tasks on the n_jobs threads: out[rows] = act(block @ cols + b[rows]).
        # im2col reads the live channels of x where they are, and every task writes
        # (zeros included) its own samples of the output. ``chans`` index the rows of
        # x; ``w_chans`` the weight's input channels of those rows (``chans`` if None,
        # x holding every channel); ``compact_out`` writes the kept filters only.
        weight = self.weight if weight is None else weight
        (ho, wo), chunks = self._chunks(x, BLOCK_CHUNK_BYTES, chans.shape[0])
        keep = self._keeps_cols(x, ho, wo, chans.shape[0])
        n_batch = x.shape[1]
        block = self._block(weight, rows, chans if w_chans is None else w_chans)
        kept_out = rows.shape[0]
        every_row = compact_out or kept_out == self.n_out
        n_rows = kept_out if compact_out else self.n_out
        out = np.empty((n_rows, n_batch, ho, wo), dtype=x.dtype)
        bias = None if self.bias is None else self.bias[rows, None]
        relu = self.activation == "relu"

        def task(chunk: tuple[int, int]) -> FloatArray | None:
            n0, n1 = chunk
            cols = self._cols(x, chans, n0, n1, ho, wo)
            pre = block @ cols
            if bias is not None:
                pre += bias
            if relu:
                np.maximum(pre, 0, out=pre)
            pre4 = pre.reshape(kept_out, n1 - n0, ho, wo)
            if every_row:
                out[:, n0:n1] = pre4
            else:
                out[:, n0:n1] = 0
                out[rows, n0:n1] = pre4
            return cols if keep else None

        cols = [c for c in run_tasks(task, chunks) if c is not None]
        return out, ConvCache(
            x, cols if keep else None, out, None, rows, chans, block, w_chans=w_chans
        )

    def _block_backward(
        self, dout: FloatArray, cache: ConvCache, need_dx: bool
    ) -> tuple[FloatArray | None, dict[str, FloatArray]]:
        # Per chunk: the output gradient of the kept filters, the chunk's share of the
        # weight gradient (summed over the chunks in order, so the bits do not depend on
        # the thread count) and its input gradient (col2im into its own samples).
        rows, chans, x, block = cache.rows, cache.chans, cache.x, cache.block
        if not (block is not None):
            raise RuntimeError("internal error: a block cache holds its block")
        (ho, wo), chunks = self._chunks(x, BLOCK_CHUNK_BYTES, chans.shape[0])
        kept_out = rows.shape[0]
        every_row = kept_out == cache.out.shape[0]  # every filter, or a compact output
        relu = self.activation == "relu"
        with_bias = self.bias is not None
        dx = np.empty(x.shape, dtype=x.dtype) if need_dx else None

        def task(item: tuple[int, tuple[int, int]]) -> tuple[FloatArray, FloatArray | None]:
            i, (n0, n1) = item
            cols = cache.cols[i] if cache.cols is not None else self._cols(x, chans, n0, n1, ho, wo)
            width = (n1 - n0) * ho * wo
            # (A new array: dout belongs to the caller, e.g. both branches of a block.)
            if every_row:
                dpre = dout[:, n0:n1].reshape(kept_out, width)
            else:
                dpre = dout[rows, n0:n1].reshape(kept_out, width)
            if relu:
                out = cache.out[:, n0:n1] if every_row else cache.out[rows, n0:n1]
                dpre = dpre * (out.reshape(kept_out, width) > 0)  # out > 0 where pre > 0
            else:
                dpre = np.ascontiguousarray(dpre)
            dblock = (cols @ dpre.T).T  # faster than dpre @ cols.T in OpenBLAS here
            if dx is not None:
                dx[:, n0:n1] = 0  # dead input channels get 0, live ones the col2im sums
                self._col2im(block.T @ dpre, chans, n0, ho, wo, dx)
            return dblock, (dpre.sum(axis=1) if with_bias else None)  # the bias gradient

        parts = run_tasks(task, list(enumerate(chunks)))
        dblock = parts[0][0].copy()
        for part_dblock, _ in parts[1:]:
            dblock += part_dblock
        grads: dict[str, FloatArray] = {}
        dweight = np.zeros(self.weight.shape, dtype=self.weight.dtype)
        kh, kw = self.kernel_size
        w_chans = chans if cache.w_chans is None else cache.w_chans
        dweight[np.ix_(rows, w_chans)] = dblock.reshape(kept_out, chans.shape[0], kh, kw)
        grads["weight"] = dweight
        if with_bias:
            sums = [part_sum for _, part_sum in parts if part_sum is not None]
            dpre_sum = sums[0].copy()
            for part_sum in sums[1:]:
                dpre_sum += part_sum
            dbias = np.zeros(self.n_out, dtype=self.weight.dtype)
            dbias[rows] = dpre_sum
            grads["bias"] = dbias
        return dx, grads

    def _csr_forward(
        self, x: FloatArray, mask: BoolArray | None, live: BoolArray | None
    ) -> tuple[FloatArray, ConvCache]:
        # The masked CSR product with the im2col columns as the batch.
        indptr, indices = csr.full_pattern((self.n_out, int(self.weight[0].size)))
        kh, kw = self.kernel_size
        live_cols = None if live is None else np.repeat(live, kh * kw)
        shape = (self.n_out, int(self.weight[0].size))
        active = csr._select_active(
            indptr, indices, self.weight.reshape(-1), shape, mask, None, live_cols
        )
        bias = self.bias if self.bias is not None else np.zeros(self.n_out, self.dtype)
        (ho, wo), chunks = self._chunks(x, self.max_cols_bytes)
        n_batch = x.shape[1]
        relu = self.activation == "relu"
        everything_in = _kept(None, self.n_in)
        out3 = np.empty((self.n_out, n_batch, ho * wo), dtype=x.dtype)
        cols = None
        for n0, n1 in chunks:
            cols = self._cols(x, everything_in, n0, n1, ho, wo)
            part = csr._masked_matmul(active, cols, bias, relu)
            out3[:, n0:n1] = part.reshape(self.n_out, n1 - n0, ho * wo)
            del part
            if len(chunks) > 1:
                del cols  # one chunk's columns at a time
                cols = None
        out = out3.reshape(self.n_out, n_batch, ho, wo)
        everything = np.arange(self.n_out, dtype=csr.INDEX_DTYPE)
        cache_cols = [cols] if cols is not None else None
        return out, ConvCache(
            x, cache_cols, out, None, everything, _kept(None, self.n_in), None, active
        )

    def _csr_backward(
        self, dout: FloatArray, cache: ConvCache, need_dx: bool
    ) -> tuple[FloatArray | None, dict[str, FloatArray]]:
        active, x = cache.active, cache.x
        if not (active is not None):
            raise RuntimeError("internal error: a weight-path cache holds its active pattern")
        (ho, wo), chunks = self._chunks(x, self.max_cols_bytes)
        relu = self.activation == "relu"
        dout3 = dout.reshape(self.n_out, x.shape[1], ho * wo)
        out3 = cache.out.reshape(dout3.shape)
        dweight = np.zeros(self.weight.size, dtype=self.dtype)
        dbias = np.zeros(self.n_out, dtype=self.dtype)
        dx = np.zeros(x.shape, dtype=x.dtype) if need_dx else None
        for n0, n1 in chunks:
            cols = (
                cache.cols[0]
                if cache.cols is not None
                else self._cols(x, cache.chans, n0, n1, ho, wo)
            )
            d_part = np.ascontiguousarray(dout3[:, n0:n1]).reshape(self.n_out, -1)
            o_part = np.ascontiguousarray(out3[:, n0:n1]).reshape(self.n_out, -1)
            dcols, dw, db = csr._masked_matmul_backward(active, cols, d_part, o_part, relu, need_dx)
            dweight += dw
            dbias += db
            if dx is not None and dcols is not None:
                self._col2im(dcols, cache.chans, n0, ho, wo, dx)
            del cols, dcols, dw, db, d_part, o_part  # one chunk's buffers at a time
        grads = {"weight": dweight.reshape(self.weight.shape)}
        if self.bias is not None:
            grads["bias"] = dbias
        return dx, grads

    # ------------------------------------------------------------------ storage

    def stored_pattern(self) -> BoolArray:
        """Dense boolean ``(C_out, C_in * kh * kw)`` map of the stored weights: all."""
        return np.ones((self.n_out, int(self.weight[0].size)), dtype=bool)

    def dense(self, name: str, values: npt.ArrayLike, fill: Any = 0) -> np.ndarray:
        """Parameter values in their own (PyTorch) layout."""
        return np.array(values, copy=True)

    def config(self) -> dict[str, Any]:
        """JSON-ready settings that, with :meth:`arrays`, rebuild the layer."""
        return {
            "stride": list(self.stride),
            "padding": list(self.padding),
            "granularity": self.granularity,
            "activation": self.activation,
            "max_cols_bytes": self.max_cols_bytes,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], arrays: dict[str, np.ndarray]) -> Conv2d:
        """Rebuild the layer from :meth:`config` and :meth:`arrays`."""
        return cls(
            arrays["weight"],
            arrays.get("bias"),
            stride=tuple(config["stride"]),
            padding=tuple(config["padding"]),
            granularity=config["granularity"],
            activation=config["activation"],
            max_cols_bytes=config["max_cols_bytes"],
        )

    def __repr__(self) -> str:
        return (
            f"Conv2d(n_in={self.n_in}, n_out={self.n_out}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, bias={self.bias is not None}, "
            f"granularity={self.granularity!r}, activation={self.activation!r}, "
            f"dtype={self.dtype})"
        )
