"""Type aliases used in the annotations of the package (private module).

Annotations only: nothing here is checked at run time. Arrays are NumPy arrays of
the element type named; float arrays are float32 or float64 (the two dtypes the
engine computes in).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, TypeAlias

if TYPE_CHECKING:  # the aliases are strings: importing this module imports nothing
    import numpy as np
    import numpy.typing as npt

__all__ = ["FloatArray", "BoolArray", "IndexArray", "IntArray", "RNGLike", "Shape2"]

FloatArray: TypeAlias = "npt.NDArray[np.floating]"
"""An array of float32 or float64 (weights, activations, scores, gradients)."""

BoolArray: TypeAlias = "npt.NDArray[np.bool_]"
"""A boolean array (masks, kept units and entries)."""

IndexArray: TypeAlias = "npt.NDArray[np.int64]"
"""An int64 array (CSR row pointers and column indices, offsets)."""

IntArray: TypeAlias = "npt.NDArray[np.integer]"
"""An array of any integer type (labels, index arrays given by a caller)."""

RNGLike: TypeAlias = "int | np.integer | np.random.Generator | None"
"""What :func:`cpusparse.check_rng` accepts: None, an int seed or a Generator."""

Shape2: TypeAlias = "tuple[int, int]"
"""``(n_out, n_in)``."""
