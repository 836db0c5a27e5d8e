r"""Export a trained sparse network: a narrower dense network, or a PyTorch module.

A trained network is a :class:`~cpusparse.engine.containers.Sequential` and one mask per
prunable layer (in the order of ``network.prunable_layers()``). :func:`narrow` turns the
two into a physically narrower *dense* network that computes the same function in
evaluation mode; :func:`kept_outputs` says which of the original output channels
(neurons) each prunable layer keeps; :func:`to_torch` builds the narrowed network from
``torch.nn`` layers.

What narrowing removes
======================

The engine knows, layer by layer, which features are exactly zero
(:meth:`~cpusparse.engine.layers.base.Layer.live_outputs`): the channels a channel mask
drops, the neurons a neuron mask drops, and everything that follows them channel by
channel (batch norm with ``mask_order="after_norm"``, ReLU, pools, flattening, global
pooling). :func:`narrow` deletes those features: the rows of the layer that drops them
and the matching input columns of the next convolution or linear layer (after
:class:`~cpusparse.engine.layers.pool.Flatten` a channel owns ``H*W`` consecutive
columns).

Layers that work channel by channel, and the two inputs and the output of a residual
add (:class:`~cpusparse.engine.containers.Residual`), must hold the same channels. A
channel is kept at such a join when it may be nonzero in *any* of the activations
joined: after a residual add, where either branch is alive (an identity shortcut ties
the block's input to its output, so a stage of identity blocks shares one set of
channels). A convolution or linear layer asked for a channel that its own mask drops
gets a row of zero weights (and zero bias), and a batch norm after it zero
:math:`\gamma` and :math:`\beta` for that channel, so that it outputs exactly 0 as in
the sparse network. Inside a residual branch the channels are narrowed independently
(the middle convolution of a basic block).

- ``granularity="weight"`` layers keep their shapes: the dense weight is ``W * m``
  (a unit whose weights are all dropped still outputs ``act(bias)``, so nothing is
  known to be zero and nothing is removed).
- A batch norm with ``mask_order="before_norm"`` outputs :math:`\gamma (0 - \mu_r) /
  \sqrt{\sigma^2_r + \epsilon} + \beta`, a constant, on a dropped channel: the channel
  is kept (its convolution row is zero, the batch norm keeps its parameters), so the
  result is exact but not narrower there.
- A layer whose mask keeps nothing would have no output: it keeps one channel (its
  first) of zeros instead, so the narrowed network stays valid (no layer has 0
  channels) and computes the same function.

The narrowed network has the same structure (a residual block stays a block), with
:class:`~cpusparse.engine.layers.linear.Linear` for every linear layer, dense
:class:`~cpusparse.engine.layers.conv.Conv2d` (``granularity=None``) for every
convolution, and each fused activation (``activation="relu"`` of a linear or
convolution layer) as a :class:`~cpusparse.engine.layers.activation.ReLU` layer of its
own, so that each layer of the narrowed network has one ``torch.nn`` counterpart. It
takes no masks.

PyTorch
=======

:func:`to_torch` returns a ``torch.nn.Sequential`` in evaluation mode, layer ``i`` the
counterpart of layer ``i`` of :func:`narrow`'s network: ``Conv2d``, ``BatchNorm1d``,
``BatchNorm2d`` (same ``eps`` and ``momentum``, running statistics copied), ``ReLU``,
``MaxPool2d``, ``AvgPool2d``, ``Flatten``, ``Linear``, ``Sequential(AdaptiveAvgPool2d(1),
Flatten())`` for a global average pool and ``cpusparse.export.TorchResidual`` for a residual block.
Its ``state_dict()`` has the keys of the narrowed network's
:meth:`~cpusparse.engine.containers.Sequential.arrays` (``"3.0.0.weight"``: layer 3, main
branch, its layer 0), plus PyTorch's ``num_batches_tracked`` of each batch norm.

The layouts differ by a transpose: cpusparse is feature-major, PyTorch sample-major.

=========================  ============================  ==========================
activations                cpusparse                     PyTorch
=========================  ============================  ==========================
features (MLP input)       ``(F, N)``                    ``(N, F)``: ``x.T``
images                     ``(C, N, H, W)``              ``(N, C, H, W)``:
                                                         ``x.transpose(1, 0, 2, 3)``
logits                     ``(n_classes, N)``            ``(N, n_classes)``: ``.T``
=========================  ============================  ==========================

Weights need no transpose: both store them ``(n_out, n_in)`` and ``(C_out, C_in, kh,
kw)``.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, NamedTuple

import numpy as np

from ._typing import BoolArray, IndexArray
from .engine.containers import Residual, Sequential
from .engine.layers.activation import ReLU
from .engine.layers.base import Layer
from .engine.layers.conv import Conv2d
from .engine.layers.linear import Linear, SparseLinear
from .engine.layers.norm import BatchNorm1d, BatchNorm2d
from .engine.layers.pool import AvgPool2d, Flatten, GlobalAvgPool2d, MaxPool2d

if TYPE_CHECKING:
    import numpy.typing as npt
    import torch

__all__ = ["narrow", "kept_outputs", "to_torch"]

_CHANNELWISE = (ReLU, BatchNorm1d, BatchNorm2d, MaxPool2d, AvgPool2d, GlobalAvgPool2d)
# Layers whose output feature c is a function of input feature c alone (or of channel c,
# for the pools): they hold the same features on both sides.
_WEIGHTED = (Conv2d, SparseLinear, Linear)
_KNOWN = (*_WEIGHTED, *_CHANNELWISE, Flatten, Residual, Sequential)


class _Leaf(NamedTuple):
    # One layer of the network, its mask, and its input and output activations.
    layer: Layer
    mask: BoolArray | None
    src: int
    dst: int


class _Block(NamedTuple):
    # A residual block: its branches' steps, its input and the add's output.
    layer: Residual
    main: list[_Leaf | _Block | _Nested]
    shortcut: list[_Leaf | _Block | _Nested] | None
    src: int
    dst: int


class _Nested(NamedTuple):
    # A Sequential inside a Sequential.
    steps: list[_Leaf | _Block | _Nested]
    src: int
    dst: int


class _Plan:
    """Which features every activation of the narrowed network holds.

    Each activation is a node with two boolean arrays over the original features:
    ``live`` (may be nonzero in the sparse network, as the engine's ``live_outputs``
    says) and ``present`` (held by the narrowed network), ``present >= live``. Layers
    that work feature by feature tie their two nodes to hold the same features
    (``ties``: ``present[b] == repeat(present[a], r)``, ``r = H*W`` for a Flatten).
    """

    def __init__(self, network: Sequential, masks: Sequence[npt.ArrayLike | None] | None):
        if not isinstance(network, Sequential):
            raise TypeError(f"network must be a cpusparse Sequential, got {type(network).__name__}")
        checked = _check_masks(network, masks)
        if network.n_in is None:
            raise ValueError(
                "network must have a layer with a known number of inputs (a convolution, "
                "a linear layer, a batch norm or a Flatten), got none"
            )
        self.live: list[BoolArray] = []
        self.present: list[BoolArray] = []
        self.ties: list[tuple[int, int, int]] = []
        self.slots: list[int] = []  # output node of each prunable layer, in mask order
        self.source = self._node(network.n_in, None)
        self.steps, self.out = self._sequence(network, iter(checked), self.source, "layers")
        self._solve()

    def _node(self, size: int, live: BoolArray | None) -> int:
        alive = np.ones(size, dtype=bool) if live is None else np.array(live, dtype=bool)
        self.live.append(alive)
        self.present.append(alive.copy())
        return len(self.live) - 1

    def _sequence(
        self, seq: Sequential, masks: Iterator[BoolArray | None], src: int, where: str
    ) -> tuple[list[_Leaf | _Block | _Nested], int]:
        steps: list[_Leaf | _Block | _Nested] = []
        for i, layer in enumerate(seq.layers):
            here = f"{where}[{i}]"
            step: _Leaf | _Block | _Nested
            if type(layer) is Residual:
                step = self._residual(layer, masks, src, here)
            elif type(layer) is Sequential:
                inner, dst = self._sequence(layer, masks, src, f"{here}.layers")
                step = _Nested(inner, src, dst)
            elif type(layer) in _KNOWN:
                step = self._leaf(layer, masks, src)
            else:
                raise TypeError(
                    f"export does not know layer type {type(layer).__name__} (at "
                    f"network.{here}); known: {', '.join(t.__name__ for t in _KNOWN)}"
                )
            steps.append(step)
            src = step.dst
        return steps, src

    def _leaf(self, layer: Layer, masks: Iterator[BoolArray | None], src: int) -> _Leaf:
        mask = next(masks) if layer.units is not None else None
        live_in = self.live[src]
        live_out = layer.live_outputs(mask, None if live_in.all() else live_in)
        size = layer.n_out if layer.n_out is not None else live_in.shape[0]
        dst = self._node(size, live_out)
        if isinstance(layer, _CHANNELWISE):
            self.ties.append((src, dst, 1))
        elif isinstance(layer, Flatten):
            self.ties.append((src, dst, layer.shape[1] * layer.shape[2]))
        if layer.units is not None:
            self.slots.append(dst)
        return _Leaf(layer, mask, src, dst)

    def _residual(
        self, block: Residual, masks: Iterator[BoolArray | None], src: int, where: str
    ) -> _Block:
        main, a = self._sequence(block.main, masks, src, f"{where}.main.layers")
        shortcut, b = None, src
        if block.shortcut is not None:
            shortcut, b = self._sequence(block.shortcut, masks, src, f"{where}.shortcut.layers")
        # After the add a channel may be nonzero where either input may be.
        dst = self._node(self.live[a].shape[0], self.live[a] | self.live[b])
        self.ties += [(a, dst, 1), (b, dst, 1)]
        return _Block(block, main, shortcut, src, dst)

    def _solve(self) -> None:
        # Grow the present sets until every tie holds (they only grow, so this ends),
        # then give an activation that holds nothing one feature, known zero.
        while True:
            changed = True
            while changed:
                changed = False
                for a, b, r in self.ties:
                    pa, pb = self.present[a], self.present[b]
                    wide = np.repeat(pa, r) | pb
                    joined = np.asarray(wide.reshape(-1, r).any(axis=1))
                    if not (np.array_equal(joined, pa) and np.array_equal(wide, pb)):
                        self.present[a], self.present[b] = joined, np.repeat(joined, r)
                        changed = True
            empty = next((k for k, p in enumerate(self.present) if not p.any()), None)
            if empty is None:
                return
            self.present[empty][0] = True

    # ------------------------------------------------------------------ building

    def build(self) -> Sequential:
        return Sequential(self._build(self.steps))

    def _build(self, steps: list[_Leaf | _Block | _Nested]) -> list[Layer]:
        layers: list[Layer] = []
        for step in steps:
            if isinstance(step, _Nested):
                layers.append(Sequential(self._build(step.steps)))
            elif isinstance(step, _Block):
                shortcut = None if step.shortcut is None else self._build(step.shortcut)
                layers.append(
                    Residual(self._build(step.main), shortcut, activation=step.layer.activation)
                )
            else:
                layers += self._build_leaf(step)
        return layers

    def _build_leaf(self, step: _Leaf) -> list[Layer]:
        layer, mask = step.layer, step.mask
        rows = np.flatnonzero(self.present[step.dst])
        cols = np.flatnonzero(self.present[step.src])
        dead = ~self.live[step.dst][rows]  # held, but zero in the sparse network
        if isinstance(layer, Conv2d):
            weight = layer.weight
            if mask is not None and layer.units is not None:
                weight = weight * layer.units.kept_weights(mask)
            weight = weight[rows][:, cols]
            weight[dead] = 0
            bias = None
            if layer.bias is not None:
                bias = layer.bias[rows]
                bias[dead] = 0
            conv = Conv2d(
                weight,
                bias,
                stride=layer.stride,
                padding=layer.padding,
                granularity=None,
                max_cols_bytes=layer.max_cols_bytes,
            )
            return [conv, ReLU()] if layer.activation == "relu" else [conv]
        if isinstance(layer, SparseLinear | Linear):
            dense = layer.to_dense(mask) if isinstance(layer, SparseLinear) else layer.weight
            weight = dense[np.ix_(rows, cols)]
            weight[dead] = 0
            bias = layer.bias[rows]
            bias[dead] = 0
            linear = Linear(weight, bias)
            return [linear, ReLU()] if layer.activation == "relu" else [linear]
        if isinstance(layer, BatchNorm1d | BatchNorm2d):
            gamma, beta = layer.weight[rows], layer.bias[rows]
            if layer.mask_order == "after_norm":
                # A channel dropped before the norm outputs exactly 0 in the sparse network.
                off = ~self.live[step.src][rows]
                gamma[off] = 0
                beta[off] = 0
            norm = type(layer)(
                gamma,
                beta,
                layer.running_mean[rows],
                layer.running_var[rows],
                eps=layer.eps,
                momentum=layer.momentum,
                mask_order=layer.mask_order,
            )
            return [norm]
        if isinstance(layer, Flatten):
            return [Flatten((cols.shape[0], layer.shape[1], layer.shape[2]))]
        if isinstance(layer, MaxPool2d | AvgPool2d):
            return [type(layer)(layer.kernel_size, layer.stride, layer.padding)]
        if isinstance(layer, GlobalAvgPool2d):
            return [GlobalAvgPool2d()]
        return [ReLU()]


def _check_masks(
    network: Sequential, masks: Sequence[npt.ArrayLike | None] | None
) -> list[BoolArray | None]:
    layers = network.prunable_layers()
    if masks is None:
        return [None] * len(layers)
    if isinstance(masks, np.ndarray) or not isinstance(masks, Sequence):
        raise TypeError(
            f"masks must be a list of boolean arrays, one per prunable layer, got "
            f"{type(masks).__name__}"
        )
    if len(masks) != len(layers):
        raise ValueError(
            f"masks must hold one mask per prunable layer ({len(layers)}, of lengths "
            f"network.n_units() = {network.n_units()}), got {len(masks)}"
        )
    checked: list[BoolArray | None] = []
    for i, (layer, mask) in enumerate(zip(layers, masks, strict=True)):
        if mask is None or layer.units is None:
            checked.append(None)
            continue
        try:
            checked.append(layer.units.check_mask(mask))
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"masks[{i}] (of {type(layer).__name__} {layer!r}): {exc}") from None
    return checked


def narrow(network: Sequential, masks: Sequence[npt.ArrayLike | None] | None) -> Sequential:
    r"""The narrower dense network that computes what ``network`` computes with ``masks``.

    Removes every channel (neuron) that the masks make exactly zero, with the input
    columns that read it, and replaces sparse layers by dense ones; see the module
    documentation for what is kept at residual joins, for weight masks and for
    ``mask_order="before_norm"``.

    Parameters
    ----------
    network : Sequential
        Made of :class:`~cpusparse.engine.layers.linear.SparseLinear`,
        :class:`~cpusparse.engine.layers.linear.Linear`,
        :class:`~cpusparse.engine.layers.conv.Conv2d`, batch norms, ReLU, pools,
        :class:`~cpusparse.engine.layers.pool.Flatten` and
        :class:`~cpusparse.engine.containers.Residual` blocks, nested
        :class:`~cpusparse.engine.containers.Sequential` containers (any other layer
        type is a TypeError naming it). Not modified.
    masks : list of (ndarray of bool or None), or None
        One per prunable layer, in the order of ``network.prunable_layers()``, of the
        lengths ``network.n_units()``; None (for one layer, or for all) keeps every
        unit.

    Returns
    -------
    Sequential
        Dense layers only, taking no masks, in the network's dtype: ``narrowed.forward(x,
        mode=EVAL)`` equals ``network.forward(x, masks, mode=EVAL)`` up to rounding
        (the sums run over fewer terms). Fused activations are separate
        :class:`~cpusparse.engine.layers.activation.ReLU` layers, so layer positions
        may differ from ``network``'s.

    See Also
    --------
    kept_outputs : which original channels (neurons) each prunable layer keeps.
    to_torch : the narrowed network as a PyTorch module.

    Examples
    --------
    >>> from cpusparse.engine.layers import EVAL
    >>> from cpusparse.models import vgg
    >>> net = vgg((4, 8), (1, 8, 8), 10, dtype=np.float64, rng=0)
    >>> masks = [np.arange(n) % 2 == 0 for n in net.n_units()]  # half the channels
    >>> small = narrow(net, masks)
    >>> [layer.weight.shape[:2] for layer in small.layers if isinstance(layer, Conv2d)]
    [(2, 1), (2, 2), (4, 2), (4, 4)]
    >>> x = np.random.default_rng(0).standard_normal((1, 3, 8, 8))  # (C, N, H, W)
    >>> out, _ = small.forward(x, mode=EVAL)
    >>> bool(np.allclose(out, net.forward(x, masks, mode=EVAL)[0], rtol=1e-12, atol=1e-12))
    True
    """
    return _Plan(network, masks).build()


def kept_outputs(
    network: Sequential, masks: Sequence[npt.ArrayLike | None] | None
) -> list[IndexArray]:
    """Original indices of the outputs that :func:`narrow` keeps, per prunable layer.

    Parameters
    ----------
    network, masks
        As in :func:`narrow`.

    Returns
    -------
    list of ndarray of int64
        One per prunable layer, in mask order: the output channels (neurons) of the
        layer held by the narrowed layer, increasing, in the narrowed layer's order.
        For a channel (neuron) mask, the kept ones, plus those a residual join or a
        ``"before_norm"`` batch norm needs (zero rows), or channel 0 if nothing is
        kept; for a weight mask every output.

    Examples
    --------
    >>> from cpusparse.models import resnet
    >>> net = resnet((4,), (1, 8, 8), 10, dtype=np.float64, rng=0)
    >>> net.n_units()  # the stem and the block's two convolutions
    [4, 4, 4]
    >>> masks = [np.array(m) for m in ([1, 1, 0, 0], [0, 0, 0, 1], [0, 1, 1, 0])]
    >>> kept = kept_outputs(net, [m.astype(bool) for m in masks])
    >>> [k.tolist() for k in kept]  # stem and second conv: the union at the add
    [[0, 1, 2], [3], [0, 1, 2]]
    """
    plan = _Plan(network, masks)
    return [np.flatnonzero(plan.present[node]).astype(np.int64) for node in plan.slots]


# ---------------------------------------------------------------------- PyTorch


def _require_torch() -> None:
    # A clear error before the first ``import torch`` of a function.
    try:
        import torch  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "to_torch needs PyTorch, which is not installed: pip install torch"
        ) from exc


@functools.cache
def _residual_class() -> type[torch.nn.Module]:
    # Defined on first use, so that importing cpusparse.export does not import torch;
    # named as a module attribute (see __getattr__) so that pickling finds it.
    _require_torch()
    import torch

    class TorchResidual(torch.nn.Module):
        """``act(main(x) + shortcut(x))``; children ``"0"`` (main) and ``"1"`` (shortcut).

        The children are named as the branches' parameters of a cpusparse
        :class:`~cpusparse.engine.containers.Residual`, so that the state dict keys
        agree; :attr:`main` and :attr:`shortcut` name them. No shortcut: the identity.
        """

        def __init__(
            self, main: torch.nn.Module, shortcut: torch.nn.Module | None, relu: bool
        ) -> None:
            super().__init__()
            self.add_module("0", main)
            if shortcut is not None:
                self.add_module("1", shortcut)
            self.relu = relu

        @property
        def main(self) -> torch.nn.Module:
            """The main branch."""
            main = self._modules["0"]
            if main is None:  # pragma: no cover - set in __init__
                raise RuntimeError("internal error: a TorchResidual has a main branch")
            return main

        @property
        def shortcut(self) -> torch.nn.Module | None:
            """The shortcut branch (None: the identity)."""
            return self._modules.get("1")

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            """``act(main(x) + shortcut(x))``, images ``(N, C, H, W)``."""
            shortcut = self.shortcut
            out = self.main(x) + (x if shortcut is None else shortcut(x))
            return torch.relu(out) if self.relu else out

        def extra_repr(self) -> str:
            """The activation after the add."""
            return f"relu={self.relu}"

    TorchResidual.__module__ = __name__
    TorchResidual.__qualname__ = "TorchResidual"
    return TorchResidual


def __getattr__(name: str) -> object:
    # TorchResidual, the residual block of to_torch, exists once PyTorch is imported.
    if name == "TorchResidual":
        return _residual_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _torch_layers(layers: Sequence[Layer]) -> torch.nn.Sequential:
    from torch import nn

    modules: list[torch.nn.Module] = []
    for layer in layers:
        module: torch.nn.Module
        if isinstance(layer, Sequential):
            module = _torch_layers(layer.layers)
        elif isinstance(layer, Residual):
            shortcut = None if layer.shortcut is None else layer.shortcut.layers
            module = _residual_class()(
                _torch_layers(layer.main.layers),
                None if shortcut is None else _torch_layers(shortcut),
                layer.activation == "relu",
            )
        elif isinstance(layer, Conv2d):
            module = nn.Conv2d(
                layer.n_in,
                layer.n_out,
                layer.kernel_size,
                stride=layer.stride,
                padding=layer.padding,
                bias=layer.bias is not None,
            )
        elif isinstance(layer, Linear):
            module = nn.Linear(layer.n_in, layer.n_out)
        elif isinstance(layer, BatchNorm1d | BatchNorm2d):
            kind = nn.BatchNorm2d if isinstance(layer, BatchNorm2d) else nn.BatchNorm1d
            module = kind(layer.n_channels, eps=layer.eps, momentum=layer.momentum)
        elif isinstance(layer, MaxPool2d):
            module = nn.MaxPool2d(layer.kernel_size, layer.stride, layer.padding)
        elif isinstance(layer, AvgPool2d):
            module = nn.AvgPool2d(layer.kernel_size, layer.stride, layer.padding)
        elif isinstance(layer, GlobalAvgPool2d):
            module = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        elif isinstance(layer, Flatten):
            module = nn.Flatten(1)
        elif isinstance(layer, ReLU):
            module = nn.ReLU()
        else:  # pragma: no cover - narrow() builds only the layers above
            raise TypeError(f"internal error: no PyTorch layer for {type(layer).__name__}")
        modules.append(module)
    return nn.Sequential(*modules)


def to_torch(
    network: Sequential, masks: Sequence[npt.ArrayLike | None] | None = None
) -> torch.nn.Module:
    """The (narrowed) network as a ``torch.nn.Sequential`` in evaluation mode.

    Parameters
    ----------
    network : Sequential
        As in :func:`narrow`.
    masks : list of (ndarray of bool or None), optional
        As in :func:`narrow`; None keeps every unit (sparse layers become dense
        layers of the same shape, with zeros where no weight is stored).

    Returns
    -------
    torch.nn.Sequential
        Of ``torch.nn`` layers and ``cpusparse.export.TorchResidual`` blocks, in the network's
        dtype (float32 or float64), on the CPU, in evaluation mode; layer ``i`` is
        layer ``i`` of ``narrow(network, masks)``, and the state dict has that
        network's :meth:`~cpusparse.engine.containers.Sequential.arrays` keys (and
        ``num_batches_tracked``, 0, for each batch norm). It takes ``(N, F)`` features
        or ``(N, C, H, W)`` images and returns ``(N, n_classes)`` logits: the
        transposes of cpusparse's layouts (see the module documentation).

    Raises
    ------
    ImportError
        If PyTorch is not installed.

    Notes
    -----
    A batch norm with ``mask_order="before_norm"`` becomes a plain
    ``torch.nn.BatchNorm2d``: in the narrowed network its dropped channels are fed
    zeros by zero weights, which is what the mask does (the authors' code).

    Examples
    --------
    >>> import torch
    >>> from cpusparse.engine.layers import EVAL
    >>> from cpusparse.models import mlp
    >>> net = mlp(8, (16,), 3, granularity="neuron", dtype=np.float64, rng=0)
    >>> masks = [np.arange(16) < 5]
    >>> model = to_torch(net, masks)
    >>> model
    Sequential(
      (0): Linear(in_features=8, out_features=5, bias=True)
      (1): ReLU()
      (2): Linear(in_features=5, out_features=3, bias=True)
    )
    >>> x = np.random.default_rng(0).standard_normal((8, 4))  # (F, N)
    >>> with torch.no_grad():
    ...     logits = model(torch.from_numpy(x.T)).numpy().T
    >>> ref, _ = net.forward(x, masks, mode=EVAL)
    >>> bool(np.allclose(logits, ref, rtol=1e-12, atol=1e-12))
    True
    """
    _require_torch()
    import torch

    narrowed = narrow(network, masks)
    dtype = torch.float64 if narrowed.dtype == np.float64 else torch.float32
    module = _torch_layers(narrowed.layers).to(dtype)
    arrays = narrowed.arrays()
    state = module.state_dict()
    extra = {k for k in state if k.rsplit(".", 1)[-1] == "num_batches_tracked"}
    if set(state) - extra != set(arrays):  # pragma: no cover - the layers above agree
        raise RuntimeError(
            f"internal error: PyTorch keys {sorted(set(state) - extra)} differ from "
            f"cpusparse's {sorted(arrays)}"
        )
    with torch.no_grad():
        for key, value in arrays.items():
            state[key].copy_(torch.from_numpy(np.ascontiguousarray(value)))
    return module.eval()
