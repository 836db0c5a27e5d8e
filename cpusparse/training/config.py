r"""The training options: one table, from which every front end is derived.

:class:`TrainConfig` is the only place where an option of the training step, its
default, its allowed values and its help text are written. The command line
(``cpusparse train`` and ``cpusparse trace``), the validation of
:class:`~cpusparse.SparseMLPClassifier` and the metadata of golden traces all read
:func:`options`. A front end that wants another default (the classifier trains with a
cosine schedule, traces with larger learning rates) says so in one dict of overrides;
it never restates an allowed value or a help text.

Each field's metadata holds an :class:`Option`: its constraint (:class:`Choice`,
:class:`Real`, :class:`Int`, :class:`Bool`), which validates a value and describes
what is allowed, and its help text.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from collections.abc import Callable
from typing import Any, TypeVar

from ..method.estimators import SCORE_ESTIMATORS
from ..method.masks import DRAWS as MASK_DRAWS
from ..method.projection import METHODS as PROJECTIONS
from .optim import SGD, Adam, constant_schedule, cosine_schedule

__all__ = [
    "TrainConfig",
    "Option",
    "Choice",
    "Real",
    "Int",
    "Bool",
    "options",
    "OPTIMIZERS",
    "SCHEDULES",
    "WEIGHT_GRADS",
    "CLIP_SCOPES",
    "PRESETS",
    "preset",
]

OPTIMIZERS = ("adam", "sgd")
SCHEDULES = ("constant", "cosine")
WEIGHT_GRADS = ("mean", "first")
NORM_UPDATES = ("once", "every_pass")
CLIP_SCOPES = ("weights", "weights+scores")

_T = TypeVar("_T")


# ---------------------------------------------------------------------------
# Constraints
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Choice:
    """One of a fixed set of strings."""

    values: tuple[str, ...]

    def check(self, value: object, name: str) -> str:
        """Return ``value`` if allowed, else raise ``ValueError`` naming ``name``."""
        if not isinstance(value, str) or value not in self.values:
            raise ValueError(f"{name} must be {self.describe()}, got {value!r}")
        return value

    def describe(self) -> str:
        """What is allowed, in words."""
        return "one of " + ", ".join(map(repr, self.values))


@dataclasses.dataclass(frozen=True)
class Real:
    """A finite real number in an interval, or None when ``none`` is True.

    ``closed`` is ``"left"``, ``"right"``, ``"both"`` or ``"neither"``, as in
    scikit-learn's ``Interval``.
    """

    low: float | None = None
    high: float | None = None
    closed: str = "both"
    none: bool = False

    def check(self, value: object, name: str) -> float | None:
        """Return ``value`` as a float if allowed, else raise naming ``name``."""
        if value is None and self.none:
            return None
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise TypeError(f"{name} must be {self.describe()}, got {value!r}")
        value = float(value)
        low_ok = self.low is None or (
            value >= self.low if self.closed in ("left", "both") else value > self.low
        )
        high_ok = self.high is None or (
            value <= self.high if self.closed in ("right", "both") else value < self.high
        )
        if not (math.isfinite(value) and low_ok and high_ok):
            raise ValueError(f"{name} must be {self.describe()}, got {value!r}")
        return value

    def describe(self) -> str:
        """What is allowed, in words: "a finite number in (0, 1]" and the like."""
        if self.low is None and self.high is None:
            text = "a finite number"
        elif self.high is None:
            text = (
                f"a finite number {'>=' if self.closed in ('left', 'both') else '>'} {self.low:g}"
            )
        elif self.low is None:
            text = (
                f"a finite number {'<=' if self.closed in ('right', 'both') else '<'} {self.high:g}"
            )
        else:
            left = "[" if self.closed in ("left", "both") else "("
            right = "]" if self.closed in ("right", "both") else ")"
            text = f"a number in {left}{self.low:g}, {self.high:g}{right}"
        return text + (" or None" if self.none else "")


@dataclasses.dataclass(frozen=True)
class Int:
    """An int ``>= low`` (and ``<= high`` if given)."""

    low: int = 0
    high: int | None = None

    def check(self, value: object, name: str) -> int:
        """Return ``value`` as an int if allowed, else raise naming ``name``."""
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise TypeError(f"{name} must be {self.describe()}, got {value!r}")
        if value < self.low or (self.high is not None and int(value) > self.high):
            raise ValueError(f"{name} must be {self.describe()}, got {value!r}")
        return int(value)

    def describe(self) -> str:
        """What is allowed, in words."""
        if self.high is None:
            return f"an int >= {self.low}"
        return f"an int in [{self.low}, {self.high}]"


@dataclasses.dataclass(frozen=True)
class Bool:
    """True or False."""

    def check(self, value: object, name: str) -> bool:
        """Return ``value`` if it is a bool, else raise naming ``name``."""
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")
        return value

    def describe(self) -> str:
        """What is allowed, in words."""
        return "True or False"


@dataclasses.dataclass(frozen=True)
class Option:
    """One row of the option table.

    Attributes
    ----------
    name : str
        The :class:`TrainConfig` field (and the keyword everywhere).
    default : object
    constraint : Choice, Real, Int or Bool
    help : str
        One line for ``--help`` and the documentation.
    """

    name: str
    default: Any
    constraint: Choice | Real | Int | Bool
    help: str

    @property
    def flag(self) -> str:
        """The command-line flag, ``--score-lr`` for ``score_lr``."""
        return "--" + self.name.replace("_", "-")


def _option(default: _T, constraint: Choice | Real | Int | Bool, help: str) -> _T:
    return dataclasses.field(default=default, metadata={"constraint": constraint, "help": help})


# ---------------------------------------------------------------------------
# The table
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    r"""Hyperparameters of sparse training (the option table).

    Every field is validated on construction; :func:`options` lists them with their
    constraints and help texts.

    Parameters
    ----------
    density : float in (0, 1], default=0.1
        Kept fraction of the prunable units; the budget is ``k = density * n``.
    n_masks : int >= 2, default=2
        Number :math:`K` of masks (forward passes) per step.
    mask_draw : {"philox", "numpy"}, default="philox"
        How the uniforms of the masks are drawn (:func:`~cpusparse.method.sample_masks`):
        Philox4x32-10 keyed by one 64-bit draw per step, computed in parallel without
        storing them, or one bulk ``rng.random((K, n))`` draw (cpusparse 0.1 and 0.2,
        trace format versions 1 and 2, which replay bit for bit with it).
    score_estimator : str, default="vrpge"
        Score-gradient estimator, a name of
        :data:`~cpusparse.method.estimators.SCORE_ESTIMATORS`: ``"vrpge"`` (the
        paper's), ``"vrpge-sqrt"`` (the authors' code, score scaled by
        :math:`\sqrt{s(1-s)}`), ``"reinforce"`` (the plain policy gradient) or
        ``"straight-through"`` (the chain-rule baseline that needs a dense forward
        and backward through the mask).
    projection : {"exact", "bisection"}, default="exact"
        Solver of :func:`~cpusparse.method.projection.project_scores`.
    projection_tol, projection_max_iter : float, int, default=1e-3, 20
        Bisection stopping rule: stop when ``|sum clip(s - v, 0, 1) - k| < tol`` or
        after ``projection_max_iter`` evaluations (the authors' code uses a tolerance of
        1e-3 and up to 21 evaluations; see :data:`PRESETS`).
    weight_grad : {"mean", "first"}, default="mean"
        Average the weight gradient over the K passes, or use the first pass only
        (saves K - 1 backward passes). The straight-through estimator needs every
        pass's backward for its score gradient, so it always averages over K.
    clip_norm : float > 0 or None, default=None
        Clip the global norm of the gradients named by ``clip_scope``.
    clip_scope : {"weights", "weights+scores"}, default="weights"
        What ``clip_norm`` clips: the weight (and bias) gradients, or those and the
        score gradient together in one global norm, as the authors' code does.
    optimizer, lr, momentum, nesterov, weight_decay
        Weight optimizer: ``"adam"`` or ``"sgd"`` (with momentum and Nesterov);
        ``lr`` is the initial learning rate; ``weight_decay`` is an L2 penalty on
        the weights and biases (never on the scores).
    score_optimizer, score_lr, score_momentum
        Score optimizer (separate from the weights', without weight decay).
    schedule : {"constant", "cosine"}, default="constant"
        Learning-rate schedule of both optimizers over ``total_steps``; a cosine
        schedule stays at its minimum (0) after ``total_steps``, so count the
        fine-tuning steps in ``total_steps`` too.
    total_steps : int >= 1, default=1
    finetune_lr : float > 0 or None, default=None
        Constant learning rate of the weights in fine-tuning on a fixed mask
        (:func:`~cpusparse.training.step.finetune_step`); None continues the
        schedule of the sparse phase. The authors' code fine-tunes at 1e-3 (with
        the same SGD settings, but a fresh momentum buffer: here the optimizer's
        state carries on).
    initial_score : float in [0, 1] or None, default=None
        Initial keep probability of every unit; None uses ``density``.
    compact_every, compact_fraction : int, float, default=1, 0.25
        Every ``compact_every`` steps (0: never), if at least ``compact_fraction``
        of the stored weights of the prunable layers belong to units that can never
        be sampled again, drop them from the stored pattern and the optimizer state
        (:func:`~cpusparse.training.compaction.compact`). Scores collapse fast, so
        checking every step keeps the cost following the live units; the check is
        one pass over the scores.
    norm_updates : {"once", "every_pass"}, default="once"
        How the K forward passes of a step update batch-norm running statistics:
        once, from the batch statistics of the first pass (the running statistics
        then follow one sampled sub-network per step, as evaluation will), or once
        per pass, K updates per step, as the authors' code does by running its K
        passes in train mode.
    """

    density: float = _option(0.1, Real(0.0, 1.0, "right"), "kept fraction of the prunable units")
    n_masks: int = _option(2, Int(2), "K: masks (forward passes) per step")
    mask_draw: str = _option(
        "philox",
        Choice(MASK_DRAWS),
        "uniforms of the masks: philox (counter-based, parallel) or numpy (one bulk "
        "rng.random draw, as in trace format versions 1 and 2)",
    )
    score_estimator: str = _option(
        "vrpge", Choice(tuple(SCORE_ESTIMATORS)), "score-gradient estimator"
    )
    projection: str = _option("exact", Choice(PROJECTIONS), "projection onto the budget set")
    projection_tol: float = _option(
        1e-3,
        Real(0.0, None, "neither"),
        "bisection: stop when |sum of projected scores - budget| < tol",
    )
    projection_max_iter: int = _option(
        20, Int(1), "bisection: evaluations of the threshold at most"
    )
    weight_grad: str = _option(
        "mean", Choice(WEIGHT_GRADS), "weight gradient: mean over the K passes, or the first"
    )
    clip_norm: float | None = _option(
        None,
        Real(0.0, None, "neither", none=True),
        "clip the global norm of the gradients (see clip_scope)",
    )
    clip_scope: str = _option(
        "weights", Choice(CLIP_SCOPES), "what clip_norm clips: weights, or weights and scores"
    )
    optimizer: str = _option("adam", Choice(OPTIMIZERS), "weight optimizer")
    lr: float = _option(1e-3, Real(0.0, None, "neither"), "initial weight learning rate")
    momentum: float = _option(0.9, Real(0.0, 1.0, "left"), "SGD momentum of the weights")
    nesterov: bool = _option(False, Bool(), "Nesterov momentum (SGD) for the weights")
    weight_decay: float = _option(0.0, Real(0.0, None), "L2 penalty on weights and biases")
    score_optimizer: str = _option("adam", Choice(OPTIMIZERS), "score optimizer")
    score_lr: float = _option(1e-2, Real(0.0, None, "neither"), "initial score learning rate")
    score_momentum: float = _option(0.9, Real(0.0, 1.0, "left"), "SGD momentum of the scores")
    schedule: str = _option("constant", Choice(SCHEDULES), "learning-rate schedule")
    total_steps: int = _option(1, Int(1), "steps of the schedule")
    finetune_lr: float | None = _option(
        None,
        Real(0.0, None, "neither", none=True),
        "constant weight learning rate on the fixed mask (None: the schedule goes on)",
    )
    initial_score: float | None = _option(
        None, Real(0.0, 1.0, none=True), "initial keep probability (None: the density)"
    )
    compact_every: int = _option(1, Int(0), "check for dead units every N steps (0: never)")
    compact_fraction: float = _option(
        0.25, Real(0.0, 1.0), "compact when this fraction of stored weights is dead"
    )
    norm_updates: str = _option(
        "once",
        Choice(NORM_UPDATES),
        "batch-norm running statistics: updated once per step (from the first pass) or "
        "by every one of the K passes (the authors' code)",
    )

    def __post_init__(self) -> None:
        for option in options():
            value = option.constraint.check(getattr(self, option.name), option.name)
            object.__setattr__(self, option.name, value)
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise ValueError(
                "nesterov=True needs optimizer='sgd' and momentum > 0, got "
                f"optimizer={self.optimizer!r} and momentum={self.momentum:g}"
            )

    def optimizers(
        self,
    ) -> tuple[SGD | Adam, SGD | Adam, tuple[Callable[[int], float], Callable[[int], float]]]:
        """The weight and score optimizers and their learning-rate schedules."""
        weights: SGD | Adam
        scores: SGD | Adam
        if self.optimizer == "sgd":
            weights = SGD(
                self.lr,
                momentum=self.momentum,
                nesterov=self.nesterov,
                weight_decay=self.weight_decay,
            )
        else:
            weights = Adam(self.lr, weight_decay=self.weight_decay)
        if self.score_optimizer == "sgd":
            scores = SGD(self.score_lr, momentum=self.score_momentum)
        else:
            scores = Adam(self.score_lr)
        if self.schedule == "cosine":
            sched = (
                cosine_schedule(self.lr, self.total_steps),
                cosine_schedule(self.score_lr, self.total_steps),
            )
        else:
            sched = (constant_schedule(self.lr), constant_schedule(self.score_lr))
        return weights, scores, sched


PRESETS: dict[str, dict[str, Any]] = {
    "paper": {},
    "authors": {
        "score_estimator": "vrpge-sqrt",
        "n_masks": 2,
        "projection": "bisection",
        "projection_tol": 1e-3,
        "projection_max_iter": 21,
        "clip_norm": 3.0,
        "clip_scope": "weights+scores",
        "optimizer": "sgd",
        "lr": 0.1,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "score_optimizer": "adam",
        "score_lr": 0.012,
        "schedule": "cosine",
        "finetune_lr": 1e-3,
    },
}
"""Named sets of options: ``"paper"`` (the table's defaults, the paper's mathematics) and
``"authors"`` (the settings of the authors' released PyTorch code, x-zho14/VRPGE-Sparse-
Training: the score term scaled by sqrt(s(1-s)), K = 2, bisection with tolerance 1e-3
and at most 21 evaluations of the threshold, one global gradient norm of 3 over weights
and scores together, SGD with momentum 0.9 and weight decay 5e-4 at 0.1 for the weights,
Adam at 0.012 without weight decay for the scores, cosine schedules)."""


def preset(name: str, **overrides: Any) -> TrainConfig:
    """The :class:`TrainConfig` of a named preset, with ``overrides`` applied on top.

    Examples
    --------
    >>> config = preset("authors", density=0.5)
    >>> config.score_estimator, config.clip_scope, config.density
    ('vrpge-sqrt', 'weights+scores', 0.5)
    """
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(map(repr, PRESETS))}, got {name!r}")
    return TrainConfig(**{**PRESETS[name], **overrides})


@functools.cache
def _options() -> tuple[Option, ...]:
    return tuple(
        Option(f.name, f.default, f.metadata["constraint"], f.metadata["help"])
        for f in dataclasses.fields(TrainConfig)
    )


def options() -> tuple[Option, ...]:
    """The rows of the option table, in :class:`TrainConfig`'s field order.

    Returns
    -------
    tuple of Option

    Examples
    --------
    >>> {o.name: o.constraint.describe() for o in options()}["density"]
    'a number in (0, 1]'
    """
    return _options()
