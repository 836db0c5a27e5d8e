r"""The training step of completely sparse training (Algorithm 1 of the paper).

:func:`train_step` is the method of Zhou et al. (2021) as code, one block per line of
the algorithm; everything fast lives behind it (the masked products of
:mod:`cpusparse.engine`, the estimators and the projection of
:mod:`cpusparse.method`). The problem solved is

.. math::

    \min_{w,\ s}\ \mathbb{E}_{m \sim p(m \mid s)}\, L(w \odot m)
    \quad \text{s.t.} \quad s \in [0, 1]^n,\ \ \textstyle\sum_i s_i \le k,

with one global budget :math:`k = \text{density} \times n` over the prunable units
of all sparse layers. :func:`finetune_step` trains the weights on a fixed mask.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple

import numba
import numpy as np

from .._threads import run_tasks
from .._typing import BoolArray, FloatArray
from ..engine.layers.base import STRAIGHT_THROUGH, TRAIN, Layer, Mode
from ..engine.losses import softmax_cross_entropy
from ..method.estimators import get_score_estimator
from ..method.masks import _sample as sample_masks_unchecked
from ..method.projection import project_scores
from .compaction import maybe_compact
from .optim import clip_grad_norm
from .state import NonFiniteError, TrainState, split_masks

if TYPE_CHECKING:
    import numpy.typing as npt

    from .config import TrainConfig

__all__ = ["StepResult", "StepRecord", "train_step", "finetune_step"]


@dataclasses.dataclass
class StepRecord:
    """Every intermediate of one :func:`train_step`, for golden traces.

    Arrays over units are flat (aligned with ``state.score`` before the step);
    gradient lists are aligned with :meth:`~cpusparse.training.state.TrainState.param_list`.

    Attributes
    ----------
    score : ndarray of shape (n,)
        The keep probabilities before the step.
    uniforms, masks : ndarray of shape (K, n)
        The uniforms drawn and the masks ``uniforms < score``.
    losses : ndarray of shape (K,)
        The loss of each mask pass (float64).
    weight_grads_per_pass : list of list of ndarray
        The weight gradients of each pass that ran a backward (K lists, or one with
        ``weight_grad="first"``): one per mask *pass*, not per data sample.
    weight_grads : list of ndarray
        Their mean, before clipping.
    grad_norm : float
        Global norm of ``weight_grads`` (with ``clip_scope="weights+scores"``, of those
        and ``dscore`` together), before clipping.
    dscore : ndarray of shape (n,)
        The score gradient.
    lr, score_lr : float
        The learning rates of this step.
    score_before_projection : ndarray of shape (n,)
        The scores after the optimizer step.
    threshold : float
        The projection's threshold.
    """

    score: FloatArray
    uniforms: npt.NDArray[np.float64]
    masks: BoolArray
    losses: npt.NDArray[np.float64]
    weight_grads_per_pass: list[list[FloatArray]]
    weight_grads: list[FloatArray]
    grad_norm: float
    dscore: FloatArray
    lr: float
    score_lr: float
    score_before_projection: FloatArray
    threshold: float


class StepResult(NamedTuple):
    """What one step measured (for history and logging).

    Attributes
    ----------
    losses : ndarray of shape (K,)
    realised_density : float
        Fraction of the initial units kept by the step's masks, averaged over K.
    dscore : ndarray of shape (n,)
    kept : ndarray of bool or None
        Units kept by a compaction after the step (None: no compaction).
    record : StepRecord or None
        Only with ``record=True``.
    """

    losses: npt.NDArray[np.float64]
    realised_density: float
    dscore: FloatArray
    kept: BoolArray | None = None
    record: StepRecord | None = None


def _check_finite(
    state: TrainState,
    losses: np.ndarray,
    x: FloatArray,
    pass_masks: Callable[[int], Sequence[BoolArray | None]],
    mode: Mode,
) -> None:
    """Raise :class:`NonFiniteError` naming the cause if a loss is not finite.

    ``pass_masks(k)`` gives the per-layer masks of pass ``k``. Only the failing case
    does any work: it finds the first non-finite parameter, or reruns the first failing pass
    layer by layer to name the layer whose output overflows.
    """
    if np.all(np.isfinite(losses)):
        return
    where = f"non-finite loss {losses.tolist()} at step {state.step}"
    if not np.isfinite(x).all():
        raise NonFiniteError(f"{where}: the input batch holds NaN or infinite values")
    net = state.network
    for i, layer in enumerate(net.layers):
        for name, arr in layer.params().items():
            if not np.isfinite(arr).all():
                raise NonFiniteError(
                    f"{where}: {name} of layer {i} ({type(layer).__name__}) is not finite; "
                    "lower the learning rate or set clip_norm"
                )
    k = int(np.flatnonzero(~np.isfinite(losses))[0])
    mode = mode._replace(update_stats=False)  # the diagnosis moves no running statistics

    def check(i: int, layer: Layer, h: FloatArray) -> None:
        if not np.isfinite(h).all():
            scale = float(np.abs(x).max())
            hint = (
                f"the inputs reach |x| = {scale:.3g}: scale the data"
                if scale > 1e4
                else "lower the learning rate or set clip_norm"
            )
            raise NonFiniteError(
                f"{where}: the output of layer {i} ({type(layer).__name__}) of pass {k} "
                f"overflows; {hint}"
            )

    net._run(x, list(pass_masks(k)), None, mode, on_layer=check)
    raise NonFiniteError(f"{where}: the logits are finite but the loss is not")


def _mask_passes(
    state: TrainState,
    x: FloatArray,
    y: npt.NDArray[np.integer],
    masks: BoolArray,
    n_backward: int,
    mode: Mode,
    keep_passes: bool,
    every_pass_updates: bool = False,
) -> tuple[npt.NDArray[np.float64], list[FloatArray], list[FloatArray], list[list[FloatArray]]]:
    """K forward passes on one batch, the first ``n_backward`` with a backward pass.

    Returns the losses, the summed weight gradients, the flat mask gradients of each
    straight-through pass, and (with ``keep_passes``) copies of each pass's weight
    gradients.

    The passes are independent (one batch, K masks), so they run as tasks on the
    ``n_jobs`` threads (:func:`~cpusparse._threads.run_tasks`), as many at a time as
    there are threads; their gradients are summed in pass order, the same bits for any
    thread count. With K updates of running statistics per step
    (``every_pass_updates``) the passes run one after the other, in order.
    """
    net = state.network
    n_passes = masks.shape[0]
    losses = np.empty(n_passes)
    total = None
    mask_grads, per_pass = [], []

    def one_pass(k: int) -> tuple[float, dict[str, FloatArray] | None]:
        # Running statistics (batch norm) follow the first pass, or every pass.
        pass_mode = mode if k == 0 or every_pass_updates else mode._replace(update_stats=False)
        logits, caches = net._forward(x, split_masks(state, masks[k]), None, pass_mode)
        loss, dlogits = softmax_cross_entropy(logits, y)
        if k >= n_backward:
            return loss, None
        return loss, net._backward(dlogits, caches)[1]

    group = 1 if every_pass_updates else max(1, numba.get_num_threads())
    for start in range(0, n_passes, group):
        ks = list(range(start, min(start + group, n_passes)))
        for k, (loss, grads) in zip(ks, run_tasks(one_pass, ks), strict=True):
            losses[k] = loss
            if grads is None:
                continue
            if mode.straight_through:
                mask_keys = [key for key in grads if key.endswith(".mask")]
                mask_grads.append(np.concatenate([grads.pop(key) for key in mask_keys]))
            flat = list(grads.values())
            if keep_passes:
                per_pass.append([g.copy() for g in flat])
            if total is None:
                total = flat  # fresh arrays (the backward contract): summed in place
            else:
                for t, g in zip(total, flat, strict=True):
                    t += g
    if not (total is not None):
        raise RuntimeError(
            "internal error: the first pass always runs a backward (n_backward >= 1)"
        )
    return losses, total, mask_grads, per_pass


def train_step(
    state: TrainState,
    x: FloatArray,
    y: npt.NDArray[np.integer],
    config: TrainConfig,
    *,
    record: bool = False,
) -> StepResult:
    r"""One step of sparse training (Algorithm 1 of the paper) on one mini-batch.

    Parameters
    ----------
    state : TrainState
        Updated in place: weights, scores, optimizer states, step, ``mask_rng``.
    x : ndarray of shape (n_in, n_batch)
        Feature-major mini-batch, the network's dtype.
    y : ndarray of int, shape (n_batch,)
    config : TrainConfig
    record : bool, default=False
        Also return every intermediate result (:class:`StepRecord`), for golden traces.

    Returns
    -------
    StepResult

    Notes
    -----
    1. Draw :math:`K` masks :math:`m_k \sim \text{Bernoulli}(s)` over all prunable
       units at once (:func:`~cpusparse.method.sample_masks`, keyed by one draw from
       ``mask_rng``).
    2. Run :math:`K` sparse forward passes on the same batch: losses :math:`L_k`.
    3. Weight gradient: the sparse backward of each pass (only active entries),
       averaged over the passes (or the first pass only).
    4. Score gradient from the forward passes only, for VR-PGE

       .. math::

           \hat g = \frac{1}{K-1} \sum_k \Big(L_k - \frac{1}{K}\sum_j L_j\Big)
           \nabla_s \log p(m_k \mid s).

    5. Optionally clip the weight gradients' global norm; one optimizer step for
       the weights and one for the scores.
    6. Project the scores onto :math:`\{0 \le s \le 1, \sum s \le k\}`.

    Then, every ``compact_every`` steps, units that can never be sampled again are
    dropped from storage (:func:`~cpusparse.training.compaction.maybe_compact`).

    The straight-through estimator replaces steps 2-4 by passes that compute every
    stored entry (a dense forward and backward through the mask) and uses
    :math:`\partial L / \partial m` as the score gradient.

    References
    ----------
    .. [1] X. Zhou, W. Zhang, Z. Chen, S. Diao, T. Zhang, "Efficient Neural Network
       Training via Forward and Backward Propagation Sparsification", NeurIPS 2021.
    """
    estimator = get_score_estimator(config.score_estimator)
    K = config.n_masks
    score_before = state.score.copy() if record else None

    # 1. K independent masks from the keep probabilities s.
    masks, uniforms = sample_masks_unchecked(
        state.score, K, state.mask_rng, config.mask_draw, record
    )
    if not record:
        del uniforms  # (drawn in bulk by mask_draw="numpy"; not kept)

    # 2.-3. K forward passes on the same batch; sparse backward for the weights.
    mode = STRAIGHT_THROUGH if estimator.mask_gradient else TRAIN
    n_backward = K if config.weight_grad == "mean" or estimator.mask_gradient else 1
    losses, weight_grads, mask_grads, per_pass = _mask_passes(
        state, x, y, masks, n_backward, mode, record, config.norm_updates == "every_pass"
    )

    def pass_masks(k: int, masks: BoolArray = masks) -> list[BoolArray]:
        return split_masks(state, masks[k])

    _check_finite(state, losses, x, pass_masks, mode)
    if n_backward > 1:
        for g in weight_grads:
            g /= g.dtype.type(n_backward)

    # 4. Score gradient (VR-PGE by default): from the K losses and masks alone.
    dscore = estimator.grad(losses, masks, state.score, mask_grads)
    realised = float(np.count_nonzero(masks)) / (K * state.n_units_initial)
    step_masks = masks if record else None
    step_uniforms = uniforms if record else None
    del masks, pass_masks, mask_grads  # the step's largest temporaries go once used

    # 5. Clip (the weight gradients, or weights and scores in one norm), then one step
    #    of each optimizer.
    with_scores = config.clip_scope == "weights+scores"
    to_clip = [*weight_grads, dscore] if with_scores else list(weight_grads)
    if config.clip_norm is None and not record:
        clipped, grad_norm = to_clip, float("nan")  # the norm is only recorded
    else:
        clipped, grad_norm = clip_grad_norm(to_clip, config.clip_norm)
    dscore_step = clipped.pop() if with_scores else dscore
    weight_opt, score_opt, (lr_w, lr_s) = config.optimizers()
    lr, score_lr = lr_w(state.step), lr_s(state.step)
    weight_opt.step(state.param_list(), clipped, state.weight_state, lr=lr)
    score_opt.step([state.score], [dscore_step], state.score_state, lr=score_lr)
    recorded_grads = [g.copy() for g in weight_grads] if record else []
    del clipped, weight_grads, dscore_step
    if not np.isfinite(state.score).all():
        raise NonFiniteError(
            f"the scores are not finite after the score step at step {state.step}: the score "
            f"gradient reaches |dscore| = {float(np.abs(dscore).max()):.3g}; lower score_lr"
        )
    before_projection = state.score.copy() if record else None

    # 6. Project s back onto the budget set.
    _, threshold = project_scores(
        state.score,
        state.budget,
        method=config.projection,
        tol=config.projection_tol,
        max_iter=config.projection_max_iter,
        out=state.score,
    )
    state.step += 1

    kept = maybe_compact(state, config)
    step_record = None
    if record:
        if not (
            score_before is not None
            and before_projection is not None
            and step_masks is not None
            and step_uniforms is not None
        ):
            raise RuntimeError("internal error: copied above")
        step_record = StepRecord(
            score=score_before,
            uniforms=step_uniforms,
            masks=step_masks,
            losses=losses.copy(),
            weight_grads_per_pass=per_pass,
            weight_grads=recorded_grads,
            grad_norm=grad_norm,
            dscore=dscore.copy(),
            lr=lr,
            score_lr=score_lr,
            score_before_projection=before_projection,
            threshold=threshold,
        )
    return StepResult(losses, realised, dscore, kept, step_record)


def finetune_step(
    state: TrainState,
    x: FloatArray,
    y: npt.NDArray[np.integer],
    masks: Sequence[BoolArray | None],
    config: TrainConfig,
) -> float:
    """One weight step on a fixed mask (no score update); returns the loss.

    Parameters
    ----------
    state : TrainState
    x : ndarray of shape (n_in, n_batch)
    y : ndarray of int, shape (n_batch,)
    masks : list of ndarray of bool
        One fixed mask per prunable layer (e.g. from
        :func:`~cpusparse.training.loop.fixed_mask`).
    config : TrainConfig
    """
    net = state.network
    logits, caches = net._forward(x, masks)
    loss, dlogits = softmax_cross_entropy(logits, y)
    _check_finite(state, np.array([loss]), x, lambda k: masks, TRAIN)
    _, grads = net._backward(dlogits, caches)
    flat = list(grads.values())
    if config.clip_norm is not None:
        flat, _ = clip_grad_norm(flat, config.clip_norm)
    weight_opt, _, (lr_w, _) = config.optimizers()
    lr = lr_w(state.step) if config.finetune_lr is None else config.finetune_lr
    weight_opt.step(state.param_list(), flat, state.weight_state, lr=lr)
    state.step += 1
    return loss
