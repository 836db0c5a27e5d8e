"""Layers with explicit forward and backward passes.

Every layer follows one contract, with no hidden state:

- ``forward(x, ...) -> (out, cache)``;
- ``backward(dout, cache) -> (dx, grads)`` where ``grads`` is a dict of fresh arrays
  keyed like :meth:`params`.

Activations are feature-major: ``x`` has shape ``(n_in, n_batch)``, one column per
sample (``out = W @ x`` as in the math), and weights are ``(n_out, n_in)`` as in
PyTorch. The public ``forward``/``backward`` validate their input; the network calls
the unvalidated ``_forward``/``_backward`` after validating once at its boundary.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from . import sparse
from ._validation import (
    check_array,
    check_choice,
    check_density,
    check_random_state,
    check_same_dtype,
)

__all__ = [
    "SparseLinear",
    "SparseLinearCache",
    "Linear",
    "LinearCache",
    "ReLU",
    "ReLUCache",
    "GRANULARITIES",
]

GRANULARITIES = ("weight", "neuron")
INITS = ("uniform", "kaiming")


def _init_uniform(shape, fan_in, dtype, rng):
    # PyTorch's nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    bound = 1.0 / np.sqrt(fan_in) if fan_in > 0 else 0.0
    return rng.uniform(-bound, bound, size=shape).astype(dtype)


def _init_weight(shape, fan_in, init, dtype, rng):
    # "uniform": PyTorch's nn.Linear default; "kaiming": He normal, std sqrt(2 / fan_in).
    check_choice(init, "init", INITS)
    if init == "uniform":
        return _init_uniform(shape, fan_in, dtype, rng)
    std = np.sqrt(2.0 / fan_in) if fan_in > 0 else 0.0
    return rng.normal(0.0, std, size=shape).astype(dtype)


def _check_fan_in_scale(fan_in_scale):
    if not 0 < fan_in_scale <= 1:
        raise ValueError(f"fan_in_scale must be in (0, 1], got {fan_in_scale}")


class SparseLinearCache(NamedTuple):
    """What :meth:`SparseLinear.backward` needs from the forward pass.

    ``mask`` and ``unmasked`` are set only by a straight-through pass: the mask and,
    for neuron granularity, the output before the mask was applied.
    """

    x: np.ndarray
    out: np.ndarray
    active: sparse.ActivePattern
    mask: np.ndarray | None = None
    unmasked: np.ndarray | None = None


class SparseLinear:
    """A linear layer whose weight is a CSR pattern, computed with a sampled mask.

    ``out = act((W * m) @ x + b)`` for weight granularity and
    ``out = m * act(W @ x + b)`` (a dropped unit outputs exactly 0) for neuron
    granularity. Forward and backward touch only the active entries.

    Parameters
    ----------
    indptr, indices : ndarray
        Canonical CSR pattern of the stored weights, shape ``(n_out, n_in)``.
    weight : ndarray of shape (nnz,)
        Values of the stored weights, aligned with ``indices``.
    bias : ndarray of shape (n_out,)
        Dense bias, same dtype as ``weight``.
    n_in : int
        Number of inputs.
    granularity : {"weight", "neuron"}, default="weight"
        What one mask bit keeps: one stored weight, or one output unit with its
        whole row and bias.
    activation : {None, "relu"}, default=None
        Activation fused into the product.

    Attributes
    ----------
    n_units : int
        Number of prunable units: ``nnz`` (weight) or ``n_out`` (neuron).

    Examples
    --------
    >>> layer = SparseLinear.random(3, 2, rng=0, dtype=np.float64)
    >>> x = np.ones((3, 4))
    >>> out, cache = layer.forward(x, mask=np.array([True, False, True, True, False, True]))
    >>> dx, grads = layer.backward(np.ones_like(out), cache)
    >>> grads["weight"].shape, bool(grads["weight"][1] == 0)
    ((6,), True)
    """

    def __init__(
        self, indptr, indices, weight, bias, n_in, *, granularity="weight", activation=None
    ):
        n_out = len(indptr) - 1
        self.indptr, self.indices = sparse.check_pattern(indptr, indices, (n_out, n_in))
        self.weight = check_array(weight, "weight", ndim=1, shape=self.indices.shape, finite=True)
        self.bias = check_array(bias, "bias", ndim=1, shape=(n_out,), finite=True)
        check_same_dtype(("weight", self.weight), ("bias", self.bias))
        self.shape = (int(n_out), int(n_in))
        self.granularity = check_choice(granularity, "granularity", GRANULARITIES)
        self.activation = check_choice(activation, "activation", (None, "relu"))

    @classmethod
    def random(
        cls,
        n_in,
        n_out,
        *,
        density=1.0,
        granularity="weight",
        activation=None,
        init="uniform",
        fan_in_scale=1.0,
        dtype=np.float32,
        rng=None,
    ):
        r"""A layer with a random pattern and random weights.

        Parameters
        ----------
        n_in, n_out : int
            Layer size.
        density : float in (0, 1], default=1.0
            Fraction of the ``n_out * n_in`` entries stored; 1.0 stores them all
            (the starting point of training, where masks do the sparsifying).
        granularity, activation
            As in the class.
        init : {"uniform", "kaiming"}, default="uniform"
            Weight distribution: PyTorch's ``nn.Linear`` default
            :math:`U(\pm 1/\sqrt{f})`, or He's normal :math:`N(0, 2/f)`, with
            :math:`f` the effective fan-in. The bias is always
            :math:`U(\pm 1/\sqrt{n_{in}})`.
        fan_in_scale : float in (0, 1], default=1.0
            Expected fraction of the inputs that a unit sees, so that
            :math:`f = n_{in} \times` ``fan_in_scale``: with masks at density
            :math:`d`, ``d`` keeps the scale of the activations as if dense.
        dtype : {numpy.float32, numpy.float64}
        rng : None, int or numpy.random.Generator
            Draws, in order: the pattern (if ``density < 1``), the weights, the bias.

        Returns
        -------
        SparseLinear
        """
        rng = check_random_state(rng)
        density = check_density(density)
        if density == 1.0:
            indptr, indices = sparse.full_pattern((n_out, n_in))
        else:
            indptr, indices = sparse.random_pattern((n_out, n_in), density, rng=rng)
        _check_fan_in_scale(fan_in_scale)
        weight = _init_weight(indices.shape[0], n_in * fan_in_scale, init, dtype, rng)
        bias = _init_uniform(n_out, n_in, dtype, rng)
        return cls(
            indptr, indices, weight, bias, n_in, granularity=granularity, activation=activation
        )

    @property
    def nnz(self):
        """Number of stored weights."""
        return int(self.indices.shape[0])

    @property
    def n_units(self):
        """Number of prunable units (mask bits)."""
        return self.nnz if self.granularity == "weight" else self.shape[0]

    @property
    def dtype(self):
        """Floating-point type of the parameters."""
        return self.weight.dtype

    def params(self):
        """The parameter arrays, by name (the same objects, not copies)."""
        return {"weight": self.weight, "bias": self.bias}

    def to_dense(self, mask=None):
        """The dense ``(n_out, n_in)`` weight with the mask applied."""
        mask = self._check_mask(mask)
        if self.granularity == "weight":
            return sparse.to_dense(
                self.indptr, self.indices, self.weight, self.shape, entry_mask=mask
            )
        return sparse.to_dense(self.indptr, self.indices, self.weight, self.shape, row_mask=mask)

    def _check_mask(self, mask):
        if mask is None:
            return None
        mask = np.asarray(mask)
        if mask.dtype != np.bool_:
            raise TypeError(f"mask must be a boolean array, got dtype {mask.dtype}")
        if mask.shape != (self.n_units,):
            raise ValueError(
                f"mask must have shape ({self.n_units},) (one bit per {self.granularity}), "
                f"got {mask.shape}"
            )
        return np.ascontiguousarray(mask)

    def forward(self, x, mask=None, *, active_inputs=None):
        """Masked forward pass.

        Parameters
        ----------
        x : ndarray of shape (n_in, n_batch)
            Feature-major input, same dtype as the weights.
        mask : ndarray of bool, shape (n_units,), optional
            Sampled keep bits; None keeps everything stored.
        active_inputs : ndarray of bool, shape (n_in,), optional
            Inputs that may be nonzero. The layer computes with ``x`` zeroed outside
            them and skips their weights (the previous layer dropped those units).

        Returns
        -------
        out : ndarray of shape (n_out, n_batch)
        cache : SparseLinearCache
        """
        x = sparse._check_activations(x, self.shape[1], "x", self.dtype)
        mask = self._check_mask(mask)
        active_inputs = sparse._check_mask(active_inputs, self.shape[1], "active_inputs")
        return self._forward(x, mask, active_inputs)

    def _forward(self, x, mask=None, active_inputs=None, straight_through=False):
        if straight_through:
            return self._forward_straight_through(x, mask)
        entry_mask = mask if self.granularity == "weight" else None
        row_mask = mask if self.granularity == "neuron" else None
        active = sparse._select_active(
            self.indptr, self.indices, self.weight, self.shape, entry_mask, row_mask, active_inputs
        )
        out = sparse._masked_matmul(active, x, self.bias, self.activation == "relu")
        return out, SparseLinearCache(x, out, active)

    def backward(self, dout, cache, *, need_dx=True):
        """Backward pass at the active entries.

        Parameters
        ----------
        dout : ndarray of shape (n_out, n_batch)
            Gradient of the loss with respect to ``out``.
        cache : SparseLinearCache
            From :meth:`forward`.
        need_dx : bool, default=True
            Whether to compute ``dx`` (False for the first layer).

        Returns
        -------
        dx : ndarray of shape (n_in, n_batch) or None
        grads : dict
            ``"weight"`` of shape (nnz,), zero at inactive entries; ``"bias"`` of
            shape (n_out,).
        """
        dout = sparse._check_activations(dout, self.shape[0], "dout", self.dtype)
        if dout.shape != cache.out.shape:
            raise ValueError(f"dout must have shape {cache.out.shape}, got {dout.shape}")
        return self._backward(dout, cache, need_dx)

    def _backward(self, dout, cache, need_dx=True):
        if cache.mask is not None:
            return self._backward_straight_through(dout, cache, need_dx)
        dx, dweight, dbias = sparse._masked_matmul_backward(
            cache.active, cache.x, dout, cache.out, self.activation == "relu", need_dx
        )
        return dx, {"weight": dweight, "bias": dbias}

    def _forward_straight_through(self, x, mask):
        # Every stored entry is computed (a dense pass through the mask), so that
        # the gradient with respect to the mask exists at every unit.
        if mask is None:
            mask = np.ones(self.n_units, dtype=bool)
        everything = np.arange(self.nnz, dtype=sparse.INDEX_DTYPE)
        if self.granularity == "weight":
            data = self.weight * mask
            active = sparse.ActivePattern(
                self.indptr, self.indices, data, everything, self.shape, self.nnz, None
            )
            out = sparse._masked_matmul(active, x, self.bias, self.activation == "relu")
            return out, SparseLinearCache(x, out, active, mask, None)
        active = sparse.ActivePattern(
            self.indptr, self.indices, self.weight, everything, self.shape, self.nnz, None
        )
        unmasked = sparse._masked_matmul(active, x, self.bias, self.activation == "relu")
        out = unmasked * mask[:, None]
        return out, SparseLinearCache(x, out, active, mask, unmasked)

    def _backward_straight_through(self, dout, cache, need_dx):
        # The chain rule through out = f(W * m) (weight) or out = m * f(W) (neuron),
        # with dL/dm at every unit: the baseline whose dense backward VR-PGE avoids.
        relu = self.activation == "relu"
        if self.granularity == "weight":
            dx, deff, dbias = sparse._masked_matmul_backward(
                cache.active, cache.x, dout, cache.out, relu, need_dx
            )
            return dx, {"weight": deff * cache.mask, "bias": dbias, "mask": deff * self.weight}
        dmask = np.einsum("ob,ob->o", dout, cache.unmasked)
        dunmasked = np.ascontiguousarray(dout * cache.mask[:, None])
        dx, dweight, dbias = sparse._masked_matmul_backward(
            cache.active, cache.x, dunmasked, cache.unmasked, relu, need_dx
        )
        return dx, {"weight": dweight, "bias": dbias, "mask": dmask}

    def compact(self, keep):
        """A new layer without the stored entries where ``keep`` is False.

        Parameters
        ----------
        keep : ndarray of bool, shape (nnz,)

        Returns
        -------
        SparseLinear
            Arrays aligned with the old stored entries (scores, optimizer state)
            are compacted with ``array[keep]``.
        """
        indptr, indices = sparse.compact_pattern(self.indptr, self.indices, keep)
        return SparseLinear(
            indptr,
            indices,
            self.weight[keep],
            self.bias.copy(),
            self.shape[1],
            granularity=self.granularity,
            activation=self.activation,
        )

    def __repr__(self):
        return (
            f"SparseLinear(n_in={self.shape[1]}, n_out={self.shape[0]}, nnz={self.nnz}, "
            f"granularity={self.granularity!r}, activation={self.activation!r}, "
            f"dtype={self.dtype})"
        )


class LinearCache(NamedTuple):
    """What :meth:`Linear.backward` needs from the forward pass."""

    x: np.ndarray
    out: np.ndarray


class Linear:
    """A dense linear layer, ``out = act(W @ x + b)`` (the classifier by default).

    Parameters
    ----------
    weight : ndarray of shape (n_out, n_in)
    bias : ndarray of shape (n_out,)
    activation : {None, "relu"}, default=None

    Examples
    --------
    >>> layer = Linear.random(3, 2, rng=0, dtype=np.float64)
    >>> out, cache = layer.forward(np.ones((3, 5)))
    >>> dx, grads = layer.backward(np.ones_like(out), cache)
    >>> dx.shape, grads["weight"].shape
    ((3, 5), (2, 3))
    """

    n_units = 0
    granularity = None

    def __init__(self, weight, bias, *, activation=None):
        self.weight = check_array(weight, "weight", ndim=2, finite=True)
        self.bias = check_array(bias, "bias", ndim=1, shape=(self.weight.shape[0],), finite=True)
        check_same_dtype(("weight", self.weight), ("bias", self.bias))
        self.shape = self.weight.shape
        self.activation = check_choice(activation, "activation", (None, "relu"))

    @classmethod
    def random(
        cls,
        n_in,
        n_out,
        *,
        activation=None,
        init="uniform",
        fan_in_scale=1.0,
        dtype=np.float32,
        rng=None,
    ):
        """A layer with random weights, then bias (see :meth:`SparseLinear.random`)."""
        rng = check_random_state(rng)
        _check_fan_in_scale(fan_in_scale)
        weight = _init_weight((n_out, n_in), n_in * fan_in_scale, init, dtype, rng)
        bias = _init_uniform(n_out, n_in, dtype, rng)
        return cls(weight, bias, activation=activation)

    @property
    def dtype(self):
        """Floating-point type of the parameters."""
        return self.weight.dtype

    def params(self):
        """The parameter arrays, by name (the same objects, not copies)."""
        return {"weight": self.weight, "bias": self.bias}

    def forward(self, x):
        """Forward pass; ``x`` of shape (n_in, n_batch). Returns ``(out, cache)``."""
        x = sparse._check_activations(x, self.shape[1], "x", self.dtype)
        return self._forward(x)

    def _forward(self, x, mask=None, active_inputs=None, straight_through=False):
        out = self.weight @ x
        out += self.bias[:, None]
        if self.activation == "relu":
            np.maximum(out, 0, out=out)
        return out, LinearCache(x, out)

    def backward(self, dout, cache, *, need_dx=True):
        """Backward pass. Returns ``(dx, {"weight": ..., "bias": ...})``."""
        dout = sparse._check_activations(dout, self.shape[0], "dout", self.dtype)
        if dout.shape != cache.out.shape:
            raise ValueError(f"dout must have shape {cache.out.shape}, got {dout.shape}")
        return self._backward(dout, cache, need_dx)

    def _backward(self, dout, cache, need_dx=True):
        if self.activation == "relu":
            dout = dout * (cache.out > 0)
        dweight = dout @ cache.x.T
        dbias = dout.sum(axis=1)
        dx = self.weight.T @ dout if need_dx else None
        return dx, {"weight": dweight, "bias": dbias}

    def __repr__(self):
        return (
            f"Linear(n_in={self.shape[1]}, n_out={self.shape[0]}, "
            f"activation={self.activation!r}, dtype={self.dtype})"
        )


class ReLUCache(NamedTuple):
    """What :meth:`ReLU.backward` needs from the forward pass."""

    positive: np.ndarray


class ReLU:
    """Elementwise ``max(x, 0)``; its gradient is taken as 0 at 0.

    Examples
    --------
    >>> out, cache = ReLU().forward(np.array([[-1.0, 2.0]]))
    >>> out, ReLU().backward(np.array([[5.0, 5.0]]), cache)[0]
    (array([[0., 2.]]), array([[0., 5.]]))
    """

    n_units = 0
    granularity = None

    def params(self):
        """No parameters."""
        return {}

    def forward(self, x):
        """Forward pass. Returns ``(out, cache)``."""
        return self._forward(check_array(x, "x", finite=True))

    def _forward(self, x, mask=None, active_inputs=None, straight_through=False):
        positive = x > 0
        return np.where(positive, x, x.dtype.type(0)), ReLUCache(positive)

    def backward(self, dout, cache, *, need_dx=True):
        """Backward pass. Returns ``(dx, {})``."""
        dout = check_array(dout, "dout", shape=cache.positive.shape)
        return self._backward(dout, cache, need_dx)

    def _backward(self, dout, cache, need_dx=True):
        return np.where(cache.positive, dout, dout.dtype.type(0)), {}

    def __repr__(self):
        return "ReLU()"
