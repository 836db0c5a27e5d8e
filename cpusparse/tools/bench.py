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
from typing import TYPE_CHECKING, Any, TypedDict, TypeVar

import numpy as np

from .._typing import BoolArray, RNGLike
from ..engine.layers.base import STRAIGHT_THROUGH, TRAIN
from ._options import int_at_least

if TYPE_CHECKING:
    from ..engine.containers import Sequential
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
    :class:`~cpusparse.engine.layers.Linear` layers count every weight.
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
    import numba

    numba.set_num_threads(threads)
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
# Reports
# ---------------------------------------------------------------------------


def _summary_rows(result):
    """Rows for the tables: dense baselines collapsed to one row per architecture.

    The dense baselines are timed in every density group; their row carries the
    median over the groups.
    """
    out = []
    dense_seen: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in result["rows"]:
        if r["regime"] == "dense":
            key = (r["architecture"], r["method"])
            dense_seen.setdefault(key, []).append(r)
        else:
            out.append(r)
    for (_arch, _method), rs in dense_seen.items():
        r = dict(rs[0])
        r["median_ms"] = statistics.median(x["median_ms"] for x in rs)
        r["peak_step_bytes"] = max(x["peak_step_bytes"] for x in rs)
        out.append(r)
    return out


def format_markdown(result: Mapping[str, Any]) -> str:
    """Markdown tables: one per architecture, then the machine header."""
    lines = [
        f"# cpusparse bench: time per training iteration ({result['threads']} thread(s), "
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
    for arch in dict.fromkeys(r["architecture"] for r in rows):
        rs = [r for r in rows if r["architecture"] == arch]
        lines += [f"## MLP {arch}, batch {rs[0]['n_batch']}", ""]
        head = (
            ["method", "gran.", "regime", "density", "ms/iter", "MACs (M)", "dense/MACs"]
            + [f"vs {b}" for b in baselines]
            + ["vs straight-through", "peak step MB", "state MB"]
        )
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * 3 + "---:|" * (len(head) - 3))
        sr = [r for r in _summary_rows(result) if r["architecture"] == arch]
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
    """Time per iteration against density, log-log; one line per method, dashed dense."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    archs = list(dict.fromkeys(r["architecture"] for r in rows))
    fig, axes = plt.subplots(1, len(archs), figsize=(6.5 * len(archs), 4.8), squeeze=False)
    for ax, arch in zip(axes[0], archs, strict=True):
        rs = [r for r in _summary_rows(result) if r["architecture"] == arch]
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
        ax.set_title(f"MLP {arch}, batch {rs[0]['n_batch']}, {result['threads']} thread(s)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    from .._io import atomic_write

    extension = os.path.splitext(os.fspath(path))[1].lstrip(".").lower() or "png"
    try:
        atomic_write(path, lambda f: fig.savefig(f, format=extension, dpi=120))
    finally:
        plt.close(fig)


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
    for var in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
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


def _parse_args(argv: Sequence[str]) -> argparse.Namespace:
    from .cli import parse_args

    p = argparse.ArgumentParser(
        prog="cpusparse bench",
        description="Time per training iteration of cpusparse against dense baselines; "
        "writes bench.json, bench.md and bench.png to --out.",
    )
    p.add_argument(
        "--quick",
        action="store_true",
        help="densities 0.1 and 0.01, 3 repetitions, no start-up measurement",
    )
    p.add_argument(
        "--out",
        default="bench-results",
        help="output directory (created if absent; its parent must exist)",
    )
    p.add_argument(
        "--threads", type=int_at_least(1), default=1, help="Numba/BLAS/torch threads (default 1)"
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
    return args


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
    """
    from .cli import CommandError, run_command

    def body() -> int:
        from .._io import atomic_write

        args = _parse_args(sys.argv[1:] if argv is None else argv)
        _check_outputs(args.out)
        try:
            os.makedirs(args.out, exist_ok=True)
        except OSError as exc:
            raise CommandError(f"--out {args.out}: {exc}") from None

        def log(msg: str) -> None:
            print(msg, file=sys.stderr, flush=True)

        result = run(
            architectures=args.arch,
            densities=args.densities,
            granularities=tuple(args.granularities),
            repeats=args.repeats,
            warmup=args.warmup,
            threads=args.threads,
            n_masks=args.n_masks,
            baselines=tuple(args.baselines),
            log=log,
        )
        if not args.no_startup:
            log("start-up time of a second process")
            result["startup"] = startup_time()
        result["machine"] = machine_info(args.threads)
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
