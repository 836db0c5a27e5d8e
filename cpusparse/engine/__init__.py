"""What computes: kernels, CSR products, layers, containers and losses.

Lower modules never import higher ones:
:mod:`~cpusparse.engine.kernels` (Numba) <- :mod:`~cpusparse.engine.csr` (validated
masked products) <- :mod:`~cpusparse.engine.layers` (the layer protocol and its
kinds) <- :mod:`~cpusparse.engine.containers`; :mod:`~cpusparse.engine.losses` stands
apart. Nothing here knows about scores, estimators or training.
"""

from .containers import Residual, Sequential
from .layers import (
    AvgPool2d,
    BatchNorm1d,
    BatchNorm2d,
    Conv2d,
    Flatten,
    GlobalAvgPool2d,
    Layer,
    Linear,
    MaxPool2d,
    Mode,
    ReLU,
    SparseLinear,
    UnitMap,
)
from .losses import softmax, softmax_cross_entropy

__all__ = [
    "Layer",
    "UnitMap",
    "Mode",
    "SparseLinear",
    "Linear",
    "ReLU",
    "Sequential",
    "Residual",
    "Conv2d",
    "BatchNorm1d",
    "BatchNorm2d",
    "MaxPool2d",
    "AvgPool2d",
    "GlobalAvgPool2d",
    "Flatten",
    "softmax",
    "softmax_cross_entropy",
]
