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
import json
import numbers
import os
import sys
import time
from collections.abc import Sequence
from numbers import Integral, Real
from typing import TYPE_CHECKING, Any, NamedTuple, TypedDict

import numpy as np
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import LabelEncoder
from sklearn.utils._param_validation import Interval, StrOptions
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data

from ._threads import numba_threads
from ._typing import BoolArray, FloatArray
from .engine.layers.base import EVAL
from .engine.layers.linear import GRANULARITIES, INITS
from .engine.losses import softmax
from .models import mlp
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

    from .engine.containers import Sequential
    from .training.checkpoint import Checkpoint
    from .training.state import TrainState

__all__ = ["SparseMLPClassifier"]

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


def _table_constraints() -> dict[str, list[object]]:
    table = {option.name: option for option in _config.options()}
    return {
        param: _sklearn_constraint(table[name].constraint) for param, name in _TRAIN_OPTIONS.items()
    }


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


def _json_value(value: object) -> object:
    if isinstance(value, tuple):
        return [_json_value(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


class LayerDensity(TypedDict):
    """One record of :meth:`SparseMLPClassifier.layer_densities` (see there)."""

    layer: int
    type: str
    shape: tuple[int, int]
    prunable: bool
    n_units: int
    active: int
    density: float


class SparseMLPClassifier(ClassifierMixin, BaseEstimator):
    r"""Multi-layer perceptron classifier trained with sparse forward and backward passes.

    Training solves

    .. math::

        \min_{w,\ s}\ \mathbb{E}_{m \sim \text{Bernoulli}(s)}\, L(w \odot m)
        \quad \text{s.t.} \quad 0 \le s \le 1,\ \ \textstyle\sum_i s_i \le k
        = \text{density} \times n

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
    density : float in (0, 1], default=0.1
        Kept fraction of the prunable units (the budget).
    granularity : {"weight", "neuron"}, default="weight"
        One mask bit per stored weight, or per hidden unit.
    n_masks : int >= 2, default=2
        Number :math:`K` of sampled masks (forward passes) per step.
    score_estimator : {"vrpge", "vrpge-sqrt", "reinforce", "straight-through"}, default="vrpge"
        Gradient estimator of the keep probabilities (see
        :class:`~cpusparse.training.config.TrainConfig`).
    projection : {"exact", "bisection"}, default="exact"
        Solver of the projection onto the budget set.
    max_iter : int >= 1, default=30
        Epochs of sparse training (weights and scores).
    finetune_iter : int >= 0, default=10
        Epochs of weight training on the fixed mask; 0 skips fine-tuning.
    fixed_mask : {"topk", "best-of-n"}, default="topk"
        How the final mask is chosen (:func:`~cpusparse.training.loop.fixed_mask`):
        the ``floor(k)`` largest scores, or the most accurate of 10 sampled masks
        on the validation part (the training data without one). A sampled mask
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
    sparse_classifier : bool, default=False
        Make the output layer sparse (and prunable) too.
    weight_grad : {"mean", "first"}, default="mean"
        Average the weight gradient over the K passes, or use the first only.
    init : {"kaiming", "uniform"}, default="kaiming"
        Weight initialisation; the fan-in counts only the inputs expected to be
        kept at ``density`` (see :func:`~cpusparse.models.mlp`).
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

    Attributes
    ----------
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

    See Also
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
    >>> clf.layer_densities()[0]
    {'layer': 0, 'type': 'SparseLinear', 'shape': (64, 64), 'prunable': True, 'n_units': 4096, 'active': 819, 'density': 0.1999...}
    >>> [record["phase"] for record in clf.history_][-3:]
    ['sparse', 'finetune', 'finetune']
    """  # noqa: E501

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
        self.hidden_layer_sizes = hidden_layer_sizes
        self.density = density
        self.granularity = granularity
        self.n_masks = n_masks
        self.score_estimator = score_estimator
        self.projection = projection
        self.max_iter = max_iter
        self.finetune_iter = finetune_iter
        self.fixed_mask = fixed_mask
        self.batch_size = batch_size
        self.learning_rate_init = learning_rate_init
        self.score_learning_rate = score_learning_rate
        self.optimizer = optimizer
        self.score_optimizer = score_optimizer
        self.clip_norm = clip_norm
        self.clip_scope = clip_scope
        self.momentum = momentum
        self.weight_decay = weight_decay
        self.projection_tol = projection_tol
        self.projection_max_iter = projection_max_iter
        self.finetune_lr = finetune_lr
        self.sparse_classifier = sparse_classifier
        self.weight_grad = weight_grad
        self.init = init
        self.dtype = dtype
        self.n_jobs = n_jobs
        self.random_state = random_state
        self.verbose = verbose
        self.validation_fraction = validation_fraction
        self.checkpoint = checkpoint
        self.resume = resume

    # ------------------------------------------------------------------ validation

    _parameter_constraints: dict[str, list[object]] = {
        **_table_constraints(),
        "hidden_layer_sizes": ["array-like", Interval(Integral, 1, None, closed="left")],
        "granularity": [StrOptions(set(GRANULARITIES))],
        "max_iter": [Interval(Integral, 1, None, closed="left")],
        "finetune_iter": [Interval(Integral, 0, None, closed="left")],
        "fixed_mask": [StrOptions({"topk", "best-of-n"})],
        "batch_size": [Interval(Integral, 1, None, closed="left")],
        "sparse_classifier": ["boolean"],
        "init": [StrOptions(set(INITS))],
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

    def _check_params(self) -> tuple[tuple[int, ...], np.dtype]:
        """Validate the parameters; return the hidden sizes and the dtype."""
        self._validate_params()
        hidden = _check_hidden(self.hidden_layer_sizes)
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
        return hidden, np.dtype(self.dtype)

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

    def fit(self, X: npt.ArrayLike, y: npt.ArrayLike) -> SparseMLPClassifier:
        """Train the sparse network on ``(X, y)``.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)
            Training data (finite).
        y : array-like of shape (n_samples,)
            Class labels (at least two classes).

        Returns
        -------
        self : SparseMLPClassifier
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
        hidden, dtype = self._check_params()
        X, y_enc, classes = self._check_data(X, y, dtype)
        ckpt = None
        if self.resume and self.checkpoint is not None and os.path.exists(self.checkpoint):
            ckpt = load_checkpoint(self.checkpoint)
            entropy = self._check_resumable(ckpt, X, y_enc, classes)
        else:
            entropy = self._entropy()
        data = self._split_data(X, y_enc, entropy)
        config = self._train_config(data.y_train.shape[0])
        if ckpt is None:
            init_rng, data_rng, mask_rng = spawn_streams(entropy)
            network = self._network(X.shape[1], hidden, classes.shape[0], dtype, init_rng)
            n_units = sum(network.n_units())
            if budget_units(self.density * n_units) < 1:
                raise ValueError(
                    f"density={self.density:g} keeps no unit of the {n_units} prunable units "
                    f"of this network (n_features = {X.shape[1]}, hidden_layer_sizes = "
                    f"{hidden}, granularity={self.granularity!r}); the smallest density that "
                    f"keeps one unit is {1 / n_units:.3g}"
                )
            state = init_state(network, config, data_rng=data_rng, mask_rng=mask_rng)
            progress = _Progress("sparse", 0, [], None)
        else:
            state, progress = self._restore(ckpt, config)
        extra = {
            "params": self._run_params(),
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

    def _check_data(
        self, X: npt.ArrayLike, y: npt.ArrayLike, dtype: np.dtype
    ) -> tuple[FloatArray, npt.NDArray[np.int64], np.ndarray]:
        """Validated ``X`` in ``dtype``, the encoded labels and the classes."""
        X, y = validate_data(self, X, y, dtype=[np.float64, np.float32])
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
            x_val, y_val = np.ascontiguousarray(X[val_idx].T), y_enc[val_idx]
            return _Data(np.ascontiguousarray(X[train_idx]), y_enc[train_idx], x_val, y_val)
        return _Data(np.ascontiguousarray(X), y_enc, None, None)

    def _network(
        self,
        n_features: int,
        hidden: tuple[int, ...],
        n_classes: int,
        dtype: np.dtype,
        rng: np.random.Generator,
    ) -> Sequential:
        """The untrained network of these parameters (:func:`~cpusparse.models.mlp`)."""
        return mlp(
            n_features,
            hidden,
            n_classes,
            granularity=self.granularity,
            sparse_classifier=bool(self.sparse_classifier),
            init=self.init,
            density=float(self.density),
            dtype=dtype,
            rng=rng,
        )

    def _train_config(self, n_train: int) -> TrainConfig:
        """The training step's options: a cosine schedule over both phases."""
        n_batches = -(-n_train // self.batch_size)
        return TrainConfig(
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
            raise ValueError(f"{where} was not written by SparseMLPClassifier") from None
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
        if self.fixed_mask == "topk":
            return fixed_mask(state, "topk")
        if data.x_val is None or data.y_val is None:
            x, y = np.ascontiguousarray(data.x_train.T), data.y_train
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

        Returns
        -------
        proba : ndarray of shape (n_samples, n_classes)
            Softmax of the logits, computed in float64; columns follow ``classes_``.
        """
        check_is_fitted(self, "network_")
        checked: np.ndarray = validate_data(self, X, reset=False, dtype=[np.float64, np.float32])
        net = self.network_
        x = np.ascontiguousarray(checked.T, dtype=net.dtype)
        with numba_threads(self.n_jobs):
            logits, _ = net.forward(x, self.masks_, mode=EVAL)
        return softmax(logits.astype(np.float64)).T

    def predict(self, X: npt.ArrayLike) -> np.ndarray:
        """Predicted class labels with the fixed masks.

        Parameters
        ----------
        X : array-like of shape (n_samples, n_features)

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
            One dict per layer with parameters: ``layer`` (index in the network),
            ``type``, ``shape`` ``(n_out, n_in)``, ``prunable``, ``n_units`` (units at
            initialisation: ``n_out * n_in`` weights, or ``n_out`` neurons; all the
            weights of a dense layer), ``active`` (units kept by the mask) and
            ``density`` (``active / n_units``).
        """
        check_is_fitted(self, "network_")
        net = self.network_
        masks = dict(zip(net.prunable, self.masks_, strict=True))
        report: list[LayerDensity] = []
        for i, layer in enumerate(net.layers):
            if not layer.params():
                continue
            n_out, n_in = layer.n_out, layer.n_in
            if not (n_out is not None and n_in is not None):
                raise RuntimeError("internal error: the layers of mlp() have sizes")
            if i in masks:
                if not (layer.units is not None):
                    raise RuntimeError("internal error: a prunable layer has a unit map")
                n_units = layer.units.n_units_full
                active = int(masks[i].sum())
            else:
                pattern = layer.stored_pattern()
                n_units = active = int(pattern.sum()) if pattern is not None else 0
            report.append(
                {
                    "layer": i,
                    "type": type(layer).__name__,
                    "shape": (int(n_out), int(n_in)),
                    "prunable": i in masks,
                    "n_units": n_units,
                    "active": active,
                    "density": active / n_units if n_units else 1.0,
                }
            )
        return report


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
        clf: SparseMLPClassifier,
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
            self.eval_data = (np.ascontiguousarray(data.x_train[:n].T), data.y_train[:n])

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
