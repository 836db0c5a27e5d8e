"""Input validation shared by the public wrappers (private module).

Every message names the argument, the requirement and what was received.
"""

from __future__ import annotations

import numbers
from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING, TypeVar

import numpy as np

from ._typing import RNGLike

if TYPE_CHECKING:
    import numpy.typing as npt

_T = TypeVar("_T")

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def check_rng(rng: RNGLike = None) -> np.random.Generator:
    """Turn ``rng`` into a :class:`numpy.random.Generator`.

    Unlike scikit-learn's ``check_random_state``, it accepts no legacy
    ``RandomState``: every draw in cpusparse comes from a ``Generator``.

    Parameters
    ----------
    rng : None, int or numpy.random.Generator, default=None
        ``None`` gives a fresh generator seeded from the operating system,
        an int seeds ``numpy.random.default_rng``, a Generator is returned
        unchanged (not copied), so draws advance its state.

    Returns
    -------
    generator : numpy.random.Generator
        The generator to draw from.

    Raises
    ------
    TypeError
        If ``rng`` is of any other type, including the legacy
        :class:`numpy.random.RandomState` and ``bool``.
    ValueError
        If ``rng`` is a negative integer.

    Notes
    -----
    The package never touches NumPy's global random state. One seed is turned
    into one stream; callers that need several independent streams (weight
    initialisation, data order, masks) should spawn them from one
    :class:`numpy.random.SeedSequence` and pass a Generator per purpose.

    Examples
    --------
    >>> import numpy as np
    >>> from cpusparse import check_rng
    >>> g = check_rng(0)
    >>> isinstance(g, np.random.Generator)
    True
    >>> check_rng(g) is g
    True
    """
    if rng is None:
        return np.random.default_rng()
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, numbers.Integral) and not isinstance(rng, bool | np.bool_):
        if rng < 0:
            raise ValueError(f"rng must be a non-negative integer seed, got {rng}")
        return np.random.default_rng(int(rng))
    raise TypeError(
        f"rng must be None, an int or a numpy.random.Generator, got {type(rng).__name__}"
    )


def check_array(
    x: npt.ArrayLike,
    name: str,
    *,
    ndim: int | None = None,
    shape: Sequence[int] | None = None,
    finite: bool = False,
    float_only: bool = True,
) -> np.ndarray:
    """Return ``x`` as an ndarray after checking its dimensions, shape and values."""
    if not isinstance(x, np.ndarray):
        x = np.asarray(x)
        if float_only and x.dtype.kind in "iub":
            x = x.astype(np.float64)
    if float_only and x.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must have dtype float32 or float64, got {x.dtype}")
    if ndim is not None and x.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {x.shape}")
    if shape is not None and x.shape != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {x.shape}")
    if finite and not np.isfinite(x).all():
        n_bad = int(np.size(x) - np.isfinite(x).sum())
        raise ValueError(f"{name} must be finite, got {n_bad} NaN or infinite values")
    return x


def check_same_dtype(*named: tuple[str, np.ndarray]) -> None:
    """Raise TypeError unless every ``(name, array)`` pair has the same dtype."""
    (first_name, first), *rest = named
    for name, arr in rest:
        if arr.dtype != first.dtype:
            raise TypeError(
                f"{name} must have the same dtype as {first_name} ({first.dtype}), got "
                f"{arr.dtype}; cast explicitly instead of mixing float32 and float64"
            )


def check_density(density: float, name: str = "density") -> float:
    """Return ``density`` as a float after checking it is in (0, 1]."""
    if isinstance(density, bool) or not isinstance(density, numbers.Real):
        raise TypeError(f"{name} must be a real number in (0, 1], got {density!r}")
    if not 0.0 < float(density) <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {density}")
    return float(density)


def check_choice(value: _T, name: str, choices: Collection[object]) -> _T:
    """Raise ValueError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value
