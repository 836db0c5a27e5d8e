r"""Benchmarks of completely sparse training against dense baselines (``cpusparse bench``).

One run measures, per MLP shape and per density, with the repetitions of every
method interleaved (A, B, C, A, B, C, ...) so that ratios compare like with like:

- ``vrpge``: one :func:`cpusparse.training.train_step` with the VR-PGE estimator
  (``K`` forward passes, sparse backward), weight and neuron granularity, in two
  regimes:

  * ``start``: the start of training; every unit is stored and every score equals
    the density, so masks are sampled over all stored units;
  * ``steady``: the paper's converged regime; the scores are an exact-budget 0/1
    pattern (``floor(density * n_l)`` random units of every prunable layer at 1,
    the rest at 0) and :func:`cpusparse.training.compact` has dropped the zero-score
    units, so only the kept units are stored.

- ``straight-through``: the same engine with the chain-rule estimator: a dense
  forward and backward through the mask over every stored unit (it needs
  :math:`\partial L / \partial m` at every unit, so nothing is ever dropped).
- ``dense-engine``: the same network with dense :class:`~cpusparse.engine.layers.Linear`
  layers (NumPy/BLAS), one forward, backward and Adam step.
- ``torch``: PyTorch CPU, the same MLP, forward, backward and Adam step.
- ``sklearn``: :class:`sklearn.neural_network.MLPClassifier` with ``partial_fit``
  on one batch (one Adam step).

Alongside the medians the report counts the multiply-adds executed per iteration
(:func:`count_macs`) next to the dense count, and the peak memory of one step
(:mod:`tracemalloc`: NumPy and Python allocations during the step, not PyTorch's
allocator) plus the bytes of the persistent training state.

Convolution layer step (:func:`run_conv`): forward, input and weight gradient of a
128 -> 128 3 x 3 convolution on 14 x 14, batch 128, with
:class:`~cpusparse.engine.layers.conv.Conv2d` at channel granularity (densities 1, 0.5
and 0.25 of the output and of the input channels) and weight granularity (1/16 of the
weights), against ``torch.nn.Conv2d``, every thread count in the same rounds; plus the
peak memory of a weight-granularity step with and without chunking the im2col matrix
(:func:`conv_memory`).

Whole fits (:func:`run_fit`): :class:`~cpusparse.SparseMLPClassifier` fitted on
MNIST-5k (80/20 split, hidden layers 1024 and 1024, ``finetune_iter=0``, the
classifier's defaults otherwise) for every ``granularity:density:batch``
configuration, against a PyTorch dense loop of the same shape (and, for neuron
configurations, of the dense narrow MLP with the kept widths, :func:`narrow_hidden`),
in the same process, repetitions interleaved, medians of totals and epochs with the
accuracies of every run. Memory of those configurations (:func:`run_memory`): the
persistent state at step 0 (:func:`state_breakdown`), the temporaries of one step
(:func:`step_memory`) and the extra resident peak of a whole fit in a fresh
subprocess (:func:`fit_memory`), for PyTorch too.

Every heavy import (scikit-learn, PyTorch, matplotlib) happens inside the function
that needs it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple, TypedDict, TypeVar

import numpy as np

from .._typing import BoolArray, RNGLike
from ..engine.layers.base import STRAIGHT_THROUGH, TRAIN
from ._options import int_at_least

if TYPE_CHECKING:
    from ..engine.containers import Sequential
    from ..sklearn import SparseMLPClassifier
    from ..training.config import TrainConfig
    from ..training.state import TrainState

__all__ = [
    "DENSITIES",
    "ARCHITECTURES",
    "count_macs",
    "dense_macs",
    "iteration_macs",
    "steady_state",
    "interleaved_times",
    "machine_info",
    "run",
    "format_markdown",
    "plot",
    "startup_time",
    "FitConfig",
    "FIT_CONFIGS",
    "fit_data",
    "fit_units",
    "fit_row",
    "run_fit",
    "state_breakdown",
    "step_memory",
    "fit_memory",
    "run_memory",
    "narrow_hidden",
    "CONV_TARGETS",
    "run_conv",
    "conv_memory",
    "format_conv",
    "main",
]

DENSITIES = (0.5, 0.2, 0.1, 0.05, 0.01)
# (layer sizes, batch): the paper-sized MLP and LeNet-300-100.
ARCHITECTURES = (((784, 1024, 1024, 10), 256), ((784, 300, 100, 10), 128))
QUICK_DENSITIES = (0.1, 0.01)

_K = TypeVar("_K", bound=Hashable)


class MacCount(TypedDict):
    """What :func:`count_macs` returns."""

    forward: int
    backward: int
    n_active: list[int]


class IterationMacs(TypedDict):
    """What :func:`iteration_macs` returns."""

    forward: int
    backward: int
    total: int
    n_active: list[int]


# ---------------------------------------------------------------------------
# Multiply-add counts
# ---------------------------------------------------------------------------


def count_macs(
    network: Sequential,
    masks: Sequence[BoolArray | None],
    n_batch: int,
    *,
    straight_through: bool = False,
) -> MacCount:
    r"""Multiply-adds of one forward and one backward pass with the given masks.

    Parameters
    ----------
    network : Sequential
    masks : list of (ndarray of bool or None)
        One mask per prunable layer (aligned with ``network.prunable``); None
        keeps every stored unit.
    n_batch : int
    straight_through : bool, default=False
        Count the straight-through pass: every stored entry is computed.

    Returns
    -------
    dict
        ``forward`` and ``backward`` multiply-adds, and ``n_active`` (active
        weights per layer, dense layers counted in full).

    Notes
    -----
    A layer with :math:`a` active weights costs :math:`a B` multiply-adds forward
    and :math:`2 a B` backward (the weight gradient, SDDMM, and the input
    gradient), except the first layer, whose input gradient is skipped:
    :math:`a B`. Active weights follow the engine: an entry is active when its
    own bit (weight granularity) or its row's bit (neuron granularity) is set and
    its column was not dropped by the previous neuron-granularity layer. Dense
    :class:`~cpusparse.engine.layers.Linear` layers count the weights of their live
    inputs (every weight after a weight-granularity layer).
    Element-wise work (bias, ReLU, loss, optimizer) is not counted.

    Examples
    --------
    >>> from cpusparse.models import mlp
    >>> net = mlp(3, (4,), 2, rng=0)
    >>> count_macs(net, [None], 5)  # 12 sparse + 8 dense weights
    {'forward': 100, 'backward': 140, 'n_active': [12, 8]}
    """
    mode = STRAIGHT_THROUGH if straight_through else TRAIN
    forward = backward = 0
    n_active = []
    live = None
    pos = 0
    for i, layer in enumerate(network.layers):
        mask = masks[pos] if layer.n_masks else None
        pos += layer.n_masks
        a = layer.n_active(mask, live, mode)
        live = None if straight_through else layer.live_outputs(mask, live)
        n_active.append(a)
        forward += a * n_batch
        backward += (2 if i > 0 else 1) * a * n_batch
    return {"forward": forward, "backward": backward, "n_active": n_active}


def dense_macs(sizes: Sequence[int], n_batch: int) -> dict[str, int]:
    """Multiply-adds of one dense forward and backward pass of an MLP.

    Examples
    --------
    >>> dense_macs((3, 4, 2), 5)
    {'forward': 100, 'backward': 140, 'total': 240}
    """
    weights = [a * b for a, b in zip(sizes[:-1], sizes[1:], strict=True)]
    forward = sum(weights) * n_batch
    backward = 2 * forward - weights[0] * n_batch
    return {"forward": forward, "backward": backward, "total": forward + backward}


def iteration_macs(
    state: TrainState, config: TrainConfig, n_batch: int, *, rng: RNGLike = 0
) -> IterationMacs:
    """Multiply-adds of one :func:`~cpusparse.training.train_step` (K passes).

    Masks are drawn from ``state.score`` with a separate ``rng`` (the training
    stream is not touched); in the steady state every score is 0 or 1 and the
    count is exact.

    Returns
    -------
    dict
        ``forward``, ``backward`` and ``total`` multiply-adds of the step, and
        ``n_active`` of the first pass.
    """
    from ..method.estimators import get_score_estimator
    from ..method.masks import sample_masks
    from ..training.state import split_masks

    K = config.n_masks
    straight_through = get_score_estimator(config.score_estimator).mask_gradient
    n_backward = K if config.weight_grad == "mean" or straight_through else 1
    masks = sample_masks(state.score, K, rng=rng)
    forward = backward = 0
    first: MacCount | None = None
    for k in range(K):
        c = count_macs(
            state.network, split_masks(state, masks[k]), n_batch, straight_through=straight_through
        )
        first = first or c
        forward += c["forward"]
        if k < n_backward:
            backward += c["backward"]
    if not (first is not None):
        raise RuntimeError("internal error: K >= 1 passes")
    return {
        "forward": forward,
        "backward": backward,
        "total": forward + backward,
        "n_active": first["n_active"],
    }


# ---------------------------------------------------------------------------
# Setting up the measured configurations
# ---------------------------------------------------------------------------


def steady_state(state: TrainState, *, rng: RNGLike = 0) -> TrainState:
    """Put ``state`` in the converged regime: exact-budget 0/1 scores, compacted.

    Every prunable layer keeps ``floor(density * n_l)`` random units (score 1),
    the others get score 0 (so the total stays within the global budget); then
    :func:`~cpusparse.training.compact` drops the zero-score units.

    Returns
    -------
    TrainState
        The same object, updated in place.
    """
    from ..training.compaction import compact

    rng = np.random.default_rng(rng)
    density = state.budget / state.n_units_initial
    score = np.zeros_like(state.score)
    o = state.offsets
    for p in range(len(o) - 1):
        n = int(o[p + 1] - o[p])
        k = int(math.floor(density * n + 1e-9))
        score[o[p] + rng.choice(n, size=k, replace=False)] = 1
    state.score[:] = score
    # The optimizer states are still zero, so every unit at score 0 is dead.
    compact(state, state.score == 0)
    return state


def _batch(
    sizes: Sequence[int], n_batch: int, dtype: type[np.floating], seed: int
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((sizes[0], n_batch)).astype(dtype)
    y = rng.integers(0, sizes[-1], size=n_batch)
    return x, y


def _state_bytes(arrays: Iterable[object]) -> int:
    return int(sum(a.nbytes for a in arrays if isinstance(a, np.ndarray)))


_controller: Any = None


def _as_cpusparse_runs(fn: Callable[[], None]) -> Callable[[], None]:
    """``fn`` with BLAS on one thread, as inside a fit (see ``numba_threads``).

    cpusparse splits its BLAS work into chunks run on the Numba thread count
    (``run_tasks``), each on a single-threaded BLAS, while the dense baselines of the
    same group run on a BLAS of the row's thread count.
    """
    global _controller
    if _controller is None:
        from threadpoolctl import ThreadpoolController

        _controller = ThreadpoolController()

    def run() -> None:
        with _controller.limit(limits=1, user_api="blas"):
            fn()

    return run


def _engine_case(sizes, n_batch, density, granularity, estimator, regime, n_masks, seed):
    from ..models import mlp
    from ..training import TrainConfig, init_state, spawn_streams, train_step

    init_rng, data_rng, mask_rng = spawn_streams(seed)
    net = mlp(
        sizes[0], sizes[1:-1], sizes[-1], granularity=granularity, dtype=np.float32, rng=init_rng
    )
    # The start regime must stay uncompacted to be measured; the steady one runs with
    # the default compaction check (one pass over the scores per step) included.
    config = TrainConfig(density=density, n_masks=n_masks, score_estimator=estimator)
    if regime == "start":
        config = dataclasses.replace(config, compact_every=0)
    state = init_state(net, config, data_rng=data_rng, mask_rng=mask_rng)
    if regime == "steady":
        steady_state(state, rng=seed)
    x, y = _batch(sizes, n_batch, np.float32, seed)
    macs = iteration_macs(state, config, n_batch)

    @_as_cpusparse_runs
    def step():
        train_step(state, x, y, config)

    def state_arrays():
        arrays = [*state.param_list(), state.score]
        for d in (*state.weight_state, *state.score_state):
            arrays.extend(d.values())
        return arrays

    return step, macs, state_arrays


def _dense_engine_case(sizes, n_batch, seed):
    from ..engine import Linear, Sequential, softmax_cross_entropy
    from ..training.optim import Adam

    rng = np.random.default_rng(seed)
    layers = [
        Linear.random(
            a, b, activation="relu" if i < len(sizes) - 2 else None, dtype=np.float32, rng=rng
        )
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True))
    ]
    net = Sequential(layers)
    params = list(net.params().values())
    opt = Adam(1e-3)
    opt_state = opt.init_state(params)
    x, y = _batch(sizes, n_batch, np.float32, seed)

    def step():
        logits, caches = net._forward(x, [])
        _, dlogits = softmax_cross_entropy(logits, y)
        _, grads = net._backward(dlogits, caches)
        opt.step(params, list(grads.values()), opt_state)

    def state_arrays():
        return params + [a for d in opt_state for a in d.values()]

    return step, state_arrays


def _torch_case(sizes, n_batch, seed):
    import torch

    torch.manual_seed(seed)
    mods: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        mods.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            mods.append(torch.nn.ReLU())
    model = torch.nn.Sequential(*mods)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    xn, yn = _batch(sizes, n_batch, np.float32, seed)
    x = torch.from_numpy(np.ascontiguousarray(xn.T))
    y = torch.from_numpy(yn)

    def step():
        opt.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()

    def state_arrays():
        params = [p.detach().numpy() for p in model.parameters()]
        extra = [
            v.numpy()
            for s in opt.state.values()
            for v in s.values()
            if torch.is_tensor(v) and v.dim() > 0
        ]
        return params + extra

    return step, state_arrays


def _sklearn_case(sizes, n_batch, seed):
    import warnings

    from sklearn.neural_network import MLPClassifier

    xn, yn = _batch(sizes, n_batch, np.float32, seed)
    x = np.ascontiguousarray(xn.T)
    clf = MLPClassifier(
        hidden_layer_sizes=tuple(sizes[1:-1]),
        solver="adam",
        batch_size=n_batch,
        learning_rate_init=1e-3,
        random_state=seed,
    )
    classes = np.arange(sizes[-1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        clf.partial_fit(x, yn, classes=classes)

    def step():
        clf.partial_fit(x, yn)

    def state_arrays():
        opt = clf._optimizer
        return [*clf.coefs_, *clf.intercepts_, *opt.ms, *opt.vs]

    return step, state_arrays


def _peak_step_bytes(step: Callable[[], object]) -> int:
    """Peak bytes allocated (tracemalloc) during one call, above the start."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        step()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    return int(peak - base)


def interleaved_times(
    funcs: Mapping[_K, Callable[[], object]], *, repeats: int, warmup: int, rewarm: bool = True
) -> dict[_K, list[float]]:
    """Seconds per call of each callable, from round-robin rounds after warm-up.

    Interleaving (A, B, C, A, B, C, ...) exposes every candidate to the same drift
    in clock frequency and background load, so ratios from one run compare like
    with like; report medians, not minimums.

    Parameters
    ----------
    funcs : dict of str to callable
        Zero-argument callables, run in the dict's order within each round.
    repeats : int
        Timed rounds.
    warmup : int
        Untimed rounds first (JIT compilation, page faults).
    rewarm : bool, default=True
        Run each callable once, untimed, right before its timed call, so that it
        is measured with its own data in cache, as in a training loop where steps
        follow each other; without it a small sparse step is timed after another
        method has evicted its arrays from the caches.

    Returns
    -------
    dict of str to list of float
    """
    for _ in range(warmup):
        for f in funcs.values():
            f()
    times: dict[_K, list[float]] = {name: [] for name in funcs}
    for _ in range(repeats):
        for name, f in funcs.items():
            if rewarm:
                f()
            t0 = time.perf_counter()
            f()
            times[name].append(time.perf_counter() - t0)
    return times


def _set_threads(threads: int) -> None:
    """Numba's, BLAS's and PyTorch's thread counts for the measurements that follow.

    BLAS matters as much as Numba: the dense blocks of the neuron and channel masks,
    the dense layers and im2col's products run on it. Called as a function (not as a
    context manager), ``threadpool_limits`` keeps its limit after it returns.
    """
    import numba
    from threadpoolctl import threadpool_limits

    numba.set_num_threads(threads)
    threadpool_limits(limits=threads, user_api="blas")
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:
        pass


def _available(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def run(
    *,
    architectures: Iterable[tuple[Sequence[int], int]] = ARCHITECTURES,
    densities: Iterable[float] = DENSITIES,
    granularities: Iterable[str] = ("weight", "neuron"),
    repeats: int = 15,
    warmup: int = 2,
    threads: int = 1,
    n_masks: int = 2,
    baselines: Iterable[str] = ("dense-engine", "torch", "sklearn"),
    seed: int = 0,
    log: Callable[[str], object] | None = None,
) -> dict[str, Any]:
    """Measure every configuration; return the result dict (see :func:`main`).

    For each shape and density one interleaved group is timed: VR-PGE in both
    regimes and both granularities, straight-through in both granularities and
    the dense baselines. Ratios are computed inside the group; the dense
    baselines are therefore measured once per density and reported as the
    median over the groups.
    """
    from threadpoolctl import threadpool_limits

    _set_threads(threads)
    baselines = [
        b
        for b in baselines
        if b == "dense-engine" or _available("torch" if b == "torch" else "sklearn")
    ]
    rows = []
    with threadpool_limits(limits=threads):
        for sizes, n_batch in architectures:
            sizes = tuple(int(s) for s in sizes)
            arch = "-".join(map(str, sizes))
            dense = dense_macs(sizes, n_batch)
            for density in densities:
                cases = {}
                for gran in granularities:
                    for regime in ("start", "steady"):
                        cases[("vrpge", gran, regime)] = _engine_case(
                            sizes, n_batch, density, gran, "vrpge", regime, n_masks, seed
                        )
                    cases[("straight-through", gran, "start")] = _engine_case(
                        sizes, n_batch, density, gran, "straight-through", "start", n_masks, seed
                    )
                for b in baselines:
                    maker = {
                        "dense-engine": _dense_engine_case,
                        "torch": _torch_case,
                        "sklearn": _sklearn_case,
                    }[b]
                    step, arrays = maker(sizes, n_batch, seed)
                    cases[(b, "dense", "dense")] = (step, None, arrays)
                funcs = {key: case[0] for key, case in cases.items()}
                if log:
                    log(f"{arch} batch {n_batch} density {density:g}: timing {len(funcs)} methods")
                times = interleaved_times(funcs, repeats=repeats, warmup=warmup)
                med = {key: statistics.median(t) for key, t in times.items()}
                for key, (step, macs, arrays) in cases.items():
                    method, gran, regime = key
                    peak = _peak_step_bytes(step)
                    row = {
                        "architecture": arch,
                        "n_batch": n_batch,
                        "density": 1.0 if regime == "dense" else density,
                        "group_density": density,
                        "threads": threads,
                        "method": method,
                        "granularity": None if gran == "dense" else gran,
                        "regime": regime,
                        "median_ms": 1e3 * med[key],
                        "iqr_ms": [1e3 * float(np.percentile(times[key], q)) for q in (25, 75)],
                        "repeats": len(times[key]),
                        "peak_step_bytes": peak,
                        "state_bytes": _state_bytes(arrays()),
                        "macs": macs["total"] if macs else dense["total"],
                        "macs_forward": macs["forward"] if macs else dense["forward"],
                        "macs_backward": macs["backward"] if macs else dense["backward"],
                        "dense_macs": dense["total"],
                    }
                    for b in baselines:
                        row[f"speedup_vs_{b}"] = med[(b, "dense", "dense")] / med[key]
                    st = ("straight-through", gran, "start")
                    if method == "vrpge" and st in med:
                        row["speedup_vs_straight_through"] = med[st] / med[key]
                    rows.append(row)
                del cases, funcs
    return {
        "rows": rows,
        "threads": threads,
        "n_masks": n_masks,
        "repeats": repeats,
        "memory_method": "tracemalloc peak during one step (NumPy/Python allocations; "
        "PyTorch's allocator is not traced) + nbytes of the "
        "persistent state (parameters, optimizer state, scores)",
    }


# ---------------------------------------------------------------------------
# One convolution layer step (Conv2d) against torch.nn.Conv2d
# ---------------------------------------------------------------------------

CONV_CHANNELS, CONV_SIZE, CONV_BATCH, CONV_KERNEL = 128, 14, 128, 3
"""The timed convolution: 128 -> 128 channels, 3 x 3, padding 1, on 14 x 14, batch 128."""
CONV_DENSITIES = (1.0, 0.5, 0.25)
"""Channel densities of the channel-granularity rows (kept output and input channels)."""
CONV_WEIGHT_DENSITY = 1 / 16
"""Kept fraction of the weight-granularity row: the multiply-adds of channel 0.25."""
CONV_REPEATS, QUICK_CONV_REPEATS = 7, 3
CONV_MEMORY_CHANNELS, CONV_MEMORY_SIZE, CONV_MEMORY_BATCH = 64, 28, 256
"""The memory rows' convolution: 64 -> 64 channels, 3 x 3, padding 1, 28 x 28, batch 256."""
CONV_ONE_CHUNK_BYTES = 2**40
"""A ``max_cols_bytes`` that holds the im2col matrix of any measured batch in one chunk."""
CONV_MEMORY_REPEATS, QUICK_CONV_MEMORY_REPEATS = 3, 1
# (target name, threshold): see _conv_targets.
CONV_TARGETS = {
    "channel_0.25_vs_torch": 6.0,
    "dense_engine_vs_torch": 0.67,
    "channel_0.25_two_threads": 1.6,
}
"""The targets of the convolution rows (ratios; met when the measured ratio reaches them)."""


def _kept_units(n: int, density: float, rng: np.random.Generator) -> BoolArray:
    # Exactly max(1, round(density * n)) of n units, drawn without replacement.
    keep = np.zeros(n, dtype=bool)
    keep[rng.choice(n, size=max(1, round(density * n)), replace=False)] = True
    return keep


def _conv_data(
    n_channels: int, size: int, n_batch: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    # A random input and upstream gradient (C, N, H, W) of a "same" convolution.
    rng = np.random.default_rng(seed)
    shape = (n_channels, n_batch, size, size)
    return (
        rng.standard_normal(shape).astype(np.float32),
        rng.standard_normal(shape).astype(np.float32),
    )


def _conv_step(
    conv: Any, x: np.ndarray, dout: np.ndarray, mask: BoolArray, live: BoolArray | None
) -> Callable[[], None]:
    # The unvalidated step of a Conv2d: forward, then dX and dW.
    @_as_cpusparse_runs
    def step() -> None:
        _, cache = conv._forward(x, mask, live, TRAIN)
        conv._backward(dout, cache, True)

    return step


def _torch_conv_step(weight: np.ndarray, x: np.ndarray, dout: np.ndarray) -> Callable[[], None]:
    # torch.nn.Conv2d with the same weight and data (N, C, H, W): forward, dX and dW.
    import torch

    n_out, n_in, kh, kw = weight.shape
    layer = torch.nn.Conv2d(n_in, n_out, (kh, kw), padding=(kh // 2, kw // 2), bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.from_numpy(weight))
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(1, 0, 2, 3))).requires_grad_(True)
    dt = torch.from_numpy(np.ascontiguousarray(dout.transpose(1, 0, 2, 3)))

    def step() -> None:
        out = layer(xt)
        torch.autograd.grad(out, (xt, layer.weight), dt)

    return step


def _conv_macs(n_active: int, positions: int) -> dict[str, int]:
    # forward a*P; backward dX and dW, 2*a*P (P = N * H_out * W_out).
    forward = n_active * positions
    return {"forward": forward, "backward": 2 * forward, "total": 3 * forward}


def _conv_cases(
    n_channels: int,
    size: int,
    n_batch: int,
    kernel_size: int,
    densities: Sequence[float],
    weight_density: float,
    use_torch: bool,
    seed: int,
) -> tuple[dict[str, Callable[[], None]], dict[str, dict[str, Any]]]:
    """The timed steps by key, and what each row reports besides its times."""
    from ..engine.layers.conv import Conv2d

    rng = np.random.default_rng(seed)
    x, dout = _conv_data(n_channels, size, n_batch, seed)
    positions = n_batch * size * size  # "same" convolutions: H_out = H, W_out = W
    dense_active = n_channels * n_channels * kernel_size * kernel_size
    padding = kernel_size // 2
    funcs: dict[str, Callable[[], None]] = {}
    info: dict[str, dict[str, Any]] = {}
    channel = Conv2d.random(
        n_channels, n_channels, kernel_size, padding=padding, bias=False, rng=rng
    )
    if use_torch:
        funcs["torch"] = _torch_conv_step(channel.weight, x, dout)
        info["torch"] = {
            "method": "torch",
            "granularity": None,
            "density": 1.0,
            "kept_out": n_channels,
            "kept_in": n_channels,
            "n_active": dense_active,
        }
    for d in densities:
        mask = _kept_units(n_channels, d, rng)
        live = _kept_units(n_channels, d, rng)
        key = f"channel:{d:g}"
        funcs[key] = _conv_step(channel, x, dout, mask, live)
        info[key] = {
            "method": "cpusparse",
            "granularity": "channel",
            "density": d,
            "kept_out": int(mask.sum()),
            "kept_in": int(live.sum()),
            "n_active": channel.n_active(mask, live),
        }
    weight = Conv2d.random(
        n_channels,
        n_channels,
        kernel_size,
        padding=padding,
        bias=False,
        granularity="weight",
        rng=rng,
    )
    mask = _kept_units(weight.weight.size, weight_density, rng)
    key = f"weight:{weight_density:g}"
    funcs[key] = _conv_step(weight, x, dout, mask, None)
    info[key] = {
        "method": "cpusparse",
        "granularity": "weight",
        "density": weight_density,
        "kept_out": None,
        "kept_in": None,
        "n_active": weight.n_active(mask, None),
    }
    dense = _conv_macs(dense_active, positions)
    for row in info.values():
        macs = _conv_macs(row["n_active"], positions)
        row.update(
            macs=macs["total"],
            macs_forward=macs["forward"],
            macs_backward=macs["backward"],
            dense_macs=dense["total"],
            mac_ratio=dense["total"] / macs["total"],
        )
    return funcs, info


def _threads_interleaved(
    funcs: Mapping[_K, Callable[[], object]],
    thread_counts: Sequence[int],
    *,
    repeats: int,
    warmup: int,
    rewarm: bool = True,
) -> dict[tuple[int, _K], list[float]]:
    """:func:`interleaved_times` with the thread counts interleaved too.

    Every round runs each thread count in turn (the count is set between the timed
    calls, with :func:`_set_threads`), and within it every callable, so that the
    speed-ups over the thread counts come from one run as well.
    """
    for n in thread_counts:
        _set_threads(n)
        interleaved_times(funcs, repeats=0, warmup=warmup)
    times: dict[tuple[int, _K], list[float]] = {(n, k): [] for n in thread_counts for k in funcs}
    for _ in range(repeats):
        for n in thread_counts:
            _set_threads(n)
            for key, t in interleaved_times(funcs, repeats=1, warmup=0, rewarm=rewarm).items():
                times[(n, key)].extend(t)
    return times


def _conv_targets(rows: Sequence[Mapping[str, Any]], use_torch: bool) -> list[dict[str, Any]]:
    """Each target of :data:`CONV_TARGETS` with its measured ratio and whether it was met."""

    def find(threads: int, granularity: str, density: float) -> Mapping[str, Any] | None:
        for r in rows:
            if (r["threads"], r["granularity"], r["density"]) == (threads, granularity, density):
                return r
        return None

    out = []
    for threads in dict.fromkeys(r["threads"] for r in rows):
        for name, gran, density, what in (
            ("channel_0.25_vs_torch", "channel", 0.25, "cpusparse channel 0.25 vs PyTorch"),
            ("dense_engine_vs_torch", "channel", 1.0, "dense engine conv vs PyTorch"),
        ):
            r = find(threads, gran, density)
            if r is None:
                continue
            value = r["speedup_vs_torch"] if use_torch else None
            out.append(
                {
                    "name": name,
                    "description": what,
                    "threads": threads,
                    "threshold": CONV_TARGETS[name],
                    "value": value,
                    "met": None if value is None else bool(value >= CONV_TARGETS[name]),
                }
            )
    two = find(2, "channel", 0.25)
    if two is not None and two["speedup_vs_one_thread"] is not None:
        name = "channel_0.25_two_threads"
        value = two["speedup_vs_one_thread"]
        out.append(
            {
                "name": name,
                "description": "cpusparse channel 0.25, 2 threads over 1",
                "threads": 2,
                "threshold": CONV_TARGETS[name],
                "value": value,
                "met": bool(value >= CONV_TARGETS[name]),
            }
        )
    return out


def conv_memory(
    *,
    n_channels: int = CONV_MEMORY_CHANNELS,
    size: int = CONV_MEMORY_SIZE,
    n_batch: int = CONV_MEMORY_BATCH,
    kernel_size: int = CONV_KERNEL,
    weight_density: float = CONV_WEIGHT_DENSITY,
    max_cols_bytes: Sequence[int] | None = None,
    repeats: int = CONV_MEMORY_REPEATS,
    threads: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """Peak memory and time of one weight-granularity convolution step, chunked or not.

    The layer is ``Conv2d(n_channels -> n_channels, kernel_size, padding=kernel_size //
    2, granularity="weight")`` with a random mask keeping ``weight_density`` of the
    weights, on a random float32 input of ``n_channels x n_batch x size x size``; one
    row per ``max_cols_bytes`` (default: the layer's default and
    :data:`CONV_ONE_CHUNK_BYTES`, which holds the whole im2col matrix in one chunk).

    Parameters
    ----------
    n_channels, size, n_batch, kernel_size : int
    weight_density : float
    max_cols_bytes : sequence of int, optional
    repeats : int
        Interleaved timed repetitions (no untimed call before each: the step's
        arrays are far larger than the caches).
    threads : int
    seed : int

    Returns
    -------
    dict
        The shape, ``cols_bytes_unchunked`` (the im2col matrix of the whole batch,
        ``n_channels * kh * kw * n_batch * H_out * W_out * 4`` bytes) and ``rows``:
        per ``max_cols_bytes``, ``n_chunks``, ``peak_step_bytes`` (the
        :mod:`tracemalloc` peak of one step above its start: NumPy reports its
        allocations to it; the input and the upstream gradient exist before), and
        ``median_ms`` / ``iqr_ms`` of the step.
    """
    from ..engine.layers.conv import MAX_COLS_BYTES, Conv2d

    budgets = (MAX_COLS_BYTES, CONV_ONE_CHUNK_BYTES) if max_cols_bytes is None else max_cols_bytes
    rng = np.random.default_rng(seed)
    x, dout = _conv_data(n_channels, size, n_batch, seed)
    padding = kernel_size // 2
    base = Conv2d.random(n_channels, n_channels, kernel_size, padding=padding, bias=False, rng=rng)
    mask = _kept_units(base.weight.size, weight_density, rng)
    convs = {
        int(b): Conv2d(
            base.weight, None, padding=padding, granularity="weight", max_cols_bytes=int(b)
        )
        for b in budgets
    }
    funcs = {b: _conv_step(conv, x, dout, mask, None) for b, conv in convs.items()}
    _set_threads(threads)
    times = interleaved_times(funcs, repeats=repeats, warmup=1, rewarm=False)
    rows = []
    for b, conv in convs.items():
        rows.append(
            {
                "max_cols_bytes": b,
                "n_chunks": len(conv._chunks(x, conv.max_cols_bytes)[1]),
                "peak_step_bytes": _peak_step_bytes(funcs[b]),
                "median_ms": 1e3 * statistics.median(times[b]),
                "iqr_ms": [1e3 * float(np.percentile(times[b], q)) for q in (25, 75)],
                "repeats": len(times[b]),
            }
        )
    positions = n_batch * size * size
    return {
        "n_in": n_channels,
        "n_out": n_channels,
        "kernel_size": [kernel_size, kernel_size],
        "padding": padding,
        "height": size,
        "width": size,
        "n_batch": n_batch,
        "weight_density": weight_density,
        "n_active": next(iter(convs.values())).n_active(mask, None),
        "threads": threads,
        "cols_bytes_unchunked": n_channels * kernel_size**2 * positions * x.itemsize,
        "rows": rows,
    }


def run_conv(
    *,
    n_channels: int = CONV_CHANNELS,
    size: int = CONV_SIZE,
    n_batch: int = CONV_BATCH,
    kernel_size: int = CONV_KERNEL,
    densities: Sequence[float] = CONV_DENSITIES,
    weight_density: float = CONV_WEIGHT_DENSITY,
    repeats: int = CONV_REPEATS,
    warmup: int = 1,
    thread_counts: Sequence[int] = (1,),
    torch: bool | None = None,
    memory: bool = True,
    memory_channels: int = CONV_MEMORY_CHANNELS,
    memory_size: int = CONV_MEMORY_SIZE,
    memory_batch: int = CONV_MEMORY_BATCH,
    memory_max_cols_bytes: Sequence[int] | None = None,
    memory_repeats: int = CONV_MEMORY_REPEATS,
    seed: int = 0,
    log: Callable[[str], object] | None = None,
) -> dict[str, Any]:
    """Time one convolution layer step of cpusparse against ``torch.nn.Conv2d``.

    The step is the forward pass, the input gradient and the weight gradient of a
    ``n_channels -> n_channels`` float32 convolution, ``kernel_size`` square with
    padding ``kernel_size // 2`` and no bias, on ``n_channels x n_batch x size x
    size`` images. Rows:

    - ``torch``: ``torch.nn.Conv2d`` (input with ``requires_grad``, forward and
      ``torch.autograd.grad`` of the input and the weight), the baseline;
    - ``channel``: :class:`~cpusparse.engine.layers.conv.Conv2d` at channel
      granularity, for every density ``d`` of ``densities`` "on both sides": the mask
      keeps ``round(d * n_channels)`` random output channels and ``live`` as many
      random input channels, so the step does ``d**2`` of the multiply-adds (at 1.0,
      the dense engine convolution);
    - ``weight``: weight granularity, a random mask keeping ``weight_density`` of the
      weights (by default as many multiply-adds as channel 0.25).

    Every thread count of ``thread_counts`` is measured in the same rounds
    (:func:`_threads_interleaved`); each timed call follows an untimed call of the
    same step. With ``memory``, :func:`conv_memory` adds the memory rows at the
    first thread count.

    Parameters
    ----------
    n_channels, size, n_batch, kernel_size : int
    densities : sequence of float
    weight_density : float
    repeats, warmup : int
    thread_counts : sequence of int
    torch : bool, optional
        Time the PyTorch row; by default when PyTorch is installed. Without it the
        rows carry no ratio (``speedup_vs_torch`` is None) and ``torch_note`` says why.
    memory : bool, default=True
    memory_channels, memory_size, memory_batch : int
    memory_max_cols_bytes : sequence of int, optional
    memory_repeats : int
        See :func:`conv_memory`.
    seed : int
    log : callable, optional

    Returns
    -------
    dict
        The shape and settings, ``rows`` (one per method and thread count: ``method``,
        ``granularity``, ``density``, ``kept_out``, ``kept_in``, ``n_active``,
        ``threads``, ``median_ms``, ``iqr_ms``, ``repeats``, ``macs``,
        ``macs_forward``, ``macs_backward``, ``dense_macs``, ``mac_ratio`` = dense /
        executed multiply-adds, ``speedup_vs_torch`` = torch ms / this row's ms of the
        same thread count, ``speedup_vs_one_thread`` = this method's 1-thread ms /
        its ms here, None on 1 thread or without a 1-thread row), ``targets``
        (:data:`CONV_TARGETS`, measured and met or not), ``torch_note`` and, with
        ``memory``, ``memory`` (:func:`conv_memory`).
    """
    thread_counts = list(dict.fromkeys(int(n) for n in thread_counts))
    use_torch = _available("torch") if torch is None else bool(torch)
    funcs, info = _conv_cases(
        n_channels, size, n_batch, kernel_size, densities, weight_density, use_torch, seed
    )
    if log:
        log(
            f"convolution {n_channels}->{n_channels} {kernel_size}x{kernel_size} on "
            f"{size}x{size}, batch {n_batch}: timing {len(funcs)} methods on "
            f"{_threads_text(thread_counts)}"
        )
    times = _threads_interleaved(funcs, thread_counts, repeats=repeats, warmup=warmup)
    med = {key: statistics.median(t) for key, t in times.items()}
    rows = []
    for n in thread_counts:
        for key in funcs:
            rows.append(
                {
                    **info[key],
                    "threads": n,
                    "median_ms": 1e3 * med[(n, key)],
                    "iqr_ms": [1e3 * float(np.percentile(times[(n, key)], q)) for q in (25, 75)],
                    "repeats": len(times[(n, key)]),
                    "speedup_vs_torch": med[(n, "torch")] / med[(n, key)] if use_torch else None,
                    "speedup_vs_one_thread": (
                        med[(1, key)] / med[(n, key)] if n > 1 and 1 in thread_counts else None
                    ),
                }
            )
    result: dict[str, Any] = {
        "n_in": n_channels,
        "n_out": n_channels,
        "kernel_size": [kernel_size, kernel_size],
        "padding": kernel_size // 2,
        "height": size,
        "width": size,
        "n_batch": n_batch,
        "dtype": "float32",
        "thread_counts": thread_counts,
        "repeats": repeats,
        "rows": rows,
        "targets": _conv_targets(rows, use_torch),
        "torch_note": None
        if use_torch
        else "PyTorch is not installed: no PyTorch row, no ratio and no target against it",
        "method": CONV_METHOD,
    }
    if memory:
        if log:
            log(
                f"memory of a weight-granularity convolution {memory_channels}->"
                f"{memory_channels} on {memory_size}x{memory_size}, batch {memory_batch}"
            )
        result["memory"] = conv_memory(
            n_channels=memory_channels,
            size=memory_size,
            n_batch=memory_batch,
            kernel_size=kernel_size,
            weight_density=weight_density,
            max_cols_bytes=memory_max_cols_bytes,
            repeats=memory_repeats,
            threads=thread_counts[0],
            seed=seed,
        )
    return result


CONV_METHOD = (
    "one step = forward + input gradient + weight gradient of one float32 convolution "
    "without bias; cpusparse: Conv2d._forward then Conv2d._backward(need_dx=True) on "
    "channel-major (C, N, H, W) images, PyTorch: torch.nn.Conv2d on (N, C, H, W) with the "
    "same weight and data, forward then torch.autograd.grad of the input and the weight; "
    "channel rows keep round(d * C) random output channels and as many random live input "
    "channels (d^2 of the multiply-adds), the weight row a random mask of the weights; "
    "all methods and thread counts interleaved in every round, each timed call after an "
    "untimed one of the same step, medians reported; ratios = PyTorch ms / cpusparse ms "
    "of the same thread count; MACs = multiply-adds executed (forward a*P, backward 2*a*P "
    "for a active weights and P = N * H_out * W_out)"
)


# ---------------------------------------------------------------------------
# Whole fits of SparseMLPClassifier against a PyTorch dense loop
# ---------------------------------------------------------------------------


class FitConfig(NamedTuple):
    """One whole-fit configuration: ``granularity:density:batch``.

    Examples
    --------
    >>> str(FitConfig("weight", 0.1, 256))
    'weight:0.1:256'
    """

    granularity: str
    density: float
    n_batch: int

    def __str__(self) -> str:
        return f"{self.granularity}:{self.density:g}:{self.n_batch}"


FIT_CONFIGS = (
    FitConfig("weight", 0.1, 256),
    FitConfig("weight", 0.1, 64),
    FitConfig("weight", 0.01, 256),
    FitConfig("neuron", 0.1, 256),
    FitConfig("neuron", 0.3, 256),
)
"""Default configurations of the whole-fit rows."""
QUICK_FIT_CONFIGS = (FitConfig("weight", 0.1, 256), FitConfig("weight", 0.01, 256))
FIT_DATASET = "mnist5k"
FIT_DATASETS = ("mnist5k", "digits")
FIT_HIDDEN = (1024, 1024)
FIT_EPOCHS, QUICK_FIT_EPOCHS = 15, 2
FIT_REPEATS, QUICK_FIT_REPEATS = 3, 1
FIT_TEST_FRACTION = 0.2
TORCH_LR = 1e-3
"""Adam's (constant) learning rate in the PyTorch dense loop."""

# The JIT warm-up before the timed fits and the memory baselines: a tiny network on a
# few samples, small next to every measured fit.
_WARMUP_HIDDEN = (16,)
_WARMUP_SAMPLES = 256
_WARMUP_BATCH = 32
_WARMUP_EPOCHS = 2

# The clock of the whole-fit timings (a module attribute, so that tests can replace it).
_clock = time.perf_counter


class FitData(NamedTuple):
    """The data of the whole-fit rows: a stratified train/test split, sample-major."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    n_classes: int


class FitRun(TypedDict):
    """One timed fit: what :func:`run_fit` records of every repetition."""

    total_s: float
    epoch_s: list[float]
    train_accuracy: float
    test_accuracy: float


def fit_data(name: str = FIT_DATASET, *, seed: int = 0) -> FitData:
    """Load ``name`` (:func:`~cpusparse.tools.datasets.load_dataset`) and split it 80/20.

    The split is stratified with ``random_state=seed``, as ``cpusparse train`` splits
    the data sets without an official split.

    Examples
    --------
    >>> d = fit_data("digits")
    >>> d.x_train.shape, d.x_test.shape, d.n_classes
    ((1437, 64), (360, 64), 10)
    """
    from sklearn.model_selection import train_test_split

    from .datasets import load_dataset

    ds = load_dataset(name)
    x_train, x_test, y_train, y_test = train_test_split(
        ds.X, ds.y, test_size=FIT_TEST_FRACTION, stratify=ds.y, random_state=seed
    )
    return FitData(name, x_train, y_train, x_test, y_test, int(ds.n_classes))


def fit_units(n_features: int, hidden: Sequence[int], granularity: str) -> int:
    """Number of prunable units of the classifier's MLP (the hidden layers).

    Examples
    --------
    >>> fit_units(784, (1024, 1024), "weight"), fit_units(784, (1024, 1024), "neuron")
    (1851392, 2048)
    """
    from ..models import mlp

    # The layers count their own units (no switch on the granularity here); a network
    # with one output, initialised in float32, is a few megabytes at most.
    network = mlp(n_features, tuple(hidden), 1, granularity=granularity, rng=0)
    return int(sum(network.n_units()))


def narrow_hidden(hidden: Sequence[int], density: float) -> tuple[int, ...]:
    """Hidden widths of the dense *narrow* MLP of a neuron-level density.

    ``round(density * width)`` for every hidden layer (Python's rounding: to the
    nearest, ties to even), at least 1: the dense network with as many hidden
    units as a neuron mask of that density keeps, which one can train directly.

    Examples
    --------
    >>> narrow_hidden((1024, 1024), 0.1)
    (102, 102)
    >>> narrow_hidden((300, 100), 0.25), narrow_hidden((16,), 0.01)
    ((75, 25), (1,))
    """
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    return tuple(max(1, round(density * int(h))) for h in hidden)


def _drops_whole_units(granularity: str) -> bool:
    """Whether the MLP's masks at ``granularity`` drop whole hidden units (neurons).

    Then the kept network is a narrower dense MLP (:func:`narrow_hidden`). The layers
    answer (``units.zeroes_outputs``), as in :func:`fit_units`.
    """
    from ..models import mlp

    network = mlp(2, (2,), 1, granularity=granularity, rng=0)
    layers = network.prunable_layers()
    return all(layer.units is not None and layer.units.zeroes_outputs for layer in layers)


def _classifier(
    config: FitConfig, *, hidden: Sequence[int], epochs: int, threads: int, seed: int
) -> SparseMLPClassifier:
    from ..sklearn import SparseMLPClassifier

    return SparseMLPClassifier(
        hidden_layer_sizes=tuple(hidden),
        granularity=config.granularity,
        density=config.density,
        batch_size=config.n_batch,
        max_iter=epochs,
        finetune_iter=0,
        n_jobs=threads,
        random_state=seed,
    )


def _fit_cpusparse(
    data: FitData, config: FitConfig, *, hidden: Sequence[int], epochs: int, threads: int, seed: int
) -> FitRun:
    """One timed ``SparseMLPClassifier.fit``; epochs from ``history_["seconds"]``."""
    clf = _classifier(config, hidden=hidden, epochs=epochs, threads=threads, seed=seed)
    t0 = _clock()
    clf.fit(data.x_train, data.y_train)
    total = _clock() - t0
    return {
        "total_s": total,
        "epoch_s": [float(record["seconds"]) for record in clf.history_],
        "train_accuracy": float(clf.score(data.x_train, data.y_train)),
        "test_accuracy": float(clf.score(data.x_test, data.y_test)),
    }


def _torch_mlp(n_features: int, hidden: Sequence[int], n_classes: int, seed: int) -> Any:
    import torch

    torch.manual_seed(seed)
    sizes = (n_features, *hidden, n_classes)
    mods: list[torch.nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        mods.append(torch.nn.Linear(a, b))
        if i < len(sizes) - 2:
            mods.append(torch.nn.ReLU())
    return torch.nn.Sequential(*mods)


def _torch_loop(
    data: FitData, n_batch: int, *, hidden: Sequence[int], epochs: int, seed: int, lr: float
) -> tuple[Any, Any, float, list[float]]:
    """The dense loop: Adam, cross-entropy, a new shuffle every epoch.

    Returns the model, the optimizer, the total and the per-epoch seconds.
    """
    import torch

    t0 = _clock()
    model = _torch_mlp(data.x_train.shape[1], hidden, data.n_classes, seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    x = torch.from_numpy(np.ascontiguousarray(data.x_train, dtype=np.float32))
    y = torch.from_numpy(np.asarray(data.y_train, dtype=np.int64))
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    epoch_s = []
    model.train()
    for _ in range(epochs):
        e0 = _clock()
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, n_batch):
            idx = order[i : i + n_batch]
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
        epoch_s.append(_clock() - e0)
    return model, opt, _clock() - t0, epoch_s


def _torch_accuracy(model: Any, x: np.ndarray, y: np.ndarray) -> float:
    import torch

    model.eval()
    with torch.no_grad():
        pred = model(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))).argmax(1)
    return float((pred.numpy() == np.asarray(y)).mean())


def _fit_torch(
    data: FitData,
    n_batch: int,
    *,
    hidden: Sequence[int],
    epochs: int,
    threads: int,
    seed: int,
    lr: float = TORCH_LR,
) -> FitRun:
    """One timed PyTorch dense fit of the same architecture (``threads`` intra-op threads)."""
    import torch

    torch.set_num_threads(threads)
    model, _, total, epoch_s = _torch_loop(
        data, n_batch, hidden=hidden, epochs=epochs, seed=seed, lr=lr
    )
    return {
        "total_s": total,
        "epoch_s": epoch_s,
        "train_accuracy": _torch_accuracy(model, data.x_train, data.y_train),
        "test_accuracy": _torch_accuracy(model, data.x_test, data.y_test),
    }


def _warmup_data(data: FitData) -> FitData:
    n = min(_WARMUP_SAMPLES, data.x_train.shape[0])
    return data._replace(x_train=data.x_train[:n], y_train=data.y_train[:n])


def _warm_up(
    data: FitData, granularities: Iterable[str], *, threads: int, torch: bool, seed: int = 0
) -> None:
    """JIT warm-up: one tiny fit per granularity (and a tiny PyTorch loop)."""
    tiny = _warmup_data(data)
    for gran in dict.fromkeys(granularities):
        # A density that keeps units of the tiny network, compaction included.
        config = FitConfig(gran, 0.5, _WARMUP_BATCH)
        clf = _classifier(
            config, hidden=_WARMUP_HIDDEN, epochs=_WARMUP_EPOCHS, threads=threads, seed=seed
        )
        clf.fit(tiny.x_train, tiny.y_train)
        clf.score(tiny.x_train, tiny.y_train)
    if torch:
        _fit_torch(tiny, _WARMUP_BATCH, hidden=_WARMUP_HIDDEN, epochs=1, threads=threads, seed=seed)


def _median_runs(runs: Sequence[FitRun], prefix: str) -> dict[str, Any]:
    """Medians over the repetitions, with the runs themselves, under ``prefix``."""
    n_epochs = min(len(r["epoch_s"]) for r in runs)
    return {
        f"{prefix}_s": statistics.median(r["total_s"] for r in runs),
        f"{prefix}_per_epoch_s": statistics.median(
            sum(r["epoch_s"]) / len(r["epoch_s"]) for r in runs
        ),
        f"{prefix}_epoch_s": [
            statistics.median(r["epoch_s"][e] for r in runs) for e in range(n_epochs)
        ],
        f"{prefix}_train_accuracy": statistics.median(r["train_accuracy"] for r in runs),
        f"{prefix}_test_accuracy": statistics.median(r["test_accuracy"] for r in runs),
        f"{prefix}_runs": [dict(r) for r in runs],
    }


def fit_row(
    config: FitConfig,
    *,
    architecture: str,
    epochs: int,
    threads: int,
    cpusparse_runs: Sequence[FitRun],
    torch_runs: Sequence[FitRun] | None = None,
    torch_narrow_runs: Sequence[FitRun] | None = None,
    narrow_architecture: str | None = None,
) -> dict[str, Any]:
    """The JSON row of one configuration: medians of the runs and their ratio.

    ``speedup_vs_torch`` is the quotient of the median totals, ``torch_s /
    cpusparse_s`` (above 1: cpusparse is faster); ``*_per_epoch_s`` is the median
    over the runs of each run's mean epoch, ``*_epoch_s`` the median of every epoch.
    ``torch_narrow_runs`` (neuron configurations) are PyTorch fits of the dense
    narrow MLP ``narrow_architecture`` (:func:`narrow_hidden`); they add the
    ``torch_narrow_*`` medians and ``speedup_vs_torch_narrow`` = ``torch_narrow_s /
    cpusparse_s``.

    Examples
    --------
    >>> run = {"total_s": 2.0, "epoch_s": [1.0], "train_accuracy": 1.0, "test_accuracy": 0.5}
    >>> row = fit_row(FitConfig("weight", 0.1, 8), architecture="4-3-2", epochs=1, threads=1,
    ...               cpusparse_runs=[run], torch_runs=[dict(run, total_s=3.0)])
    >>> row["configuration"], row["speedup_vs_torch"]
    ('weight:0.1:8', 1.5)
    """
    if not cpusparse_runs:
        raise ValueError("cpusparse_runs must hold at least one run, got none")
    row: dict[str, Any] = {
        "configuration": str(config),
        "granularity": config.granularity,
        "density": config.density,
        "n_batch": config.n_batch,
        "architecture": architecture,
        "epochs": epochs,
        "threads": threads,
        "repeats": len(cpusparse_runs),
        **_median_runs(cpusparse_runs, "cpusparse"),
    }
    if torch_runs:
        row.update(_median_runs(torch_runs, "torch"))
        row["speedup_vs_torch"] = row["torch_s"] / row["cpusparse_s"]
        row["speedup_vs_torch_per_epoch"] = row["torch_per_epoch_s"] / row["cpusparse_per_epoch_s"]
    if torch_narrow_runs:
        row["torch_narrow_architecture"] = narrow_architecture
        row.update(_median_runs(torch_narrow_runs, "torch_narrow"))
        row["speedup_vs_torch_narrow"] = row["torch_narrow_s"] / row["cpusparse_s"]
        row["speedup_vs_torch_narrow_per_epoch"] = (
            row["torch_narrow_per_epoch_s"] / row["cpusparse_per_epoch_s"]
        )
    return row


def run_fit(
    data: FitData,
    configs: Iterable[FitConfig] = FIT_CONFIGS,
    *,
    hidden: Sequence[int] = FIT_HIDDEN,
    epochs: int = FIT_EPOCHS,
    repeats: int = FIT_REPEATS,
    threads: int = 1,
    torch: bool | None = None,
    seed: int = 0,
    log: Callable[[str], object] | None = None,
) -> dict[str, Any]:
    """Time whole fits of :class:`~cpusparse.SparseMLPClassifier` against PyTorch dense.

    Each configuration fits ``SparseMLPClassifier(hidden_layer_sizes=hidden,
    granularity=..., density=..., batch_size=..., max_iter=epochs, finetune_iter=0,
    n_jobs=threads, random_state=seed)`` (the classifier's defaults otherwise) on
    ``data.x_train``; the PyTorch loop trains the dense MLP of the same shape (ReLU,
    :class:`torch.nn.Linear`, Adam at :data:`TORCH_LR`, cross-entropy, the same batch
    size and epochs, a new shuffle every epoch) on ``threads`` intra-op threads. For a
    neuron configuration the same loop also trains the dense *narrow* MLP whose hidden
    widths are :func:`narrow_hidden` of the density (784-102-102-10 at 0.1): the
    honest alternative, a small dense network trained directly. After an untimed JIT
    warm-up (:func:`_warm_up`), ``repeats`` rounds run every configuration and its
    PyTorch loops in turn (cpusparse, torch, torch narrow, cpusparse, torch, ...), so
    that all candidates see the same drift; rows report medians.

    Parameters
    ----------
    data : FitData
        From :func:`fit_data`.
    configs : iterable of FitConfig
    hidden : sequence of int
    epochs, repeats, threads : int
    torch : bool, optional
        Run the PyTorch loop; by default when PyTorch is installed.
    seed : int
        ``random_state`` of every fit and PyTorch's seed (the same in every round).
    log : callable, optional

    Returns
    -------
    dict
        ``rows`` (one :func:`fit_row` per configuration) and the settings.
    """
    from threadpoolctl import threadpool_limits

    configs = list(configs)
    hidden = tuple(int(h) for h in hidden)
    use_torch = _available("torch") if torch is None else bool(torch)
    arch = "-".join(map(str, (data.x_train.shape[1], *hidden, data.n_classes)))
    _set_threads(threads)
    cps: dict[FitConfig, list[FitRun]] = {c: [] for c in configs}
    tor: dict[FitConfig, list[FitRun]] = {c: [] for c in configs}
    narrow = {
        c: narrow_hidden(hidden, c.density) for c in configs if _drops_whole_units(c.granularity)
    }
    nar: dict[FitConfig, list[FitRun]] = {c: [] for c in narrow}
    with threadpool_limits(limits=threads):
        if log:
            log(f"whole fits, {threads} thread(s): JIT warm-up")
        _warm_up(data, (c.granularity for c in configs), threads=threads, torch=use_torch)
        for r in range(repeats):
            for c in configs:
                if log:
                    log(f"whole fits, {threads} thread(s), round {r + 1}/{repeats}: {c}")
                cps[c].append(
                    _fit_cpusparse(
                        data, c, hidden=hidden, epochs=epochs, threads=threads, seed=seed
                    )
                )
                if use_torch:
                    tor[c].append(
                        _fit_torch(
                            data,
                            c.n_batch,
                            hidden=hidden,
                            epochs=epochs,
                            threads=threads,
                            seed=seed,
                        )
                    )
                if use_torch and c in narrow:
                    nar[c].append(
                        _fit_torch(
                            data,
                            c.n_batch,
                            hidden=narrow[c],
                            epochs=epochs,
                            threads=threads,
                            seed=seed,
                        )
                    )
    n_in, n_classes = data.x_train.shape[1], data.n_classes
    rows = [
        fit_row(
            c,
            architecture=arch,
            epochs=epochs,
            threads=threads,
            cpusparse_runs=cps[c],
            torch_runs=tor[c] if use_torch else None,
            torch_narrow_runs=nar[c] if use_torch and c in narrow else None,
            narrow_architecture="-".join(map(str, (n_in, *narrow[c], n_classes)))
            if c in narrow
            else None,
        )
        for c in configs
    ]
    return {
        "rows": rows,
        "dataset": data.name,
        "n_train": int(data.x_train.shape[0]),
        "n_test": int(data.x_test.shape[0]),
        "architecture": arch,
        "epochs": epochs,
        "repeats": repeats,
        "thread_counts": [threads],
        "torch_lr": TORCH_LR if use_torch else None,
        "method": FIT_METHOD,
    }


FIT_METHOD = (
    "SparseMLPClassifier.fit (finetune_iter=0, otherwise the classifier's defaults: Adam, "
    "cosine schedules, K = 2) against a PyTorch dense loop of the same shape (Adam at a "
    "constant lr, cross-entropy, the same batch size and epochs, reshuffled every epoch), "
    "both on the same threads, in the same process, after a JIT warm-up on a tiny fit; "
    "repetitions interleaved (cpusparse, torch, cpusparse, torch, ...), medians reported. "
    "Totals are the wall time of the fit (data conversion, initialisation and the final "
    "mask included); epochs are the classifier's history_ seconds and the loop's epochs; "
    "accuracies are not timed"
)


# ---------------------------------------------------------------------------
# Memory of the whole-fit configurations
# ---------------------------------------------------------------------------


def _classifier_state(
    data: FitData, config: FitConfig, *, hidden: Sequence[int], epochs: int, seed: int
) -> tuple[TrainState, TrainConfig]:
    """The training state and options ``SparseMLPClassifier.fit`` starts from."""
    from ..training import init_state, spawn_streams

    clf = _classifier(config, hidden=hidden, epochs=epochs, threads=1, seed=seed)
    dtype = clf._check_params()
    train_config = clf._train_config(data.x_train.shape[0])
    init_rng, data_rng, mask_rng = spawn_streams(seed)
    network = clf._network(data.x_train.shape[1], data.n_classes, dtype, init_rng)
    state = init_state(network, train_config, data_rng=data_rng, mask_rng=mask_rng)
    return state, train_config


def state_breakdown(state: TrainState) -> dict[str, int]:
    """Bytes of the persistent training state by part.

    ``parameters`` (weights and biases), ``structure`` (the CSR index arrays of the
    sparse layers), ``scores``, ``weight_optimizer`` and ``score_optimizer`` (their
    moments); every array counted once.

    Examples
    --------
    >>> from cpusparse.models import mlp
    >>> from cpusparse.training import TrainConfig, init_state, spawn_streams
    >>> i, d, m = spawn_streams(0)
    >>> s = init_state(mlp(3, (4,), 2, rng=i), TrainConfig(density=0.5), data_rng=d, mask_rng=m)
    >>> parts = state_breakdown(s)  # float32: 12 + 8 weights, 4 + 2 biases, 12 scores
    >>> parts["parameters"], parts["scores"], parts["structure"]  # int64 indptr and indices
    (104, 48, 136)
    >>> parts["weight_optimizer"], parts["score_optimizer"]  # Adam: 2 moments, an int64 step
    (240, 104)
    """
    seen: set[int] = set()

    def total(arrays: Iterable[object]) -> int:
        out = 0
        for a in arrays:
            if isinstance(a, np.ndarray) and id(a) not in seen:
                seen.add(id(a))
                out += int(a.nbytes)
        return out

    params = state.param_list()
    return {
        "parameters": total(params),
        "structure": total(state.network.arrays().values()),
        "scores": total([state.score]),
        "weight_optimizer": total(v for d in state.weight_state for v in d.values()),
        "score_optimizer": total(v for d in state.score_state for v in d.values()),
    }


def step_memory(
    data: FitData,
    config: FitConfig,
    *,
    hidden: Sequence[int] = FIT_HIDDEN,
    epochs: int = FIT_EPOCHS,
    seed: int = 0,
) -> dict[str, Any]:
    """Persistent state at step 0 and temporaries of one start-of-training step.

    ``state_bytes`` sums :func:`state_breakdown`; ``step_temporary_bytes`` is the
    :mod:`tracemalloc` peak of one :func:`~cpusparse.training.train_step` on the first
    ``n_batch`` training samples above the traced memory at its start (the state
    exists before tracing starts, so this is the peak minus the state), after an
    untimed step of an identical state (compilation is not traced);
    ``step_peak_bytes = state_bytes + step_temporary_bytes``. NumPy and Python
    allocations are traced, arrays allocated inside Numba kernels are not.
    """
    from ..training import train_step

    x = np.ascontiguousarray(data.x_train[: config.n_batch].T, dtype=np.float32)
    y = np.asarray(data.y_train[: config.n_batch], dtype=np.int64)
    warm, train_config = _classifier_state(data, config, hidden=hidden, epochs=epochs, seed=seed)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        train_step(warm, x, y, train_config)
    del warm
    state, train_config = _classifier_state(data, config, hidden=hidden, epochs=epochs, seed=seed)
    parts = state_breakdown(state)
    state_bytes = sum(parts.values())

    def step() -> None:
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            train_step(state, x, y, train_config)

    temporaries = _peak_step_bytes(step)
    return {
        "state_bytes": state_bytes,
        "state_breakdown": parts,
        "step_temporary_bytes": temporaries,
        "step_peak_bytes": state_bytes + temporaries,
        "step_temporary_fraction": temporaries / state_bytes,
    }


def _proc_status_bytes(field: str) -> int | None:
    """A ``kB`` field of ``/proc/self/status`` (Linux) in bytes, None elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return 1024 * int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return None


def _peak_rss_bytes() -> tuple[int, str]:
    """The process's resident high-water mark in bytes, and the counter it comes from.

    ``VmHWM`` of ``/proc/self/status`` where it exists (Linux): it belongs to this
    process's memory map, created at exec. ``ru_maxrss`` otherwise, which Linux
    carries over from the parent through fork and exec (a child of a large process
    starts with the parent's resident size), so it is only the fallback.
    """
    hwm = _proc_status_bytes("VmHWM")
    if hwm is not None:
        return hwm, "VmHWM"
    import resource

    value = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return (int(value) if sys.platform == "darwin" else 1024 * int(value)), "ru_maxrss"


def _reset_peak_rss() -> bool:
    """Reset ``VmHWM`` to the current resident size (Linux >= 4.0); True if done."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _memory_child(payload: str) -> None:
    """The body of a fit-memory subprocess; prints one JSON line (see :func:`fit_memory`)."""
    import gc

    args = json.loads(payload)
    from threadpoolctl import threadpool_limits

    with np.load(args["data"]) as f:  # the training part, written by fit_memory
        x, y = f["x_train"], f["y_train"]
    data = FitData(args["name"], x, y, x[:0], y[:0], int(args["n_classes"]))
    hidden, epochs, threads, seed = args["hidden"], args["epochs"], args["threads"], args["seed"]
    config = FitConfig(args["granularity"], args["density"], args["n_batch"])
    out: dict[str, Any] = {}

    def baseline() -> None:
        gc.collect()
        reset = _reset_peak_rss()
        out["baseline_peak_bytes"], counter = _peak_rss_bytes()
        out["baseline_rss_bytes"] = _proc_status_bytes("VmRSS")
        out["counter"] = counter + (", reset at the baseline" if reset else "")

    with threadpool_limits(limits=threads):
        if args["method"] == "torch":
            import torch

            torch.set_num_threads(threads)
            tiny = _warmup_data(data)
            _torch_loop(
                tiny, _WARMUP_BATCH, hidden=_WARMUP_HIDDEN, epochs=1, seed=seed, lr=TORCH_LR
            )
            del tiny
            baseline()
            model, opt, _, _ = _torch_loop(
                data, config.n_batch, hidden=hidden, epochs=epochs, seed=seed, lr=TORCH_LR
            )
            out["peak_bytes"] = _peak_rss_bytes()[0]
            params = [p.detach() for p in model.parameters()]
            moments = [
                v for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim()
            ]
            out["state_bytes"] = int(sum(t.numel() * t.element_size() for t in params + moments))
        else:
            _warm_up(data, [config.granularity], threads=threads, torch=False, seed=seed)
            baseline()
            clf = _classifier(config, hidden=hidden, epochs=epochs, threads=threads, seed=seed)
            clf.fit(data.x_train, data.y_train)
            out["peak_bytes"] = _peak_rss_bytes()[0]
    print(json.dumps(out))


_MEMORY_CODE = (
    "import sys; from cpusparse.tools.bench import _memory_child; _memory_child(sys.argv[1])"
)


def fit_memory(
    method: str,
    data: FitData,
    config: FitConfig,
    *,
    hidden: Sequence[int] = FIT_HIDDEN,
    epochs: int = FIT_EPOCHS,
    threads: int = 1,
    seed: int = 0,
) -> dict[str, Any]:
    """A whole fit's extra process peak, measured in a fresh subprocess.

    The subprocess (``sys.executable -c ...``) imports cpusparse (and PyTorch for
    ``method="torch"``), loads the training part of ``data`` (from a temporary
    ``.npz`` file) and runs the tiny warm-up fit of :func:`run_fit`; then it reads
    its resident high-water mark (the
    baseline), runs the whole fit (the classifier's, or the PyTorch dense loop with
    ``config.n_batch``) and reads the high-water mark again. The difference is the
    memory the whole fit needed above everything before it.

    The high-water mark is ``VmHWM`` (Linux), first reset to the current resident
    size through ``/proc/self/clear_refs`` so that earlier peaks (imports, data
    loading) do not hide part of the fit; without the reset the difference is a lower
    bound. Without ``/proc`` it is ``ru_maxrss``, which a child inherits from its
    parent through fork: then the difference is 0 whenever the parent was larger.

    Returns
    -------
    dict
        ``fit_baseline_peak_bytes``, ``fit_peak_bytes``, ``fit_extra_peak_bytes``
        (their difference), ``fit_baseline_rss_bytes`` (the resident size at the
        baseline, None without ``/proc``), ``fit_peak_counter`` (which counter, and
        whether it was reset) and, for PyTorch, ``state_bytes`` (parameters and Adam
        moments after the fit).
    """
    if method not in ("cpusparse", "torch"):
        raise ValueError(f"method must be 'cpusparse' or 'torch', got {method!r}")
    payload: dict[str, Any] = {
        "method": method,
        "name": data.name,
        "n_classes": data.n_classes,
        "granularity": config.granularity,
        "density": config.density,
        "n_batch": config.n_batch,
        "hidden": list(hidden),
        "epochs": epochs,
        "threads": threads,
        "seed": seed,
    }
    import tempfile

    with tempfile.TemporaryDirectory(prefix="cpusparse-bench-") as tmp:
        payload["data"] = os.path.join(tmp, "data.npz")
        np.savez(payload["data"], x_train=data.x_train, y_train=data.y_train)
        proc = subprocess.run(
            [sys.executable, "-c", _MEMORY_CODE, json.dumps(payload)],
            capture_output=True,
            text=True,
            check=False,
        )
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        err = [line for line in proc.stderr.splitlines() if line.strip()]
        raise RuntimeError(
            f"the {method} memory subprocess failed (exit {proc.returncode}): "
            f"{err[-1] if err else 'no output'}"
        )
    child = json.loads(lines[-1])
    out = {
        "fit_baseline_peak_bytes": child["baseline_peak_bytes"],
        "fit_peak_bytes": child["peak_bytes"],
        "fit_extra_peak_bytes": child["peak_bytes"] - child["baseline_peak_bytes"],
        "fit_baseline_rss_bytes": child["baseline_rss_bytes"],
        "fit_peak_counter": child["counter"],
    }
    if "state_bytes" in child:
        out["state_bytes"] = child["state_bytes"]
    return out


def run_memory(
    data: FitData,
    configs: Iterable[FitConfig] = FIT_CONFIGS,
    *,
    hidden: Sequence[int] = FIT_HIDDEN,
    epochs: int = FIT_EPOCHS,
    threads: int = 1,
    torch: bool | None = None,
    seed: int = 0,
    log: Callable[[str], object] | None = None,
) -> dict[str, Any]:
    """Memory rows of the whole-fit configurations (see :data:`MEMORY_METHOD`).

    One cpusparse row per configuration (:func:`step_memory` and
    :func:`fit_memory`) and one PyTorch dense row per batch size (:func:`fit_memory`).
    """
    configs = list(configs)
    hidden = tuple(int(h) for h in hidden)
    use_torch = _available("torch") if torch is None else bool(torch)
    rows: list[dict[str, Any]] = []
    for c in configs:
        if log:
            log(f"memory of {c}: one step, then a whole fit in a subprocess")
        row: dict[str, Any] = {
            "method": "cpusparse",
            "configuration": str(c),
            "granularity": c.granularity,
            "density": c.density,
            "n_batch": c.n_batch,
            "epochs": epochs,
            "threads": threads,
        }
        row.update(step_memory(data, c, hidden=hidden, epochs=epochs, seed=seed))
        row.update(
            fit_memory(
                "cpusparse", data, c, hidden=hidden, epochs=epochs, threads=threads, seed=seed
            )
        )
        row["fit_extra_peak_fraction"] = row["fit_extra_peak_bytes"] / row["state_bytes"]
        rows.append(row)
    if use_torch:
        for n_batch in dict.fromkeys(c.n_batch for c in configs):
            if log:
                log(f"memory of the PyTorch dense loop, batch {n_batch}: a fit in a subprocess")
            c = FitConfig("dense", 1.0, n_batch)
            mem = fit_memory(
                "torch", data, c, hidden=hidden, epochs=epochs, threads=threads, seed=seed
            )
            rows.append(
                {
                    "method": "torch",
                    "configuration": f"dense:{n_batch}",
                    "granularity": None,
                    "density": 1.0,
                    "n_batch": n_batch,
                    "epochs": epochs,
                    "threads": threads,
                    "state_bytes": mem["state_bytes"],
                    "step_temporary_bytes": None,
                    "step_peak_bytes": None,
                    "step_temporary_fraction": None,
                    **{k: v for k, v in mem.items() if k != "state_bytes"},
                    "fit_extra_peak_fraction": mem["fit_extra_peak_bytes"] / mem["state_bytes"],
                }
            )
    return {"rows": rows, "threads": threads, "epochs": epochs, "method": MEMORY_METHOD}


MEMORY_METHOD = (
    "state = bytes of the persistent training state at step 0 (cpusparse: parameters, the "
    "CSR index arrays, scores and both optimizers' moments; PyTorch: parameters and Adam "
    "moments); step temporaries = tracemalloc peak of one start-of-training train_step "
    "above its start, i.e. the peak minus the state (NumPy/Python allocations; not traced "
    "for PyTorch, whose allocator tracemalloc cannot see); fit extra peak = the resident "
    "high-water mark after a whole fit minus the same mark at a baseline taken in a fresh "
    "subprocess per row after the imports, the data loading and a JIT warm-up on a tiny "
    "fit (hidden (16,), 256 samples). The mark is Linux's VmHWM, reset to the resident size "
    "at the baseline (/proc/self/clear_refs), so that earlier peaks do not hide part of the "
    "fit; ru_maxrss is the fallback without /proc, a lower bound (it is a high-water mark "
    "that a child even inherits from its parent through fork)"
)


# ---------------------------------------------------------------------------
# Reports
# ---------------------------------------------------------------------------


def _row_threads(result: Mapping[str, Any], row: Mapping[str, Any]) -> int:
    # Rows of results written before rows carried their thread count.
    return int(row.get("threads", result["threads"]))


def _summary_rows(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Rows for the tables: dense baselines collapsed to one row per architecture.

    The dense baselines are timed in every density group; their row carries the
    median over the groups (of the same thread count).
    """
    out = []
    dense_seen: dict[tuple[str, str, int], list[Mapping[str, Any]]] = {}
    for r in result["rows"]:
        if r["regime"] == "dense":
            key = (r["architecture"], r["method"], _row_threads(result, r))
            dense_seen.setdefault(key, []).append(r)
        else:
            out.append(dict(r))
    for rs in dense_seen.values():
        r = dict(rs[0])
        r["median_ms"] = statistics.median(x["median_ms"] for x in rs)
        r["peak_step_bytes"] = max(x["peak_step_bytes"] for x in rs)
        out.append(r)
    return out


def _thread_counts(result: Mapping[str, Any]) -> list[int]:
    return [int(t) for t in result.get("thread_counts", [result["threads"]])]


def _threads_text(counts: Sequence[int]) -> str:
    return " and ".join(map(str, counts)) + (" thread(s)" if len(counts) == 1 else " threads")


def _mb(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**20:.2f}"


def _cell(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _format_fit(fit: Mapping[str, Any]) -> list[str]:
    """The markdown section of the whole-fit rows."""
    lines = [
        f"## Whole fit: SparseMLPClassifier on {fit['dataset']} ({fit['n_train']} train / "
        f"{fit['n_test']} test), MLP {fit['architecture']}, {fit['epochs']} epochs, medians "
        f"of {fit['repeats']} interleaved repetitions",
        "",
        f"Method: {fit['method']}"
        + (f"; PyTorch Adam lr {fit['torch_lr']:g}." if fit.get("torch_lr") else "."),
        "`torch/cpusparse` = median torch total / median cpusparse total (above 1: cpusparse "
        "is faster); s/epoch = median over the runs of each run's mean epoch; accuracies "
        "are cpusparse / torch (the fixed mask of the fit for cpusparse).",
        "",
    ]
    narrow = any("torch_narrow_s" in r for r in fit["rows"])
    if narrow:
        lines[-1:-1] = [
            "`narrow` (neuron configurations) = the same PyTorch loop training the dense "
            "narrow MLP whose hidden widths are round(density x width), as many hidden units "
            "as the neuron mask keeps: the honest alternative, a small dense network trained "
            "directly; `narrow/cpusparse` = its median total / cpusparse's (below 1: the "
            "narrow dense network trains faster).",
        ]
    head = [
        "configuration",
        "threads",
        "epochs",
        "cpusparse s",
        "cpusparse s/epoch",
        "torch s",
        "torch s/epoch",
        "torch/cpusparse",
        "test acc.",
        "train acc.",
    ]
    if narrow:
        head += ["narrow MLP", "narrow s", "narrow/cpusparse", "narrow test acc."]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|---|" + "---:|" * (len(head) - 1))
    for r in fit["rows"]:
        torch_acc = r.get("torch_test_accuracy")
        torch_train = r.get("torch_train_accuracy")
        cells = [
            r["configuration"],
            str(r["threads"]),
            str(r["epochs"]),
            f"{r['cpusparse_s']:.2f}",
            f"{r['cpusparse_per_epoch_s']:.3f}",
            _cell(r.get("torch_s"), ".2f"),
            _cell(r.get("torch_per_epoch_s"), ".3f"),
            _cell(r.get("speedup_vs_torch"), ".2f", "x"),
            f"{r['cpusparse_test_accuracy']:.3f} / {_cell(torch_acc, '.3f')}",
            f"{r['cpusparse_train_accuracy']:.3f} / {_cell(torch_train, '.3f')}",
        ]
        if narrow:
            cells += [
                r.get("torch_narrow_architecture") or "-",
                _cell(r.get("torch_narrow_s"), ".2f"),
                _cell(r.get("speedup_vs_torch_narrow"), ".2f", "x"),
                _cell(r.get("torch_narrow_test_accuracy"), ".3f"),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _format_memory(memory: Mapping[str, Any]) -> list[str]:
    """The markdown section of the memory rows."""
    lines = [
        f"## Memory of the whole-fit configurations ({memory['threads']} thread(s), "
        f"{memory['epochs']} epochs)",
        "",
        f"Method: {memory['method']}. The state here counts the CSR index arrays, which "
        "the state MB of the per-iteration tables leaves out.",
        "",
    ]
    head = [
        "method",
        "configuration",
        "state MB",
        "step temporaries MB",
        "temporaries / state",
        "fit extra peak MB",
        "extra peak / state",
        "baseline peak / rss MB",
    ]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|---|---|" + "---:|" * (len(head) - 2))
    for r in memory["rows"]:
        cells = [
            r["method"],
            r["configuration"],
            _mb(r["state_bytes"]),
            _mb(r["step_temporary_bytes"]),
            _cell(r["step_temporary_fraction"], ".2f", "x"),
            _mb(r["fit_extra_peak_bytes"]),
            _cell(r["fit_extra_peak_fraction"], ".2f", "x"),
            f"{_mb(r['fit_baseline_peak_bytes'])} / {_mb(r['fit_baseline_rss_bytes'])}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    return lines


def _power_of_two(value: int) -> str:
    return f"2^{value.bit_length() - 1}" if value > 0 and value & (value - 1) == 0 else str(value)


def _conv_label(row: Mapping[str, Any]) -> str:
    return "torch (dense)" if row["method"] == "torch" else f"cpusparse {row['granularity']}"


def format_conv(conv: Mapping[str, Any]) -> str:
    """Markdown of :func:`run_conv`: the step table, the targets and the memory lines.

    Examples
    --------
    >>> row = {"method": "cpusparse", "granularity": "channel", "density": 0.5,
    ...        "kept_out": 2, "kept_in": 2, "threads": 1, "median_ms": 2.0, "macs": 10**6,
    ...        "mac_ratio": 4.0, "speedup_vs_torch": 3.0, "speedup_vs_one_thread": None}
    >>> conv = {"n_in": 4, "n_out": 4, "kernel_size": [3, 3], "padding": 1, "height": 6,
    ...         "width": 6, "n_batch": 2, "thread_counts": [1], "repeats": 1, "rows": [row],
    ...         "targets": [], "torch_note": None, "method": "..."}
    >>> print(format_conv(conv).splitlines()[6])
    | cpusparse channel | 0.5 | 2 / 2 | 1 | 2.000 | 1.0 | 4.0x | 3.00x | - |
    """
    kh, kw = conv["kernel_size"]
    lines = [
        f"## Convolution layer step: {conv['n_in']} -> {conv['n_out']} channels, {kh}x{kw}, "
        f"padding {conv['padding']}, {conv['height']}x{conv['width']}, batch "
        f"{conv['n_batch']}, float32 ({_threads_text(conv['thread_counts'])}, medians of "
        f"{conv['repeats']} interleaved repetitions)",
        "",
        f"Method: {conv['method']}. `vs torch` = PyTorch ms / this row's ms (above 1: "
        "faster than PyTorch); `vs 1 thread` = the same row's 1-thread ms / its ms here."
        + (f" {conv['torch_note']}." if conv.get("torch_note") else ""),
        "",
    ]
    head = ["method", "density", "kept out / in", "threads", "ms/step", "MACs (M)"]
    head += ["dense/MACs", "vs torch", "vs 1 thread"]
    lines.append("| " + " | ".join(head) + " |")
    lines.append("|---|" + "---:|" * (len(head) - 1))
    for r in conv["rows"]:
        kept = "-" if r["kept_out"] is None else f"{r['kept_out']} / {r['kept_in']}"
        cells = [
            _conv_label(r),
            f"{r['density']:g}",
            kept,
            str(r["threads"]),
            f"{r['median_ms']:.3f}",
            f"{r['macs'] / 1e6:.1f}",
            f"{r['mac_ratio']:.1f}x",
            _cell(r["speedup_vs_torch"], ".2f", "x"),
            _cell(r["speedup_vs_one_thread"], ".2f", "x"),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    if conv["targets"]:
        lines.append("Targets:")
        lines.append("")
        for t in conv["targets"]:
            verdict = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
            lines.append(
                f"- {t['description']} >= {t['threshold']:g}x ({t['threads']} thread(s)): "
                f"{_cell(t['value'], '.2f', 'x')}, {verdict}"
            )
        lines.append("")
    if "memory" in conv:
        m = conv["memory"]
        mkh, mkw = m["kernel_size"]
        lines += [
            f"Peak memory of one weight-granularity step ({m['n_in']} -> {m['n_out']} "
            f"channels, {mkh}x{mkw}, padding {m['padding']}, {m['height']}x{m['width']}, "
            f"batch {m['n_batch']}, a random mask keeping {m['weight_density']:g} of the "
            f"weights, {m['threads']} thread(s)): tracemalloc peak above the step's start "
            "(NumPy reports its allocations to it), MB = 10^6 bytes. The im2col matrix of "
            f"the whole batch would take {m['cols_bytes_unchunked'] / 1e6:.1f} MB.",
            "",
        ]
        for r in m["rows"]:
            lines.append(
                f"- max_cols_bytes = {_power_of_two(r['max_cols_bytes'])} ({r['n_chunks']} "
                f"chunk{'s' if r['n_chunks'] != 1 else ''}): peak "
                f"{r['peak_step_bytes'] / 1e6:.1f} MB, {r['median_ms']:.1f} ms per step "
                f"(median of {r['repeats']})"
            )
        lines.append("")
    return "\n".join(lines)


def format_markdown(result: Mapping[str, Any]) -> str:
    """Markdown tables: one per architecture (and thread count), then the convolution step.

    Then the whole fits, their memory, the start-up time and the machine.
    """
    counts = _thread_counts(result)
    lines = [
        f"# cpusparse bench: time per training iteration ({_threads_text(counts)}, "
        f"K = {result['n_masks']}, float32, medians of {result['repeats']} interleaved "
        "repetitions)",
        "",
        "Regimes: `start` = start of training, every unit stored, scores = density; "
        "`steady` = idealised convergence, exact-budget 0/1 scores and zero-score units "
        "compacted away (a lower bound: real runs keep more units stored); "
        "straight-through always computes every stored unit. Each timed call follows an "
        "untimed call of the same method (warm caches, as in a training loop). Speed-ups "
        "are ratios of medians from the same interleaved group. MACs = multiply-adds "
        "executed per "
        "iteration (K forward + K backward passes for the engine, one pass for dense).",
        "",
        f"Memory: {result['memory_method']}.",
        "",
    ]
    rows = result["rows"]
    baselines = (
        [
            k[len("speedup_vs_") :]
            for k in rows[0]
            if k.startswith("speedup_vs_") and k != "speedup_vs_straight_through"
        ]
        if rows
        else []
    )
    summary = _summary_rows(result)
    groups = dict.fromkeys((r["architecture"], _row_threads(result, r)) for r in rows)
    for arch, threads in groups:
        rs = [r for r in rows if r["architecture"] == arch]
        title = f"## MLP {arch}, batch {rs[0]['n_batch']}"
        lines += [title + (f", {threads} thread(s)" if len(counts) > 1 else ""), ""]
        head = (
            ["method", "gran.", "regime", "density", "ms/iter", "MACs (M)", "dense/MACs"]
            + [f"vs {b}" for b in baselines]
            + ["vs straight-through", "peak step MB", "state MB"]
        )
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * 3 + "---:|" * (len(head) - 3))
        sr = [
            r for r in summary if r["architecture"] == arch and _row_threads(result, r) == threads
        ]
        order = {"vrpge": 0, "straight-through": 1}
        sr.sort(
            key=lambda r: (
                order.get(r["method"], 2),
                r["granularity"] or "",
                r["regime"],
                -r["density"],
            )
        )
        for r in sr:
            dense_row = r["regime"] == "dense"
            cells = [
                r["method"],
                r["granularity"] or "-",
                r["regime"],
                f"{r['density']:g}",
                f"{r['median_ms']:.3f}",
                f"{r['macs'] / 1e6:.1f}",
                f"{r['dense_macs'] / r['macs']:.1f}x",
            ]
            for b in baselines:
                cells.append("-" if dense_row else f"{r[f'speedup_vs_{b}']:.2f}x")
            st = r.get("speedup_vs_straight_through")
            cells.append("-" if st is None else f"{st:.2f}x")
            cells.append(f"{r['peak_step_bytes'] / 2**20:.2f}")
            cells.append(f"{r['state_bytes'] / 2**20:.2f}")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    if "conv" in result:
        lines += format_conv(result["conv"]).splitlines() + [""]
    if "fit" in result:
        lines += _format_fit(result["fit"])
    if "fit_memory" in result:
        lines += _format_memory(result["fit_memory"])
    if "startup" in result:
        s = result["startup"]
        lines += [
            f"Second process, import to end of the first train_step (warm Numba cache): "
            f"{s['first_step_s']:.3f} s (import cpusparse {s['import_s']:.3f} s; whole "
            f"process {s['process_s']:.3f} s).",
            "",
        ]
    if "machine" in result:
        lines.append("Machine: " + ", ".join(f"{k}={v}" for k, v in result["machine"].items()))
    return "\n".join(lines) + "\n"


def plot(result: Mapping[str, Any], path: str | os.PathLike[str]) -> None:
    """Time per iteration against density, log-log; one line per method, dashed dense.

    One panel per architecture and thread count, then, with ``result["conv"]``
    (:func:`run_conv`), one panel per thread count of the convolution step: its time
    against the fraction of the dense multiply-adds it executes.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    groups = list(dict.fromkeys((r["architecture"], _row_threads(result, r)) for r in rows))
    conv = result.get("conv")
    conv_threads = list(dict.fromkeys(r["threads"] for r in conv["rows"])) if conv else []
    n_panels = max(1, len(groups) + len(conv_threads))
    summary = _summary_rows(result)
    n_cols = min(3, n_panels)  # a grid, at most three panels wide
    n_rows = -(-n_panels // n_cols)
    fig, grid = plt.subplots(
        n_rows, n_cols, figsize=(6.5 * n_cols, 4.8 * n_rows + 0.8), squeeze=False
    )
    axes = list(grid.flat)
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    for ax, (arch, threads) in zip(axes, groups, strict=False):
        rs = [
            r for r in summary if r["architecture"] == arch and _row_threads(result, r) == threads
        ]
        sparse_rows = [r for r in rs if r["regime"] != "dense"]
        densities = sorted({r["density"] for r in sparse_rows})
        keys = dict.fromkeys((r["method"], r["granularity"], r["regime"]) for r in sparse_rows)
        for key in keys:
            pts = sorted(
                (r["density"], r["median_ms"])
                for r in sparse_rows
                if (r["method"], r["granularity"], r["regime"]) == key
            )
            ax.plot(*zip(*pts, strict=True), marker="o", label=" ".join(key))
        for r in rs:
            if r["regime"] == "dense":
                ax.axhline(
                    r["median_ms"],
                    linestyle="--",
                    color="gray"
                    if r["method"] == "dense-engine"
                    else ("black" if r["method"] == "torch" else "brown"),
                    label=f"{r['method']} (dense)",
                )
        ax.set_xscale("log")
        ax.set_yscale("log")
        if densities:
            ax.set_xticks(densities, [f"{d:g}" for d in densities])
        ax.set_xlabel("density (kept fraction)")
        ax.set_ylabel("ms per training iteration")
        ax.set_title(f"MLP {arch}, batch {rs[0]['n_batch']}, {threads} thread(s)")
        ax.grid(True, which="both", alpha=0.3)
    if conv is not None:
        for ax, threads in zip(axes[len(groups) :], conv_threads, strict=False):
            _plot_conv(ax, conv, threads)
    # One legend for all panels, below them, so that it hides no line.
    legend: dict[str, Any] = {}
    for ax in axes[:n_panels]:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            legend.setdefault(label, handle)
    fig.legend(
        list(legend.values()),
        list(legend),
        loc="lower center",
        ncol=min(5, len(legend)),
        fontsize=8,
    )
    fig.tight_layout(rect=(0, 0.9 / (4.8 * n_rows + 0.8), 1, 1))
    from .._io import atomic_write

    extension = os.path.splitext(os.fspath(path))[1].lstrip(".").lower() or "png"
    try:
        atomic_write(path, lambda f: fig.savefig(f, format=extension, dpi=120))
    finally:
        plt.close(fig)


def _plot_conv(ax: Any, conv: Mapping[str, Any], threads: int) -> None:
    """One panel of the convolution step: ms against the kept fraction of the MACs."""
    rs = [r for r in conv["rows"] if r["threads"] == threads]
    # Colours past the ones the MLP panels' lines take (C0-C5) and the gray of C7.
    colors = {"channel": "C8", "weight": "C9"}
    fractions: set[float] = set()
    for gran, color in colors.items():
        pts = sorted((1 / r["mac_ratio"], r["median_ms"]) for r in rs if r["granularity"] == gran)
        if pts:
            fractions.update(p[0] for p in pts)
            ax.plot(*zip(*pts, strict=True), marker="o", color=color, label=f"conv {gran}")
    for r in rs:
        if r["method"] == "torch":
            ax.axhline(r["median_ms"], linestyle="--", color="black", label="torch (dense)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    if fractions:
        ax.set_xticks(sorted(fractions), [f"{f:.3g}" for f in sorted(fractions)])
    ax.set_xlabel("kept fraction of the multiply-adds")
    ax.set_ylabel("ms per layer step (forward, dX, dW)")
    kh, kw = conv["kernel_size"]
    ax.set_title(
        f"Conv {conv['n_in']}->{conv['n_out']} {kh}x{kw}, {conv['height']}x{conv['width']}, "
        f"batch {conv['n_batch']}, {threads} thread(s)"
    )
    ax.grid(True, which="both", alpha=0.3)


_STARTUP_CODE = """
import time
t0 = time.perf_counter()
import numpy as np
import cpusparse
from cpusparse.training import TrainConfig, init_state, spawn_streams, train_step
t1 = time.perf_counter()
init_rng, data_rng, mask_rng = spawn_streams(0)
net = cpusparse.models.mlp(784, (1024, 1024), 10, rng=init_rng)
config = TrainConfig(density=0.1)
state = init_state(net, config, data_rng=data_rng, mask_rng=mask_rng)
x = np.ones((784, 256), dtype=np.float32)
y = np.zeros(256, dtype=np.int64)
train_step(state, x, y, config)
t2 = time.perf_counter()
print(t1 - t0, t2 - t0)
"""


def startup_time(*, runs: int = 3) -> dict[str, float]:
    """Seconds for a fresh process to import cpusparse and finish its first train_step.

    One untimed run warms the Numba cache; the median of ``runs`` runs is reported.

    Returns
    -------
    dict
        ``import_s`` (import only), ``first_step_s`` (import to the end of the first
        step, MLP 784-1024-1024-10, batch 256) and ``process_s`` (the whole process,
        interpreter start-up included).
    """
    env = dict(os.environ, NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-c", _STARTUP_CODE]
    subprocess.run(cmd, check=True, env=env, capture_output=True)
    res = []
    for _ in range(runs):
        t0 = time.perf_counter()
        out = subprocess.run(cmd, check=True, env=env, capture_output=True, text=True)
        total = time.perf_counter() - t0
        a, b = map(float, out.stdout.split())
        res.append((a, b, total))
    a, b, total = (statistics.median(v) for v in zip(*res, strict=True))
    return {"import_s": a, "first_step_s": b, "process_s": total}


def _quiet_openmp(thread_counts: Sequence[int]) -> None:
    """Let PyTorch's OpenMP workers sleep between parallel regions, for fair thread rows.

    With more than one thread, GNU OpenMP's workers (PyTorch's) spin after every
    parallel region by default, taking the cores from whatever runs next in the same
    process; measured here, a steady weight-level step at density 0.01 took 5.2 ms on
    2 threads after PyTorch had run on 2, against 3.2 ms with ``OMP_WAIT_POLICY=PASSIVE``
    (which cost PyTorch's own dense step about 5 %). The policy is read when PyTorch
    loads, so it is set (unless the user set it) before PyTorch is imported; it is
    reported with the machine.
    """
    if max(thread_counts) > 1 and "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def machine_info(threads: int | None = None) -> dict[str, object]:
    """CPU model, library versions, BLAS kernel, threads and load, for report headers."""
    import platform

    import numba

    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {
        "cpu": cpu,
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "python": platform.python_version(),
        "numpy": np.__version__,
        "numba": numba.__version__,
    }
    try:
        import llvmlite.binding as ll

        info["llvm_cpu"] = ll.get_host_cpu_name()
    except ImportError:
        pass
    try:
        from threadpoolctl import threadpool_info

        info["blas"] = "; ".join(
            f"{p.get('internal_api')} {p.get('version')} {p.get('architecture')}"
            for p in threadpool_info()
            if p.get("user_api") == "blas"
        )
    except ImportError:
        pass
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OMP_WAIT_POLICY"):
        if var in os.environ:
            info[var] = os.environ[var]
    try:
        info["load_average"] = " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        pass
    for mod in ("torch", "sklearn"):
        if _available(mod):
            info[mod] = __import__(mod).__version__
    return {k: v for k, v in info.items() if v is not None}


def _density(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}") from None
    if not 0.0 < value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {text!r}")
    return value


def _arch(text: str) -> tuple[tuple[int, ...], int]:
    try:
        sizes_text, batch_text = text.split(":")
        sizes = tuple(int(s) for s in sizes_text.split(","))
        batch = int(batch_text)
    except ValueError:
        sizes, batch = (), 0
    if len(sizes) < 3 or min(sizes) < 1 or batch < 1:
        raise argparse.ArgumentTypeError(
            "must be at least 3 positive layer sizes and a positive batch size, such as "
            f"784,300,100,10:128, got {text!r}"
        )
    return sizes, batch


def _threads(text: str) -> int:
    """An argparse ``type``: an int >= 1, or ``all`` (every core Numba may use)."""
    if text.strip().lower() == "all":
        from .._threads import effective_n_jobs

        return effective_n_jobs(-1)
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an int >= 1 or 'all', got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an int >= 1, got {value}")
    return value


_threads.__name__ = "threads"


def _fit_config(text: str) -> FitConfig:
    """An argparse ``type``: ``GRANULARITY:DENSITY:BATCH``, e.g. ``weight:0.1:256``."""
    parts = text.split(":")
    config = None
    if len(parts) == 3 and parts[0] in ("weight", "neuron"):
        try:
            density, batch = float(parts[1]), int(parts[2])
        except ValueError:
            pass
        else:
            if 0.0 < density <= 1.0 and batch >= 1:
                config = FitConfig(parts[0], density, batch)
    if config is None:
        raise argparse.ArgumentTypeError(
            "must be GRANULARITY:DENSITY:BATCH with granularity weight or neuron, a density "
            f"in (0, 1] and a batch size >= 1, such as weight:0.1:256, got {text!r}"
        )
    return config


_fit_config.__name__ = "configuration"


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    from ._options import layer_sizes
    from .cli import UsageError, parse_args

    p = argparse.ArgumentParser(
        prog="cpusparse bench",
        description="Time per training iteration of cpusparse against dense baselines, "
        "and whole fits of SparseMLPClassifier against a PyTorch dense loop with their "
        "memory; writes bench.json, bench.md and bench.png to --out.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="densities 0.1 and 0.01, 3 repetitions, no start-up measurement; whole fits "
        f"of {' and '.join(map(str, QUICK_FIT_CONFIGS))} for {QUICK_FIT_EPOCHS} epochs, "
        f"{QUICK_FIT_REPEATS} repetition; convolution rows with {QUICK_CONV_REPEATS} "
        f"repetitions, their memory rows with {QUICK_CONV_MEMORY_REPEATS}",
    )
    p.add_argument(
        "--out",
        default="bench-results",
        help="output directory (created if absent; its parent must exist)",
    )
    p.add_argument(
        "--threads",
        type=_threads,
        nargs="+",
        default=[1],
        metavar="N",
        help="Numba/BLAS/torch threads: an int or 'all' (the logical CPUs); several values "
        "(e.g. 1 all) repeat every measurement at each (default 1)",
    )
    p.add_argument("--repeats", type=int_at_least(1), default=None)
    p.add_argument("--warmup", type=int_at_least(0), default=2)
    p.add_argument("--densities", type=_density, nargs="+", default=None)
    p.add_argument(
        "--granularities", nargs="+", default=["weight", "neuron"], choices=("weight", "neuron")
    )
    p.add_argument(
        "--arch",
        type=_arch,
        nargs="+",
        default=None,
        metavar="SIZES:BATCH",
        help="e.g. 784,1024,1024,10:256 (default: both paper shapes)",
    )
    p.add_argument("--n-masks", type=int_at_least(2), default=2, help="K")
    p.add_argument(
        "--baselines",
        nargs="*",
        default=["dense-engine", "torch", "sklearn"],
        choices=("dense-engine", "torch", "sklearn"),
    )
    p.add_argument("--no-startup", action="store_true", help="skip the start-up measurement")
    conv = p.add_argument_group("convolution layer step (Conv2d against torch.nn.Conv2d)")
    conv.add_argument(
        "--no-conv", action="store_true", help="skip the convolution rows and their memory"
    )
    conv.add_argument(
        "--conv-repeats",
        type=int_at_least(1),
        default=None,
        help=f"interleaved repetitions of the convolution rows (default {CONV_REPEATS})",
    )
    conv.add_argument(
        "--no-conv-memory",
        action="store_true",
        help="skip the memory rows of the weight-granularity convolution",
    )
    fit = p.add_argument_group("whole fits (SparseMLPClassifier against a PyTorch dense loop)")
    fit.add_argument(
        "--fit-configs",
        type=_fit_config,
        nargs="+",
        default=None,
        metavar="GRAN:DENSITY:BATCH",
        help=f"configurations of the whole fits (default: {' '.join(map(str, FIT_CONFIGS))})",
    )
    fit.add_argument(
        "--fit-epochs",
        type=int_at_least(1),
        default=None,
        help=f"epochs of every whole fit (max_iter; default {FIT_EPOCHS})",
    )
    fit.add_argument(
        "--fit-repeats",
        type=int_at_least(1),
        default=None,
        help=f"interleaved repetitions of every whole fit (default {FIT_REPEATS})",
    )
    fit.add_argument(
        "--fit-dataset",
        choices=FIT_DATASETS,
        default=FIT_DATASET,
        help=f"data set of the whole fits, split 80/20 (default {FIT_DATASET})",
    )
    fit.add_argument(
        "--fit-hidden",
        type=layer_sizes,
        default=list(FIT_HIDDEN),
        metavar="N[,N...]",
        help=f"hidden layer widths of the whole fits (default {','.join(map(str, FIT_HIDDEN))})",
    )
    fit.add_argument("--no-fit", action="store_true", help="skip the whole fits and their memory")
    fit.add_argument(
        "--no-fit-memory",
        action="store_true",
        help="skip the memory rows of the whole fits (one fit per configuration in a subprocess)",
    )
    args = parse_args(p, argv)
    if args.arch:
        args.arch = tuple(args.arch)
    else:
        args.arch = ARCHITECTURES[:1] if args.quick else ARCHITECTURES
    if args.densities is None:
        args.densities = QUICK_DENSITIES if args.quick else DENSITIES
    if args.repeats is None:
        args.repeats = 3 if args.quick else 15
    if args.quick:
        args.warmup = min(args.warmup, 1)
        args.no_startup = True
    if args.conv_repeats is None:
        args.conv_repeats = QUICK_CONV_REPEATS if args.quick else CONV_REPEATS
    args.conv_memory_repeats = QUICK_CONV_MEMORY_REPEATS if args.quick else CONV_MEMORY_REPEATS
    if args.fit_configs is None:
        args.fit_configs = QUICK_FIT_CONFIGS if args.quick else FIT_CONFIGS
    args.fit_configs = tuple(dict.fromkeys(args.fit_configs))
    if args.fit_epochs is None:
        args.fit_epochs = QUICK_FIT_EPOCHS if args.quick else FIT_EPOCHS
    if args.fit_repeats is None:
        args.fit_repeats = QUICK_FIT_REPEATS if args.quick else FIT_REPEATS
    args.fit_hidden = tuple(args.fit_hidden)
    args.threads = list(dict.fromkeys(args.threads))
    import numba

    max_threads: int = vars(numba.config)["NUMBA_NUM_THREADS"]
    if max(args.threads) > max_threads:
        raise UsageError(
            f"argument --threads: must be at most {max_threads} (NUMBA_NUM_THREADS, the "
            f"threads Numba can use), got {max(args.threads)}"
        )
    return args


def _check_fit_configs(args: argparse.Namespace, n_features: int) -> None:
    """Every ``--fit-configs`` entry keeps at least one unit (one-line UsageError)."""
    from .cli import UsageError

    for c in args.fit_configs:
        n_units = fit_units(n_features, args.fit_hidden, c.granularity)
        if math.floor(c.density * n_units + 1e-9) < 1:
            raise UsageError(
                f"argument --fit-configs: {c} keeps no unit of the {n_units} prunable units "
                f"of hidden layers {','.join(map(str, args.fit_hidden))}; the smallest "
                f"density that keeps one is {1 / n_units:.3g}"
            )


OUTPUTS = ("bench.json", "bench.md", "bench.png")
"""The files :func:`main` writes into ``--out``."""


def _check_outputs(out: str) -> None:
    """Check ``--out`` and the files in it before any timing (one-line UsageError)."""
    from .._io import OutputPathError, check_output_dir, check_output_path
    from .cli import UsageError

    try:
        check_output_dir(out, "--out")
        if os.path.isdir(out):
            for name in OUTPUTS:
                check_output_path(os.path.join(out, name), "--out")
    except OutputPathError as exc:
        raise UsageError(str(exc)) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``cpusparse bench``; returns the exit status.

    0 on success, 1 on a failure, 2 on a usage error (a bad value, an output
    directory that cannot be written: checked before any timing), 130 on Ctrl-C;
    every error is one line on stderr (:func:`cpusparse.tools.cli.run_command`).

    ``bench.json`` holds ``rows`` (the per-iteration measurements of :func:`run`,
    each with its ``threads``), ``threads`` (the first thread count, the only one
    unless several are given), ``thread_counts``, ``conv`` (:func:`run_conv`: the
    convolution layer step at every thread count, its targets and memory), ``fit``
    (:func:`run_fit`: the settings and one row per configuration and thread count),
    ``fit_memory`` (:func:`run_memory`, at the first thread count), ``startup`` and
    ``machine``.
    """
    from .cli import CommandError, run_command

    def body() -> int:
        from .._io import atomic_write

        args = _parse_args(sys.argv[1:] if argv is None else argv)
        _check_outputs(args.out)
        _quiet_openmp(args.threads)
        try:
            os.makedirs(args.out, exist_ok=True)
        except OSError as exc:
            raise CommandError(f"--out {args.out}: {exc}") from None

        def log(msg: str) -> None:
            print(msg, file=sys.stderr, flush=True)

        data = None
        if not args.no_fit:
            try:
                data = fit_data(args.fit_dataset)
            except (ImportError, OSError, ValueError) as exc:
                raise CommandError(f"--fit-dataset {args.fit_dataset}: {exc}") from None
            _check_fit_configs(args, data.x_train.shape[1])
        result: dict[str, Any] = {}
        for threads in args.threads:
            part = run(
                architectures=args.arch,
                densities=args.densities,
                granularities=tuple(args.granularities),
                repeats=args.repeats,
                warmup=args.warmup,
                threads=threads,
                n_masks=args.n_masks,
                baselines=tuple(args.baselines),
                log=log,
            )
            if result:
                result["rows"].extend(part["rows"])
            else:
                result = part
        # "threads" stays the first (usually the only) count, for readers of older files.
        result["thread_counts"] = list(args.threads)
        if not args.no_conv:
            result["conv"] = run_conv(
                repeats=args.conv_repeats,
                thread_counts=args.threads,
                memory=not args.no_conv_memory,
                memory_repeats=args.conv_memory_repeats,
                log=log,
            )
        if data is not None:
            fit_rows: list[dict[str, Any]] = []
            for threads in args.threads:
                fit = run_fit(
                    data,
                    args.fit_configs,
                    hidden=args.fit_hidden,
                    epochs=args.fit_epochs,
                    repeats=args.fit_repeats,
                    threads=threads,
                    log=log,
                )
                fit_rows.extend(fit["rows"])
            fit["rows"], fit["thread_counts"] = fit_rows, list(args.threads)
            result["fit"] = fit
            if not args.no_fit_memory:
                result["fit_memory"] = run_memory(
                    data,
                    args.fit_configs,
                    hidden=args.fit_hidden,
                    epochs=args.fit_epochs,
                    threads=args.threads[0],
                    log=log,
                )
        if not args.no_startup:
            log("start-up time of a second process")
            result["startup"] = startup_time()
        result["machine"] = machine_info(args.threads[0] if len(args.threads) == 1 else None)
        text = json.dumps(result, indent=2)
        md = format_markdown(result)
        try:
            atomic_write(os.path.join(args.out, "bench.json"), lambda f: f.write(text.encode()))
            atomic_write(os.path.join(args.out, "bench.md"), lambda f: f.write(md.encode()))
            plot(result, os.path.join(args.out, "bench.png"))
        except (OSError, ValueError) as exc:
            raise CommandError(f"--out {args.out}: {exc}") from None
        print(md)
        return 0

    return run_command("cpusparse bench", body)
