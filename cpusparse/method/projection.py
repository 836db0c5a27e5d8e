r"""Euclidean projection of keep probabilities onto the budget set.

After each gradient step on the scores, Zhou et al. (2021) [1]_ project them back
onto

.. math::

    \mathcal{S}_k = \{ s \in \mathbb{R}^n : 0 \le s_i \le 1, \;
    \textstyle\sum_i s_i \le k \},

where the budget :math:`k` is the expected number of kept units. One global
budget can span all layers: concatenate the layers' scores with
:func:`concat_scores`, project, and split them back with :func:`split_scores`.

References
----------
.. [1] X. Zhou, W. Zhang, Z. Chen, S. Diao and T. Zhang, "Efficient Neural
   Network Training via Forward and Backward Propagation Sparsification",
   NeurIPS 2021. arXiv:2111.05685.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from .._typing import FloatArray, IndexArray
from ..engine.kernels import scores as _score_kernels

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["project_scores", "concat_scores", "split_scores"]

METHODS = ("exact", "bisection")
"""Solvers of :func:`project_scores`."""


def _check_real_array(x: npt.ArrayLike, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.dtype.kind not in "fiu":
        raise TypeError(f"{name} must be a real floating or integer array, got dtype {x.dtype}")
    return x


def _check_positive_finite(value: float, name: str) -> None:
    if not isinstance(value, numbers.Real) or isinstance(value, bool | np.bool_):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    if not np.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")


def _clipped_sum(s: npt.NDArray[np.float64], v: float) -> float:
    """Sum of clip(s - v, 0, 1) in float64. NOTE: s is float64, v a float."""
    return float(np.clip(s - v, 0.0, 1.0).sum())


# Below this size the sort is as fast as the selection and keeps the NumPy sums.
_SELECT_MIN_SIZE = 4096


def _threshold_exact(s: FloatArray, budget: float) -> float:
    """Smallest v >= 0 with sum(clip(s - v, 0, 1)) == budget.

    A Numba selection over the breakpoints of ``f(v) = sum clip(s - v, 0, 1)``
    (:func:`~cpusparse.engine.kernels.scores.projection_threshold`) in expected O(n),
    with compensated sums; it agrees with :func:`_threshold_sort` to rounding of the
    threshold. The sort, used below ``_SELECT_MIN_SIZE`` units, is the tests' oracle.

    NOTE: s is 1-D float32 or float64 and sum(clip(s, 0, 1)) > budget >= 0.
    """
    if s.shape[0] >= _SELECT_MIN_SIZE:
        work = np.empty(s.shape[0], dtype=np.int32 if s.shape[0] < 2**31 else np.int64)
        s_max = float(s.max())
        return float(_score_kernels.projection_threshold(s, budget, s_max, work))
    return _threshold_sort(s.astype(np.float64, copy=False), budget)


def _threshold_sort(s: npt.NDArray[np.float64], budget: float) -> float:
    """:func:`_threshold_exact` by sorting the breakpoints, in O(n log n).

    NOTE: same preconditions as ``_threshold_exact``.
    """
    s_max = float(s.max())
    # Breakpoints of f(v) = sum_i clip(s_i - v, 0, 1) inside [0, max s], sorted.
    cand = np.concatenate(([0.0], s, s - 1.0))
    cand = np.unique(cand[(cand >= 0.0) & (cand <= s_max)])

    # Binary search over the breakpoints for the first one with f <= budget. f is
    # evaluated directly (each term and the fixed-order sum are monotone in v even in
    # floating point); prefix sums would be O(1) per breakpoint but cancel badly.
    # Invariant: f(cand[lo]) > budget >= f(cand[hi]); f(0) > budget, f(max s) = 0.
    lo, hi = 0, cand.shape[0] - 1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _clipped_sum(s, cand[mid]) > budget:
            lo = mid
        else:
            hi = mid
    return _solve_segment(s, budget, float(cand[lo]), float(cand[hi]))


def _solve_segment(s: npt.NDArray[np.float64], budget: float, left: float, right: float) -> float:
    """The root of f(v) = budget between adjacent breakpoints with f(left) > budget >= f(right)."""
    if budget == 0.0 or _clipped_sum(s, right) == budget:
        # f decreases strictly on (left, right), so a root at its end is the root; this
        # returns breakpoint solutions (ties, budget = 0) without rounding.
        return right
    # Inside (left, right) no unit changes state, so with A = {v < s_i < v + 1} and
    # U = {s_i >= v + 1}: f(v) = |U| + sum_A s_i - v |A|. Solve f(v) = budget.
    mid = 0.5 * (left + right)
    active = (s > mid) & (s < mid + 1.0)
    n_active = int(active.sum())
    if n_active == 0:  # pragma: no cover - f cannot be flat on a segment where it crosses
        return right
    n_one = int((s >= mid + 1.0).sum())
    v = (n_one + s[active].sum() - budget) / n_active
    return min(max(v, left), right)


def _threshold_bisection(
    s: npt.NDArray[np.float64], budget: float, tol: float, max_iter: int
) -> float:
    """Run the authors' bisection. NOTE: same preconditions as ``_threshold_exact``."""
    lo, hi = 0.0, float(s.max())
    mid = 0.5 * (lo + hi)
    for _ in range(max_iter):
        mid = 0.5 * (lo + hi)
        total = _clipped_sum(s, mid)
        if abs(total - budget) < tol:
            break
        if total > budget:
            lo = mid
        else:
            hi = mid
    return mid


def project_scores(
    score: npt.ArrayLike,
    budget: float,
    *,
    method: str = "exact",
    tol: float = 1e-3,
    max_iter: int = 20,
    out: FloatArray | None = None,
) -> tuple[FloatArray, float]:
    r"""Euclidean projection of ``score`` onto :math:`\{s : 0 \le s \le 1, \sum s \le k\}`.

    Parameters
    ----------
    score : array-like of shape (n,)
        Finite real values (typically scores after a gradient step, so they
        may lie outside [0, 1]).
    budget : float
        The budget :math:`k \ge 0`, the largest allowed expected number of
        kept units. ``budget >= n`` makes the constraint inactive.
    method : {"exact", "bisection"}, default="exact"
        ``"exact"`` solves for the threshold exactly: a selection over the
        breakpoints brackets it between adjacent ones in a few passes over the
        scores (below 4,096 scores, sorting them, in :math:`O(n \log n)`).
        ``"bisection"`` is the solver of the authors' code, controlled by ``tol``
        and ``max_iter``.
    tol : float, default=1e-3
        Bisection only: stop when :math:`|\sum_i P(s)_i - k| <` ``tol``.
    max_iter : int, default=20
        Bisection only: the largest number of midpoints evaluated.
    out : ndarray of shape (n,), optional
        Where to write the result (it may be ``score`` itself, for an update in
        place); its dtype must be the result's.

    Returns
    -------
    projected : ndarray of shape (n,)
        ``out``, or a new array, float32 if ``score`` is float32 and float64 otherwise
        (the computation is done in float64).
    threshold : float
        The shift :math:`v \ge 0` with ``projected = clip(score - v, 0, 1)``;
        0.0 when ``clip(score, 0, 1)`` is already feasible.

    Raises
    ------
    ValueError
        If ``score`` is not 1-D or not finite, ``budget`` is negative or not
        finite, ``method`` is unknown, or ``tol``/``max_iter`` are not positive.
    TypeError
        If ``score`` is not a real array or a scalar argument has the wrong type.

    Notes
    -----
    **KKT conditions.** The projection solves the strictly convex problem
    :math:`\min_x \tfrac12 \lVert x - s \rVert^2` over the box
    :math:`0 \le x \le 1` and :math:`\sum_i x_i \le k`. All constraints are
    affine, so the KKT conditions are necessary and sufficient. Dualising only
    the sum constraint with a multiplier :math:`v \ge 0`, the Lagrangian

    .. math::

        \tfrac12 \lVert x - s \rVert^2 + v \big(\textstyle\sum_i x_i - k\big)

    separates over coordinates, and its minimiser over the box is
    :math:`x_i(v) = \mathrm{clip}(s_i - v, 0, 1)`. Complementary slackness
    :math:`v\,(\sum_i x_i(v) - k) = 0` leaves two cases: either :math:`v = 0`
    and :math:`\sum_i \mathrm{clip}(s_i, 0, 1) \le k`, or :math:`v > 0` solves

    .. math::

        f(v) := \sum_i \mathrm{clip}(s_i - v, 0, 1) = k .

    **Exact solve.** :math:`f` is continuous, nonincreasing and piecewise
    linear with breakpoints at :math:`s_i` and :math:`s_i - 1`; on a segment
    without breakpoints, with :math:`A` the units in the linear regime
    (:math:`v < s_i < v + 1`) and :math:`U` those clipped at 1,
    :math:`f(v) = |U| + \sum_{i \in A} s_i - v|A|`. The breakpoints in
    :math:`[0, \max_i s_i]` bracket the root. From 4,096 units on, a selection
    finds the segment where :math:`f` crosses :math:`k` in expected
    :math:`O(n)`: each round evaluates :math:`f` at two breakpoints of
    undecided units that likely bracket the root (drawn from a sample of them,
    after Floyd and Rivest) and sets aside every unit whose term
    is constant or linear on the narrowed interval, so tied scores are decided
    together. The linear equation is solved there,
    :math:`v = (|U| + \sum_{A} s_i - k)/|A|`, with compensated float64 sums,
    and clamped to the segment. Smaller arrays sort the breakpoints and
    binary-search them (:math:`O(n \log n)`, NumPy's sums; the tests' oracle),
    which returns the breakpoint itself when :math:`f` equals :math:`k`
    there. The two agree to rounding of the threshold (so, from 4,096 units on,
    thresholds differ from cpusparse 0.1's in the last bits). Sums are taken directly
    rather than from prefix sums, which cancel catastrophically when tiny and
    large scores are mixed. Where :math:`f` is flat at :math:`k` the threshold
    is not unique (the projection is); the smallest is returned.

    **Bisection.** Starting from :math:`[0, \max_i s_i]`, the midpoint is
    evaluated up to ``max_iter`` times, stopping early when
    :math:`|f(v) - k| <` ``tol``; the last midpoint is returned. Its result may
    exceed the budget by up to ``tol`` (more if the cap is hit first). Because
    both results have the form :math:`\mathrm{clip}(s - v, 0, 1)`, they differ
    in one direction only, so
    :math:`\lVert P_{\mathrm{bis}} - P_{\mathrm{exact}} \rVert_1 = |f(v_{\mathrm{bis}}) - k|`.

    A float32 result is rounded after the float64 solve, so its sum may
    exceed ``budget`` by a few float32 ulps.

    References
    ----------
    .. [1] X. Zhou et al., "Efficient Neural Network Training via Forward and
       Backward Propagation Sparsification", NeurIPS 2021. arXiv:2111.05685.

    Examples
    --------
    >>> import numpy as np
    >>> from cpusparse.method import project_scores
    >>> p, v = project_scores(np.array([0.9, 0.6, 0.3, -0.2]), 1.2)
    >>> p, v
    (array([0.7, 0.4, 0.1, 0. ]), 0.2)
    >>> project_scores(np.array([0.2, 1.5]), 2.0)  # clipping alone is feasible
    (array([0.2, 1. ]), 0.0)
    >>> q, _ = project_scores(np.array([0.9, 0.6, 0.3, -0.2]), 1.0, method="bisection")
    >>> bool(abs(q.sum() - 1.0) < 1e-3)
    True
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    score = _check_real_array(score, "score")
    if score.ndim != 1:
        raise ValueError(f"score must be 1-D, got an array of shape {score.shape}")
    if not isinstance(budget, numbers.Real) or isinstance(budget, bool | np.bool_):
        raise TypeError(f"budget must be a real number, got {type(budget).__name__}")
    if not np.isfinite(budget) or budget < 0:
        raise ValueError(f"budget must be a finite number >= 0, got {budget!r}")
    _check_positive_finite(tol, "tol")
    if not isinstance(max_iter, numbers.Integral) or isinstance(max_iter, bool | np.bool_):
        raise TypeError(f"max_iter must be an int, got {type(max_iter).__name__}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")

    out_dtype = np.dtype(np.float32 if score.dtype == np.float32 else np.float64)
    if out is not None:
        _check_out(out, score, out_dtype)
    budget = float(budget)
    if score.shape[0] >= _SELECT_MIN_SIZE and score.dtype in (np.float32, np.float64):
        # One pass for the check and the feasibility test, one for the result.
        total, _, finite = _score_kernels.clipped_sum(score)
        if not finite:
            raise ValueError("score must be finite, got NaN or inf")
        threshold = 0.0
        if total > budget:
            threshold = float(_find_threshold(score, budget, method, tol, max_iter))
        out = np.empty(score.shape, dtype=out_dtype) if out is None else out
        _score_kernels.shift_clip(score, threshold, out)
        return out, threshold
    if not np.all(np.isfinite(score)):
        raise ValueError("score must be finite, got NaN or inf")
    s = score.astype(np.float64)
    clipped = np.clip(s, 0.0, 1.0)
    if clipped.sum() <= budget:
        projected, threshold = clipped, 0.0
    else:
        threshold = float(_find_threshold(s, budget, method, tol, max_iter))
        projected = np.clip(s - threshold, 0.0, 1.0)
    if out is None:
        return projected.astype(out_dtype, copy=False), threshold
    out[:] = projected
    return out, threshold


def _check_out(out: object, score: np.ndarray, out_dtype: np.dtype) -> None:
    """Check the ``out`` of :func:`project_scores`.

    It must be a writeable array of the result's shape and dtype, and either ``score``
    itself or an array that shares no memory with it.
    """
    if not isinstance(out, np.ndarray) or out.shape != score.shape or out.dtype != out_dtype:
        got = (
            f"{out.dtype} array of shape {out.shape}"
            if isinstance(out, np.ndarray)
            else type(out).__name__
        )
        raise ValueError(f"out must be a {out_dtype} array of shape {score.shape}, got {got}")
    if not out.flags.writeable:
        raise ValueError("out must be writeable, got a read-only array")
    same = (
        out.__array_interface__["data"][0] == score.__array_interface__["data"][0]
        and out.strides == score.strides
    )
    if not same and np.may_share_memory(out, score):
        raise ValueError(
            "out must be score itself or not overlap it, got a view of score in another layout"
        )


def _find_threshold(s: FloatArray, budget: float, method: str, tol: float, max_iter: int) -> float:
    """The threshold of the chosen method. NOTE: sum(clip(s, 0, 1)) > budget >= 0."""
    if method == "exact":
        return _threshold_exact(s, budget)
    return _threshold_bisection(s.astype(np.float64, copy=False), budget, float(tol), int(max_iter))


def concat_scores(scores: Iterable[npt.ArrayLike]) -> tuple[FloatArray, IndexArray]:
    r"""Flatten and concatenate per-layer scores so that one budget spans all layers.

    Parameters
    ----------
    scores : sequence of array-like
        One score array per layer, of any shape, all of the same floating
        dtype (float32 and float64 are not mixed silently).

    Returns
    -------
    flat : ndarray of shape (offsets[-1],)
        A new array holding every layer's scores, raveled in C order.
    offsets : ndarray of shape (n_layers + 1,), dtype int64
        Layer ``l`` occupies ``flat[offsets[l]:offsets[l + 1]]``.

    Raises
    ------
    ValueError
        If ``scores`` is empty.
    TypeError
        If the layers are not floating arrays of one dtype.

    Notes
    -----
    With per-layer scores :math:`s^{(l)}` and a global budget :math:`k`,
    the feasible set :math:`\{0 \le s^{(l)} \le 1, \sum_l \sum_i s^{(l)}_i \le k\}`
    is the budget set of the concatenated vector, so a single
    :func:`project_scores` call on ``flat`` projects all layers jointly and
    lets the optimiser distribute the budget across layers.

    Examples
    --------
    >>> import numpy as np
    >>> from cpusparse.method import concat_scores, split_scores
    >>> flat, offsets = concat_scores([np.full(2, 0.5), np.full((2, 2), 0.25)])
    >>> flat
    array([0.5 , 0.5 , 0.25, 0.25, 0.25, 0.25])
    >>> offsets
    array([0, 2, 6])
    >>> [a.shape for a in split_scores(flat, offsets, shapes=[(2,), (2, 2)])]
    [(2,), (2, 2)]
    """
    if isinstance(scores, np.ndarray):
        raise TypeError("scores must be a sequence of arrays (one per layer), got an ndarray")
    arrays = [np.asarray(a) for a in scores]
    if not arrays:
        raise ValueError("scores must hold at least one layer, got an empty sequence")
    dtypes = {a.dtype for a in arrays}
    if len(dtypes) != 1 or next(iter(dtypes)).kind != "f":
        names = sorted(str(d) for d in dtypes)
        raise TypeError(f"scores must all have the same floating dtype, got dtypes {names}")
    sizes = np.array([a.size for a in arrays], dtype=np.int64)
    offsets = np.concatenate(([0], np.cumsum(sizes))).astype(np.int64)
    flat = np.concatenate([a.ravel() for a in arrays])
    return flat, offsets


def split_scores(
    flat: npt.ArrayLike,
    offsets: npt.ArrayLike,
    *,
    shapes: Iterable[int | Sequence[int]] | None = None,
    copy: bool = True,
) -> list[np.ndarray]:
    """Split a flat score vector back into per-layer arrays (inverse of :func:`concat_scores`).

    Parameters
    ----------
    flat : array-like of shape (n_total,)
        Concatenated scores, e.g. the output of :func:`project_scores`.
    offsets : array-like of shape (n_layers + 1,), integer
        Nondecreasing, ``offsets[0] == 0`` and ``offsets[-1] == n_total``.
    shapes : sequence of tuple, optional
        Shape of each layer; by default each piece stays 1-D.
    copy : bool, default=True
        Return copies; False returns views of ``flat`` (what the training step
        hands its layers, every pass).

    Returns
    -------
    scores : list of ndarray
        ``n_layers`` arrays, copies unless ``copy=False``.

    Raises
    ------
    ValueError
        If ``flat`` is not 1-D or ``offsets`` / ``shapes`` are inconsistent with it.

    Notes
    -----
    Layer :math:`l` is ``flat[offsets[l]:offsets[l + 1]]``, reshaped in C order,
    so ``split_scores(*concat_scores(s), shapes=[a.shape for a in s])``
    reproduces ``s`` exactly.

    Examples
    --------
    >>> import numpy as np
    >>> from cpusparse.method import split_scores
    >>> split_scores(np.arange(5.0), np.array([0, 2, 5]))
    [array([0., 1.]), array([2., 3., 4.])]
    """
    flat = np.asarray(flat)
    if flat.ndim != 1:
        raise ValueError(f"flat must be 1-D, got an array of shape {flat.shape}")
    offsets = np.asarray(offsets)
    if offsets.dtype.kind not in "iu":
        raise TypeError(f"offsets must be an integer array, got dtype {offsets.dtype}")
    if (
        offsets.ndim != 1
        or offsets.shape[0] < 2
        or offsets[0] != 0
        or offsets[-1] != flat.shape[0]
        or np.any(np.diff(offsets) < 0)
    ):
        raise ValueError(
            "offsets must be a nondecreasing 1-D integer array of length n_layers + 1 with "
            f"offsets[0] == 0 and offsets[-1] == len(flat) == {flat.shape[0]}, got {offsets!r}"
        )
    n_layers = offsets.shape[0] - 1
    if shapes is not None:
        shapes = [tuple(int(d) for d in np.atleast_1d(shape)) for shape in shapes]
        sizes = [int(np.prod(shape, dtype=np.int64)) for shape in shapes]
        if len(shapes) != n_layers or sizes != np.diff(offsets).tolist():
            raise ValueError(
                f"shapes must give one shape per layer whose sizes match np.diff(offsets) = "
                f"{np.diff(offsets).tolist()}, got {shapes}"
            )
    pieces = []
    for layer in range(n_layers):
        piece = flat[offsets[layer] : offsets[layer + 1]]
        if copy:
            piece = piece.copy()
        if shapes is not None:
            piece = piece.reshape(shapes[layer])
        pieces.append(piece)
    return pieces
