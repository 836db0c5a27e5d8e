"""The ``cpusparse`` command line.

``cpusparse train`` trains a sparse MLP (:class:`~cpusparse.sklearn.SparseMLPClassifier`)
on one of the offline data sets of :mod:`cpusparse.tools.datasets` and prints the test
accuracy and a per-layer density report. ``cpusparse bench``, ``cpusparse trace`` and
``cpusparse verify`` are handed, with their remaining arguments, to the modules that
implement them (each parses its own options).

Examples
--------
A usage error prints a message on stderr and returns 2:

>>> main(["train", "--density", "1.5"])
2
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from ..sklearn import LayerDensity

__all__ = ["main", "build_parser"]

# Subcommands implemented elsewhere: name -> (module, function taking argv).
EXTERNAL = {
    "bench": ("cpusparse.tools.bench", "main", "benchmarks of the sparse kernels and training"),
    "trace": ("cpusparse.tools.trace", "main_trace", "record a reference trace of training"),
    "verify": ("cpusparse.tools.trace", "main_verify", "check an implementation against a trace"),
}

_OFFICIAL_SPLIT = ("mnist", "mnist1d")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``cpusparse`` (``train`` fully; the others by name)."""
    import inspect

    from ..engine.layers.linear import GRANULARITIES, INITS
    from ..sklearn import _TRAIN_OPTIONS as TRAIN_OPTIONS
    from ..sklearn import SparseMLPClassifier
    from ._options import HelpFormatter, add_options, layer_sizes
    from .datasets import DATASETS

    defaults = {
        name: p.default for name, p in inspect.signature(SparseMLPClassifier).parameters.items()
    }

    parser = argparse.ArgumentParser(
        prog="cpusparse",
        description="Completely sparse neural-network training on the CPU (VR-PGE).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    train = sub.add_parser(
        "train",
        help="train a sparse MLP and report its accuracy and per-layer density",
        description=(
            "Train a sparse MLP with VR-PGE, then fine-tune it on a fixed mask, and print "
            "the test accuracy and a per-layer density report. digits and mnist5k are "
            "split 80/20 (stratified, by --seed); mnist and mnist1d use their official "
            "train/test split."
        ),
        formatter_class=HelpFormatter,
    )
    data = train.add_argument_group("data")
    data.add_argument(
        "--dataset", choices=DATASETS, default="digits", help="offline data set to train on"
    )
    data.add_argument(
        "--data-path", metavar="PATH", help="MNIST IDX directory or .npz (--dataset mnist only)"
    )
    model = train.add_argument_group("model")
    model.add_argument(
        "--hidden",
        type=layer_sizes,
        nargs="+",
        default=[[300, 100]],
        metavar="N[,N...]",
        help="hidden layer widths, e.g. 300,100 or 300 100 (default: 300,100)",
    )
    model.add_argument(
        "--granularity",
        choices=tuple(GRANULARITIES),
        default=defaults["granularity"],
        help="what one mask bit keeps",
    )
    model.add_argument(
        "--init", choices=INITS, default=defaults["init"], help="weight initialisation"
    )
    method = train.add_argument_group("training (the options of TrainConfig)")
    table_names = {name: param for param, name in TRAIN_OPTIONS.items()}
    add_options(
        method,
        table_names,
        {name: defaults[param] for name, param in table_names.items()},
        dest=table_names,
    )
    run = train.add_argument_group("run")
    run.add_argument(
        "--epochs", type=int, default=defaults["max_iter"], help="epochs of sparse training"
    )
    run.add_argument(
        "--finetune-epochs",
        type=int,
        default=defaults["finetune_iter"],
        help="epochs on the fixed mask (0 skips)",
    )
    run.add_argument(
        "--batch-size", type=int, default=defaults["batch_size"], help="mini-batch size"
    )
    run.add_argument("--seed", type=int, default=0, help="seed of every random stream")
    run.add_argument(
        "--threads", type=int, default=1, help="Numba threads (results do not depend on it)"
    )
    out = train.add_argument_group("output")
    out.add_argument("--json", metavar="PATH", help="write metrics, history and config as JSON")
    out.add_argument("--checkpoint", metavar="PATH", help="checkpoint written every epoch")
    out.add_argument(
        "--resume", action="store_true", help="continue from --checkpoint if it exists"
    )
    out.add_argument("--quiet", action="store_true", help="no progress bar and no report table")
    train.set_defaults(handler=_train, command_parser=train)
    for name, (_, _, text) in EXTERNAL.items():
        sub.add_parser(name, help=f"{text} (its own options: cpusparse {name} --help)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``cpusparse`` command line.

    Parameters
    ----------
    argv : list of str, optional
        Arguments without the program name; ``sys.argv[1:]`` by default.

    Returns
    -------
    status : int
        0 on success, 1 on a runtime failure (e.g. a missing optional package),
        2 on a usage error.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv and argv[0] in EXTERNAL:
        return _dispatch(argv[0], argv[1:])
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return 0 if exc.code is None else int(exc.code)
    try:
        return args.handler(args, args.command_parser)
    except SystemExit as exc:  # parser.error raised while checking the values
        return 0 if exc.code is None else int(exc.code)


def _dispatch(name: str, argv: list[str]) -> int:
    module_name, func_name, _ = EXTERNAL[name]
    status = getattr(importlib.import_module(module_name), func_name)(argv)
    return 0 if status is None else int(status)


def _load(
    args: argparse.Namespace, parser: argparse.ArgumentParser
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train and test arrays; usage problems go through ``parser.error``."""
    from sklearn.model_selection import train_test_split

    from .datasets import load_dataset

    if args.dataset == "mnist":
        if args.data_path is None:
            parser.error("--dataset mnist needs --data-path (nothing is downloaded)")
        if not os.path.exists(args.data_path):
            parser.error(f"--data-path {args.data_path!r} does not exist")
    elif args.data_path is not None:
        parser.error(f"--data-path is only used with --dataset mnist, got --dataset {args.dataset}")
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
    return train_test_split(X, y, test_size=0.2, stratify=y, random_state=args.seed)


def _train(args: argparse.Namespace, parser: argparse.ArgumentParser) -> int:
    from ..sklearn import _TRAIN_OPTIONS as TRAIN_OPTIONS
    from ..sklearn import SparseMLPClassifier
    from ..training.config import options

    if args.resume and args.checkpoint is None:
        parser.error("--resume needs --checkpoint PATH")
    hidden = tuple(size for group in args.hidden for size in group)
    # Training options are checked against the option table and named by their flag.
    rows = {option.name: option for option in options()}
    table: dict[str, Any] = {}  # validated option values of several types, by parameter
    for param, name in TRAIN_OPTIONS.items():
        try:
            table[param] = rows[name].constraint.check(getattr(args, param), rows[name].flag)
        except (ValueError, TypeError) as exc:
            parser.error(str(exc))
    clf = SparseMLPClassifier(
        hidden_layer_sizes=hidden,
        granularity=args.granularity,
        init=args.init,
        max_iter=args.epochs,
        finetune_iter=args.finetune_epochs,
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
        parser.error(str(exc))

    t_start = time.perf_counter()
    try:
        X_train, X_test, y_train, y_test = _load(args, parser)
    except ImportError as exc:
        print(f"cpusparse train: error: {exc}", file=sys.stderr)
        return 1
    except (ValueError, OSError) as exc:
        print(f"cpusparse train: error: cannot load {args.dataset!r}: {exc}", file=sys.stderr)
        return 1
    t_loaded = time.perf_counter()
    from ..training.state import NonFiniteError

    try:
        clf.fit(X_train, y_train)
    except NonFiniteError as exc:
        print(f"cpusparse train: error: {exc}", file=sys.stderr)
        return 1
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
                "hidden": list(hidden),
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
        atomic_write(args.json, lambda f: f.write(text.encode()))
    return 0


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
    header = ("layer", "type", "shape", "units", "active", "density")
    rows = [
        (
            str(r["layer"]),
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
