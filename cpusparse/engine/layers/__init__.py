"""Layers: one protocol (:mod:`.base`), one module per kind.

- :mod:`~cpusparse.engine.layers.base`: :class:`Layer`, :class:`UnitMap`,
  :class:`Mode` and the layer registry;
- :mod:`~cpusparse.engine.layers.linear`: :class:`SparseLinear` with its unit maps
  (:class:`WeightUnits`, :class:`NeuronUnits`) and the dense :class:`Linear`;
- :mod:`~cpusparse.engine.layers.conv`: :class:`Conv2d` with its unit maps
  (:class:`ChannelUnits`, :class:`ConvWeightUnits`);
- :mod:`~cpusparse.engine.layers.norm`: :class:`BatchNorm1d`, :class:`BatchNorm2d`;
- :mod:`~cpusparse.engine.layers.pool`: :class:`MaxPool2d`, :class:`AvgPool2d`,
  :class:`GlobalAvgPool2d`, :class:`Flatten`;
- :mod:`~cpusparse.engine.layers.activation`: :class:`ReLU`.
"""

from .activation import ReLU
from .base import EVAL, LAYER_TYPES, STRAIGHT_THROUGH, TRAIN, Layer, Mode, UnitMap
from .conv import CONV_GRANULARITIES, ChannelUnits, Conv2d, ConvWeightUnits
from .linear import GRANULARITIES, Linear, NeuronUnits, SparseLinear, WeightUnits
from .norm import BatchNorm1d, BatchNorm2d
from .pool import AvgPool2d, Flatten, GlobalAvgPool2d, MaxPool2d

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
    "Conv2d",
    "ChannelUnits",
    "ConvWeightUnits",
    "CONV_GRANULARITIES",
    "BatchNorm1d",
    "BatchNorm2d",
    "MaxPool2d",
    "AvgPool2d",
    "GlobalAvgPool2d",
    "Flatten",
]
