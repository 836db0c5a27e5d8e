r"""Dense NumPy reference for every masked sparse operation.

Every function here computes with *dense* weights of shape ``(n_out, n_in)`` and
dense masks, using plain BLAS products (``@``) and no Numba. They are the oracle of
the test suite and the dense baseline of the benchmarks: the sparse engine
(:mod:`cpusparse.engine.csr`, :mod:`cpusparse.engine.layers`) must agree with them within the
rounding of the dtype.

The masks follow :mod:`cpusparse.engine.csr`:

- ``weight_mask`` of shape ``(n_out, n_in)``: one bit per weight (weight granularity);
- ``row_mask`` of shape ``(n_out,)``: one bit per output unit (neuron granularity); a
  dropped unit outputs exactly 0, bias included;
- ``col_mask`` of shape ``(n_in,)``: inputs that may be nonzero; the rows of ``x``
  outside it are treated as zero (the previous layer dropped those units).

Activations are feature-major: ``x`` has shape ``(n_in, n_batch)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from .._typing import BoolArray
from ..engine.losses import softmax_cross_entropy

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["dense_forward", "dense_backward", "dense_mlp_loss_and_grads"]


def _bool_mask(mask: npt.ArrayLike | None, shape: Sequence[int], name: str) -> BoolArray | None:
    if mask is None:
        return None
    mask = np.asarray(mask)
    if mask.dtype != np.bool_:
        raise TypeError(f"{name} must be a boolean array, got dtype {mask.dtype}")
    if mask.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {mask.shape}")
    return mask


def _effective(
    weight: npt.ArrayLike,
    x: npt.ArrayLike,
    weight_mask: npt.ArrayLike | None,
    row_mask: npt.ArrayLike | None,
    col_mask: npt.ArrayLike | None,
) -> tuple[np.ndarray, np.ndarray, BoolArray | None, BoolArray | None]:
    """Masked weight and input, checked against each other."""
    weight = np.asarray(weight)
    x = np.asarray(x)
    if weight.ndim != 2:
        raise ValueError(f"weight must be 2-D (n_out, n_in), got shape {weight.shape}")
    n_out, n_in = weight.shape
    if x.ndim != 2 or x.shape[0] != n_in:
        raise ValueError(f"x must have shape ({n_in}, n_batch), got {x.shape}")
    weight_mask = _bool_mask(weight_mask, (n_out, n_in), "weight_mask")
    row_mask = _bool_mask(row_mask, (n_out,), "row_mask")
    col_mask = _bool_mask(col_mask, (n_in,), "col_mask")
    zero = weight.dtype.type(0)
    if weight_mask is not None:
        weight = np.where(weight_mask, weight, zero)
    if col_mask is not None:
        x = np.where(col_mask[:, None], x, x.dtype.type(0))
    return weight, x, row_mask, col_mask


def dense_forward(
    weight: npt.ArrayLike,
    bias: npt.ArrayLike | None,
    x: npt.ArrayLike,
    *,
    weight_mask: npt.ArrayLike | None = None,
    row_mask: npt.ArrayLike | None = None,
    col_mask: npt.ArrayLike | None = None,
    relu: bool = False,
) -> np.ndarray:
    r"""Dense reference of a masked sparse layer's forward pass.

    Parameters
    ----------
    weight : ndarray of shape (n_out, n_in)
        Dense weight matrix (zeros where nothing is stored).
    bias : ndarray of shape (n_out,) or None
        Bias; None means zero.
    x : ndarray of shape (n_in, n_batch)
        Feature-major input.
    weight_mask : ndarray of bool, shape (n_out, n_in), optional
        Weights kept (weight granularity).
    row_mask : ndarray of bool, shape (n_out,), optional
        Output units kept (neuron granularity); dropped rows output 0, bias included.
    col_mask : ndarray of bool, shape (n_in,), optional
        Inputs that may be nonzero; the other rows of ``x`` are treated as zero.
    relu : bool, default=False
        Apply ``max(., 0)``.

    Returns
    -------
    out : ndarray of shape (n_out, n_batch)

    Notes
    -----
    With :math:`M` the weight mask, :math:`r` the row mask and :math:`c` the column
    mask,

    .. math::

        \mathrm{out} = r \odot \operatorname{act}\bigl((W \odot M)
        (\operatorname{diag}(c)\, x) + b\bigr).

    References
    ----------
    .. [1] X. Zhou, W. Zhang, Z. Chen, S. Diao, T. Zhang, "Efficient Neural Network
       Training via Forward and Backward Propagation Sparsification", NeurIPS 2021,
       arXiv:2111.05685.

    Examples
    --------
    >>> w = np.array([[1.0, -2.0], [3.0, 4.0]])
    >>> x = np.array([[1.0], [1.0]])
    >>> dense_forward(w, np.array([0.5, 0.5]), x, row_mask=np.array([True, False]))
    array([[-0.5],
           [ 0. ]])
    >>> dense_forward(w, None, x, weight_mask=np.array([[True, False], [True, True]]), relu=True)
    array([[1.],
           [7.]])
    """
    weight, x, row_mask, _ = _effective(weight, x, weight_mask, row_mask, col_mask)
    out = weight @ x
    if bias is not None:
        bias = np.asarray(bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {bias.shape}")
        out = out + bias[:, None]
    if relu:
        out = np.maximum(out, out.dtype.type(0))
    if row_mask is not None:
        out = np.where(row_mask[:, None], out, out.dtype.type(0))
    return out


def dense_backward(
    weight: npt.ArrayLike,
    x: npt.ArrayLike,
    dout: npt.ArrayLike,
    out: npt.ArrayLike | None = None,
    *,
    weight_mask: npt.ArrayLike | None = None,
    row_mask: npt.ArrayLike | None = None,
    col_mask: npt.ArrayLike | None = None,
    relu: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Dense reference of a masked sparse layer's backward pass.

    Parameters
    ----------
    weight : ndarray of shape (n_out, n_in)
        Dense weight matrix.
    x : ndarray of shape (n_in, n_batch)
        The forward input.
    dout : ndarray of shape (n_out, n_batch)
        Gradient of the loss with respect to the output.
    out : ndarray of shape (n_out, n_batch), optional
        The forward output; required when ``relu`` is True.
    weight_mask, row_mask, col_mask, relu
        As in :func:`dense_forward`.

    Returns
    -------
    dx : ndarray of shape (n_in, n_batch)
        Zero in the rows outside ``col_mask`` (the layer computes with ``x`` zeroed
        there, so the loss does not depend on them).
    dweight : ndarray of shape (n_out, n_in)
        Zero wherever the weight is masked, in a dropped row or in a dropped column.
    dbias : ndarray of shape (n_out,)
        Zero in dropped rows.

    Notes
    -----
    With :math:`\delta = r \odot \mathrm{dout} \odot [\mathrm{out} > 0]` (the ReLU
    factor only when ``relu``) and :math:`\tilde x = \operatorname{diag}(c)\, x`,

    .. math::

        \frac{\partial L}{\partial W} = M \odot (\delta \tilde x^\top), \qquad
        \frac{\partial L}{\partial x} = \operatorname{diag}(c)\, (W \odot M)^\top \delta,
        \qquad \frac{\partial L}{\partial b} = \delta \mathbf{1}.

    The ReLU derivative is taken as 0 at 0.

    Examples
    --------
    >>> w = np.array([[1.0, -2.0]])
    >>> dx, dw, db = dense_backward(w, np.ones((2, 3)), np.ones((1, 3)),
    ...                             weight_mask=np.array([[True, False]]))
    >>> dx, dw, db
    (array([[1., 1., 1.],
           [0., 0., 0.]]), array([[3., 0.]]), array([3.]))
    """
    weight_mask = None if weight_mask is None else np.asarray(weight_mask)
    weight_eff, x_eff, row_mask, col_mask = _effective(weight, x, weight_mask, row_mask, col_mask)
    dout = np.asarray(dout)
    n_out = weight_eff.shape[0]
    if dout.shape != (n_out, x_eff.shape[1]):
        raise ValueError(f"dout must have shape {(n_out, x_eff.shape[1])}, got {dout.shape}")
    zero = dout.dtype.type(0)
    dpre = dout
    if relu:
        if out is None:
            raise ValueError("out is required when relu is True")
        out = np.asarray(out)
        if out.shape != dout.shape:
            raise ValueError(f"out must have shape {dout.shape}, got {out.shape}")
        dpre = np.where(out > 0, dpre, zero)
    if row_mask is not None:
        dpre = np.where(row_mask[:, None], dpre, zero)
    dweight = dpre @ x_eff.T
    if weight_mask is not None:
        dweight = np.where(weight_mask, dweight, zero)
    dbias = dpre.sum(axis=1)
    dx = weight_eff.T @ dpre
    if col_mask is not None:
        dx = np.where(col_mask[:, None], dx, zero)
    return dx, dweight, dbias


def _per_layer(
    masks: Iterable[npt.ArrayLike | None] | None, n_layers: int, name: str
) -> list[npt.ArrayLike | None]:
    if masks is None:
        return [None] * n_layers
    masks = list(masks)
    if len(masks) == n_layers - 1:
        masks.append(None)
    if len(masks) != n_layers:
        raise ValueError(
            f"{name} must hold one entry (array or None) per hidden layer ({n_layers - 1}) "
            f"or per layer ({n_layers}), got {len(masks)}"
        )
    return masks


def dense_mlp_loss_and_grads(
    weights: Iterable[npt.ArrayLike],
    biases: Iterable[npt.ArrayLike],
    x: npt.ArrayLike,
    y: npt.ArrayLike,
    *,
    weight_masks: Iterable[npt.ArrayLike | None] | None = None,
    row_masks: Iterable[npt.ArrayLike | None] | None = None,
) -> tuple[float, list[np.ndarray], list[np.ndarray]]:
    r"""Loss and gradients of a masked ReLU MLP with a softmax cross-entropy head.

    Layers ``0 .. L-2`` compute ``r * relu((W * M) @ h + b)``; the last layer is
    linear, ``(W * M) @ h + b``, followed by
    :func:`cpusparse.engine.losses.softmax_cross_entropy`.

    Parameters
    ----------
    weights : list of ndarray of shape (n_out, n_in)
        Dense weights, input layer first.
    biases : list of ndarray of shape (n_out,)
    x : ndarray of shape (n_in, n_batch)
        Feature-major input.
    y : ndarray of int, shape (n_batch,)
        Class labels.
    weight_masks : list of (ndarray of bool or None), optional
        One dense ``(n_out, n_in)`` mask per hidden layer, optionally followed by one
        for the classifier (a sparse classifier); None keeps every weight.
    row_masks : list of (ndarray of bool or None), optional
        One ``(n_out,)`` unit mask per hidden layer (neuron granularity), optionally
        followed by one for the classifier.

    Returns
    -------
    loss : float
    dweights : list of ndarray of shape (n_out, n_in)
        Zero at masked weights.
    dbiases : list of ndarray of shape (n_out,)

    Notes
    -----
    Plain backpropagation with :func:`dense_forward` and :func:`dense_backward`. A
    dropped unit outputs 0, so the next layer's inputs are already zero there and
    no column mask is needed.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> weights = [rng.standard_normal((4, 3)), rng.standard_normal((2, 4))]
    >>> biases = [np.zeros(4), np.zeros(2)]
    >>> x, y = rng.standard_normal((3, 5)), np.array([0, 1, 1, 0, 1])
    >>> loss, dw, db = dense_mlp_loss_and_grads(
    ...     weights, biases, x, y, row_masks=[np.array([True, False, True, True])])
    >>> [d.shape for d in dw], bool(np.all(dw[0][1] == 0)), bool(np.all(dw[1][:, 1] == 0))
    ([(4, 3), (2, 4)], True, True)
    """
    weights = list(weights)
    biases = list(biases)
    n_layers = len(weights)
    if n_layers == 0 or len(biases) != n_layers:
        raise ValueError(
            f"weights and biases must be nonempty lists of the same length, got "
            f"{n_layers} and {len(biases)}"
        )
    weight_masks = _per_layer(weight_masks, n_layers, "weight_masks")
    row_masks = _per_layer(row_masks, n_layers, "row_masks")

    inputs, outputs = [], []
    h = np.asarray(x)
    for i in range(n_layers):
        relu = i < n_layers - 1
        inputs.append(h)
        h = dense_forward(
            weights[i],
            biases[i],
            h,
            weight_mask=weight_masks[i],
            row_mask=row_masks[i],
            relu=relu,
        )
        outputs.append(h)
    loss, dout = softmax_cross_entropy(h, y)

    placeholder = np.empty(0)  # every entry is replaced below, last layer first
    dweights: list[np.ndarray] = [placeholder] * n_layers
    dbiases: list[np.ndarray] = [placeholder] * n_layers
    for i in range(n_layers - 1, -1, -1):
        dout, dweights[i], dbiases[i] = dense_backward(
            weights[i],
            inputs[i],
            dout,
            outputs[i],
            weight_mask=weight_masks[i],
            row_mask=row_masks[i],
            relu=i < n_layers - 1,
        )
    return loss, dweights, dbiases
