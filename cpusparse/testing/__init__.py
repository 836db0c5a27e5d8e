"""Oracles for tests, here and in other implementations of the method.

- :mod:`~cpusparse.testing.reference`: dense NumPy code for every sparse operation;
- :mod:`~cpusparse.testing.replay_torch`: a standalone PyTorch replay of golden traces
  (needs PyTorch), for checking a port against ``cpusparse trace``.

Nothing is imported eagerly, so that ``import cpusparse.testing`` needs no PyTorch.
"""
