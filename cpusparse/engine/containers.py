"""Containers: layers made of layers, threading masks, caches and known zeros through them."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import numpy as np

from .._typing import BoolArray, FloatArray
from .._validation import check_array
from .layers.base import (
    LAYER_TYPES,
    TRAIN,
    Layer,
    Mode,
    UnitMap,
    _check_live,
    expand_rows,
    gather_rows,
)
from .losses import softmax_cross_entropy

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["Sequential", "SequentialCache", "Residual", "ResidualCache"]


class SequentialCache(list[object]):
    """One cache per layer (a list), and how the activations were converted between them.

    ``conversions[i]`` says what was done to the activation before layer ``i``: None,
    ``("expand", live)`` (compact rows scattered into full zeros, for a layer that
    takes full activations) or ``("gather", live)`` (the live rows taken). ``final``
    is the conversion after the last layer; ``live_in``/``live_out`` (compact input and
    output), ``zero_in`` (a straight-through pass's input zeroed outside ``live``) and
    ``out_shape`` are set by the full-array pass (:meth:`Sequential._forward`).
    """

    def __init__(self, caches: Iterable[object], conversions: list[Any], final: Any) -> None:
        super().__init__(caches)
        self.conversions = conversions
        self.final = final
        self.live_in: BoolArray | None = None
        self.live_out: BoolArray | None = None
        self.zero_in: BoolArray | None = None
        self.out_shape: tuple[int, ...] | None = None


def _enter(
    x: FloatArray, live: BoolArray | None, mode: Mode
) -> tuple[FloatArray, BoolArray | None, BoolArray | None]:
    # A full-array pass's input as the compact passes take it: ``(x, live, zero_in)``.
    # A straight-through pass computes every entry: x with zeros outside live, in full.
    if live is None:
        return x, None, None
    if mode.straight_through:
        return x * live.reshape(-1, *([1] * (x.ndim - 1))), None, live
    return gather_rows(x, live), live, None


def _leave_dx(
    dx: FloatArray | None, live_in: BoolArray | None, zero_in: BoolArray | None
) -> FloatArray | None:
    # The full-array input gradient: 0 outside live, whose inputs count as zeros.
    if dx is None:
        return None
    if live_in is not None:
        return expand_rows(dx, live_in)
    if zero_in is not None:
        return dx * zero_in.reshape(-1, *([1] * (dx.ndim - 1)))
    return dx


def _convert_back(grad: FloatArray, conversion: Any) -> FloatArray:
    # The gradient through a conversion of the forward pass: gather <-> expand.
    kind, live = conversion
    return gather_rows(grad, live) if kind == "expand" else expand_rows(grad, live)


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

    def children(self) -> list[tuple[str, Layer]]:
        """The layers by position: ``("0", first), ("1", second), ...``."""
        return [(str(i), layer) for i, layer in enumerate(self.layers)]

    def macs(
        self,
        masks: Sequence[BoolArray | None],
        live: BoolArray | None = None,
        spatial: tuple[int, int] | None = None,
        *,
        prefix: str = "",
        on_leaf: Callable[[str, int, tuple[int, int] | None], object] | None = None,
    ) -> tuple[int, BoolArray | None, tuple[int, int] | None]:
        """Forward multiply-adds per sample: the layers' in turn (see :meth:`Layer.macs`)."""
        masks = list(masks)
        if len(masks) != self.n_masks:
            raise ValueError(f"expected {self.n_masks} masks, got {len(masks)}")
        total, start = 0, 0
        for name, layer in self.children():
            part = masks[start : start + layer.n_masks]
            start += layer.n_masks
            n, live, spatial = layer.macs(
                part, live, spatial, prefix=f"{prefix}{name}.", on_leaf=on_leaf
            )
            total += n
        return total, live, spatial

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
    ) -> tuple[FloatArray, SequentialCache]:
        """Forward pass with one mask per prunable layer.

        Parameters
        ----------
        x : ndarray of shape (n_in, n_batch)
            Feature-major input batch (one column per sample).
        masks : list of (ndarray of bool or None), optional
            One per prunable layer, in the order of :meth:`prunable_layers`; None
            keeps every stored weight.
        live : ndarray of bool, shape (n_in,), optional
            Input features that may be nonzero: the pass computes as if ``x`` were
            zero outside them (and :meth:`backward` gives them a zero gradient).
        mode : Mode, default=TRAIN

        Returns
        -------
        out : ndarray of shape (n_out, n_batch)
        caches : SequentialCache
            One cache per layer (a list), for :meth:`backward`.
        """
        x = self._check_input(x)
        return self._forward(x, self._check_masks(masks), _check_live(live, self.n_in), mode)

    compact_kind = "indexed"

    def _forward(
        self,
        x: FloatArray,
        masks: Sequence[BoolArray | None],
        live: BoolArray | None = None,
        mode: Mode = TRAIN,
    ) -> tuple[FloatArray, SequentialCache]:
        # Full arrays in and out; compact activations inside.
        x, live_in, zero_in = _enter(x, live, mode)
        out, caches, live_out = self._run(x, masks, live_in, mode)
        caches.live_in, caches.live_out, caches.zero_in = live_in, live_out, zero_in
        out = out if live_out is None else expand_rows(out, live_out)
        caches.out_shape = out.shape
        return out, caches

    def _run(
        self,
        x: FloatArray,
        masks: Sequence[BoolArray | None],
        live: BoolArray | None,
        mode: Mode,
        on_layer: Callable[[int, Layer, FloatArray], object] | None = None,
    ) -> tuple[FloatArray, SequentialCache, BoolArray | None]:
        # x is compact (the rows of live) when live is given, and so is the output. A
        # layer that takes full activations gets them scattered into zeros; the next
        # compact one gathers its rows again. ``on_layer(i, layer, out)`` sees each
        # layer's output (as it is stored).
        caches, conversions = [], []
        compact = live is not None
        pos = 0
        for i, layer in enumerate(self.layers):
            takes_compact = layer.compact_kind is not None
            conversion = None
            if live is not None and compact != takes_compact:
                conversion = ("gather" if takes_compact else "expand", live)
                x = gather_rows(x, live) if takes_compact else expand_rows(x, live)
            conversions.append(conversion)
            k = layer.n_masks
            x, cache, live = layer._run(x, masks[pos : pos + k], live, mode)
            compact = takes_compact and live is not None
            pos += k
            caches.append(cache)
            if on_layer is not None:
                on_layer(i, layer, x)
        final = None
        if live is not None and not compact:
            final = ("gather", live)
            x = gather_rows(x, live)
        return x, SequentialCache(caches, conversions, final), live

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

    def _check_input(self, x: npt.ArrayLike) -> FloatArray:
        # The first layer knows its input layout (features or images).
        x = self.layers[0]._check_input(x)
        dtype = self.dtype
        if dtype is not None and x.dtype != dtype:
            raise TypeError(
                f"x must have the same dtype as weight ({dtype}), got {x.dtype}; "
                "cast explicitly instead of mixing float32 and float64"
            )
        return x

    def _check_dout(self, dout: npt.ArrayLike, cache: Any) -> FloatArray:
        # The output's shape was recorded by the pass (the last layer may have stored
        # a compact one); the last layer knows its layout.
        shape = getattr(cache, "out_shape", None)
        if shape is not None:
            dout = np.ascontiguousarray(check_array(dout, "dout", shape=shape))
        else:
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
        live_out = getattr(caches, "live_out", None)
        d = dout if live_out is None else gather_rows(dout, live_out)
        dx, grads = self._run_backward(d, caches, need_dx)
        live_in, zero_in = getattr(caches, "live_in", None), getattr(caches, "zero_in", None)
        return _leave_dx(dx, live_in, zero_in), grads

    def _run_backward(
        self, dout: FloatArray, caches: Any, need_dx: bool
    ) -> tuple[FloatArray | None, dict[str, FloatArray]]:
        # Backward of _run: dout and dx as its output and input are stored.
        conversions = getattr(caches, "conversions", [None] * len(self.layers))
        final = getattr(caches, "final", None)
        per_layer: list[dict[str, FloatArray]] = [{}] * len(self.layers)  # all replaced
        grad: FloatArray | None = dout if final is None else _convert_back(dout, final)
        for i in range(len(self.layers) - 1, -1, -1):
            if not (grad is not None):
                raise RuntimeError(
                    "internal error: every layer but the first passes its input gradient"
                )
            grad, per_layer[i] = self.layers[i]._run_backward(grad, caches[i], need_dx or i > 0)
            if grad is not None and conversions[i] is not None:
                grad = _convert_back(grad, conversions[i])
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


class ResidualCache(NamedTuple):
    """What :meth:`Residual.backward` needs: the branches' caches and the output.

    ``rows_main``/``rows_shortcut`` are the rows of the (compact) output that each
    branch's (compact) output fills (None: every row); ``live_in``/``live_out`` are set
    by the full-array pass.
    """

    main: list[object]
    shortcut: list[object] | None
    out: FloatArray
    rows_main: npt.NDArray[np.intp] | None = None
    rows_shortcut: npt.NDArray[np.intp] | None = None
    live_in: BoolArray | None = None
    live_out: BoolArray | None = None
    zero_in: BoolArray | None = None


def _rows_in(live: BoolArray | None, union: BoolArray | None) -> npt.NDArray[np.intp] | None:
    # The rows of a compact array of ``union`` that a compact array of ``live`` fills
    # (None: all of them).
    if union is None:
        return None if live is None else np.flatnonzero(live)
    if live is None:
        raise RuntimeError("internal error: a branch with every row live has a full union")
    rows = np.flatnonzero(live[union])
    return None if rows.shape[0] == int(union.sum()) else rows


def _prefixed(index: int, named: dict[str, Any]) -> dict[str, Any]:
    return {f"{index}.{name}": value for name, value in named.items()}


def _unprefixed(index: int, named: dict[str, Any]) -> dict[str, Any]:
    prefix = f"{index}."
    return {k[len(prefix) :]: v for k, v in named.items() if k.startswith(prefix)}


class Residual(Layer):
    r"""A residual block: ``out = act(main(x) + shortcut(x))``.

    ``main`` and ``shortcut`` are lists of layers, each run as a :class:`Sequential`;
    ``shortcut=None`` is the identity. The block takes the masks
    of the main branch, then those of the shortcut (:attr:`n_masks`), and its
    parameters are keyed ``"0.<main key>"`` and ``"1.<shortcut key>"``.

    Known zeros: an output channel is known to be zero only where *both* inputs of
    the add are, so with an identity shortcut a channel dropped by the main branch is
    live after the add (its value is the shortcut's); the authors mask the second
    convolution and a 1 x 1 projection shortcut independently, and so does this block.

    Parameters
    ----------
    main : Layer or list of Layer
        E.g. ``[Conv2d 3x3, BatchNorm2d, ReLU, Conv2d 3x3, BatchNorm2d]``.
    shortcut : Layer, list of Layer or None, default=None
        None: the identity; else e.g. ``[Conv2d 1x1 with stride, BatchNorm2d]``.
    activation : {"relu", None}, default="relu"
        Applied after the add.

    Examples
    --------
    >>> from cpusparse.engine.layers.conv import Conv2d
    >>> block = Residual([Conv2d.random(2, 2, 3, padding=1, rng=0, dtype=np.float64)])
    >>> out, cache = block.forward(np.ones((2, 3, 4, 4)), [np.array([True, False])])
    >>> out.shape, block.n_masks, list(block.params())
    ((2, 3, 4, 4), 1, ['0.0.weight', '0.0.bias'])
    """

    def __init__(
        self,
        main: Layer | Iterable[Layer],
        shortcut: Layer | Iterable[Layer] | None = None,
        *,
        activation: str | None = "relu",
    ) -> None:
        self.main = Sequential(main)
        self.shortcut = None if shortcut is None else Sequential(shortcut)
        if activation not in ("relu", None):
            raise ValueError(f"activation must be 'relu' or None, got {activation!r}")
        self.activation = activation
        branches = [self.main] + ([] if self.shortcut is None else [self.shortcut])
        dtypes = {b.dtype for b in branches if b.dtype is not None}
        if len(dtypes) > 1:
            raise TypeError(f"both branches must share one dtype, got {sorted(map(str, dtypes))}")
        widths_in = {b.n_in for b in branches if b.n_in is not None}
        widths_out = {b.n_out for b in branches if b.n_out is not None}
        if self.shortcut is None and self.main.n_in is not None:
            widths_out.add(self.main.n_in)
        if len(widths_in) > 1 or len(widths_out) > 1:
            raise ValueError(
                "the branches must take and give the same number of channels, got "
                f"main {self.main.n_in} -> {self.main.n_out}, shortcut "
                + (
                    "identity"
                    if self.shortcut is None
                    else f"{self.shortcut.n_in} -> {self.shortcut.n_out}"
                )
            )

    def _branches(self) -> list[Sequential]:
        return [self.main] if self.shortcut is None else [self.main, self.shortcut]

    def children(self) -> list[tuple[str, Layer]]:
        """The branches: ``("0", main)`` and, with a projection, ``("1", shortcut)``."""
        return [(str(b), branch) for b, branch in enumerate(self._branches())]

    def macs(
        self,
        masks: Sequence[BoolArray | None],
        live: BoolArray | None = None,
        spatial: tuple[int, int] | None = None,
        *,
        prefix: str = "",
        on_leaf: Callable[[str, int, tuple[int, int] | None], object] | None = None,
    ) -> tuple[int, BoolArray | None, tuple[int, int] | None]:
        """Forward multiply-adds per sample of both branches (see :meth:`Layer.macs`).

        The live channels of the sum are the union of the branches'.
        """
        masks = list(masks)
        n_main = self.main.n_masks
        main, shortcut = masks[:n_main], masks[n_main:]
        total, live_out, size = self.main.macs(
            main, live, spatial, prefix=f"{prefix}0.", on_leaf=on_leaf
        )
        live_s, size_s = live, spatial
        if self.shortcut is not None:
            n, live_s, size_s = self.shortcut.macs(
                shortcut, live, spatial, prefix=f"{prefix}1.", on_leaf=on_leaf
            )
            total += n
        if size != size_s:
            where = prefix.rstrip(".") or "the block"
            raise ValueError(f"the branches of {where} disagree: {size} != {size_s}")
        union = None if live_out is None or live_s is None else live_out | live_s
        return total, union, size

    # ------------------------------------------------------------------ structure

    @property
    def n_in(self) -> int | None:
        """Number of input features (channels)."""
        return self.main.n_in

    @property
    def n_out(self) -> int | None:
        """Number of output features (channels)."""
        return self.main.n_out if self.main.n_out is not None else self.main.n_in

    @property
    def dtype(self) -> np.dtype | None:
        """Floating-point type of the parameters."""
        return next((b.dtype for b in self._branches() if b.dtype is not None), None)

    @property
    def n_masks(self) -> int:
        """Masks of the main branch, then of the shortcut."""
        return sum(b.n_masks for b in self._branches())

    def _slots(self) -> Iterator[tuple[Sequential, int, UnitMap]]:
        for branch in self._branches():
            yield from branch._slots()

    def params(self) -> dict[str, FloatArray]:
        """Every parameter by ``"0.<main key>"`` / ``"1.<shortcut key>"``."""
        out: dict[str, FloatArray] = {}
        for i, branch in enumerate(self._branches()):
            out.update(_prefixed(i, branch.params()))
        return out

    def buffers(self) -> dict[str, np.ndarray]:
        """Every buffer, keyed like :meth:`params`."""
        out: dict[str, np.ndarray] = {}
        for i, branch in enumerate(self._branches()):
            out.update(_prefixed(i, branch.buffers()))
        return out

    def n_active(self, mask: Any = None, live: BoolArray | None = None, mode: Mode = TRAIN) -> int:
        """Multiply-adds per sample of both branches with every unit kept."""
        return sum(layer.n_active(None, None, mode) for b in self._branches() for layer in b.layers)

    # ------------------------------------------------------------------ passes

    def _check_input(self, x: npt.ArrayLike) -> FloatArray:
        return self.main._check_input(x)

    def _check_dout(self, dout: npt.ArrayLike, cache: Any) -> FloatArray:
        n_rows = cache.out.shape[0] if cache.live_out is None else cache.live_out.shape[0]
        shape = (n_rows, *cache.out.shape[1:])
        dout = np.ascontiguousarray(check_array(dout, "dout", shape=shape))
        if dout.dtype != cache.out.dtype:
            raise TypeError(f"dout must have dtype {cache.out.dtype}, got {dout.dtype}")
        return dout

    def forward(
        self,
        x: npt.ArrayLike,
        masks: Sequence[npt.ArrayLike | None] | None = None,
        *,
        live: npt.ArrayLike | None = None,
        mode: Mode = TRAIN,
    ) -> tuple[FloatArray, ResidualCache]:
        """Forward pass with one mask per prunable layer (see :meth:`Sequential.forward`)."""
        x = self._check_input(x)
        checked = Sequential._check_masks(self, masks)  # type: ignore[arg-type]
        return self._forward(x, checked, _check_live(live, self.n_in), mode)

    compact_kind = "indexed"

    def _forward(
        self, x: FloatArray, mask: Any, live: BoolArray | None, mode: Mode
    ) -> tuple[FloatArray, ResidualCache]:
        # Full arrays in and out; compact activations inside.
        x, live_in, zero_in = _enter(x, live, mode)
        out, cache, live_out = self._run(x, mask, live_in, mode)
        cache = cache._replace(live_in=live_in, live_out=live_out, zero_in=zero_in)
        return (out if live_out is None else expand_rows(out, live_out)), cache

    def _run(
        self,
        x: FloatArray,
        masks: Sequence[BoolArray | None],
        live: BoolArray | None,
        mode: Mode,
    ) -> tuple[FloatArray, ResidualCache, BoolArray | None]:
        # x is compact (the rows of live) when live is given; so are both branches'
        # outputs (of their own live rows) and the sum (of the union).
        k = self.main.n_masks
        a, main_cache, live_a = self.main._run(x, masks[:k], live, mode)
        shortcut_cache = None
        if self.shortcut is None:
            b, live_b = x, live
        else:
            b, shortcut_cache, live_b = self.shortcut._run(x, masks[k:], live, mode)
        full_a = (a.shape[0] if live_a is None else live_a.shape[0], *a.shape[1:])
        full_b = (b.shape[0] if live_b is None else live_b.shape[0], *b.shape[1:])
        if full_a != full_b:
            raise ValueError(
                f"the main branch outputs {full_a} but the shortcut {full_b}; give the "
                "shortcut the main branch's stride and channels"
            )
        live_out = None if live_a is None or live_b is None else live_a | live_b
        rows_a, rows_b = _rows_in(live_a, live_out), _rows_in(live_b, live_out)
        if rows_a is None and rows_b is None:
            out = a + b
        else:
            n_rows = full_a[0] if live_out is None else int(live_out.sum())
            out = np.zeros((n_rows, *a.shape[1:]), dtype=a.dtype)
            if rows_a is None:
                out[:] = a
            else:
                out[rows_a] = a
            if rows_b is None:
                out += b
            else:
                out[rows_b] += b
        if self.activation == "relu":
            np.maximum(out, 0, out=out)
        cache = ResidualCache(main_cache, shortcut_cache, out, rows_a, rows_b)
        return out, cache, live_out

    def backward(
        self, dout: npt.ArrayLike, cache: ResidualCache, *, need_dx: bool = True
    ) -> tuple[FloatArray | None, dict[str, FloatArray]]:
        """Backward pass through both branches; grads keyed like :meth:`params`."""
        return self._backward(self._check_dout(dout, cache), cache, need_dx)

    def _backward(
        self, dout: FloatArray, cache: ResidualCache, need_dx: bool = True
    ) -> tuple[FloatArray | None, dict[str, FloatArray]]:
        d = dout if cache.live_out is None else gather_rows(dout, cache.live_out)
        dx, grads = self._run_backward(d, cache, need_dx)
        return _leave_dx(dx, cache.live_in, cache.zero_in), grads

    def _run_backward(
        self, dout: FloatArray, cache: ResidualCache, need_dx: bool
    ) -> tuple[FloatArray | None, dict[str, FloatArray]]:
        # Backward of _run, on compact arrays.
        d = dout * (cache.out > 0) if self.activation == "relu" else dout
        d_main = d if cache.rows_main is None else np.ascontiguousarray(d[cache.rows_main])
        d_short = d if cache.rows_shortcut is None else np.ascontiguousarray(d[cache.rows_shortcut])
        dx, grads = self.main._run_backward(d_main, cache.main, need_dx)
        grads = _prefixed(0, grads)
        if self.shortcut is None:
            dx_short: FloatArray | None = d_short
        else:
            if not (cache.shortcut is not None):
                raise RuntimeError("internal error: a block with a shortcut caches it")
            dx_short, short_grads = self.shortcut._run_backward(d_short, cache.shortcut, need_dx)
            grads.update(_prefixed(1, short_grads))
        if need_dx:
            if not (dx is not None and dx_short is not None):
                raise RuntimeError("internal error: both branches return dx when asked")
            dx = dx + dx_short
        return (dx if need_dx else None), grads

    # ------------------------------------------------------------------ storage

    def config(self) -> dict[str, Any]:
        """The branches' configurations and the activation."""
        return {
            "main": self.main.config(),
            "shortcut": None if self.shortcut is None else self.shortcut.config(),
            "activation": self.activation,
        }

    def arrays(self) -> dict[str, np.ndarray]:
        """Every array of both branches, keyed like :meth:`params`."""
        out: dict[str, np.ndarray] = {}
        for i, branch in enumerate(self._branches()):
            out.update(_prefixed(i, branch.arrays()))
        return out

    @classmethod
    def from_config(cls, config: dict[str, Any], arrays: dict[str, np.ndarray]) -> Residual:
        """Rebuild the block and its branches."""
        main = Sequential.from_config(config["main"], _unprefixed(0, arrays)).layers
        shortcut = None
        if config["shortcut"] is not None:
            shortcut = Sequential.from_config(config["shortcut"], _unprefixed(1, arrays)).layers
        return cls(main, shortcut, activation=config["activation"])

    def __repr__(self) -> str:
        return f"Residual(main={self.main!r}, shortcut={self.shortcut!r})"
