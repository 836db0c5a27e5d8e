r"""A scikit-learn classifier trained completely sparse (VR-PGE).

:class:`SparseMLPClassifier` wraps :mod:`cpusparse.training`: it builds a ReLU MLP
whose hidden layers are sparse (:func:`~cpusparse.models.mlp`), trains weights
and keep probabilities together with :func:`~cpusparse.training.loop.run_epoch` under
one global budget, then fixes a mask and fine-tunes the weights on it. Prediction uses
the fixed mask only, so the deployed network has at most ``density`` of its
prunable units.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import math
import numbers
import os
import re
import sys
import time
from collections.abc import Sequence
from numbers import Integral, Real
from typing import TYPE_CHECKING, Any, NamedTuple, TypedDict, TypeVar

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import LabelEncoder
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from ._threads import numba_threads
from ._typing import BoolArray, FloatArray
from .engine.containers import Sequential
from .engine.layers.base import EVAL, Layer
from .engine.layers.conv import CONV_GRANULARITIES
from .engine.layers.linear import GRANULARITIES, INITS
from .engine.losses import softmax
from .models import mlp, resnet, vgg
from .training import config as _config
from .training.checkpoint import load_checkpoint, restore_state, save_checkpoint
from .training.config import TrainConfig
from .training.loop import evaluate, fixed_mask, run_epoch
from .training.state import (
    budget_units,
    check_parameters_finite,
    expected_density,
    init_state,
    spawn_streams,
)

if TYPE_CHECKING:
    import numpy.typing as npt
    from tqdm.auto import tqdm

    from .training.checkpoint import Checkpoint
    from .training.state import TrainState

__all__ = ["SparseMLPClassifier", "SparseCNNClassifier", "ARCHITECTURES", "infer_input_shape"]

_C = TypeVar("_C", bound="_SparseClassifier")

# Parameters that do not change the result of ``fit`` (not compared on resume).
_RUN_ONLY_PARAMS = ("verbose", "checkpoint", "resume", "random_state", "n_jobs")

# Number of training samples on which the progress bar measures the accuracy when
# there is no validation set (only computed when ``verbose``; it draws no random
# numbers, so it does not change the result).
_PROGRESS_EVAL_SAMPLES = 2048


# The classifier's parameters that are options of the training step, by the name of
# the option in the table (cpusparse.training.config): their allowed values come from
# there. Defaults may differ (the classifier's are tuned for its cosine schedule).
_TRAIN_OPTIONS = {
    "density": "density",
    "n_masks": "n_masks",
    "score_estimator": "score_estimator",
    "projection": "projection",
    "learning_rate_init": "lr",
    "score_learning_rate": "score_lr",
    "optimizer": "optimizer",
    "score_optimizer": "score_optimizer",
    "clip_norm": "clip_norm",
    "clip_scope": "clip_scope",
    "momentum": "momentum",
    "weight_decay": "weight_decay",
    "projection_tol": "projection_tol",
    "projection_max_iter": "projection_max_iter",
    "finetune_lr": "finetune_lr",
    "weight_grad": "weight_grad",
}


def _sklearn_constraint(
    constraint: _config.Choice | _config.Real | _config.Int | _config.Bool,
) -> list[object]:
    """The scikit-learn parameter constraints of one option-table constraint."""
    if isinstance(constraint, _config.Choice):
        return [StrOptions(set(constraint.values))]
    if isinstance(constraint, _config.Bool):
        return ["boolean"]
    if isinstance(constraint, _config.Int):
        closed = "left" if constraint.high is None else "both"
        return [Interval(Integral, constraint.low, constraint.high, closed=closed)]
    out = [Interval(Real, constraint.low, constraint.high, closed=constraint.closed)]
    return out + [None] if constraint.none else out


def _table_constraints(params: dict[str, str] = _TRAIN_OPTIONS) -> dict[str, list[object]]:
    table = {option.name: option for option in _config.options()}
    return {param: _sklearn_constraint(table[name].constraint) for param, name in params.items()}


ARCHITECTURES = ("vgg", "resnet")
"""The networks of :class:`SparseCNNClassifier`."""


def infer_input_shape(n_features: int, n_stages: int) -> tuple[int, int, int]:
    """The ``(C, H, W)`` that :class:`SparseCNNClassifier` assumes for flat samples.

    A one-channel square image when ``n_features`` is a square (of side > 1), else a
    1-D signal ``(1, 1, n_features)``. Either must survive the ``n_stages - 1``
    halvings of the network (ValueError otherwise: a square image is never read as a
    signal behind the user's back; pass ``input_shape`` for that).

    Examples
    --------
    >>> infer_input_shape(64, 3), infer_input_shape(784, 3), infer_input_shape(40, 3)
    ((1, 8, 8), (1, 28, 28), (1, 1, 40))
    """
    side = math.isqrt(n_features)
    if side > 1 and side * side == n_features:
        if side >> (n_stages - 1) < 1:
            raise ValueError(
                f"n_features = {n_features} is a {side}x{side} image, too small for "
                f"{n_stages} stages (each stage after the first halves H and W); use fewer "
                f"widths, or input_shape=(1, 1, {n_features}) to read it as a 1-D signal"
            )
        return (1, side, side)
    if n_features >> (n_stages - 1) < 1:
        raise ValueError(
            f"n_features = {n_features} is too small for {n_stages} stages (each stage "
            f"after the first halves the signal); give at least {1 << (n_stages - 1)} "
            "features or fewer widths"
        )
    return (1, 1, n_features)


def _set_params(estimator: BaseEstimator, values: dict[str, Any]) -> None:
    # __init__: store every parameter under its own name, as scikit-learn expects.
    for name, value in values.items():
        if name not in ("self", "__class__"):
            setattr(estimator, name, value)


def _check_hidden(hidden: Any) -> tuple[int, ...]:
    # ``hidden`` is the unvalidated parameter, checked by trying to iterate it.
    if isinstance(hidden, numbers.Integral) and not isinstance(hidden, bool):
        hidden = (hidden,)
    try:
        sizes = tuple(hidden)
    except TypeError:
        raise TypeError(
            f"hidden_layer_sizes must be a sequence of positive ints, got {hidden!r}"
        ) from None
    if not sizes or any(
        isinstance(h, bool) or not isinstance(h, numbers.Integral) or h < 1 for h in sizes
    ):
        raise ValueError(
            f"hidden_layer_sizes must be a nonempty sequence of positive ints, got {hidden!r}"
        )
    return tuple(int(h) for h in sizes)


def _check_widths(widths: Any) -> tuple[int, ...]:
    # ``widths`` is the unvalidated parameter, checked by trying to iterate it.
    try:
        sizes = tuple(widths)
    except TypeError:
        raise TypeError(f"widths must be a sequence of positive ints, got {widths!r}") from None
    if not sizes or any(
        isinstance(w, bool) or not isinstance(w, numbers.Integral) or w < 1 for w in sizes
    ):
        raise ValueError(f"widths must be a nonempty sequence of positive ints, got {widths!r}")
    return tuple(int(w) for w in sizes)


def _check_input_shape(shape: Any) -> tuple[int, int, int] | None:
    if shape is None:
        return None
    try:
        dims = tuple(shape)
    except TypeError:
        dims = ()
    if len(dims) != 3 or any(
        isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1 for v in dims
    ):
        raise ValueError(f"input_shape must be None or (C, H, W) of positive ints, got {shape!r}")
    return int(dims[0]), int(dims[1]), int(dims[2])


def _feature_major(x: FloatArray) -> FloatArray:
    """Samples on axis 0 -> samples on axis 1: ``(F, N)``, or images ``(C, N, H, W)``."""
    return np.ascontiguousarray(np.swapaxes(x, 0, 1))


def _weight_shape(layer: Layer, weight: np.ndarray) -> tuple[int, ...]:
    # A convolution's weight is stored in its shape; a linear layer's may be CSR data.
    if weight.ndim == 4:
        return tuple(weight.shape)
    if not (layer.n_out is not None and layer.n_in is not None):
        raise RuntimeError("internal error: a layer with a weight has sizes")
    return (layer.n_out, layer.n_in)


def _json_value(value: object) -> object:
    if isinstance(value, tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


class LayerDensity(TypedDict):
    """One record of :meth:`SparseMLPClassifier.layer_densities` (see there)."""

    layer: int
    name: str
    type: str
    shape: tuple[int, ...]
    prunable: bool
    n_units: int
    active: int
    density: float


_TRAINING_DOC = """\
    density : float in (0, 1], default=0.1
        Kept fraction of the prunable units (the budget).
    n_masks : int >= 2, default=2
        Number :math:`K` of sampled masks (forward passes) per step.
    score_estimator : {"vrpge", "vrpge-sqrt", "reinforce", "straight-through"}, default="vrpge"
        Gradient estimator of the keep probabilities (see
        :class:`~cpusparse.training.config.TrainConfig`).
    projection : {"exact", "bisection"}, default="exact"
        Solver of the projection onto the budget set.
    max_iter : int >= 0, default=30
        Epochs of sparse training (weights and scores); 0 goes straight to the fixed
        mask (with ``fixed_mask="random"``: the baseline of a mask not learned).
    finetune_iter : int >= 0, default=10
        Epochs of weight training on the fixed mask; 0 skips fine-tuning.
    fixed_mask : {"topk", "best-of-n", "random"}, default="topk"
        How the final mask is chosen (:func:`~cpusparse.training.loop.fixed_mask`):
        the ``floor(k)`` largest scores, or the most accurate of 10 sampled masks
        on the validation part (the training data without one), or ``floor(k)``
        units drawn uniformly at random (the scores ignored). A sampled mask
        can exceed the budget; it is then cut to its ``floor(k)`` units of
        largest score, so that ``density_ <= density`` always holds.
    batch_size : int >= 1, default=64
        Mini-batch size (the last batch of an epoch may be smaller).
    learning_rate_init : float > 0, default=0.01
        Initial learning rate of the weights; both learning rates follow a
        cosine schedule over all the steps of both phases.
    score_learning_rate : float > 0, default=0.1
        Initial learning rate of the scores.
    optimizer, score_optimizer : {"adam", "sgd"}, default="adam"
        Optimizers of the weights and of the scores.
    momentum : float in [0, 1), default=0.9
        Momentum of SGD on the weights (``optimizer="sgd"``).
    weight_decay : float >= 0, default=0.0
        L2 penalty on the weights and biases (never on the scores).
    clip_norm : float > 0 or None, default=None
        Clip the global norm of the gradients named by ``clip_scope``.
    clip_scope : {"weights", "weights+scores"}, default="weights"
        Clip the weight gradients, or weights and scores in one norm (the authors').
    projection_tol, projection_max_iter : float > 0, int >= 1, default=1e-3, 20
        Stopping rule of ``projection="bisection"``.
    finetune_lr : float > 0 or None, default=None
        Constant learning rate of the weights in fine-tuning; None continues the
        cosine schedule.
    weight_grad : {"mean", "first"}, default="mean"
        Average the weight gradient over the K passes, or use the first only.
    dtype : {"float32", "float64"}, default="float32"
        Floating type of parameters and activations.
    n_jobs : int or None, default=None
        Number of threads during ``fit`` and ``predict``: the Numba kernels run on
        them, and so do the K mask passes of a training step (BLAS stays on one
        thread per pass); None means 1 and -1 all cores, -2 all but one, as in
        scikit-learn. Results are bit-identical for any value. One thread is the
        default so that a fit inside a process pool or a grid search does not
        oversubscribe the machine.
    random_state : int, RandomState instance or None, default=None
        Seed of the three random streams (initialisation, data order, masks)
        and of the validation split. Fixed: training is bit-reproducible,
        whatever the number of threads.
    verbose : bool, default=False
        Show a progress bar (on stderr) with the loss, accuracy and density.
    validation_fraction : float in [0, 1), default=0.0
        Stratified held-out fraction of the training data, on which the
        accuracy is recorded each epoch in ``history_`` (0 disables it).
    checkpoint : str or os.PathLike, default=None
        File written atomically at the end of every epoch
        (:func:`~cpusparse.training.checkpoint.save_checkpoint`).
    resume : bool, default=False
        Continue from ``checkpoint`` if that file exists (it must have been
        written by a fit with the same parameters on the same data); the result
        is bit-identical to an uninterrupted fit. Without the file, ``fit``
        starts from scratch.
"""

_ATTRIBUTES_DOC = """\
    classes_ : ndarray of shape (n_classes,)
        Class labels.
    n_features_in_ : int
        Number of features seen during fit.
    network_ : Sequential
        The trained network.
    masks_ : list of ndarray of bool
        The fixed masks used for prediction, one per prunable layer.
    keep_prob_ : ndarray of shape (n_units,)
        Final keep probabilities of the (remaining) prunable units, concatenated.
    n_active_ : int
        Number of prunable units kept by ``masks_``.
    density_ : float
        ``n_active_`` over the number of prunable units at initialisation;
        at most ``density``.
    n_iter_ : int
        Number of epochs run (sparse and fine-tuning).
    loss_curve_ : list of float
        Mean training loss of each epoch.
    history_ : list of dict
        One record per epoch: ``phase`` ("sparse" or "finetune"), ``epoch``
        (1-based within the phase), ``loss``, ``val_accuracy`` (with
        ``validation_fraction > 0``; accuracy with the current top-k mask during
        the sparse phase, with the fixed mask during fine-tuning),
        ``expected_density`` (``sum(s) / n``), ``realised_density`` (mean kept
        fraction of the sampled masks, or of the fixed mask), ``grad_variance``
        (mean variance of the score gradient over the epoch, NaN in
        fine-tuning; see :class:`~cpusparse.training.loop.EpochStats`) and ``seconds``.
        All but ``seconds`` are bit-reproducible.

"""


def _doc(cls: type[_SparseClassifier], template: str) -> str:
    """``template`` with the shared parameters, their defaults read from ``cls``."""
    defaults = inspect.signature(cls).parameters
    entries = re.split(r"\n(?=    \S)", _TRAINING_DOC.rstrip("\n"))
    for i, entry in enumerate(entries):
        name = entry.split(" :")[0].strip()
        if name in defaults:
            default = defaults[name].default
            text = f'"{default}"' if isinstance(default, str) else str(default)
            entries[i] = re.sub(r"default=[^\n]*", f"default={text}", entry, count=1)
    return template.format(training="\n".join(entries) + "\n", attributes=_ATTRIBUTES_DOC)


_MLP_DOC = r"""Multi-layer perceptron classifier trained with sparse forward and backward passes.

    Training solves

    .. math::

        \min_{{w,\ s}}\ \mathbb{{E}}_{{m \sim \text{{Bernoulli}}(s)}}\, L(w \odot m)
        \quad \text{{s.t.}} \quad 0 \le s \le 1,\ \ \textstyle\sum_i s_i \le k
        = \text{{density}} \times n

    over the weights :math:`w` and the keep probabilities :math:`s` of the
    :math:`n` prunable units, with the variance-reduced policy-gradient estimator
    (VR-PGE) for :math:`s`: every step runs ``n_masks`` sparse forward passes
    and sparse backward passes only (Zhou et al., 2021). After ``max_iter`` epochs
    a deterministic mask within the budget is fixed and the weights are
    fine-tuned on it for ``finetune_iter`` epochs.

    Parameters
    ----------
    hidden_layer_sizes : tuple of int, default=(300, 100)
        Width of each hidden (sparse, ReLU) layer.
    granularity : {{"weight", "neuron"}}, default="weight"
        One mask bit per stored weight, or per hidden unit.
    sparse_classifier : bool, default=False
        Make the output layer sparse (and prunable) too.
    init : {{"kaiming", "uniform"}}, default="kaiming"
        Weight initialisation; the fan-in counts only the inputs expected to be
        kept at ``density`` (see :func:`~cpusparse.models.mlp`).
{training}    Attributes
    ----------
{attributes}    See Also
    --------
    cpusparse.training.step.train_step : The training step (Algorithm 1 of the paper).

    Notes
    -----
    Inputs are converted once to feature-major arrays of shape
    ``(n_features, n_samples)`` in ``dtype``. The number of steps of the cosine
    schedules is ``(max_iter + finetune_iter) * ceil(n_train / batch_size)``.

    References
    ----------
    .. [1] X. Zhou, W. Zhang, Z. Chen, S. Diao, T. Zhang, "Efficient Neural Network
       Training via Forward and Backward Propagation Sparsification",
       NeurIPS 2021, arXiv:2111.05685.

    Examples
    --------
    >>> from sklearn.datasets import load_digits
    >>> from sklearn.model_selection import train_test_split
    >>> X, y = load_digits(return_X_y=True)
    >>> X_train, X_test, y_train, y_test = train_test_split(
    ...     X / 16, y, test_size=0.2, stratify=y, random_state=0)
    >>> clf = SparseMLPClassifier(hidden_layer_sizes=(64,), density=0.2, max_iter=8,
    ...                           finetune_iter=2, learning_rate_init=0.01, random_state=0)
    >>> clf.fit(X_train, y_train)
    SparseMLPClassifier(...)
    >>> clf.score(X_test, y_test)
    0.9...
    >>> clf.density_, clf.n_active_  # floor(0.2 * 64 * 64) weights of the hidden layer
    (0.1999..., 819)
    >>> first = clf.layer_densities()[0]
    >>> first["name"], first["type"], first["shape"], first["n_units"], first["active"]
    ('0', 'SparseLinear', (64, 64), 4096, 819)
    >>> [record["phase"] for record in clf.history_][-3:]
    ['sparse', 'finetune', 'finetune']
    """

_CNN_DOC = r"""Convolutional classifier (VGG or ResNet) trained with channel-sparse passes.

    The paper's main setting: every convolution has one keep probability per output
    channel (or per weight), the budget ``density`` is global over all of them, and
    training is :class:`SparseMLPClassifier`'s (VR-PGE on the scores, the chain rule
    on the kept sub-network, then fine-tuning on a fixed mask). A step computes the
    kept channels only, with BLAS on the block of kept filters and live input
    channels (:class:`~cpusparse.engine.layers.conv.Conv2d`).

    Parameters
    ----------
    architecture : {{"vgg", "resnet"}}, default="vgg"
        :func:`~cpusparse.models.vgg` (two 3x3 conv + batch norm + ReLU per stage,
        2x2 max pools between stages) or :func:`~cpusparse.models.resnet` (a 3x3 stem
        and one basic block per stage, stride 2 between stages); both end with a
        global average pool and a dense classifier.
    widths : sequence of int, default=(16, 32, 64)
        Channels of each stage.
    input_shape : (C, H, W) or None, default=None
        One sample's shape. None: the shape of 4-D input ``(n, C, H, W)``, else
        inferred from ``n_features``: a square one-channel image if ``n_features`` is
        a square large enough for the stages (64 -> (1, 8, 8), 784 -> (1, 28, 28)),
        otherwise a 1-D signal (1, 1, n_features).
    granularity : {{"channel", "weight"}}, default="channel"
        One mask bit per output channel of a convolution, or per weight.
    prune_first : bool, default=True
        Whether the first convolution is prunable (as in the paper and the authors'
        code); False leaves it dense and outside the budget.
    norm_updates : {{"once", "every_pass"}}, default="once"
        When the batch norms' running statistics update: from the first of the K
        passes of a step, or from every pass in order (the authors' train-mode passes).
{training}    Attributes
    ----------
{attributes}    input_shape_ : tuple of int
        ``(C, H, W)`` of one sample, as the network was built.

    See Also
    --------
    SparseMLPClassifier : The same training for MLPs.
    cpusparse.export.narrow : The trained network as a narrower dense one.

    Notes
    -----
    Inputs ``(n, C*H*W)`` are read in PyTorch's ``C, H, W`` order (as
    ``X.reshape(n, C, H, W)``) and converted once per batch to the engine's
    channel-major ``(C, N, H, W)``. The classifier is dense, as in the authors' code.

    Examples
    --------
    >>> from sklearn.datasets import load_digits
    >>> from sklearn.model_selection import train_test_split
    >>> X, y = load_digits(return_X_y=True)
    >>> X_train, X_test, y_train, y_test = train_test_split(
    ...     X / 16, y, test_size=0.2, stratify=y, random_state=0)
    >>> clf = SparseCNNClassifier(widths=(8, 16), density=0.5, random_state=0)
    >>> clf.fit(X_train, y_train).input_shape_
    (1, 8, 8)
    >>> clf.score(X_test, y_test)
    0.9...
    >>> [(r["name"], r["shape"], r["n_units"]) for r in clf.layer_densities()][:2]
    [('0', (8, 1, 3, 3), 8), ('3', (8, 8, 3, 3), 8)]
"""


class _SparseClassifier(ClassifierMixin, BaseEstimator):
    """The fit, prediction and reports shared by the sparse classifiers.

    A subclass sets its parameters in ``__init__`` and says what its network is:
    :meth:`_check_model`, :meth:`_network`, :meth:`_describe`, and optionally how its
    inputs are read (:meth:`_flat`, :meth:`_samples`) and which training options it
    takes (``_train_options``).
    """

    _train_options: dict[str, str] = _TRAIN_OPTIONS

    # ------------------------------------------------------------------ validation

    _parameter_constraints: dict[str, list[object]] = {
        **_table_constraints(),
        "max_iter": [Interval(Integral, 0, None, closed="left")],
        "finetune_iter": [Interval(Integral, 0, None, closed="left")],
        "fixed_mask": [StrOptions({"topk", "best-of-n", "random"})],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "dtype": [StrOptions({"float32", "float64"}), type],
        "n_jobs": [
            Interval(Integral, 1, None, closed="left"),
            Interval(Integral, None, -1, closed="right"),
            None,
        ],
        "random_state": [
            Interval(Integral, 0, None, closed="left"),
            np.random.RandomState,
            np.random.Generator,
            None,
        ],
        "verbose": ["boolean"],
        "validation_fraction": [Interval(Real, 0, 1, closed="left")],
        "checkpoint": [str, os.PathLike, None],
        "resume": ["boolean"],
    }

    def _check_params(self) -> np.dtype:
        """Validate the parameters; return the dtype."""
        self._validate_params()
        if self.max_iter + self.finetune_iter < 1:
            raise ValueError(
                "max_iter + finetune_iter must be >= 1 (an epoch to train), got "
                f"max_iter={self.max_iter} and finetune_iter={self.finetune_iter}"
            )
        self._check_model()
        if isinstance(self.dtype, type) and self.dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be 'float32' or 'float64', got {self.dtype!r}")
        if self.checkpoint is None and self.resume:
            raise ValueError("resume=True needs checkpoint=<path>, got checkpoint=None")
        if self.checkpoint is not None:
            directory = os.path.dirname(os.path.abspath(self.checkpoint))
            if not os.path.isdir(directory):
                raise ValueError(
                    f"checkpoint must be in an existing directory, got {self.checkpoint!r} "
                    f"({directory!r} does not exist)"
                )
        return np.dtype(self.dtype)

    # The model: each classifier's own parameters.

    def _check_model(self) -> None:
        """Check the model's parameters beyond their types (ValueError or TypeError)."""
        raise NotImplementedError

    def _network(
        self, n_features: int, n_classes: int, dtype: np.dtype, rng: np.random.Generator
    ) -> Sequential:
        """The untrained network of these parameters for ``n_features`` inputs."""
        raise NotImplementedError

    def _describe(self, n_features: int) -> str:
        """The settings that size the network, for error messages."""
        raise NotImplementedError

    def _model_extra(self, n_features: int) -> dict[str, Any]:
        """What a checkpoint records of the network beyond the parameters (none here)."""
        return {}

    def _flat(self, X: npt.ArrayLike, reset: bool) -> npt.ArrayLike:
        """``X`` as ``(n_samples, n_features)`` before validation (unchanged by default).

        ``reset`` is True in ``fit``, False in prediction.
        """
        return X

    def _samples(self, X: FloatArray) -> FloatArray:
        """Validated 2-D data as the network's samples, one per row (``X`` by default)."""
        return X

    def _entropy(self) -> int:
        """The seed of all random streams, as an int."""
        rs = self.random_state
        if rs is None:
            entropy = np.random.SeedSequence().entropy
            if not (isinstance(entropy, int)):
                raise RuntimeError("internal error: fresh entropy from the operating system")
            return int(entropy)
        if isinstance(rs, numbers.Integral) and not isinstance(rs, bool):
            if rs < 0:
                raise ValueError(f"random_state must be None or an int >= 0, got {rs}")
            return int(rs)
        if isinstance(rs, np.random.RandomState):  # scikit-learn convention
            return int(rs.randint(np.iinfo(np.int32).max))
        if isinstance(rs, np.random.Generator):
            return int(rs.integers(2**63 - 1))
        raise TypeError(
            f"random_state must be None, an int, a RandomState or a Generator, got {rs!r}"
        )

    def _run_params(self) -> dict[str, object]:
        """The parameters that determine the result, JSON-ready (saved in checkpoints)."""
        return {
            k: _json_value(v if k != "dtype" else np.dtype(v).name)
            for k, v in self.get_params(deep=False).items()
            if k not in _RUN_ONLY_PARAMS
        }

    # ------------------------------------------------------------------------ fit

    def fit(self: _C, X: npt.ArrayLike, y: npt.ArrayLike) -> _C:
        """Train the sparse network on ``(X, y)``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training data (finite).
        y : array-like of shape (n_samples,)
            Class labels (at least two classes).

        Returns
        -------
        self : object
            The fitted classifier.

        Raises
        ------
        cpusparse.training.state.NonFiniteError
            If a loss or a parameter becomes NaN or infinite; the message names
            the step (and the layer). The last checkpoint is left intact.
        """
        try:
            self._fit(X, y)
        except BaseException:
            # A failed (re)fit leaves the classifier unfitted, never answering from the
            # previous network with the new classes.
            for name in _FITTED_ATTRIBUTES:
                self.__dict__.pop(name, None)
            raise
        return self

    def _fit(self, X: npt.ArrayLike, y: npt.ArrayLike) -> None:
        """:meth:`fit`, which undoes a failed call."""
        for name in _FITTED_ATTRIBUTES:  # nothing of a previous fit carries over
            self.__dict__.pop(name, None)
        dtype = self._check_params()
        X, y_enc, classes = self._check_data(X, y, dtype)
        ckpt = None
        if self.resume and self.checkpoint is not None and os.path.exists(self.checkpoint):
            ckpt = load_checkpoint(self.checkpoint)
            entropy = self._check_resumable(ckpt, X, y_enc, classes)
        else:
            entropy = self._entropy()
        data = self._split_data(self._samples(X), y_enc, entropy)
        config = self._train_config(data.y_train.shape[0])
        if ckpt is None:
            init_rng, data_rng, mask_rng = spawn_streams(entropy)
            network = self._network(X.shape[1], classes.shape[0], dtype, init_rng)
            n_units = sum(network.n_units())
            if budget_units(self.density * n_units) < 1:
                raise ValueError(
                    f"density={self.density:g} keeps no unit of the {n_units} prunable units "
                    f"of this network ({self._describe(X.shape[1])}); the smallest density that "
                    f"keeps one unit is {1 / n_units:.3g}"
                )
            state = init_state(network, config, data_rng=data_rng, mask_rng=mask_rng)
            progress = _Progress("sparse", 0, [], None)
        else:
            state, progress = self._restore(ckpt, config)
        extra = {
            "estimator": type(self).__name__,
            "params": self._run_params(),
            "model": self._model_extra(X.shape[1]),
            "entropy": entropy,
            "fingerprint": _fingerprint(X, y_enc, classes),
        }
        with numba_threads(self.n_jobs):
            masks = self._train(state, config, data, progress, extra)
        history = progress.history
        self.classes_ = classes
        self.network_ = state.network
        self.masks_ = masks
        self.keep_prob_ = state.score.copy()
        self.n_active_ = int(sum(int(m.sum()) for m in masks))
        self.density_ = self.n_active_ / state.n_units_initial
        self.n_iter_ = len(history)
        self.history_ = history
        self.loss_curve_ = [record["loss"] for record in history]
        self._fitted(state)

    def _fitted(self, state: TrainState) -> None:
        """Set the classifier's own fitted attributes (none by default)."""

    def _check_data(
        self, X: npt.ArrayLike, y: npt.ArrayLike, dtype: np.dtype
    ) -> tuple[FloatArray, npt.NDArray[np.int64], np.ndarray]:
        """Validated ``X`` in ``dtype``, the encoded labels and the classes."""
        X, y = validate_data(self, self._flat(X, reset=True), y, dtype=[np.float64, np.float32])
        check_classification_targets(y)
        encoder = LabelEncoder()
        y_enc = encoder.fit_transform(y).astype(np.int64)
        classes = encoder.classes_
        if classes.shape[0] < 2:
            raise ValueError(
                f"{type(self).__name__} needs samples of at least 2 classes in the data, "
                f"but the data contains only one class: {classes[0]!r}"
            )
        return np.ascontiguousarray(X, dtype=dtype), y_enc, classes

    def _split_data(self, X: FloatArray, y_enc: npt.NDArray[np.int64], entropy: int) -> _Data:
        """Training data one sample per row, and feature-major validation data.

        Batches are copied from the rows of the training data (faster than gathering
        columns); validation uses ``validation_fraction``.
        """
        if self.validation_fraction > 0:
            train_idx, val_idx = self._split(y_enc, entropy)
            x_val, y_val = _feature_major(X[val_idx]), y_enc[val_idx]
            return _Data(np.ascontiguousarray(X[train_idx]), y_enc[train_idx], x_val, y_val)
        return _Data(np.ascontiguousarray(X), y_enc, None, None)

    def _train_config(self, n_train: int) -> TrainConfig:
        """The training step's options: a cosine schedule over both phases."""
        n_batches = -(-n_train // self.batch_size)
        extra = {
            name: getattr(self, param)
            for param, name in self._train_options.items()
            if param not in _TRAIN_OPTIONS
        }
        return TrainConfig(
            **extra,
            density=float(self.density),
            n_masks=int(self.n_masks),
            score_estimator=self.score_estimator,
            projection=self.projection,
            weight_grad=self.weight_grad,
            clip_norm=None if self.clip_norm is None else float(self.clip_norm),
            clip_scope=self.clip_scope,
            momentum=float(self.momentum),
            weight_decay=float(self.weight_decay),
            projection_tol=float(self.projection_tol),
            projection_max_iter=int(self.projection_max_iter),
            finetune_lr=None if self.finetune_lr is None else float(self.finetune_lr),
            optimizer=self.optimizer,
            lr=float(self.learning_rate_init),
            score_optimizer=self.score_optimizer,
            score_lr=float(self.score_learning_rate),
            schedule="cosine",
            total_steps=max(1, (self.max_iter + self.finetune_iter) * n_batches),
        )

    def _restore(self, ckpt: Checkpoint, config: TrainConfig) -> tuple[TrainState, _Progress]:
        """The state and progress of a checkpoint written by this fit."""
        where = f"checkpoint {os.fspath(self.checkpoint or '')!r}"
        state, saved_config = restore_state(ckpt)
        if saved_config != config:
            raise ValueError(
                f"{where} was written with another training configuration: "
                f"{saved_config} != {config}"
            )
        phase, epoch = ckpt["phase"], ckpt["epoch"]
        last = self.max_iter if phase == "sparse" else self.finetune_iter
        if not 0 <= epoch <= last:
            raise ValueError(
                f"{where} has epoch {epoch} of phase {phase!r}, expected an epoch in "
                f"[0, {last}] (max_iter={self.max_iter}, finetune_iter={self.finetune_iter})"
            )
        if phase == "finetune" and ckpt["masks"] is None:
            raise ValueError(f"{where} is in phase 'finetune' but holds no fixed masks")
        return state, _Progress(phase, epoch, ckpt["history"], ckpt["masks"])

    def _split(
        self, y_enc: npt.NDArray[np.int64], entropy: int
    ) -> tuple[npt.NDArray[np.int_], npt.NDArray[np.int_]]:
        # The fourth child of the seed: independent of the three training streams.
        split_rng = np.random.default_rng(np.random.SeedSequence(entropy).spawn(4)[3])
        seed = int(split_rng.integers(np.iinfo(np.int32).max))
        try:
            return train_test_split(
                np.arange(y_enc.shape[0]),
                test_size=self.validation_fraction,
                stratify=y_enc,
                random_state=seed,
            )
        except ValueError as exc:
            raise ValueError(
                f"validation_fraction={self.validation_fraction} cannot make a stratified "
                f"split of {y_enc.shape[0]} samples: {exc}"
            ) from exc

    def _check_resumable(
        self,
        ckpt: Checkpoint,
        X: FloatArray,
        y_enc: npt.NDArray[np.int64],
        classes: np.ndarray,
    ) -> int:
        """Check that ``ckpt`` was written by this fit; return its seed."""
        if not (self.checkpoint is not None):
            raise RuntimeError("internal error: ckpt was read from it")
        extra = ckpt["extra"]
        where = f"checkpoint {os.fspath(self.checkpoint)!r}"
        try:
            saved, entropy, fingerprint = extra["params"], extra["entropy"], extra["fingerprint"]
        except KeyError:
            raise ValueError(f"{where} was not written by {type(self).__name__}") from None
        writer = extra.get("estimator", type(self).__name__)
        if writer != type(self).__name__:
            raise ValueError(f"{where} was written by {writer}, not {type(self).__name__}")
        model = json.loads(json.dumps(self._model_extra(X.shape[1])))
        if extra.get("model", model) != model:
            raise ValueError(
                f"{where} was written for another network ({extra['model']} != {model})"
            )
        current = json.loads(json.dumps(self._run_params()))
        differ = sorted(k for k in set(saved) | set(current) if saved.get(k) != current.get(k))
        if differ:
            detail = ", ".join(f"{k}: {saved.get(k)!r} != {current.get(k)!r}" for k in differ)
            raise ValueError(f"{where} was written with other parameters ({detail})")
        rs = self.random_state
        if isinstance(rs, numbers.Integral) and not isinstance(rs, bool) and rs != entropy:
            raise ValueError(f"{where} was written with random_state={entropy}, got {rs}")
        if fingerprint != _fingerprint(X, y_enc, classes):
            raise ValueError(f"{where} was written for other training data")
        return entropy

    def _train(
        self,
        state: TrainState,
        config: TrainConfig,
        data: _Data,
        progress: _Progress,
        extra: dict[str, Any],
    ) -> list[BoolArray]:
        """Run the remaining epochs of both phases; return the fixed masks."""
        log = _EpochLog(self, state, config, data, progress, extra)
        try:
            # Overflow is detected explicitly (NonFiniteError), not through warnings.
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                if progress.phase == "sparse":
                    while progress.epoch < self.max_iter:
                        log.run_epoch(None)
                    progress.masks = self._final_masks(state, data)
                    progress.phase, progress.epoch = "finetune", 0
                while progress.epoch < self.finetune_iter:
                    log.run_epoch(progress.masks)
        finally:
            log.close()
        if progress.masks is None:
            raise RuntimeError("internal error: no fixed masks after the sparse phase")
        return progress.masks

    def _final_masks(self, state: TrainState, data: _Data) -> list[BoolArray]:
        """The fixed masks after sparse training, within the budget."""
        if self.fixed_mask in ("topk", "random"):
            return fixed_mask(state, self.fixed_mask, rng=state.mask_rng)
        if data.x_val is None or data.y_val is None:
            x, y = _feature_major(data.x_train), data.y_train
        else:
            x, y = data.x_val, data.y_val
        masks = fixed_mask(state, "best-of-n", x=x, y=y, rng=state.mask_rng)
        # A sampled mask may exceed the budget: keep its floor(k) units of largest score.
        flat = np.concatenate(masks)
        k = budget_units(state.budget)
        if flat.sum() > k:
            active = np.flatnonzero(flat)
            order = np.argsort(-state.score[active].astype(np.float64), kind="stable")
            flat = np.zeros_like(flat)
            flat[active[order[:k]]] = True
        o = state.offsets
        return [flat[o[i] : o[i + 1]].copy() for i in range(len(o) - 1)]

    # -------------------------------------------------------------------- predict

    def predict_proba(self, X: npt.ArrayLike) -> FloatArray:
        """Class probabilities of the network with the fixed masks.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            As in :meth:`fit`.

        Returns
        -------
        proba : ndarray of shape (n_samples, n_classes)
            Softmax of the logits, computed in float64; columns follow ``classes_``.
        """
        check_is_fitted(self, "network_")
        checked: np.ndarray = validate_data(
            self, self._flat(X, reset=False), reset=False, dtype=[np.float64, np.float32]
        )
        net = self.network_
        x = _feature_major(self._samples(checked.astype(net.dtype, copy=False)))
        with numba_threads(self.n_jobs):
            logits, _ = net.forward(x, self.masks_, mode=EVAL)
        return softmax(logits.astype(np.float64)).T

    def predict(self, X: npt.ArrayLike) -> np.ndarray:
        """Predicted class labels with the fixed masks.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            As in :meth:`fit`.

        Returns
        -------
        y : ndarray of shape (n_samples,)
        """
        proba = self.predict_proba(X)
        return self.classes_[np.argmax(proba, axis=1)]

    def layer_densities(self) -> list[LayerDensity]:
        """Per-layer report of the fixed masks.

        Returns
        -------
        report : list of dict
            One dict per layer with weights, in the order of the forward pass (the
            layers of residual blocks included): ``layer`` (its position in this
            list), ``name`` (its path in the network, the prefix of its parameters'
            names: ``"3.0.1"`` is layer 1 of branch 0 of block 3), ``type``, ``shape``
            (the weight's: ``(n_out, n_in)``, or ``(C_out, C_in, kh, kw)`` for a
            convolution), ``prunable``, ``n_units`` (units at initialisation: weights,
            neurons or channels; all the weights of a dense layer), ``active``
            (units kept by the mask) and ``density`` (``active / n_units``).
        """
        check_is_fitted(self, "network_")
        net = self.network_
        masks = {id(layer): m for layer, m in zip(net.prunable_layers(), self.masks_, strict=True)}
        report: list[LayerDensity] = []
        for name, layer in net.named_leaves():
            pattern = layer.stored_pattern()
            if pattern is None:  # no weights (activations, pools, batch norms)
                continue
            mask = masks.get(id(layer))
            if mask is not None:
                if not (layer.units is not None):
                    raise RuntimeError("internal error: a prunable layer has a unit map")
                n_units, active = layer.units.n_units_full, int(mask.sum())
            else:
                n_units = active = int(pattern.sum())
            weight = layer.params()["weight"]
            report.append(
                {
                    "layer": len(report),
                    "name": name,
                    "type": type(layer).__name__,
                    "shape": tuple(int(n) for n in _weight_shape(layer, weight)),
                    "prunable": mask is not None,
                    "n_units": n_units,
                    "active": active,
                    "density": active / n_units if n_units else 1.0,
                }
            )
        return report


class SparseMLPClassifier(_SparseClassifier):
    """Multi-layer perceptron classifier trained with sparse forward and backward passes."""

    # (The full docstring is _MLP_DOC with the shared parameters, set below the class.)

    def __init__(
        self,
        hidden_layer_sizes: int | Sequence[int] = (300, 100),
        density: float = 0.1,
        granularity: str = "weight",
        n_masks: int = 2,
        score_estimator: str = "vrpge",
        projection: str = "exact",
        max_iter: int = 30,
        finetune_iter: int = 10,
        fixed_mask: str = "topk",
        batch_size: int = 64,
        learning_rate_init: float = 0.01,
        score_learning_rate: float = 0.1,
        optimizer: str = "adam",
        score_optimizer: str = "adam",
        clip_norm: float | None = None,
        clip_scope: str = "weights",
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        projection_tol: float = 1e-3,
        projection_max_iter: int = 20,
        finetune_lr: float | None = None,
        sparse_classifier: bool = False,
        weight_grad: str = "mean",
        init: str = "kaiming",
        dtype: str | type[np.floating] = "float32",
        n_jobs: int | None = None,
        random_state: int | np.random.RandomState | np.random.Generator | None = None,
        verbose: bool = False,
        validation_fraction: float = 0.0,
        checkpoint: str | os.PathLike[str] | None = None,
        resume: bool = False,
    ) -> None:
        _set_params(self, locals())

    _parameter_constraints: dict[str, list[object]] = {
        **_SparseClassifier._parameter_constraints,
        "hidden_layer_sizes": ["array-like", Interval(Integral, 1, None, closed="left")],
        "granularity": [StrOptions(set(GRANULARITIES))],
        "sparse_classifier": ["boolean"],
        "init": [StrOptions(set(INITS))],
    }

    def _check_model(self) -> None:
        _check_hidden(self.hidden_layer_sizes)

    def _describe(self, n_features: int) -> str:
        return (
            f"n_features = {n_features}, hidden_layer_sizes = "
            f"{_check_hidden(self.hidden_layer_sizes)}, granularity={self.granularity!r}"
        )

    def _network(
        self, n_features: int, n_classes: int, dtype: np.dtype, rng: np.random.Generator
    ) -> Sequential:
        """The untrained network of these parameters (:func:`~cpusparse.models.mlp`)."""
        return mlp(
            n_features,
            _check_hidden(self.hidden_layer_sizes),
            n_classes,
            granularity=self.granularity,
            sparse_classifier=bool(self.sparse_classifier),
            init=self.init,
            density=float(self.density),
            dtype=dtype,
            rng=rng,
        )


class SparseCNNClassifier(_SparseClassifier):
    """Convolutional classifier (VGG or ResNet) trained with channel-sparse passes."""

    # (The full docstring is _CNN_DOC with the shared parameters, set below the class.)

    def __init__(
        self,
        architecture: str = "vgg",
        widths: Sequence[int] = (16, 32, 64),
        input_shape: tuple[int, int, int] | None = None,
        density: float = 0.25,
        granularity: str = "channel",
        prune_first: bool = True,
        norm_updates: str = "once",
        n_masks: int = 2,
        score_estimator: str = "vrpge",
        projection: str = "exact",
        max_iter: int = 12,
        finetune_iter: int = 3,
        fixed_mask: str = "topk",
        batch_size: int = 64,
        learning_rate_init: float = 0.01,
        score_learning_rate: float = 0.05,
        optimizer: str = "adam",
        score_optimizer: str = "adam",
        clip_norm: float | None = None,
        clip_scope: str = "weights",
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        projection_tol: float = 1e-3,
        projection_max_iter: int = 20,
        finetune_lr: float | None = None,
        weight_grad: str = "mean",
        dtype: str | type[np.floating] = "float32",
        n_jobs: int | None = None,
        random_state: int | np.random.RandomState | np.random.Generator | None = None,
        verbose: bool = False,
        validation_fraction: float = 0.0,
        checkpoint: str | os.PathLike[str] | None = None,
        resume: bool = False,
    ) -> None:
        _set_params(self, locals())

    _train_options = {**_TRAIN_OPTIONS, "norm_updates": "norm_updates"}
    _parameter_constraints: dict[str, list[object]] = {
        **_SparseClassifier._parameter_constraints,
        **_table_constraints({"norm_updates": "norm_updates"}),
        "architecture": [StrOptions(set(ARCHITECTURES))],
        "widths": ["array-like"],
        "input_shape": ["array-like", None],
        "granularity": [StrOptions(set(CONV_GRANULARITIES))],
        "prune_first": ["boolean"],
    }

    def _check_model(self) -> None:
        _check_widths(self.widths)
        _check_input_shape(self.input_shape)

    def _image_shape(self, n_features: int) -> tuple[int, int, int]:
        """One sample's ``(C, H, W)``: ``input_shape``, the data's, or inferred."""
        given = _check_input_shape(self.input_shape)
        seen = getattr(self, "_fit_shape", None)
        if given is None:
            given = seen
        if given is not None:
            if int(np.prod(given)) != n_features:
                raise ValueError(
                    f"input_shape {given} has {int(np.prod(given))} values, but the data "
                    f"has n_features = {n_features}"
                )
            return given
        return infer_input_shape(n_features, len(_check_widths(self.widths)))

    def _describe(self, n_features: int) -> str:
        return (
            f"{self.architecture} with widths {_check_widths(self.widths)} on inputs "
            f"{self._image_shape(n_features)}, granularity={self.granularity!r}"
        )

    def _network(
        self, n_features: int, n_classes: int, dtype: np.dtype, rng: np.random.Generator
    ) -> Sequential:
        """The untrained network (:func:`~cpusparse.models.vgg` or ``resnet``)."""
        build = vgg if self.architecture == "vgg" else resnet
        return build(
            _check_widths(self.widths),
            self._image_shape(n_features),
            n_classes,
            granularity=self.granularity,
            prune_first=bool(self.prune_first),
            density=float(self.density),
            dtype=dtype,
            rng=rng,
        )

    def _flat(self, X: npt.ArrayLike, reset: bool) -> npt.ArrayLike:
        """Image batches ``(n, C, H, W)`` as ``(n, C*H*W)`` (C, H, W in PyTorch's order)."""
        ndim = np.ndim(X) if isinstance(X, list | tuple) else getattr(X, "ndim", None)
        if ndim != 4:
            if reset:
                self._fit_shape = None
            return X
        images = np.asarray(X)
        shape = tuple(int(v) for v in images.shape[1:])
        if reset:
            given = _check_input_shape(self.input_shape)
            if given is not None and shape != given:
                raise ValueError(f"X has images of shape {shape}, but input_shape is {given}")
            self._fit_shape = shape
        else:
            fitted = getattr(self, "input_shape_", None)
            if fitted is not None and shape != fitted:
                raise ValueError(
                    f"X has images of shape {shape}, but the classifier was fitted on "
                    f"images of shape {fitted}"
                )
        return images.reshape(images.shape[0], -1)

    def _model_extra(self, n_features: int) -> dict[str, Any]:
        """The input shape the network is built for (flat data does not show it)."""
        return {"input_shape": list(self._image_shape(n_features))}

    def _samples(self, X: FloatArray) -> FloatArray:
        """``(n, C, H, W)`` views of the validated rows (the fitted shape after fit)."""
        shape = getattr(self, "input_shape_", None) or self._image_shape(X.shape[1])
        return X.reshape(X.shape[0], *shape)

    def _fitted(self, state: TrainState) -> None:
        self.input_shape_ = self._image_shape(self.n_features_in_)
        self.__dict__.pop("_fit_shape", None)


SparseMLPClassifier.__doc__ = _doc(SparseMLPClassifier, _MLP_DOC)
SparseCNNClassifier.__doc__ = _doc(SparseCNNClassifier, _CNN_DOC)


def _fingerprint(X: FloatArray, y_enc: npt.NDArray[np.int64], classes: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(repr((X.shape, X.dtype.str, classes.tolist())).encode())
    h.update(np.ascontiguousarray(X).tobytes())
    h.update(np.ascontiguousarray(y_enc).tobytes())
    return h.hexdigest()


def _progress_bar(verbose: bool, total: int, initial: int) -> tqdm | None:
    if not verbose:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, file=sys.stderr, unit="step", dynamic_ncols=True)


_FITTED_ATTRIBUTES = (
    "classes_",
    "n_features_in_",
    "feature_names_in_",
    "network_",
    "masks_",
    "keep_prob_",
    "n_active_",
    "density_",
    "n_iter_",
    "history_",
    "loss_curve_",
    "input_shape_",
    "_fit_shape",
)


class _Data(NamedTuple):
    """Training data, one sample per row, and the optional feature-major validation part."""

    x_train: FloatArray
    y_train: npt.NDArray[np.int64]
    x_val: FloatArray | None
    y_val: npt.NDArray[np.int64] | None


@dataclasses.dataclass
class _Progress:
    """Where a fit stands: the phase, the epochs done in it, the history, the fixed masks."""

    phase: str
    epoch: int
    history: list[dict[str, Any]]
    masks: list[BoolArray] | None


class _EpochLog:
    """Runs one epoch at a time: history record, checkpoint and progress bar."""

    def __init__(
        self,
        clf: _SparseClassifier,
        state: TrainState,
        config: TrainConfig,
        data: _Data,
        progress: _Progress,
        extra: dict[str, Any],
    ) -> None:
        self.clf, self.state, self.config = clf, state, config
        self.data, self.progress, self.extra = data, progress, extra
        self.n_batches = -(-data.y_train.shape[0] // clf.batch_size)
        done = progress.epoch if progress.phase == "sparse" else clf.max_iter + progress.epoch
        total = (clf.max_iter + clf.finetune_iter) * self.n_batches
        self.bar = _progress_bar(clf.verbose, total, done * self.n_batches)
        self.running: list[float] = []
        # The bar reports accuracy on validation data, else on a slice of the training data.
        if data.x_val is not None and data.y_val is not None:
            self.eval_data = (data.x_val, data.y_val)
        else:
            n = _PROGRESS_EVAL_SAMPLES
            self.eval_data = (_feature_major(data.x_train[:n]), data.y_train[:n])

    def on_step(self, _state: TrainState, loss: float) -> None:
        self.running.append(loss)
        if self.bar is not None:
            self.bar.update(1)
            if len(self.running) % 5 == 0:
                mean = np.mean(self.running[-self.n_batches :])
                self.bar.set_postfix(loss=f"{mean:.4f}", refresh=False)

    def run_epoch(self, masks: list[BoolArray] | None) -> None:
        """One epoch of the current phase (fine-tuning on ``masks`` if given)."""
        clf, state, progress = self.clf, self.state, self.progress
        t0 = time.perf_counter()
        stats = run_epoch(
            state,
            self.data.x_train,
            self.data.y_train,
            self.config,
            batch_size=clf.batch_size,
            masks=masks,
            on_step=self.on_step,
            samples_first=True,
        )
        progress.epoch += 1
        check_parameters_finite(state)
        record: dict[str, Any] = {
            "phase": progress.phase,
            "epoch": progress.epoch,
            "loss": stats.loss,
        }
        eval_masks = masks
        if eval_masks is None and (self.data.x_val is not None or self.bar is not None):
            eval_masks = fixed_mask(state)  # what the network would be now
        accuracy = None
        if eval_masks is not None and (self.data.x_val is not None or self.bar is not None):
            accuracy = evaluate(state.network, *self.eval_data, eval_masks)[1]
        if self.data.x_val is not None:
            record["val_accuracy"] = accuracy
        record["expected_density"] = expected_density(state)
        record["realised_density"] = stats.realised_density
        record["grad_variance"] = stats.grad_variance
        record["seconds"] = time.perf_counter() - t0
        progress.history.append(record)
        if clf.checkpoint is not None:
            save_checkpoint(
                clf.checkpoint,
                state,
                self.config,
                epoch=progress.epoch,
                phase=progress.phase,
                history=progress.history,
                masks=masks,
                extra=self.extra,
            )
        if self.bar is not None:
            sparse = progress.phase == "sparse"
            density = record["expected_density"] if sparse else stats.realised_density
            self.bar.set_postfix(
                {
                    "phase": progress.phase,
                    "loss": f"{stats.loss:.4f}",
                    "val_acc" if self.data.x_val is not None else "train_acc": f"{accuracy:.3f}",
                    "density": f"{density:.4f}",
                }
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
