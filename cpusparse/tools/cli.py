"""The ``cpusparse`` command line.

``cpusparse train`` trains a sparse MLP (:class:`~cpusparse.sklearn.SparseMLPClassifier`)
or CNN (``--model vgg|resnet``, :class:`~cpusparse.sklearn.SparseCNNClassifier`) on one
of the offline data sets of :mod:`cpusparse.tools.datasets` and prints the test accuracy
and a per-layer density report (channels kept per convolution). ``cpusparse bench``,
``cpusparse trace``, ``cpusparse verify`` and ``cpusparse sweep`` are handed, with their
remaining arguments, to the modules that implement them (each parses its own options).

Errors
------
Every command runs under :func:`run_command`: an error is one line on stderr,
``cpusparse <command>: error: <message>``, naming the argument or file, never a
traceback. Exit status 2 is a usage error (a bad value, an output path that cannot be
written, settings that do not match the checkpoint to resume), 1 a failure (an
unreadable data or checkpoint file, a missing optional package, a non-finite loss),
130 Ctrl-C (``cpusparse train`` then says where its last checkpoint is and how to
resume). Output paths are checked before any work starts, and ``cpusparse train``
refuses to replace an existing ``--checkpoint`` without ``--resume`` (continue it) or
``--overwrite`` (start again).

Examples
--------
A usage error prints a message on stderr and returns 2:

>>> main(["train", "--density", "1.5"])
2
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ..sklearn import LayerDensity

__all__ = ["main", "build_parser", "run_command", "parse_args", "UsageError", "CommandError"]

# Subcommands implemented elsewhere: name -> (module, function taking argv).
EXTERNAL = {
    "bench": ("cpusparse.tools.bench", "main", "benchmarks of the sparse kernels and training"),
    "trace": ("cpusparse.tools.trace", "main_trace", "record a reference trace of training"),
    "verify": ("cpusparse.tools.trace", "main_verify", "check an implementation against a trace"),
    "sweep": ("cpusparse.sweep.command", "main", "run a grid of fits on Dask, and report it"),
}

_OFFICIAL_SPLIT = ("mnist", "mnist1d")

MODELS = ("mlp", "vgg", "resnet")
"""The networks of ``cpusparse train --model``."""


def model_of(argv: Sequence[str] | None) -> str:
    """The ``--model`` named in ``argv`` (``"mlp"`` without one or with a bad one).

    Read before the full parser is built, so that the model's classifier gives the
    defaults that ``--help`` shows; a bad name is reported by the full parser.
    """
    first = argparse.ArgumentParser(add_help=False)
    first.add_argument("--model", default="mlp")
    known, _ = first.parse_known_args(list(argv or []))
    return known.model if known.model in MODELS else "mlp"


def dataset_name_or_path(text: str) -> str:
    """An argparse ``type``: a data set name, or an existing MNIST-format path."""
    from .datasets import DATASETS

    if text in DATASETS or os.path.exists(text):
        return text
    raise argparse.ArgumentTypeError(
        f"must be one of {', '.join(DATASETS)} or an existing MNIST IDX directory or .npz "
        f"file, got {text!r} (no such data set or file)"
    )


dataset_name_or_path.__name__ = "dataset"


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The argument parser of ``cpusparse`` (``train`` fully; the others by name).

    ``argv`` is read for ``--preset`` only, whose training options become the defaults.
    """
    import inspect

    from ..engine.layers.conv import CONV_GRANULARITIES
    from ..engine.layers.linear import GRANULARITIES, INITS
    from ..sklearn import SparseCNNClassifier, SparseMLPClassifier
    from ..training.config import options
    from ._options import (
        HelpFormatter,
        add_options,
        add_preset,
        int_at_least,
        layer_sizes,
        preset_of,
        thread_count,
    )
    from .datasets import DATASETS

    model_name = model_of(argv)
    classifier = SparseMLPClassifier if model_name == "mlp" else SparseCNNClassifier
    defaults = {name: p.default for name, p in inspect.signature(classifier).parameters.items()}

    parser = argparse.ArgumentParser(
        prog="cpusparse",
        description="Completely sparse neural-network training on the CPU (VR-PGE).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = sub.add_parser(
        "train",
        help="train a sparse MLP or CNN and report its accuracy and per-layer density",
        description=(
            "Train a sparse MLP or CNN with VR-PGE, then fine-tune it on a fixed mask, and "
            "print the test accuracy and a per-layer density report. digits and mnist5k "
            "are split 80/20 (stratified, by --seed); mnist and mnist1d use their "
            "official train/test split. The defaults shown are those of --model (given "
            "before --help)."
        ),
        formatter_class=HelpFormatter,
    )
    data = train.add_argument_group("data")
    data.add_argument(
        "--dataset",
        type=dataset_name_or_path,
        default="digits",
        metavar="{" + ",".join(DATASETS) + "} or PATH",
        help="offline data set to train on, or the path of MNIST-format data (an IDX "
        "directory or .npz, split by its own train/test files)",
    )
    data.add_argument(
        "--data-path", metavar="PATH", help="MNIST IDX directory or .npz (--dataset mnist only)"
    )
    model = train.add_argument_group("model")
    model.add_argument(
        "--model",
        choices=MODELS,
        default="mlp",
        help="an MLP, or a VGG or ResNet (channel-major image CNNs)",
    )
    model.add_argument(
        "--hidden",
        type=layer_sizes,
        nargs="+",
        metavar="N[,N...]",
        help="hidden layer widths of the MLP, e.g. 300,100 or 300 100 (default: 300,100)",
    )
    model.add_argument(
        "--widths",
        type=layer_sizes,
        nargs="+",
        metavar="N[,N...]",
        help="channels of each CNN stage, e.g. 16,32,64 (default: 16,32,64)",
    )
    model.add_argument(
        "--input-shape",
        type=layer_sizes,
        metavar="C,H,W",
        help="one sample's shape for a CNN (default: square one-channel images, else 1-D signals)",
    )
    model.add_argument(
        "--granularity",
        choices=tuple(dict.fromkeys([*GRANULARITIES, *CONV_GRANULARITIES])),
        default=defaults["granularity"],
        help="what one mask bit keeps: weight or neuron (mlp), channel or weight (vgg, resnet)",
    )
    model.add_argument(
        "--prune-first",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="make the first convolution prunable (vgg, resnet; as the paper and the authors; "
        "default: yes)",
    )
    model.add_argument(
        "--init",
        choices=INITS,
        default=defaults.get("init"),
        help="weight initialisation (mlp)",
    )
    method = train.add_argument_group("training (the options of TrainConfig)")
    table_names = {name: param for param, name in classifier._train_options.items()}
    preset_name = preset_of(argv)
    preset = add_preset(method, preset_name)
    # The fit-level settings of a preset: the authors pick the best of 10 sampled masks
    # and fine-tune for 40 epochs (at finetune_lr, a training option).
    fit_preset = {"authors": {"fixed_mask": "best-of-n", "finetune_iter": 40}}.get(preset_name, {})
    defaults = {**defaults, **fit_preset}
    add_options(
        method,
        table_names,
        {name: preset.get(name, defaults[param]) for name, param in table_names.items()},
        dest=table_names,
    )
    # The CNN's own training options, with no default for an MLP (a usage error there).
    cnn_defaults = inspect.signature(SparseCNNClassifier).parameters
    for row in options():
        param = {n: p for p, n in SparseCNNClassifier._train_options.items()}.get(row.name)
        if param is None or row.name in table_names:
            continue
        method.add_argument(
            row.flag,
            default=None,
            dest=param,
            choices=getattr(row.constraint, "values", None),
            help=f"{row.help}; --model vgg or resnet only (default: {cnn_defaults[param].default})",
        )
    run = train.add_argument_group("run")
    run.add_argument(
        "--epochs",
        type=int_at_least(1),
        default=defaults["max_iter"],
        help="epochs of sparse training",
    )
    run.add_argument(
        "--fixed-mask",
        choices=("topk", "best-of-n", "random"),
        default=defaults["fixed_mask"],
        help="the final mask: the largest scores, the most accurate of 10 samples, or random units",
    )
    run.add_argument(
        "--finetune-epochs",
        type=int_at_least(0),
        default=defaults["finetune_iter"],
        help="epochs on the fixed mask (0 skips)",
    )
    run.add_argument(
        "--batch-size",
        type=int_at_least(1),
        default=defaults["batch_size"],
        help="mini-batch size",
    )
    run.add_argument("--seed", type=int_at_least(0), default=0, help="seed of every random stream")
    run.add_argument(
        "--threads",
        type=thread_count,
        default=1,
        help="Numba threads, or 'all' (results do not depend on it)",
    )
    out = train.add_argument_group("output")
    out.add_argument("--json", metavar="PATH", help="write metrics, history and config as JSON")
    out.add_argument(
        "--checkpoint",
        metavar="PATH",
        help="checkpoint written after every epoch (an existing one needs --resume or --overwrite)",
    )
    out.add_argument(
        "--resume", action="store_true", help="continue from --checkpoint if it exists"
    )
    out.add_argument(
        "--overwrite",
        action="store_true",
        help="start again even if --checkpoint exists (it is replaced after the first epoch)",
    )
    out.add_argument("--quiet", action="store_true", help="no progress bar and no report table")
    train.set_defaults(handler=_train, dataset_is_path=False)
    for name, (_, _, text) in EXTERNAL.items():
        sub.add_parser(name, help=f"{text} (its own options: cpusparse {name} --help)")
    return parser


class UsageError(Exception):
    """A bad command line (exit status 2); the message is one line naming the argument."""

    def __init__(self, message: str, *, prog: str | None = None) -> None:
        super().__init__(message)
        self.prog = prog


class CommandError(Exception):
    """A failure (exit status 1); the message is one line naming the argument or file."""


def _one_line(text: str) -> str:
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _error(prog: str, message: str) -> None:
    print(f"{prog}: error: {_one_line(message)}", file=sys.stderr)


def run_command(prog: str, body: Callable[[], int | None]) -> int:
    """Run a command's body and return its exit status; never show a traceback.

    The guard of every ``cpusparse`` command: :class:`UsageError` gives exit status
    2, :class:`CommandError` 1, Ctrl-C 130, and any other exception, as a last
    resort, one line ``<prog>: error: <message> (<type>)`` and exit status 1.
    Commands turn the errors they expect into precise messages first.

    Parameters
    ----------
    prog : str
        The command's name in messages, e.g. ``"cpusparse trace"``.
    body : callable
        Returns the exit status (None for 0).

    Returns
    -------
    status : int
    """
    try:
        status = body()
    except UsageError as exc:
        _error(exc.prog or prog, str(exc))
        return 2
    except CommandError as exc:
        _error(prog, str(exc))
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except SystemExit as exc:  # --help (0), or a usage error already reported
        if exc.code is None or isinstance(exc.code, int):
            return exc.code or 0
        _error(prog, str(exc.code))
        return 1
    except Exception as exc:  # the last resort: one line instead of a traceback
        _error(prog, f"{exc} ({type(exc).__name__})" if str(exc) else type(exc).__name__)
        return 1
    return 0 if status is None else int(status)


_ARGPARSE_ERROR = re.compile(r"^(?P<prog>.*?): error: (?P<message>.*)$")


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """``parser.parse_args(argv)``, with a usage error raised as a one-line :class:`UsageError`.

    argparse prints the usage (many lines) before its error; here only the error is
    kept, with a pointer to ``--help``. ``--help`` itself exits with status 0.
    """
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stderr(buffer):
            return parser.parse_args(argv)
    except SystemExit as exc:
        if not exc.code:
            raise
        lines = [line for line in buffer.getvalue().splitlines() if line.strip()]
        match = _ARGPARSE_ERROR.match(lines[-1]) if lines else None
        prog = match["prog"] if match else parser.prog
        message = match["message"] if match else _one_line(buffer.getvalue()) or "bad arguments"
        raise UsageError(f"{message} (see {prog} --help)", prog=prog) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``cpusparse`` command line.

    Parameters
    ----------
    argv : list of str, optional
        Arguments without the program name; ``sys.argv[1:]`` by default.

    Returns
    -------
    status : int
        0 on success; 1 on a failure (e.g. a missing optional package, an
        unreadable data or checkpoint file, a non-finite loss); 2 on a usage error
        (a bad option value, an output path that cannot be written, settings that
        do not match the checkpoint to resume); 130 on Ctrl-C. Every error is one
        line on stderr, ``cpusparse <command>: error: <message>``.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in EXTERNAL:
        return _dispatch(argv[0], argv[1:])
    prog = "cpusparse train" if argv[:1] == ["train"] else "cpusparse"

    def body() -> int:
        try:
            args = parse_args(build_parser(argv), argv)
        except UsageError as exc:  # "unrecognized arguments" comes from the top parser
            if prog != "cpusparse" and exc.prog == "cpusparse":
                exc.prog = prog
                exc.args = (str(exc).replace("(see cpusparse --help)", f"(see {prog} --help)"),)
            raise
        return int(args.handler(args))

    return run_command(prog, body)


def _dispatch(name: str, argv: list[str]) -> int:
    module_name, func_name, _ = EXTERNAL[name]

    def body() -> int | None:
        return getattr(importlib.import_module(module_name), func_name)(argv)

    return run_command(f"cpusparse {name}", body)


def _file_id(path: str) -> tuple[int, int, int] | None:
    """Identity of the file at ``path`` now (inode, size, mtime), None if absent."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_ino, st.st_size, st.st_mtime_ns


def _same_file(a: str, b: str) -> bool:
    return os.path.realpath(a) == os.path.realpath(b)


def _checkpoint_message(path: str, exc: Exception) -> str:
    text = str(exc)
    return text if repr(path) in text or path in text else f"checkpoint {path!r}: {text}"


def _check_train_args(args: argparse.Namespace) -> dict[str, Any]:
    """Check every setting and output path before any work; return the table options."""
    from .._io import OutputPathError, check_output_path
    from ..engine.layers.conv import CONV_GRANULARITIES
    from ..engine.layers.linear import GRANULARITIES
    from ..sklearn import SparseCNNClassifier, SparseMLPClassifier
    from ..training.config import options
    from .datasets import DATASETS

    cnn = args.model != "mlp"
    model_flags = {
        "--hidden": (args.hidden is not None, not cnn),
        "--widths": (args.widths is not None, cnn),
        "--input-shape": (args.input_shape is not None, cnn),
        "--prune-first": (args.prune_first is not None, cnn),
        "--init": (cnn and args.init is not None, not cnn),
        **{
            f"--{name.replace('_', '-')}": (getattr(args, param, None) is not None, cnn)
            for param, name in SparseCNNClassifier._train_options.items()
            if param not in SparseMLPClassifier._train_options
        },
    }
    for flag, (given, allowed) in model_flags.items():
        if given and not allowed:
            wanted = (
                "--model vgg or resnet"
                if flag != "--hidden" and flag != "--init"
                else ("--model mlp")
            )
            if flag == "--prune-first":
                flag = "--prune-first" if args.prune_first else "--no-prune-first"
            raise UsageError(f"{flag} is for {wanted}, got --model {args.model}")
    allowed_granularities = tuple(CONV_GRANULARITIES) if cnn else tuple(GRANULARITIES)
    if args.granularity not in allowed_granularities:
        raise UsageError(
            f"--granularity {args.granularity} is not one of {', '.join(allowed_granularities)} "
            f"(the granularities of --model {args.model})"
        )
    if args.input_shape is not None and len(args.input_shape) != 3:
        raise UsageError(
            f"--input-shape must be three positive ints C,H,W, got "
            f"{','.join(map(str, args.input_shape))}"
        )
    classifier = SparseCNNClassifier if cnn else SparseMLPClassifier

    if args.checkpoint is None:
        for flag in ("resume", "overwrite"):
            if getattr(args, flag):
                raise UsageError(f"--{flag} needs --checkpoint PATH")
    if args.resume and args.overwrite:
        raise UsageError(
            "--resume and --overwrite exclude each other: --resume continues the run in "
            "--checkpoint, --overwrite starts again and replaces it"
        )
    # Training options are checked against the option table and named by their flag.
    rows = {option.name: option for option in options()}
    table: dict[str, Any] = {}  # validated option values of several types, by parameter
    for param, name in classifier._train_options.items():
        try:
            table[param] = rows[name].constraint.check(getattr(args, param), rows[name].flag)
        except (ValueError, TypeError) as exc:
            raise UsageError(str(exc)) from None

    if args.dataset not in DATASETS:  # a path, read as MNIST-format data
        if args.data_path is not None:
            raise UsageError(
                f"--data-path is only used with --dataset mnist, got --dataset {args.dataset}"
            )
        args.data_path, args.dataset = args.dataset, "mnist"
        args.dataset_is_path = True
    if args.dataset == "mnist":
        if args.data_path is None:
            raise UsageError("--dataset mnist needs --data-path (nothing is downloaded)")
        if not os.path.exists(args.data_path):
            raise UsageError(f"--data-path {args.data_path!r} does not exist")
    elif args.data_path is not None:
        raise UsageError(
            f"--data-path is only used with --dataset mnist, got --dataset {args.dataset}"
        )

    outputs = {}
    for flag in ("json", "checkpoint"):
        path = getattr(args, flag)
        if path is None:
            continue
        try:
            outputs[flag] = check_output_path(path, f"--{flag}")
        except OutputPathError as exc:
            raise UsageError(str(exc)) from None
        if args.data_path is not None and _same_file(outputs[flag], args.data_path):
            raise UsageError(f"--{flag} {path}: is the --data-path file, which it would replace")
    if len(outputs) == 2 and _same_file(outputs["json"], outputs["checkpoint"]):
        raise UsageError(f"--json {args.json} and --checkpoint {args.checkpoint} are the same file")

    path = args.checkpoint
    if path is not None and os.path.exists(path):
        if not (args.resume or args.overwrite):
            raise UsageError(
                f"--checkpoint {path}: the file exists; pass --resume to continue that run "
                "or --overwrite to start again and replace it"
            )
        if args.resume:
            from ..training.checkpoint import CheckpointError, load_checkpoint, restore_state

            try:
                restore_state(load_checkpoint(path))
            except (CheckpointError, OSError) as exc:
                raise CommandError(
                    f"cannot resume: {_checkpoint_message(path, exc)}; pass --overwrite "
                    "instead of --resume to start again"
                ) from None
    return table


def _interrupted(args: argparse.Namespace, before: tuple[int, int, int] | None) -> str:
    """The line printed on Ctrl-C: where the last checkpoint is and how to resume."""
    path = args.checkpoint
    if path is None:
        return (
            "interrupted; no checkpoint was being written (run with --checkpoint PATH to be "
            "able to resume an interrupted run)"
        )
    now = _file_id(path)
    if now is None or (now == before and not args.resume):
        return (
            f"interrupted before the end of the first epoch; no checkpoint of this run was "
            f"written to {path} yet (one is written after every epoch)"
        )
    detail = ""
    try:
        from ..training.checkpoint import load_checkpoint

        ckpt = load_checkpoint(path)
        detail = f" ({ckpt['phase']} phase, epoch {ckpt['epoch']})"
    except (ValueError, OSError):
        pass
    return (
        f"interrupted; the last checkpoint is {path}{detail}: run the same command with "
        "--resume to continue"
    )


def _load(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train and test arrays (the settings were checked by :func:`_check_train_args`)."""
    from sklearn.model_selection import train_test_split

    from .datasets import load_dataset

    path = args.data_path
    if args.dataset in _OFFICIAL_SPLIT:
        train = load_dataset(args.dataset, path=path, split="train")
        try:
            test = load_dataset(args.dataset, path=path, split="test")
        except ValueError:  # an MNIST directory without the t10k files
            test = None
        if test is not None:
            return train.X, test.X, train.y, test.y
        X, y = train.X, train.y
    else:
        ds = load_dataset(args.dataset)
        X, y = ds.X, ds.y
    try:
        return train_test_split(X, y, test_size=0.2, stratify=y, random_state=args.seed)
    except ValueError as exc:
        source = f"--data-path {path}" if path is not None else f"--dataset {args.dataset}"
        raise ValueError(
            f"cannot split the {len(y)} samples of {source} 80/20 with every class in both "
            f"parts: {exc}"
        ) from None


def _train(args: argparse.Namespace) -> int:
    before = None if args.checkpoint is None else _file_id(args.checkpoint)
    try:
        return _train_checked(args)
    except KeyboardInterrupt:
        print(f"cpusparse train: {_interrupted(args, before)}", file=sys.stderr)
        return 130


def _train_checked(args: argparse.Namespace) -> int:
    from .._io import OutputPathError
    from ..sklearn import SparseCNNClassifier, SparseMLPClassifier
    from ..training.checkpoint import CheckpointError
    from ..training.state import NonFiniteError

    table = _check_train_args(args)
    model: dict[str, Any]
    if args.model == "mlp":
        hidden = (300, 100) if args.hidden is None else _flat(args.hidden)
        model = {"hidden_layer_sizes": hidden, "init": args.init}
        classifier: type[SparseMLPClassifier | SparseCNNClassifier] = SparseMLPClassifier
    else:
        widths = (16, 32, 64) if args.widths is None else _flat(args.widths)
        model = {
            "architecture": args.model,
            "widths": widths,
            "input_shape": None if args.input_shape is None else tuple(args.input_shape),
            "prune_first": True if args.prune_first is None else args.prune_first,
        }
        classifier = SparseCNNClassifier
    clf = classifier(
        **model,
        granularity=args.granularity,
        max_iter=args.epochs,
        finetune_iter=args.finetune_epochs,
        fixed_mask=args.fixed_mask,
        batch_size=args.batch_size,
        n_jobs=args.threads,
        random_state=args.seed,
        verbose=not args.quiet,
        checkpoint=args.checkpoint,
        resume=args.resume,
        **table,
    )
    try:
        clf._check_params()
    except (ValueError, TypeError) as exc:
        raise UsageError(str(exc)) from None

    t_start = time.perf_counter()
    try:
        X_train, X_test, y_train, y_test = _load(args)
    except ImportError as exc:
        raise CommandError(str(exc)) from None
    except (ValueError, TypeError, OSError) as exc:
        source = args.data_path if args.dataset_is_path else args.dataset
        raise CommandError(f"cannot load {source!r}: {exc}") from None
    if args.model != "mlp":
        _check_image_shape(args, model["widths"], X_train.shape[1])
    t_loaded = time.perf_counter()
    try:
        clf.fit(X_train, y_train)
    except NonFiniteError as exc:
        raise CommandError(f"training stopped: {exc}") from None
    except CheckpointError as exc:
        raise CommandError(_checkpoint_message(args.checkpoint or "", exc)) from None
    except OutputPathError as exc:
        raise CommandError(str(exc)) from None
    except (ValueError, TypeError) as exc:  # a setting that does not fit the data or checkpoint
        raise UsageError(str(exc)) from None
    except OSError as exc:  # e.g. a full disk while writing the checkpoint
        raise CommandError(f"--checkpoint {args.checkpoint}: {exc}") from None
    t_fitted = time.perf_counter()
    accuracy = float(clf.score(X_test, y_test))
    t_end = time.perf_counter()

    layers = clf.layer_densities()
    n_prunable = sum(r["n_units"] for r in layers if r["prunable"])
    print(
        f"{args.dataset}: {len(y_train)} train / {len(y_test)} test samples, "
        f"{X_train.shape[1]} features, {len(clf.classes_)} classes"
    )
    print(
        f"test accuracy {accuracy:.4f}   density {clf.density_:.4f} "
        f"({clf.n_active_} of {n_prunable} prunable units)   fit {t_fitted - t_loaded:.1f} s"
    )
    if not args.quiet:
        print(_table(layers))
    if args.json is not None:
        from .._io import atomic_write

        metrics = {
            "accuracy": accuracy,
            "density": clf.density_,
            "n_active": clf.n_active_,
            "layers": [{**r, "shape": list(r["shape"])} for r in layers],
            "history": clf.history_,
            "config": {
                **{k: v for k, v in vars(args).items() if k not in ("handler", "command_parser")},
                **(
                    {"hidden": list(model["hidden_layer_sizes"])}
                    if args.model == "mlp"
                    else {"widths": list(model["widths"])}
                ),
                "estimator_params": clf.get_params(),
            },
            "data": {
                "n_train": len(y_train),
                "n_test": len(y_test),
                "n_features": int(X_train.shape[1]),
            },
            "timings": {
                "load": t_loaded - t_start,
                "fit": t_fitted - t_loaded,
                "evaluate": t_end - t_fitted,
                "total": t_end - t_start,
            },
        }
        text = json.dumps(_finite(metrics), indent=2, allow_nan=False) + "\n"
        try:
            atomic_write(args.json, lambda f: f.write(text.encode()))
        except (OSError, ValueError) as exc:
            raise CommandError(f"--json {args.json}: {exc}") from None
    return 0


def _check_image_shape(args: argparse.Namespace, widths: tuple[int, ...], n_features: int) -> None:
    """A usage error, naming the flags, if the CNN cannot take the data's samples."""
    from ..sklearn import infer_input_shape

    source = f"--dataset {args.data_path if args.dataset_is_path else args.dataset}"
    if args.input_shape is None:
        try:
            shape = infer_input_shape(n_features, len(widths))
        except ValueError as exc:
            text = (
                str(exc)
                .replace("input_shape=(1, 1, ", "--input-shape 1,1,")
                .replace(") to read", " to read")
            )
            raise UsageError(f"{source}: {text.replace('widths', '--widths')}") from None
    else:
        shape = tuple(args.input_shape)
        if shape[0] * shape[1] * shape[2] != n_features:
            raise UsageError(
                f"--input-shape {','.join(map(str, shape))} has {shape[0] * shape[1] * shape[2]}"
                f" values, but {source} has {n_features} features"
            )
    smallest = shape[2] if shape[1] == 1 else min(shape[1], shape[2])
    if smallest >> (len(widths) - 1) < 1:
        raise UsageError(
            f"--input-shape {','.join(map(str, shape))} is too small for the "
            f"{len(widths)} stages of --widths {','.join(map(str, widths))}: each stage "
            "after the first halves H and W"
        )


def _flat(groups: list[list[int]]) -> tuple[int, ...]:
    """``--hidden 300,100`` or ``--hidden 300 100`` as one tuple of sizes."""
    return tuple(size for group in groups for size in group)


def _finite(value: object) -> object:
    """JSON-ready copy: NaN and infinities become None, tuples lists, NumPy scalars Python."""
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _table(layers: list[LayerDensity]) -> str:
    # A layer is named by its path (see layer_densities): "3.0.1" inside a residual block.
    header = ("layer", "type", "shape", "units", "active", "density")
    rows = [
        (
            r["name"],
            r["type"] + ("" if r["prunable"] else " (dense)"),
            "x".join(map(str, r["shape"])),
            str(r["n_units"]),
            str(r["active"]),
            f"{r['density']:.4f}",
        )
        for r in layers
    ]
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]
    head = "  ".join(cell.ljust(w) for cell, w in zip(header, widths, strict=True)).rstrip()
    return "\n".join([head, *lines])


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
