"""Checkpoints: the whole training state in one ``.npz`` file, written atomically.

A checkpoint holds everything :func:`~cpusparse.training.loop.run_epoch` reads or
changes, so that training resumed from it is bit-identical to training that never
stopped:

- the network, as each layer serialises itself
  (:meth:`~cpusparse.engine.layers.base.Layer.config` and
  :meth:`~cpusparse.engine.layers.base.Layer.arrays`): any registered layer kind,
  including one defined outside the package;
- the flat score vector, its layer offsets, the budget and the initial number of
  units;
- the weight and score optimizer states (lists of dicts of arrays, 0-d arrays
  included) and the step counter;
- the exact states of the data-order and mask random streams;
- the epoch, the phase (``"sparse"`` or ``"finetune"``), the fixed masks of the
  fine-tuning phase, the history and the :class:`~cpusparse.training.config.TrainConfig`;
- the format version and the cpusparse version.

Format
------
One file written by :func:`numpy.savez`. Arrays are stored under flat names
(``layer0.weight``, ``weight_state3.exp_avg``, ``mask1`` ...); everything else is a
JSON document stored as a 0-d unicode array under ``meta``. Nothing is pickled:
files are read with ``allow_pickle=False``. Python floats survive JSON exactly
(``repr`` round-trips), NaN included.

Examples
--------
>>> import os, tempfile
>>> from cpusparse.models import mlp
>>> from cpusparse.training import TrainConfig, init_state, spawn_streams
>>> init, data, masks = spawn_streams(0)
>>> config = TrainConfig(density=0.5)
>>> state = init_state(mlp(4, (3,), 2, rng=init), config, data_rng=data, mask_rng=masks)
>>> path = os.path.join(tempfile.mkdtemp(), "run.npz")
>>> save_checkpoint(path, state, config, epoch=0, phase="sparse", history=[])
>>> restored, config2 = restore_state(load_checkpoint(path))
>>> config2 == config, bool(np.array_equal(restored.score, state.score))
(True, True)
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypedDict

import numpy as np

if TYPE_CHECKING:
    import numpy.typing as npt

from .._io import NpzError, atomic_write, read_npz
from ..engine.containers import Sequential
from .config import TrainConfig
from .state import TrainState

__all__ = [
    "FORMAT_VERSION",
    "READABLE_VERSIONS",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "restore_state",
]

FORMAT_VERSION = 3
"""Version of the checkpoint layout."""

READABLE_VERSIONS = (2, 3)
"""Versions :func:`load_checkpoint` reads. Version 3 records ``mask_draw`` in the
configuration; a version 2 checkpoint was written when the masks were drawn with one
bulk ``rng.random`` call, so it resumes with ``mask_draw="numpy"`` (bit for bit)."""

PHASES = ("sparse", "finetune")


class CheckpointError(ValueError):
    """A checkpoint file is corrupt, incomplete or of another format version."""


class Checkpoint(TypedDict):
    """What :func:`load_checkpoint` returns (see there); JSON values are arbitrary."""

    format_version: int
    cpusparse_version: str
    epoch: int
    phase: str
    step: int
    budget: float
    n_units_initial: int
    layers: list[dict[str, Any]]
    score: np.ndarray
    offsets: np.ndarray
    weight_state: list[dict[str, np.ndarray]]
    score_state: list[dict[str, np.ndarray]]
    masks: list[np.ndarray] | None
    data_rng: dict[str, Any]
    mask_rng: dict[str, Any]
    config: dict[str, Any]
    history: list[dict[str, Any]]
    extra: dict[str, Any]


def _optimizer_record(
    prefix: str, opt_state: Sequence[dict[str, np.ndarray]], arrays: dict[str, np.ndarray]
) -> list[list[str]]:
    keys = []
    for j, entry in enumerate(opt_state):
        keys.append(list(entry))  # insertion order, as the optimizer created it
        for key, value in entry.items():
            arrays[f"{prefix}{j}.{key}"] = np.asarray(value)
    return keys


def save_checkpoint(
    path: str | os.PathLike[str],
    state: TrainState,
    config: TrainConfig,
    *,
    epoch: int,
    phase: str,
    history: Iterable[dict[str, Any]],
    masks: Sequence[npt.ArrayLike] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> None:
    """Write the training state to ``path`` atomically.

    Parameters
    ----------
    path : str or os.PathLike
        Destination file (conventionally ending in ``.npz``; no suffix is added).
    state : TrainState
    config : TrainConfig
    epoch : int
        Number of epochs completed in ``phase``.
    phase : {"sparse", "finetune"}
    history : list of dict
        Per-epoch records; must be JSON-serialisable (floats, ints, strings, None).
    masks : list of ndarray of bool, optional
        The fixed masks of the fine-tuning phase (required when
        ``phase="finetune"``).
    extra : dict, optional
        Any other JSON-serialisable information (e.g. the estimator's parameters).

    Notes
    -----
    The file is first written to a temporary file in the same directory, flushed
    and ``fsync``-ed, then moved over ``path`` with :func:`os.replace`; see
    :func:`atomic_write`.
    """
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    if phase == "finetune" and masks is None:
        raise ValueError("masks are required for phase='finetune'")
    arrays = {f"layer{key}": value for key, value in state.network.arrays().items()}
    layers = state.network.config()["layers"]
    arrays["score"] = state.score
    arrays["offsets"] = state.offsets
    weight_keys = _optimizer_record("weight_state", state.weight_state, arrays)
    score_keys = _optimizer_record("score_state", state.score_state, arrays)
    if masks is not None:
        for j, m in enumerate(masks):
            arrays[f"mask{j}"] = np.asarray(m, dtype=bool)
    meta = {
        "format_version": FORMAT_VERSION,
        "cpusparse_version": _version(),
        "epoch": int(epoch),
        "phase": phase,
        "step": int(state.step),
        "budget": float(state.budget),
        "n_units_initial": int(state.n_units_initial),
        "layers": layers,
        "weight_state_keys": weight_keys,
        "score_state_keys": score_keys,
        "n_masks": None if masks is None else len(masks),
        "data_rng": state.data_rng.bit_generator.state,
        "mask_rng": state.mask_rng.bit_generator.state,
        "config": dataclasses.asdict(config),
        "history": list(history),
        "extra": {} if extra is None else dict(extra),
    }
    arrays["meta"] = np.array(json.dumps(meta, allow_nan=True))
    # allow_pickle=True is numpy's default, spelled out so that no array name can be
    # taken for it (nothing stored is an object array; files are read without pickles).
    atomic_write(path, lambda f: np.savez(f, allow_pickle=True, **arrays))


def _version() -> str:
    from .._version import __version__

    return __version__


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Read a checkpoint written by :func:`save_checkpoint`, checking every field.

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    ckpt : dict
        Keys ``format_version``, ``cpusparse_version``, ``epoch``, ``phase``,
        ``step``, ``budget``, ``n_units_initial``, ``layers`` (list of dicts: the
        layer's ``type`` and :meth:`~cpusparse.engine.layers.base.Layer.config`,
        and its ``arrays``), ``score``, ``offsets``,
        ``weight_state`` and ``score_state`` (lists of dicts of arrays),
        ``masks`` (list of ndarray of bool, or None), ``data_rng`` and
        ``mask_rng`` (bit-generator states), ``config`` (dict of
        :class:`~cpusparse.training.config.TrainConfig` fields), ``history`` and ``extra``.

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    CheckpointError
        (a ``ValueError``) if the file is not an ``.npz`` archive, is corrupt or
        incomplete, has another format version, or holds a field of the wrong type
        or out of range (each field is checked on its own and against the arrays:
        the phase, the epoch and step counts, the budget, the unit counts, the
        offsets, the scores, the optimizer states, the masks, the random-stream
        states); the message names the field, what was expected and what was found.
        :func:`restore_state` checks the fields against the configuration and the
        rebuilt network.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint file not found: {path!r}")
    where = f"checkpoint {path!r}"
    try:
        arrays = read_npz(path, "checkpoint")
    except NpzError as exc:
        raise CheckpointError(str(exc)) from exc
    except OSError as exc:
        raise CheckpointError(f"{where} cannot be read: {exc}") from exc
    try:
        meta = json.loads(str(arrays.pop("meta")))
        if not isinstance(meta, dict):
            raise TypeError("not a dict")
        version = meta["format_version"]
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{where} is not a cpusparse checkpoint: no valid metadata") from exc
    if version not in READABLE_VERSIONS or isinstance(version, bool):
        raise CheckpointError(
            f"{where} has checkpoint format version {version!r}; this cpusparse "
            f"({_version()}) reads versions {', '.join(map(str, READABLE_VERSIONS))}"
        )
    if version == 2 and isinstance(meta.get("config"), dict):
        meta["config"].setdefault("mask_draw", "numpy")  # the only draw of version 2
    try:
        _check_meta(meta, arrays)
        return _unpack(meta, arrays)
    except KeyError as exc:
        raise CheckpointError(f"{where} is an incomplete checkpoint: missing {exc}") from exc
    except CheckpointError as exc:
        raise CheckpointError(f"{where}: {exc}") from exc


# ---------------------------------------------------------------------------
# Checks of the fields
# ---------------------------------------------------------------------------

# The bit generators a checkpoint may name (numpy.random.default_rng makes PCG64).
_BIT_GENERATORS = ("PCG64", "PCG64DXSM", "MT19937", "Philox", "SFC64")


def _check_int(value: object, field: str, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"{field} must be an int >= {low}, got {value!r}")
    if value < low:
        raise CheckpointError(f"{field} must be an int >= {low}, got {value}")
    return value


def _check_type(value: object, field: str, kind: type, name: str) -> None:
    if not isinstance(value, kind):
        raise CheckpointError(f"{field} must be {name}, got {type(value).__name__}")


def _check_array(value: np.ndarray, field: str, kinds: str, ndim: int, name: str) -> None:
    if value.dtype.kind not in kinds or value.ndim != ndim:
        raise CheckpointError(
            f"{field} must be a {ndim}-d array of {name}, got a {value.ndim}-d array of "
            f"dtype {value.dtype}"
        )


def _check_meta(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Check each field of a checkpoint file on its own and against the arrays."""
    _check_type(meta["cpusparse_version"], "cpusparse_version", str, "a str")
    if meta["phase"] not in PHASES:
        raise CheckpointError(f"phase must be one of {PHASES}, got {meta['phase']!r}")
    _check_int(meta["epoch"], "epoch", 0)
    _check_int(meta["step"], "step", 0)
    n_initial = _check_int(meta["n_units_initial"], "n_units_initial", 1)
    _check_type(meta["layers"], "layers", list, "a list")
    for i, record in enumerate(meta["layers"]):
        _check_type(record, f"layers[{i}]", dict, "a dict")
    score = arrays["score"]
    _check_array(score, "score", "f", 1, "floats")
    if score.shape[0] > n_initial:
        raise CheckpointError(
            f"score has {score.shape[0]} units, more than n_units_initial = {n_initial}"
        )
    if not np.all(np.isfinite(score)):
        raise CheckpointError("score must be finite, got NaN or infinite values")
    if score.size and not (score.min() >= 0 and score.max() <= 1):
        raise CheckpointError(
            f"score must be in [0, 1], got values in [{score.min()}, {score.max()}]"
        )
    offsets = arrays["offsets"]
    _check_array(offsets, "offsets", "iu", 1, "ints")
    if (
        offsets.shape[0] < 2
        or offsets[0] != 0
        or offsets[-1] != score.shape[0]
        or np.any(np.diff(offsets.astype(np.int64)) < 0)
    ):
        raise CheckpointError(
            f"offsets must rise from 0 to the length of score ({score.shape[0]}), got "
            f"{offsets.tolist()}"
        )
    budget = meta["budget"]
    if isinstance(budget, bool) or not isinstance(budget, int | float):
        raise CheckpointError(f"budget must be a number, got {budget!r}")
    if not (math.isfinite(budget) and 0 < budget <= n_initial):
        raise CheckpointError(
            f"budget must be a finite number in (0, n_units_initial = {n_initial}], got {budget!r}"
        )
    for field in ("weight_state_keys", "score_state_keys"):
        keys = meta[field]
        ok = isinstance(keys, list) and all(
            isinstance(ks, list) and all(isinstance(k, str) for k in ks) for ks in keys
        )
        if not ok:
            raise CheckpointError(f"{field} must be a list of lists of str, got {keys!r}")
    if len(meta["score_state_keys"]) != 1:
        raise CheckpointError(
            "score_state must hold one dict (the score vector is one parameter), "
            f"got {len(meta['score_state_keys'])}"
        )
    n_masks = meta["n_masks"]
    if n_masks is not None:
        _check_int(n_masks, "n_masks", 0)
        for j in range(n_masks):
            _check_array(arrays[f"mask{j}"], f"mask{j}", "b", 1, "bools")
    elif meta["phase"] == "finetune":
        raise CheckpointError("masks are required in phase 'finetune', got none")
    for field in ("data_rng", "mask_rng"):
        _generator(meta[field], field)
    _check_type(meta["config"], "config", dict, "a dict")
    _check_type(meta["history"], "history", list, "a list")
    for i, record in enumerate(meta["history"]):
        _check_type(record, f"history[{i}]", dict, "a dict")
    _check_type(meta["extra"], "extra", dict, "a dict")


def _unpack(meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> Checkpoint:
    layers = []
    for i, record in enumerate(meta["layers"]):
        prefix = f"layer{i}."
        own = {k[len(prefix) :]: v for k, v in arrays.items() if k.startswith(prefix)}
        layers.append({**record, "arrays": own})

    def optimizer(prefix: str, keys: list[list[str]]) -> list[dict[str, np.ndarray]]:
        return [{key: arrays[f"{prefix}{j}.{key}"] for key in ks} for j, ks in enumerate(keys)]

    n_masks = meta["n_masks"]
    return {
        "format_version": meta["format_version"],
        "cpusparse_version": meta["cpusparse_version"],
        "epoch": meta["epoch"],
        "phase": meta["phase"],
        "step": meta["step"],
        "budget": meta["budget"],
        "n_units_initial": meta["n_units_initial"],
        "layers": layers,
        "score": arrays["score"],
        "offsets": arrays["offsets"],
        "weight_state": optimizer("weight_state", meta["weight_state_keys"]),
        "score_state": optimizer("score_state", meta["score_state_keys"]),
        "masks": None if n_masks is None else [arrays[f"mask{j}"] for j in range(n_masks)],
        "data_rng": meta["data_rng"],
        "mask_rng": meta["mask_rng"],
        "config": meta["config"],
        "history": meta["history"],
        "extra": meta["extra"],
    }


def _generator(bit_state: object, field: str) -> np.random.Generator:
    """A Generator at the saved state; :class:`CheckpointError` for a malformed state."""
    if not isinstance(bit_state, dict) or not isinstance(bit_state.get("state"), dict):
        raise CheckpointError(
            f"{field} must be a bit-generator state (a dict with 'bit_generator' and "
            f"'state'), got {str(bit_state)[:80]}"
        )
    name = bit_state.get("bit_generator")
    if name not in _BIT_GENERATORS:
        raise CheckpointError(
            f"{field} must name one of the bit generators {_BIT_GENERATORS}, got {name!r}"
        )
    bit_generator = getattr(np.random, name)()
    try:
        bit_generator.state = bit_state
    except (TypeError, ValueError, KeyError, OverflowError) as exc:
        raise CheckpointError(f"{field} is not a valid {name} state: {exc!r}") from exc
    return np.random.Generator(bit_generator)


def _check_optimizer_state(
    field: str,
    saved: Sequence[dict[str, np.ndarray]],
    expected: Sequence[dict[str, np.ndarray]],
    names: Sequence[str],
) -> None:
    """Check ``saved`` against the fresh state of the same optimizer (keys, shapes, dtypes)."""
    if len(saved) != len(expected):
        raise CheckpointError(
            f"{field} must hold one dict per parameter ({len(expected)}), got {len(saved)}"
        )
    for j, (got, want, name) in enumerate(zip(saved, expected, names, strict=True)):
        if set(got) != set(want):
            raise CheckpointError(
                f"{field}[{j}] ({name}) must have keys {sorted(want)}, got {sorted(got)}"
            )
        for key, ref in want.items():
            arr = got[key]
            if arr.shape != ref.shape or arr.dtype != ref.dtype:
                raise CheckpointError(
                    f"{field}[{j}][{key!r}] ({name}) must have shape {ref.shape} and dtype "
                    f"{ref.dtype}, got shape {arr.shape} and dtype {arr.dtype}"
                )
            if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
                raise CheckpointError(f"{field}[{j}][{key!r}] ({name}) has non-finite values")
            if arr.dtype.kind in "iu" and np.any(arr < 0):
                raise CheckpointError(f"{field}[{j}][{key!r}] ({name}) must be >= 0, got {arr}")


def restore_state(ckpt: Checkpoint) -> tuple[TrainState, TrainConfig]:
    """Rebuild the training state and configuration from :func:`load_checkpoint`'s dict.

    Parameters
    ----------
    ckpt : dict

    Returns
    -------
    state : TrainState
        With fresh arrays (the dict's arrays are used, not copied) and random
        streams at exactly the saved positions.
    config : TrainConfig

    Raises
    ------
    CheckpointError
        If the fields do not agree with the configuration and the rebuilt network:
        the budget must be ``config.density * n_units_initial`` (to a relative
        1e-9), the offsets must follow the network's units per prunable layer, the
        scores must have the network's dtype, the optimizer states must hold one
        dict per parameter with the arrays the configured optimizer makes (keys,
        shapes and dtypes), the masks one boolean vector per prunable layer, and
        the parameters must be finite.
    """
    try:
        config = TrainConfig(**ckpt["config"])
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"config is not a valid TrainConfig: {exc}") from exc
    layer_config = {
        "layers": [{k: v for k, v in rec.items() if k != "arrays"} for rec in ckpt["layers"]]
    }
    layer_arrays = {
        f"{i}.{name}": arr
        for i, rec in enumerate(ckpt["layers"])
        for name, arr in rec["arrays"].items()
    }
    try:
        network = Sequential.from_config(layer_config, layer_arrays)
    except (KeyError, TypeError, ValueError, IndexError) as exc:
        raise CheckpointError(f"layers do not make a valid network: {exc}") from exc

    n_units = network.n_units()
    score, offsets = ckpt["score"], ckpt["offsets"]
    counts = np.diff(offsets).tolist()
    if counts != n_units:
        raise CheckpointError(
            f"offsets must give the units of each prunable layer of the network {n_units}, "
            f"got {counts} (offsets {offsets.tolist()})"
        )
    if score.dtype != network.dtype:
        raise CheckpointError(
            f"score must have the network's dtype {network.dtype}, got {score.dtype}"
        )
    n_initial = ckpt["n_units_initial"]
    expected_budget = config.density * n_initial
    if not math.isclose(ckpt["budget"], expected_budget, rel_tol=1e-9, abs_tol=0.0):
        raise CheckpointError(
            f"budget must be density * n_units_initial = {config.density!r} * {n_initial} = "
            f"{expected_budget!r}, got {ckpt['budget']!r}"
        )
    params = network.params()
    for name, arr in params.items():
        if not np.all(np.isfinite(arr)):
            raise CheckpointError(f"parameter {name} of the network has non-finite values")
    weight_opt, score_opt, _ = config.optimizers()
    _check_optimizer_state(
        "weight_state",
        ckpt["weight_state"],
        weight_opt.init_state(list(params.values())),
        list(params),
    )
    _check_optimizer_state(
        "score_state", ckpt["score_state"], score_opt.init_state([score]), ["score"]
    )
    masks = ckpt["masks"]
    if masks is not None:
        shapes = [m.shape for m in masks]
        if shapes != [(n,) for n in n_units]:
            raise CheckpointError(
                f"masks must be one vector per prunable layer of shapes "
                f"{[(n,) for n in n_units]}, got {shapes}"
            )
    state = TrainState(
        network=network,
        score=score,
        offsets=offsets.astype(np.int64, copy=False),
        budget=float(ckpt["budget"]),
        n_units_initial=n_initial,
        weight_state=ckpt["weight_state"],
        score_state=ckpt["score_state"],
        step=ckpt["step"],
        data_rng=_generator(ckpt["data_rng"], "data_rng"),
        mask_rng=_generator(ckpt["mask_rng"], "mask_rng"),
    )
    return state, config
