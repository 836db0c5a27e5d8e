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

The references of the convolutional layers (:func:`conv2d_forward`,
:func:`batch_norm_forward`, :func:`max_pool2d_forward`, :func:`avg_pool2d_forward` and
their backward passes) take channel-major image batches ``(C, N, H, W)``, weights in
PyTorch's ``(C_out, C_in, kh, kw)`` layout, and follow PyTorch's arithmetic; they
refuse mixed float32/float64 inputs with a TypeError.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from .._typing import BoolArray
from .._validation import check_array, check_same_dtype
from ..engine.losses import softmax_cross_entropy

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = [
    "dense_forward",
    "dense_backward",
    "dense_mlp_loss_and_grads",
    "conv2d_forward",
    "conv2d_backward",
    "batch_norm_forward",
    "batch_norm_backward",
    "batch_norm_running_stats",
    "max_pool2d_forward",
    "max_pool2d_backward",
    "avg_pool2d_forward",
    "avg_pool2d_backward",
]


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


# ---------------------------------------------------------------------------- images
#
# Dense references of the convolutional layers. Images are channel-major,
# ``(C, N, H, W)``; weights are PyTorch's ``(C_out, C_in, kh, kw)``. Plain NumPy, no
# im2col: every window offset ``(i, j)`` is one strided slice of the padded input.


def _same_dtype(**arrays: np.ndarray | None) -> None:
    """TypeError unless the arrays given (None skipped) share one dtype."""
    check_same_dtype(*[(name, a) for name, a in arrays.items() if a is not None])


def _images(x: npt.ArrayLike, name: str) -> np.ndarray:
    x = check_array(x, name)
    if x.ndim != 4:
        raise ValueError(
            f"{name} must be a 4-D channel-major image batch (C, N, H, W), got shape {x.shape}"
        )
    return x


def _int_pair(value: int | Sequence[int], name: str, minimum: int) -> tuple[int, int]:
    if isinstance(value, int | np.integer):
        items = [value, value]
    elif isinstance(value, tuple | list):
        items = list(value)
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if len(items) != 2 or not all(
        isinstance(v, int | np.integer) and not isinstance(v, bool) for v in items
    ):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(items) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return int(items[0]), int(items[1])


_Pair = tuple[int, int]


def _window(
    shape: Sequence[int],
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None,
    padding: int | Sequence[int],
) -> tuple[_Pair, _Pair, _Pair, _Pair]:
    """``(kernel, stride, padding, output size)`` of windows over ``(..., H, W)``."""
    kernel = _int_pair(kernel_size, "kernel_size", 1)
    step = kernel if stride is None else _int_pair(stride, "stride", 1)
    pad = _int_pair(padding, "padding", 0)
    height, width = shape[-2] + 2 * pad[0], shape[-1] + 2 * pad[1]
    if height < kernel[0] or width < kernel[1]:
        raise ValueError(
            f"kernel_size {kernel} must fit in the padded input, got {height} x {width}"
        )
    size = ((height - kernel[0]) // step[0] + 1, (width - kernel[1]) // step[1] + 1)
    return kernel, step, pad, size


def _pool_window(
    shape: Sequence[int],
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None,
    padding: int | Sequence[int],
) -> tuple[_Pair, _Pair, _Pair, _Pair]:
    """:func:`_window` for a pool, whose padding is at most half the kernel (PyTorch)."""
    kernel, step, pad, size = _window(shape, kernel_size, stride, padding)
    if 2 * pad[0] > kernel[0] or 2 * pad[1] > kernel[1]:
        raise ValueError(f"padding must be at most half of kernel_size {kernel}, got {pad}")
    return kernel, step, pad, size


def _offsets(kernel: _Pair, step: _Pair, size: _Pair) -> Iterable[tuple[int, int, slice, slice]]:
    """``(i, j, rows, cols)`` for each window offset ``(i, j)``, in row-major order.

    ``xp[:, :, rows, cols]`` is the element at offset ``(i, j)`` of every window of the
    padded input ``xp``, shape ``(C, N, H_out, W_out)``.
    """
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            rows = slice(i, i + step[0] * (size[0] - 1) + 1, step[0])
            cols = slice(j, j + step[1] * (size[1] - 1) + 1, step[1])
            yield i, j, rows, cols


def _pad(x: np.ndarray, pad: _Pair, value: float = 0.0) -> np.ndarray:
    return np.pad(x, ((0, 0), (0, 0), (pad[0],) * 2, (pad[1],) * 2), constant_values=value)


def _unpad(xp: np.ndarray, pad: _Pair, shape: Sequence[int]) -> np.ndarray:
    return np.ascontiguousarray(xp[:, :, pad[0] : pad[0] + shape[2], pad[1] : pad[1] + shape[3]])


def _check_conv(x: np.ndarray, weight: np.ndarray) -> None:
    if weight.ndim != 4 or weight.shape[1] != x.shape[0]:
        raise ValueError(
            f"weight must have shape (C_out, {x.shape[0]}, kh, kw) (C_in = x.shape[0]), got "
            f"{weight.shape}"
        )


def conv2d_forward(
    x: npt.ArrayLike,
    weight: npt.ArrayLike,
    bias: npt.ArrayLike | None = None,
    *,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
) -> np.ndarray:
    r"""Dense reference of a 2-D convolution (PyTorch's ``conv2d``, a cross-correlation).

    Parameters
    ----------
    x : ndarray of shape (C_in, N, H, W)
        Channel-major image batch.
    weight : ndarray of shape (C_out, C_in, kh, kw)
        PyTorch's layout.
    bias : ndarray of shape (C_out,) or None
        None means zero.
    stride : int or (int, int), default=1
    padding : int or (int, int), default=0
        Zero padding on each side.

    Returns
    -------
    out : ndarray of shape (C_out, N, H_out, W_out)
        With :math:`H_{out} = \lfloor (H + 2p_h - k_h) / s_h \rfloor + 1`, the same for
        the width.

    Notes
    -----
    With :math:`\tilde x` the padded input,

    .. math::

        \mathrm{out}_{o,n,h,w} = b_o + \sum_{c,i,j} W_{o,c,i,j}\,
        \tilde x_{c,\,n,\,s_h h + i,\,s_w w + j},

    one ``tensordot`` over the input channels per offset :math:`(i, j)`.

    Examples
    --------
    >>> x = np.arange(9.0).reshape(1, 1, 3, 3)
    >>> conv2d_forward(x, np.ones((1, 1, 2, 2)), np.array([0.5]))[0, 0]
    array([[ 8.5, 12.5],
           [20.5, 24.5]])
    """
    x = _images(x, "x")
    weight = check_array(weight, "weight")
    bias = None if bias is None else check_array(bias, "bias")
    _same_dtype(x=x, weight=weight, bias=bias)
    _check_conv(x, weight)
    kernel, step, pad, size = _window(x.shape, weight.shape[2:], stride, padding)
    xp = _pad(x, pad)
    out = np.zeros((weight.shape[0], x.shape[1], *size), dtype=x.dtype)
    for i, j, rows, cols in _offsets(kernel, step, size):
        out += np.tensordot(weight[:, :, i, j], xp[:, :, rows, cols], axes=(1, 0))
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {bias.shape}")
        out += bias[:, None, None, None]
    return out


def conv2d_backward(
    x: npt.ArrayLike,
    weight: npt.ArrayLike,
    dout: npt.ArrayLike,
    *,
    stride: int | Sequence[int] = 1,
    padding: int | Sequence[int] = 0,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Dense reference of the gradients of :func:`conv2d_forward`.

    Parameters
    ----------
    x : ndarray of shape (C_in, N, H, W)
        The forward input.
    weight : ndarray of shape (C_out, C_in, kh, kw)
    dout : ndarray of shape (C_out, N, H_out, W_out)
        Gradient of the loss with respect to the output.
    stride, padding : int or (int, int)
        As in the forward pass.

    Returns
    -------
    dx : ndarray of shape (C_in, N, H, W)
    dweight : ndarray of shape (C_out, C_in, kh, kw)
    dbias : ndarray of shape (C_out,)

    Notes
    -----
    With :math:`\tilde x^{(i,j)}` the strided slice of the padded input that meets
    :math:`W_{:,:,i,j}` (as in the forward pass),

    .. math::

        \frac{\partial L}{\partial W_{o,c,i,j}} = \sum_{n,h,w} \mathrm{dout}_{o,n,h,w}
        \,\tilde x^{(i,j)}_{c,n,h,w}, \qquad
        \frac{\partial L}{\partial \tilde x^{(i,j)}_{c}} \mathrel{+}= \sum_o W_{o,c,i,j}
        \,\mathrm{dout}_o, \qquad \frac{\partial L}{\partial b_o} = \sum_{n,h,w}
        \mathrm{dout}_{o,n,h,w};

    ``dx`` is the gradient of the padded input without its border.

    Examples
    --------
    >>> x = np.arange(9.0).reshape(1, 1, 3, 3)
    >>> dx, dw, db = conv2d_backward(x, np.ones((1, 1, 2, 2)), np.ones((1, 1, 2, 2)))
    >>> dx[0, 0]
    array([[1., 2., 1.],
           [2., 4., 2.],
           [1., 2., 1.]])
    >>> dw[0, 0], db
    (array([[ 8., 12.],
           [20., 24.]]), array([4.]))
    """
    x = _images(x, "x")
    weight = check_array(weight, "weight")
    dout = check_array(dout, "dout")
    _same_dtype(x=x, weight=weight, dout=dout)
    _check_conv(x, weight)
    kernel, step, pad, size = _window(x.shape, weight.shape[2:], stride, padding)
    expected = (weight.shape[0], x.shape[1], *size)
    if dout.shape != expected:
        raise ValueError(f"dout must have shape {expected}, got {dout.shape}")
    xp = _pad(x, pad)
    dxp = np.zeros_like(xp)
    dweight = np.zeros_like(weight)
    for i, j, rows, cols in _offsets(kernel, step, size):
        patch = xp[:, :, rows, cols]
        dweight[:, :, i, j] = np.tensordot(dout, patch, axes=([1, 2, 3], [1, 2, 3]))
        dxp[:, :, rows, cols] += np.tensordot(weight[:, :, i, j], dout, axes=(0, 0))
    return _unpad(dxp, pad, x.shape), dweight, dout.sum(axis=(1, 2, 3))


def _channels_first(x: npt.ArrayLike) -> np.ndarray:
    x = check_array(x, "x")
    if x.ndim not in (2, 4):
        raise ValueError(
            f"x must be (C, N) activations or a (C, N, H, W) image batch, got shape {x.shape}"
        )
    return x


def _per_channel(n_channels: int, **arrays: np.ndarray | None) -> None:
    for name, a in arrays.items():
        if a is not None and a.shape != (n_channels,):
            raise ValueError(f"{name} must have shape ({n_channels},), got {a.shape}")


def _norm_stats(
    x: np.ndarray,
    training: bool,
    running_mean: npt.ArrayLike | None,
    running_var: npt.ArrayLike | None,
    eps: float,
) -> tuple[np.ndarray, np.ndarray]:
    """``(xhat, inv_std)``: the normalised input and 1 / std, shaped to broadcast on x."""
    axes = tuple(range(1, x.ndim))
    column = (-1,) + (1,) * (x.ndim - 1)
    if training:
        if x[0].size < 2:
            raise ValueError(
                f"expected more than 1 value per channel when training, got x of shape {x.shape}"
            )
        mean = x.mean(axis=axes)
        var = ((x - mean.reshape(column)) ** 2).mean(axis=axes)
    else:
        if running_mean is None or running_var is None:
            raise ValueError("running_mean and running_var are required when training=False")
        mean = check_array(running_mean, "running_mean")
        var = check_array(running_var, "running_var")
        _same_dtype(x=x, running_mean=mean, running_var=var)
        _per_channel(x.shape[0], running_mean=mean, running_var=var)
    inv_std = (1 / np.sqrt(var + eps)).reshape(column)
    return (x - mean.reshape(column)) * inv_std, inv_std


def batch_norm_forward(
    x: npt.ArrayLike,
    weight: npt.ArrayLike,
    bias: npt.ArrayLike,
    *,
    eps: float = 1e-5,
    training: bool,
    running_mean: npt.ArrayLike | None = None,
    running_var: npt.ArrayLike | None = None,
) -> np.ndarray:
    r"""Dense reference of batch normalisation, channels on axis 0 (PyTorch's arithmetic).

    Parameters
    ----------
    x : ndarray of shape (C, N) or (C, N, H, W)
        Feature-major activations or a channel-major image batch.
    weight, bias : ndarray of shape (C,)
        :math:`\gamma` and :math:`\beta`.
    eps : float, default=1e-5
    training : bool
        Normalise with the batch statistics (biased variance) if True, else with the
        running statistics.
    running_mean, running_var : ndarray of shape (C,), optional
        Required when ``training`` is False; never modified (see
        :func:`batch_norm_running_stats` for the update).

    Returns
    -------
    out : ndarray of the shape of ``x``

    Notes
    -----
    Per channel,

    .. math::

        \mathrm{out} = \gamma \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}} + \beta,

    with :math:`\mu, \sigma^2` the mean and the biased variance over every axis but
    the first (training), or the running statistics (evaluation).

    Examples
    --------
    >>> x = np.array([[1.0, 3.0], [0.0, 4.0]])
    >>> batch_norm_forward(x, np.ones(2), np.zeros(2), eps=0.0, training=True)
    array([[-1.,  1.],
           [-1.,  1.]])
    """
    x = _channels_first(x)
    weight = check_array(weight, "weight")
    bias = check_array(bias, "bias")
    _same_dtype(x=x, weight=weight, bias=bias)
    _per_channel(x.shape[0], weight=weight, bias=bias)
    xhat, _ = _norm_stats(x, training, running_mean, running_var, eps)
    column = (-1,) + (1,) * (x.ndim - 1)
    return weight.reshape(column) * xhat + bias.reshape(column)


def batch_norm_backward(
    x: npt.ArrayLike,
    weight: npt.ArrayLike,
    dout: npt.ArrayLike,
    *,
    eps: float = 1e-5,
    training: bool,
    running_mean: npt.ArrayLike | None = None,
    running_var: npt.ArrayLike | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    r"""Dense reference of the gradients of :func:`batch_norm_forward`.

    Parameters
    ----------
    x : ndarray of shape (C, N) or (C, N, H, W)
        The forward input.
    weight : ndarray of shape (C,)
    dout : ndarray of the shape of ``x``
        Gradient of the loss with respect to the output.
    eps, training, running_mean, running_var
        As in the forward pass.

    Returns
    -------
    dx : ndarray of the shape of ``x``
    dweight, dbias : ndarray of shape (C,)

    Notes
    -----
    With :math:`g` = ``dout``, :math:`M` the number of values per channel,
    :math:`\hat x` the normalised input and sums over every axis but the first:
    :math:`\partial L / \partial \gamma = \sum g \hat x`,
    :math:`\partial L / \partial \beta = \sum g`, and in training

    .. math::

        \frac{\partial L}{\partial x} = \frac{\gamma}{M \sqrt{\sigma^2 + \epsilon}}
        \Bigl(M g - \sum g - \hat x \sum g \hat x\Bigr),

    in evaluation :math:`\gamma g / \sqrt{\sigma^2_r + \epsilon}`.

    Examples
    --------
    >>> x = np.array([[1.0, 3.0]])
    >>> batch_norm_backward(x, np.ones(1), np.array([[1.0, 0.0]]), eps=0.0, training=True)
    (array([[0., 0.]]), array([-1.]), array([1.]))
    """
    x = _channels_first(x)
    weight = check_array(weight, "weight")
    dout = check_array(dout, "dout")
    _same_dtype(x=x, weight=weight, dout=dout)
    _per_channel(x.shape[0], weight=weight)
    if dout.shape != x.shape:
        raise ValueError(f"dout must have shape {x.shape}, got {dout.shape}")
    xhat, inv_std = _norm_stats(x, training, running_mean, running_var, eps)
    axes = tuple(range(1, x.ndim))
    column = (-1,) + (1,) * (x.ndim - 1)
    dbias = dout.sum(axis=axes)
    dweight = (dout * xhat).sum(axis=axes)
    scale = weight.reshape(column) * inv_std
    if training:
        m = x[0].size
        dx = scale / m * (m * dout - dbias.reshape(column) - xhat * dweight.reshape(column))
    else:
        dx = scale * dout
    return dx, dweight, dbias


def batch_norm_running_stats(
    x: npt.ArrayLike,
    running_mean: npt.ArrayLike,
    running_var: npt.ArrayLike,
    *,
    momentum: float = 0.1,
) -> tuple[np.ndarray, np.ndarray]:
    r"""The running statistics after one training pass on ``x``, as new arrays.

    Parameters
    ----------
    x : ndarray of shape (C, N) or (C, N, H, W)
        The pass's input.
    running_mean, running_var : ndarray of shape (C,)
        Before the pass (not modified).
    momentum : float, default=0.1

    Returns
    -------
    running_mean, running_var : ndarray of shape (C,)

    Notes
    -----
    PyTorch's update, with the *unbiased* variance of the :math:`M` values per
    channel: :math:`\mu_r \leftarrow (1 - m)\mu_r + m\mu` and
    :math:`\sigma^2_r \leftarrow (1 - m)\sigma^2_r + m \frac{M}{M-1}\sigma^2`.

    Examples
    --------
    >>> batch_norm_running_stats(np.array([[1.0, 3.0]]), np.zeros(1), np.ones(1))
    (array([0.2]), array([1.1]))
    """
    x = _channels_first(x)
    mean = check_array(running_mean, "running_mean")
    var = check_array(running_var, "running_var")
    _same_dtype(x=x, running_mean=mean, running_var=var)
    _per_channel(x.shape[0], running_mean=mean, running_var=var)
    if x[0].size < 2:
        raise ValueError(
            f"expected more than 1 value per channel when training, got x of shape {x.shape}"
        )
    axes = tuple(range(1, x.ndim))
    batch_mean = x.mean(axis=axes)
    unbiased = x.var(axis=axes, ddof=1)
    new_mean = (1 - momentum) * mean + momentum * batch_mean
    new_var = (1 - momentum) * var + momentum * unbiased
    return new_mean, new_var


def max_pool2d_forward(
    x: npt.ArrayLike,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
) -> np.ndarray:
    r"""Dense reference of 2-D max pooling, as PyTorch's ``max_pool2d``.

    Parameters
    ----------
    x : ndarray of shape (C, N, H, W)
        Channel-major image batch.
    kernel_size : int or (int, int)
    stride : int or (int, int), optional
        Default ``kernel_size``.
    padding : int or (int, int), default=0
        :math:`-\infty` padding on each side.

    Returns
    -------
    out : ndarray of shape (C, N, H_out, W_out)
        :math:`H_{out} = \lfloor (H + 2p_h - k_h) / s_h \rfloor + 1`, the same for the
        width.

    Examples
    --------
    >>> x = np.arange(16.0).reshape(1, 1, 4, 4)
    >>> max_pool2d_forward(x, 2)[0, 0]
    array([[ 5.,  7.],
           [13., 15.]])
    """
    x = _images(x, "x")
    kernel, step, pad, size = _pool_window(x.shape, kernel_size, stride, padding)
    best, _ = _max_pool(x, kernel, step, pad, size)
    return best


def _max_pool(
    x: np.ndarray, kernel: _Pair, step: _Pair, pad: _Pair, size: _Pair
) -> tuple[np.ndarray, np.ndarray]:
    """Window maxima and the offset number ``i * kw + j`` of each (the first, row-major)."""
    xp = _pad(x, pad, -np.inf)
    best = np.full((*x.shape[:2], *size), -np.inf, dtype=x.dtype)
    where = np.full(best.shape, -1)
    for i, j, rows, cols in _offsets(kernel, step, size):
        patch = xp[:, :, rows, cols]
        better = patch > best  # strict: a tie keeps the earlier offset
        best = np.where(better, patch, best)
        where = np.where(better, i * kernel[1] + j, where)
    return best, where


def max_pool2d_backward(
    x: npt.ArrayLike,
    dout: npt.ArrayLike,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
) -> np.ndarray:
    """Dense reference of the input gradient of :func:`max_pool2d_forward`.

    Parameters
    ----------
    x : ndarray of shape (C, N, H, W)
        The forward input.
    dout : ndarray of shape (C, N, H_out, W_out)
        Gradient of the loss with respect to the output.
    kernel_size, stride, padding
        As in the forward pass.

    Returns
    -------
    dx : ndarray of shape (C, N, H, W)
        Each output's gradient added at its window's maximum; when several positions
        tie, at the first in row-major order (PyTorch's rule).

    Examples
    --------
    >>> x = np.ones((1, 1, 2, 2))
    >>> max_pool2d_backward(x, np.array([[[[3.0]]]]), 2)[0, 0]
    array([[3., 0.],
           [0., 0.]])
    """
    x = _images(x, "x")
    dout = check_array(dout, "dout")
    _same_dtype(x=x, dout=dout)
    kernel, step, pad, size = _pool_window(x.shape, kernel_size, stride, padding)
    if dout.shape != (*x.shape[:2], *size):
        raise ValueError(f"dout must have shape {(*x.shape[:2], *size)}, got {dout.shape}")
    _, where = _max_pool(x, kernel, step, pad, size)
    dxp = np.zeros((*x.shape[:2], x.shape[2] + 2 * pad[0], x.shape[3] + 2 * pad[1]), x.dtype)
    zero = x.dtype.type(0)
    for i, j, rows, cols in _offsets(kernel, step, size):
        dxp[:, :, rows, cols] += np.where(where == i * kernel[1] + j, dout, zero)
    return _unpad(dxp, pad, x.shape)


def avg_pool2d_forward(
    x: npt.ArrayLike,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
) -> np.ndarray:
    r"""Dense reference of 2-D average pooling, as PyTorch's ``avg_pool2d``.

    Padding is zero and counts in the average (``count_include_pad=True``): every
    window is divided by :math:`k_h k_w`.

    Parameters
    ----------
    x : ndarray of shape (C, N, H, W)
        Channel-major image batch.
    kernel_size : int or (int, int)
    stride : int or (int, int), optional
        Default ``kernel_size``.
    padding : int or (int, int), default=0

    Returns
    -------
    out : ndarray of shape (C, N, H_out, W_out)

    Examples
    --------
    >>> x = np.arange(16.0).reshape(1, 1, 4, 4)
    >>> avg_pool2d_forward(x, 2)[0, 0]
    array([[ 2.5,  4.5],
           [10.5, 12.5]])
    """
    x = _images(x, "x")
    kernel, step, pad, size = _pool_window(x.shape, kernel_size, stride, padding)
    xp = _pad(x, pad)
    total = np.zeros((*x.shape[:2], *size), dtype=x.dtype)
    for _, _, rows, cols in _offsets(kernel, step, size):
        total += xp[:, :, rows, cols]
    return total / x.dtype.type(kernel[0] * kernel[1])


def avg_pool2d_backward(
    x: npt.ArrayLike,
    dout: npt.ArrayLike,
    kernel_size: int | Sequence[int],
    stride: int | Sequence[int] | None = None,
    padding: int | Sequence[int] = 0,
) -> np.ndarray:
    """Dense reference of the input gradient of :func:`avg_pool2d_forward`.

    Parameters
    ----------
    x : ndarray of shape (C, N, H, W)
        The forward input (only its shape and dtype matter).
    dout : ndarray of shape (C, N, H_out, W_out)
        Gradient of the loss with respect to the output.
    kernel_size, stride, padding
        As in the forward pass.

    Returns
    -------
    dx : ndarray of shape (C, N, H, W)
        ``dout / (kh * kw)`` added over each window.

    Examples
    --------
    >>> avg_pool2d_backward(np.zeros((1, 1, 2, 2)), np.array([[[[4.0]]]]), 2)[0, 0]
    array([[1., 1.],
           [1., 1.]])
    """
    x = _images(x, "x")
    dout = check_array(dout, "dout")
    _same_dtype(x=x, dout=dout)
    kernel, step, pad, size = _pool_window(x.shape, kernel_size, stride, padding)
    if dout.shape != (*x.shape[:2], *size):
        raise ValueError(f"dout must have shape {(*x.shape[:2], *size)}, got {dout.shape}")
    grad = dout / dout.dtype.type(kernel[0] * kernel[1])
    dxp = np.zeros((*x.shape[:2], x.shape[2] + 2 * pad[0], x.shape[3] + 2 * pad[1]), x.dtype)
    for _, _, rows, cols in _offsets(kernel, step, size):
        dxp[:, :, rows, cols] += grad
    return _unpad(dxp, pad, x.shape)
