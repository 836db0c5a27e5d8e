r"""Golden traces: every intermediate of a few training steps, for checking other ports.

A *trace* is one ``.npz`` file holding, for each of a few steps of
:func:`~cpusparse.training.train_step` on a small network (an MLP, or a VGG or ResNet
CNN of :mod:`cpusparse.models`), the mini-batch, the weights and scores before the
step, the uniforms and masks drawn, the K losses, the weight, bias and score
gradients, the projection, the updated parameters and (CNNs) the batch-norm running
statistics, all as dense arrays in the PyTorch orientation, under flat names such as
``step0/layer1/weight_grad_mean``. Someone porting the method (to a GPU, to
PyTorch, to JAX) replays each step from the stored inputs and compares their
arrays with :func:`compare_traces` or ``cpusparse verify``. The layout is
documented array by array in ``docs/trace_format.rst``.

- :func:`make_trace` runs the steps and returns the arrays;
  :func:`write_trace` writes them (atomically, byte-identical for the same
  options: no time stamps, no pickles); :func:`load_trace` reads them back.
- :func:`compare_traces` checks ``|other - ref| <= atol + rtol * |ref|``
  elementwise (exact equality for bool, int and str arrays) and returns a
  :class:`Report` that separates missing arrays, shape, dtype and value
  differences.
- :func:`main_trace` and :func:`main_verify` are ``cpusparse trace`` and
  ``cpusparse verify``.

Examples
--------
>>> trace = make_trace(layers=(6, 5, 3), steps=1, batch_size=4, n_masks=2)
>>> trace["step0/x"].shape, trace["step0/layer0/masks"].shape
((4, 6), (2, 5, 6))
>>> bool(np.array_equal(trace["step0/layer0/masks"],
...                     trace["step0/layer0/uniforms"] < trace["step0/layer0/score"]))
True
>>> compare_traces(trace, make_trace(layers=(6, 5, 3), steps=1, batch_size=4, n_masks=2)).ok
True
>>> cnn = make_trace(model="vgg", widths=(2, 4), input_shape=(1, 4, 4), steps=1,
...                  batch_size=2, n_masks=2)
>>> cnn["step0/x"].shape, cnn["step0/layer0/weight"].shape, cnn["step0/layer0/masks"].shape
((2, 1, 4, 4), (2, 1, 3, 3), (2, 2))
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import importlib.resources
import io
import json
import math
import numbers
import os
import re
import sys
import zipfile
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, BinaryIO, NamedTuple, TypedDict

import numpy as np

from .._io import NpzError, atomic_write, read_npz
from .._validation import check_choice
from ..engine.containers import Residual, Sequential
from ..engine.layers.conv import CONV_GRANULARITIES, Conv2d
from ..engine.layers.linear import GRANULARITIES
from ..engine.layers.norm import MASK_ORDERS, BatchNorm2d
from ..models import mlp, resnet, vgg
from ..training import TrainConfig, init_state, iterate_batches, spawn_streams, train_step
from ..training.config import PRESETS, options
from ._options import HelpFormatter, add_options, add_preset, layer_sizes, preset_of

if TYPE_CHECKING:
    import numpy.typing as npt

    from ..engine.layers.base import Layer
    from ..training.state import TrainState

__all__ = [
    "FORMAT_VERSION",
    "DEFAULT_TOLERANCES",
    "TraceError",
    "Mismatch",
    "Report",
    "make_trace",
    "record_trace",
    "TRAIN_DEFAULTS",
    "MODELS",
    "CNN_DEFAULTS",
    "write_trace",
    "load_trace",
    "upgrade_trace",
    "READABLE_VERSIONS",
    "compare_traces",
    "describe_format",
    "main_trace",
    "main_verify",
]

FORMAT_VERSION = 3
"""Version of the trace layout (``meta/format_version``); bumped on any change."""

READABLE_VERSIONS = (1, 2, 3)
"""Versions :func:`load_trace` reads; older ones are upgraded by :func:`upgrade_trace`.

Version 3 (cpusparse 0.2): the uniforms of the masks come from Philox4x32-10 keyed by
one 64-bit draw of the masks stream per step (``mask_draw="philox"``, see
:func:`~cpusparse.method.sample_masks`); versions 1 and 2 drew them with one bulk
``rng.random((K, n_units))`` call, and are upgraded with ``mask_draw="numpy"`` in
``meta/config`` and ``meta/options``, so that they are rerun with their own draw. Version
3 also computes neuron-granularity layers as dense products on the kept block (BLAS):
their values agree with earlier versions to rounding, not bit for bit.

Version 2 (cpusparse 0.2): the VR-PGE score gradient is computed as
``1/(K-1) sum_k (L_k - mean L)(m_k - mean m) / (s (1 - s))`` (exactly 0 where the K
masks agree); ``*_grad_per_sample`` arrays are named ``*_grad_per_pass``; ``meta/config``
and ``meta/options`` use the names ``n_masks``, ``score_estimator`` and
``stored_density``.
"""

DEFAULT_TOLERANCES = {
    "float32": (1e-5, 1e-6),
    "float64": (1e-12, 1e-14),
}
"""Default ``(rtol, atol)`` of :func:`compare_traces`, by the trace's dtype."""

DATASETS = ("synthetic", "digits")

OUTSIDE_UNIFORM = 1.0
"""Value of ``uniforms`` outside the stored pattern (never below a score)."""

CONVENTIONS = """\
cpusparse trace conventions (format version 3)
- Inputs x are stored batch-major, (n_batch, n_in), like PyTorch; the engine itself is
  feature-major. Weights are (n_out, n_in); a layer computes x @ W.T + b.
- Every per-layer array is dense: entries outside the stored pattern are 0 (False for
  masks, 1.0 for uniforms, so that masks == (uniforms < score) holds everywhere).
- Random streams: SeedSequence(seed).spawn(4) -> [init, data order, masks, synthetic data].
- Masks: per step, key = int(rng.integers(0, 2**64, dtype=uint64)) from the masks stream
  (default_rng), k0, k1 = key & 0xFFFFFFFF, key >> 32; the uniforms of flat units 4c..4c+3
  of pass k are the four words of Philox4x32-10(counter=(c mod 2**32, c // 2**32, k, 0),
  key=(k0, k1)) times 2**-32, and masks = u < score.astype(float64). With
  mask_draw=numpy (versions 1-2): u = rng.random((K, n_units)) (float64, C order). The
  flat unit vector concatenates the prunable layers in order; a weight-granularity layer
  contributes array[pattern] (row-major over the stored entries), a neuron-granularity
  layer its n_out units.
- Mini-batches: one data_rng.permutation(n_data) per epoch, cut into batch_size chunks.
- Neuron granularity: out = m * relu(x @ W.T + b) (the bias is dropped with the unit).
- Loss: mean softmax cross-entropy over the batch; losses are float64.
- Score gradient (VR-PGE), in float64: c_k = L_k - (sum_j L_j) / K; mbar = (sum_k m_k) / K;
  t = sum_k c_k (m_k - mbar), accumulated over k = 0..K-1 from 0; dscore = t / (K - 1) /
  (s (1 - s)), and 0 where s is 0 or 1. This equals the paper's
  1/(K-1) sum_k (L_k - mean L)(m_k - s)/(s (1 - s)) and is exactly 0 where all K masks
  agree. vrpge-sqrt divides by sqrt(s (1 - s)) instead; reinforce is
  1/K sum_k L_k (m_k - s) / (s (1 - s)). dscore is cast to the trace's dtype.
- Weight gradients are averaged over the K passes (weight_grad=mean) or taken from the
  first pass (first) and clipped to a global norm clip_norm (if set) before the optimizer;
  with clip_scope=weights+scores the score gradient enters that norm (after every weight
  and bias array) and is scaled with them.
- Projection: score_projected = clip(score_before_projection - threshold, 0, 1) onto
  {0 <= s <= 1, sum s <= budget}, budget = density * n_units; threshold 0 if clipping is
  feasible.
"""

CNN_CONVENTIONS = """\
cpusparse trace conventions of CNN traces (format version 3, meta/cnn_conventions)
- Images x are stored (n_batch, C, H, W), PyTorch's NCHW; the engine itself takes
  channel-major (C, n_batch, H, W). Conv weights are (C_out, C_in, kh, kw);
  cross-correlation as torch.nn.functional.conv2d (stride, padding in meta/layers).
- layer<l> is the position of the layer in a depth-first walk over the leaf layers
  (containers opened; parameterless layers such as ReLU and pools counted); its path
  (meta/layers) is the prefix of its parameters in the network ("3.0.1": block 3,
  main branch 0 (shortcut 1), position 1). The flat parameter vector, the gradient
  norm and the flat unit vector follow this order.
- Residual blocks (meta/blocks): out = relu(main(x) + shortcut(x)), shortcut the
  identity when absent.
- Channel granularity: conv output channel c is m_c * conv(x)[c] (no conv bias); the
  batch norm after it normalises the kept channels only (mask_order after_norm): a
  dropped channel outputs exactly 0 and keeps its running statistics and 0 gradients.
  mask_order before_norm: BN(m * conv(x)), a dropped channel outputs beta. Weight
  granularity: conv(x, W * m).
- Batch norm (training): batch mean and biased variance over (N, H, W); running
  statistics updated with the unbiased variance and momentum (meta/layers):
  r = (1 - momentum) r + momentum batch_stat, by pass 0 only (norm_updates once) or
  by every pass in order (every_pass); running_mean_updated is after the K passes.
  gamma and beta (weight, bias) are weight-optimizer parameters (weight decay too).
- Synthetic images: x = rng.standard_normal((n_data, C, H, W)), teacher =
  rng.standard_normal((n_classes, C*H*W)), y = argmax(x.reshape(n_data, -1) @ teacher.T).
"""

_NAME_RE = re.compile(r"(?:^|/)step(\d+)/(?:layer(\d+)/)?")


class TraceError(ValueError):
    """A trace file is unreadable, not a trace, or of another format version."""


# ---------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------


class _RunOptions(TypedDict):
    layers: tuple[int, ...]
    granularity: str
    stored_density: float
    sparse_classifier: bool
    seed: int
    steps: int
    batch_size: int
    n_data: int
    dataset: str
    dtype: str


# The options of a trace that are not training options (the model, the data, the run).
_RUN_DEFAULTS: _RunOptions = {
    "layers": (20, 16, 12, 5),
    "granularity": "weight",
    "stored_density": 1.0,
    "sparse_classifier": False,
    "seed": 0,
    "steps": 3,
    "batch_size": 8,
    "n_data": 64,
    "dataset": "synthetic",
    "dtype": "float64",
}

MODELS = ("mlp", "vgg", "resnet")
"""The networks :func:`make_trace` builds (``model=``): :func:`~cpusparse.models.mlp`,
:func:`~cpusparse.models.vgg`, :func:`~cpusparse.models.resnet`."""


class _CnnOptions(TypedDict):
    widths: tuple[int, ...]
    input_shape: tuple[int, ...]
    n_classes: int
    granularity: str
    prune_first: bool
    mask_order: str
    seed: int
    steps: int
    batch_size: int
    n_data: int
    dataset: str
    dtype: str


CNN_DEFAULTS: _CnnOptions = {
    "widths": (4, 8),
    "input_shape": (3, 8, 8),
    "n_classes": 10,
    "granularity": "channel",
    "prune_first": True,
    "mask_order": "after_norm",
    "seed": 0,
    "steps": 3,
    "batch_size": 8,
    "n_data": 64,
    "dataset": "synthetic",
    "dtype": "float64",
}
"""The model, data and run defaults of CNN traces (``model="vgg"`` or ``"resnet"``).

``model="vgg"`` adds ``convs_per_stage`` (default 2), ``model="resnet"``
``blocks_per_stage`` (default 1), the defaults of :mod:`cpusparse.models`."""

_PER_STAGE = {"vgg": ("convs_per_stage", 2), "resnet": ("blocks_per_stage", 1)}

# Training options of the table (cpusparse.training.config) a trace records, with the
# defaults of traces where they differ from the table's. The schedule runs over the
# trace's steps and compaction is off, so that stored patterns stay fixed.
_NOT_TRACED = ("total_steps", "compact_every", "compact_fraction", "finetune_lr")
TRAIN_DEFAULTS = {"density": 0.5, "n_masks": 3, "lr": 0.01, "score_lr": 0.05}
"""The training-option defaults of traces that differ from :class:`TrainConfig`'s."""


def _train_defaults() -> dict[str, object]:
    return {
        option.name: TRAIN_DEFAULTS.get(option.name, option.default)
        for option in options()
        if option.name not in _NOT_TRACED
    }


def _one_or_all(counts: int | list[int]) -> int | tuple[int, ...]:
    # ``--convs-per-stage 2`` is one count for every stage; ``2,2,4`` one per stage.
    if isinstance(counts, int):
        return counts
    return counts[0] if len(counts) == 1 else tuple(counts)


def _check_int(value: int, name: str, low: int) -> int:
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return int(value)


def _int_tuple(value, name, length=None):
    if isinstance(value, str) or not hasattr(value, "__len__"):
        raise TypeError(f"{name} must be a sequence of ints, got {value!r}")
    if length is not None and len(value) != length:
        raise ValueError(f"{name} must hold {length} ints, got {list(value)}")
    if not len(value):
        raise ValueError(f"{name} must be a nonempty sequence of ints, got []")
    return tuple(_check_int(n, f"{name}[{i}]", 1) for i, n in enumerate(value))


def _options(options):
    options = dict(options)
    name = options.pop("preset", "paper")
    if name not in PRESETS:
        raise ValueError(f"preset must be one of {', '.join(map(repr, PRESETS))}, got {name!r}")
    model = options.pop("model", "mlp")
    check_choice(model, "model", MODELS)
    traced = _train_defaults()
    if model == "mlp":
        run: Mapping[str, object] = _RUN_DEFAULTS
    else:
        key, default = _PER_STAGE[model]
        run = {**CNN_DEFAULTS, key: default}
    defaults = {
        **run,
        **traced,
        **{k: v for k, v in PRESETS[name].items() if k in traced},
    }
    unknown = sorted(set(options) - set(defaults))
    if unknown:
        raise TypeError(
            f"unknown trace options {unknown} for model={model!r}; known: {sorted(defaults)}"
        )
    opts = {**defaults, **options, "preset": name}
    if model != "mlp":
        return _cnn_options(opts, model)
    layers = opts["layers"]
    if isinstance(layers, str) or not hasattr(layers, "__len__"):
        raise TypeError(f"layers must be a sequence of ints, got {layers!r}")
    layers = tuple(_check_int(n, "layers[i]", 1) for n in layers)
    if len(layers) < 3 and not (len(layers) == 2 and opts["sparse_classifier"]):
        raise ValueError(
            "layers must hold the input size, at least one hidden size and the number of "
            f"classes (or two sizes with sparse_classifier=True), got {list(layers)}"
        )
    opts["layers"] = layers
    _common_options(opts)
    opts["sparse_classifier"] = bool(opts["sparse_classifier"])
    density = opts["stored_density"]
    if isinstance(density, bool) or not isinstance(density, numbers.Real):
        raise TypeError(f"stored_density must be a real number, got {type(density).__name__}")
    if not 0.0 < float(density) <= 1.0:
        raise ValueError(f"stored_density must be in (0, 1], got {density}")
    opts["stored_density"] = float(density)
    return opts


def _common_options(opts):
    for name in ("steps", "batch_size", "n_data"):
        opts[name] = _check_int(opts[name], name, 1)
    opts["seed"] = _check_int(opts["seed"], "seed", 0)
    check_choice(opts["dataset"], "dataset", DATASETS)
    check_choice(opts["dtype"], "dtype", ("float32", "float64"))


def _cnn_options(opts, model):
    opts = {"model": model, **opts}
    opts["widths"] = _int_tuple(opts["widths"], "widths")
    opts["input_shape"] = _int_tuple(opts["input_shape"], "input_shape", 3)
    opts["n_classes"] = _check_int(opts["n_classes"], "n_classes", 1)
    key, _ = _PER_STAGE[model]
    if key == "convs_per_stage" and not isinstance(opts[key], numbers.Integral):
        opts[key] = _int_tuple(opts[key], key, len(opts["widths"]))  # one count per stage
    else:
        opts[key] = _check_int(opts[key], key, 1)
    check_choice(opts["granularity"], "granularity", tuple(CONV_GRANULARITIES))
    check_choice(opts["mask_order"], "mask_order", MASK_ORDERS)
    if not isinstance(opts["prune_first"], bool | np.bool_):
        raise TypeError(f"prune_first must be a bool, got {opts['prune_first']!r}")
    opts["prune_first"] = bool(opts["prune_first"])
    _common_options(opts)
    if opts["dataset"] == "digits" and (opts["input_shape"], opts["n_classes"]) != ((1, 8, 8), 10):
        raise ValueError(
            "input_shape must be (1, 8, 8) and n_classes 10 for dataset='digits', got "
            f"{opts['input_shape']} and {opts['n_classes']}"
        )
    return opts


def _config(opts):
    train = {name: opts[name] for name in _train_defaults()}  # "preset" is not an option
    return TrainConfig(**train, total_steps=opts["steps"], compact_every=0)


def _data(opts, dtype):
    """Batch-major ``(X, y)`` for the trace: synthetic from the seed, or digits.

    ``X`` is ``(n_data, n_in)`` for an MLP, ``(n_data, C, H, W)`` for a CNN.
    """
    if "model" in opts:  # a CNN
        shape, n_classes = opts["input_shape"], opts["n_classes"]
        if opts["dataset"] == "digits":
            from .datasets import load_dataset

            ds = load_dataset("digits", dtype=dtype)
            return ds.X.reshape((-1, *shape)), ds.y.astype(np.int64)
        rng = np.random.default_rng(np.random.SeedSequence(opts["seed"]).spawn(4)[3])
        x = rng.standard_normal((opts["n_data"], *shape))
        teacher = rng.standard_normal((n_classes, math.prod(shape)))
        y = np.argmax(x.reshape(opts["n_data"], -1) @ teacher.T, axis=1).astype(np.int64)
        return x.astype(dtype), y
    n_in, n_classes = opts["layers"][0], opts["layers"][-1]
    if opts["dataset"] == "digits":
        from .datasets import load_dataset

        ds = load_dataset("digits", dtype=dtype)
        if (n_in, n_classes) != (ds.X.shape[1], ds.n_classes):
            raise ValueError(
                f"layers must start with {ds.X.shape[1]} inputs and end with {ds.n_classes} "
                f"classes for dataset='digits', got {list(opts['layers'])}"
            )
        return ds.X, ds.y.astype(np.int64)
    # A fourth stream after init, data order and masks (spawn_streams uses the first 3).
    rng = np.random.default_rng(np.random.SeedSequence(opts["seed"]).spawn(4)[3])
    x = rng.standard_normal((opts["n_data"], n_in))
    teacher = rng.standard_normal((n_classes, n_in))
    y = np.argmax(x @ teacher.T, axis=1).astype(np.int64)
    return x.astype(dtype), y


# ---------------------------------------------------------------------------
# Dense layout of the per-layer arrays
# ---------------------------------------------------------------------------


def _state_arrays(prefix, state_i, to_dense, arrays):
    for key, value in state_i.items():
        value = np.asarray(value)
        arrays[f"{prefix}/{key}"] = value.copy() if value.ndim == 0 else to_dense(value)


def _json(value: object) -> np.ndarray:
    return np.array(json.dumps(value, sort_keys=True, allow_nan=True))


# ---------------------------------------------------------------------------
# Making, writing and reading traces
# ---------------------------------------------------------------------------


def make_trace(**options: object) -> dict[str, np.ndarray]:
    """Run a few training steps of a small sparse network and record every intermediate.

    Parameters
    ----------
    model : {"mlp", "vgg", "resnet"}, default="mlp"
        The network (:data:`MODELS`). The options ``layers``, ``stored_density`` and
        ``sparse_classifier`` are the MLP's; ``widths``, ``input_shape``,
        ``n_classes``, ``convs_per_stage`` (vgg), ``blocks_per_stage`` (resnet),
        ``prune_first`` and ``mask_order`` the CNNs' (:data:`CNN_DEFAULTS`). An MLP
        trace does not record ``model`` in ``meta/options``.
    layers : tuple of int, default=(20, 16, 12, 5)
        MLP: layer sizes including the input size and the number of classes.
    widths : tuple of int, default=(4, 8)
        CNN: the channels of each stage (:func:`~cpusparse.models.vgg`,
        :func:`~cpusparse.models.resnet`).
    input_shape : (C, H, W), default=(3, 8, 8)
        CNN: one image's shape.
    n_classes : int, default=10
        CNN: number of classes.
    convs_per_stage, blocks_per_stage : int, default=2, 1
        VGG: convolutions per stage (one count for every stage); ResNet: basic
        blocks per stage (3 gives ResNet-20's layout).
    prune_first : bool, default=True
        CNN: whether the first convolution takes a mask.
    mask_order : {"after_norm", "before_norm"}, default="after_norm"
        CNN: the ``mask_order`` of every batch norm
        (:class:`~cpusparse.engine.layers.norm.BatchNorm2d`).
    granularity : {"weight", "neuron"} or {"channel", "weight"}, default="weight" or "channel"
        MLP or CNN (one mask bit per output channel or per weight).
    density : float, default=0.5
        Kept fraction (budget = density * n_units).
    stored_density : float, default=1.0
        Fraction of entries stored in each sparse layer's pattern (1.0: all).
    sparse_classifier : bool, default=False
        Make the classifier a weight-granularity sparse layer too.
    n_masks : int, default=3
        K, masks per step.
    score_estimator : {"vrpge", "vrpge-sqrt", "reinforce", "straight-through"}
    projection : {"exact", "bisection"}
    projection_tol, projection_max_iter : float, int
        Bisection stopping rule (1e-3, 20).
    seed : int, default=0
        Everything random is spawned from it (see ``meta/conventions``).
    steps, batch_size : int, default=3, 8
    n_data : int, default=64
        Size of the synthetic data set.
    dataset : {"synthetic", "digits"}, default="synthetic"
        Synthetic Gaussian inputs labelled by a random linear teacher, or
        scikit-learn's digits (needs ``layers=(64, ..., 10)``, or
        ``input_shape=(1, 8, 8)`` and ``n_classes=10`` for a CNN).
    dtype : {"float32", "float64"}, default="float64"
    weight_grad : {"mean", "first"}
    clip_norm : float or None
    optimizer, lr, momentum, nesterov, weight_decay
        Weight optimizer (``"adam"``, 0.01, 0.9, False, 0.0).
    score_optimizer, score_lr, score_momentum
        Score optimizer (``"adam"``, 0.05, 0.9).
    schedule : {"constant", "cosine"}
        Learning-rate schedule over ``steps``.
    initial_score : float or None
        Initial keep probability (None: ``density``).
    clip_scope : {"weights", "weights+scores"}
        What ``clip_norm`` clips.
    norm_updates : {"once", "every_pass"}
        How the K passes update batch-norm running statistics (CNNs).
    preset : {"paper", "authors"}, default="paper"
        Start from the named set of training options
        (:data:`~cpusparse.training.config.PRESETS`); explicit options override it.

    Returns
    -------
    trace : dict of str to ndarray
        In the order written; the names are documented on the trace format page
        (:func:`describe_format`, ``cpusparse trace --describe``).

    Notes
    -----
    The training options and what they allow are those of
    :class:`~cpusparse.training.config.TrainConfig`; :data:`TRAIN_DEFAULTS` lists the
    defaults of traces that differ from it.

    Raises
    ------
    ValueError, TypeError
        For an invalid option.
    """
    opts = _options(options)
    config = _config(opts)
    dtype = np.dtype(opts["dtype"])
    init_rng, data_rng, mask_rng = spawn_streams(opts["seed"])
    if "model" in opts:
        network = _cnn(opts, dtype, init_rng)
    else:
        network = mlp(
            opts["layers"][0],
            opts["layers"][1:-1],
            opts["layers"][-1],
            granularity=opts["granularity"],
            sparse_classifier=opts["sparse_classifier"],
            stored_density=opts["stored_density"],
            dtype=dtype.type,
            rng=init_rng,
        )
    state = init_state(network, config, data_rng=data_rng, mask_rng=mask_rng)
    x_all, y_all = _data(opts, dtype)
    options_meta = {k: list(v) if isinstance(v, tuple) else v for k, v in opts.items()}
    return record_trace(
        state, config, x_all, y_all, steps=opts["steps"], batch_size=opts["batch_size"],
        options=options_meta,
    )  # fmt: skip


def _cnn(opts, dtype, init_rng):
    """The VGG or ResNet of the options, its batch norms set to ``mask_order``."""
    build, key = (
        (vgg, "convs_per_stage") if opts["model"] == "vgg" else (resnet, "blocks_per_stage")
    )
    network = build(
        opts["widths"],
        opts["input_shape"],
        opts["n_classes"],
        **{key: opts[key]},
        granularity=opts["granularity"],
        prune_first=opts["prune_first"],
        density=opts["density"],
        dtype=dtype.type,
        rng=init_rng,
    )
    for _, layer in _leaves(network):
        if isinstance(layer, BatchNorm2d):
            layer.mask_order = opts["mask_order"]
    return network


def _leaves(container: Sequential) -> list[tuple[str, Layer]]:
    """``(path, layer)`` of every leaf layer, depth-first (the forward and parameter order).

    ``path`` is the prefix of the layer's keys in ``container.params()``: ``"3"`` for
    the fourth layer, ``"3.0.1"`` for the second layer of the main branch of a
    :class:`~cpusparse.engine.containers.Residual` in fourth position (``"3.1.0"``:
    its shortcut's first layer); see :meth:`~cpusparse.engine.layers.base.Layer.named_leaves`.
    """
    return list(container.named_leaves())


def _blocks(layer: Layer, index: Mapping[str, int], prefix: str = "") -> list[dict]:
    """The residual blocks inside ``layer``, depth-first, with their leaves' indices."""
    out: list[dict] = []
    for name, child in layer.children():
        path = f"{prefix}{name}"
        if isinstance(child, Residual):
            branches = {
                b: [index[p] for p, _ in branch.named_leaves(f"{path}.{b}.")]
                for b, branch in child.children()
            }
            out.append(
                {
                    "path": path,
                    "type": "Residual",
                    "activation": child.activation,
                    "main": branches["0"],
                    "shortcut": branches.get("1"),
                }
            )
        out += _blocks(child, index, f"{path}.")
    return out


def _layer_info(index: int, path: str, layer: Layer, prunable: bool, extended: bool) -> dict:
    info = {
        "index": index,
        "type": type(layer).__name__,
        "n_in": layer.n_in,
        "n_out": layer.n_out,
        "granularity": None if layer.units is None else layer.units.granularity,
        "prunable": prunable,
        **layer.config(),
    }
    if extended:  # CNN traces (MLP traces keep their version 3 bytes)
        info["path"] = path
        info["params"] = list(layer.params())
        info["buffers"] = list(layer.buffers())
        if isinstance(layer, Conv2d):
            info["kernel_size"] = list(layer.kernel_size)
    return info


def _versions() -> tuple[str, str]:
    from .._version import __version__

    try:
        import numba

        numba_version = numba.__version__
    except ImportError:  # pragma: no cover - numba is a hard dependency
        numba_version = "unavailable"
    return __version__, numba_version


def record_trace(
    state: TrainState,
    config: TrainConfig,
    x: np.ndarray,
    y: npt.NDArray[np.integer],
    *,
    steps: int,
    batch_size: int,
    options: Mapping[str, object] | None = None,
) -> dict[str, np.ndarray]:
    """Run training steps on any network and record every intermediate as trace arrays.

    The engine of :func:`make_trace`, for a network of any layer kinds: each layer
    lays out its own arrays densely (:meth:`~cpusparse.engine.layers.base.Layer.dense`,
    :meth:`~cpusparse.engine.layers.base.UnitMap.dense`).

    Parameters
    ----------
    state : TrainState
        At the start of the trace; updated in place.
    config : TrainConfig
        With ``compact_every=0``, so that stored patterns stay fixed.
    x : ndarray of shape (n_data, n_in) or (n_data, C, H, W)
        Batch-major data (images in PyTorch's NCHW order); mini-batches are drawn
        from ``state.data_rng``.
    y : ndarray of int, shape (n_data,)
    steps, batch_size : int
    options : dict, optional
        JSON-ready options stored as ``meta/options``.

    Returns
    -------
    trace : dict of str to ndarray

    Notes
    -----
    ``layer<l>`` in the names is the position of a leaf layer in a depth-first walk
    of the network (containers opened, parameterless layers counted), which for a
    network without containers is its position in ``network.layers``. A trace of
    images, or of a network with containers, also records each layer's path, its
    parameter and buffer names (``meta/layers``), its residual blocks
    (``meta/blocks``) and the CNN conventions (``meta/cnn_conventions``).
    """
    if config.compact_every != 0:
        raise ValueError(
            "config.compact_every must be 0 for a trace (fixed patterns), got "
            f"{config.compact_every}"
        )
    network = state.network
    leaves = list(_leaves(network))
    walked = [f"{path}.{name}" for path, layer in leaves for name in layer.params()]
    if walked != list(network.params()):
        raise ValueError(
            "record_trace walks Sequential and Residual containers only; the network's "
            f"parameters {list(network.params())[:4]}... are not in that order"
        )
    p_of = {id(layer): p for p, layer in enumerate(network.prunable_layers())}
    prunable = {li: p_of[id(layer)] for li, (_, layer) in enumerate(leaves) if id(layer) in p_of}
    images = np.ndim(x) == 4
    extended = images or any("." in path for path, _ in leaves)
    version, numba_version = _versions()
    layer_info = [
        _layer_info(i, path, layer, i in prunable, extended)
        for i, (path, layer) in enumerate(leaves)
    ]
    arrays = {
        "meta/format_version": np.array(FORMAT_VERSION, dtype=np.int64),
        "meta/cpusparse_version": np.array(version),
        "meta/numpy_version": np.array(np.__version__),
        "meta/numba_version": np.array(numba_version),
        "meta/dtype": np.array(np.dtype(network.dtype).name),
        "meta/n_steps": np.array(steps, dtype=np.int64),
        "meta/n_units": np.array(state.n_units_initial, dtype=np.int64),
        "meta/budget": np.array(state.budget, dtype=np.float64),
        "meta/options": _json(options or {}),
        "meta/config": _json(dataclasses.asdict(config)),
        "meta/layers": _json(layer_info),
        "meta/conventions": np.array(CONVENTIONS),
    }
    if extended:
        index = {path: i for i, (path, _) in enumerate(leaves)}
        arrays["meta/blocks"] = _json(_blocks(network, index))
        arrays["meta/cnn_conventions"] = np.array(CNN_CONVENTIONS)
    batches: list[npt.NDArray[np.int64]] = []
    while len(batches) < steps:
        batches.extend(iterate_batches(y.shape[0], batch_size, state.data_rng))
    for s, idx in enumerate(batches[:steps]):
        xb = np.ascontiguousarray(x[idx])
        yb = np.ascontiguousarray(y[idx])
        arrays[f"step{s}/batch_index"] = np.asarray(idx, dtype=np.int64)
        arrays[f"step{s}/x"] = xb
        arrays[f"step{s}/y"] = yb
        before = [{k: v.copy() for k, v in layer.params().items()} for _, layer in leaves]
        buffers = [{k: v.copy() for k, v in layer.buffers().items()} for _, layer in leaves]
        offsets = state.offsets.copy()
        # The engine is feature-major: (n_in, n_batch), or (C, n_batch, H, W) for images.
        xe = np.ascontiguousarray(np.moveaxis(xb, 0, 1) if images else xb.T)
        record = train_step(state, xe, yb, config, record=True).record
        if not (record is not None):
            raise RuntimeError("internal error: asked for")
        arrays[f"step{s}/losses"] = np.asarray(record.losses, dtype=np.float64)
        arrays[f"step{s}/grad_norm"] = np.array(record.grad_norm, dtype=np.float64)
        arrays[f"step{s}/threshold"] = np.array(record.threshold, dtype=np.float64)
        arrays[f"step{s}/lr"] = np.array(record.lr, dtype=np.float64)
        arrays[f"step{s}/score_lr"] = np.array(record.score_lr, dtype=np.float64)
        pos = 0
        for li, (_, layer) in enumerate(leaves):
            p = prunable.get(li)
            seg = None if p is None else slice(int(offsets[p]), int(offsets[p + 1]))
            lpre = f"step{s}/layer{li}"
            _layer_arrays(arrays, lpre, layer, before[li], buffers[li], pos, seg, record, state)
            pos += len(before[li])
    return arrays


def _layer_arrays(arrays, lpre, layer, before, buffers, pos, seg, record, state):
    """One layer's arrays of one step, each in the layer's dense layout."""
    names = list(before)
    units = layer.units if seg is not None else None
    if names:
        pattern = layer.stored_pattern()
        if pattern is not None:
            if isinstance(layer, Conv2d):  # in the weight's (C_out, C_in, kh, kw)
                pattern = pattern.reshape(layer.weight.shape)
            arrays[f"{lpre}/pattern"] = pattern
        for name in names:
            arrays[f"{lpre}/{name}"] = layer.dense(name, before[name])
    for name, value in buffers.items():
        arrays[f"{lpre}/{name}"] = value
    if units is not None:
        arrays[f"{lpre}/score"] = units.dense(record.score[seg])
        arrays[f"{lpre}/uniforms"] = units.dense(record.uniforms[:, seg], fill=OUTSIDE_UNIFORM)
        arrays[f"{lpre}/masks"] = units.dense(record.masks[:, seg], fill=False)
    for j, name in enumerate(names):
        per_pass = np.stack([g[pos + j] for g in record.weight_grads_per_pass])
        arrays[f"{lpre}/{name}_grad_per_pass"] = layer.dense(name, per_pass)
        arrays[f"{lpre}/{name}_grad_mean"] = layer.dense(name, record.weight_grads[pos + j])
    if units is not None:
        arrays[f"{lpre}/dscore"] = units.dense(record.dscore[seg])
        arrays[f"{lpre}/score_before_projection"] = units.dense(record.score_before_projection[seg])
        arrays[f"{lpre}/score_projected"] = units.dense(state.score[seg])
    params = layer.params()
    for name in names:
        arrays[f"{lpre}/{name}_updated"] = layer.dense(name, params[name])
    for name, value in layer.buffers().items():
        arrays[f"{lpre}/{name}_updated"] = value.copy()
    for j, name in enumerate(names):
        _state_arrays(
            f"{lpre}/{name}_state",
            state.weight_state[pos + j],
            lambda v, name=name: layer.dense(name, v),
            arrays,
        )
    if units is not None:
        seg_state = {k: (v if np.ndim(v) == 0 else v[seg]) for k, v in state.score_state[0].items()}
        _state_arrays(f"{lpre}/score_state", seg_state, units.dense, arrays)


def describe_format() -> str:
    """The trace format page (reStructuredText), as installed with the package.

    ``cpusparse trace --describe`` prints it, so that the format is at hand wherever
    cpusparse is installed, not only in a source checkout.
    """
    return importlib.resources.files("cpusparse.tools").joinpath("trace_format.rst").read_text()


def _write_npz(f: BinaryIO, arrays: Mapping[str, npt.ArrayLike]) -> None:
    # Like numpy.savez, but with a fixed time stamp so that equal traces are equal files.
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, value in arrays.items():
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.asarray(value), allow_pickle=False)
            zf.writestr(info, buf.getvalue())


def write_trace(path: str | os.PathLike[str], **options: object) -> dict[str, np.ndarray]:
    """Write the trace of :func:`make_trace` (same options) to ``path`` atomically.

    The file is an uncompressed ``.npz`` (readable by :func:`numpy.load` with
    ``allow_pickle=False``) with a fixed time stamp in every zip entry: the same
    options give a byte-identical file.

    Parameters
    ----------
    path : str or os.PathLike
    **options
        See :func:`make_trace`.

    Returns
    -------
    trace : dict of str to ndarray
        The arrays written.
    """
    arrays = make_trace(**options)
    atomic_write(path, lambda f: _write_npz(f, arrays))
    return arrays


def load_trace(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """Read a trace into a dict of arrays (in file order), without pickles.

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    trace : dict of str to ndarray

    Raises
    ------
    TraceError
        If the file cannot be read as an ``.npz`` or needs pickles, or has a format
        version this cpusparse cannot read. Earlier versions are upgraded to the
        current names (:func:`upgrade_trace`); a file without ``meta/format_version``
        (e.g. written by another port) is accepted as it is.
    """
    try:
        arrays = read_npz(path, "trace")
    except (FileNotFoundError, NpzError) as exc:
        raise TraceError(str(exc)) from exc
    return upgrade_trace(arrays, where=f"trace {os.fspath(path)!r}")


_V1_RENAMED_KEYS = {
    "n_samples": "n_masks",
    "estimator": "score_estimator",
    "init_density": "stored_density",
}


def upgrade_trace(arrays: dict[str, np.ndarray], *, where: str = "trace") -> dict[str, np.ndarray]:
    """A trace of an earlier format version in the names of the current one.

    Version 1 traces (cpusparse 0.1) name ``*_grad_per_pass`` ``*_grad_per_sample``
    and use ``n_samples``, ``estimator`` and ``init_density`` in ``meta/config`` and
    ``meta/options``; their values are kept as they are (their VR-PGE score gradients
    hold rounding residues where all masks agree, see :data:`READABLE_VERSIONS`).
    Versions 1 and 2 get ``mask_draw="numpy"`` in both, the draw they were made with. A
    trace without ``meta/format_version`` (e.g. written by another port) is taken as
    the current version.

    Raises
    ------
    TraceError
        If the version is malformed or not one of :data:`READABLE_VERSIONS`.
    """
    raw = arrays.get("meta/format_version")
    if raw is None:
        return arrays
    try:
        version = int(raw.item()) if raw.ndim == 0 and raw.dtype.kind in "iu" else None
    except (TypeError, ValueError):
        version = None
    if version is None:
        raise TraceError(
            f"{where} has a malformed meta/format_version: expected a 0-d integer array, "
            f"got {raw.dtype} of shape {raw.shape}"
        )
    if version not in READABLE_VERSIONS:
        raise TraceError(
            f"{where} has format version {version}; this cpusparse reads versions "
            f"{', '.join(map(str, READABLE_VERSIONS))}"
        )
    if version == FORMAT_VERSION:
        return arrays
    out = {}
    for name, value in arrays.items():
        if name in ("meta/config", "meta/options"):
            meta = json.loads(str(value))
            meta = {_V1_RENAMED_KEYS.get(k, k): v for k, v in meta.items()}
            meta.setdefault("mask_draw", "numpy")  # the only draw before version 3
            value = _json(meta)
        out[name.replace("_grad_per_sample", "_grad_per_pass")] = value
    out["meta/format_version"] = np.array(FORMAT_VERSION, dtype=np.int64)
    out["meta/upgraded_from"] = np.array(version, dtype=np.int64)
    return out


# ---------------------------------------------------------------------------
# Comparing traces
# ---------------------------------------------------------------------------


class Mismatch(NamedTuple):
    """One array of the reference that the other trace does not reproduce.

    Attributes
    ----------
    name : str
        The array's name, e.g. ``"step0/layer1/weight_grad_mean"``.
    kind : {"missing", "shape", "dtype", "value"}
        What differs, checked in this order (a later check runs only if the
        earlier ones pass).
    step, layer : int or None
        Parsed from the name.
    element : tuple of int or None
        For ``"value"``: the index of the first (C order) element out of tolerance
        (``()`` for a 0-d array). Named so because a tuple already has ``index``.
    ref, other : object
        The values there (``"value"``), the shapes (``"shape"``) or the dtypes
        (``"dtype"``); ``other`` is None for ``"missing"``.
    abs_err, rel_err : float or None
        At ``element`` (``rel_err = abs_err / |ref|``, inf if ``ref`` is 0); None for
        bool and string arrays.
    n_bad, size : int or None
        How many elements are out of tolerance, of how many.
    max_abs_err : float or None
        Largest error over the elements out of tolerance (None for bool and string
        arrays).
    """

    name: str
    kind: str
    step: int | None
    layer: int | None
    element: tuple | None = None
    ref: object = None
    other: object = None
    abs_err: float | None = None
    rel_err: float | None = None
    n_bad: int | None = None
    size: int | None = None
    max_abs_err: float | None = None


@dataclasses.dataclass
class Report:
    """Result of :func:`compare_traces`.

    Attributes
    ----------
    mismatches : list of Mismatch
        In the reference's array order (step by step, layer by layer).
    n_compared : int
        Number of reference arrays checked.
    rtol, atol : float
        The tolerances used for floating-point arrays.
    notes : list of str
        Differences that do not fail the comparison: arrays only in ``other``,
        differing metadata (versions, options).
    """

    mismatches: list[Mismatch]
    n_compared: int
    rtol: float
    atol: float
    notes: list[str] = dataclasses.field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when every reference array is reproduced."""
        return not self.mismatches

    def counts(self) -> dict[str, int]:
        """Number of mismatches of each kind."""
        out: dict[str, int] = {}
        for m in self.mismatches:
            out[m.kind] = out.get(m.kind, 0) + 1
        return out

    def format(self, max_mismatches: int = 10) -> str:
        """A human-readable summary with the first ``max_mismatches`` mismatches."""
        lines = [f"compared {self.n_compared} arrays with rtol={self.rtol:g} atol={self.atol:g}"]
        lines += [f"note: {n}" for n in self.notes]
        if self.ok:
            lines.append("OK: all arrays agree")
            return "\n".join(lines)
        shown = self.mismatches[:max_mismatches]
        width = max(len(m.name) for m in shown)
        lines.append(
            f"{'kind':<8} {'array':<{width}} {'step':>4} {'layer':>5}  {'index':<12} "
            f"{'ref':>24} {'other':>24} {'abs err':>10} {'rel err':>10}"
        )
        for m in shown:
            step = "-" if m.step is None else str(m.step)
            layer = "-" if m.layer is None else str(m.layer)
            if m.kind == "value":
                index = str(m.element)
                errors = [_fmt_err(m.abs_err), _fmt_err(m.rel_err)]
                tail = (
                    f"{_fmt(m.ref):>24} {_fmt(m.other):>24} {errors[0]:>10} {errors[1]:>10}"
                    f"  ({m.n_bad} of {m.size} bad"
                    + ("" if m.max_abs_err is None else f", max abs err {m.max_abs_err:.3g}")
                    + ")"
                )
            else:
                index = "-"
                other = "(absent)" if m.kind == "missing" else str(m.other)
                tail = f"{str(m.ref):>24} {other:>24}"
            lines.append(f"{m.kind:<8} {m.name:<{width}} {step:>4} {layer:>5}  {index:<12} {tail}")
        if len(self.mismatches) > max_mismatches:
            lines.append(f"... and {len(self.mismatches) - max_mismatches} more")
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.counts().items()))
        lines.append(f"FAIL: {len(self.mismatches)} of {self.n_compared} arrays differ ({kinds})")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def _fmt(value: object) -> str:
    if isinstance(value, float | np.floating):
        return f"{float(value):.17g}"
    return repr(value.item() if isinstance(value, np.generic) else value)


def _fmt_err(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"


def _step_layer(name: str) -> tuple[int | None, int | None]:
    match = _NAME_RE.search(name)
    if not match:
        return None, None
    step, layer = match.groups()
    return int(step), None if layer is None else int(layer)


def _as_trace(
    trace: str | os.PathLike[str] | dict[str, np.ndarray], what: str
) -> dict[str, np.ndarray]:
    if isinstance(trace, str | os.PathLike):
        return load_trace(trace)
    if isinstance(trace, dict):
        return upgrade_trace(trace, where=what)
    raise TypeError(f"{what} must be a path or a dict of arrays, got {type(trace).__name__}")


def _compare_values(ref, other, exact, rtol, atol):
    """Boolean array of the elements out of tolerance, and the absolute errors."""
    if exact:
        return ref != other, None
    r = ref.astype(np.float64)
    o = other.astype(np.float64)
    with np.errstate(invalid="ignore", over="ignore"):
        err = np.abs(o - r)
        bad = ~(err <= atol + rtol * np.abs(r))
    same = (r == o) | (np.isnan(r) & np.isnan(o))  # equal infinities, NaN against NaN
    bad &= ~same
    err = np.where(same, 0.0, err)
    return bad, err


def compare_traces(
    ref: str | os.PathLike[str] | dict[str, np.ndarray],
    other: str | os.PathLike[str] | dict[str, np.ndarray],
    *,
    rtol: float | None = None,
    atol: float | None = None,
    include: Sequence[str] | None = None,
) -> Report:
    """Compare a trace with a reference, array by array.

    Parameters
    ----------
    ref, other : str, os.PathLike or dict of str to ndarray
        Traces (paths are read with :func:`load_trace`).
    rtol, atol : float, optional
        Elementwise policy ``|other - ref| <= atol + rtol * |ref|`` for floating
        arrays. Defaults from :data:`DEFAULT_TOLERANCES` by the reference's
        ``meta/dtype`` (by the widest float dtype among its arrays if absent).
        Bool, integer and string arrays must be equal; NaN matches NaN.
    include : list of str, optional
        Glob patterns (:mod:`fnmatch`) of the reference arrays to check, e.g.
        ``["step0/*"]``; all by default.

    Returns
    -------
    Report
        ``meta/*`` arrays never fail the comparison (versions differ between
        ports) except ``meta/format_version``; their differences and arrays found
        only in ``other`` are listed in ``Report.notes``.

    Examples
    --------
    >>> ref = {"step0/layer0/w": np.array([1.0, 2.0])}
    >>> compare_traces(ref, {"step0/layer0/w": np.array([1.0, 2.0 + 1e-13])}).ok
    True
    >>> m = compare_traces(ref, {"step0/layer0/w": np.array([1.0, 2.5])}).mismatches[0]
    >>> m.kind, m.step, m.layer, m.element, m.abs_err
    ('value', 0, 0, (1,), 0.5)
    """
    ref = _as_trace(ref, "ref")
    other = _as_trace(other, "other")
    if rtol is None or atol is None:
        dtype_name = str(ref["meta/dtype"]) if "meta/dtype" in ref else None
        if dtype_name not in DEFAULT_TOLERANCES:
            floats = [a.dtype for a in ref.values() if a.dtype.kind == "f"]
            dtype_name = "float32" if floats and max(floats) == np.float32 else "float64"
        d_rtol, d_atol = DEFAULT_TOLERANCES[dtype_name]
        rtol = d_rtol if rtol is None else rtol
        atol = d_atol if atol is None else atol
    for value, name in ((rtol, "rtol"), (atol, "atol")):
        if not (isinstance(value, numbers.Real) and math.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    rtol, atol = float(rtol), float(atol)

    def selected(name: str) -> bool:
        return include is None or any(fnmatch.fnmatchcase(name, p) for p in include)

    mismatches, notes = [], []
    n_compared = 0
    for name, r in ref.items():
        if not selected(name):
            continue
        step, layer = _step_layer(name)
        if name.startswith("meta/") and name != "meta/format_version":
            o = other.get(name)
            if o is None or o.shape != r.shape or o.dtype != r.dtype or not np.array_equal(o, r):
                shown = "absent" if o is None else repr(o.tolist())[:60]
                notes.append(f"{name} differs: ref {repr(r.tolist())[:60]}, other {shown}")
            continue
        n_compared += 1
        if name not in other:
            mismatches.append(Mismatch(name, "missing", step, layer, ref=r.shape))
            continue
        o = other[name]
        if o.shape != r.shape:
            mismatches.append(Mismatch(name, "shape", step, layer, ref=r.shape, other=o.shape))
            continue
        if o.dtype != r.dtype:
            mismatches.append(
                Mismatch(name, "dtype", step, layer, ref=r.dtype.name, other=o.dtype.name)
            )
            continue
        exact = r.dtype.kind not in "fc"
        bad, err = _compare_values(r, o, exact, rtol, atol)
        if not np.any(bad):
            continue
        first = np.unravel_index(int(np.argmax(bad)), r.shape) if r.ndim else ()
        rv, ov = r[first], o[first]
        if exact:
            abs_err = rel_err = max_err = None
            if r.dtype.kind in "iu":
                abs_err = float(abs(int(ov) - int(rv)))
                rel_err = abs_err / abs(int(rv)) if int(rv) else float("inf")
                max_err = abs_err
        else:
            abs_err = float(err[first])
            rel_err = abs_err / abs(float(rv)) if float(rv) != 0 else float("inf")
            max_err = float(np.nanmax(np.where(bad, err, 0.0)))
            if math.isnan(abs_err):
                abs_err = rel_err = float("nan")
        mismatches.append(
            Mismatch(
                name,
                "value",
                step,
                layer,
                element=tuple(int(i) for i in first),
                ref=rv.item(),
                other=ov.item(),
                abs_err=abs_err,
                rel_err=rel_err,
                n_bad=int(np.count_nonzero(bad)),
                size=int(r.size),
                max_abs_err=max_err,
            )
        )
    extra = [n for n in other if n not in ref and selected(n)]
    if extra:
        notes.append(f"{len(extra)} arrays only in other: {', '.join(extra[:5])}")
    return Report(mismatches, n_compared, rtol, atol, notes)


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------


def build_trace_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser of ``cpusparse trace`` (training flags from the option table).

    ``argv`` is read for ``--preset`` only, whose options become the defaults.
    """
    d = _RUN_DEFAULTS
    parser = argparse.ArgumentParser(
        prog="cpusparse trace",
        description=(
            "Record a golden trace: every intermediate of a few training steps of a small "
            "sparse MLP, VGG or ResNet, as a versioned .npz (cpusparse trace --describe "
            "prints the format)."
        ),
        formatter_class=HelpFormatter,
    )
    parser.add_argument("out", metavar="OUT.npz", nargs="?", help="trace file to write")
    parser.add_argument(
        "--describe", action="store_true", help="print the trace format page and exit"
    )
    model = parser.add_argument_group("model")
    model.add_argument("--model", choices=MODELS, default="mlp", help="network to trace")
    model.add_argument(
        "--layers",
        type=layer_sizes,
        default=None,
        metavar="N,N,...",
        help="all layer sizes including inputs and classes "
        f"(default: {','.join(map(str, d['layers']))}; 64,32,10 with --dataset digits)",
    )
    model.add_argument("--n-in", type=int, help="MLP input size (with --hidden, --n-classes)")
    model.add_argument("--hidden", type=layer_sizes, metavar="N[,N...]", help="hidden widths")
    model.add_argument(
        "--n-classes",
        type=int,
        help=f"number of classes (CNN default: {CNN_DEFAULTS['n_classes']})",
    )
    c = CNN_DEFAULTS
    model.add_argument(
        "--widths",
        type=layer_sizes,
        metavar="N,N,...",
        help=f"CNN: channels of each stage (default: {','.join(map(str, c['widths']))})",
    )
    model.add_argument(
        "--input-shape",
        type=layer_sizes,
        metavar="C,H,W",
        help=f"CNN: one image's shape (default: {','.join(map(str, c['input_shape']))})",
    )
    model.add_argument(
        "--convs-per-stage",
        type=layer_sizes,
        metavar="N[,N...]",
        help="VGG: convolutions per stage, one count or one per stage, e.g. 2,2,4,4,4 for "
        "VGG-19 (default: 2)",
    )
    model.add_argument(
        "--blocks-per-stage", type=int, help="ResNet: basic blocks per stage (default: 1)"
    )
    model.add_argument(
        "--prune-first",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="CNN: whether the first convolution takes a mask (default: yes)",
    )
    model.add_argument(
        "--mask-order",
        choices=MASK_ORDERS,
        default=None,
        help="CNN: where a dropped channel's mask acts in the batch norm (default: after_norm)",
    )
    model.add_argument(
        "--granularity",
        choices=tuple(dict.fromkeys((*GRANULARITIES, *CONV_GRANULARITIES))),
        default=None,
        help="what one mask bit keeps: weight or neuron (MLP, default weight), channel or "
        "weight (CNN, default channel)",
    )
    model.add_argument(
        "--stored-density",
        type=float,
        default=d["stored_density"],
        help="fraction of entries stored in each sparse layer's pattern",
    )
    model.add_argument(
        "--sparse-classifier", action="store_true", help="make the classifier sparse too"
    )
    model.add_argument(
        "--dtype", choices=("float32", "float64"), default=d["dtype"], help="floating type"
    )
    train = parser.add_argument_group("training (the options of TrainConfig)")
    preset = add_preset(train, preset_of(argv))
    add_options(train, _train_defaults(), {**TRAIN_DEFAULTS, **preset})
    run = parser.add_argument_group("data and run")
    run.add_argument(
        "--dataset", choices=DATASETS, default=d["dataset"], help="synthetic or real inputs"
    )
    run.add_argument("--n-data", type=int, default=d["n_data"], help="synthetic data size")
    run.add_argument("--seed", type=int, default=d["seed"], help="seed of every stream")
    run.add_argument("--steps", type=int, default=d["steps"], help="training steps recorded")
    run.add_argument("--batch-size", type=int, default=d["batch_size"], help="mini-batch size")
    return parser


def main_trace(argv: Sequence[str] | None = None) -> int:
    """Run ``cpusparse trace``; returns 0 on success, 1 on a failure, 2 on a usage error.

    Every value is checked, and an error named by its flag, and the output path is
    checked (:func:`cpusparse._io.check_output_path`) before any step runs; errors
    are one line on stderr (:func:`cpusparse.tools.cli.run_command`).
    """
    from .._io import OutputPathError, check_output_path
    from .cli import CommandError, UsageError, parse_args, run_command

    def body() -> int:
        arguments = sys.argv[1:] if argv is None else list(argv)
        args = parse_args(build_trace_parser(arguments), arguments)
        if getattr(args, "describe", False):
            print(describe_format())
            return 0
        if args.model != "mlp":
            return _main_cnn(args)
        for flag in ("widths", "input_shape", "convs_per_stage", "blocks_per_stage"):
            if getattr(args, flag) is not None:
                raise UsageError(f"--{flag.replace('_', '-')} is for --model vgg or resnet")
        for flag in ("prune_first", "mask_order"):
            if getattr(args, flag) is not None:
                raise UsageError(f"--{flag.replace('_', '-')} is for --model vgg or resnet")
        if args.granularity is None:
            args.granularity = _RUN_DEFAULTS["granularity"]
        elif args.granularity not in GRANULARITIES:
            raise UsageError(
                f"--granularity must be weight or neuron for --model mlp, got {args.granularity}"
            )
        parts = (args.n_in, args.hidden, args.n_classes)
        if args.layers is not None and any(p is not None for p in parts):
            raise UsageError("give --layers or --n-in/--hidden/--n-classes, not both")
        if any(p is not None for p in parts):
            if any(p is None for p in parts):
                raise UsageError("--n-in, --hidden and --n-classes go together")
            for flag, value in (("--n-in", args.n_in), ("--n-classes", args.n_classes)):
                if value < 1:
                    raise UsageError(f"{flag} must be an int >= 1, got {value}")
            layers = [args.n_in, *args.hidden, args.n_classes]
        elif args.layers is not None:
            layers = args.layers
        elif args.dataset == "digits":
            layers = [64, 32, 10]
        else:
            layers = list(_RUN_DEFAULTS["layers"])
        if not 0.0 < args.stored_density <= 1.0:
            raise UsageError(f"--stored-density must be in (0, 1], got {args.stored_density}")
        names = [*_RUN_DEFAULTS, *_train_defaults(), "preset"]
        opts = {name: getattr(args, name) for name in names if name != "layers"}
        arrays = _write(args, {"layers": tuple(layers), **opts})
        print(
            f"wrote {args.out}: {len(arrays)} arrays, {args.steps} steps, layers "
            f"{','.join(map(str, layers))}, {args.dtype}, {args.score_estimator}"
        )
        return 0

    def _main_cnn(args: argparse.Namespace) -> int:
        for flag in ("layers", "n_in", "hidden"):
            if getattr(args, flag) is not None:
                raise UsageError(f"--{flag.replace('_', '-')} is for --model mlp")
        if args.stored_density != _RUN_DEFAULTS["stored_density"] or args.sparse_classifier:
            raise UsageError("--stored-density and --sparse-classifier are for --model mlp")
        key, default = _PER_STAGE[args.model]
        other = "blocks_per_stage" if key == "convs_per_stage" else "convs_per_stage"
        if getattr(args, other) is not None:
            raise UsageError(
                f"--{other.replace('_', '-')} is for --model "
                f"{'resnet' if other == 'blocks_per_stage' else 'vgg'}, not {args.model}"
            )
        c = CNN_DEFAULTS
        cnn = {
            "model": args.model,
            "widths": tuple(c["widths"] if args.widths is None else args.widths),
            "input_shape": tuple(
                c["input_shape"] if args.input_shape is None else args.input_shape
            ),
            "n_classes": c["n_classes"] if args.n_classes is None else args.n_classes,
            key: default if getattr(args, key) is None else _one_or_all(getattr(args, key)),
            "granularity": c["granularity"] if args.granularity is None else args.granularity,
            "prune_first": c["prune_first"] if args.prune_first is None else args.prune_first,
            "mask_order": c["mask_order"] if args.mask_order is None else args.mask_order,
        }
        if len(cnn["input_shape"]) != 3:
            shown = ",".join(map(str, cnn["input_shape"]))
            raise UsageError(f"--input-shape must be C,H,W (three positive ints), got {shown}")
        for flag, value in (
            ("--n-classes", cnn["n_classes"]),
            ("--" + key.replace("_", "-"), min(np.atleast_1d(cnn[key]))),
        ):
            if value < 1:
                raise UsageError(f"{flag} must be an int >= 1, got {value}")
        counts = cnn[key]
        if isinstance(counts, tuple) and len(counts) != len(cnn["widths"]):
            raise UsageError(
                f"--{key.replace('_', '-')} must give one count, or one per stage "
                f"({len(cnn['widths'])} widths), got {','.join(map(str, counts))}"
            )
        if cnn["granularity"] not in CONV_GRANULARITIES:
            raise UsageError(
                f"--granularity must be channel or weight for --model {args.model}, got "
                f"{cnn['granularity']}"
            )
        names = [n for n in CNN_DEFAULTS if n not in cnn] + [*_train_defaults(), "preset"]
        arrays = _write(args, {**cnn, **{name: getattr(args, name) for name in names}})
        print(
            f"wrote {args.out}: {len(arrays)} arrays, {args.steps} steps, {args.model} widths "
            f"{','.join(map(str, cnn['widths']))} on {'x'.join(map(str, cnn['input_shape']))} "
            f"images, {args.dtype}, {args.score_estimator}"
        )
        return 0

    def _write(args: argparse.Namespace, opts: dict[str, object]) -> dict[str, np.ndarray]:
        # The checks shared by every model, the output path, then the trace.
        for name, low in (("steps", 1), ("batch_size", 1), ("n_data", 1), ("seed", 0)):
            if getattr(args, name) < low:
                flag = "--" + name.replace("_", "-")
                raise UsageError(f"{flag} must be an int >= {low}, got {getattr(args, name)}")
        rows = {option.name: option for option in options()}
        for name in _train_defaults():
            try:
                rows[name].constraint.check(getattr(args, name), rows[name].flag)
            except (ValueError, TypeError) as exc:
                raise UsageError(str(exc)) from None
        try:
            _options(opts)  # every model option, before the output path is touched
        except (ValueError, TypeError) as exc:
            raise UsageError(str(exc)) from None
        if args.out is None:
            raise UsageError("the following arguments are required: OUT.npz")
        try:
            check_output_path(args.out, "output file")
        except OutputPathError as exc:
            raise UsageError(str(exc)) from None
        try:
            return write_trace(args.out, **opts)
        except (ValueError, TypeError) as exc:
            raise UsageError(str(exc)) from None
        except OSError as exc:
            raise CommandError(f"output file {args.out}: {exc}") from None

    return run_command("cpusparse trace", body)


def build_verify_parser() -> argparse.ArgumentParser:
    """The parser of ``cpusparse verify``."""
    parser = argparse.ArgumentParser(
        prog="cpusparse verify",
        description=(
            "Compare a trace with a reference trace: |other - ref| <= atol + rtol * |ref| "
            "for floating arrays, equality for the others. Exit status 0 if all agree, 1 on "
            "a mismatch, 2 on a usage error or an unreadable file."
        ),
    )
    parser.add_argument("ref", metavar="REF.npz", help="reference trace (cpusparse trace)")
    parser.add_argument("other", metavar="OTHER.npz", help="trace to check")
    parser.add_argument(
        "--rtol", type=float, help="relative tolerance (default by dtype: 1e-5 / 1e-12)"
    )
    parser.add_argument(
        "--atol", type=float, help="absolute tolerance (default by dtype: 1e-6 / 1e-14)"
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="GLOB",
        help="check only arrays matching this pattern, e.g. 'step0/*' (repeatable)",
    )
    parser.add_argument(
        "--max-report", type=int, default=10, help="mismatches printed (the first ones)"
    )
    return parser


def main_verify(argv: Sequence[str] | None = None) -> int:
    """Run ``cpusparse verify``; returns 0 (agree), 1 (mismatch or failure) or 2 (usage).

    An unreadable or malformed trace file is a usage error (2); errors are one line
    on stderr (:func:`cpusparse.tools.cli.run_command`).
    """
    from .cli import UsageError, parse_args, run_command

    def body() -> int:
        args = parse_args(build_verify_parser(), sys.argv[1:] if argv is None else argv)
        for flag, value in (("--rtol", args.rtol), ("--atol", args.atol)):
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise UsageError(f"{flag} must be a finite number >= 0, got {value}")
        try:
            ref = load_trace(args.ref)
            other = load_trace(args.other)
            report = compare_traces(ref, other, rtol=args.rtol, atol=args.atol, include=args.only)
        except (TraceError, ValueError) as exc:
            raise UsageError(str(exc)) from None
        if report.n_compared == 0:
            raise UsageError("no arrays selected for comparison (check --only)")
        print(report.format(max_mismatches=max(args.max_report, 1)))
        return 0 if report.ok else 1

    return run_command("cpusparse verify", body)
