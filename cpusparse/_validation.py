"""Input validation shared by the public wrappers (private module).

Every message names the argument, the requirement and what was received.
"""

from __future__ import annotations

import numbers

import numpy as np

from .estimators import check_random_state  # noqa: F401  (one implementation)

FLOAT_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def check_array(x, name, *, ndim=None, shape=None, finite=False, float_only=True):
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


def check_same_dtype(*named):
    """Raise TypeError unless every ``(name, array)`` pair has the same dtype."""
    (first_name, first), *rest = named
    for name, arr in rest:
        if arr.dtype != first.dtype:
            raise TypeError(
                f"{name} must have the same dtype as {first_name} ({first.dtype}), got "
                f"{arr.dtype}; cast explicitly instead of mixing float32 and float64"
            )


def check_density(density, name="density"):
    """Return ``density`` as a float after checking it is in (0, 1]."""
    if isinstance(density, bool) or not isinstance(density, numbers.Real):
        raise TypeError(f"{name} must be a real number in (0, 1], got {density!r}")
    if not 0.0 < float(density) <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {density}")
    return float(density)


def check_n_samples(n_samples):
    """Return the number of masks per step K after checking it is an int >= 2."""
    if isinstance(n_samples, bool) or not isinstance(n_samples, numbers.Integral) or n_samples < 2:
        raise ValueError(f"n_samples must be an int >= 2 (K), got {n_samples!r}")
    return int(n_samples)


def check_choice(value, name, choices):
    """Raise ValueError unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")
    return value
