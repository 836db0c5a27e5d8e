"""cpusparse: completely sparse neural-network training on the CPU.

A reference implementation of the variance-reduced policy-gradient estimator
(VR-PGE) of Zhou et al., "Efficient Neural Network Training via Forward and
Backward Propagation Sparsification" (NeurIPS 2021, arXiv:2111.05685).

Where things live (lower packages never import higher ones):

- :mod:`cpusparse.engine`: what computes -- the Numba kernels, masked CSR products,
  the layer protocol and its layers, containers and losses;
- :mod:`cpusparse.method`: the paper's mathematics -- Bernoulli masks,
  score-gradient estimators (a registry), the exact gradient by enumeration and the
  budget projection;
- :mod:`cpusparse.models`: network builders;
- :mod:`cpusparse.export`: a trained network as a narrower dense one, or a PyTorch module;
- :mod:`cpusparse.training`: the option table, the state, the training step
  (Algorithm 1), compaction, the loop, optimizers and checkpoints;
- :mod:`cpusparse.sklearn`: :class:`SparseMLPClassifier` and :class:`SparseCNNClassifier`,
  the scikit-learn interface;
- :mod:`cpusparse.testing`: the dense reference and the PyTorch replay of golden
  traces, importable by other implementations;
- :mod:`cpusparse.tools`: the ``cpusparse`` command (train, bench, trace, verify) and
  the offline data sets;
- :mod:`cpusparse.sweep`: grids of fits on Dask (``cpusparse sweep``), resumable, with
  reports (imported on its own: ``import cpusparse.sweep``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import engine, export, method, models, training
from ._validation import check_rng
from ._version import __version__
from .engine import Layer, Linear, ReLU, Sequential, SparseLinear, softmax, softmax_cross_entropy
from .method import (
    concat_scores,
    exact_expectation,
    exact_grad,
    project_scores,
    reinforce_grad,
    sample_masks,
    score_function,
    split_scores,
    vrpge_grad,
)
from .models import mlp, resnet, vgg
from .training import (
    SGD,
    Adam,
    TrainConfig,
    clip_grad_norm,
    compact_state,
    constant_schedule,
    cosine_schedule,
    train_step,
)

# Loaded on first use (scikit-learn takes about 0.9 s; the others a few ms each), so that
# ``import cpusparse`` stays fast for the engine and the command line.
_LAZY = {
    "SparseMLPClassifier": "cpusparse.sklearn",
    "SparseCNNClassifier": "cpusparse.sklearn",
    "CheckpointError": "cpusparse.training.checkpoint",
    "save_checkpoint": "cpusparse.training.checkpoint",
    "load_checkpoint": "cpusparse.training.checkpoint",
    "restore_state": "cpusparse.training.checkpoint",
    "DATASETS": "cpusparse.tools.datasets",
    "Dataset": "cpusparse.tools.datasets",
    "load_dataset": "cpusparse.tools.datasets",
}

if TYPE_CHECKING:
    from .sklearn import SparseCNNClassifier, SparseMLPClassifier
    from .tools.datasets import DATASETS, Dataset, load_dataset
    from .training.checkpoint import (
        CheckpointError,
        load_checkpoint,
        restore_state,
        save_checkpoint,
    )


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "__version__",
    "engine",
    "method",
    "models",
    "export",
    "training",
    "SparseMLPClassifier",
    "SparseCNNClassifier",
    "check_rng",
    "Layer",
    "SparseLinear",
    "Linear",
    "ReLU",
    "Sequential",
    "softmax",
    "softmax_cross_entropy",
    "mlp",
    "vgg",
    "resnet",
    "sample_masks",
    "score_function",
    "reinforce_grad",
    "vrpge_grad",
    "exact_expectation",
    "exact_grad",
    "project_scores",
    "concat_scores",
    "split_scores",
    "TrainConfig",
    "train_step",
    "SGD",
    "Adam",
    "clip_grad_norm",
    "compact_state",
    "constant_schedule",
    "cosine_schedule",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "restore_state",
    "DATASETS",
    "Dataset",
    "load_dataset",
]
