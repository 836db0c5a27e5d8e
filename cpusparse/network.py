"""A sequential network that threads caches and masks through its layers."""

from __future__ import annotations

import numpy as np

from . import sparse
from ._validation import check_density, check_random_state
from .layers import GRANULARITIES, Linear, ReLU, SparseLinear
from .losses import softmax_cross_entropy

__all__ = ["Sequential", "make_mlp"]


class Sequential:
    """Layers applied in order; the network stores no activations or gradients.

    Parameters
    ----------
    layers : list
        Layer objects following the ``forward``/``backward`` contract of
        :mod:`cpusparse.layers`.

    Attributes
    ----------
    prunable : list of int
        Positions of the layers that take a mask (the sparse layers), in order.
        Masks and scores are lists aligned with this.

    Examples
    --------
    >>> net = make_mlp(4, (8,), 3, rng=0, dtype=np.float64)
    >>> x = np.ones((4, 5))
    >>> masks = [np.ones(n, dtype=bool) for n in net.n_units()]
    >>> logits, caches = net.forward(x, masks)
    >>> logits.shape
    (3, 5)
    """

    def __init__(self, layers):
        self.layers = list(layers)
        if not self.layers:
            raise ValueError("layers must be a nonempty list, got []")
        # Prunable by kind, not by size: a layer compacted down to no stored weights
        # keeps its (empty) place in the masks and scores.
        self.prunable = [
            i for i, layer in enumerate(self.layers) if getattr(layer, "granularity", None)
        ]
        dtypes = {layer.dtype for layer in self.layers if hasattr(layer, "dtype")}
        if len(dtypes) > 1:
            raise TypeError(f"all layers must share one dtype, got {sorted(map(str, dtypes))}")

    @property
    def dtype(self):
        """Floating-point type of the parameters."""
        return next(layer.dtype for layer in self.layers if hasattr(layer, "dtype"))

    @property
    def n_in(self):
        """Number of input features."""
        return next(layer.shape[1] for layer in self.layers if hasattr(layer, "shape"))

    def n_units(self):
        """Number of mask bits of each prunable layer, in order."""
        return [self.layers[i].n_units for i in self.prunable]

    def params(self):
        """The parameter dicts of all layers, in order (the arrays themselves)."""
        return [layer.params() for layer in self.layers]

    def _check_masks(self, masks):
        if masks is None:
            return [None] * len(self.prunable)
        if len(masks) != len(self.prunable):
            raise ValueError(
                f"masks must hold one array per prunable layer ({len(self.prunable)}), "
                f"got {len(masks)}"
            )
        return [
            None if m is None else self.layers[i]._check_mask(m)
            for i, m in zip(self.prunable, masks, strict=True)
        ]

    def forward(self, x, masks=None):
        """Forward pass with one mask per prunable layer.

        Parameters
        ----------
        x : ndarray of shape (n_in, n_batch)
            Feature-major input batch (one column per sample).
        masks : list of (ndarray of bool or None), optional
            Aligned with :attr:`prunable`; None keeps every stored weight.

        Returns
        -------
        out : ndarray of shape (n_out, n_batch)
        caches : list
            One cache per layer, for :meth:`backward`.
        """
        x = sparse._check_activations(x, self.n_in, "x", self.dtype)
        return self._forward(x, self._check_masks(masks))

    def _forward(self, x, masks, straight_through=False):
        # straight_through: every stored entry is computed and the mask is applied
        # multiplicatively, so that the backward pass yields dL/dmask (the chain-rule
        # baseline); masks are then not used to skip work.
        layer_masks = dict(zip(self.prunable, masks, strict=True))
        caches = []
        zero_outside = None  # inputs known to be 0: units dropped by a neuron mask
        for i, layer in enumerate(self.layers):
            mask = layer_masks.get(i)
            x, cache = layer._forward(x, mask, zero_outside, straight_through)
            caches.append(cache)
            if straight_through:
                continue
            if isinstance(layer, SparseLinear) and layer.granularity == "neuron":
                zero_outside = mask
            elif not isinstance(layer, ReLU):
                zero_outside = None
        return x, caches

    def backward(self, dout, caches, *, need_dx=False):
        """Backward pass through every layer.

        Returns
        -------
        dx : ndarray of shape (n_in, n_batch) or None
            Only when ``need_dx``.
        grads : list of dict
            One dict per layer, keyed like its ``params()``.
        """
        if len(caches) != len(self.layers):
            raise ValueError(
                f"caches must hold one cache per layer ({len(self.layers)}), got {len(caches)}"
            )
        last = caches[-1]
        expected = last.positive.shape if hasattr(last, "positive") else last.out.shape
        dout = sparse._check_activations(dout, expected[0], "dout", self.dtype)
        if dout.shape != expected:
            raise ValueError(
                f"dout must have the forward output's shape {expected}, got {dout.shape}"
            )
        return self._backward(dout, caches, need_dx)

    def _backward(self, dout, caches, need_dx=False):
        grads = [None] * len(self.layers)
        for i in range(len(self.layers) - 1, -1, -1):
            dout, grads[i] = self.layers[i]._backward(dout, caches[i], need_dx or i > 0)
        return dout, grads

    def loss_and_grads(self, x, y, masks=None):
        """Softmax cross-entropy of one masked pass and the gradients of all parameters.

        Returns
        -------
        loss : float
        grads : list of dict
        logits : ndarray of shape (n_classes, n_batch)
        """
        logits, caches = self.forward(x, masks)
        loss, dlogits = softmax_cross_entropy(logits, y)
        _, grads = self._backward(dlogits, caches)
        return loss, grads, logits

    def __repr__(self):
        inner = ",\n  ".join(repr(layer) for layer in self.layers)
        return f"Sequential([\n  {inner},\n])"


def make_mlp(
    n_in,
    hidden_layer_sizes,
    n_out,
    *,
    granularity="weight",
    sparse_classifier=False,
    density=1.0,
    init="uniform",
    init_density=1.0,
    dtype=np.float32,
    rng=None,
):
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
        Mask granularity of the sparse layers.
    sparse_classifier : bool, default=False
        Make the classifier a (weight-granularity) sparse layer too. The authors'
        code keeps it dense.
    density : float in (0, 1], default=1.0
        Fraction of entries stored at initialisation (1.0: all; masks sparsify).
    init : {"uniform", "kaiming"}, default="uniform"
        Weight initialisation (see :meth:`SparseLinear.random`).
    init_density : float in (0, 1], default=1.0
        Expected kept fraction of the units (the training density). The fan-in of
        a layer whose inputs or weights are masked counts only the inputs expected
        to be active -- every sparse layer for weight granularity, every layer after
        the first for neuron granularity -- so that masked activations start at
        the scale of dense ones.
    dtype : {numpy.float32, numpy.float64}
    rng : None, int or numpy.random.Generator
        Initialisation stream, used layer by layer (weights then bias).

    Returns
    -------
    Sequential
    """
    rng = check_random_state(rng)
    density = check_density(density)
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    sizes = [int(n_in), *map(int, hidden_layer_sizes), int(n_out)]
    if min(sizes) < 1:
        raise ValueError(f"layer sizes must be positive, got {sizes}")
    init_density = check_density(init_density, "init_density")
    weight_level = granularity == "weight"
    layers = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-2], sizes[1:-1], strict=True)):
        masked_inputs = weight_level or i > 0
        layers.append(
            SparseLinear.random(
                fan_in,
                fan_out,
                density=density,
                granularity=granularity,
                activation="relu",
                init=init,
                fan_in_scale=init_density if masked_inputs else 1.0,
                dtype=dtype,
                rng=rng,
            )
        )
    # The classifier's inputs are masked units for neuron granularity; with a
    # sparse classifier its own weights are masked.
    masked_inputs = (not weight_level and len(sizes) > 2) or sparse_classifier
    common = dict(
        init=init, fan_in_scale=init_density if masked_inputs else 1.0, dtype=dtype, rng=rng
    )
    if sparse_classifier:
        layers.append(SparseLinear.random(sizes[-2], sizes[-1], density=density, **common))
    else:
        layers.append(Linear.random(sizes[-2], sizes[-1], **common))
    return Sequential(layers)
