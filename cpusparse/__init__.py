"""cpusparse: completely sparse neural-network training on the CPU.

A reference implementation of the variance-reduced policy-gradient estimator
(VR-PGE) of Zhou et al., "Efficient Neural Network Training via Forward and
Backward Propagation Sparsification" (NeurIPS 2021, arXiv:2111.05685).

Where things live:

- :mod:`cpusparse.sparse`: masked CSR products (validated wrappers over the Numba
  kernels of :mod:`cpusparse._kernels`);
- :mod:`cpusparse.layers`, :mod:`cpusparse.losses`, :mod:`cpusparse.network`: the
  autograd-free engine, ``forward -> (out, cache)`` and ``backward -> (dx, grads)``;
- :mod:`cpusparse.estimators`: Bernoulli masks, score function, REINFORCE, VR-PGE
  and the exact gradient by enumeration;
- :mod:`cpusparse.projection`: projection of the scores onto the budget set;
- :mod:`cpusparse.train`: the training step (Algorithm 1 of the paper);
- :mod:`cpusparse.optim`: optimizers with explicit state;
- :mod:`cpusparse.estimator`: :class:`SparseMLPClassifier`, the scikit-learn interface;
- :mod:`cpusparse.checkpoint`: atomic, bit-exact checkpoints;
- :mod:`cpusparse.cli`: the ``cpusparse`` command (train, bench, trace, verify);
- :mod:`cpusparse.datasets`: offline data sets;
- :mod:`cpusparse.reference`: dense NumPy oracle of every sparse operation.
"""

__version__ = "0.1.0"

from .checkpoint import CheckpointError, load_checkpoint, restore_state, save_checkpoint
from .datasets import DATASETS, Dataset, load_dataset
from .estimators import (
    check_random_state,
    exact_expectation,
    exact_grad,
    reinforce_grad,
    sample_masks,
    score_function,
    vrpge_grad,
)
from .layers import Linear, ReLU, SparseLinear
from .losses import softmax, softmax_cross_entropy
from .network import Sequential, make_mlp
from .optim import SGD, Adam, clip_grad_norm, compact_state, constant_schedule, cosine_schedule
from .projection import concat_scores, project_scores, split_scores


def __getattr__(name):
    # SparseMLPClassifier imports scikit-learn (about 0.9 s): load it on first use
    # so that ``import cpusparse`` stays fast for the engine and the command line.
    if name == "SparseMLPClassifier":
        from .estimator import SparseMLPClassifier

        return SparseMLPClassifier
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "__version__",
    "SparseMLPClassifier",
    "CheckpointError",
    "load_checkpoint",
    "restore_state",
    "save_checkpoint",
    "DATASETS",
    "Dataset",
    "load_dataset",
    "check_random_state",
    "exact_expectation",
    "exact_grad",
    "reinforce_grad",
    "sample_masks",
    "score_function",
    "vrpge_grad",
    "concat_scores",
    "project_scores",
    "split_scores",
    "Linear",
    "ReLU",
    "SparseLinear",
    "softmax",
    "softmax_cross_entropy",
    "Sequential",
    "make_mlp",
    "SGD",
    "Adam",
    "clip_grad_norm",
    "compact_state",
    "constant_schedule",
    "cosine_schedule",
]
