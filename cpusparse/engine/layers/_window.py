"""Sliding-window geometry shared by the convolution and the pools (private module)."""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

Pair = tuple[int, int]


def pair(value: Any, name: str, minimum: int) -> Pair:
    """An int or a pair of ints, each at least ``minimum``, as a tuple of two ints."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool | np.bool_):
        result = (int(value), int(value))
    elif (
        isinstance(value, tuple | list)
        and len(value) == 2
        and all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool | np.bool_) for v in value
        )
    ):
        result = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(result) < minimum:
        raise ValueError(f"{name} must be >= {minimum} (an int or a pair), got {value!r}")
    return result


def output_size(height: int, width: int, kernel_size: Pair, stride: Pair, padding: Pair) -> Pair:
    """``(H_out, W_out)`` of a window sliding over a padded input; an error if it is empty."""
    (kh, kw), (sh, sw), (ph, pw) = kernel_size, stride, padding
    if height + 2 * ph < kh or width + 2 * pw < kw:
        raise ValueError(
            f"kernel_size {kernel_size} must fit in the padded input: x is {height} x "
            f"{width}, padded {height + 2 * ph} x {width + 2 * pw}"
        )
    return (height + 2 * ph - kh) // sh + 1, (width + 2 * pw - kw) // sw + 1
