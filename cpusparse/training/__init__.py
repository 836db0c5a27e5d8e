"""Training: the option table, the state, the step, compaction, the loop, optimizers, checkpoints.

- :mod:`~cpusparse.training.config`: :class:`TrainConfig`, the single option table;
- :mod:`~cpusparse.training.state`: :class:`TrainState` and its random streams;
- :mod:`~cpusparse.training.step`: :func:`train_step` (Algorithm 1 of the paper)
  and :func:`finetune_step`;
- :mod:`~cpusparse.training.compaction`: dropping units that can never come back;
- :mod:`~cpusparse.training.loop`: epochs, evaluation and fixed masks;
- :mod:`~cpusparse.training.optim`: optimizers with explicit state and schedules;
- :mod:`~cpusparse.training.checkpoint`: atomic, bit-exact checkpoints.
"""

from .compaction import compact, dead_units, droppable_fraction, maybe_compact
from .config import TrainConfig, options
from .loop import EpochStats, evaluate, fixed_mask, iterate_batches, run_epoch
from .optim import SGD, Adam, clip_grad_norm, compact_state, constant_schedule, cosine_schedule
from .state import (
    NonFiniteError,
    TrainState,
    check_parameters_finite,
    expected_density,
    init_state,
    spawn_streams,
    split_masks,
)
from .step import StepRecord, StepResult, finetune_step, train_step

__all__ = [
    "TrainConfig",
    "options",
    "TrainState",
    "NonFiniteError",
    "spawn_streams",
    "init_state",
    "split_masks",
    "expected_density",
    "check_parameters_finite",
    "StepRecord",
    "StepResult",
    "train_step",
    "finetune_step",
    "dead_units",
    "droppable_fraction",
    "compact",
    "maybe_compact",
    "fixed_mask",
    "evaluate",
    "EpochStats",
    "iterate_batches",
    "run_epoch",
    "SGD",
    "Adam",
    "clip_grad_norm",
    "compact_state",
    "constant_schedule",
    "cosine_schedule",
    "CheckpointError",
    "save_checkpoint",
    "load_checkpoint",
    "restore_state",
]


_CHECKPOINT_NAMES = ("CheckpointError", "save_checkpoint", "load_checkpoint", "restore_state")


def __getattr__(name: str) -> object:
    # The checkpoint module (file validation, atomic writes) loads on first use, so that
    # ``import cpusparse`` stays fast.
    if name in _CHECKPOINT_NAMES:
        from . import checkpoint

        return getattr(checkpoint, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
