r"""Score-gradient estimators of :math:`\nabla_s \mathbb{E}_{m \sim p(m|s)} L(w \odot m)`.

The training problem of Zhou et al. (2021) [1]_ is

.. math::

    \min_{w,\, s} \; \mathbb{E}_{m \sim p(m \mid s)} \, L(w \odot m)
    \quad \text{s.t.} \quad s \in [0, 1]^n, \; \textstyle\sum_i s_i \le k .

The functions here turn :math:`K` sampled masks (:mod:`cpusparse.method.masks`) and
their losses into an estimate of the gradient with respect to :math:`s`.
:data:`SCORE_ESTIMATORS` is the registry the training step reads: one
:class:`ScoreEstimator` per name, so a new estimator is one entry, not a new branch.

References
----------
.. [1] X. Zhou, W. Zhang, Z. Chen, S. Diao and T. Zhang, "Efficient Neural
   Network Training via Forward and Backward Propagation Sparsification",
   NeurIPS 2021. arXiv:2111.05685.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from .._typing import BoolArray, FloatArray
from ..engine.kernels import scores as _score_kernels
from .masks import (
    _check_masks,
    _check_scaling,
    _check_score,
    _out_dtype,
    _score_function64,
)

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = [
    "reinforce_grad",
    "vrpge_grad",
    "ScoreEstimator",
    "SCORE_ESTIMATORS",
    "get_score_estimator",
]


def _check_losses(losses: npt.ArrayLike, n_masks: int) -> npt.NDArray[np.float64]:
    losses = np.asarray(losses)
    if losses.dtype.kind not in "fiu":
        raise TypeError(f"losses must be a real array, got dtype {losses.dtype}")
    if losses.shape != (n_masks,):
        raise ValueError(
            f"losses must have shape (n_masks,) = ({n_masks},) matching masks, "
            f"got shape {losses.shape}"
        )
    losses = losses.astype(np.float64)
    if not np.all(np.isfinite(losses)):
        raise ValueError("losses must be finite, got NaN or inf")
    return losses


def _estimator_inputs(
    losses: npt.ArrayLike,
    masks: npt.ArrayLike,
    score: npt.ArrayLike,
    scaling: str,
    *,
    min_masks: int,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64], np.dtype]:
    _check_scaling(scaling)
    score = _check_score(score)
    masks = _check_masks(masks, score.shape[0], allow_1d=False)
    n_masks = masks.shape[0]
    if n_masks < min_masks:
        raise ValueError(
            f"masks must hold at least {min_masks} masks (n_masks >= {min_masks}), "
            f"got n_masks = {n_masks}"
        )
    losses = _check_losses(losses, n_masks)
    grad_log_p = _score_function64(masks, score.astype(np.float64), scaling)
    return losses, grad_log_p, _out_dtype(score)


def reinforce_grad(
    losses: npt.ArrayLike, masks: npt.ArrayLike, score: npt.ArrayLike, *, scaling: str = "exact"
) -> FloatArray:
    r"""REINFORCE estimate of :math:`\nabla_s \mathbb{E}_{m \sim p(m|s)} L(m)`.

    Parameters
    ----------
    losses : array-like of shape (n_masks,)
        Finite losses :math:`L_k = L(m_k)`.
    masks : ndarray of shape (n_masks, n), dtype bool
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
    >>> from cpusparse.method import reinforce_grad
    >>> masks = np.array([[True, False], [False, False]])
    >>> reinforce_grad([1.0, 3.0], masks, [0.5, 0.5])
    array([-2., -4.])
    """
    losses, grad_log_p, dtype = _estimator_inputs(losses, masks, score, scaling, min_masks=1)
    n_masks = losses.shape[0]
    dscore = (losses[:, None] * grad_log_p).sum(axis=0) / n_masks
    return dscore.astype(dtype, copy=False)


def vrpge_grad(
    losses: npt.ArrayLike, masks: npt.ArrayLike, score: npt.ArrayLike, *, scaling: str = "exact"
) -> FloatArray:
    r"""Variance-reduced policy-gradient estimate (VR-PGE) of :math:`\nabla_s \mathbb{E}[L]`.

    Parameters
    ----------
    losses : array-like of shape (n_masks,)
        Finite losses :math:`L_k = L(m_k)`, :math:`K = n\_masks \ge 2`.
    masks : ndarray of shape (n_masks, n), dtype bool
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

    **What is computed: exact zeros.** Since :math:`\sum_k (L_k - \bar L) = 0`,
    the term :math:`-s` of :math:`g_k = (m_k - s) / (s(1-s))` cancels, and so does
    any other constant: with the mean mask :math:`\bar m = \frac1K \sum_k m_k`,

    .. math::

        \hat g = \frac{1}{K - 1}\, \frac{1}{s (1 - s)}
        \sum_{k=1}^{K} (L_k - \bar L)\, (m_k - \bar m) ,

    which is what this function computes (in float64): the centred losses
    :math:`c_k = L_k - (\sum_j L_j) / K`; the mean mask :math:`\bar m = (\sum_k m_k)
    / K`; the sum :math:`\sum_k c_k (m_k - \bar m)` accumulated over
    :math:`k = 1, \dots, K` in order from 0; divided by :math:`K - 1`, then by
    :math:`s(1-s)` (or its square root). Where every mask agrees on a unit,
    :math:`m_k - \bar m` is exactly 0 and so is the estimate, not a rounding
    residue of the paper's form.

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
    >>> from cpusparse.method import vrpge_grad
    >>> masks = np.array([[True, False], [False, False]])
    >>> vrpge_grad([1.0, 3.0], masks, [0.5, 0.5])
    array([-4.,  0.])
    >>> vrpge_grad([1001.0, 1003.0], masks, [0.5, 0.5])  # a constant does not matter
    array([-4.,  0.])
    """
    _check_scaling(scaling)
    score = _check_score(score)
    masks = _check_masks(masks, score.shape[0], allow_1d=False)
    n_masks = masks.shape[0]
    if n_masks < 2:
        raise ValueError(
            f"masks must hold at least 2 masks (n_masks >= 2), got n_masks = {n_masks}"
        )
    losses = _check_losses(losses, n_masks)
    centered = losses - losses.sum() / n_masks
    # Computed in float64, rounded once to the output dtype as it is stored.
    dscore = np.empty(score.shape[0], dtype=_out_dtype(score))
    _score_kernels.vrpge_scores(
        np.ascontiguousarray(masks), centered, score, scaling == "sqrt", dscore
    )
    return dscore


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------


class ScoreEstimator(NamedTuple):
    r"""How the training step gets the score gradient under one estimator name.

    Attributes
    ----------
    name : str
    grad : callable
        ``grad(losses, masks, score, mask_grads) -> dscore``: from the K losses and
        masks (a score-function estimator, forward passes only), or from the K
        gradients with respect to the mask ``mask_grads`` (straight-through).
    mask_gradient : bool
        True when the estimator needs :math:`\partial L / \partial m` from a dense
        forward and backward through the mask (straight-through); the step then runs
        every pass's backward in that mode and hands the mask gradients to ``grad``.
    description : str
        One line, for ``--help`` and the documentation.
    """

    name: str
    grad: Callable[
        [npt.NDArray[np.float64], BoolArray, FloatArray, Sequence[FloatArray]], FloatArray
    ]
    mask_gradient: bool
    description: str


def _vrpge(
    losses: npt.NDArray[np.float64], masks: BoolArray, score: FloatArray, _: object
) -> FloatArray:
    return vrpge_grad(losses, masks, score)


def _vrpge_sqrt(
    losses: npt.NDArray[np.float64], masks: BoolArray, score: FloatArray, _: object
) -> FloatArray:
    return vrpge_grad(losses, masks, score, scaling="sqrt")


def _reinforce(
    losses: npt.NDArray[np.float64], masks: BoolArray, score: FloatArray, _: object
) -> FloatArray:
    return reinforce_grad(losses, masks, score)


def _straight_through(
    losses: object, masks: object, score: FloatArray, mask_grads: Sequence[FloatArray]
) -> FloatArray:
    # dL/dm of each pass, averaged over the passes (summed in pass order).
    return (np.sum(mask_grads, axis=0) / len(mask_grads)).astype(score.dtype)


SCORE_ESTIMATORS = {
    e.name: e
    for e in (
        ScoreEstimator("vrpge", _vrpge, False, "the paper's VR-PGE, score scaled by s(1-s)"),
        ScoreEstimator(
            "vrpge-sqrt", _vrpge_sqrt, False, "VR-PGE with the authors' sqrt(s(1-s)) scaling"
        ),
        ScoreEstimator("reinforce", _reinforce, False, "plain policy gradient (REINFORCE)"),
        ScoreEstimator(
            "straight-through",
            _straight_through,
            True,
            "chain rule through the mask: dense forward and backward (the baseline)",
        ),
    )
}
"""The score-gradient estimators by name, in the order documented."""


def get_score_estimator(name: str) -> ScoreEstimator:
    """The :class:`ScoreEstimator` registered as ``name``.

    Raises
    ------
    ValueError
        If no estimator has that name; the message lists the known names.
    """
    try:
        return SCORE_ESTIMATORS[name]
    except (KeyError, TypeError):
        known = ", ".join(map(repr, SCORE_ESTIMATORS))
        raise ValueError(f"score_estimator must be one of {known}, got {name!r}") from None
