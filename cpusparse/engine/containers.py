"""Containers: layers made of layers, threading masks, caches and known zeros through them."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from .._typing import BoolArray, FloatArray
from .layers.base import LAYER_TYPES, TRAIN, Layer, Mode, UnitMap, _check_live
from .losses import softmax_cross_entropy

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["Sequential"]


class Sequential(Layer):
    """Layers applied in order; the container stores no activations or gradients.

    A container is a layer: it takes one mask per prunable layer inside it (its
    :attr:`n_masks`), in depth-first order, and can itself sit inside another
    container. Between layers it passes on which features are known to be exactly
    zero (:meth:`~cpusparse.engine.layers.base.Layer.live_outputs`), so a layer after
    a dropped neuron or channel skips that input without any layer knowing the other.

    Parameters and gradients are flat dicts keyed ``"<position>.<name>"``
    (``"0.weight"``, ``"2.bias"``; nested containers add a level, ``"1.0.weight"``),
    in layer order.

    Parameters
    ----------
    layers : list of Layer
        At least one; consecutive feature counts must agree and every layer with
        parameters must share one dtype.

    Examples
    --------
    >>> from cpusparse.models import mlp
    >>> net = mlp(4, (8,), 3, rng=0, dtype=np.float64)
    >>> x = np.ones((4, 5))
    >>> masks = [np.ones(n, dtype=bool) for n in net.n_units()]
    >>> logits, caches = net.forward(x, masks)
    >>> logits.shape
    (3, 5)
    >>> list(net.params())
    ['0.weight', '0.bias', '1.weight', '1.bias']
    """

    def __init__(self, layers: Layer | Iterable[Layer]) -> None:
        layers = list(layers) if not isinstance(layers, Layer) else [layers]
        if not layers:
            raise ValueError("layers must be a nonempty list of layers, got []")
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(
                    f"layers[{i}] must be a cpusparse Layer, got {type(layer).__name__}"
                )
        self.layers = layers
        dtypes = {layer.dtype for layer in layers if layer.dtype is not None}
        if len(dtypes) > 1:
            raise TypeError(f"all layers must share one dtype, got {sorted(map(str, dtypes))}")
        size, where = None, None
        for i, layer in enumerate(layers):
            if layer.n_in is not None and size is not None and layer.n_in != size:
                raise ValueError(
                    f"layers[{i}] ({layer!r}) takes {layer.n_in} input features, but "
                    f"layers[{where}] outputs {size}"
                )
            if layer.n_out is not None:
                size, where = layer.n_out, i

    # ------------------------------------------------------------------ structure

    @property
    def n_in(self) -> int | None:
        """Number of input features."""
        return next((layer.n_in for layer in self.layers if layer.n_in is not None), None)

    @property
    def n_out(self) -> int | None:
        """Number of output features."""
        sizes = [layer.n_out for layer in self.layers if layer.n_out is not None]
        return sizes[-1] if sizes else None

    @property
    def dtype(self) -> np.dtype | None:
        """Floating-point type of the parameters."""
        return next((layer.dtype for layer in self.layers if layer.dtype is not None), None)

    @property
    def n_masks(self) -> int:
        """Number of prunable layers inside, nested containers included."""
        return sum(layer.n_masks for layer in self.layers)

    @property
    def prunable(self) -> list[int]:
        """Positions in :attr:`layers` of the layers that take masks."""
        return [i for i, layer in enumerate(self.layers) if layer.n_masks]

    def _slots(self) -> Iterator[tuple[Sequential, int, UnitMap]]:
        # (container, position, unit map) of every prunable leaf, depth-first: the mask
        # order.
        for i, layer in enumerate(self.layers):
            if layer.units is not None:
                yield self, i, layer.units
            elif layer.n_masks:  # a container: its own prunable leaves, in order
                yield from layer._slots()

    def prunable_layers(self) -> list[Layer]:
        """The prunable (leaf) layers in mask order, nested containers included."""
        return [container.layers[i] for container, i, _ in self._slots()]

    def replace_prunable(self, p: int, layer: Layer) -> None:
        """Put ``layer`` in place of the ``p``-th prunable layer (e.g. after compaction)."""
        container, i, _ = list(self._slots())[p]
        container.layers[i] = layer

    def n_units(self) -> list[int]:
        """Number of mask bits of each prunable layer, in mask order."""
        return [units.n_units for _, _, units in self._slots()]

    def params(self) -> dict[str, FloatArray]:
        """Every parameter array by ``"<position>.<name>"`` (the arrays themselves)."""
        return {
            f"{i}.{name}": arr
            for i, layer in enumerate(self.layers)
            for name, arr in layer.params().items()
        }

    def buffers(self) -> dict[str, np.ndarray]:
        """Every buffer array by ``"<position>.<name>"``."""
        return {
            f"{i}.{name}": arr
            for i, layer in enumerate(self.layers)
            for name, arr in layer.buffers().items()
        }

    # ------------------------------------------------------------------ passes

    def _check_masks(self, masks: Sequence[npt.ArrayLike | None] | None) -> list[BoolArray | None]:
        if masks is None:
            return [None] * self.n_masks
        if isinstance(masks, np.ndarray) or len(masks) != self.n_masks:
            got = "an array" if isinstance(masks, np.ndarray) else str(len(masks))
            raise ValueError(
                f"masks must be a list with one array per prunable layer ({self.n_masks}), "
                f"got {got}"
            )
        return [
            None if m is None else units.check_mask(m)
            for (_, _, units), m in zip(self._slots(), masks, strict=True)
        ]

    def forward(
        self,
        x: npt.ArrayLike,
        masks: Sequence[npt.ArrayLike | None] | None = None,
        *,
        live: npt.ArrayLike | None = None,
        mode: Mode = TRAIN,
    ) -> tuple[FloatArray, list[object]]:
        """Forward pass with one mask per prunable layer.

        Parameters
        ----------
        x : ndarray of shape (n_in, n_batch)
            Feature-major input batch (one column per sample).
        masks : list of (ndarray of bool or None), optional
            One per prunable layer, in the order of :meth:`prunable_layers`; None
            keeps every stored weight.
        live : ndarray of bool, shape (n_in,), optional
            Input features that may be nonzero.
        mode : Mode, default=TRAIN

        Returns
        -------
        out : ndarray of shape (n_out, n_batch)
        caches : list
            One cache per layer, for :meth:`backward`.
        """
        x = self._check_input(x)
        return self._forward(x, self._check_masks(masks), _check_live(live, self.n_in), mode)

    def _forward(
        self,
        x: FloatArray,
        masks: Sequence[BoolArray | None],
        live: BoolArray | None = None,
        mode: Mode = TRAIN,
    ) -> tuple[FloatArray, list[object]]:
        out, caches, _ = self._run(x, masks, live, mode)
        return out, caches

    def _run(
        self,
        x: FloatArray,
        masks: Sequence[BoolArray | None],
        live: BoolArray | None,
        mode: Mode,
    ) -> tuple[FloatArray, list[object], BoolArray | None]:
        caches = []
        pos = 0
        for layer in self.layers:
            k = layer.n_masks
            x, cache, live = layer._run(x, masks[pos : pos + k], live, mode)
            pos += k
            caches.append(cache)
        return x, caches, live

    def backward(
        self, dout: npt.ArrayLike, caches: Sequence[Any], *, need_dx: bool = False
    ) -> tuple[FloatArray | None, dict[str, FloatArray]]:
        """Backward pass through every layer.

        Returns
        -------
        dx : ndarray of shape (n_in, n_batch) or None
            Only when ``need_dx``.
        grads : dict of str to ndarray
            Keyed like :meth:`params`; a straight-through pass adds
            ``"<position>.mask"`` for each prunable layer.
        """
        if len(caches) != len(self.layers):
            raise ValueError(
                f"caches must hold one cache per layer ({len(self.layers)}), got {len(caches)}"
            )
        return self._backward(self._check_dout(dout, caches), caches, need_dx)

    def _check_dout(self, dout: npt.ArrayLike, cache: Any) -> FloatArray:
        # The last layer knows the shape of the output its cache belongs to.
        dout = self.layers[-1]._check_dout(dout, cache[-1])
        dtype = self.dtype
        if dtype is not None and dout.dtype != dtype:
            raise TypeError(
                f"dout must have the same dtype as weight ({dtype}), got {dout.dtype}; "
                "cast explicitly instead of mixing float32 and float64"
            )
        return dout

    def _backward(
        self, dout: FloatArray, caches: Sequence[Any], need_dx: bool = False
    ) -> tuple[FloatArray | None, dict[str, FloatArray]]:
        per_layer: list[dict[str, FloatArray]] = [{}] * len(self.layers)  # all replaced
        grad: FloatArray | None = dout
        for i in range(len(self.layers) - 1, -1, -1):
            if not (grad is not None):
                raise RuntimeError(
                    "internal error: every layer but the first passes its input gradient"
                )
            grad, per_layer[i] = self.layers[i]._backward(grad, caches[i], need_dx or i > 0)
        grads = {
            f"{i}.{name}": g
            for i, layer_grads in enumerate(per_layer)
            for name, g in layer_grads.items()
        }
        return grad, grads

    def loss_and_grads(
        self,
        x: npt.ArrayLike,
        y: npt.ArrayLike,
        masks: Sequence[npt.ArrayLike | None] | None = None,
    ) -> tuple[float, dict[str, FloatArray], FloatArray]:
        """Softmax cross-entropy of one masked pass and the gradients of all parameters.

        Returns
        -------
        loss : float
        grads : dict of str to ndarray
            Keyed like :meth:`params`.
        logits : ndarray of shape (n_classes, n_batch)
        """
        logits, caches = self.forward(x, masks)
        loss, dlogits = softmax_cross_entropy(logits, y)
        _, grads = self._backward(dlogits, caches)
        return loss, grads, logits

    # ------------------------------------------------------------------ storage

    def config(self) -> dict[str, Any]:
        """``{"layers": [{"type": name, **layer.config()}, ...]}``."""
        return {
            "layers": [{"type": type(layer).__name__, **layer.config()} for layer in self.layers]
        }

    def arrays(self) -> dict[str, np.ndarray]:
        """Every layer's arrays by ``"<position>.<name>"``."""
        return {
            f"{i}.{name}": arr
            for i, layer in enumerate(self.layers)
            for name, arr in layer.arrays().items()
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], arrays: dict[str, np.ndarray]) -> Sequential:
        """Rebuild the container and its layers (any registered layer type)."""
        layers = []
        for i, record in enumerate(config["layers"]):
            record = dict(record)
            kind = record.pop("type")
            if kind not in LAYER_TYPES:
                raise ValueError(
                    f"unknown layer type {kind!r} at position {i}; known: {sorted(LAYER_TYPES)}"
                )
            prefix = f"{i}."
            own = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
            layers.append(LAYER_TYPES[kind].from_config(record, own))
        return cls(layers)

    def __repr__(self) -> str:
        inner = ",\n  ".join(repr(layer) for layer in self.layers)
        return f"Sequential([\n  {inner},\n])"
