"""Compaction: drop from storage the units that can never be sampled again.

Scores collapse fast: most reach 0 within the first epoch. A unit whose score is 0
and stays 0 is never sampled, so removing its stored weights leaves every later
step's distribution unchanged while making mask sampling and the active-pattern pass
cheaper. What a dead unit owns (one stored weight, a whole row) is the layer's unit
map's business (:meth:`~cpusparse.engine.layers.base.UnitMap.compaction`); this
module only decides when, and keeps the scores and optimizer states aligned.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .._typing import BoolArray
from ..method.estimators import get_score_estimator
from .optim import compact_state

if TYPE_CHECKING:
    from .config import TrainConfig
    from .state import TrainState

__all__ = ["dead_units", "droppable_fraction", "compact", "maybe_compact"]


def dead_units(state: TrainState, config: TrainConfig) -> BoolArray:
    """Units that can never be sampled again, over the flat score vector.

    A unit is dead when its score is exactly 0 *and* the score optimizer cannot
    raise it: with a score-function estimator its gradient is 0 from then on
    (:func:`~cpusparse.method.masks.score_function` is 0 at :math:`s = 0`), so the
    update is the decaying running average alone -- Adam's ``exp_avg`` or SGD's
    ``momentum_buffer`` -- which keeps its sign; if that is >= 0 the step pushes
    the score down and the projection (threshold >= 0) keeps it at 0. A score at
    0 whose average still points up is not dead: it comes back. With an estimator
    that differentiates through the mask (straight-through) every unit has a
    gradient, so none is dead.

    Returns
    -------
    dead : ndarray of bool, shape (n_units_total,)
    """
    dead = state.score == 0
    if get_score_estimator(config.score_estimator).mask_gradient:
        return np.zeros_like(dead)
    for key in ("exp_avg", "momentum_buffer"):
        if key in state.score_state[0]:
            dead &= state.score_state[0][key] >= 0
    return dead


def _per_layer(state: TrainState, flat: BoolArray) -> list[BoolArray]:
    o = state.offsets
    return [flat[o[p] : o[p + 1]] for p in range(len(o) - 1)]


def droppable_fraction(state: TrainState, dead: BoolArray) -> float:
    """Fraction of the stored weights of prunable layers that :func:`compact` would drop."""
    layers = state.network.prunable_layers()
    dropped = stored = 0
    for layer, layer_dead in zip(layers, _per_layer(state, dead), strict=True):
        if not (layer.units is not None):
            raise RuntimeError("internal error: a prunable layer has a unit map")
        stored += layer.units.stored_by(np.ones_like(layer_dead))
        dropped += layer.units.stored_by(layer_dead)
    return dropped / stored if stored else 0.0


def compact(state: TrainState, dead: BoolArray) -> BoolArray:
    """Drop the stored weights of dead units (see :func:`dead_units`).

    Scores, the layers' stored patterns and the optimizer states of their
    parameters and of the scores are compacted together. The random draws do
    change: later steps draw the uniforms of the smaller ``n``. Runs are
    bit-reproducible for given compaction settings.

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
    position = {id(arr): j for j, arr in enumerate(state.param_list())}
    new_weight_state = list(state.weight_state)
    kept_units = []
    for p, (layer, layer_dead) in enumerate(
        zip(net.prunable_layers(), _per_layer(state, dead), strict=True)
    ):
        if not (layer.units is not None):
            raise RuntimeError("internal error: a prunable layer has a unit map")
        keep_units, kept_entries = layer.units.compaction(layer_dead)
        kept_units.append(keep_units)
        if all(keep.all() for keep in kept_entries.values()):
            continue
        params = layer.params()
        for name, keep in kept_entries.items():
            j = position[id(params[name])]
            new_weight_state[j] = compact_state(state.weight_state[j], keep)
        net.replace_prunable(p, layer.compact(kept_entries))
    state.weight_state = new_weight_state
    kept = np.concatenate(kept_units)
    if not kept.all():
        state.score = state.score[kept]
        state.score_state = [compact_state(state.score_state[0], kept)]
        state.offsets = np.concatenate([[0], np.cumsum(net.n_units())]).astype(np.int64)
    return kept


def maybe_compact(state: TrainState, config: TrainConfig) -> BoolArray | None:
    """Compact after a step when it is time and enough is dead; return ``kept`` or None.

    Every ``config.compact_every`` steps (0: never), if at least
    ``config.compact_fraction`` of the stored weights belong to dead units.
    """
    if not config.compact_every or state.step % config.compact_every:
        return None
    dead = dead_units(state, config)
    if dead.any() and droppable_fraction(state, dead) >= config.compact_fraction:
        return compact(state, dead)
    return None
