"""cpusparse: completely sparse neural-network training on the CPU.

A reference implementation of the variance-reduced policy-gradient estimator
(VR-PGE) of Zhou et al., "Efficient Neural Network Training via Forward and
Backward Propagation Sparsification" (NeurIPS 2021, arXiv:2111.05685).
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
