"""Layers: one protocol (:mod:`.base`), one module per kind.

- :mod:`~cpusparse.engine.layers.base`: :class:`Layer`, :class:`UnitMap`,
  :class:`Mode` and the layer registry;
- :mod:`~cpusparse.engine.layers.linear`: :class:`SparseLinear` with its unit maps
  (:class:`WeightUnits`, :class:`NeuronUnits`) and the dense :class:`Linear`;
- :mod:`~cpusparse.engine.layers.activation`: :class:`ReLU`.
"""

from .activation import ReLU
from .base import EVAL, LAYER_TYPES, STRAIGHT_THROUGH, TRAIN, Layer, Mode, UnitMap
from .linear import GRANULARITIES, Linear, NeuronUnits, SparseLinear, WeightUnits

__all__ = [
    "Layer",
    "UnitMap",
    "Mode",
    "TRAIN",
    "EVAL",
    "STRAIGHT_THROUGH",
    "LAYER_TYPES",
    "SparseLinear",
    "Linear",
    "ReLU",
    "WeightUnits",
    "NeuronUnits",
    "GRANULARITIES",
]
