"""Network builders: :func:`mlp` (the CNN builders join it as the engine grows)."""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import TYPE_CHECKING, TypedDict

import numpy as np

from ._typing import RNGLike
from ._validation import check_density, check_rng
from .engine.containers import Sequential
from .engine.layers.base import Layer
from .engine.layers.linear import GRANULARITIES, Linear, SparseLinear

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["mlp"]


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
