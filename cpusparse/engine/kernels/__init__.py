"""Numba kernels (private).

:mod:`~cpusparse.engine.kernels.csr` holds the ``@njit`` kernels over raw CSR arrays;
:mod:`~cpusparse.engine.kernels.intrinsics` the LLVM intrinsics that fix the order of
their vector reductions. Kernels validate nothing, allocate nothing and draw no random
numbers: the wrappers of :mod:`cpusparse.engine.csr` do that.
"""
