"""Network builders (:func:`mlp`, :func:`vgg`, :func:`resnet`) and their cost.

:func:`mlp` builds MLPs, :func:`vgg` and :func:`resnet` the paper's CNN families, and
:func:`count_macs` counts the multiply-adds a network executes with given masks.

The CNNs take channel-major images ``(C, N, H, W)`` (see
:mod:`cpusparse.engine.layers.base`). Every convolution is prunable (one mask bit per
output channel by default) and followed by a batch norm, which puts a dropped
channel's output at exactly 0; the classifier stays dense, as in the authors' code.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, TypedDict

import numpy as np

from ._typing import RNGLike
from ._validation import check_density, check_rng
from .engine.containers import Residual, Sequential
from .engine.layers.activation import ReLU
from .engine.layers.base import Layer
from .engine.layers.conv import CONV_GRANULARITIES, Conv2d
from .engine.layers.linear import GRANULARITIES, Linear, SparseLinear
from .engine.layers.norm import BatchNorm2d
from .engine.layers.pool import GlobalAvgPool2d, MaxPool2d

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["mlp", "vgg", "resnet", "count_macs"]


class _InitOptions(TypedDict):
    # The keywords that every layer of mlp() is initialised with.
    init: str
    fan_in_scale: float
    dtype: npt.DTypeLike
    rng: np.random.Generator


def _check_size(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return int(value)


def mlp(
    n_in: int,
    hidden_layer_sizes: Iterable[int],
    n_out: int,
    *,
    granularity: str = "weight",
    sparse_classifier: bool = False,
    stored_density: float = 1.0,
    init: str = "uniform",
    density: float = 1.0,
    dtype: npt.DTypeLike = np.float32,
    rng: RNGLike = None,
) -> Sequential:
    """A ReLU MLP with sparse hidden layers and a dense classifier.

    Parameters
    ----------
    n_in : int
        Number of input features.
    hidden_layer_sizes : tuple of int
        Width of each hidden layer.
    n_out : int
        Number of classes.
    granularity : {"weight", "neuron"}, default="weight"
        Mask granularity of the sparse layers (see
        :data:`~cpusparse.engine.layers.GRANULARITIES`).
    sparse_classifier : bool, default=False
        Make the classifier a (weight-granularity) sparse layer too. The authors'
        code keeps it dense.
    stored_density : float in (0, 1], default=1.0
        Fraction of entries stored in each sparse layer's pattern at
        initialisation (1.0: all, the starting point of training, where the masks
        do the sparsifying).
    init : {"uniform", "kaiming"}, default="uniform"
        Weight initialisation (see :meth:`SparseLinear.random`).
    density : float in (0, 1], default=1.0
        Expected kept fraction of the units (the training density). The fan-in of
        a layer whose inputs or weights are masked counts only the inputs expected
        to be active -- every sparse layer when one bit keeps one weight, every
        layer after the first when one bit keeps a whole neuron -- so that masked
        activations start at the scale of dense ones.
    dtype : {numpy.float32, numpy.float64}
    rng : None, int or numpy.random.Generator
        Initialisation stream, used layer by layer (weights then bias).

    Returns
    -------
    Sequential

    Examples
    --------
    >>> net = mlp(64, (32,), 10, granularity="neuron", density=0.5, rng=0)
    >>> [type(layer).__name__ for layer in net.layers], net.n_units()
    (['SparseLinear', 'Linear'], [32])
    """
    rng = check_rng(rng)
    stored_density = check_density(stored_density, "stored_density")
    if granularity not in GRANULARITIES:
        raise ValueError(
            f"granularity must be one of {', '.join(map(repr, GRANULARITIES))}, got {granularity!r}"
        )
    try:
        hidden = list(hidden_layer_sizes)
    except TypeError:
        raise TypeError(
            f"hidden_layer_sizes must be a sequence of positive ints, got {hidden_layer_sizes!r}"
        ) from None
    sizes = [
        _check_size(n_in, "n_in"),
        *(_check_size(h, f"hidden_layer_sizes[{i}]") for i, h in enumerate(hidden)),
        _check_size(n_out, "n_out"),
    ]
    density = check_density(density, "density")
    units = GRANULARITIES[granularity]
    layers: list[Layer] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-2], sizes[1:-1], strict=True)):
        masked_inputs = units.thins_fan_in or (i > 0 and units.zeroes_outputs)
        layers.append(
            SparseLinear.random(
                fan_in,
                fan_out,
                stored_density=stored_density,
                granularity=granularity,
                activation="relu",
                init=init,
                fan_in_scale=density if masked_inputs else 1.0,
                dtype=dtype,
                rng=rng,
            )
        )
    # The classifier's inputs are masked units when a bit keeps a neuron; with a
    # sparse classifier its own weights are masked.
    masked_inputs = (units.zeroes_outputs and len(sizes) > 2) or sparse_classifier
    common: _InitOptions = dict(
        init=init, fan_in_scale=density if masked_inputs else 1.0, dtype=dtype, rng=rng
    )
    if sparse_classifier:
        layers.append(
            SparseLinear.random(sizes[-2], sizes[-1], stored_density=stored_density, **common)
        )
    else:
        layers.append(Linear.random(sizes[-2], sizes[-1], **common))
    return Sequential(layers)


def _check_cnn(
    widths: Iterable[int], input_shape: Iterable[int], n_classes: int, granularity: str
) -> tuple[list[int], tuple[int, int, int], int]:
    try:
        sizes = list(widths)
        shape = tuple(input_shape)
    except TypeError:
        raise TypeError(
            f"widths and input_shape must be sequences of ints, got {widths!r} and {input_shape!r}"
        ) from None
    if not sizes:
        raise ValueError("widths must be a nonempty sequence of positive ints, got []")
    sizes = [_check_size(w, f"widths[{i}]") for i, w in enumerate(sizes)]
    if len(shape) != 3:
        raise ValueError(f"input_shape must be (C, H, W), got {input_shape!r}")
    c, h, w = (_check_size(v, f"input_shape[{i}]") for i, v in enumerate(shape))
    if granularity not in CONV_GRANULARITIES:
        raise ValueError(
            f"granularity must be one of {', '.join(map(repr, CONV_GRANULARITIES))}, got "
            f"{granularity!r}"
        )
    smallest = w if h == 1 else min(h, w)
    if smallest >> (len(sizes) - 1) < 1:
        raise ValueError(
            f"input_shape {shape} is too small for {len(sizes)} stages: each stage after "
            f"the first halves {'W' if h == 1 else 'H and W'}"
        )
    return sizes, (c, h, w), _check_size(n_classes, "n_classes")


def _per_stage(value: int | Iterable[int], n_stages: int, name: str) -> list[int]:
    # One positive count for every stage, or one per stage.
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return [_check_size(int(value), name)] * n_stages
    try:
        counts = list(value)  # type: ignore[arg-type]
    except TypeError:
        raise TypeError(f"{name} must be an int or a sequence of ints, got {value!r}") from None
    if len(counts) != n_stages:
        raise ValueError(
            f"{name} must hold one count per stage ({n_stages}, one per width), got {counts}"
        )
    return [_check_size(c, f"{name}[{i}]") for i, c in enumerate(counts)]


def _geometry(height: int) -> tuple[Callable[[int], tuple[int, int]], int | tuple[int, int]]:
    # Kernel sizes and the 2x pool of a network on images of this height: an image of
    # height 1 is a 1-D signal, whose kernels are 1 x k and pools 1 x 2.
    if height == 1:
        return (lambda k: (1, k)), (1, 2)
    return (lambda k: (k, k)), 2


def _conv_bn(
    n_in: int,
    n_out: int,
    kernel_size: tuple[int, int],
    *,
    stride: int | tuple[int, int],
    granularity: str | None,
    fan_in_scale: float,
    dtype: npt.DTypeLike,
    rng: np.random.Generator,
) -> list[Layer]:
    # A convolution without bias (the norm has one) and its batch norm; granularity
    # None makes a dense convolution.
    conv = Conv2d.random(
        n_in,
        n_out,
        kernel_size,
        stride=stride,
        padding=(kernel_size[0] // 2, kernel_size[1] // 2),
        bias=False,
        granularity=granularity,
        init="kaiming",
        fan_in_scale=fan_in_scale,
        dtype=dtype,
        rng=rng,
    )
    return [conv, BatchNorm2d.new(n_out, dtype=dtype)]


def vgg(
    widths: Iterable[int],
    input_shape: Iterable[int],
    n_classes: int,
    *,
    convs_per_stage: int | Iterable[int] = 2,
    granularity: str = "channel",
    prune_first: bool = True,
    density: float = 1.0,
    dtype: npt.DTypeLike = np.float32,
    rng: RNGLike = None,
) -> Sequential:
    r"""A VGG-style CNN: stages of 3x3 conv + batch norm + ReLU, 2x2 max pools between.

    Stage ``s`` has ``convs_per_stage`` convolutions of ``widths[s]`` channels; a
    global average pool and a dense classifier follow the last stage.

    Parameters
    ----------
    widths : sequence of int
        Channels of each stage, e.g. ``(16, 32, 64)``.
    input_shape : (C, H, W)
        One image's shape; each pool halves H and W (rounding down), so they must
        stay at least 1. ``H = 1`` is a 1-D signal (e.g. MNIST-1D's ``(1, 1, 40)``):
        its kernels are ``1 x 3`` and its pools ``1 x 2``.
    n_classes : int
    convs_per_stage : int or sequence of int, default=2
        Convolutions of every stage, or of each stage: VGG-19's layout is
        ``(2, 2, 4, 4, 4)``, VGG-11's ``(1, 1, 2, 2, 2)``.
    granularity : {"channel", "weight"}, default="channel"
        What one mask bit of a convolution keeps (see
        :data:`~cpusparse.engine.layers.conv.CONV_GRANULARITIES`).
    prune_first : bool, default=True
        Whether the first convolution takes a mask. The paper and the authors'
        code (``utils/conv_type.py``) prune it; False leaves it dense and outside the
        budget, as much pruning work does (it has few weights and sees the raw input).
    density : float in (0, 1], default=1.0
        Expected kept fraction: scales the fan-in of layers whose inputs or weights
        are masked, as in :func:`mlp` (He's normal initialisation).
    dtype : {numpy.float32, numpy.float64}
    rng : None, int or numpy.random.Generator

    Returns
    -------
    Sequential

    Examples
    --------
    >>> net = vgg((4, 8), (1, 8, 8), 10, rng=0)
    >>> net.n_units(), net.forward(np.zeros((1, 2, 8, 8), np.float32))[0].shape
    ([4, 4, 8, 8], (10, 2))
    """
    sizes, (c, h, w), n_classes = _check_cnn(widths, input_shape, n_classes, granularity)
    counts = _per_stage(convs_per_stage, len(sizes), "convs_per_stage")
    rng = check_rng(rng)
    density = check_density(density, "density")
    units = CONV_GRANULARITIES[granularity]
    kernel, pool = _geometry(h)
    layers: list[Layer] = []
    n_in, first, after_pruned = c, True, False
    for s, width in enumerate(sizes):
        if s > 0:
            layers.append(MaxPool2d(pool))
        for _ in range(counts[s]):
            # The fan-in is scaled where weights are masked, or inputs dropped channels.
            pruned = prune_first or not first
            masked_inputs = (pruned and units.thins_fan_in) or (
                after_pruned and units.zeroes_outputs
            )
            layers += _conv_bn(
                n_in,
                width,
                kernel(3),
                stride=1,
                granularity=granularity if pruned else None,
                fan_in_scale=density if masked_inputs else 1.0,
                dtype=dtype,
                rng=rng,
            )
            layers.append(ReLU())
            n_in, first, after_pruned = width, False, pruned
    scale = density if units.zeroes_outputs else 1.0
    layers += [
        GlobalAvgPool2d(),
        Linear.random(n_in, n_classes, fan_in_scale=scale, dtype=dtype, rng=rng),
    ]
    return Sequential(layers)


def resnet(
    widths: Iterable[int],
    input_shape: Iterable[int],
    n_classes: int,
    *,
    blocks_per_stage: int = 1,
    granularity: str = "channel",
    prune_first: bool = True,
    density: float = 1.0,
    dtype: npt.DTypeLike = np.float32,
    rng: RNGLike = None,
) -> Sequential:
    r"""A ResNet: a 3x3 stem, stages of basic blocks, global average pool, classifier.

    A basic block is ``ReLU(BN(conv3x3(ReLU(BN(conv3x3(x))))) + shortcut(x))``
    (:class:`~cpusparse.engine.containers.Residual`). The stem has ``widths[0]``
    channels; stage ``s`` has ``blocks_per_stage`` blocks of ``widths[s]`` channels,
    the first of each later stage with stride 2 and a 1x1 projection shortcut (conv
    with stride 2 + batch norm); other shortcuts are the identity. Every convolution,
    the shortcuts' included, takes its own mask, as in the authors' code.

    Parameters
    ----------
    widths : sequence of int
        Channels of each stage, e.g. ``(16, 32, 64)`` (ResNet-20's widths).
    input_shape : (C, H, W)
    n_classes : int
    blocks_per_stage : int, default=1
        3 gives ResNet-20's layout.
    granularity, prune_first, density, dtype, rng
        As in :func:`vgg` (the first convolution is the stem).

    Returns
    -------
    Sequential

    Examples
    --------
    >>> net = resnet((4, 8), (1, 8, 8), 10, rng=0)
    >>> net.n_units(), net.forward(np.zeros((1, 2, 8, 8), np.float32))[0].shape
    ([4, 4, 4, 8, 8, 8], (10, 2))
    """
    sizes, (c, h, w), n_classes = _check_cnn(widths, input_shape, n_classes, granularity)
    blocks_per_stage = _check_size(blocks_per_stage, "blocks_per_stage")
    rng = check_rng(rng)
    density = check_density(density, "density")
    units = CONV_GRANULARITIES[granularity]
    inner = density if (units.thins_fan_in or units.zeroes_outputs) else 1.0

    kernel, _ = _geometry(h)
    down = (1, 2) if h == 1 else 2

    def conv_bn(
        n_in: int, n_out: int, kernel_size: int, stride: int, scale: float, pruned: bool = True
    ) -> list[Layer]:
        return _conv_bn(
            n_in,
            n_out,
            kernel(kernel_size),
            stride=down if stride == 2 else 1,
            granularity=granularity if pruned else None,
            fan_in_scale=scale,
            dtype=dtype,
            rng=rng,
        )

    stem_scale = density if units.thins_fan_in and prune_first else 1.0
    layers: list[Layer] = [
        *conv_bn(c, sizes[0], 3, 1, stem_scale, prune_first),
        ReLU(),
    ]
    n_in = sizes[0]
    for s, width in enumerate(sizes):
        for b in range(blocks_per_stage):
            stride = 2 if s > 0 and b == 0 else 1
            main = [
                *conv_bn(n_in, width, 3, stride, inner),
                ReLU(),
                *conv_bn(width, width, 3, 1, inner),
            ]
            shortcut = None
            if stride != 1 or n_in != width:
                shortcut = conv_bn(n_in, width, 1, stride, inner)
            layers.append(Residual(main, shortcut))
            n_in = width
    layers += [
        GlobalAvgPool2d(),
        Linear.random(n_in, n_classes, dtype=dtype, rng=rng),
    ]
    return Sequential(layers)


class MacCount(TypedDict):
    """What :func:`count_macs` returns."""

    total: int
    conv: int
    layers: list[tuple[str, int]]


def count_macs(
    network: Sequential,
    masks: Sequence[npt.NDArray[np.bool_] | None] | None,
    input_shape: tuple[int, int, int] | None,
) -> MacCount:
    """Forward multiply-adds per sample of ``network`` with ``masks``, layer by layer.

    Parameters
    ----------
    network : Sequential
        A cpusparse network (convolutions, linear layers, batch norms, ReLU, pools,
        residual blocks, nested containers).
    masks : list of (ndarray of bool or None) or None
        One per prunable layer, in the order of ``network.prunable_layers()``; None
        keeps every unit.
    input_shape : (C, H, W) or None
        One sample's shape (None for an MLP: no spatial size).

    Returns
    -------
    dict
        ``total`` (int), ``conv`` (the share of the layers with a spatial output, the
        convolutions) and ``layers``: one ``(name, macs)`` per layer that multiplies,
        in forward order, named by its path (:meth:`~cpusparse.engine.Layer.named_leaves`).
        Each layer counts itself (:meth:`~cpusparse.engine.Layer.macs`): a convolution
        ``n_active * H_out * W_out``, where ``n_active`` is ``C_out_kept * C_in_live *
        kh * kw`` for a channel mask; a linear layer its kept weights on live inputs.

    Examples
    --------
    >>> net = mlp(4, (3,), 2, rng=0)
    >>> count_macs(net, None, None)["total"]  # 4 * 3 + 3 * 2
    18
    """
    n = network.n_masks
    masks = [None] * n if masks is None else list(masks)
    if len(masks) != n:
        raise ValueError(f"masks must hold one entry per prunable layer ({n}), got {len(masks)}")
    spatial = None if input_shape is None else (int(input_shape[1]), int(input_shape[2]))
    layers: list[tuple[str, int]] = []
    conv: list[int] = []

    def record(name: str, macs: int, spatial_out: tuple[int, int] | None) -> None:
        layers.append((name, int(macs)))
        if spatial_out is not None:
            conv.append(int(macs))

    total, _, _ = network.macs(masks, None, spatial, on_leaf=record)
    return {"total": int(total), "conv": sum(conv), "layers": layers}
