"""Softmax cross-entropy on feature-major logits."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .._typing import FloatArray
from .._validation import check_array

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["softmax", "softmax_cross_entropy"]


def softmax(logits: FloatArray) -> FloatArray:
    """Column-wise softmax of ``logits`` of shape (n_classes, n_batch).

    Examples
    --------
    >>> softmax(np.zeros((2, 1)))
    array([[0.5],
           [0.5]])
    """
    z = logits - logits.max(axis=0, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=0, keepdims=True)
    return z


def softmax_cross_entropy(logits: npt.ArrayLike, y: npt.ArrayLike) -> tuple[float, FloatArray]:
    r"""Mean softmax cross-entropy and its gradient with respect to the logits.

    Parameters
    ----------
    logits : ndarray of shape (n_classes, n_batch)
        Feature-major scores, one column per sample.
    y : ndarray of int, shape (n_batch,)
        Class labels in ``[0, n_classes)``.

    Returns
    -------
    loss : float
        :math:`-\frac{1}{B}\sum_b \log p_{y_b b}`.
    dlogits : ndarray of shape (n_classes, n_batch)
        :math:`(p - \mathrm{onehot}(y)) / B`, same dtype as ``logits``.

    Notes
    -----
    With :math:`p = \operatorname{softmax}(z)` column-wise, the loss of one sample
    is :math:`\operatorname{logsumexp}(z) - z_y` and its gradient is :math:`p - e_y`.
    The maximum of each column is subtracted first so that ``exp`` cannot overflow.

    Examples
    --------
    >>> loss, d = softmax_cross_entropy(np.zeros((2, 2)), np.array([0, 1]))
    >>> round(loss, 6), d
    (0.693147, array([[-0.25,  0.25],
           [ 0.25, -0.25]]))
    """
    logits = check_array(logits, "logits", ndim=2)
    y = np.asarray(y)
    n_classes, n_batch = logits.shape
    if y.shape != (n_batch,) or not np.issubdtype(y.dtype, np.integer):
        raise ValueError(
            f"y must be an integer array of shape ({n_batch},), got {y.dtype} of shape {y.shape}"
        )
    if n_batch == 0:
        raise ValueError("logits must have at least one column (sample), got 0")
    if y.min() < 0 or y.max() >= n_classes:
        raise ValueError(f"y must be in [0, {n_classes}), got values in [{y.min()}, {y.max()}]")
    cols = np.arange(n_batch)
    shifted = logits - logits.max(axis=0, keepdims=True)
    log_norm = np.log(np.exp(shifted).sum(axis=0))
    loss = float(np.mean(log_norm - shifted[y, cols], dtype=np.float64))
    dlogits = np.exp(shifted - log_norm)
    dlogits[y, cols] -= 1
    dlogits /= n_batch
    return loss, dlogits
