r"""The exact gradient of the expected loss by enumerating all :math:`2^n` masks.

The oracle of the tests: with few units the expectation
:math:`\mathbb{E}_{m \sim p(m|s)} L(m) = \sum_m p(m \mid s) L(m)` and its gradient can
be computed exactly, so the unbiasedness of every estimator in
:mod:`cpusparse.method.estimators` is testable against it.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np

from .._typing import BoolArray
from .masks import _check_score

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["exact_expectation", "exact_grad"]


def _check_max_units(max_units: int) -> None:
    if not isinstance(max_units, numbers.Integral) or isinstance(max_units, bool | np.bool_):
        raise TypeError(f"max_units must be an int, got {type(max_units).__name__}")
    if max_units < 0:
        raise ValueError(f"max_units must be >= 0, got {max_units}")


def _all_masks(n: int) -> BoolArray:
    """All 2**n masks; row ``idx`` has ``m_j`` = bit ``n - 1 - j`` of ``idx``."""
    shifts = np.arange(n - 1, -1, -1)
    return ((np.arange(2**n)[:, None] >> shifts) & 1).astype(bool)


def _loss_table(
    loss_fn: Callable[[BoolArray], float], score: npt.ArrayLike, max_units: int
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """Validate, enumerate and return losses as an array of shape (2,) * n."""
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    _check_max_units(max_units)
    score = _check_score(score).astype(np.float64)
    n = score.shape[0]
    if n > max_units:
        raise ValueError(
            f"score must have at most max_units = {max_units} units for exhaustive "
            f"enumeration of 2**n masks, got n = {n}"
        )
    masks = _all_masks(n)
    table = np.empty(masks.shape[0], dtype=np.float64)
    for idx in range(masks.shape[0]):
        value = np.asarray(loss_fn(masks[idx].copy()))
        if value.shape != () or value.dtype.kind not in "fiub" or not np.isfinite(value):
            raise ValueError(
                f"loss_fn must return a finite real scalar, got {value!r} for mask {masks[idx]}"
            )
        table[idx] = value
    return table.reshape((2,) * n), score


def _contract_last(table: npt.NDArray[np.float64], s_j: float) -> npt.NDArray[np.float64]:
    """Average the last axis (m_j in {0, 1}) with weights (1 - s_j, s_j)."""
    return table[..., 0] * (1.0 - s_j) + table[..., 1] * s_j


def exact_expectation(
    loss_fn: Callable[[BoolArray], float], score: npt.ArrayLike, *, max_units: int = 20
) -> float:
    r"""Exact :math:`\mathbb{E}_{m \sim p(m|s)} L(m)` by enumerating all :math:`2^n` masks.

    Parameters
    ----------
    loss_fn : callable
        ``loss_fn(mask) -> float`` for a bool mask of shape (n,). It is called
        :math:`2^n` times with fresh arrays.
    score : array-like of shape (n,)
        Keep probabilities, finite and in [0, 1].
    max_units : int, default=20
        Largest :math:`n` accepted.

    Returns
    -------
    expectation : float

    Raises
    ------
    ValueError
        If ``n > max_units`` or ``loss_fn`` returns a non-finite value.

    Notes
    -----
    .. math::

        \mathbb{E}[L] = \sum_{m \in \{0,1\}^n} L(m) \prod_{j=1}^{n}
        s_j^{m_j} (1 - s_j)^{1 - m_j},

    computed by storing :math:`L` as a :math:`2 \times \cdots \times 2` table
    and contracting one axis :math:`j` at a time with the weights
    :math:`(1 - s_j, s_j)`: :math:`O(2^n)` work and memory beyond the
    :math:`2^n` calls of ``loss_fn``. Intended as a test oracle.

    Examples
    --------
    >>> import numpy as np
    >>> from cpusparse.method import exact_expectation
    >>> exact_expectation(lambda m: float(m.sum()) ** 2, [0.5, 0.5])
    1.5
    """
    table, score = _loss_table(loss_fn, score, max_units)
    for j in range(score.shape[0] - 1, -1, -1):
        table = _contract_last(table, score[j])
    return float(table)


def exact_grad(
    loss_fn: Callable[[BoolArray], float], score: npt.ArrayLike, *, max_units: int = 20
) -> npt.NDArray[np.float64]:
    r"""Exact :math:`\nabla_s \mathbb{E}_{m \sim p(m|s)} L(m)` by enumerating all masks.

    Parameters
    ----------
    loss_fn : callable
        ``loss_fn(mask) -> float`` for a bool mask of shape (n,). It is called
        :math:`2^n` times with fresh arrays.
    score : array-like of shape (n,)
        Keep probabilities, finite and in [0, 1]; the endpoints are allowed.
    max_units : int, default=20
        Largest :math:`n` accepted; :math:`2^n` calls of ``loss_fn`` are made.

    Returns
    -------
    dscore : ndarray of shape (n,), dtype float64

    Raises
    ------
    ValueError
        If ``n > max_units`` or ``loss_fn`` returns a non-finite value.

    Notes
    -----
    The score-function form
    :math:`\sum_m L(m) p(m)\,(m_i - s_i)/(s_i(1 - s_i))` is singular at
    :math:`s_i \in \{0, 1\}`. Instead, :math:`\mathbb{E}[L]` is affine in each
    :math:`s_i` separately,

    .. math::

        \mathbb{E}[L] = s_i \, \mathbb{E}[L \mid m_i = 1]
                      + (1 - s_i)\, \mathbb{E}[L \mid m_i = 0],

    where neither conditional expectation depends on :math:`s_i`. Hence

    .. math::

        \frac{\partial \mathbb{E}[L]}{\partial s_i}
        = \mathbb{E}[L \mid m_i = 1] - \mathbb{E}[L \mid m_i = 0]
        = \sum_m L(m) \, (2 m_i - 1) \prod_{j \ne i} s_j^{m_j}(1 - s_j)^{1 - m_j},

    valid on the closed cube :math:`[0, 1]^n` (one-sided at the endpoints). Each
    coordinate is obtained by contracting every axis but :math:`i` of the
    :math:`2 \times \cdots \times 2` loss table, :math:`O(n\,2^n)` work in total.

    Examples
    --------
    >>> import numpy as np
    >>> from cpusparse.method import exact_grad
    >>> def loss(m):
    ...     return float(m.sum()) ** 2
    >>> exact_grad(loss, [0.5, 0.0])  # E[L | m_i=1] - E[L | m_i=0]
    array([1., 2.])
    """
    table, score = _loss_table(loss_fn, score, max_units)
    n = score.shape[0]
    dscore = np.empty(n, dtype=np.float64)
    for i in range(n):
        reduced = np.moveaxis(table, i, 0)
        others = [j for j in range(n) if j != i]
        for j in reversed(others):
            reduced = _contract_last(reduced, score[j])
        dscore[i] = reduced[1] - reduced[0]
    return dscore
