"""cpusparse: completely sparse neural-network training on the CPU.

A reference implementation of the variance-reduced policy-gradient estimator
(VR-PGE) of Zhou et al., "Efficient Neural Network Training via Forward and
Backward Propagation Sparsification" (NeurIPS 2021, arXiv:2111.05685).

Where things live:

- :mod:`cpusparse.sparse`: masked CSR products (validated wrappers over the Numba
  kernels of :mod:`cpusparse._kernels`);
- :mod:`cpusparse.layers`, :mod:`cpusparse.losses`, :mod:`cpusparse.network`: the
  autograd-free engine, ``forward -> (out, cache)`` and ``backward -> (dx, grads)``;
- :mod:`cpusparse.optim`: optimizers with explicit state;
- :mod:`cpusparse.datasets`: offline data sets.
"""

__version__ = "0.1.0"

from .datasets import DATASETS, Dataset, load_dataset
from .layers import Linear, ReLU, SparseLinear
from .losses import softmax, softmax_cross_entropy
from .network import Sequential, make_mlp
from .optim import SGD, Adam, clip_grad_norm, compact_state, constant_schedule, cosine_schedule

__all__ = [
    "__version__",
    "DATASETS",
    "Dataset",
    "load_dataset",
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
