"""Optimizers with explicit state, gradient clipping and learning-rate schedules.

An optimizer object holds only hyperparameters. Its state lives in a list the
caller owns, one dict of arrays per parameter array, aligned with the
parameters: ``state[i]["exp_avg"][j]`` belongs to ``params[i][j]``. When a
sparse pattern drops entries, :func:`compact_state` subsets the state with the
same mask as the parameter values.

The update rules match ``torch.optim.SGD`` and ``torch.optim.Adam`` (default
arguments otherwise: no dampening, no AMSGrad, no ``maximize``), so a GPU port
written against PyTorch can be compared with this reference within
floating-point tolerance.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import numpy.typing as npt

from .._typing import FloatArray
from ..engine.kernels import elementwise as _elementwise

__all__ = [
    "SGD",
    "Adam",
    "clip_grad_norm",
    "compact_state",
    "constant_schedule",
    "cosine_schedule",
]


def _check_scalar(
    value: float,
    name: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return `value` as a float after checking it is a real number in the given interval."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__}")
    value = float(value)
    below = low is not None and (value <= low if low_open else value < low)
    above = high is not None and (value >= high if high_open else value > high)
    if math.isnan(value) or below or above or math.isinf(value):
        left = "(" if low_open or low is None else "["
        right = ")" if high_open or high is None else "]"
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        raise ValueError(f"{name} must be finite and in {left}{lo}, {hi}{right}, got {value!r}")
    return value


def _flat_views(*arrays: np.ndarray) -> list[np.ndarray]:
    """1-D views of C-contiguous arrays, for the element-wise kernels.

    NOTE: the kernels update the parameter and state arrays in place, so these must
    be views; a non-contiguous one is refused rather than silently updated in a copy.
    """
    for a in arrays:
        if not a.flags.c_contiguous:
            raise ValueError(
                f"optimizer arrays must be C-contiguous (updated in place), got an array "
                f"of shape {a.shape} with strides {a.strides}"
            )
    return [a.reshape(-1) for a in arrays]


def _check_params(params: Sequence[FloatArray], name: str = "params") -> list[FloatArray]:
    """Check `params` is a list/tuple of floating ndarrays and return it as a list."""
    if isinstance(params, np.ndarray) or not isinstance(params, (list, tuple)):
        raise TypeError(f"{name} must be a list or tuple of ndarrays, got {type(params).__name__}")
    for i, p in enumerate(params):
        if not isinstance(p, np.ndarray):
            raise TypeError(f"{name}[{i}] must be an ndarray, got {type(p).__name__}")
        if p.dtype not in (np.float32, np.float64):
            raise TypeError(f"{name}[{i}] must have dtype float32 or float64, got {p.dtype}")
    return list(params)


def _check_step_args(
    params: Sequence[FloatArray],
    grads: Sequence[FloatArray],
    state: Sequence[dict[str, np.ndarray]],
    expected_keys: dict[str, str],
) -> tuple[list[FloatArray], list[FloatArray]]:
    """Validate the arguments of an optimizer step."""
    params = _check_params(params)
    grads = _check_params(grads, "grads")
    if isinstance(state, dict) or not isinstance(state, (list, tuple)):
        raise TypeError(f"state must be a list of dicts, got {type(state).__name__}")
    if not len(params) == len(grads) == len(state):
        raise ValueError(
            "params, grads and state must have the same length, got "
            f"{len(params)}, {len(grads)} and {len(state)}"
        )
    for i, (p, g, s) in enumerate(zip(params, grads, state, strict=True)):
        if not p.flags.writeable:
            raise ValueError(f"params[{i}] must be writeable (it is updated in place)")
        if g.shape != p.shape:
            raise ValueError(
                f"grads[{i}] must have shape {p.shape} like params[{i}], got {g.shape}"
            )
        if g.dtype != p.dtype:
            raise TypeError(f"grads[{i}] must have dtype {p.dtype} like params[{i}], got {g.dtype}")
        if not isinstance(s, dict):
            raise TypeError(f"state[{i}] must be a dict, got {type(s).__name__}")
        if set(s) != set(expected_keys):
            raise ValueError(
                f"state[{i}] must have keys {sorted(expected_keys)}, "
                f"got {sorted(s)}; create it with init_state"
            )
        for key, kind in expected_keys.items():
            a = s[key]
            if not isinstance(a, np.ndarray):
                raise TypeError(f"state[{i}][{key!r}] must be an ndarray, got {type(a).__name__}")
            if kind == "step":
                if a.shape != () or a.dtype != np.int64:
                    raise ValueError(
                        f"state[{i}][{key!r}] must be a 0-d int64 array, "
                        f"got shape {a.shape} and dtype {a.dtype}"
                    )
                continue
            if a.shape != p.shape:
                raise ValueError(
                    f"state[{i}][{key!r}] must have shape {p.shape} like params[{i}], got {a.shape}"
                )
            if a.dtype != p.dtype:
                raise TypeError(
                    f"state[{i}][{key!r}] must have dtype {p.dtype} like params[{i}], got {a.dtype}"
                )
            if not a.flags.writeable:
                raise ValueError(f"state[{i}][{key!r}] must be writeable")
    return params, grads


class SGD:
    r"""Stochastic gradient descent with optional (Nesterov) momentum and L2 weight decay.

    Parameters
    ----------
    lr : float, default=0.1
        Learning rate :math:`\eta \ge 0`.
    momentum : float, default=0.0
        Momentum factor :math:`\mu \in [0, 1)`.
    nesterov : bool, default=False
        Use Nesterov momentum; requires ``momentum > 0``.
    weight_decay : float, default=0.0
        L2 penalty :math:`\lambda \ge 0`, added to the gradient.

    Notes
    -----
    For a parameter :math:`\theta` with gradient :math:`g_t` and momentum
    buffer :math:`b` (initialised to zero), one step computes

    .. math::

        d_t &= g_t + \lambda \theta_{t-1} \\
        b_t &= \mu b_{t-1} + d_t \\
        \theta_t &= \theta_{t-1} - \eta
            \begin{cases} d_t + \mu b_t & \text{Nesterov} \\
                          b_t & \text{otherwise,} \end{cases}

    and without momentum simply :math:`\theta_t = \theta_{t-1} - \eta d_t`.
    This is ``torch.optim.SGD`` with ``dampening=0``: its first step sets
    :math:`b_1 = d_1`, which equals the rule above with :math:`b_0 = 0`.
    All arithmetic is done in the parameter's dtype.

    The state of a parameter is ``{}`` without momentum and
    ``{"momentum_buffer": b}`` with it.

    References
    ----------
    .. [1] I. Sutskever, J. Martens, G. Dahl and G. Hinton, "On the importance
       of initialization and momentum in deep learning", ICML 2013.

    Examples
    --------
    >>> import numpy as np
    >>> from cpusparse.training import SGD
    >>> opt = SGD(lr=0.1, momentum=0.9)
    >>> params = [np.array([1.0, -2.0])]
    >>> state = opt.init_state(params)
    >>> for _ in range(2):
    ...     grads = [2 * params[0]]  # gradient of sum(theta ** 2)
    ...     opt.step(params, grads, state)
    >>> params[0]
    array([ 0.46, -0.92])
    >>> state[0]["momentum_buffer"]
    array([ 3.4, -6.8])
    """

    def __init__(
        self,
        lr: float = 0.1,
        *,
        momentum: float = 0.0,
        nesterov: bool = False,
        weight_decay: float = 0.0,
    ) -> None:
        self.lr = _check_scalar(lr, "lr", low=0.0)
        self.momentum = _check_scalar(momentum, "momentum", low=0.0, high=1.0, high_open=True)
        if not isinstance(nesterov, (bool, np.bool_)):
            raise TypeError(f"nesterov must be a bool, got {type(nesterov).__name__}")
        if nesterov and self.momentum == 0.0:
            raise ValueError(f"nesterov=True requires momentum > 0, got momentum={momentum!r}")
        self.nesterov = bool(nesterov)
        self.weight_decay = _check_scalar(weight_decay, "weight_decay", low=0.0)

    def __repr__(self) -> str:
        return (
            f"SGD(lr={self.lr!r}, momentum={self.momentum!r}, nesterov={self.nesterov!r}, "
            f"weight_decay={self.weight_decay!r})"
        )

    def _state_keys(self) -> dict[str, str]:
        return {"momentum_buffer": "array"} if self.momentum > 0.0 else {}

    def init_state(self, params: Sequence[FloatArray]) -> list[dict[str, np.ndarray]]:
        """Create the zero state for `params`.

        Parameters
        ----------
        params : list of ndarray
            Parameter arrays (float32 or float64).

        Returns
        -------
        state : list of dict
            One dict per parameter: ``{}`` without momentum, otherwise
            ``{"momentum_buffer": zeros_like(param)}``.
        """
        params = _check_params(params)
        if self.momentum == 0.0:
            return [{} for _ in params]
        return [{"momentum_buffer": np.zeros_like(p)} for p in params]

    def step(
        self,
        params: Sequence[FloatArray],
        grads: Sequence[FloatArray],
        state: Sequence[dict[str, np.ndarray]],
        *,
        lr: float | None = None,
    ) -> None:
        """Update `params` and `state` in place with one SGD step.

        Parameters
        ----------
        params : list of ndarray
            Parameter arrays, C-contiguous, updated in place.
        grads : list of ndarray
            Gradients, same shapes and dtypes as `params`; not modified.
        state : list of dict
            State from :meth:`init_state` (or :func:`compact_state`), updated
            in place.
        lr : float, optional
            Learning rate for this step, overriding ``self.lr`` (for schedules).
        """
        lr = self.lr if lr is None else _check_scalar(lr, "lr", low=0.0)
        params, grads = _check_step_args(params, grads, state, self._state_keys())
        for p, g, s in zip(params, grads, state, strict=True):
            cast = p.dtype.type
            buf = s["momentum_buffer"] if self.momentum != 0.0 else np.empty(0, p.dtype)
            flat_p, flat_buf = _flat_views(p, buf)
            _elementwise.sgd_update(
                flat_p,
                np.ascontiguousarray(g).reshape(-1),
                flat_buf,
                cast(lr),
                cast(self.weight_decay),
                cast(self.momentum),
                self.nesterov,
            )


class Adam:
    r"""Adam with bias correction and L2 weight decay added to the gradient.

    Parameters
    ----------
    lr : float, default=1e-3
        Learning rate :math:`\eta \ge 0`.
    betas : tuple of float, default=(0.9, 0.999)
        Decay rates :math:`(\beta_1, \beta_2)`, each in [0, 1).
    eps : float, default=1e-8
        :math:`\epsilon \ge 0` added to the denominator.
    weight_decay : float, default=0.0
        L2 penalty :math:`\lambda \ge 0`, added to the gradient (this is Adam,
        not the decoupled decay of AdamW).

    Notes
    -----
    With :math:`m_0 = v_0 = 0`, step :math:`t = 1, 2, \dots` computes

    .. math::

        d_t &= g_t + \lambda \theta_{t-1} \\
        m_t &= \beta_1 m_{t-1} + (1 - \beta_1) d_t \\
        v_t &= \beta_2 v_{t-1} + (1 - \beta_2) d_t^2 \\
        \theta_t &= \theta_{t-1} - \frac{\eta}{1 - \beta_1^t}
            \frac{m_t}{\sqrt{v_t} / \sqrt{1 - \beta_2^t} + \epsilon},

    exactly as ``torch.optim.Adam`` (``amsgrad=False``). The bias-correction
    factors are computed in float64 and cast to the parameter's dtype; all
    array arithmetic is done in the parameter's dtype. Like PyTorch, the first
    moment is updated as :math:`m_{t-1} + (1 - \beta_1)(d_t - m_{t-1})`.

    The state of a parameter is ``{"step": t, "exp_avg": m, "exp_avg_sq": v}``
    with ``step`` a 0-d int64 array, so every parameter carries its own count
    (a parameter compacted or re-created later keeps or restarts its count).

    References
    ----------
    .. [1] D. P. Kingma and J. Ba, "Adam: A method for stochastic
       optimization", ICLR 2015, arXiv:1412.6980.

    Examples
    --------
    >>> import numpy as np
    >>> from cpusparse.training import Adam
    >>> opt = Adam(lr=0.1)
    >>> params = [np.array([1.0, -2.0])]
    >>> state = opt.init_state(params)
    >>> opt.step(params, [2 * params[0]], state)
    >>> params[0]  # the first step moves each entry by about lr
    array([ 0.9, -1.9])
    >>> int(state[0]["step"])
    1
    """

    def __init__(
        self,
        lr: float = 1e-3,
        *,
        betas: Sequence[float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        self.lr = _check_scalar(lr, "lr", low=0.0)
        if not isinstance(betas, (tuple, list)) or len(betas) != 2:
            raise ValueError(f"betas must be a pair (beta1, beta2), got {betas!r}")
        self.betas = (
            _check_scalar(betas[0], "betas[0]", low=0.0, high=1.0, high_open=True),
            _check_scalar(betas[1], "betas[1]", low=0.0, high=1.0, high_open=True),
        )
        self.eps = _check_scalar(eps, "eps", low=0.0)
        self.weight_decay = _check_scalar(weight_decay, "weight_decay", low=0.0)

    def __repr__(self) -> str:
        return (
            f"Adam(lr={self.lr!r}, betas={self.betas!r}, eps={self.eps!r}, "
            f"weight_decay={self.weight_decay!r})"
        )

    _STATE_KEYS: dict[str, str] = {"step": "step", "exp_avg": "array", "exp_avg_sq": "array"}

    def init_state(self, params: Sequence[FloatArray]) -> list[dict[str, np.ndarray]]:
        """Create the zero state for `params`.

        Parameters
        ----------
        params : list of ndarray
            Parameter arrays (float32 or float64).

        Returns
        -------
        state : list of dict
            One dict per parameter with ``"step"`` (0-d int64 array, 0),
            ``"exp_avg"`` and ``"exp_avg_sq"`` (zeros like the parameter).
        """
        params = _check_params(params)
        return [
            {
                "step": np.zeros((), dtype=np.int64),
                "exp_avg": np.zeros_like(p),
                "exp_avg_sq": np.zeros_like(p),
            }
            for p in params
        ]

    def step(
        self,
        params: Sequence[FloatArray],
        grads: Sequence[FloatArray],
        state: Sequence[dict[str, np.ndarray]],
        *,
        lr: float | None = None,
    ) -> None:
        """Update `params` and `state` in place with one Adam step.

        Parameters
        ----------
        params : list of ndarray
            Parameter arrays, C-contiguous, updated in place.
        grads : list of ndarray
            Gradients, same shapes and dtypes as `params`; not modified.
        state : list of dict
            State from :meth:`init_state` (or :func:`compact_state`), updated
            in place.
        lr : float, optional
            Learning rate for this step, overriding ``self.lr`` (for schedules).
        """
        lr = self.lr if lr is None else _check_scalar(lr, "lr", low=0.0)
        params, grads = _check_step_args(params, grads, state, self._STATE_KEYS)
        beta1, beta2 = self.betas
        for p, g, s in zip(params, grads, state, strict=True):
            cast = p.dtype.type
            s["step"] += 1
            t = int(s["step"])
            # One pass per array: the NumPy expressions of the Notes, element by element.
            flat_p, flat_m, flat_v = _flat_views(p, s["exp_avg"], s["exp_avg_sq"])
            _elementwise.adam_update(
                flat_p,
                np.ascontiguousarray(g).reshape(-1),
                flat_m,
                flat_v,
                cast(self.weight_decay),
                cast(1.0 - beta1),
                cast(beta2),
                cast(1.0 - beta2),
                cast(lr / (1.0 - beta1**t)),
                cast(math.sqrt(1.0 - beta2**t)),
                cast(self.eps),
            )


def compact_state(state_i: dict[str, np.ndarray], keep: npt.ArrayLike) -> dict[str, np.ndarray]:
    """Subset the state of one parameter to the entries that are kept.

    Use it when a sparse pattern drops entries: apply to the state the same
    `keep` that is applied to the parameter's values, so that the state stays
    aligned with them.

    Parameters
    ----------
    state_i : dict of str to ndarray
        State of one parameter, e.g. ``state[i]`` from ``init_state``.
    keep : ndarray of bool or of int
        Boolean mask over the leading dimension(s) of the arrays, or an index
        array of kept positions along the first axis.

    Returns
    -------
    compacted : dict of str to ndarray
        New dict: every array with ``ndim >= 1`` is replaced by ``a[keep]``
        (a copy); 0-d arrays such as Adam's ``"step"`` are copied unchanged.

    Examples
    --------
    >>> import numpy as np
    >>> from cpusparse.training import compact_state
    >>> s = {"step": np.array(3), "exp_avg": np.array([0.1, 0.2, 0.3])}
    >>> compact_state(s, np.array([True, False, True]))
    {'step': array(3), 'exp_avg': array([0.1, 0.3])}
    """
    if not isinstance(state_i, dict):
        raise TypeError(f"state_i must be a dict, got {type(state_i).__name__}")
    keep = np.asarray(keep)
    if keep.dtype != np.bool_ and not np.issubdtype(keep.dtype, np.integer):
        raise TypeError(
            f"keep must be a boolean mask or an integer index array, got dtype {keep.dtype}"
        )
    if keep.ndim == 0:
        raise ValueError("keep must have at least one dimension, got a scalar")
    if keep.dtype != np.bool_ and keep.ndim != 1:
        raise ValueError(f"keep as an index array must be 1-D, got shape {keep.shape}")
    out = {}
    for key, a in state_i.items():
        if not isinstance(a, np.ndarray):
            raise TypeError(f"state_i[{key!r}] must be an ndarray, got {type(a).__name__}")
        if a.ndim == 0:
            out[key] = a.copy()
            continue
        if keep.dtype == np.bool_:
            if a.shape[: keep.ndim] != keep.shape:
                raise ValueError(
                    f"keep has shape {keep.shape} but state_i[{key!r}] has "
                    f"shape {a.shape}; a mask must match its leading dimensions"
                )
        elif keep.size and (keep.min() < -a.shape[0] or keep.max() >= a.shape[0]):
            raise ValueError(
                f"keep indices must be in [-{a.shape[0]}, {a.shape[0]}) for "
                f"state_i[{key!r}] of shape {a.shape}, got values in "
                f"[{keep.min()}, {keep.max()}]"
            )
        out[key] = a[keep]
    return out


def clip_grad_norm(
    grads: Sequence[FloatArray], max_norm: float | None
) -> tuple[list[FloatArray], float]:
    r"""Scale gradients so that their global L2 norm is at most `max_norm`.

    Parameters
    ----------
    grads : list of ndarray
        Gradient arrays (float32 or float64); not modified.
    max_norm : float or None
        Largest allowed global norm, > 0. ``None`` disables clipping.

    Returns
    -------
    clipped : list of ndarray
        New arrays ``g * min(1, max_norm / total_norm)`` in each gradient's
        dtype, or `grads` itself (as a list) when `max_norm` is None.
    total_norm : float
        Global norm of the input gradients, before clipping.

    Raises
    ------
    ValueError
        If clipping is requested and the norm is not finite.

    Notes
    -----
    .. math::

        \|g\| = \Big(\sum_i \sum_j g_{ij}^2\Big)^{1/2}

    is accumulated in float64, array by array in list order, so the result
    does not depend on threading. Unlike ``torch.nn.utils.clip_grad_norm_``,
    which divides by ``total_norm + 1e-6``, the scale here is exactly
    ``max_norm / total_norm``, so clipped gradients have norm `max_norm` up
    to rounding.

    Examples
    --------
    >>> import numpy as np
    >>> from cpusparse.training import clip_grad_norm
    >>> clipped, norm = clip_grad_norm([np.array([3.0]), np.array([4.0])], 1.0)
    >>> norm
    5.0
    >>> clipped
    [array([0.6]), array([0.8])]
    """
    grads = _check_params(grads, "grads")
    if max_norm is not None:
        max_norm = _check_scalar(max_norm, "max_norm", low=0.0, low_open=True)
    total = 0.0
    for g in grads:
        g64 = g.astype(np.float64, copy=False).ravel()
        total += float(np.dot(g64, g64))
    total_norm = math.sqrt(total)
    if max_norm is None:
        return grads, total_norm
    if not math.isfinite(total_norm):
        raise ValueError(f"gradient norm must be finite to clip, got {total_norm}")
    scale = 1.0 if total_norm <= max_norm else max_norm / total_norm
    return [g * g.dtype.type(scale) for g in grads], total_norm


class _ConstantSchedule:
    def __init__(self, lr: float) -> None:
        self.lr = lr

    def __repr__(self) -> str:
        return f"constant_schedule({self.lr!r})"

    def __call__(self, step: int) -> float:
        _check_step(step)
        return self.lr


class _CosineSchedule:
    def __init__(self, lr: float, total_steps: int, min_lr: float, warmup_steps: int) -> None:
        self.lr = lr
        self.total_steps = total_steps
        self.min_lr = min_lr
        self.warmup_steps = warmup_steps

    def __repr__(self) -> str:
        return (
            f"cosine_schedule({self.lr!r}, {self.total_steps!r}, min_lr={self.min_lr!r}, "
            f"warmup_steps={self.warmup_steps!r})"
        )

    def __call__(self, step: int) -> float:
        step = _check_step(step)
        if step < self.warmup_steps:
            return self.lr * (step + 1) / self.warmup_steps
        if step >= self.total_steps:
            return self.min_lr
        progress = (step - self.warmup_steps) / (self.total_steps - self.warmup_steps)
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1.0 + math.cos(math.pi * progress))


def _check_step(step: int) -> int:
    if isinstance(step, (bool, np.bool_)) or not isinstance(step, numbers.Integral):
        raise TypeError(f"step must be an integer, got {type(step).__name__}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return int(step)


def _check_count(value: int, name: str, low: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def constant_schedule(lr: float) -> Callable[[int], float]:
    """Return the schedule ``step -> lr``.

    Parameters
    ----------
    lr : float
        Learning rate, >= 0.

    Returns
    -------
    schedule : callable
        Maps a step count (int >= 0) to `lr`.

    Examples
    --------
    >>> from cpusparse.training import constant_schedule
    >>> constant_schedule(0.1)(1000)
    0.1
    """
    return _ConstantSchedule(_check_scalar(lr, "lr", low=0.0))


def cosine_schedule(
    lr: float, total_steps: int, *, min_lr: float = 0.0, warmup_steps: int = 0
) -> Callable[[int], float]:
    r"""Return a cosine-annealing schedule with optional linear warmup.

    Parameters
    ----------
    lr : float
        Peak learning rate, >= 0.
    total_steps : int
        Step at which the schedule reaches `min_lr`; > `warmup_steps`.
    min_lr : float, default=0.0
        Final learning rate, in [0, lr].
    warmup_steps : int, default=0
        Number of linear warmup steps, >= 0.

    Returns
    -------
    schedule : callable
        Maps the number of steps already taken, :math:`t \ge 0`, to the
        learning rate of the next step.

    Notes
    -----
    With :math:`W` warmup steps and :math:`T` total steps,

    .. math::

        \eta(t) = \begin{cases}
            \eta \, (t + 1) / W & t < W, \\
            \eta_{\min} + \tfrac12 (\eta - \eta_{\min})
                \big(1 + \cos(\pi \tfrac{t - W}{T - W})\big) & W \le t < T, \\
            \eta_{\min} & t \ge T.
        \end{cases}

    Warmup reaches :math:`\eta` at step :math:`W - 1` without spending a step
    at zero; the cosine part starts at :math:`\eta` for :math:`t = W` and is
    ``torch.optim.lr_scheduler.CosineAnnealingLR`` with ``T_max = T - W``.
    It decreases monotonically and stays at :math:`\eta_{\min}` from
    :math:`T` on.

    Examples
    --------
    >>> from cpusparse.training import cosine_schedule
    >>> schedule = cosine_schedule(0.1, 10, warmup_steps=2)
    >>> [round(schedule(t), 4) for t in range(11)]
    [0.05, 0.1, 0.1, 0.0962, 0.0854, 0.0691, 0.05, 0.0309, 0.0146, 0.0038, 0.0]
    """
    lr = _check_scalar(lr, "lr", low=0.0)
    total_steps = _check_count(total_steps, "total_steps", 1)
    warmup_steps = _check_count(warmup_steps, "warmup_steps", 0)
    if warmup_steps >= total_steps:
        raise ValueError(f"warmup_steps must be < total_steps={total_steps}, got {warmup_steps}")
    min_lr = _check_scalar(min_lr, "min_lr", low=0.0, high=lr)
    return _CosineSchedule(lr, total_steps, min_lr, warmup_steps)
