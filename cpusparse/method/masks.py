r"""Bernoulli masks over the keep probabilities, and their score function.

Each prunable unit :math:`i` carries a keep probability :math:`s_i \in [0, 1]`
(called ``score``) and a mask :math:`m_i \sim \mathrm{Bernoulli}(s_i)`, drawn
independently, with :math:`p(m \mid s) = \prod_i s_i^{m_i} (1 - s_i)^{1 - m_i}` [1]_.

Random numbers are drawn in exactly one place, :func:`sample_masks`, in one
documented order, so another implementation can replay the same masks: by default a
counter-based generator (Philox4x32-10), whose uniforms any thread can compute for any
block of units.
:func:`score_function` is :math:`\nabla_s \log p(m \mid s)`, the building block of
every score-function estimator (:mod:`cpusparse.method.estimators`).

References
----------
.. [1] X. Zhou, W. Zhang, Z. Chen, S. Diao and T. Zhang, "Efficient Neural
   Network Training via Forward and Backward Propagation Sparsification",
   NeurIPS 2021. arXiv:2111.05685.
"""

from __future__ import annotations

import numbers
from typing import TYPE_CHECKING, Literal, overload

import numpy as np

from .._typing import BoolArray, FloatArray, RNGLike
from .._validation import check_rng
from ..engine.kernels import philox

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["sample_masks", "score_function", "SCALINGS", "DRAWS"]

DRAWS = ("philox", "numpy")
"""How :func:`sample_masks` draws its uniforms (see its Notes)."""

SCALINGS = ("exact", "sqrt")
"""Scalings of the score function: the paper's ``s(1-s)``, the authors' ``sqrt(s(1-s))``."""


def _check_score(score: npt.ArrayLike) -> np.ndarray:
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


def _out_dtype(score: np.ndarray) -> np.dtype:
    """Output dtype rule: float32 stays float32, everything else is float64."""
    return np.dtype(np.float32) if score.dtype == np.float32 else np.dtype(np.float64)


def _check_scaling(scaling: str) -> None:
    if scaling not in SCALINGS:
        raise ValueError(f"scaling must be one of {SCALINGS}, got {scaling!r}")


def _check_masks(masks: npt.ArrayLike, n: int, *, allow_1d: bool) -> BoolArray:
    masks = np.asarray(masks)
    if masks.dtype != np.bool_:
        raise TypeError(f"masks must be a bool array, got dtype {masks.dtype}")
    ok_ndim = (1, 2) if allow_1d else (2,)
    if masks.ndim not in ok_ndim or masks.shape[-1] != n:
        want = "(n,) or (n_masks, n)" if allow_1d else "(n_masks, n)"
        raise ValueError(
            f"masks must have shape {want} with n = len(score) = {n}, got shape {masks.shape}"
        )
    return masks


def _score_function64(
    masks: BoolArray, score64: npt.NDArray[np.float64], scaling: str
) -> npt.NDArray[np.float64]:
    """Score function in float64; no validation. NOTE: score64 is float64, masks bool."""
    return _divide_by_variance(masks.astype(np.float64) - score64, score64, scaling)


def _divide_by_variance(
    numer: npt.NDArray[np.float64], score64: npt.NDArray[np.float64], scaling: str
) -> npt.NDArray[np.float64]:
    """``numer / (s (1 - s))`` (``sqrt`` of it for ``"sqrt"``), defined as 0 at s in {0, 1}.

    NOTE: score64 is float64; numer broadcasts against it.
    """
    interior = (score64 > 0) & (score64 < 1)
    var = score64 * (1.0 - score64)
    denom = var if scaling == "exact" else np.sqrt(var)
    out = np.zeros(np.broadcast_shapes(numer.shape, score64.shape), dtype=np.float64)
    np.divide(numer, denom, out=out, where=np.broadcast_to(interior, out.shape))
    return out


@overload
def sample_masks(
    score: npt.ArrayLike,
    n_masks: int,
    *,
    rng: RNGLike = None,
    return_uniforms: Literal[False] = False,
    draw: str = "philox",
) -> BoolArray: ...


@overload
def sample_masks(
    score: npt.ArrayLike,
    n_masks: int,
    *,
    rng: RNGLike = None,
    return_uniforms: Literal[True],
    draw: str = "philox",
) -> tuple[BoolArray, npt.NDArray[np.float64]]: ...


@overload
def sample_masks(
    score: npt.ArrayLike,
    n_masks: int,
    *,
    rng: RNGLike = None,
    return_uniforms: bool,
    draw: str = "philox",
) -> BoolArray | tuple[BoolArray, npt.NDArray[np.float64]]: ...


def sample_masks(
    score: npt.ArrayLike,
    n_masks: int,
    *,
    rng: RNGLike = None,
    return_uniforms: bool = False,
    draw: str = "philox",
) -> BoolArray | tuple[BoolArray, npt.NDArray[np.float64]]:
    r"""Draw ``n_masks`` independent Bernoulli masks with keep probabilities ``score``.

    Parameters
    ----------
    score : array-like of shape (n,)
        Keep probabilities, finite and in [0, 1].
    n_masks : int
        Number of masks :math:`K`, at least 1.
    rng : None, int or numpy.random.Generator, default=None
        Source of randomness; see :func:`~cpusparse.check_rng`.
    return_uniforms : bool, default=False
        Also return the uniforms the masks were thresholded from.
    draw : {"philox", "numpy"}, default="philox"
        How the uniforms are drawn (see Notes): a counter-based generator keyed by
        one draw from `rng` (parallel, no ``(n_masks, n)`` float array unless
        ``return_uniforms``), or one bulk ``rng.random`` call (the only draw of
        cpusparse 0.1, trace format versions 1 and 2).

    Returns
    -------
    masks : ndarray of shape (n_masks, n), dtype bool
        ``masks[k, i]`` is True when unit ``i`` is kept in sample ``k``.
    uniforms : ndarray of shape (n_masks, n), dtype float64
        Only if ``return_uniforms`` is True.

    Notes
    -----
    The draw order is part of the interface so that another implementation
    (for instance a GPU port) can replay exactly the same masks. With
    ``draw="philox"`` one 64-bit key is drawn,

    .. code-block:: python

        key = int(rng.integers(0, 2**64, dtype=np.uint64))
        k0, k1 = key & 0xFFFFFFFF, key >> 32

    and the uniforms of units ``4c, ..., 4c + 3`` of mask ``k`` are the four
    32-bit output words of Philox4x32-10 [2]_ (the generator of Random123 and of
    cuRAND's ``curand_Philox4x32_10``) on the counter
    ``(c mod 2**32, c // 2**32, k, 0)`` with the key ``(k0, k1)``, each times
    :math:`2^{-32}`, so that :math:`u \in [0, 1)` takes multiples of
    :math:`2^{-32}`. With ``draw="numpy"``,

    .. code-block:: python

        u = rng.random((n_masks, n))  # float64, C order

    so row :math:`k` holds sample :math:`k` and the uniforms are consumed
    row-major. Either way ``masks = u < score.astype(np.float64)`` and, since
    :math:`u \in [0, 1)`,

    .. math::

        P(m_{ki} = 1) = P(u_{ki} < s_i) = s_i

    (to :math:`2^{-32}` for Philox: :math:`\lceil 2^{32} s_i \rceil / 2^{32}`);
    a unit with :math:`s_i = 0` is never kept and one with :math:`s_i = 1` is
    always kept. The comparison is done in float64 even for float32 scores.

    References
    ----------
    .. [1] X. Zhou et al., "Efficient Neural Network Training via Forward and
       Backward Propagation Sparsification", NeurIPS 2021. arXiv:2111.05685.
    .. [2] J. K. Salmon, M. A. Moraes, R. O. Dror and D. E. Shaw, "Parallel random
       numbers: as easy as 1, 2, 3", SC 2011.

    Examples
    --------
    >>> import numpy as np
    >>> from cpusparse.method import sample_masks
    >>> masks, u = sample_masks([0.0, 0.5, 1.0], 4, rng=0, return_uniforms=True)
    >>> masks.shape, masks.dtype
    ((4, 3), dtype('bool'))
    >>> bool(masks[:, 0].any()), bool(masks[:, 2].all())
    (False, True)
    >>> bool(np.array_equal(masks, u < np.array([0.0, 0.5, 1.0])))
    True
    """
    score = _check_score(score)
    if not isinstance(n_masks, numbers.Integral) or isinstance(n_masks, bool | np.bool_):
        raise TypeError(f"n_masks must be an int, got {type(n_masks).__name__}")
    if n_masks < 1:
        raise ValueError(f"n_masks must be >= 1, got {n_masks}")
    if draw not in DRAWS:
        raise ValueError(f"draw must be one of {DRAWS}, got {draw!r}")
    masks, uniforms = _sample(score, int(n_masks), check_rng(rng), draw, return_uniforms)
    if return_uniforms:
        return masks, uniforms
    return masks


def _sample(
    score: np.ndarray, n_masks: int, generator: np.random.Generator, draw: str, with_uniforms: bool
) -> tuple[BoolArray, npt.NDArray[np.float64]]:
    """:func:`sample_masks` without validation (the training step's call).

    The uniforms are an empty array unless ``with_uniforms`` (or ``draw="numpy"``).
    """
    if draw == "numpy":
        uniforms = generator.random((n_masks, score.shape[0]))
        return uniforms < score.astype(np.float64), uniforms
    key = int(generator.integers(0, 2**64, dtype=np.uint64))
    k0, k1 = np.uint64(key & 0xFFFFFFFF), np.uint64(key >> 32)
    if score.dtype not in (np.float32, np.float64):
        score = score.astype(np.float64)
    masks = np.empty((n_masks, score.shape[0]), dtype=np.bool_)
    shape = masks.shape if with_uniforms else (0, 0)
    uniforms = np.empty(shape, dtype=np.float64)
    philox.philox_masks(score, k0, k1, masks, uniforms, with_uniforms)
    return masks, uniforms


def score_function(
    masks: npt.ArrayLike, score: npt.ArrayLike, *, scaling: str = "exact"
) -> FloatArray:
    r"""Gradient of the Bernoulli log-likelihood :math:`\nabla_s \log p(m \mid s)`.

    Parameters
    ----------
    masks : ndarray of shape (n,) or (n_masks, n), dtype bool
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
    >>> from cpusparse.method import score_function
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
