"""Masked sparse products on CSR patterns: validated wrappers over the Numba kernels.

A weight matrix of shape ``(n_out, n_in)`` (the PyTorch orientation) is stored as a
canonical CSR *pattern* ``(indptr, indices)`` -- row pointers and sorted, unique
column indices -- with the values in a separate ``data`` array aligned with
``indices``. A boolean mask then selects the *active* entries used by one forward
and backward pass:

- ``entry_mask`` of shape ``(nnz,)``: one bit per stored weight (weight granularity);
- ``row_mask`` of shape ``(n_out,)``: one bit per output unit (neuron granularity);
  a dropped row outputs exactly 0, bias included;
- ``col_mask`` of shape ``(n_in,)``: inputs known to be 0 (dropped by the previous
  layer), whose entries are skipped.

:func:`select_active` compacts the active entries once, in one pass over the stored
entries; :func:`masked_matmul` and :func:`masked_matmul_backward` then cost time
proportional to the active entries times the batch size.

Activations are feature-major: ``x`` has shape ``(n_in, n_batch)``, one column per
sample, so that a feature's values over the batch are contiguous.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, NamedTuple, overload

import numpy as np

from .._typing import BoolArray, FloatArray, IndexArray, RNGLike
from .._validation import check_array, check_rng, check_same_dtype
from .kernels import csr as _kernels

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = [
    "ActivePattern",
    "check_pattern",
    "full_pattern",
    "random_pattern",
    "pattern_from_dense",
    "to_dense",
    "select_active",
    "masked_matmul",
    "masked_matmul_backward",
    "compact_pattern",
]

INDEX_DTYPE = np.int64


class ActivePattern(NamedTuple):
    """The active sub-pattern of a masked CSR matrix.

    Attributes
    ----------
    indptr : ndarray of shape (n_out + 1,)
        Row pointers of the active entries.
    indices : ndarray of shape (n_active,)
        Column indices of the active entries, sorted within each row.
    data : ndarray of shape (n_active,)
        Weight values of the active entries.
    pos : ndarray of shape (n_active,)
        Position of each active entry among the stored entries, so gradients can be
        written back aligned with the stored pattern.
    shape : tuple of int
        ``(n_out, n_in)``.
    nnz : int
        Number of stored entries of the full pattern.
    row_mask : ndarray of shape (n_out,) or None
        Rows kept (neuron granularity); dropped rows output 0.
    """

    indptr: IndexArray
    indices: IndexArray
    data: FloatArray
    pos: IndexArray
    shape: tuple[int, int]
    nnz: int
    row_mask: BoolArray | None

    @property
    def n_active(self) -> int:
        """Number of active entries."""
        return int(self.indices.shape[0])


def check_pattern(
    indptr: npt.ArrayLike, indices: npt.ArrayLike, shape: Sequence[int]
) -> tuple[IndexArray, IndexArray]:
    """Validate a canonical CSR pattern and return it with int64 indices.

    Parameters
    ----------
    indptr : array-like of shape (n_out + 1,)
        Row pointers, nondecreasing, starting at 0 and ending at ``nnz``.
    indices : array-like of shape (nnz,)
        Column indices in ``[0, n_in)``, strictly increasing within each row
        (sorted, no duplicates), as scipy.sparse calls canonical.
    shape : tuple of int
        ``(n_out, n_in)``.

    Returns
    -------
    indptr, indices : ndarray of int64

    Raises
    ------
    ValueError
        If the pattern is not canonical CSR for ``shape``.

    Examples
    --------
    >>> indptr, indices = check_pattern([0, 2, 2, 3], [0, 2, 1], (3, 3))
    >>> indices
    array([0, 2, 1])
    >>> check_pattern([0, 2], [1, 0], (1, 3))
    Traceback (most recent call last):
    ...
    ValueError: indices must be sorted and unique within each row (canonical CSR), ...
    """
    if len(shape) != 2 or min(shape) < 0:
        raise ValueError(f"shape must be a pair of nonnegative ints, got {shape!r}")
    n_out, n_in = int(shape[0]), int(shape[1])
    indptr = np.asarray(indptr)
    indices = np.asarray(indices)
    for name, arr in (("indptr", indptr), ("indices", indices)):
        if arr.ndim != 1 or not (arr.size == 0 or np.issubdtype(arr.dtype, np.integer)):
            raise ValueError(
                f"{name} must be a 1-D integer array, got {arr.dtype} of shape {arr.shape}"
            )
    indptr = indptr.astype(INDEX_DTYPE, copy=False)
    indices = np.ascontiguousarray(indices.astype(INDEX_DTYPE, copy=False))
    if indptr.shape[0] != n_out + 1:
        raise ValueError(f"indptr must have n_out + 1 = {n_out + 1} entries, got {indptr.shape[0]}")
    if indptr[0] != 0 or indptr[-1] != indices.shape[0] or np.any(np.diff(indptr) < 0):
        raise ValueError(
            "indptr must be nondecreasing from 0 to len(indices) = "
            f"{indices.shape[0]}, got {indptr[0]} .. {indptr[-1]}"
        )
    if indices.size and (indices.min() < 0 or indices.max() >= n_in):
        raise ValueError(
            f"indices must be in [0, n_in) = [0, {n_in}), got values in "
            f"[{indices.min()}, {indices.max()}]"
        )
    if indices.size > 1:
        step = np.diff(indices)
        row_start = np.zeros(indices.shape[0], dtype=bool)
        row_start[indptr[:-1][np.diff(indptr) > 0]] = True
        bad = np.flatnonzero((step <= 0) & ~row_start[1:])
        if bad.size:
            row = int(np.searchsorted(indptr, bad[0], side="right") - 1)
            cols = indices[indptr[row] : indptr[row + 1]]
            raise ValueError(
                "indices must be sorted and unique within each row (canonical CSR), "
                f"got row {row} with columns {cols}"
            )
    return np.ascontiguousarray(indptr), indices


def full_pattern(shape: tuple[int, int]) -> tuple[IndexArray, IndexArray]:
    """The pattern that stores every entry of a dense ``(n_out, n_in)`` matrix.

    Examples
    --------
    >>> full_pattern((2, 3))
    (array([0, 3, 6]), array([0, 1, 2, 0, 1, 2]))
    """
    n_out, n_in = shape
    indptr = np.arange(n_out + 1, dtype=INDEX_DTYPE) * n_in
    indices = np.tile(np.arange(n_in, dtype=INDEX_DTYPE), n_out)
    return indptr, indices


def pattern_from_dense(mask: npt.ArrayLike) -> tuple[IndexArray, IndexArray]:
    """The CSR pattern of the True entries of a 2-D boolean array.

    Examples
    --------
    >>> pattern_from_dense(np.array([[True, False], [True, True]]))
    (array([0, 1, 3]), array([0, 0, 1]))
    """
    mask = np.asarray(mask)
    if mask.dtype != np.bool_:
        raise TypeError(f"mask must be a boolean array, got dtype {mask.dtype}")
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    indptr = np.zeros(mask.shape[0] + 1, dtype=INDEX_DTYPE)
    np.cumsum(mask.sum(axis=1), out=indptr[1:])
    indices = np.nonzero(mask)[1].astype(INDEX_DTYPE)
    return indptr, indices


def random_pattern(
    shape: tuple[int, int], density: float, *, rng: RNGLike = None
) -> tuple[IndexArray, IndexArray]:
    """A uniformly random pattern with ``round(density * n_out * n_in)`` entries.

    Parameters
    ----------
    shape : tuple of int
        ``(n_out, n_in)``.
    density : float in (0, 1]
        Fraction of the entries stored.
    rng : None, int or numpy.random.Generator
        Source of randomness.

    Examples
    --------
    >>> indptr, indices = random_pattern((4, 5), 0.5, rng=0)
    >>> int(indptr[-1])
    10
    """
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    rng = check_rng(rng)
    n_out, n_in = shape
    size = n_out * n_in
    nnz = int(round(density * size))
    flat = np.sort(rng.choice(size, size=nnz, replace=False))
    mask = np.zeros(size, dtype=bool)
    mask[flat] = True
    return pattern_from_dense(mask.reshape(n_out, n_in))


def to_dense(
    indptr: npt.ArrayLike,
    indices: npt.ArrayLike,
    data: npt.ArrayLike,
    shape: tuple[int, int],
    *,
    entry_mask: npt.ArrayLike | None = None,
    row_mask: npt.ArrayLike | None = None,
) -> FloatArray:
    """The dense ``(n_out, n_in)`` matrix of a (masked) CSR pattern.

    Examples
    --------
    >>> to_dense([0, 1, 3], [1, 0, 1], np.array([1.0, 2.0, 3.0]), (2, 2))
    array([[0., 1.],
           [2., 3.]])
    """
    indptr, indices = check_pattern(indptr, indices, shape)
    data = check_array(data, "data", ndim=1, shape=indices.shape)
    entry_mask = _check_mask(entry_mask, indices.shape[0], "entry_mask")
    row_mask = _check_mask(row_mask, shape[0], "row_mask")
    n_out, n_in = shape
    values = data.copy()
    if entry_mask is not None:
        values = values * entry_mask
    rows = np.repeat(np.arange(n_out), np.diff(indptr))
    if row_mask is not None:
        values = values * row_mask[rows]
    dense = np.zeros((n_out, n_in), dtype=data.dtype)
    dense[rows, np.asarray(indices)] = values
    return dense


def _empty_bool() -> BoolArray:
    return np.ones(1, dtype=bool)


_ALIGN = 64  # bytes: one cache line, one AVX-512 vector


def _empty_aligned(shape: tuple[int, ...], dtype: npt.DTypeLike) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on a 64-byte boundary.

    The kernels load 64-byte vectors along rows of activations; with the batch a
    multiple of 16 (float32) every row then starts on a cache line, and no load
    straddles two lines.
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    buf = np.empty(nbytes + _ALIGN, dtype=np.uint8)
    offset = -buf.ctypes.data % _ALIGN
    return buf[offset : offset + nbytes].view(dtype).reshape(shape)


def _select_active(
    indptr: IndexArray,
    indices: IndexArray,
    data: FloatArray,
    shape: tuple[int, int],
    entry_mask: BoolArray | None,
    row_mask: BoolArray | None,
    col_mask: BoolArray | None,
) -> ActivePattern:
    # Unvalidated: the caller checked lengths and dtypes.
    nnz = indices.shape[0]
    a_indptr = np.empty(shape[0] + 1, dtype=INDEX_DTYPE)
    dummy = _empty_bool()
    entries = dummy if entry_mask is None else entry_mask
    cols = dummy if col_mask is None else col_mask
    count = _kernels.active_counts(
        indptr,
        indices,
        entries,
        entry_mask is not None,
        dummy if row_mask is None else row_mask,
        row_mask is not None,
        cols,
        col_mask is not None,
        a_indptr,
    )
    # Allocated at their exact size: a pass's temporaries follow the active entries.
    a_indices = np.empty(count, dtype=INDEX_DTYPE)
    a_data = np.empty(count, dtype=data.dtype)
    a_pos = np.empty(count, dtype=INDEX_DTYPE)
    _kernels.active_fill(
        indptr,
        indices,
        data,
        entries,
        entry_mask is not None,
        cols,
        col_mask is not None,
        a_indptr,
        a_indices,
        a_data,
        a_pos,
    )
    return ActivePattern(
        a_indptr,
        a_indices,
        a_data,
        a_pos,
        (shape[0], shape[1]),
        nnz,
        row_mask,
    )


@overload
def _check_mask(mask: None, length: int, name: str) -> None: ...


@overload
def _check_mask(mask: npt.ArrayLike, length: int, name: str) -> BoolArray: ...


def _check_mask(mask: npt.ArrayLike | None, length: int, name: str) -> BoolArray | None:
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.dtype != np.bool_:
        raise TypeError(f"{name} must be a boolean array, got dtype {mask.dtype}")
    if mask.shape != (length,):
        raise ValueError(f"{name} must have shape ({length},), got {mask.shape}")
    return np.ascontiguousarray(mask)


def select_active(
    indptr: npt.ArrayLike,
    indices: npt.ArrayLike,
    data: npt.ArrayLike,
    shape: tuple[int, int],
    *,
    entry_mask: npt.ArrayLike | None = None,
    row_mask: npt.ArrayLike | None = None,
    col_mask: npt.ArrayLike | None = None,
) -> ActivePattern:
    """Compact the entries of a CSR pattern that a mask keeps.

    One pass over the stored entries of the kept rows; the products that follow
    touch only the active entries.

    Parameters
    ----------
    indptr, indices : ndarray
        Canonical CSR pattern of shape ``shape``.
    data : ndarray of shape (nnz,)
        Weight values aligned with ``indices``.
    shape : tuple of int
        ``(n_out, n_in)``.
    entry_mask : ndarray of bool, shape (nnz,), optional
        Keep bit of each stored entry (weight granularity).
    row_mask : ndarray of bool, shape (n_out,), optional
        Keep bit of each output unit (neuron granularity).
    col_mask : ndarray of bool, shape (n_in,), optional
        Inputs that may be nonzero; entries in other columns are skipped.

    Returns
    -------
    ActivePattern

    Examples
    --------
    >>> indptr, indices = full_pattern((2, 2))
    >>> a = select_active(indptr, indices, np.arange(4.0), (2, 2),
    ...                   entry_mask=np.array([True, False, False, True]))
    >>> a.indices, a.data, a.pos
    (array([0, 1]), array([0., 3.]), array([0, 3]))
    """
    indptr, indices = check_pattern(indptr, indices, shape)
    data = check_array(data, "data", ndim=1, shape=(indices.shape[0],))
    return _select_active(
        indptr,
        indices,
        data,
        shape,
        _check_mask(entry_mask, indices.shape[0], "entry_mask"),
        _check_mask(row_mask, shape[0], "row_mask"),
        _check_mask(col_mask, shape[1], "col_mask"),
    )


def _masked_matmul(
    active: ActivePattern, x: FloatArray, bias: FloatArray, relu: bool
) -> FloatArray:
    out = _empty_aligned((active.shape[0], x.shape[1]), x.dtype)
    row_mask = active.row_mask
    _kernels.spmm_forward(
        active.indptr,
        active.indices,
        active.data,
        x,
        bias,
        _empty_bool() if row_mask is None else row_mask,
        row_mask is not None,
        relu,
        out,
    )
    return out


def _check_activations(
    x: npt.ArrayLike, n_rows: int | None, name: str, dtype: npt.DTypeLike | None = None
) -> FloatArray:
    x = check_array(x, name, ndim=2, finite=True)
    if n_rows is not None and x.shape[0] != n_rows:
        raise ValueError(
            f"{name} must have shape ({n_rows}, n_batch) (feature-major: one column per "
            f"sample), got {x.shape}"
        )
    if dtype is not None:
        check_same_dtype((name, x), ("weight", np.empty(0, dtype)))
    return np.ascontiguousarray(x)


def masked_matmul(
    active: ActivePattern,
    x: npt.ArrayLike,
    bias: npt.ArrayLike | None = None,
    *,
    relu: bool = False,
) -> FloatArray:
    """``act(W_active @ x + bias)`` where ``act`` is the identity or ReLU.

    Parameters
    ----------
    active : ActivePattern
        From :func:`select_active`.
    x : ndarray of shape (n_in, n_batch)
        Feature-major input.
    bias : ndarray of shape (n_out,), optional
        Added to every kept row; dropped rows (``active.row_mask``) output 0.
    relu : bool, default=False
        Apply ``max(., 0)`` in the same pass.

    Returns
    -------
    out : ndarray of shape (n_out, n_batch)

    Notes
    -----
    Each output element is ``bias[o]`` plus the row's active products added in
    stored order, for any number of threads.

    Examples
    --------
    >>> indptr, indices = full_pattern((1, 2))
    >>> a = select_active(indptr, indices, np.array([1.0, -2.0]), (1, 2))
    >>> masked_matmul(a, np.array([[1.0, 2.0], [1.0, 0.0]]), np.array([0.5]))
    array([[-0.5,  2.5]])
    """
    x = _check_activations(x, active.shape[1], "x", active.data.dtype)
    if bias is None:
        bias = np.zeros(active.shape[0], dtype=x.dtype)
    bias = check_array(bias, "bias", ndim=1, shape=(active.shape[0],), finite=True)
    check_same_dtype(("x", x), ("bias", bias))
    return _masked_matmul(active, x, bias, bool(relu))


def _masked_matmul_backward(
    active: ActivePattern,
    x: FloatArray,
    dout: FloatArray,
    out: FloatArray | None,
    relu: bool,
    need_dx: bool,
) -> tuple[FloatArray | None, FloatArray, FloatArray]:
    n_out, n_in = active.shape
    row_mask = active.row_mask
    if relu or row_mask is not None:
        dpre = _empty_aligned(dout.shape, dout.dtype)
    else:
        dpre = dout
    dbias = np.empty(n_out, dtype=dout.dtype)
    dweight = np.zeros(active.nnz, dtype=dout.dtype)
    _kernels.output_grad_sddmm(
        dout,
        dout if out is None else out,
        _empty_bool() if row_mask is None else row_mask,
        row_mask is not None,
        relu,
        active.indptr,
        active.indices,
        active.pos,
        x,
        dpre,
        dbias,
        dweight,
    )
    if not need_dx:
        return None, dweight, dbias
    # dx = W_active.T @ dpre, gathered column by column from the transposed pattern:
    # the order of the row-wise scatter (rows ascending), without its read-modify-write.
    n_active = active.indices.shape[0]
    t_indptr = np.zeros(n_in + 1, dtype=INDEX_DTYPE)
    # Row numbers fit in int32 for any realistic layer: half the bytes to scatter.
    t_rows = np.empty(n_active, dtype=np.int32 if n_out < 2**31 else INDEX_DTYPE)
    t_data = np.empty(n_active, dtype=active.data.dtype)
    _kernels.transpose_active(active.indptr, active.indices, active.data, t_indptr, t_rows, t_data)
    dx = _empty_aligned((n_in, dout.shape[1]), dout.dtype)
    _kernels.spmm_gather_t(t_indptr, t_rows, t_data, dpre, dx)
    return dx, dweight, dbias


def masked_matmul_backward(
    active: ActivePattern,
    x: npt.ArrayLike,
    dout: npt.ArrayLike,
    out: npt.ArrayLike | None = None,
    *,
    relu: bool = False,
    need_dx: bool = True,
) -> tuple[FloatArray | None, FloatArray, FloatArray]:
    r"""Gradients of :func:`masked_matmul` at the active entries only.

    Parameters
    ----------
    active : ActivePattern
        The pattern used in the forward pass.
    x : ndarray of shape (n_in, n_batch)
        The forward input.
    dout : ndarray of shape (n_out, n_batch)
        Gradient of the loss with respect to the output.
    out : ndarray of shape (n_out, n_batch), optional
        The forward output; required when ``relu`` is True.
    relu : bool, default=False
        Whether the forward pass applied ReLU.
    need_dx : bool, default=True
        Compute the input gradient (not needed for the first layer).

    Returns
    -------
    dx : ndarray of shape (n_in, n_batch) or None
        ``W_active.T @ dpre``, where ``dpre`` is ``dout`` through the ReLU and the
        row mask.
    dweight : ndarray of shape (nnz,)
        Aligned with the stored entries: ``dpre[o] . x[j]`` at active entries
        (sampled dense-dense product, SDDMM) and 0 elsewhere.
    dbias : ndarray of shape (n_out,)
        ``dpre`` summed over the batch.

    Notes
    -----
    With :math:`y = \operatorname{act}((W \odot M) x + b)` and
    :math:`\delta = \partial L / \partial y \odot \operatorname{act}'`,

    .. math::

        \frac{\partial L}{\partial W_{oj}} = M_{oj} \sum_b \delta_{ob} x_{jb},
        \qquad \frac{\partial L}{\partial x} = (W \odot M)^\top \delta,
        \qquad \frac{\partial L}{\partial b_o} = \sum_b \delta_{ob}.

    Only the active entries are visited; each dot product over the batch and each
    sum over rows runs in a fixed order (see :mod:`cpusparse.engine.kernels.csr`), so the
    result does not depend on the number of threads.

    Examples
    --------
    >>> indptr, indices = full_pattern((1, 2))
    >>> a = select_active(indptr, indices, np.array([1.0, -2.0]), (1, 2),
    ...                   entry_mask=np.array([True, False]))
    >>> dx, dw, db = masked_matmul_backward(a, np.ones((2, 3)), np.ones((1, 3)))
    >>> dw, db
    (array([3., 0.]), array([3.]))
    """
    n_out, n_in = active.shape
    x = _check_activations(x, n_in, "x", active.data.dtype)
    dout = _check_activations(dout, n_out, "dout", active.data.dtype)
    if dout.shape[1] != x.shape[1]:
        raise ValueError(
            f"dout must have n_batch = {x.shape[1]} columns like x, got {dout.shape[1]}"
        )
    checked_out = None  # without ReLU the kernel never reads the output
    if relu:
        if out is None:
            raise ValueError("out is required when relu is True")
        checked_out = _check_activations(out, n_out, "out", active.data.dtype)
    return _masked_matmul_backward(active, x, dout, checked_out, bool(relu), bool(need_dx))


def compact_pattern(
    indptr: npt.ArrayLike, indices: npt.ArrayLike, keep: npt.ArrayLike
) -> tuple[IndexArray, IndexArray]:
    """Drop the stored entries where ``keep`` is False.

    Parameters
    ----------
    indptr, indices : ndarray
        Canonical CSR pattern.
    keep : ndarray of bool, shape (nnz,)

    Returns
    -------
    indptr, indices : ndarray
        The smaller canonical pattern; arrays aligned with the old entries are
        compacted with ``array[keep]``.

    Examples
    --------
    >>> compact_pattern(np.array([0, 2, 3]), np.array([0, 1, 1]), np.array([True, False, True]))
    (array([0, 1, 2]), array([0, 1]))
    """
    indptr = np.asarray(indptr, dtype=INDEX_DTYPE)
    indices = np.asarray(indices, dtype=INDEX_DTYPE)
    keep = _check_mask(keep, indices.shape[0], "keep")
    new_indptr = np.empty_like(indptr)
    _kernels.compact_indptr(indptr, keep, new_indptr)
    return new_indptr, indices[keep]
