"""The training state: the network, the flat score vector, optimizer states and streams.

All mutable training state is in one :class:`TrainState`: the network (its arrays
are updated in place), the flat score vector ``score`` that concatenates the keep
probabilities of every prunable layer (layer ``l`` owns
``score[offsets[l]:offsets[l + 1]]``, see
:func:`~cpusparse.method.projection.concat_scores`), the optimizer states, the step
counter and two random streams spawned from one seed: ``data_rng`` (the order of the
samples in each epoch) and ``mask_rng`` (the uniforms of
:func:`~cpusparse.method.masks.sample_masks`, keyed by one draw per step, over the
flat score vector). A third stream, spawned first, initialises the weights.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
from typing import TYPE_CHECKING, cast

import numpy as np

from .._typing import BoolArray, FloatArray, IndexArray, RNGLike
from ..method.projection import concat_scores, split_scores

if TYPE_CHECKING:
    from ..engine.containers import Sequential
    from .config import TrainConfig

__all__ = [
    "TrainState",
    "NonFiniteError",
    "spawn_streams",
    "init_state",
    "split_masks",
    "expected_density",
    "check_parameters_finite",
    "budget_units",
]


class NonFiniteError(FloatingPointError):
    """Training produced a NaN or an infinity; the message names the layer and step."""


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
        dropping units that can never be sampled does not change it.
    n_units_initial : int
        ``n`` at initialisation (the denominator of every density).
    weight_state, score_state : list of dict
        Optimizer states aligned with :meth:`param_list` and with ``[score]``.
    step : int
        Number of optimizer steps taken.
    data_rng, mask_rng : numpy.random.Generator
        The data-order and mask streams.
    """

    network: Sequential
    score: FloatArray
    offsets: IndexArray
    budget: float
    n_units_initial: int
    weight_state: list[dict[str, np.ndarray]]
    score_state: list[dict[str, np.ndarray]]
    step: int
    data_rng: np.random.Generator
    mask_rng: np.random.Generator

    def param_list(self) -> list[FloatArray]:
        """The parameter arrays in the network's order (layer by layer, weight then bias)."""
        return list(self.network.params().values())


def spawn_streams(rng: RNGLike) -> list[np.random.Generator]:
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
        # Typed as any ISeedSequence: a Generator of numpy's own holds a SeedSequence.
        seeds = cast(np.random.SeedSequence, rng.bit_generator.seed_seq).spawn(3)
    elif rng is None or (isinstance(rng, numbers.Integral) and not isinstance(rng, bool)):
        if rng is not None and rng < 0:
            raise ValueError(f"rng must be None, an int seed >= 0 or a Generator, got {rng}")
        seeds = np.random.SeedSequence(rng).spawn(3)
    else:
        raise TypeError(
            f"rng must be None, an int seed or a numpy.random.Generator, got {type(rng).__name__}"
        )
    return [np.random.default_rng(s) for s in seeds]


def init_state(
    network: Sequential,
    config: TrainConfig,
    *,
    data_rng: np.random.Generator,
    mask_rng: np.random.Generator,
) -> TrainState:
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
    n_total = int(sum(n_units))
    if budget_units(config.density * n_total) < 1:
        raise ValueError(
            f"density must keep at least one of the {n_total} prunable units, got "
            f"density={config.density:g} (a budget of {config.density * n_total:.3g} units); "
            f"the smallest density that keeps one unit is {1 / n_total:.3g}"
        )
    _check_mask_memory(config.n_masks, n_total)
    s0 = config.density if config.initial_score is None else config.initial_score
    score, offsets = concat_scores([np.full(n, s0, dtype=network.dtype) for n in n_units])
    weight_opt, score_opt, _ = config.optimizers()
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


def budget_units(budget: float) -> int:
    """The number of whole units a budget ``k`` keeps: ``floor(k)``, forgiving rounding.

    ``k = density * n`` is computed in floating point, so a budget meant to be an
    integer can fall just below it (``0.29 * 100 = 28.999999999999996``); a relative
    tolerance of 1e-12 keeps that unit.
    """
    return math.floor(budget * (1.0 + 1e-12) + 1e-12)


def _check_mask_memory(n_masks: int, n_units: int) -> None:
    """Refuse a K that cannot fit: each step holds K x n float64 uniforms and K x n masks."""
    need = n_masks * n_units * 9
    try:
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):  # not POSIX: no limit known
        return
    if need > have:
        raise ValueError(
            f"n_masks={n_masks} needs {need / 2**30:.3g} GiB per step for the uniforms and "
            f"masks of {n_units} units (K x n x 9 bytes), more than this machine's "
            f"{have / 2**30:.3g} GiB of memory"
        )


def split_masks(state: TrainState, mask: BoolArray) -> list[BoolArray]:
    """Per-layer views of one flat mask of shape (n_units_total,)."""
    return split_scores(mask, state.offsets, copy=False)


def expected_density(state: TrainState) -> float:
    """``sum(s) / n``: the expected kept fraction of the initial units."""
    return float(state.score.sum(dtype=np.float64)) / state.n_units_initial


def check_parameters_finite(state: TrainState) -> None:
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
