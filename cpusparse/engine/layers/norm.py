r"""Batch normalisation: :class:`BatchNorm2d` on ``(C, N, H, W)`` images, :class:`BatchNorm1d`.

Both normalise each channel (feature, for :class:`BatchNorm1d` on ``(C, N)``
activations) over the ``M`` values it takes in a batch: ``M = N*H*W`` for images,
``M = N`` for features. In the channel-major layout a channel's values are one
contiguous row of the ``(C, M)`` view of the input, so both layers share one
implementation on that view. The arithmetic is PyTorch's ``torch.nn.BatchNorm1d`` /
``BatchNorm2d`` (``affine=True``, ``track_running_stats=True``).
"""

from __future__ import annotations

import abc
import numbers
from typing import TYPE_CHECKING, Any, NamedTuple, TypeVar

import numpy as np

from ..._typing import BoolArray, FloatArray, IndexArray
from ..._validation import check_array, check_choice, check_same_dtype
from ..csr import _check_activations
from .base import TRAIN, Layer, Mode, check_images

if TYPE_CHECKING:
    import numpy.typing as npt

__all__ = ["BatchNorm2d", "BatchNorm1d", "BatchNormCache", "MASK_ORDERS"]

MASK_ORDERS = ("after_norm", "before_norm")
"""Where a dropped channel's mask acts: after the batch norm or before it."""

_BN = TypeVar("_BN", bound="_BatchNorm")


class BatchNormCache(NamedTuple):
    r"""What the backward pass of a batch norm needs from the forward pass.

    ``xhat`` and ``inv_std`` are the normalised input and :math:`1/\sqrt{v + \epsilon}`
    of the channels computed, ``rows`` (None: every channel); ``dead`` are the other
    channels and ``dead_xhat`` their constant normalised value (``"before_norm"`` only,
    else None); ``batch_stats`` says whether batch statistics were used; ``compact``
    whether the input was compact (the rows of ``rows`` only), and ``shape`` is the
    input's.
    """

    shape: tuple[int, ...]
    xhat: FloatArray
    inv_std: FloatArray
    rows: IndexArray | None
    dead: IndexArray | None
    dead_xhat: FloatArray | None
    batch_stats: bool
    compact: bool = False


def _check_real(value: Any, name: str, low: float, high: float, *, open_low: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {value!r}")
    value = float(value)
    ok = (value > low if open_low else value >= low) and value <= high
    if not ok:
        interval = f"{'(' if open_low else '['}{low}, {high}]"
        raise ValueError(f"{name} must be in {interval}, got {value}")
    return value


class _BatchNorm(Layer):
    r"""Batch normalisation over the rows of a ``(C, M)`` view; see :class:`BatchNorm2d`."""

    def __init__(
        self,
        weight: npt.ArrayLike,
        bias: npt.ArrayLike,
        running_mean: npt.ArrayLike,
        running_var: npt.ArrayLike,
        *,
        eps: float = 1e-5,
        momentum: float = 0.1,
        mask_order: str = "after_norm",
    ) -> None:
        weight = check_array(weight, "weight", ndim=1, finite=True)
        shape = weight.shape
        bias = check_array(bias, "bias", shape=shape, finite=True)
        running_mean = check_array(running_mean, "running_mean", shape=shape, finite=True)
        running_var = check_array(running_var, "running_var", shape=shape, finite=True)
        check_same_dtype(
            ("weight", weight),
            ("bias", bias),
            ("running_mean", running_mean),
            ("running_var", running_var),
        )
        if (running_var < 0).any():
            raise ValueError(
                f"running_var must be >= 0, got {int((running_var < 0).sum())} negative values"
            )
        self.weight = np.ascontiguousarray(weight)
        self.bias = np.ascontiguousarray(bias)
        self.running_mean = np.ascontiguousarray(running_mean)
        self.running_var = np.ascontiguousarray(running_var)
        self.eps = _check_real(eps, "eps", 0.0, np.inf, open_low=True)
        self.momentum = _check_real(momentum, "momentum", 0.0, 1.0, open_low=False)
        self.mask_order = check_choice(mask_order, "mask_order", MASK_ORDERS)

    @classmethod
    def new(
        cls: type[_BN],
        n_channels: int,
        *,
        eps: float = 1e-5,
        momentum: float = 0.1,
        mask_order: str = "after_norm",
        dtype: npt.DTypeLike = np.float32,
    ) -> _BN:
        """A fresh layer: weight 1, bias 0, running mean 0, running variance 1.

        Parameters
        ----------
        n_channels : int
            Number of channels (features, for :class:`BatchNorm1d`).
        eps, momentum, mask_order
            As in the class.
        dtype : {numpy.float32, numpy.float64}, default=numpy.float32

        Returns
        -------
        layer
            Of the class it is called on.
        """
        if isinstance(n_channels, bool) or not isinstance(n_channels, numbers.Integral):
            raise TypeError(f"n_channels must be an int, got {n_channels!r}")
        if n_channels < 1:
            raise ValueError(f"n_channels must be >= 1, got {n_channels}")
        dtype = np.dtype(dtype)
        if dtype not in (np.float32, np.float64):
            raise TypeError(f"dtype must be float32 or float64, got {dtype}")
        n = int(n_channels)
        return cls(
            np.ones(n, dtype),
            np.zeros(n, dtype),
            np.zeros(n, dtype),
            np.ones(n, dtype),
            eps=eps,
            momentum=momentum,
            mask_order=mask_order,
        )

    # ------------------------------------------------------------------ sizes, state

    @property
    def n_channels(self) -> int:
        """Number of channels (features) normalised."""
        return int(self.weight.shape[0])

    @property
    def n_in(self) -> int:
        """Number of input channels."""
        return self.n_channels

    @property
    def n_out(self) -> int:
        """Number of output channels."""
        return self.n_channels

    @property
    def dtype(self) -> np.dtype:
        """Floating-point type of the parameters and buffers."""
        return self.weight.dtype

    def params(self) -> dict[str, FloatArray]:
        """The parameter arrays, by name (the same objects, not copies)."""
        return {"weight": self.weight, "bias": self.bias}

    def buffers(self) -> dict[str, FloatArray]:
        """The running statistics, by name (updated in place by training passes)."""
        return {"running_mean": self.running_mean, "running_var": self.running_var}

    def live_outputs(self, mask: BoolArray | None, live: BoolArray | None) -> BoolArray | None:
        """Output channels that may be nonzero: ``live`` after the norm, else every one."""
        return live if self.mask_order == "after_norm" else None

    # ------------------------------------------------------------------ passes

    @abc.abstractmethod
    def _check_x(self, x: npt.ArrayLike, name: str) -> FloatArray:
        """``x`` in the layer's layout and dtype, or an error."""

    def _check_input(self, x: npt.ArrayLike) -> FloatArray:
        return self._check_x(x, "x")

    def _check_dout(self, dout: npt.ArrayLike, cache: BatchNormCache) -> FloatArray:
        dout = self._check_x(dout, "dout")
        if dout.shape != cache.shape:
            raise ValueError(f"dout must have shape {cache.shape}, got {dout.shape}")
        return dout

    def _update_stats(self, where: IndexArray | None, mean: FloatArray, var: FloatArray) -> None:
        # PyTorch's update, in place, with the unbiased batch variance `var`.
        sel = slice(None) if where is None else where
        m = self.momentum
        self.running_mean[sel] = (1 - m) * self.running_mean[sel] + m * mean
        self.running_var[sel] = (1 - m) * self.running_var[sel] + m * var

    compact_kind = "indexed"

    def _forward(
        self,
        x: FloatArray,
        mask: BoolArray | None = None,
        live: BoolArray | None = None,
        mode: Mode = TRAIN,
    ) -> tuple[FloatArray, BatchNormCache]:
        return self._normalise(x, live, mode, compact=False)

    def _forward_compact(
        self, x: FloatArray, mask: BoolArray | None, live: BoolArray | None, mode: Mode
    ) -> tuple[FloatArray, BatchNormCache]:
        return self._normalise(x, live, mode, compact=True)

    def _backward_compact(
        self, dout: FloatArray, cache: BatchNormCache, need_dx: bool
    ) -> tuple[FloatArray | None, dict[str, FloatArray]]:
        return self._backward(dout, cache, need_dx)

    def _normalise(
        self, x: FloatArray, live: BoolArray | None, mode: Mode, compact: bool
    ) -> tuple[FloatArray, BatchNormCache]:
        # The pass on full x (zeros outside live), or on compact x (the rows of live):
        # the output is compact too where it is known zero outside live (after_norm).
        n_channels = self.n_channels
        x2 = x.reshape(x.shape[0], int(np.prod(x.shape[1:])))
        m_values = x2.shape[1]
        batch_stats = mode.training or mode.straight_through
        update = batch_stats and mode.update_stats
        if batch_stats and m_values < 2:
            raise ValueError(
                f"expected more than 1 value per channel when training, got x of shape "
                f"{x.shape} ({m_values} value per channel)"
            )
        rows: IndexArray | None = None
        dead: IndexArray = np.empty(0, dtype=np.int64)
        if live is not None and not live.all():
            rows = np.flatnonzero(live)
            dead = np.flatnonzero(~live)
        sel = slice(None) if rows is None else rows
        x_rows = x2 if rows is None or compact else x2[rows]
        if batch_stats:
            mean = x_rows.mean(axis=1)
            xhat = x_rows - mean[:, None]
            sum_sq = (xhat * xhat).sum(axis=1)
            var = sum_sq / m_values
            if update:
                self._update_stats(rows, mean, sum_sq / (m_values - 1))
        else:
            xhat = x_rows - self.running_mean[sel, None]
            var = self.running_var[sel]
        inv_std = 1 / np.sqrt(var + self.eps)
        xhat *= inv_std[:, None]
        out_rows = xhat * self.weight[sel, None]
        out_rows += self.bias[sel, None]

        dead_xhat = None
        if rows is None or (compact and self.mask_order == "after_norm"):
            out = out_rows
        else:
            out = np.zeros((n_channels, m_values), dtype=x.dtype)
            out[rows] = out_rows
            if self.mask_order == "before_norm":
                # A dropped channel's input is 0: mean 0, variance 0, normalised value
                # 0 with batch statistics, -mean / std with running ones.
                if batch_stats:
                    dead_xhat = np.zeros(dead.shape[0], dtype=x.dtype)
                    if update:
                        self._update_stats(dead, dead_xhat, dead_xhat)
                else:
                    dead_xhat = -self.running_mean[dead] / np.sqrt(
                        self.running_var[dead] + self.eps
                    )
                out[dead] = (self.weight[dead] * dead_xhat + self.bias[dead])[:, None]
        cache = BatchNormCache(
            x.shape,
            xhat,
            inv_std,
            rows,
            None if rows is None else dead,
            dead_xhat,
            batch_stats,
            compact,
        )
        return out.reshape(out.shape[0], *x.shape[1:]), cache

    def _backward(
        self, dout: FloatArray, cache: BatchNormCache, need_dx: bool = True
    ) -> tuple[FloatArray | None, dict[str, FloatArray]]:
        n_channels = self.n_channels
        d2 = dout.reshape(dout.shape[0], int(np.prod(dout.shape[1:])))
        m_values = d2.shape[1]
        rows = cache.rows
        sel = slice(None) if rows is None else rows
        compact_out = cache.compact and self.mask_order == "after_norm"
        d_rows = d2 if rows is None or compact_out else d2[rows]
        dbias_rows = d_rows.sum(axis=1)
        dweight_rows = (d_rows * cache.xhat).sum(axis=1)
        if rows is None:
            dweight, dbias = dweight_rows, dbias_rows
        else:
            dweight = np.zeros(n_channels, dtype=self.dtype)
            dbias = np.zeros(n_channels, dtype=self.dtype)
            dweight[rows] = dweight_rows
            dbias[rows] = dbias_rows
            if cache.dead_xhat is not None:
                dead_sum = d2[cache.dead].sum(axis=1)
                dbias[cache.dead] = dead_sum
                dweight[cache.dead] = cache.dead_xhat * dead_sum
        grads = {"weight": dweight, "bias": dbias}
        if not need_dx:
            return None, grads
        scale = self.weight[sel] * cache.inv_std
        if cache.batch_stats:
            dx_rows = d_rows - (dbias_rows / m_values)[:, None]
            dx_rows -= cache.xhat * (dweight_rows / m_values)[:, None]
            dx_rows *= scale[:, None]
        else:
            dx_rows = d_rows * scale[:, None]
        if rows is None or cache.compact:
            dx = dx_rows
        else:
            dx = np.zeros_like(d2)
            dx[rows] = dx_rows
        return dx.reshape(cache.shape), grads

    # ------------------------------------------------------------------ storage

    def config(self) -> dict[str, Any]:
        """JSON-ready settings that, with :meth:`arrays`, rebuild the layer."""
        return {
            "n_channels": self.n_channels,
            "eps": self.eps,
            "momentum": self.momentum,
            "mask_order": self.mask_order,
        }

    @classmethod
    def from_config(cls, config: dict[str, Any], arrays: dict[str, np.ndarray]) -> Layer:
        """Rebuild the layer from :meth:`config` and :meth:`arrays` (buffers included)."""
        weight = np.asarray(arrays["weight"])
        if weight.shape != (config["n_channels"],):
            raise ValueError(
                f"weight must have shape ({config['n_channels']},), got {weight.shape}"
            )
        return cls(
            weight,
            arrays["bias"],
            arrays["running_mean"],
            arrays["running_var"],
            eps=config["eps"],
            momentum=config["momentum"],
            mask_order=config["mask_order"],
        )

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n_channels={self.n_channels}, eps={self.eps}, "
            f"momentum={self.momentum}, mask_order={self.mask_order!r}, dtype={self.dtype})"
        )


class BatchNorm2d(_BatchNorm):
    r"""Batch normalisation of ``(C, N, H, W)`` images, as ``torch.nn.BatchNorm2d``.

    Each channel is normalised over its ``M = N*H*W`` values. Build a fresh layer with
    :meth:`new`; the constructor takes the arrays (as :meth:`from_config` does).

    Parameters
    ----------
    weight, bias : ndarray of shape (C,)
        :math:`\gamma` and :math:`\beta` (trainable; :meth:`new` sets 1 and 0).
    running_mean, running_var : ndarray of shape (C,)
        The running statistics (buffers; :meth:`new` sets 0 and 1), of the same dtype.
    eps : float, default=1e-5
        Added to the variance.
    momentum : float in [0, 1], default=0.1
        Weight of the batch in the running statistics' update.
    mask_order : {"after_norm", "before_norm"}, default="after_norm"
        Where the mask of a dropped channel (a channel outside ``live``) acts:

        - ``"after_norm"``: ``out = m * BN(z)``, cpusparse's math. A dropped channel
          outputs exactly 0, gets zero ``weight``/``bias`` gradients and zero ``dx``,
          and its running statistics are left unchanged; no work is spent on it, and
          :meth:`live_outputs` returns ``live``.
        - ``"before_norm"``: ``out = BN(m * z)``, the authors' released code (the
          convolution's weight is masked and a dense batch norm follows). A dropped
          channel's input is 0, so it is normalised as a constant: batch mean and
          variance 0, output :math:`\beta` in training
          (:math:`\gamma (0 - \mu_r) / \sqrt{\sigma^2_r + \epsilon} + \beta` in
          evaluation), running statistics moved toward 0, ``bias`` gradient the sum
          of ``dout``, ``dx`` 0. Every output may be nonzero: :meth:`live_outputs`
          returns None.

    Notes
    -----
    A training pass (``mode.training``, or a straight-through pass, which is always
    treated as one) normalises channel :math:`c` with the mean and the *biased*
    variance of its :math:`M` values,

    .. math::

        \mu = \frac{1}{M}\sum_i x_i, \qquad \sigma^2 = \frac{1}{M}\sum_i (x_i - \mu)^2,
        \qquad \hat x_i = \frac{x_i - \mu}{\sqrt{\sigma^2 + \epsilon}}, \qquad
        y_i = \gamma \hat x_i + \beta,

    and, when ``mode.update_stats``, updates the running statistics in place with
    the *unbiased* variance, as PyTorch:

    .. math::

        \mu_r \leftarrow (1 - m)\,\mu_r + m\,\mu, \qquad
        \sigma^2_r \leftarrow (1 - m)\,\sigma^2_r + m\,\frac{M}{M - 1}\sigma^2.

    Its backward pass is

    .. math::

        \frac{\partial L}{\partial \gamma} = \sum_i g_i \hat x_i, \qquad
        \frac{\partial L}{\partial \beta} = \sum_i g_i, \qquad
        \frac{\partial L}{\partial x_i} = \frac{\gamma}{\sqrt{\sigma^2 + \epsilon}}
        \Bigl(g_i - \frac{1}{M}\frac{\partial L}{\partial \beta}
        - \frac{\hat x_i}{M}\frac{\partial L}{\partial \gamma}\Bigr)

    with :math:`g = \partial L / \partial y`. A training pass needs :math:`M \ge 2`
    (a ValueError otherwise, as PyTorch). An evaluation pass uses :math:`\mu_r,
    \sigma^2_r` instead, updates nothing, and :math:`\partial L / \partial x_i =
    \gamma g_i / \sqrt{\sigma^2_r + \epsilon}`. The layer takes no mask; it reads
    which channels were dropped from ``live``.

    References
    ----------
    .. [1] S. Ioffe, C. Szegedy, "Batch Normalization: Accelerating Deep Network
       Training by Reducing Internal Covariate Shift", ICML 2015, arXiv:1502.03167.
    .. [2] X. Zhou, W. Zhang, Z. Chen, S. Diao, T. Zhang, "Efficient Neural Network
       Training via Forward and Backward Propagation Sparsification", NeurIPS 2021,
       arXiv:2111.05685.

    Examples
    --------
    >>> bn = BatchNorm2d.new(2, dtype=np.float64)
    >>> x = np.arange(16.0).reshape(2, 2, 2, 2)
    >>> out, cache = bn.forward(x, live=np.array([True, False]))
    >>> bool(abs(out[0].mean()) < 1e-12), bool(np.all(out[1] == 0))
    (True, True)
    >>> bn.running_mean
    array([0.35, 0.  ])
    >>> dx, grads = bn.backward(np.ones_like(out), cache)
    >>> grads["bias"]
    array([8., 0.])
    """

    def _check_x(self, x: npt.ArrayLike, name: str) -> FloatArray:
        return check_images(x, self.n_channels, name, self.dtype)


class BatchNorm1d(_BatchNorm):
    """Batch normalisation of ``(C, N)`` feature-major activations, as ``torch.nn.BatchNorm1d``.

    Each feature is normalised over its ``M = N`` values (one per sample); ``live``
    has one bit per feature. Everything else, ``mask_order`` and the math included,
    is as in :class:`BatchNorm2d`.

    Parameters
    ----------
    weight, bias, running_mean, running_var : ndarray of shape (C,)
        As in :class:`BatchNorm2d`.
    eps : float, default=1e-5
    momentum : float in [0, 1], default=0.1
    mask_order : {"after_norm", "before_norm"}, default="after_norm"

    Examples
    --------
    >>> bn = BatchNorm1d.new(2, dtype=np.float64, mask_order="before_norm")
    >>> x = np.array([[1.0, 3.0], [0.0, 0.0]])
    >>> out, cache = bn.forward(x, live=np.array([True, False]))
    >>> out.round(4)
    array([[-1.,  1.],
           [ 0.,  0.]])
    >>> bn.running_mean, bn.running_var
    (array([0.2, 0. ]), array([1.1, 0.9]))
    """

    def _check_x(self, x: npt.ArrayLike, name: str) -> FloatArray:
        return _check_activations(x, self.n_channels, name, self.dtype)
