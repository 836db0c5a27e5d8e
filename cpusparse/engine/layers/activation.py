"""Elementwise activations."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from ..._typing import BoolArray, FloatArray
from ..._validation import check_array
from .base import TRAIN, Layer, Mode

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["ReLU", "ReLUCache"]


class ReLUCache(NamedTuple):
    """What :meth:`ReLU.backward` needs from the forward pass."""

    positive: BoolArray


class ReLU(Layer):
    """Elementwise ``max(x, 0)``; its gradient is taken as 0 at 0.

    A feature known to be zero stays zero, so ``live`` passes through.

    Examples
    --------
    >>> out, cache = ReLU().forward(np.array([[-1.0, 2.0]]))
    >>> out, ReLU().backward(np.array([[5.0, 5.0]]), cache)[0]
    (array([[0., 2.]]), array([[0., 5.]]))
    """

    compact_kind = "channelwise"

    def live_outputs(self, mask: BoolArray | None, live: BoolArray | None) -> BoolArray | None:
        """Output features that may be nonzero (see :meth:`Layer.live_outputs`)."""
        return live

    def _check_input(self, x: npt.ArrayLike) -> FloatArray:
        return check_array(x, "x", finite=True)

    def _check_dout(self, dout: npt.ArrayLike, cache: ReLUCache) -> FloatArray:
        return check_array(dout, "dout", shape=cache.positive.shape)

    def _forward(
        self,
        x: FloatArray,
        mask: BoolArray | None = None,
        live: BoolArray | None = None,
        mode: Mode = TRAIN,
    ) -> tuple[FloatArray, ReLUCache]:
        # (np.maximum and a product with the mask are ten times faster than np.where.)
        positive = x > 0
        return np.maximum(x, x.dtype.type(0)), ReLUCache(positive)

    def _backward(
        self, dout: FloatArray, cache: ReLUCache, need_dx: bool = True
    ) -> tuple[FloatArray, dict[str, FloatArray]]:
        return dout * cache.positive, {}

    def config(self) -> dict[str, Any]:
        """JSON-ready settings that, with :meth:`arrays`, rebuild the layer."""
        return {}

    def __repr__(self) -> str:
        return "ReLU()"
