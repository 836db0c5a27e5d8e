"""Grid files: which fits a sweep runs, read from TOML and checked before any fit starts.

A grid file names the axes of one or more blocks; each block is the product of its
axes, the grid is the union of its blocks (cells of equal settings run once)::

    name = "estimators"          # optional: the file's stem by default
    seeds = 5                    # 0 .. 4; or a list, e.g. [0, 3, 7]
    test_fraction = 0.2          # the stratified test split (not for mnist1d)

    [params]                     # classifier parameters of every block
    hidden_layer_sizes = [300, 100]

    [[grid]]
    model = "mlp"                # "mlp", "vgg" or "resnet"
    dataset = ["digits", "mnist5k"]
    granularity = "weight"
    density = [0.1, 0.01]
    estimator = ["vrpge", "reinforce", "random-mask"]
    n_masks = 2                  # K, the forward passes of a step
    [grid.params]                # this block's own parameters (over the file's)
    max_iter = 30

An axis takes one value or a list; ``seeds`` may also be set per block. ``params`` are
parameters of :class:`~cpusparse.SparseMLPClassifier` (``model = "mlp"``) or
:class:`~cpusparse.SparseCNNClassifier` (``"vgg"``, ``"resnet"``: ``architecture`` is the
model), except the axes' own (``density``, ``granularity``, ``score_estimator``,
``n_masks``, ``random_state``) and the run's (``n_jobs``, ``verbose``, ``checkpoint``,
``resume``). The estimators are those of the classifiers' ``score_estimator`` and two
baselines trained by the same loop (:data:`ESTIMATORS`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import numbers
import os
import re
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from .._version import __version__

__all__ = [
    "AXES",
    "ESTIMATORS",
    "MODELS",
    "SWEEP_DATASETS",
    "Cell",
    "Grid",
    "GridError",
    "load_grid",
    "parse_grid",
]

MODELS = {
    "mlp": "SparseMLPClassifier",
    "vgg": "SparseCNNClassifier",
    "resnet": "SparseCNNClassifier",
}
"""``model`` -> the classifier that fits it."""

GRANULARITIES = {
    "mlp": ("weight", "neuron"),
    "vgg": ("channel", "weight"),
    "resnet": ("channel", "weight"),
}
"""``model`` -> its mask granularities (the classifier's default first)."""

ESTIMATORS = {
    "vrpge": "VR-PGE, the paper's estimator (score_estimator='vrpge')",
    "vrpge-sqrt": "VR-PGE with the authors' sqrt(s(1-s)) scaling (score_estimator='vrpge-sqrt')",
    "reinforce": "the plain policy gradient (score_estimator='reinforce')",
    "straight-through": "the straight-through estimator (score_estimator='straight-through')",
    "random-mask": (
        "a random fixed mask of floor(k) units, the weights trained on it for all epochs "
        "as in fine-tuning (max_iter=0, fixed_mask='random')"
    ),
    "dense": "every unit kept (density 1.0), trained like random-mask: the dense anchor",
}
"""The values of the ``estimator`` axis."""

_BASELINES = ("random-mask", "dense")

SWEEP_DATASETS = ("digits", "mnist5k", "mnist1d")
"""The data sets a sweep can load on any worker (``mnist`` needs a local path)."""

AXES = ("model", "dataset", "granularity", "density", "estimator", "n_masks", "seed")
"""The axes of a cell, in the order of its name."""

_BLOCK_KEYS = (
    "model",
    "dataset",
    "granularity",
    "density",
    "estimator",
    "n_masks",
    "seeds",
    "params",
)
_TOP_KEYS = ("name", "seeds", "test_fraction", "params", "grid")
_OWN_PARAMS = (
    "density",
    "granularity",
    "score_estimator",
    "n_masks",
    "random_state",
    "architecture",
)
_RUN_PARAMS = ("n_jobs", "verbose", "checkpoint", "resume")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_MAX_SEED = 2**32 - 1  # numpy's and scikit-learn's RandomState seeds


class GridError(ValueError):
    """A grid file that cannot be run; the message names the file and the key."""


@dataclasses.dataclass(frozen=True)
class Cell:
    """One fit of a sweep: the axes' values and the classifier's resolved parameters.

    Attributes
    ----------
    model, dataset, granularity, estimator : str
    density : float
        As the grid gives it (1.0 for ``estimator="dense"``).
    n_masks : int
    seed : int
        The classifier's ``random_state`` and the seed of the train/test split.
    test_fraction : float
    params : dict
        Every parameter of the classifier (defaults filled in), JSON values, without
        the run's own (``n_jobs``, ``verbose``, ``checkpoint``, ``resume``).
    """

    model: str
    dataset: str
    granularity: str
    density: float
    estimator: str
    n_masks: int
    seed: int
    test_fraction: float
    params: Mapping[str, Any] = dataclasses.field(hash=False)

    @property
    def classifier(self) -> str:
        """The name of the classifier class that fits this cell."""
        return MODELS[self.model]

    def settings(self) -> dict[str, Any]:
        """Everything that determines the cell's result, JSON-ready."""
        axes = {name: getattr(self, name) for name in AXES}
        return {
            **axes,
            "test_fraction": self.test_fraction,
            "classifier": self.classifier,
            "params": dict(self.params),
        }

    @property
    def key(self) -> str:
        """SHA-256 of the settings and the package version: a result's identity."""
        text = json.dumps({"settings": self.settings(), "version": __version__}, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def name(self) -> str:
        """A readable file name stem, unique with the key's first digits."""
        return (
            f"{self.model}-{self.dataset}-{self.granularity}-d{self.density:g}-"
            f"{self.estimator}-K{self.n_masks}-s{self.seed}-{self.key[:10]}"
        )


@dataclasses.dataclass(frozen=True)
class Grid:
    """The cells of a grid file, in file order, without duplicates.

    Attributes
    ----------
    name : str
    cells : tuple of Cell
    source : str
        The file it was read from (or ``"<grid>"``).
    """

    name: str
    cells: tuple[Cell, ...]
    source: str


def load_grid(path: str | os.PathLike[str]) -> Grid:
    """Read and check a grid file.

    Parameters
    ----------
    path : str or os.PathLike
        A TOML file (read with :mod:`tomllib`, or ``tomli`` before Python 3.11).

    Returns
    -------
    grid : Grid

    Raises
    ------
    GridError
        If the file cannot be read or parsed, or a key or value is wrong; the message
        names the file and the key, e.g. ``"grid.toml: grid[1].density: expected a
        number in (0, 1], got 1.5"``.
    """
    path = os.fspath(path)
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise GridError(f"cannot read grid file {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise GridError(f"grid file {path} is not valid TOML: {exc}") from None
    stem = os.path.splitext(os.path.basename(path))[0]
    return parse_grid(data, source=path, default_name=stem)


def parse_grid(
    data: Mapping[str, Any], *, source: str = "<grid>", default_name: str = "grid"
) -> Grid:
    """Check a grid given as a mapping (the parsed TOML) and expand its cells.

    Parameters
    ----------
    data : mapping
        The top-level table (see the module's documentation).
    source : str, default="<grid>"
        Where it came from, for messages.
    default_name : str, default="grid"
        The grid's name if ``data`` has none.

    Returns
    -------
    grid : Grid

    Raises
    ------
    GridError
        Naming ``source`` and the key at fault.
    """
    where = _Where(source)
    if not isinstance(data, Mapping):
        raise where.error("", f"expected a table, got {type(data).__name__}")
    where.unknown(data, _TOP_KEYS, "")
    name = data.get("name", default_name)
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise where.error(
            "name",
            "expected a name of letters, digits, '.', '_' and '-' that starts with a letter "
            f"or digit (it names the report's files), got {name!r}",
        )
    seeds = _seeds(data.get("seeds", 1), where, "seeds")
    test_fraction = data.get("test_fraction", 0.2)
    if not _number(test_fraction) or not 0 < test_fraction < 1:
        raise where.error("test_fraction", f"expected a number in (0, 1), got {test_fraction!r}")
    common = _table(data.get("params", {}), where, "params")
    blocks = data.get("grid")
    if blocks is None:
        raise where.error("grid", "missing: add at least one [[grid]] table")
    if (
        not isinstance(blocks, list)
        or not blocks
        or not all(isinstance(b, Mapping) for b in blocks)
    ):
        raise where.error("grid", "expected one or more [[grid]] tables")
    cells: dict[str, Cell] = {}
    for i, block in enumerate(blocks):
        for cell in _expand(block, f"grid[{i}]", where, seeds, float(test_fraction), common):
            cells.setdefault(cell.key, cell)
    return Grid(name=name, cells=tuple(cells.values()), source=source)


class _Where:
    """Messages that name the file and the key."""

    def __init__(self, source: str) -> None:
        self.source = source

    def error(self, key: str, message: str) -> GridError:
        return GridError(f"{self.source}: {key}: {message}" if key else f"{self.source}: {message}")

    def unknown(self, table: Mapping[str, Any], allowed: Sequence[str], prefix: str) -> None:
        for key in table:
            if key not in allowed:
                raise self.error(
                    f"{prefix}{key}", f"unknown key (expected one of {', '.join(allowed)})"
                )


def _number(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _integer(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _values(
    block: Mapping[str, Any], key: str, default: object, where: _Where, prefix: str
) -> list[Any]:
    value = block.get(key, default)
    values = list(value) if isinstance(value, list) else [value]
    if not values:
        raise where.error(f"{prefix}.{key}", "expected a value or a non-empty list, got []")
    for v in values:
        if v is not None and not isinstance(v, str | int | float):
            raise where.error(
                f"{prefix}.{key}", f"expected a string or a number, or a list of them, got {v!r}"
            )
    return values


def _seeds(value: object, where: _Where, key: str) -> list[int]:
    if _integer(value):
        if not 1 <= value <= 10_000:  # type: ignore[operator]
            raise where.error(key, f"expected a number of seeds in [1, 10000], got {value!r}")
        return list(range(int(value)))  # type: ignore[call-overload]
    if (
        isinstance(value, list)
        and value
        and all(_integer(v) and 0 <= v <= _MAX_SEED for v in value)
    ):
        if len(set(value)) != len(value):
            raise where.error(key, f"expected distinct seeds, got {value!r}")
        return [int(v) for v in value]
    raise where.error(
        key, f"expected a number of seeds or a list of ints in [0, 2**32 - 1], got {value!r}"
    )


def _table(value: object, where: _Where, key: str) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise where.error(key, f"expected a table, got {value!r}")
    for name in value:
        if name in _OWN_PARAMS:
            axis = {
                "score_estimator": "estimator",
                "random_state": "seeds",
                "architecture": "model",
            }
            raise where.error(
                f"{key}.{name}", f"is set by the grid's axes: use {axis.get(name, name)!r}"
            )
        if name in _RUN_PARAMS:
            raise where.error(f"{key}.{name}", "is the sweep's to set (one thread, no checkpoint)")
    return dict(value)


def _expand(
    block: Mapping[str, Any],
    prefix: str,
    where: _Where,
    seeds: list[int],
    test_fraction: float,
    common: dict[str, Any],
) -> list[Cell]:
    where.unknown(block, _BLOCK_KEYS, f"{prefix}.")
    models = _values(block, "model", "mlp", where, prefix)
    for m in models:
        if m not in MODELS:
            raise where.error(f"{prefix}.model", f"expected one of {', '.join(MODELS)}, got {m!r}")
    datasets = _values(block, "dataset", "digits", where, prefix)
    for d in datasets:
        if d not in SWEEP_DATASETS:
            raise where.error(
                f"{prefix}.dataset", f"expected one of {', '.join(SWEEP_DATASETS)}, got {d!r}"
            )
    densities = _values(block, "density", None, where, prefix)
    if densities == [None]:
        raise where.error(f"{prefix}.density", "missing: a number in (0, 1] or a list of them")
    for v in densities:
        if not _number(v) or not 0 < v <= 1:
            raise where.error(f"{prefix}.density", f"expected a number in (0, 1], got {v!r}")
    estimators = _values(block, "estimator", "vrpge", where, prefix)
    for e in estimators:
        if e not in ESTIMATORS:
            raise where.error(
                f"{prefix}.estimator", f"expected one of {', '.join(ESTIMATORS)}, got {e!r}"
            )
    ks = _values(block, "n_masks", 2, where, prefix)
    for k in ks:
        if not _integer(k) or k < 2:
            raise where.error(f"{prefix}.n_masks", f"expected an int >= 2, got {k!r}")
    block_seeds = _seeds(block["seeds"], where, f"{prefix}.seeds") if "seeds" in block else seeds
    params = {**common, **_table(block.get("params", {}), where, f"{prefix}.params")}
    granularity_values = block.get("granularity")

    cells = []
    for model in models:
        allowed = GRANULARITIES[model]
        granularities = (
            _values(block, "granularity", None, where, prefix)
            if granularity_values is not None
            else [allowed[0]]
        )
        for g in granularities:
            if g not in allowed:
                raise where.error(
                    f"{prefix}.granularity",
                    f"expected one of {', '.join(allowed)} for model {model!r}, got {g!r}",
                )
        resolved = _resolve_params(model, params, where, f"{prefix}.params")
        for dataset, g, density, estimator, k, seed in itertools.product(
            datasets, granularities, densities, estimators, ks, block_seeds
        ):
            cells.append(
                _cell(
                    model,
                    dataset,
                    g,
                    float(density),
                    estimator,
                    int(k),
                    seed,
                    test_fraction,
                    resolved,
                )
            )
    for cell in cells:  # the classifiers' own checks, before any fit starts
        _check_cell(cell, where, prefix)
    return cells


def _resolve_params(model: str, params: dict[str, Any], where: _Where, key: str) -> dict[str, Any]:
    """The classifier's parameters with the grid's values (defaults filled in), checked."""
    classifier = _classifier_class(model)
    defaults = classifier().get_params(deep=False)
    out = {name: value for name, value in defaults.items() if name not in _RUN_PARAMS}
    for name, value in params.items():
        if name not in defaults:
            raise where.error(f"{key}.{name}", f"is not a parameter of {classifier.__name__}")
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError):
            raise where.error(
                f"{key}.{name}",
                f"expected a finite number, a string, a boolean or a list, got {value!r}",
            ) from None
        if isinstance(value, bool) and not isinstance(defaults[name], bool):
            raise where.error(
                f"{key}.{name}", f"expected a value like {defaults[name]!r}, got {value!r}"
            )
        out[name] = value
    if model != "mlp":
        out["architecture"] = model
    try:  # the classifier's own checks, before any derived value is computed from them
        _make(model, out)._validate_params()
    except (ValueError, TypeError) as exc:
        raise where.error(key, str(exc)) from None
    return _json(out)


def _json(value: Any) -> Any:
    """``value`` with tuples as lists and numpy scalars and dtypes as Python values."""
    return json.loads(json.dumps(value, default=_default))


def _default(value: Any) -> Any:
    import numpy as np

    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, type) and issubclass(value, np.generic):
        return np.dtype(value).name
    raise TypeError(f"expected a JSON value, got {value!r}")


def _cell(
    model: str,
    dataset: str,
    granularity: str,
    density: float,
    estimator: str,
    n_masks: int,
    seed: int,
    test_fraction: float,
    params: dict[str, Any],
) -> Cell:
    p = dict(params)
    if estimator == "dense":
        density = 1.0
    p.update(density=density, granularity=granularity, n_masks=n_masks, random_state=seed)
    if estimator in _BASELINES:
        # No sparse epochs: every epoch is a fine-tuning epoch on the fixed mask (the
        # cosine schedule over all of them, or finetune_lr if set), as many epochs as
        # the learned masks get in both phases.
        p.update(
            score_estimator="vrpge",
            n_masks=2,
            fixed_mask="random",
            max_iter=0,
            finetune_iter=int(p["max_iter"]) + int(p["finetune_iter"]),
        )
        n_masks = 2
    else:
        p["score_estimator"] = estimator
    return Cell(
        model=model,
        dataset=dataset,
        granularity=granularity,
        density=density,
        estimator=estimator,
        n_masks=n_masks,
        seed=seed,
        test_fraction=test_fraction,
        params=p,
    )


def _classifier_class(model: str) -> type:
    from .. import sklearn as _sk

    classifier: type = getattr(_sk, MODELS[model])
    return classifier


def classifier_for(cell: Cell, **run: Any) -> Any:
    """A new, unfitted classifier of ``cell``'s parameters (``run``: n_jobs, verbose)."""
    return _make(cell.model, {**cell.params, **run})


def _make(model: str, params: Mapping[str, Any]) -> Any:
    params = dict(params)
    for name in (
        "hidden_layer_sizes",
        "widths",
        "convs_per_stage",
        "blocks_per_stage",
        "input_shape",
    ):
        if isinstance(params.get(name), list):
            params[name] = tuple(params[name])
    return _classifier_class(model)(**params)


def _check_cell(cell: Cell, where: _Where, prefix: str) -> None:
    clf = classifier_for(cell)
    try:
        clf._validate_params()
        if clf.max_iter + clf.finetune_iter < 1:
            raise ValueError("max_iter + finetune_iter must be >= 1")
        clf._check_model()
    except (ValueError, TypeError) as exc:
        raise where.error(f"{prefix}.params", str(exc)) from None
