r"""Completely sparse training: the VR-PGE training step, written once, in order.

This module is the method of Zhou et al. (2021) as code. :func:`train_step` is
Algorithm 1 of the paper, one line of the algorithm per block; everything fast lives
behind it (the masked products of :mod:`cpusparse.sparse`, the estimators of
:mod:`cpusparse.estimators`, the projection of :mod:`cpusparse.projection`).

The problem solved is

.. math::

    \min_{w,\ s}\ \mathbb{E}_{m \sim p(m \mid s)}\, L(w \odot m)
    \quad \text{s.t.} \quad s \in [0, 1]^n,\ \ \textstyle\sum_i s_i \le k,

with one global budget :math:`k = \text{density} \times n` over the prunable units
of all sparse layers.

State and randomness
--------------------
All mutable training state is in one :class:`TrainState`: the network (its arrays
are updated in place), the flat score vector ``score`` that concatenates the keep
probabilities of every prunable layer (layer ``l`` owns
``score[offsets[l]:offsets[l + 1]]``), the optimizer states, the step counter and
two random streams spawned from one seed: ``data_rng`` (the order of the samples in
each epoch) and ``mask_rng`` (the uniforms of :func:`~cpusparse.estimators.sample_masks`,
one ``(K, n)`` draw per step over the flat score vector). A third stream,
spawned first, initialises the weights.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
from typing import NamedTuple

import numpy as np

from . import estimators
from ._validation import check_choice, check_density, check_n_samples
from .losses import softmax_cross_entropy
from .optim import SGD, Adam, clip_grad_norm, compact_state, constant_schedule, cosine_schedule
from .projection import project_scores

__all__ = [
    "ESTIMATORS",
    "TrainConfig",
    "TrainState",
    "StepInfo",
    "NonFiniteError",
    "init_state",
    "spawn_streams",
    "train_step",
    "finetune_step",
    "compact",
    "droppable_fraction",
    "dead_units",
    "fixed_mask",
    "split_masks",
    "expected_density",
    "evaluate",
    "EpochStats",
    "iterate_batches",
    "run_epoch",
    "check_parameters_finite",
]

ESTIMATORS = ("vrpge", "vrpge-sqrt", "reinforce", "straight-through")
OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cosine")


class NonFiniteError(FloatingPointError):
    """Training produced a NaN or an infinity; the message names the layer and step."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    r"""Hyperparameters of sparse training.

    Parameters
    ----------
    density : float in (0, 1]
        Kept fraction of the prunable units; the budget is ``k = density * n``.
    n_samples : int, default=2
        Number :math:`K \ge 2` of masks (forward passes) per step.
    estimator : {"vrpge", "vrpge-sqrt", "reinforce", "straight-through"}
        Score-gradient estimator. ``"vrpge"`` is the paper's; ``"vrpge-sqrt"`` the
        authors' code (score scaled by :math:`\sqrt{s(1-s)}`); ``"reinforce"`` the
        plain policy gradient; ``"straight-through"`` the chain-rule baseline that
        needs a dense forward and backward through the mask.
    projection : {"exact", "bisection"}
        Solver of :func:`~cpusparse.projection.project_scores`.
    projection_tol, projection_max_iter : float, int
        Bisection tolerance and cap (the authors': 1e-3 and 20).
    weight_grad : {"mean", "first"}
        Average the weight gradient over the K passes, or use the first pass only
        (saves K - 1 backward passes). The straight-through estimator needs every
        pass's backward for its score gradient, so it always averages over K.
    clip_norm : float or None
        Clip the global norm of the weight gradients (the authors: 3).
    optimizer, lr, momentum, nesterov, weight_decay
        Weight optimizer: ``"sgd"`` (with momentum, Nesterov, weight decay) or
        ``"adam"``; ``lr`` is the initial learning rate.
    score_optimizer, score_lr, score_momentum
        Score optimizer (separate from the weights').
    schedule : {"constant", "cosine"}
        Learning-rate schedule of both optimizers over ``total_steps``; a cosine
        schedule stays at its minimum (0) after ``total_steps``, so count the
        fine-tuning steps in ``total_steps`` too.
    initial_score : float or None
        Initial keep probability of every unit; None uses ``density``.
    compact_every, compact_fraction : int, float
        Every ``compact_every`` steps (0: never), if at least ``compact_fraction``
        of the stored weights of the prunable layers belong to units whose score is
        exactly 0, drop them from the stored pattern and the optimizer state
        (:func:`compact`). A zero score is absorbing: the unit is never sampled and
        its gradient is 0. Scores collapse fast (most reach 0 within the first
        epoch), so checking every step keeps the cost following the live units;
        the check is one pass over the scores.
    """

    density: float = 0.1
    n_samples: int = 2
    estimator: str = "vrpge"
    projection: str = "exact"
    projection_tol: float = 1e-3
    projection_max_iter: int = 20
    weight_grad: str = "mean"
    clip_norm: float | None = None
    optimizer: str = "adam"
    lr: float = 1e-3
    momentum: float = 0.9
    nesterov: bool = False
    weight_decay: float = 0.0
    score_optimizer: str = "adam"
    score_lr: float = 1e-2
    score_momentum: float = 0.9
    schedule: str = "constant"
    total_steps: int = 1
    initial_score: float | None = None
    compact_every: int = 1
    compact_fraction: float = 0.25

    def __post_init__(self):
        check_density(self.density)
        check_n_samples(self.n_samples)
        check_choice(self.estimator, "estimator", ESTIMATORS)
        check_choice(self.projection, "projection", ("exact", "bisection"))
        check_choice(self.weight_grad, "weight_grad", ("mean", "first"))
        check_choice(self.optimizer, "optimizer", OPTIMIZERS)
        check_choice(self.score_optimizer, "score_optimizer", OPTIMIZERS)
        check_choice(self.schedule, "schedule", SCHEDULES)
        if self.clip_norm is not None and not self.clip_norm > 0:
            raise ValueError(f"clip_norm must be None or > 0, got {self.clip_norm}")
        for name in ("lr", "score_lr"):
            value = getattr(self, name)
            if not (isinstance(value, numbers.Real) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if self.initial_score is not None and not 0 <= self.initial_score <= 1:
            raise ValueError(f"initial_score must be in [0, 1] or None, got {self.initial_score}")
        for name in ("compact_every", "projection_max_iter"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 0:
                raise ValueError(f"{name} must be an int >= 0, got {value!r}")
        if self.projection_max_iter < 1:
            raise ValueError(f"projection_max_iter must be >= 1, got {self.projection_max_iter}")
        if not (math.isfinite(self.projection_tol) and self.projection_tol > 0):
            raise ValueError(
                f"projection_tol must be a finite number > 0, got {self.projection_tol}"
            )
        if not 0 <= self.compact_fraction <= 1:
            raise ValueError(f"compact_fraction must be in [0, 1], got {self.compact_fraction}")
        if self.total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {self.total_steps}")

    @functools.cached_property
    def optimizers(self):
        """The weight and score optimizers and their learning-rate schedules."""
        weights = (
            SGD(
                self.lr,
                momentum=self.momentum,
                nesterov=self.nesterov,
                weight_decay=self.weight_decay,
            )
            if self.optimizer == "sgd"
            else Adam(self.lr, weight_decay=self.weight_decay)
        )
        scores = (
            SGD(self.score_lr, momentum=self.score_momentum)
            if self.score_optimizer == "sgd"
            else Adam(self.score_lr)
        )
        if self.schedule == "cosine":
            sched = (
                cosine_schedule(self.lr, self.total_steps),
                cosine_schedule(self.score_lr, self.total_steps),
            )
        else:
            sched = (constant_schedule(self.lr), constant_schedule(self.score_lr))
        return weights, scores, sched


@dataclasses.dataclass
class TrainState:
    """Everything that changes during training (see the module docstring).

    Attributes
    ----------
    network : Sequential
        Its parameter arrays are updated in place.
    score : ndarray of shape (n_units_total,)
        Keep probabilities of all prunable layers, concatenated.
    offsets : ndarray of shape (n_prunable + 1,)
        Layer ``l`` owns ``score[offsets[l]:offsets[l + 1]]``.
    budget : float
        ``k = density * n`` with ``n`` the number of units at initialisation;
        dropping units whose score is 0 does not change it.
    n_units_initial : int
        ``n`` at initialisation (the denominator of every density).
    weight_state, score_state : list of dict
        Optimizer states aligned with ``network.params()`` (flattened layer by
        layer, weight then bias) and with ``[score]``.
    step : int
        Number of optimizer steps taken.
    data_rng, mask_rng : numpy.random.Generator
        The data-order and mask streams.
    """

    network: object
    score: np.ndarray
    offsets: np.ndarray
    budget: float
    n_units_initial: int
    weight_state: list
    score_state: list
    step: int
    data_rng: np.random.Generator
    mask_rng: np.random.Generator

    def param_list(self):
        """The parameter arrays, flattened layer by layer (weight, then bias)."""
        return [arr for layer in self.network.layers for arr in layer.params().values()]


class StepInfo(NamedTuple):
    """What one step measured (for history and logging)."""

    losses: np.ndarray
    realised_density: float
    dscore: np.ndarray
    kept: np.ndarray | None = None  # units kept by a compaction after the step


def spawn_streams(rng):
    """Three independent Generators (init, data order, masks) from one seed.

    ``rng`` is None, an int or a Generator; an int seed ``s`` gives
    ``numpy.random.SeedSequence(s).spawn(3)`` in the order init, data, masks.
    A Generator contributes its seed sequence, whose ``spawn`` counts calls: two
    calls with the same Generator give different streams. Pass an int to
    reproduce a run.

    Examples
    --------
    >>> a = spawn_streams(0); b = spawn_streams(0)
    >>> float(a[2].random()) == float(b[2].random())
    True
    """
    if isinstance(rng, np.random.Generator):
        seeds = rng.bit_generator.seed_seq.spawn(3)
    elif rng is None or (isinstance(rng, numbers.Integral) and not isinstance(rng, bool)):
        seeds = np.random.SeedSequence(rng).spawn(3)
    else:
        raise TypeError(
            f"rng must be None, an int seed or a numpy.random.Generator, got {type(rng).__name__}"
        )
    return [np.random.default_rng(s) for s in seeds]


def init_state(network, config, *, data_rng, mask_rng):
    """Initial training state: scores at the density, zero optimizer states.

    Parameters
    ----------
    network : Sequential
        With at least one prunable layer.
    config : TrainConfig
    data_rng, mask_rng : numpy.random.Generator
        From :func:`spawn_streams`.

    Returns
    -------
    TrainState
    """
    n_units = network.n_units()
    if not n_units:
        raise ValueError("network must have at least one prunable (sparse) layer, got none")
    offsets = np.concatenate([[0], np.cumsum(n_units)]).astype(np.int64)
    n_total = int(offsets[-1])
    s0 = config.density if config.initial_score is None else config.initial_score
    score = np.full(n_total, s0, dtype=network.dtype)
    weight_opt, score_opt, _ = config.optimizers
    state = TrainState(
        network=network,
        score=score,
        offsets=offsets,
        budget=config.density * n_total,
        n_units_initial=n_total,
        weight_state=[],
        score_state=score_opt.init_state([score]),
        step=0,
        data_rng=data_rng,
        mask_rng=mask_rng,
    )
    state.weight_state = weight_opt.init_state(state.param_list())
    return state


def split_masks(state, mask):
    """Per-layer views of one flat mask of shape (n_units_total,)."""
    o = state.offsets
    return [mask[o[i] : o[i + 1]] for i in range(len(o) - 1)]


def expected_density(state):
    """``sum(s) / n``: the expected kept fraction of the initial units."""
    return float(state.score.sum(dtype=np.float64)) / state.n_units_initial


def _score_gradient(config, losses, masks, score, st_grads):
    if config.estimator == "vrpge":
        return estimators.vrpge_grad(losses, masks, score)
    if config.estimator == "vrpge-sqrt":
        return estimators.vrpge_grad(losses, masks, score, scaling="sqrt")
    if config.estimator == "reinforce":
        return estimators.reinforce_grad(losses, masks, score)
    # straight-through: dL/dm from the dense backward, averaged over the K passes
    return (np.sum(st_grads, axis=0) / len(st_grads)).astype(score.dtype)


def _check_finite(state, losses):
    if not np.all(np.isfinite(losses)):
        raise NonFiniteError(
            f"non-finite loss {losses.tolist()} at step {state.step}; lower the learning "
            "rate or enable clip_norm"
        )


def check_parameters_finite(state):
    """Raise :class:`NonFiniteError` naming the first layer with a NaN or inf."""
    for i, layer in enumerate(state.network.layers):
        for name, arr in layer.params().items():
            if not np.isfinite(arr).all():
                raise NonFiniteError(
                    f"layer {i} ({type(layer).__name__}) {name} has non-finite values "
                    f"after step {state.step}"
                )
    if not np.isfinite(state.score).all():
        raise NonFiniteError(f"scores have non-finite values after step {state.step}")


def train_step(state, x, y, config, *, record=None):
    r"""One step of sparse training (Algorithm 1 of the paper) on one mini-batch.

    Parameters
    ----------
    state : TrainState
        Updated in place: weights, scores, optimizer states, step, ``mask_rng``.
    x : ndarray of shape (n_in, n_batch)
        Feature-major mini-batch, the network's dtype.
    y : ndarray of int, shape (n_batch,)
    config : TrainConfig
    record : dict, optional
        If given, filled with the step's intermediate results for golden traces:
        ``score`` (before the step), ``uniforms`` and ``masks`` (K, n), ``losses``
        (K,), ``weight_grads_per_sample`` (K lists of arrays aligned with
        :meth:`TrainState.param_list`), ``weight_grads`` (their mean, before
        clipping), ``grad_norm``, ``dscore``, ``score_before_projection``,
        ``threshold``, ``lr`` and ``score_lr``.

    Returns
    -------
    StepInfo

    Notes
    -----
    1. Draw :math:`K` masks :math:`m_k \sim \text{Bernoulli}(s)` over all prunable
       units at once (one ``(K, n)`` draw of uniforms from ``mask_rng``).
    2. Run :math:`K` sparse forward passes on the same batch: losses :math:`L_k`.
    3. Weight gradient: the sparse backward of each pass (only active entries),
       averaged over the passes (or the first pass only).
    4. Score gradient, for VR-PGE

       .. math::

           \hat g = \frac{1}{K-1} \sum_k \Big(L_k - \frac{1}{K}\sum_j L_j\Big)
           \nabla_s \log p(m_k \mid s).

    5. Optionally clip the weight gradients' global norm; one optimizer step for
       the weights and one for the scores.
    6. Project the scores onto :math:`\{0 \le s \le 1, \sum s \le k\}`.

    The straight-through estimator replaces steps 2-4 by passes that compute every
    stored entry (a dense forward and backward through the mask) and uses
    :math:`\partial L / \partial m` as the score gradient.

    References
    ----------
    .. [1] X. Zhou, W. Zhang, Z. Chen, S. Diao, T. Zhang, "Efficient Neural Network
       Training via Forward and Backward Propagation Sparsification", NeurIPS 2021.
    """
    net = state.network
    K = config.n_samples
    straight_through = config.estimator == "straight-through"

    # 1. K independent masks from the keep probabilities s.
    masks, uniforms = estimators.sample_masks(
        state.score, K, rng=state.mask_rng, return_uniforms=True
    )
    if record is not None:
        record.update(score=state.score.copy(), uniforms=uniforms, masks=masks)
        record["weight_grads_per_sample"] = []

    # 2.-3. K forward passes on the same batch; sparse backward for the weights.
    losses = np.empty(K)
    weight_grads = None
    st_grads = []
    n_backward = K if config.weight_grad == "mean" or straight_through else 1
    for k in range(K):
        logits, caches = net._forward(x, split_masks(state, masks[k]), straight_through)
        losses[k], dlogits = softmax_cross_entropy(logits, y)
        if k < n_backward:
            _, grads = net._backward(dlogits, caches)
            if straight_through:
                st_grads.append(np.concatenate([grads[i].pop("mask") for i in net.prunable]))
            flat = [g for layer_grads in grads for g in layer_grads.values()]
            if record is not None:
                record["weight_grads_per_sample"].append([g.copy() for g in flat])
            if weight_grads is None:
                weight_grads = flat  # fresh arrays (the backward contract): summed in place
            else:
                for total, g in zip(weight_grads, flat, strict=True):
                    total += g
    _check_finite(state, losses)
    if n_backward > 1:
        for g in weight_grads:
            g /= g.dtype.type(n_backward)

    # 4. Score gradient (VR-PGE by default): forward passes only, no backward.
    dscore = _score_gradient(config, losses, masks, state.score, st_grads)

    if record is not None:
        record.update(losses=losses.copy(), weight_grads=[g.copy() for g in weight_grads])
        record["dscore"] = dscore.copy()

    # 5. Clip, then one step of each optimizer.
    weight_grads, grad_norm = clip_grad_norm(weight_grads, config.clip_norm)
    weight_opt, score_opt, (lr_w, lr_s) = config.optimizers
    weight_opt.step(state.param_list(), weight_grads, state.weight_state, lr=lr_w(state.step))
    score_opt.step([state.score], [dscore], state.score_state, lr=lr_s(state.step))

    # 6. Project s back onto the budget set.
    if record is not None:
        record.update(
            grad_norm=grad_norm,
            lr=lr_w(state.step),
            score_lr=lr_s(state.step),
            score_before_projection=state.score.copy(),
        )
    projected, threshold = project_scores(
        state.score,
        state.budget,
        method=config.projection,
        tol=config.projection_tol,
        max_iter=config.projection_max_iter,
    )
    state.score[:] = projected
    state.step += 1
    if record is not None:
        record["threshold"] = threshold

    kept = None
    if config.compact_every and state.step % config.compact_every == 0:
        dead = dead_units(state, config)
        if dead.any() and droppable_fraction(state, dead) >= config.compact_fraction:
            kept = compact(state, dead)
    realised = float(masks.sum()) / (K * state.n_units_initial)
    return StepInfo(losses, realised, dscore, kept)


def finetune_step(state, x, y, masks, config):
    """One weight step on a fixed mask (no score update); returns the loss.

    Parameters
    ----------
    state : TrainState
    x : ndarray of shape (n_in, n_batch)
    y : ndarray of int, shape (n_batch,)
    masks : list of ndarray of bool
        One fixed mask per prunable layer (e.g. from :func:`fixed_mask`).
    config : TrainConfig
    """
    net = state.network
    logits, caches = net._forward(x, masks)
    loss, dlogits = softmax_cross_entropy(logits, y)
    _check_finite(state, np.array([loss]))
    _, grads = net._backward(dlogits, caches)
    flat = [g for layer_grads in grads for g in layer_grads.values()]
    flat, _ = clip_grad_norm(flat, config.clip_norm)
    weight_opt, _, (lr_w, _) = config.optimizers
    weight_opt.step(state.param_list(), flat, state.weight_state, lr=lr_w(state.step))
    state.step += 1
    return loss


def dead_units(state, config):
    """Units that can never be sampled again, over the flat score vector.

    A unit is dead when its score is exactly 0 *and* the score optimizer cannot
    raise it: with a score-function estimator its gradient is 0 from then on
    (:func:`~cpusparse.estimators.score_function` is 0 at :math:`s = 0`), so the
    update is the decaying running average alone -- Adam's ``exp_avg`` or SGD's
    ``momentum_buffer`` -- which keeps its sign; if that is >= 0 the step pushes
    the score down and the projection (threshold >= 0) keeps it at 0. A score at
    0 whose average still points up is not dead: it comes back. With the
    straight-through estimator every unit has a gradient, so none is dead.

    Returns
    -------
    dead : ndarray of bool, shape (n_units_total,)
    """
    dead = state.score == 0
    if config.estimator == "straight-through":
        return np.zeros_like(dead)
    for key in ("exp_avg", "momentum_buffer"):
        if key in state.score_state[0]:
            dead &= state.score_state[0][key] >= 0
    return dead


def droppable_fraction(state, dead):
    """Fraction of the stored weights of prunable layers that :func:`compact` would drop.

    Those are the stored weights of ``dead`` units: the unit itself for weight
    granularity, the whole row for neuron granularity.
    """
    net = state.network
    dropped = stored = 0
    for p, li in enumerate(net.prunable):
        layer = net.layers[li]
        layer_dead = dead[state.offsets[p] : state.offsets[p + 1]]
        stored += layer.nnz
        if layer.granularity == "weight":
            dropped += int(np.count_nonzero(layer_dead))
        else:
            dropped += int(np.diff(layer.indptr)[layer_dead].sum())
    return dropped / stored if stored else 0.0


def compact(state, dead):
    """Drop the stored weights of dead units (see :func:`dead_units`).

    A dead unit is never sampled again (:math:`u < 0` is impossible) and its score
    never moves, so removing it leaves every later step's distribution unchanged
    while making mask sampling and the active-pattern pass cheaper. The random
    draws themselves do change: later steps draw ``(K, n)`` uniforms for the
    smaller ``n``. Runs are bit-reproducible for given compaction settings.
    Scores, the layer's stored pattern and the optimizer states of its weights
    and of the scores are compacted together. Neuron-granularity layers keep
    their units (their number fixes the next layer's input size) but drop the
    stored weights of dead rows; their score stays 0.

    Parameters
    ----------
    state : TrainState
        Updated in place.
    dead : ndarray of bool, shape (n_units_total,)
        From :func:`dead_units`.

    Returns
    -------
    kept : ndarray of bool, shape (n_units_total,)
        The units kept in the flat score vector (arrays aligned with the old
        scores are compacted with ``array[kept]``).
    """
    net = state.network
    keep_score = []
    param_pos = 0
    new_weight_state = list(state.weight_state)
    for li, layer in enumerate(net.layers):
        n_params = len(layer.params())
        if li in net.prunable:
            p = net.prunable.index(li)
            layer_dead = dead[state.offsets[p] : state.offsets[p + 1]]
            if layer.granularity == "weight":
                keep = ~layer_dead
                keep_score.append(keep)
            else:
                keep = np.repeat(~layer_dead, np.diff(layer.indptr))
                keep_score.append(np.ones(layer_dead.shape[0], dtype=bool))
            if not keep.all():
                net.layers[li] = layer.compact(keep)
                new_weight_state[param_pos] = compact_state(state.weight_state[param_pos], keep)
        param_pos += n_params
    state.weight_state = new_weight_state
    kept = np.concatenate(keep_score)
    if not kept.all():
        state.score = state.score[kept]
        state.score_state = [compact_state(state.score_state[0], kept)]
        state.offsets = np.concatenate([[0], np.cumsum(net.n_units())]).astype(np.int64)
    return kept


def fixed_mask(state, method="topk", *, x=None, y=None, n_candidates=10, rng=None):
    """A deterministic mask within the budget, for fine-tuning and inference.

    Parameters
    ----------
    state : TrainState
    method : {"topk", "best-of-n"}, default="topk"
        ``"topk"``: the ``floor(budget)`` units with the largest scores (ties by
        position), excluding scores of 0. ``"best-of-n"`` (the authors' code): the
        sampled mask, among ``n_candidates`` draws from ``rng``, with the best
        accuracy on ``(x, y)``; it may exceed the budget by sampling noise.
    x, y : ndarray, optional
        Feature-major data for ``"best-of-n"``.
    n_candidates : int, default=10
    rng : None, int or numpy.random.Generator

    Returns
    -------
    masks : list of ndarray of bool
        One per prunable layer.
    """
    check_choice(method, "method", ("topk", "best-of-n"))
    score = state.score
    if method == "topk":
        k = min(int(math.floor(state.budget + 1e-9)), score.shape[0])
        order = np.argsort(-score.astype(np.float64), kind="stable")[:k]
        flat = np.zeros(score.shape[0], dtype=bool)
        flat[order] = True
        flat &= score > 0
        return split_masks(state, flat)
    if x is None or y is None:
        raise ValueError("x and y are required for method='best-of-n'")
    candidates = estimators.sample_masks(score, n_candidates, rng=rng)
    accs = [evaluate(state.network, x, y, split_masks(state, m))[1] for m in candidates]
    return split_masks(state, candidates[int(np.argmax(accs))].copy())


def evaluate(network, x, y, masks, *, batch_size=1024):
    """Mean loss and accuracy of the masked network on feature-major data."""
    n = x.shape[1]
    total_loss = 0.0
    correct = 0
    for start in range(0, n, batch_size):
        xb = np.ascontiguousarray(x[:, start : start + batch_size])
        yb = y[start : start + batch_size]
        logits, _ = network._forward(xb, masks)
        loss, _ = softmax_cross_entropy(logits, yb)
        total_loss += loss * yb.shape[0]
        correct += int((logits.argmax(axis=0) == yb).sum())
    return total_loss / n, correct / n


class EpochStats(NamedTuple):
    """Averages over the steps of one epoch.

    Attributes
    ----------
    loss : float
        Mean training loss (over steps, and over the K passes of each step).
    realised_density : float
        Mean fraction of the initial units kept by the sampled masks.
    grad_variance : float
        Mean over units of the variance, across the epoch's steps, of the score
        gradient (NaN in fine-tuning). It measures the estimator's noise (plus
        the drift of the scores during the epoch): compare estimators with it.
    n_steps : int
    """

    loss: float
    realised_density: float
    grad_variance: float
    n_steps: int


def iterate_batches(n, batch_size, rng):
    """Index arrays of the mini-batches of one epoch, in the order drawn from ``rng``.

    One ``rng.permutation(n)`` per epoch; the last batch may be smaller.
    """
    order = rng.permutation(n)
    return [order[i : i + batch_size] for i in range(0, n, batch_size)]


def run_epoch(state, x, y, config, *, batch_size, masks=None, on_step=None):
    """One pass over the data: sparse training, or fine-tuning on fixed ``masks``.

    Parameters
    ----------
    state : TrainState
        Updated in place.
    x : ndarray of shape (n_in, n_samples)
        The whole training set, feature-major.
    y : ndarray of int, shape (n_samples,)
    config : TrainConfig
    batch_size : int
    masks : list of ndarray of bool, optional
        Fixed masks: fine-tune the weights only (:func:`finetune_step`).
    on_step : callable, optional
        Called after every step with ``(state, loss)``, e.g. to advance a
        progress bar.

    Returns
    -------
    EpochStats
    """
    losses, densities = [], []
    g_sum = g_sq = None
    g_count = 0
    for idx in iterate_batches(y.shape[0], batch_size, state.data_rng):
        xb = np.ascontiguousarray(x[:, idx])
        yb = y[idx]
        if masks is None:
            info = train_step(state, xb, yb, config)
            loss = float(info.losses.mean())
            densities.append(info.realised_density)
            g = info.dscore.astype(np.float64)
            if g_sum is None:
                g_sum, g_sq = np.zeros_like(g), np.zeros_like(g)
            g_sum += g
            g_sq += g * g
            g_count += 1
            if info.kept is not None:  # dead units have gradient 0 from now on
                g_sum, g_sq = g_sum[info.kept], g_sq[info.kept]
        else:
            loss = finetune_step(state, xb, yb, masks, config)
        losses.append(loss)
        if on_step is not None:
            on_step(state, loss)
    if g_count > 1:
        mean = g_sum / g_count
        variance = float(np.mean(g_sq / g_count - mean * mean))
    else:
        variance = float("nan")
    if masks is None:
        realised = float(np.mean(densities))
    else:
        realised = sum(int(m.sum()) for m in masks) / state.n_units_initial
    return EpochStats(float(np.mean(losses)), realised, variance, len(losses))
