r"""Policy-gradient estimators for Bernoulli keep probabilities.

Each prunable unit :math:`i` carries a keep probability :math:`s_i \in [0, 1]`
(called ``score``) and a mask :math:`m_i \sim \mathrm{Bernoulli}(s_i)`, drawn
independently. The training problem of Zhou et al. (2021) is

.. math::

    \min_{w,\, s} \; \mathbb{E}_{m \sim p(m \mid s)} \, L(w \odot m)
    \quad \text{s.t.} \quad s \in [0, 1]^n, \; \textstyle\sum_i s_i \le k,

with :math:`p(m \mid s) = \prod_i s_i^{m_i} (1 - s_i)^{1 - m_i}`. This module
holds the pure functions that turn :math:`K` sampled masks and their losses into
an estimate of :math:`\nabla_s \mathbb{E}[L]`, plus an exhaustive-enumeration
oracle for small :math:`n` used by the tests.

Random numbers are drawn in exactly one place, :func:`sample_masks`, in one
documented order, so another implementation can replay the same masks.

References
----------
.. [1] X. Zhou, W. Zhang, Z. Chen, S. Diao and T. Zhang, "Efficient Neural
   Network Training via Forward and Backward Propagation Sparsification",
   NeurIPS 2021. arXiv:2111.05685.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable

import numpy as np

__all__ = [
    "check_random_state",
    "sample_masks",
    "score_function",
    "reinforce_grad",
    "vrpge_grad",
    "exact_expectation",
    "exact_grad",
]

_SCALINGS = ("exact", "sqrt")


# ---------------------------------------------------------------------------
# Validation helpers (private)
# ---------------------------------------------------------------------------


def _check_score(score):
    """Return ``score`` as a validated 1-D real array (dtype unchanged)."""
    score = np.asarray(score)
    if score.dtype.kind not in "fiu":
        raise TypeError(f"score must be a real floating or integer array, got dtype {score.dtype}")
    if score.ndim != 1:
        raise ValueError(f"score must be 1-D, got an array of shape {score.shape}")
    if not np.all(np.isfinite(score)):
        raise ValueError("score must be finite, got NaN or inf")
    if score.size and (score.min() < 0 or score.max() > 1):
        raise ValueError(
            f"score must be in [0, 1], got values in [{score.min()!r}, {score.max()!r}]"
        )
    return score


def _out_dtype(score):
    """Output dtype rule: float32 stays float32, everything else is float64."""
    return np.dtype(np.float32) if score.dtype == np.float32 else np.dtype(np.float64)


def _check_scaling(scaling):
    if scaling not in _SCALINGS:
        raise ValueError(f"scaling must be one of {_SCALINGS}, got {scaling!r}")


def _check_masks(masks, n, *, allow_1d):
    masks = np.asarray(masks)
    if masks.dtype != np.bool_:
        raise TypeError(f"masks must be a bool array, got dtype {masks.dtype}")
    ok_ndim = (1, 2) if allow_1d else (2,)
    if masks.ndim not in ok_ndim or masks.shape[-1] != n:
        want = "(n,) or (n_samples, n)" if allow_1d else "(n_samples, n)"
        raise ValueError(
            f"masks must have shape {want} with n = len(score) = {n}, got shape {masks.shape}"
        )
    return masks


def _check_losses(losses, n_samples):
    losses = np.asarray(losses)
    if losses.dtype.kind not in "fiu":
        raise TypeError(f"losses must be a real array, got dtype {losses.dtype}")
    if losses.shape != (n_samples,):
        raise ValueError(
            f"losses must have shape (n_samples,) = ({n_samples},) matching masks, "
            f"got shape {losses.shape}"
        )
    losses = losses.astype(np.float64)
    if not np.all(np.isfinite(losses)):
        raise ValueError("losses must be finite, got NaN or inf")
    return losses


def _score_function64(masks, score64, scaling):
    """Score function in float64; no validation. NOTE: score64 is float64, masks bool."""
    interior = (score64 > 0) & (score64 < 1)
    var = score64 * (1.0 - score64)
    denom = var if scaling == "exact" else np.sqrt(var)
    numer = masks.astype(np.float64) - score64
    out = np.zeros(np.broadcast_shapes(masks.shape, score64.shape), dtype=np.float64)
    np.divide(numer, denom, out=out, where=np.broadcast_to(interior, out.shape))
    return out


# ---------------------------------------------------------------------------
# Random masks
# ---------------------------------------------------------------------------


def check_random_state(rng=None):
    """Turn ``rng`` into a :class:`numpy.random.Generator`.

    Parameters
    ----------
    rng : None, int or numpy.random.Generator, default=None
        ``None`` gives a fresh generator seeded from the operating system,
        an int seeds ``numpy.random.default_rng``, a Generator is returned
        unchanged (not copied), so draws advance its state.

    Returns
    -------
    generator : numpy.random.Generator
        The generator to draw from.

    Raises
    ------
    TypeError
        If ``rng`` is of any other type, including the legacy
        :class:`numpy.random.RandomState` and ``bool``.
    ValueError
        If ``rng`` is a negative integer.

    Notes
    -----
    The package never touches NumPy's global random state. One seed is turned
    into one stream; callers that need several independent streams (weight
    initialisation, data order, masks) should spawn them from one
    :class:`numpy.random.SeedSequence` and pass a Generator per purpose.

    Examples
    --------
    >>> import numpy as np
    >>> from cpusparse.estimators import check_random_state
    >>> g = check_random_state(0)
    >>> isinstance(g, np.random.Generator)
    True
    >>> check_random_state(g) is g
    True
    """
    if rng is None:
        return np.random.default_rng()
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, numbers.Integral) and not isinstance(rng, bool | np.bool_):
        if rng < 0:
            raise ValueError(f"rng must be a non-negative integer seed, got {rng}")
        return np.random.default_rng(int(rng))
    raise TypeError(
        f"rng must be None, an int or a numpy.random.Generator, got {type(rng).__name__}"
    )


def sample_masks(score, n_samples, *, rng=None, return_uniforms=False):
    r"""Draw ``n_samples`` independent Bernoulli masks with keep probabilities ``score``.

    Parameters
    ----------
    score : array-like of shape (n,)
        Keep probabilities, finite and in [0, 1].
    n_samples : int
        Number of masks :math:`K`, at least 1.
    rng : None, int or numpy.random.Generator, default=None
        Source of randomness; see :func:`check_random_state`.
    return_uniforms : bool, default=False
        Also return the uniforms the masks were thresholded from.

    Returns
    -------
    masks : ndarray of shape (n_samples, n), dtype bool
        ``masks[k, i]`` is True when unit ``i`` is kept in sample ``k``.
    uniforms : ndarray of shape (n_samples, n), dtype float64
        Only if ``return_uniforms`` is True.

    Notes
    -----
    The draw order is part of the interface so that another implementation
    (for instance a GPU port) can replay exactly the same masks: one call

    .. code-block:: python

        u = rng.random((n_samples, n))  # float64, C order
        masks = u < score.astype(np.float64)

    so row :math:`k` holds sample :math:`k` and the uniforms are consumed
    row-major. Since :math:`u \in [0, 1)`,

    .. math::

        P(m_{ki} = 1) = P(u_{ki} < s_i) = s_i ,

    a unit with :math:`s_i = 0` is never kept and one with :math:`s_i = 1` is
    always kept. The comparison is done in float64 even for float32 scores.

    References
    ----------
    .. [1] X. Zhou et al., "Efficient Neural Network Training via Forward and
       Backward Propagation Sparsification", NeurIPS 2021. arXiv:2111.05685.

    Examples
    --------
    >>> import numpy as np
    >>> from cpusparse.estimators import sample_masks
    >>> masks, u = sample_masks([0.0, 0.5, 1.0], 4, rng=0, return_uniforms=True)
    >>> masks.shape, masks.dtype
    ((4, 3), dtype('bool'))
    >>> bool(masks[:, 0].any()), bool(masks[:, 2].all())
    (False, True)
    >>> bool(np.array_equal(masks, u < np.array([0.0, 0.5, 1.0])))
    True
    """
    score = _check_score(score)
    if not isinstance(n_samples, numbers.Integral) or isinstance(n_samples, bool | np.bool_):
        raise TypeError(f"n_samples must be an int, got {type(n_samples).__name__}")
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    generator = check_random_state(rng)
    uniforms = generator.random((int(n_samples), score.shape[0]))
    masks = uniforms < score.astype(np.float64)
    if return_uniforms:
        return masks, uniforms
    return masks


# ---------------------------------------------------------------------------
# Score function and gradient estimators
# ---------------------------------------------------------------------------


def score_function(masks, score, *, scaling="exact"):
    r"""Gradient of the Bernoulli log-likelihood :math:`\nabla_s \log p(m \mid s)`.

    Parameters
    ----------
    masks : ndarray of shape (n,) or (n_samples, n), dtype bool
        One mask or a stack of masks.
    score : array-like of shape (n,)
        Keep probabilities, finite and in [0, 1].
    scaling : {"exact", "sqrt"}, default="exact"
        ``"exact"`` gives the true score function; ``"sqrt"`` gives the form
        used in the authors' released code, rescaled by
        :math:`\sqrt{s(1-s)}` (see Notes).

    Returns
    -------
    grad_log_p : ndarray of the shape of ``masks``
        float32 if ``score`` is float32, float64 otherwise. The computation
        itself is always done in float64.

    Raises
    ------
    TypeError
        If ``masks`` is not boolean.
    ValueError
        If shapes disagree, ``score`` is not in [0, 1], or ``scaling`` is unknown.

    Notes
    -----
    With :math:`\log p(m \mid s) = \sum_i m_i \log s_i + (1 - m_i)\log(1 - s_i)`,

    .. math::

        \frac{\partial \log p(m \mid s)}{\partial s_i}
        = \frac{m_i}{s_i} - \frac{1 - m_i}{1 - s_i}
        = \frac{m_i - s_i}{s_i (1 - s_i)} .

    ``scaling="sqrt"`` returns
    :math:`(m_i - s_i) / \sqrt{s_i (1 - s_i)}`, i.e. the exact value multiplied
    by :math:`\sqrt{s_i(1 - s_i)}`; estimators built from it estimate a
    diagonally preconditioned gradient, not the gradient.

    Where :math:`s_i \in \{0, 1\}` the mask entry is deterministic, and the
    term is *defined* to be 0 for either scaling, whatever ``masks`` holds
    there (no epsilon is added, and no NaN or division warning is produced).
    This is the limit of the ``"sqrt"`` form, but not of the ``"exact"`` form:
    the one-sided derivative of :math:`\mathbb{E}[L]` at an endpoint is
    generally nonzero, so score-function estimators are unbiased only for
    coordinates with :math:`0 < s_i < 1` and return 0 for the others. A unit
    whose score reaches exactly 0 therefore receives no gradient from the loss.

    References
    ----------
    .. [1] X. Zhou et al., "Efficient Neural Network Training via Forward and
       Backward Propagation Sparsification", NeurIPS 2021. arXiv:2111.05685.

    Examples
    --------
    >>> import numpy as np
    >>> from cpusparse.estimators import score_function
    >>> s = np.array([0.0, 0.25, 0.5, 1.0])
    >>> score_function(np.array([False, True, False, True]), s)
    array([ 0.,  4., -2.,  0.])
    >>> score_function(np.array([False, True, False, True]), s, scaling="sqrt")
    array([ 0.  ,  1.732..., -1.  ,  0.  ])
    """
    _check_scaling(scaling)
    score = _check_score(score)
    masks = _check_masks(masks, score.shape[0], allow_1d=True)
    out = _score_function64(masks, score.astype(np.float64), scaling)
    return out.astype(_out_dtype(score), copy=False)


def _estimator_inputs(losses, masks, score, scaling, *, min_samples):
    _check_scaling(scaling)
    score = _check_score(score)
    masks = _check_masks(masks, score.shape[0], allow_1d=False)
    n_samples = masks.shape[0]
    if n_samples < min_samples:
        raise ValueError(
            f"masks must hold at least {min_samples} samples (n_samples >= {min_samples}), "
            f"got n_samples = {n_samples}"
        )
    losses = _check_losses(losses, n_samples)
    grad_log_p = _score_function64(masks, score.astype(np.float64), scaling)
    return losses, grad_log_p, _out_dtype(score)


def reinforce_grad(losses, masks, score, *, scaling="exact"):
    r"""REINFORCE estimate of :math:`\nabla_s \mathbb{E}_{m \sim p(m|s)} L(m)`.

    Parameters
    ----------
    losses : array-like of shape (n_samples,)
        Finite losses :math:`L_k = L(m_k)`.
    masks : ndarray of shape (n_samples, n), dtype bool
        The masks the losses were computed with, e.g. from :func:`sample_masks`.
    score : array-like of shape (n,)
        Keep probabilities the masks were drawn from.
    scaling : {"exact", "sqrt"}, default="exact"
        Passed to :func:`score_function`.

    Returns
    -------
    dscore : ndarray of shape (n,)
        float32 if ``score`` is float32, float64 otherwise.

    Notes
    -----
    The log-derivative identity
    :math:`\nabla_s p = p \, \nabla_s \log p` gives, for :math:`s \in (0,1)^n`,

    .. math::

        \nabla_s \mathbb{E}[L] = \sum_m L(m) \nabla_s p(m \mid s)
        = \mathbb{E}\big[L(m) \nabla_s \log p(m \mid s)\big]
        \approx \frac{1}{K} \sum_{k=1}^{K} L_k \nabla_s \log p(m_k \mid s).

    It is unbiased but not invariant to a constant added to the loss: adding
    :math:`c` adds :math:`\frac{c}{K}\sum_k \nabla_s \log p(m_k \mid s)`,
    which has mean zero but variance growing like :math:`c^2`. Use
    :func:`vrpge_grad` in practice; this function is the baseline. With
    ``scaling="sqrt"`` the mean is :math:`\sqrt{s(1-s)} \odot \nabla_s\mathbb{E}[L]`.

    References
    ----------
    .. [1] R. J. Williams, "Simple statistical gradient-following algorithms
       for connectionist reinforcement learning", Machine Learning 8, 1992.
    .. [2] X. Zhou et al., "Efficient Neural Network Training via Forward and
       Backward Propagation Sparsification", NeurIPS 2021. arXiv:2111.05685.

    Examples
    --------
    >>> import numpy as np
    >>> from cpusparse.estimators import reinforce_grad
    >>> masks = np.array([[True, False], [False, False]])
    >>> reinforce_grad([1.0, 3.0], masks, [0.5, 0.5])
    array([-2., -4.])
    """
    losses, grad_log_p, dtype = _estimator_inputs(losses, masks, score, scaling, min_samples=1)
    n_samples = losses.shape[0]
    dscore = (losses[:, None] * grad_log_p).sum(axis=0) / n_samples
    return dscore.astype(dtype, copy=False)


def vrpge_grad(losses, masks, score, *, scaling="exact"):
    r"""Variance-reduced policy-gradient estimate (VR-PGE) of :math:`\nabla_s \mathbb{E}[L]`.

    Parameters
    ----------
    losses : array-like of shape (n_samples,)
        Finite losses :math:`L_k = L(m_k)`, :math:`K = n\_samples \ge 2`.
    masks : ndarray of shape (n_samples, n), dtype bool
        The masks the losses were computed with, drawn independently from
        ``score`` (e.g. by :func:`sample_masks`).
    score : array-like of shape (n,)
        Keep probabilities the masks were drawn from.
    scaling : {"exact", "sqrt"}, default="exact"
        ``"exact"`` estimates the gradient. ``"sqrt"`` (the authors' released
        code) estimates :math:`\sqrt{s(1-s)} \odot \nabla_s \mathbb{E}[L]`,
        **not** the gradient.

    Returns
    -------
    dscore : ndarray of shape (n,)
        float32 if ``score`` is float32, float64 otherwise.

    Raises
    ------
    ValueError
        If fewer than two samples are given, shapes disagree or a loss is not
        finite.

    Notes
    -----
    Write :math:`g_k = \nabla_s \log p(m_k \mid s)` and
    :math:`\bar L = \frac1K \sum_j L_j`. The estimator is

    .. math::

        \hat g = \frac{1}{K - 1} \sum_{k=1}^{K} (L_k - \bar L)\, g_k .

    **Unbiased for every** :math:`K \ge 2`. Since
    :math:`L_k - \bar L = \frac{K-1}{K}\big(L_k - b_k\big)` with the
    leave-one-out baseline :math:`b_k = \frac{1}{K-1}\sum_{j \ne k} L_j`,

    .. math::

        \hat g = \frac{1}{K} \sum_{k=1}^{K} (L_k - b_k)\, g_k .

    :math:`b_k` depends only on the masks :math:`m_j, j \ne k`, which are
    independent of :math:`m_k`, and the score has mean zero,

    .. math::

        \mathbb{E}[g_k] = \sum_m p(m \mid s) \nabla_s \log p(m \mid s)
        = \nabla_s \sum_m p(m \mid s) = \nabla_s 1 = 0,

    so :math:`\mathbb{E}[b_k g_k] = \mathbb{E}[b_k]\,\mathbb{E}[g_k] = 0` and
    :math:`\mathbb{E}[\hat g] = \frac1K\sum_k \mathbb{E}[L_k g_k] = \nabla_s\mathbb{E}[L]`
    (the REINFORCE identity, see :func:`reinforce_grad`). This holds for
    coordinates with :math:`0 < s_i < 1`; the estimate is 0 where
    :math:`s_i \in \{0, 1\}` (see :func:`score_function`).

    **Only loss differences enter.** Replacing :math:`L_k` by :math:`L_k + c`
    replaces :math:`\bar L` by :math:`\bar L + c` and leaves every
    :math:`L_k - \bar L`, hence :math:`\hat g` and its variance, unchanged
    (up to rounding). REINFORCE instead gains a zero-mean term whose variance
    grows like :math:`c^2`.

    **The sqrt variant.** With ``scaling="sqrt"`` each :math:`g_k` is
    multiplied elementwise by :math:`\sqrt{s(1-s)}`, a constant given
    :math:`s`, so the same argument gives
    :math:`\mathbb{E}[\hat g] = \sqrt{s(1-s)} \odot \nabla_s\mathbb{E}[L]`,
    a positively preconditioned direction on :math:`(0,1)^n` (between the
    plain gradient and the natural gradient
    :math:`s(1-s) \odot \nabla_s\mathbb{E}[L]`, whose Fisher metric is
    :math:`1/(s(1-s))`). It is bounded near the endpoints and is the form the
    authors' code uses.

    References
    ----------
    .. [1] X. Zhou et al., "Efficient Neural Network Training via Forward and
       Backward Propagation Sparsification", NeurIPS 2021. arXiv:2111.05685.

    Examples
    --------
    >>> import numpy as np
    >>> from cpusparse.estimators import vrpge_grad
    >>> masks = np.array([[True, False], [False, False]])
    >>> vrpge_grad([1.0, 3.0], masks, [0.5, 0.5])
    array([-4.,  0.])
    >>> vrpge_grad([1001.0, 1003.0], masks, [0.5, 0.5])  # a constant does not matter
    array([-4.,  0.])
    """
    losses, grad_log_p, dtype = _estimator_inputs(losses, masks, score, scaling, min_samples=2)
    n_samples = losses.shape[0]
    centered = losses - losses.sum() / n_samples
    dscore = (centered[:, None] * grad_log_p).sum(axis=0) / (n_samples - 1)
    return dscore.astype(dtype, copy=False)


# ---------------------------------------------------------------------------
# Exhaustive-enumeration oracle
# ---------------------------------------------------------------------------


def _check_max_units(max_units):
    if not isinstance(max_units, numbers.Integral) or isinstance(max_units, bool | np.bool_):
        raise TypeError(f"max_units must be an int, got {type(max_units).__name__}")
    if max_units < 0:
        raise ValueError(f"max_units must be >= 0, got {max_units}")


def _all_masks(n):
    """All 2**n masks; row ``idx`` has ``m_j`` = bit ``n - 1 - j`` of ``idx``."""
    shifts = np.arange(n - 1, -1, -1)
    return ((np.arange(2**n)[:, None] >> shifts) & 1).astype(bool)


def _loss_table(loss_fn, score, max_units):
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
        value = loss_fn(masks[idx].copy())
        value = np.asarray(value)
        if value.shape != () or value.dtype.kind not in "fiub" or not np.isfinite(value):
            raise ValueError(
                f"loss_fn must return a finite real scalar, got {value!r} for mask {masks[idx]}"
            )
        table[idx] = value
    return table.reshape((2,) * n), score


def _contract_last(table, s_j):
    """Average the last axis (m_j in {0, 1}) with weights (1 - s_j, s_j)."""
    return table[..., 0] * (1.0 - s_j) + table[..., 1] * s_j


def exact_expectation(
    loss_fn: Callable[[np.ndarray], float], score, *, max_units: int = 20
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
    >>> from cpusparse.estimators import exact_expectation
    >>> exact_expectation(lambda m: float(m.sum()) ** 2, [0.5, 0.5])
    1.5
    """
    table, score = _loss_table(loss_fn, score, max_units)
    for j in range(score.shape[0] - 1, -1, -1):
        table = _contract_last(table, score[j])
    return float(table)


def exact_grad(loss_fn: Callable[[np.ndarray], float], score, *, max_units: int = 20) -> np.ndarray:
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
    >>> from cpusparse.estimators import exact_grad
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
