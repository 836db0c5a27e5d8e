"""Linear layers: :class:`SparseLinear` (a CSR pattern computed with a mask) and :class:`Linear`.

Weights are ``(n_out, n_in)`` as in PyTorch; activations are feature-major,
``(n_in, n_batch)``, so ``out = W @ x`` as in the math. A :class:`SparseLinear` layer
delegates everything that depends on what one mask bit keeps to its unit map:
:class:`WeightUnits` (one bit per stored weight) or :class:`NeuronUnits` (one bit per
output unit, its whole row and bias). :data:`GRANULARITIES` maps the granularity
names to them.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from ..._typing import BoolArray, FloatArray, IndexArray, RNGLike
from ..._validation import check_array, check_choice, check_density, check_rng, check_same_dtype
from .. import csr
from ..kernels import csr as _kernels
from .base import TRAIN, Layer, Mode, UnitMap

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = [
    "SparseLinear",
    "SparseLinearCache",
    "Linear",
    "LinearCache",
    "WeightUnits",
    "NeuronUnits",
    "GRANULARITIES",
]

INITS = ("uniform", "kaiming")
"""Weight initialisations of :meth:`SparseLinear.random` and :meth:`Linear.random`."""


def _init_uniform(
    shape: int | tuple[int, int], fan_in: float, dtype: npt.DTypeLike, rng: np.random.Generator
) -> FloatArray:
    # PyTorch's nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = 1.0 / np.sqrt(fan_in) if fan_in > 0 else 0.0
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


def _init_weight(
    shape: int | tuple[int, int],
    fan_in: float,
    init: str,
    dtype: npt.DTypeLike,
    rng: np.random.Generator,
) -> FloatArray:
    # "uniform": PyTorch's nn.Linear default; "kaiming": He normal, std sqrt(2 / fan_in).
    check_choice(init, "init", INITS)
    if init == "uniform":
        return _init_uniform(shape, fan_in, dtype, rng)
    std = np.sqrt(2.0 / fan_in) if fan_in > 0 else 0.0
    return rng.normal(0.0, std, size=shape).astype(dtype)


def _check_fan_in_scale(fan_in_scale: float) -> None:
    if not 0 < fan_in_scale <= 1:
        raise ValueError(f"fan_in_scale must be in (0, 1], got {fan_in_scale}")


class WeightUnits(UnitMap):
    """One mask bit per stored weight of a :class:`SparseLinear` layer.

    The mask selects stored entries; a row whose entries are all dropped still
    outputs ``act(bias)``, so no output is known to be zero.
    """

    granularity = "weight"
    zeroes_outputs = False
    thins_fan_in = True

    def __init__(self, layer: SparseLinear) -> None:
        self.layer = layer

    @property
    def n_units(self) -> int:
        """Number of mask bits."""
        return self.layer.nnz

    @property
    def n_units_full(self) -> int:
        """Number of units of the layer with every entry stored."""
        return self.layer.shape[0] * self.layer.shape[1]

    def stored_per_unit(self) -> IndexArray:
        """Number of stored weights each unit owns, shape ``(n_units,)``."""
        return np.ones(self.n_units, dtype=np.int64)

    def stored_by(self, units: BoolArray) -> int:
        """Number of stored weights of the units where ``units`` is True: one each."""
        return int(np.count_nonzero(units))

    def compaction(self, dead: BoolArray) -> tuple[BoolArray, dict[str, BoolArray]]:
        """Units and entries kept when ``dead`` units go (see :meth:`UnitMap.compaction`)."""
        keep = ~dead
        return keep, {"weight": keep}

    def dense(self, values: npt.ArrayLike, fill: Any = 0) -> np.ndarray:
        """Per-unit values in the layer's dense layout (see :meth:`UnitMap.dense`)."""
        return self.layer.dense("weight", values, fill)

    def masks(self, mask: BoolArray | None) -> tuple[BoolArray | None, BoolArray | None]:
        """``(entry_mask, row_mask)`` for :func:`cpusparse.engine.csr.select_active`."""
        return mask, None

    def live_outputs(self, mask: BoolArray) -> BoolArray | None:
        """Output features that may be nonzero (see :meth:`Layer.live_outputs`)."""
        return None

    def forward(
        self, layer: SparseLinear, x: FloatArray, mask: BoolArray | None, live: BoolArray | None
    ) -> tuple[FloatArray, SparseLinearCache]:
        """The masked product on the active entries (the CSR kernels)."""
        return layer._csr_forward(x, mask, live)

    def backward(
        self, layer: SparseLinear, dout: FloatArray, cache: Any, need_dx: bool
    ) -> tuple[FloatArray | None, dict[str, FloatArray]]:
        """Backward of :meth:`forward`: SDDMM at the active entries, transposed product."""
        if not isinstance(cache, SparseLinearCache):
            raise TypeError(
                f"cache must come from this layer's forward, got {type(cache).__name__}"
            )
        return layer._csr_backward(dout, cache, need_dx)

    def straight_through_forward(
        self, layer: SparseLinear, x: FloatArray, mask: BoolArray
    ) -> tuple[FloatArray, SparseLinearCache]:
        """Forward pass over every stored entry, the mask applied multiplicatively."""
        # out = f((W * m) @ x + b) over every stored entry.
        data = layer.weight * mask
        active = layer._everything(data)
        out = csr._masked_matmul(active, x, layer.bias, layer.activation == "relu")
        return out, SparseLinearCache(x, out, active, mask, None)

    def straight_through_backward(
        self, layer: SparseLinear, dout: FloatArray, cache: SparseLinearCache, need_dx: bool
    ) -> tuple[FloatArray | None, dict[str, FloatArray]]:
        """Backward pass of :meth:`straight_through_forward`, with ``grads["mask"]``."""
        # dL/dW_eff by the chain rule at every stored entry; dL/dm = dL/dW_eff * W.
        if not (cache.mask is not None):
            raise RuntimeError("internal error: a straight-through cache holds its mask")
        relu = layer.activation == "relu"
        dx, deff, dbias = csr._masked_matmul_backward(
            cache.active, cache.x, dout, cache.out, relu, need_dx
        )
        return dx, {"weight": deff * cache.mask, "bias": dbias, "mask": deff * layer.weight}


class NeuronUnits(UnitMap):
    """One mask bit per output unit of a :class:`SparseLinear` layer.

    ``out = m * act(W @ x + b)``: a dropped unit outputs exactly 0, bias included, so
    the next layer skips its column.
    """

    granularity = "neuron"
    zeroes_outputs = True
    thins_fan_in = False

    def __init__(self, layer: SparseLinear) -> None:
        self.layer = layer

    @property
    def n_units(self) -> int:
        """Number of mask bits."""
        return self.layer.shape[0]

    @property
    def n_units_full(self) -> int:
        """Number of units of the layer with every entry stored."""
        return self.layer.shape[0]

    def stored_per_unit(self) -> IndexArray:
        """Number of stored weights each unit owns, shape ``(n_units,)``."""
        return np.diff(self.layer.indptr)

    def compaction(self, dead: BoolArray) -> tuple[BoolArray, dict[str, BoolArray]]:
        """Units and entries kept when ``dead`` units go (see :meth:`UnitMap.compaction`)."""
        # The units stay (their number fixes the next layer's input size); the stored
        # weights of dead rows go.
        keep = np.repeat(~dead, np.diff(self.layer.indptr))
        return np.ones(dead.shape[0], dtype=bool), {"weight": keep}

    def masks(self, mask: BoolArray | None) -> tuple[BoolArray | None, BoolArray | None]:
        """``(entry_mask, row_mask)`` for :func:`cpusparse.engine.csr.select_active`."""
        return None, mask

    def live_outputs(self, mask: BoolArray) -> BoolArray | None:
        """Output features that may be nonzero (see :meth:`Layer.live_outputs`)."""
        return mask

    def forward(
        self, layer: SparseLinear, x: FloatArray, mask: BoolArray | None, live: BoolArray | None
    ) -> tuple[FloatArray, BlockCache]:
        """The kept sub-network as a dense product: BLAS on the kept block.

        The kept rows (``mask``) and the live input columns (``live``: inputs the
        previous layer did not drop) are gathered into a dense block, entries that are
        not stored as 0, and multiplied with the live rows of ``x`` by BLAS
        (``numpy.matmul``); the cost is ``kept_out * kept_in * n_batch`` at BLAS speed.
        Dropped rows output exactly 0.
        """
        rows = _kept(mask, layer.n_out)
        cols = _kept(live, layer.n_in)
        row_pos = layer._row_positions()
        if row_pos is not None:  # every stored row full: a dense row-major view
            col_pos = cols  # (unused by the backward of this case)
            block = np.empty((rows.shape[0], cols.shape[0]), dtype=layer.dtype)
            w = layer.weight.reshape(-1, layer.n_in)
            _kernels.take_block(w, row_pos[rows], cols, block)
        else:
            col_pos = np.full(layer.n_in, -1, dtype=csr.INDEX_DTYPE)
            col_pos[cols] = np.arange(cols.shape[0])
            block = np.zeros((rows.shape[0], cols.shape[0]), dtype=layer.dtype)
            _kernels.gather_block(layer.indptr, layer.indices, layer.weight, rows, col_pos, block)
        x_kept = x if cols.shape[0] == layer.n_in else x[cols]
        pre = block @ x_kept
        pre += layer.bias[rows, None]
        if layer.activation == "relu":
            np.maximum(pre, 0, out=pre)
        out = np.zeros((layer.n_out, x.shape[1]), dtype=layer.dtype)
        out[rows] = pre
        return out, BlockCache(x_kept, out, pre, rows, cols, col_pos, block)

    def backward(
        self, layer: SparseLinear, dout: FloatArray, cache: Any, need_dx: bool
    ) -> tuple[FloatArray | None, dict[str, FloatArray]]:
        """Backward of :meth:`forward`, on the same block (BLAS for both products)."""
        if not isinstance(cache, BlockCache):
            raise TypeError(
                f"cache must come from this layer's forward, got {type(cache).__name__}"
            )
        dpre = dout[cache.rows]
        if layer.activation == "relu":
            dpre *= cache.pre > 0
        dbias = np.zeros(layer.n_out, dtype=layer.dtype)
        dbias[cache.rows] = dpre.sum(axis=1)
        dblock = dpre @ cache.x.T
        dweight = np.zeros(layer.nnz, dtype=layer.dtype)
        row_pos = layer._row_positions()
        if row_pos is not None:
            dw = dweight.reshape(-1, layer.n_in)
            _kernels.put_block(dblock, row_pos[cache.rows], cache.cols, dw)
        else:
            _kernels.scatter_block(
                layer.indptr, layer.indices, cache.rows, cache.col_pos, dblock, dweight
            )
        dx = None
        if need_dx:
            dx = np.zeros((layer.n_in, dout.shape[1]), dtype=layer.dtype)
            dx[cache.cols] = cache.block.T @ dpre
        return dx, {"weight": dweight, "bias": dbias}

    def straight_through_forward(
        self, layer: SparseLinear, x: FloatArray, mask: BoolArray
    ) -> tuple[FloatArray, SparseLinearCache]:
        """Forward pass over every stored entry, the mask applied multiplicatively."""
        # out = m * f(W @ x + b): the unmasked output is kept for dL/dm.
        active = layer._everything(layer.weight)
        unmasked = csr._masked_matmul(active, x, layer.bias, layer.activation == "relu")
        out = unmasked * mask[:, None]
        return out, SparseLinearCache(x, out, active, mask, unmasked)

    def straight_through_backward(
        self, layer: SparseLinear, dout: FloatArray, cache: SparseLinearCache, need_dx: bool
    ) -> tuple[FloatArray | None, dict[str, FloatArray]]:
        """Backward pass of :meth:`straight_through_forward`, with ``grads["mask"]``."""
        # A straight-through cache holds the mask and the output before it.
        if not (cache.mask is not None and cache.unmasked is not None):
            raise RuntimeError(
                "internal error: cache.mask is not None and cache.unmasked is not None"
            )
        relu = layer.activation == "relu"
        dmask = np.einsum("ob,ob->o", dout, cache.unmasked)
        dunmasked = np.ascontiguousarray(dout * cache.mask[:, None])
        dx, dweight, dbias = csr._masked_matmul_backward(
            cache.active, cache.x, dunmasked, cache.unmasked, relu, need_dx
        )
        return dx, {"weight": dweight, "bias": dbias, "mask": dmask}


GRANULARITIES: dict[str, type[WeightUnits] | type[NeuronUnits]] = {
    "weight": WeightUnits,
    "neuron": NeuronUnits,
}
"""The unit maps of :class:`SparseLinear` by granularity name."""


def _kept(mask: BoolArray | None, n: int) -> IndexArray:
    # Indices where mask is True (all of range(n) without a mask).
    if mask is None:
        return np.arange(n, dtype=csr.INDEX_DTYPE)
    return np.flatnonzero(mask).astype(csr.INDEX_DTYPE, copy=False)


class BlockCache(NamedTuple):
    """What the block path of a neuron-granularity :class:`SparseLinear` keeps.

    ``x`` is the input's live rows, ``out`` the layer's output, ``pre`` its kept rows,
    ``block`` the dense ``(kept_out, kept_in)`` weight block; ``rows``, ``cols`` and
    ``col_pos`` say where they sit in the layer.
    """

    x: FloatArray
    out: FloatArray
    pre: FloatArray
    rows: IndexArray
    cols: IndexArray
    col_pos: IndexArray
    block: FloatArray


class SparseLinearCache(NamedTuple):
    """What :meth:`SparseLinear.backward` needs from the forward pass.

    ``mask`` and ``unmasked`` are set only by a straight-through pass: the mask and,
    for neuron granularity, the output before the mask was applied.
    """

    x: FloatArray
    out: FloatArray
    active: csr.ActivePattern
    mask: BoolArray | None = None
    unmasked: FloatArray | None = None


class SparseLinear(Layer):
    """A linear layer whose weight is a CSR pattern, computed with a sampled mask.

    ``out = act((W * m) @ x + b)`` for weight granularity and
    ``out = m * act(W @ x + b)`` (a dropped unit outputs exactly 0) for neuron
    granularity. Forward and backward touch only the active entries: with weight
    granularity through the CSR kernels (fixed-order sums, bit-identical for any number
    of threads); with neuron granularity the kept sub-network is a narrower dense
    layer, so the kept rows and live input columns are gathered into a dense block
    and multiplied by BLAS (on one thread inside a fit, so the results do not depend
    on ``n_jobs``; a different BLAS or CPU may change the last bits; see
    :func:`cpusparse._threads.numba_threads`).

    Parameters
    ----------
    indptr, indices : ndarray
        Canonical CSR pattern of the stored weights, shape ``(n_out, n_in)``.
    weight : ndarray of shape (nnz,)
        Values of the stored weights, aligned with ``indices``.
    bias : ndarray of shape (n_out,)
        Dense bias, same dtype as ``weight``.
    n_in : int
        Number of inputs.
    granularity : {"weight", "neuron"}, default="weight"
        What one mask bit keeps: one stored weight, or one output unit with its
        whole row and bias (see :data:`GRANULARITIES`).
    activation : {None, "relu"}, default=None
        Activation fused into the product.

    Attributes
    ----------
    units : WeightUnits or NeuronUnits
        What the mask bits keep; ``units.n_units`` is ``nnz`` (weight) or ``n_out``
        (neuron).

    Examples
    --------
    >>> layer = SparseLinear.random(3, 2, rng=0, dtype=np.float64)
    >>> x = np.ones((3, 4))
    >>> out, cache = layer.forward(x, mask=np.array([True, False, True, True, False, True]))
    >>> dx, grads = layer.backward(np.ones_like(out), cache)
    >>> grads["weight"].shape, bool(grads["weight"][1] == 0)
    ((6,), True)
    """

    units: WeightUnits | NeuronUnits

    def __init__(
        self,
        indptr: npt.NDArray[np.integer] | Sequence[int],
        indices: npt.ArrayLike,
        weight: npt.ArrayLike,
        bias: npt.ArrayLike,
        n_in: int,
        *,
        granularity: str = "weight",
        activation: str | None = None,
    ) -> None:
        n_out = len(indptr) - 1
        self.indptr, self.indices = csr.check_pattern(indptr, indices, (n_out, n_in))
        self.weight = check_array(weight, "weight", ndim=1, shape=self.indices.shape, finite=True)
        self.bias = check_array(bias, "bias", ndim=1, shape=(n_out,), finite=True)
        check_same_dtype(("weight", self.weight), ("bias", self.bias))
        self.shape = (int(n_out), int(n_in))
        check_choice(granularity, "granularity", tuple(GRANULARITIES))
        self.units = GRANULARITIES[granularity](self)
        self.activation = check_choice(activation, "activation", (None, "relu"))
        self._row_pos = self._dense_rows(self.indptr, int(n_in))

    @classmethod
    def random(
        cls,
        n_in: int,
        n_out: int,
        *,
        stored_density: float = 1.0,
        granularity: str = "weight",
        activation: str | None = None,
        init: str = "uniform",
        fan_in_scale: float = 1.0,
        dtype: npt.DTypeLike = np.float32,
        rng: RNGLike = None,
    ) -> SparseLinear:
        r"""A layer with a random pattern and random weights.

        Parameters
        ----------
        n_in, n_out : int
            Layer size.
        stored_density : float in (0, 1], default=1.0
            Fraction of the ``n_out * n_in`` entries stored (not the kept fraction
            the masks sample); 1.0 stores them all, the starting point of training,
            where masks do the sparsifying.
        granularity, activation
            As in the class.
        init : {"uniform", "kaiming"}, default="uniform"
            Weight distribution: PyTorch's ``nn.Linear`` default
            :math:`U(\pm 1/\sqrt{f})`, or He's normal :math:`N(0, 2/f)`, with
            :math:`f` the effective fan-in. The bias is always
            :math:`U(\pm 1/\sqrt{n_{in}})`.
        fan_in_scale : float in (0, 1], default=1.0
            Expected fraction of the inputs that a unit sees, so that
            :math:`f = n_{in} \times` ``fan_in_scale``: with masks at density
            :math:`d`, ``d`` keeps the scale of the activations as if dense.
        dtype : {numpy.float32, numpy.float64}
        rng : None, int or numpy.random.Generator
            Draws, in order: the pattern (if ``stored_density < 1``), the weights, the bias.

        Returns
        -------
        SparseLinear
        """
        rng = check_rng(rng)
        stored_density = check_density(stored_density, "stored_density")
        if stored_density == 1.0:
            indptr, indices = csr.full_pattern((n_out, n_in))
        else:
            indptr, indices = csr.random_pattern((n_out, n_in), stored_density, rng=rng)
        _check_fan_in_scale(fan_in_scale)
        weight = _init_weight(indices.shape[0], n_in * fan_in_scale, init, dtype, rng)
        bias = _init_uniform(n_out, n_in, dtype, rng)
        return cls(
            indptr, indices, weight, bias, n_in, granularity=granularity, activation=activation
        )

    @property
    def granularity(self) -> str:
        """Name of the unit map's granularity."""
        return self.units.granularity

    @property
    def n_in(self) -> int:
        """Number of input features."""
        return self.shape[1]

    @property
    def n_out(self) -> int:
        """Number of output features."""
        return self.shape[0]

    @property
    def nnz(self) -> int:
        """Number of stored weights."""
        return int(self.indices.shape[0])

    @property
    def n_units(self) -> int:
        """Number of prunable units (mask bits)."""
        return self.units.n_units

    @property
    def dtype(self) -> np.dtype:
        """Floating-point type of the parameters."""
        return self.weight.dtype

    def params(self) -> dict[str, FloatArray]:
        """The parameter arrays, by name (the same objects, not copies)."""
        return {"weight": self.weight, "bias": self.bias}

    def live_outputs(self, mask: BoolArray | None, live: BoolArray | None) -> BoolArray | None:
        """Outputs that may be nonzero: the kept neurons (neuron granularity), else all."""
        return None if mask is None else self.units.live_outputs(mask)

    def n_active(
        self, mask: BoolArray | None = None, live: BoolArray | None = None, mode: Mode = TRAIN
    ) -> int:
        """Stored entries kept by ``mask`` whose input is live (every one, straight-through)."""
        if mode.straight_through:
            return self.nnz
        keep = np.ones(self.nnz, dtype=bool)
        entry_mask, row_mask = self.units.masks(mask)
        if entry_mask is not None:
            keep &= entry_mask
        if row_mask is not None:
            keep &= row_mask[self._rows()]
        if live is not None:
            keep &= live[self.indices]
        return int(keep.sum())

    def to_dense(self, mask: npt.ArrayLike | None = None) -> FloatArray:
        """The dense ``(n_out, n_in)`` weight with the mask applied."""
        entry_mask, row_mask = self.units.masks(self._check_mask(mask))
        return csr.to_dense(
            self.indptr,
            self.indices,
            self.weight,
            self.shape,
            entry_mask=entry_mask,
            row_mask=row_mask,
        )

    def _forward(
        self,
        x: FloatArray,
        mask: BoolArray | None = None,
        live: BoolArray | None = None,
        mode: Mode = TRAIN,
    ) -> tuple[FloatArray, SparseLinearCache | BlockCache]:
        if mode.straight_through:
            if mask is None:
                mask = np.ones(self.units.n_units, dtype=bool)
            return self.units.straight_through_forward(self, x, mask)
        return self.units.forward(self, x, mask, live)

    def _backward(
        self, dout: FloatArray, cache: SparseLinearCache | BlockCache, need_dx: bool = True
    ) -> tuple[FloatArray | None, dict[str, FloatArray]]:
        if isinstance(cache, SparseLinearCache) and cache.mask is not None:
            return self.units.straight_through_backward(self, dout, cache, need_dx)
        return self.units.backward(self, dout, cache, need_dx)

    def _csr_forward(
        self, x: FloatArray, mask: BoolArray | None, live: BoolArray | None
    ) -> tuple[FloatArray, SparseLinearCache]:
        # The masked CSR product on the active entries.
        entry_mask, row_mask = self.units.masks(mask)
        active = csr._select_active(
            self.indptr, self.indices, self.weight, self.shape, entry_mask, row_mask, live
        )
        out = csr._masked_matmul(active, x, self.bias, self.activation == "relu")
        return out, SparseLinearCache(x, out, active)

    def _csr_backward(
        self, dout: FloatArray, cache: SparseLinearCache, need_dx: bool
    ) -> tuple[FloatArray | None, dict[str, FloatArray]]:
        dx, dweight, dbias = csr._masked_matmul_backward(
            cache.active, cache.x, dout, cache.out, self.activation == "relu", need_dx
        )
        return dx, {"weight": dweight, "bias": dbias}

    def _row_positions(self) -> IndexArray | None:
        """Each row's place among the stored rows (-1: empty), if all stored rows are full.

        None otherwise. When every stored row is full, the stored values are a dense
        ``(n_stored_rows, n_in)`` row-major matrix (the layers of
        :func:`~cpusparse.models.mlp`, before and after compaction, which empties whole
        rows at neuron granularity).
        """
        return self._row_pos

    @staticmethod
    def _dense_rows(indptr: IndexArray, n_in: int) -> IndexArray | None:
        # See _row_positions: computed once, when the layer is made (its pattern never
        # changes; compaction builds a new layer).
        counts = np.diff(indptr)
        if not ((counts == 0) | (counts == n_in)).all():
            return None
        pos = np.cumsum(counts > 0, dtype=csr.INDEX_DTYPE) - 1
        pos[counts == 0] = -1
        return pos

    def _everything(self, data: FloatArray) -> csr.ActivePattern:
        # The active pattern of every stored entry, with values ``data``.
        everything = np.arange(self.nnz, dtype=csr.INDEX_DTYPE)
        return csr.ActivePattern(
            self.indptr, self.indices, data, everything, self.shape, self.nnz, None
        )

    def stored_pattern(self) -> BoolArray:
        """Dense boolean ``(n_out, n_in)`` map of the stored weights."""
        pattern = np.zeros(self.shape, dtype=bool)
        pattern[self._rows(), self.indices] = True
        return pattern

    def _rows(self) -> npt.NDArray[np.int_]:
        return np.repeat(np.arange(self.shape[0]), np.diff(self.indptr))

    def dense(self, name: str, values: npt.ArrayLike, fill: Any = 0) -> np.ndarray:
        """Per-entry ``(..., nnz)`` weight values as dense ``(..., n_out, n_in)``."""
        values = np.asarray(values)
        if name != "weight":
            return values.copy()
        out = np.full(values.shape[:-1] + self.shape, fill, dtype=values.dtype)
        out[..., self._rows(), self.indices] = values
        return out

    def compact(self, kept_entries: dict[str, BoolArray]) -> SparseLinear:
        """A new layer without the stored entries where ``kept_entries["weight"]`` is False.

        Arrays aligned with the old stored entries (scores, optimizer state) are
        compacted with ``array[keep]``.
        """
        keep = kept_entries["weight"]
        indptr, indices = csr.compact_pattern(self.indptr, self.indices, keep)
        return SparseLinear(
            indptr,
            indices,
            self.weight[keep],
            self.bias.copy(),
            self.shape[1],
            granularity=self.granularity,
            activation=self.activation,
        )

    def config(self) -> dict[str, Any]:
        """JSON-ready settings that, with :meth:`arrays`, rebuild the layer."""
        return {
            "shape": list(self.shape),
            "granularity": self.granularity,
            "activation": self.activation,
        }

    def arrays(self) -> dict[str, np.ndarray]:
        """The CSR pattern and the parameters."""
        return {"indptr": self.indptr, "indices": self.indices, **self.params()}

    @classmethod
    def from_config(cls, config: dict[str, Any], arrays: dict[str, np.ndarray]) -> SparseLinear:
        """Rebuild the layer from :meth:`config` and :meth:`arrays`."""
        return cls(
            arrays["indptr"],
            arrays["indices"],
            arrays["weight"],
            arrays["bias"],
            config["shape"][1],
            granularity=config["granularity"],
            activation=config["activation"],
        )

    def __repr__(self) -> str:
        return (
            f"SparseLinear(n_in={self.shape[1]}, n_out={self.shape[0]}, nnz={self.nnz}, "
            f"granularity={self.granularity!r}, activation={self.activation!r}, "
            f"dtype={self.dtype})"
        )


class LinearCache(NamedTuple):
    """What :meth:`Linear.backward` needs from the forward pass.

    With some inputs known zero, ``x`` holds the live rows ``cols`` only and ``weight``
    the live columns of the weight; else ``cols`` and ``weight`` are None.
    """

    x: FloatArray
    out: FloatArray
    cols: IndexArray | None = None
    weight: FloatArray | None = None


class Linear(Layer):
    """A dense linear layer, ``out = act(W @ x + b)`` (the classifier by default).

    Parameters
    ----------
    weight : ndarray of shape (n_out, n_in)
    bias : ndarray of shape (n_out,)
    activation : {None, "relu"}, default=None

    Examples
    --------
    >>> layer = Linear.random(3, 2, rng=0, dtype=np.float64)
    >>> out, cache = layer.forward(np.ones((3, 5)))
    >>> dx, grads = layer.backward(np.ones_like(out), cache)
    >>> dx.shape, grads["weight"].shape
    ((3, 5), (2, 3))
    """

    def __init__(
        self, weight: npt.ArrayLike, bias: npt.ArrayLike, *, activation: str | None = None
    ) -> None:
        self.weight = check_array(weight, "weight", ndim=2, finite=True)
        self.bias = check_array(bias, "bias", ndim=1, shape=(self.weight.shape[0],), finite=True)
        check_same_dtype(("weight", self.weight), ("bias", self.bias))
        self.shape = self.weight.shape
        self.activation = check_choice(activation, "activation", (None, "relu"))

    @classmethod
    def random(
        cls,
        n_in: int,
        n_out: int,
        *,
        activation: str | None = None,
        init: str = "uniform",
        fan_in_scale: float = 1.0,
        dtype: npt.DTypeLike = np.float32,
        rng: RNGLike = None,
    ) -> Linear:
        """A layer with random weights, then bias (see :meth:`SparseLinear.random`)."""
        rng = check_rng(rng)
        _check_fan_in_scale(fan_in_scale)
        weight = _init_weight((n_out, n_in), n_in * fan_in_scale, init, dtype, rng)
        bias = _init_uniform(n_out, n_in, dtype, rng)
        return cls(weight, bias, activation=activation)

    @property
    def n_in(self) -> int:
        """Number of input features."""
        return self.shape[1]

    @property
    def n_out(self) -> int:
        """Number of output features."""
        return self.shape[0]

    @property
    def dtype(self) -> np.dtype:
        """Floating-point type of the parameters."""
        return self.weight.dtype

    def params(self) -> dict[str, FloatArray]:
        """The parameter arrays, by name (the same objects, not copies)."""
        return {"weight": self.weight, "bias": self.bias}

    def _forward(
        self,
        x: FloatArray,
        mask: BoolArray | None = None,
        live: BoolArray | None = None,
        mode: Mode = TRAIN,
    ) -> tuple[FloatArray, LinearCache]:
        # Inputs outside live are 0: the product runs on the live columns only.
        cols = None if live is None or live.all() else np.flatnonzero(live)
        return self._product(x if cols is None else np.take(x, cols, axis=0), cols)

    compact_kind = "indexed"

    def _forward_compact(
        self, x: FloatArray, mask: BoolArray | None, live: BoolArray | None, mode: Mode
    ) -> tuple[FloatArray, LinearCache]:
        # x holds the live rows already.
        return self._product(x, None if live is None or live.all() else np.flatnonzero(live))

    def _product(self, x: FloatArray, cols: IndexArray | None) -> tuple[FloatArray, LinearCache]:
        # act(W[:, cols] @ x + b) for the rows ``cols`` of the input (all if None).
        weight = self.weight if cols is None else np.take(self.weight, cols, axis=1)
        out = weight @ x
        out += self.bias[:, None]
        if self.activation == "relu":
            np.maximum(out, 0, out=out)
        return out, LinearCache(x, out, cols, weight)

    def _backward(
        self, dout: FloatArray, cache: LinearCache, need_dx: bool = True
    ) -> tuple[FloatArray | None, dict[str, FloatArray]]:
        return self._backward_rows(dout, cache, need_dx, compact=False)

    def _backward_compact(
        self, dout: FloatArray, cache: LinearCache, need_dx: bool
    ) -> tuple[FloatArray | None, dict[str, FloatArray]]:
        return self._backward_rows(dout, cache, need_dx, compact=True)

    def _backward_rows(
        self, dout: FloatArray, cache: LinearCache, need_dx: bool, compact: bool
    ) -> tuple[FloatArray | None, dict[str, FloatArray]]:
        # dx on the live rows only when compact, else full with zeros outside them.
        if self.activation == "relu":
            dout = dout * (cache.out > 0)
        dbias = dout.sum(axis=1)
        cols, weight = cache.cols, cache.weight
        if cols is None or weight is None:
            dweight = dout @ cache.x.T
            dx = self.weight.T @ dout if need_dx else None
            return dx, {"weight": dweight, "bias": dbias}
        dweight = np.zeros(self.shape, dtype=self.dtype)
        dweight[:, cols] = dout @ cache.x.T
        dx = None
        if need_dx and compact:
            dx = weight.T @ dout
        elif need_dx:
            dx = np.zeros((self.n_in, dout.shape[1]), dtype=self.dtype)
            dx[cols] = weight.T @ dout
        return dx, {"weight": dweight, "bias": dbias}

    def stored_pattern(self) -> BoolArray:
        """Dense boolean ``(n_out, n_in)`` map of the stored weights."""
        return np.ones(self.shape, dtype=bool)

    def n_active(
        self, mask: BoolArray | None = None, live: BoolArray | None = None, mode: Mode = TRAIN
    ) -> int:
        """The weights of the live inputs (the product skips known-zero inputs' columns)."""
        if live is None or mode.straight_through:
            return int(self.weight.size)
        return int(self.shape[0] * np.count_nonzero(live))

    def config(self) -> dict[str, Any]:
        """JSON-ready settings that, with :meth:`arrays`, rebuild the layer."""
        return {"shape": list(self.shape), "activation": self.activation}

    @classmethod
    def from_config(cls, config: dict[str, Any], arrays: dict[str, np.ndarray]) -> Linear:
        """Rebuild the layer from :meth:`config` and :meth:`arrays`."""
        weight = arrays["weight"]
        if list(weight.shape) != list(config["shape"]):
            raise ValueError(f"weight must have shape {config['shape']}, got {weight.shape}")
        return cls(weight, arrays["bias"], activation=config["activation"])

    def __repr__(self) -> str:
        return (
            f"Linear(n_in={self.shape[1]}, n_out={self.shape[0]}, "
            f"activation={self.activation!r}, dtype={self.dtype})"
        )
