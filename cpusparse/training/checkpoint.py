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
import os
import zipfile
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypedDict

import numpy as np
import numpy.typing as npt

from .._io import atomic_write
from ..engine.containers import Sequential
from .config import TrainConfig
from .state import TrainState

__all__ = [
    "FORMAT_VERSION",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "restore_state",
]

FORMAT_VERSION = 2
"""Version of the checkpoint layout; :func:`load_checkpoint` refuses any other."""

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
    """Read a checkpoint written by :func:`save_checkpoint`.

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
        (a ``ValueError``) if the file is not a readable checkpoint or has another
        format version.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path!r}")
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {name: np.array(npz[name]) for name in npz.files}  # writable copies
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise CheckpointError(
            f"{path!r} is not a readable cpusparse checkpoint (corrupt or truncated?): {exc}"
        ) from exc
    try:
        meta = json.loads(str(arrays.pop("meta")))
        version = meta["format_version"]
    except (KeyError, ValueError, TypeError) as exc:
        raise CheckpointError(f"{path!r} is not a cpusparse checkpoint: no valid metadata") from exc
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{path!r} has checkpoint format version {version!r}; this cpusparse "
            f"({_version()}) reads version {FORMAT_VERSION} only"
        )
    try:
        return _unpack(meta, arrays)
    except KeyError as exc:
        raise CheckpointError(f"{path!r} is an incomplete checkpoint: missing {exc}") from exc


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


def _generator(bit_state: dict[str, Any]) -> np.random.Generator:
    bit_generator = getattr(np.random, bit_state["bit_generator"])()
    bit_generator.state = bit_state
    return np.random.Generator(bit_generator)


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
    """
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
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"checkpoint holds a network that cannot be rebuilt: {exc}") from exc
    config = TrainConfig(**ckpt["config"])
    state = TrainState(
        network=network,
        score=ckpt["score"],
        offsets=ckpt["offsets"],
        budget=ckpt["budget"],
        n_units_initial=ckpt["n_units_initial"],
        weight_state=ckpt["weight_state"],
        score_state=ckpt["score_state"],
        step=ckpt["step"],
        data_rng=_generator(ckpt["data_rng"]),
        mask_rng=_generator(ckpt["mask_rng"]),
    )
    return state, config
