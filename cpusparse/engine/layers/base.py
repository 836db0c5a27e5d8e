r"""The layer protocol: what every layer provides, and what a prunable layer adds.

Every layer is a :class:`Layer` with explicit state and pure passes:

- ``forward(x, mask=None, *, live=None, mode=TRAIN) -> (out, cache)`` and
  ``backward(dout, cache, *, need_dx=True) -> (dx, grads)``, where ``grads`` holds
  fresh arrays keyed like :meth:`Layer.params`. Nothing is kept on the layer between
  the two calls, so K forward passes with K masks need nothing special.
- ``params()`` (trainable arrays, updated in place by the optimizers) and
  ``buffers()`` (non-trainable state such as batch-norm running statistics).
- ``units``: ``None`` for a layer that takes no mask, else a :class:`UnitMap` that
  says what one mask bit keeps (a stored weight, an output neuron, a channel), how
  many stored weights each unit owns, what compaction keeps and how per-unit arrays
  are laid out densely. Every granularity-specific decision lives in a unit map.
- ``live_outputs(mask, live)``: the output features that may be nonzero, given the
  mask and the input features that may be nonzero (``live``; None means all). A
  container passes it to the next layer, which skips work on inputs known to be
  exactly zero. This is also how one prunable unit spans several layers: a channel
  dropped by a convolution is known zero in the batch norm and the pooling after it.
- ``config()``, ``arrays()`` and ``from_config(config, arrays)``: the layer's own
  serialisation, for checkpoints. Every concrete subclass registers itself by class
  name in :data:`LAYER_TYPES` when it is defined, so a checkpoint can rebuild any
  layer kind, including one defined outside the package, without a type switch.

Activations are feature-major: ``x`` has shape ``(n_in, n_batch)``, one column per
sample. Images are channel-major, ``(n_channels, n_batch, height, width)``, the same
rule with channels as features: a channel is a row block, so gathering kept channels
is gathering rows, and the im2col product of a convolution, ``W (C_out, C_in*kh*kw)
@ cols (C_in*kh*kw, N*H_out*W_out)``, is already the output in this layout (no
transpose). ``n_in``/``n_out`` of an image layer count channels, and ``live`` has one
bit per channel. The public ``forward``/``backward`` validate their input once; containers call
the unvalidated ``_forward``/``_backward`` after validating at their own boundary.

The :class:`Mode` of a pass says whether it is a training pass (batch statistics) or
an evaluation pass (running statistics), and whether it is a straight-through pass
(every stored entry computed, the mask applied multiplicatively, so that the backward
pass yields :math:`\partial L / \partial m` in ``grads["mask"]``).

Compact activations. Between the layers of a container, the features known to be
zero need not be stored at all: a layer whose ``compact_kind`` is ``"channelwise"`` or
``"indexed"`` takes and returns *compact* activations, the rows of the live features
only (``x[live]``, shape ``(live.sum(), n_batch, ...)``), when ``live`` is not None.
A channelwise layer (ReLU, the pools, flattening) computes the same thing on the kept
rows and ignores ``live``; an indexed layer (convolution, batch norm, linear) reads
``live`` to pick its parameters' rows and columns, through ``_forward_compact`` and
``_backward_compact``; its output is compact with respect to its
:meth:`~Layer.live_outputs`. A layer with ``compact_kind = None`` (the default, e.g. the
CSR layers) takes full activations with zeros, as the public ``forward`` does. The
container converts (gathers or scatters the rows) only between layers of different
kinds, so a channel-sparse CNN carries its kept channels only, from the first
convolution to the classifier, and no pass touches a dropped channel. The public
``forward``/``backward`` of every layer and container take and return full arrays.

Containers (:mod:`cpusparse.engine.containers`) are layers too: they report
``n_masks`` (the number of prunable layers inside them) and take that many masks, so
a block with two inputs, such as a residual add, is a container whose ``_run`` sends
one input through two branches and adds them.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, ClassVar, NamedTuple

import numpy as np

if TYPE_CHECKING:
    import numpy.typing as npt

from ..._typing import BoolArray, FloatArray
from ..._validation import check_array, check_same_dtype
from ..csr import _check_activations

__all__ = [
    "Mode",
    "TRAIN",
    "EVAL",
    "STRAIGHT_THROUGH",
    "Layer",
    "UnitMap",
    "LAYER_TYPES",
    "check_images",
]


class Mode(NamedTuple):
    """How a forward pass runs.

    Attributes
    ----------
    training : bool, default=True
        A training pass (batch statistics, buffers updated) or an evaluation pass.
    straight_through : bool, default=False
        Compute every stored entry and apply the mask multiplicatively, so that the
        backward pass returns the gradient with respect to the mask (the chain-rule
        baseline); masks are then not used to skip work.
    update_stats : bool, default=True
        Whether a training pass updates running statistics (batch norm). The
        training step runs K forward passes per step and sets it for the first pass
        only, unless ``TrainConfig.norm_updates="every_pass"`` (the authors' code,
        whose K passes in train mode update them K times).
    """

    training: bool = True
    straight_through: bool = False
    update_stats: bool = True


TRAIN = Mode()
"""A sparse training pass (the default)."""
EVAL = Mode(training=False)
"""An evaluation pass."""
STRAIGHT_THROUGH = Mode(straight_through=True)
"""A dense training pass through the mask, for the straight-through estimator."""

LAYER_TYPES: dict[str, type[Layer]] = {}
"""Every concrete layer class by name (filled by :meth:`Layer.__init_subclass__`)."""


class UnitMap(abc.ABC):
    """What the mask bits of one prunable layer keep.

    A unit map belongs to one layer (``layer.units``) and answers every question
    whose answer depends on the granularity, so that containers, the training loop,
    compaction, checkpoints and traces never branch on it.

    Attributes
    ----------
    granularity : str
        Name of the kind of unit (``"weight"``, ``"neuron"``, ...).
    zeroes_outputs : bool
        True when a dropped unit makes output features exactly zero (a neuron or a
        channel): the next layer's inputs are then masked too.
    thins_fan_in : bool
        True when a kept unit computes with only part of its inputs (one bit per
        weight), so that weight initialisation scales the fan-in by the density.
    """

    granularity: ClassVar[str]
    zeroes_outputs: ClassVar[bool]
    thins_fan_in: ClassVar[bool]

    @property
    @abc.abstractmethod
    def n_units(self) -> int:
        """Number of mask bits."""

    @property
    @abc.abstractmethod
    def n_units_full(self) -> int:
        """Number of units of the layer with every entry stored (for density reports)."""

    @abc.abstractmethod
    def stored_per_unit(self) -> npt.NDArray[np.integer]:
        """Number of stored weights each unit owns, shape ``(n_units,)``."""

    def stored_by(self, units: BoolArray) -> int:
        """Number of stored weights the units where ``units`` is True own together."""
        per_unit = self.stored_per_unit()
        return int(per_unit.sum(where=units))

    @abc.abstractmethod
    def compaction(self, dead: BoolArray) -> tuple[BoolArray, dict[str, BoolArray]]:
        """What compaction keeps when the units ``dead`` can never be sampled again.

        Parameters
        ----------
        dead : ndarray of bool, shape (n_units,)

        Returns
        -------
        kept_units : ndarray of bool, shape (n_units,)
            The units that stay in the score vector (arrays aligned with the units,
            such as scores and their optimizer state, are compacted with it).
        kept_entries : dict of str to ndarray of bool
            For each parameter whose entries shrink, the entries kept (its
            optimizer state is compacted with it); see :meth:`Layer.compact`.
        """

    def dense(self, values: npt.ArrayLike, fill: Any = 0) -> np.ndarray:
        """Per-unit values ``(..., n_units)`` in the layer's dense layout (for traces)."""
        return np.array(values, copy=True)

    def check_mask(self, mask: npt.ArrayLike) -> BoolArray:
        """``mask`` as a contiguous boolean array of shape ``(n_units,)``, or an error."""
        mask = np.asarray(mask)
        if mask.dtype != np.bool_:
            raise TypeError(f"mask must be a boolean array, got dtype {mask.dtype}")
        if mask.shape != (self.n_units,):
            raise ValueError(
                f"mask must have shape ({self.n_units},) (one bit per {self.granularity}), "
                f"got {mask.shape}"
            )
        return np.ascontiguousarray(mask)


class ViaFullCache(NamedTuple):
    """A compact pass computed on full activations: its cache, live inputs and outputs."""

    inner: Any
    live: BoolArray | None
    live_out: BoolArray | None


class Layer(abc.ABC):
    """Base of every layer; see the module docstring for the contract.

    Subclasses implement :meth:`_forward`, :meth:`_backward` and :meth:`config`, and
    override the rest where the defaults do not fit: any number of features
    (:attr:`n_in`, :attr:`n_out` None, for elementwise layers), no parameters, no
    buffers, no units, every output live, and rebuilt by ``cls(**arrays, **config)``.
    """

    units: UnitMap | None = None
    """What the mask bits keep; None for a layer that takes no mask."""

    compact_kind: ClassVar[str | None] = None
    """How the layer takes compact activations (see the module docstring): None (full
    activations), ``"channelwise"`` or ``"indexed"``."""

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if not getattr(cls, "__abstractmethods__", None):
            LAYER_TYPES[cls.__name__] = cls

    # ------------------------------------------------------------------ sizes

    @property
    def n_in(self) -> int | None:
        """Number of input features (None: any number, for an elementwise layer)."""
        return None

    @property
    def n_out(self) -> int | None:
        """Number of output features (None: as many as the inputs)."""
        return None

    @property
    def n_masks(self) -> int:
        """Number of masks the layer takes: 1 if prunable, else 0 (containers: more)."""
        return 0 if self.units is None else 1

    @property
    def dtype(self) -> np.dtype | None:
        """Floating type of the parameters (None for a layer without parameters)."""
        params = self.params()
        return next(iter(params.values())).dtype if params else None

    def children(self) -> list[tuple[str, Layer]]:
        """The layers directly inside, by name (none for a leaf; containers override).

        The names prefix the children's parameter names (:meth:`params`).
        """
        return []

    def named_leaves(self, prefix: str = "") -> Iterator[tuple[str, Layer]]:
        """``(name, layer)`` of every leaf layer inside, in forward order.

        A leaf's name is its path, the prefix of its parameters' names in the
        outermost container: ``"3.0.1"`` is layer 1 of branch 0 of layer 3. A leaf
        itself yields ``(prefix without its dot, self)``.
        """
        kids = self.children()
        if not kids:
            yield prefix.rstrip("."), self
            return
        for name, child in kids:
            yield from child.named_leaves(f"{prefix}{name}.")

    def _slots(self) -> Iterator[tuple[Any, int, UnitMap]]:
        """``(container, position, unit map)`` of each prunable layer inside, in mask order.

        Containers (layers made of layers) override it so that the prunable layers of
        nested blocks take their place in the mask list; a leaf has none of its own
        (its container lists it).
        """
        return iter(())

    # ------------------------------------------------------------------ state

    def params(self) -> dict[str, np.ndarray]:
        """The trainable arrays by name (the arrays themselves, updated in place)."""
        return {}

    def buffers(self) -> dict[str, np.ndarray]:
        """Non-trainable state by name (e.g. running statistics); none by default."""
        return {}

    def live_outputs(self, mask: BoolArray | None, live: BoolArray | None) -> BoolArray | None:
        """Output features that may be nonzero after a pass with ``mask``.

        Parameters
        ----------
        mask : ndarray of bool or None
            The layer's mask (None for a layer without units, or everything kept).
        live : ndarray of bool, shape (n_in,), or None
            Input features that may be nonzero; None means every one.

        Returns
        -------
        ndarray of bool, shape (n_out,), or None
            None means every output may be nonzero (the default).
        """
        return None

    def n_active(
        self, mask: BoolArray | None = None, live: BoolArray | None = None, mode: Mode = TRAIN
    ) -> int:
        """Number of weights one pass multiplies with, per sample (its multiply-adds).

        The cost model of the benchmarks: a pass with mask ``mask`` on inputs of which
        only ``live`` may be nonzero. 0 for a layer without weights (the default).
        """
        return 0

    def output_spatial(self, spatial: tuple[int, int] | None) -> tuple[int, int] | None:
        """The spatial size ``(H, W)`` of the output for inputs of size ``spatial``.

        None is no spatial size (feature vectors). The default keeps the input's;
        convolutions and pools change it, global pooling and flattening drop it.
        """
        return spatial

    def macs(
        self,
        masks: Sequence[BoolArray | None],
        live: BoolArray | None = None,
        spatial: tuple[int, int] | None = None,
        *,
        prefix: str = "",
        on_leaf: Callable[[str, int, tuple[int, int] | None], object] | None = None,
    ) -> tuple[int, BoolArray | None, tuple[int, int] | None]:
        """Forward multiply-adds per sample with ``masks``: the executed cost.

        Parameters
        ----------
        masks : sequence of (ndarray of bool or None)
            The layer's :attr:`n_masks` masks (None keeps every unit).
        live : ndarray of bool, optional
            Input features (channels) that may be nonzero; None means every one.
        spatial : (H, W) or None
            The inputs' spatial size (None for feature vectors).
        prefix : str, default=""
            The layer's path with a trailing dot (:meth:`named_leaves`), for ``on_leaf``.
        on_leaf : callable, optional
            Called as ``on_leaf(name, macs, spatial_out)`` for every leaf that multiplies.

        Returns
        -------
        macs : int
            :meth:`n_active` times the output positions (``H_out * W_out``, or 1).
        live : ndarray of bool or None
            The outputs that may be nonzero (:meth:`live_outputs`).
        spatial : (H, W) or None
            The outputs' spatial size (:meth:`output_spatial`).
        """
        mask = masks[0] if self.n_masks else None
        out = self.output_spatial(spatial)
        n = self.n_active(mask, live) * (1 if out is None else out[0] * out[1])
        if n and on_leaf is not None:
            on_leaf(prefix.rstrip("."), n, out)
        return n, self.live_outputs(mask, live), out

    # ------------------------------------------------------------------ passes

    def forward(
        self,
        x: npt.ArrayLike,
        mask: Any = None,
        *,
        live: npt.ArrayLike | None = None,
        mode: Mode = TRAIN,
    ) -> tuple[FloatArray, object]:
        """Forward pass (validated).

        Parameters
        ----------
        x : ndarray of shape (n_in, n_batch)
            Feature-major input, the layer's dtype.
        mask : ndarray of bool, shape (units.n_units,), optional
            Keep bits of a prunable layer; None keeps every unit.
        live : ndarray of bool, shape (n_in,), optional
            Inputs that may be nonzero; the layer computes as if ``x`` were zero
            outside them.
        mode : Mode, default=TRAIN

        Returns
        -------
        out : ndarray of shape (n_out, n_batch)
        cache : object
            Everything :meth:`backward` needs.
        """
        x = self._check_input(x)
        mask = self._check_mask(mask)
        live = _check_live(live, self.n_in)
        return self._forward(x, mask, live, mode)

    def backward(
        self, dout: npt.ArrayLike, cache: Any, *, need_dx: bool = True
    ) -> tuple[FloatArray | None, dict[str, FloatArray]]:
        """Backward pass (validated).

        Parameters
        ----------
        dout : ndarray of shape (n_out, n_batch)
            Gradient of the loss with respect to the forward output.
        cache : object
            From :meth:`forward`.
        need_dx : bool, default=True
            Whether to compute the input gradient (False for the first layer).

        Returns
        -------
        dx : ndarray of shape (n_in, n_batch) or None
        grads : dict of str to ndarray
            Fresh arrays keyed like :meth:`params`; a straight-through pass adds
            ``"mask"``, the gradient with respect to the mask.
        """
        dout = self._check_dout(dout, cache)
        return self._backward(dout, cache, need_dx)

    @abc.abstractmethod
    def _forward(
        self, x: FloatArray, mask: Any, live: BoolArray | None, mode: Mode
    ) -> tuple[FloatArray, object]:
        """Unvalidated forward pass; see :meth:`forward`."""

    @abc.abstractmethod
    def _backward(
        self, dout: FloatArray, cache: Any, need_dx: bool
    ) -> tuple[FloatArray | None, dict[str, FloatArray]]:
        """Unvalidated backward pass; see :meth:`backward`."""

    def _run(
        self,
        x: FloatArray,
        masks: Sequence[BoolArray | None],
        live: BoolArray | None,
        mode: Mode,
    ) -> tuple[FloatArray, object, BoolArray | None]:
        """One step of a container: ``(out, cache, live_out)`` with ``n_masks`` masks.

        ``x`` and ``out`` are compact (the rows of ``live`` and ``live_out``) for a
        layer whose :attr:`compact_kind` is set, full otherwise.
        """
        mask = masks[0] if masks else None
        live_out = None if mode.straight_through else self.live_outputs(mask, live)
        if self.compact_kind == "indexed":
            out, cache = self._forward_compact(x, mask, live, mode)
        elif self.compact_kind == "channelwise":
            out, cache = self._forward(x, mask, None, mode)  # every row of x is live
        else:
            out, cache = self._forward(x, mask, live, mode)
        return out, cache, live_out

    def _run_backward(
        self, dout: FloatArray, cache: Any, need_dx: bool
    ) -> tuple[FloatArray | None, dict[str, FloatArray]]:
        """Backward of :meth:`_run`: ``dout`` and ``dx`` in the layout of its output and input."""
        if self.compact_kind == "indexed":
            return self._backward_compact(dout, cache, need_dx)
        return self._backward(dout, cache, need_dx)

    def _forward_compact(
        self, x: FloatArray, mask: Any, live: BoolArray | None, mode: Mode
    ) -> tuple[FloatArray, object]:
        """Forward on compact ``x`` (rows of ``live``), compact output (indexed layers)."""
        raise NotImplementedError(f"{type(self).__name__} takes no compact activations")

    def _backward_compact(
        self, dout: FloatArray, cache: Any, need_dx: bool
    ) -> tuple[FloatArray | None, dict[str, FloatArray]]:
        """Backward of :meth:`_forward_compact`."""
        raise NotImplementedError(f"{type(self).__name__} takes no compact activations")

    def _forward_via_full(
        self, x: FloatArray, mask: Any, live: BoolArray | None, mode: Mode
    ) -> tuple[FloatArray, ViaFullCache]:
        """:meth:`_forward_compact` through the full pass (for the paths without one)."""
        full = x if live is None else expand_rows(x, live)
        out, cache = self._forward(full, mask, live, mode)
        live_out = None if mode.straight_through else self.live_outputs(mask, live)
        if live_out is not None:
            out = gather_rows(out, live_out)
        return out, ViaFullCache(cache, live, live_out)

    def _backward_via_full(
        self, dout: FloatArray, cache: ViaFullCache, need_dx: bool
    ) -> tuple[FloatArray | None, dict[str, FloatArray]]:
        """Backward of :meth:`_forward_via_full`."""
        full = dout if cache.live_out is None else expand_rows(dout, cache.live_out)
        dx, grads = self._backward(full, cache.inner, need_dx)
        if dx is not None and cache.live is not None:
            dx = gather_rows(dx, cache.live)
        return dx, grads

    def _check_input(self, x: npt.ArrayLike) -> FloatArray:
        return _check_activations(x, self.n_in, "x", self.dtype)

    def _check_dout(self, dout: npt.ArrayLike, cache: Any) -> FloatArray:
        dout = _check_activations(dout, self.n_out, "dout", self.dtype)
        expected = getattr(cache, "out", None)
        if expected is not None and dout.shape != expected.shape:
            raise ValueError(f"dout must have shape {expected.shape}, got {dout.shape}")
        return dout

    def _check_mask(self, mask: npt.ArrayLike | None) -> BoolArray | None:
        if mask is None:
            return None
        if self.units is None:
            raise ValueError(f"{type(self).__name__} takes no mask, got one")
        return self.units.check_mask(mask)

    # ------------------------------------------------------------------ storage

    def stored_pattern(self) -> np.ndarray | None:
        """Dense boolean ``(n_out, n_in)`` map of the stored weights (None: no weight)."""
        return None

    def dense(self, name: str, values: npt.ArrayLike, fill: Any = 0) -> np.ndarray:
        """Values aligned with parameter ``name`` in its dense layout (for traces).

        ``values`` has the parameter's shape, optionally with leading axes (one per
        mask pass); the default layout is the parameter's own.
        """
        return np.array(values, copy=True)

    def compact(self, kept_entries: dict[str, BoolArray]) -> Layer:
        """A new layer without the entries that ``kept_entries`` drops.

        ``kept_entries`` comes from ``units.compaction``; layers without units are
        never compacted.
        """
        raise NotImplementedError(f"{type(self).__name__} cannot be compacted")

    @abc.abstractmethod
    def config(self) -> dict[str, Any]:
        """JSON-ready settings that, with :meth:`arrays`, rebuild the layer."""

    def arrays(self) -> dict[str, np.ndarray]:
        """Every array needed to rebuild the layer: parameters, buffers, structure."""
        return {**self.params(), **self.buffers()}

    @classmethod
    def from_config(cls, config: dict[str, Any], arrays: dict[str, np.ndarray]) -> Layer:
        """Rebuild a layer from :meth:`config` and :meth:`arrays`."""
        return cls(**arrays, **config)


def expand_rows(x: FloatArray, live: BoolArray) -> FloatArray:
    """Full activations from compact ones: the rows of ``live`` are ``x``, the rest 0."""
    full = np.zeros((live.shape[0], *x.shape[1:]), dtype=x.dtype)
    full[live] = x
    return full


def gather_rows(x: FloatArray, live: BoolArray) -> FloatArray:
    """Compact activations from full ones: the rows of ``live``, C-contiguous."""
    return np.ascontiguousarray(x[live])


def check_images(
    x: npt.ArrayLike, n_channels: int | None, name: str, dtype: npt.DTypeLike | None = None
) -> FloatArray:
    """``x`` as a C-contiguous channel-major image batch ``(C, N, H, W)``, or an error.

    Parameters
    ----------
    x : array_like
        The batch; float32 or float64, finite.
    n_channels : int or None
        The number of channels expected (None: any).
    name : str
        The argument's name, for the error messages.
    dtype : dtype, optional
        The layer's dtype; a batch of another float type is refused, not cast.
    """
    x = check_array(x, name, finite=True)
    if x.ndim != 4:
        raise ValueError(
            f"{name} must be a 4-D channel-major image batch (n_channels, n_batch, height, "
            f"width), got shape {x.shape}"
        )
    if n_channels is not None and x.shape[0] != n_channels:
        raise ValueError(
            f"{name} must have {n_channels} channels on axis 0 (layout (C, N, H, W)), got "
            f"shape {x.shape}"
        )
    if dtype is not None:
        check_same_dtype((name, x), ("weight", np.empty(0, dtype)))
    return np.ascontiguousarray(x)


def _check_live(live: npt.ArrayLike | None, n: int | None) -> BoolArray | None:
    if live is None:
        return None
    live = np.asarray(live)
    if live.dtype != np.bool_:
        raise TypeError(f"live must be a boolean array, got dtype {live.dtype}")
    if live.ndim != 1 or (n is not None and live.shape != (n,)):
        raise ValueError(f"live must have shape ({n},) (one bit per input), got {live.shape}")
    return np.ascontiguousarray(live)
