"""Test accuracy of sparse training against a dense MLP.

Every row trains a ReLU MLP with hidden layers (300, 100) on an 80/20 stratified
split (``train_test_split(..., stratify=y, random_state=seed)``) of digits and of
mnist5k, for several seeds, and reports the test accuracy (mean ± std over the
seeds), the final density of the prunable units and the fit time. Rows:

- ``dense``: scikit-learn ``MLPClassifier((300, 100), random_state=seed)`` with its
  default settings (Adam, lr 1e-3, at most 200 epochs, early stop on the loss), the
  reference of the aims;
- ``cpusparse-dense``: :class:`~cpusparse.SparseMLPClassifier` at density 1.0, the
  same training loop with every unit kept (cpusparse's own dense baseline);
- ``vrpge-w0.1``, ``vrpge-w0.02``, ``vrpge-n0.3``: VR-PGE at weight level (density 0.1
  and 0.02) and at neuron level (density 0.3);
- ``reinforce-w0.1``: the plain policy gradient, with the same budget and settings
  as ``vrpge-w0.1``;
- ``random-mask-w0.1``: a fixed mask of ``floor(0.1 n)`` units drawn uniformly at
  random, on which the weights alone are trained for all ``max_iter + finetune_iter``
  epochs (same initialisation, optimizer and cosine schedule, no score learning):
  what learning the mask adds.

All cpusparse rows use the defaults of :class:`~cpusparse.SparseMLPClassifier`
except ``density``, ``granularity`` and ``score_estimator`` (and the epochs, if given).
The density of a cpusparse row counts the prunable units (both hidden layers; the
10-way classifier stays dense, as in the paper's code). Aims are gaps to the
``dense`` row's mean, in accuracy points.

Every training runs with one Numba thread and one BLAS thread; ``--jobs`` runs up to
that many fits at once in separate processes (fit times then include contention).

Usage::

    python benchmarks/accuracy.py [--quick] [--seeds 3] [--datasets digits mnist5k]
                                  [--rows ...] [--epochs N] [--finetune-epochs N]
                                  [--mnist-epochs N] [--mnist-finetune-epochs N]
                                  [--jobs 1] [--out benchmarks/results]
"""

from __future__ import annotations

import os

# One thread per process, before NumPy and Numba are imported.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cpusparse.tools.bench import machine_info  # noqa: E402

HIDDEN = (300, 100)
DATASETS = ("digits", "mnist5k")

# key -> (label, kind, parameters, {dataset: aim in points below dense} or None)
ROWS = {
    "dense": ("sklearn MLPClassifier (dense reference)", "sklearn", {}, None),
    "cpusparse-dense": ("cpusparse, density 1.0 (own dense baseline)", "cpusparse",
                        {"density": 1.0}, None),
    "vrpge-w0.1": ("cpusparse VR-PGE, weight, density 0.1", "cpusparse",
                   {"density": 0.1}, {"digits": 1.0, "mnist5k": 1.0}),
    "reinforce-w0.1": ("cpusparse REINFORCE, weight, density 0.1", "cpusparse",
                       {"density": 0.1, "score_estimator": "reinforce"}, None),
    "random-mask-w0.1": ("random fixed mask, weight, density 0.1", "random-mask",
                         {"density": 0.1}, None),
    "vrpge-w0.02": ("cpusparse VR-PGE, weight, density 0.02", "cpusparse",
                    {"density": 0.02}, {"mnist5k": 3.0}),
    "vrpge-n0.3": ("cpusparse VR-PGE, neuron, density 0.3", "cpusparse",
                   {"density": 0.3, "granularity": "neuron"}, {"digits": 2.0, "mnist5k": 2.0}),
}  # fmt: skip


def _split(dataset, seed):
    from sklearn.model_selection import train_test_split

    from cpusparse.tools.datasets import load_dataset

    ds = load_dataset(dataset)
    return train_test_split(ds.X, ds.y, test_size=0.2, stratify=ds.y, random_state=seed)


def _fit_sklearn(X_train, y_train, X_test, y_test, seed, _params, _epochs):
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    clf = MLPClassifier(HIDDEN, random_state=seed)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(X_train, y_train)
    seconds = time.perf_counter() - t0
    return {
        "accuracy": float(clf.score(X_test, y_test)),
        "density": 1.0,
        "n_active": None,
        "n_iter": int(clf.n_iter_),
        "fit_seconds": seconds,
    }


def _fit_cpusparse(X_train, y_train, X_test, y_test, seed, params, epochs):
    from cpusparse import SparseMLPClassifier

    clf = SparseMLPClassifier(hidden_layer_sizes=HIDDEN, random_state=seed, **params, **epochs)
    t0 = time.perf_counter()
    clf.fit(X_train, y_train)
    seconds = time.perf_counter() - t0
    return {
        "accuracy": float(clf.score(X_test, y_test)),
        "density": float(clf.density_),
        "n_active": int(clf.n_active_),
        "n_iter": int(clf.n_iter_),
        "fit_seconds": seconds,
    }


def _fit_random_mask(X_train, y_train, X_test, y_test, seed, params, epochs):
    """Train the weights on one uniformly random fixed mask (no score learning).

    Same network, initialisation, optimizer, batch size and cosine schedule as
    :class:`~cpusparse.SparseMLPClassifier` with its defaults; the mask (``floor(k)``
    units drawn without replacement from the mask stream) never changes.
    """
    from cpusparse import SparseMLPClassifier
    from cpusparse.models import mlp
    from cpusparse.training import (
        TrainConfig,
        evaluate,
        init_state,
        run_epoch,
        spawn_streams,
        split_masks,
    )

    defaults = SparseMLPClassifier().get_params()
    p = {**defaults, **params, **epochs}
    dtype = np.dtype(p["dtype"])
    x_train = np.ascontiguousarray(X_train.T, dtype=dtype)
    x_test = np.ascontiguousarray(X_test.T, dtype=dtype)
    y_train = np.asarray(y_train, dtype=np.int64)
    y_test = np.asarray(y_test, dtype=np.int64)
    n_classes = int(max(y_train.max(), y_test.max())) + 1
    n_epochs = p["max_iter"] + p["finetune_iter"]
    n_batches = -(-y_train.shape[0] // p["batch_size"])

    t0 = time.perf_counter()
    config = TrainConfig(
        density=p["density"],
        optimizer=p["optimizer"],
        lr=p["learning_rate_init"],
        score_optimizer=p["score_optimizer"],
        score_lr=p["score_learning_rate"],
        schedule="cosine",
        total_steps=n_epochs * n_batches,
    )
    init_rng, data_rng, mask_rng = spawn_streams(seed)
    network = mlp(
        x_train.shape[0],
        HIDDEN,
        n_classes,
        granularity=p["granularity"],
        init=p["init"],
        density=p["density"],
        dtype=dtype,
        rng=init_rng,
    )
    state = init_state(network, config, data_rng=data_rng, mask_rng=mask_rng)
    k = int(math.floor(state.budget + 1e-9))
    flat = np.zeros(state.n_units_initial, dtype=bool)
    flat[mask_rng.choice(state.n_units_initial, size=k, replace=False)] = True
    masks = [m.copy() for m in split_masks(state, flat)]
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for _ in range(n_epochs):
            run_epoch(state, x_train, y_train, config, batch_size=p["batch_size"], masks=masks)
    seconds = time.perf_counter() - t0
    return {
        "accuracy": float(evaluate(network, x_test, y_test, masks)[1]),
        "density": k / state.n_units_initial,
        "n_active": k,
        "n_iter": n_epochs,
        "fit_seconds": seconds,
    }


FITS = {"sklearn": _fit_sklearn, "cpusparse": _fit_cpusparse, "random-mask": _fit_random_mask}


def run_one(job):
    """Fit one row on one dataset and seed; return the run record."""
    dataset, row, seed, epochs = job
    _, kind, params, _ = ROWS[row]
    X_train, X_test, y_train, y_test = _split(dataset, seed)
    result = FITS[kind](X_train, y_train, X_test, y_test, seed, params, epochs)
    return {
        "dataset": dataset,
        "row": row,
        "seed": seed,
        "kind": kind,
        "params": params,
        "epochs": epochs if kind != "sklearn" else None,
        **result,
    }


def summarise(runs, rows, datasets):
    """One summary per (dataset, row): mean/std over seeds, gap to dense, aim."""
    out = []
    for dataset in datasets:
        by_row = {r: [x for x in runs if x["dataset"] == dataset and x["row"] == r] for r in rows}
        dense = by_row.get("dense") or []
        dense_mean = 100 * np.mean([x["accuracy"] for x in dense]) if dense else None
        for row in rows:
            rs = by_row[row]
            if not rs:
                continue
            acc = 100 * np.array([x["accuracy"] for x in rs])
            aim = (ROWS[row][3] or {}).get(dataset)
            gap = None if dense_mean is None or row == "dense" else dense_mean - acc.mean()
            out.append(
                {
                    "dataset": dataset,
                    "row": row,
                    "label": ROWS[row][0],
                    "n_seeds": len(rs),
                    "accuracy_mean": float(acc.mean()),
                    "accuracy_std": float(acc.std(ddof=1)) if len(rs) > 1 else 0.0,
                    "gap_to_dense": None if gap is None else float(gap),
                    "density_mean": float(np.mean([x["density"] for x in rs])),
                    "fit_seconds_mean": float(np.mean([x["fit_seconds"] for x in rs])),
                    "epochs": rs[0]["epochs"],
                    "aim_points": aim,
                    "aim_met": None if aim is None or gap is None else bool(gap <= aim),
                }
            )
    return out


def markdown(summary, settings):
    lines = [
        "# Accuracy of completely sparse training (cpusparse) vs a dense MLP",
        "",
        f"MLP {HIDDEN[0]}-{HIDDEN[1]} (ReLU), 80/20 stratified split per seed, seeds "
        f"{settings['seeds']}; test accuracy in %, mean ± std (ddof=1) over the seeds. "
        "Gap = dense reference mean minus the row's mean (points). Density = kept "
        "fraction of the prunable units (both hidden layers; the classifier is dense). "
        "cpusparse rows use the `SparseMLPClassifier` defaults "
        f"({settings['cpusparse_defaults']}) except the stated density, granularity and "
        "score estimator. Fit seconds: one Numba/BLAS thread per fit, "
        f"{settings['jobs']} fit(s) at a time on a shared machine, so indicative only.",
        "",
    ]
    for dataset in settings["datasets"]:
        ep = settings["epochs"][dataset]
        lines += [
            f"## {dataset} (cpusparse: {ep['max_iter']} sparse + {ep['finetune_iter']} "
            "fine-tuning epochs)",
            "",
            "| row | test accuracy (%) | gap (pts) | aim | density | fit (s) |",
            "|---|---|---|---|---|---|",
        ]
        for s in summary:
            if s["dataset"] != dataset:
                continue
            gap = "" if s["gap_to_dense"] is None else f"{s['gap_to_dense']:+.2f}"
            if s["aim_points"] is None:
                aim = ""
            else:
                aim = f"≤ {s['aim_points']:g}: " + ("met" if s["aim_met"] else "**not met**")
            lines.append(
                f"| {s['label']} | {s['accuracy_mean']:.2f} ± {s['accuracy_std']:.2f} | {gap} "
                f"| {aim} | {s['density_mean']:.4f} | {s['fit_seconds_mean']:.1f} |"
            )
        lines.append("")
    lines += [
        "The random fixed mask trains the weights only, on `floor(0.1 n)` units drawn "
        "uniformly at random, for as many epochs as the sparse and fine-tuning phases "
        "together. sklearn's dense reference uses its own defaults (up to 200 epochs).",
        "",
    ]
    return "\n".join(lines)


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: digits, 1 seed, 10 + 3 epochs"
    )
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds (0 .. N-1)")
    parser.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--epochs", type=int, help="sparse epochs (default: the estimator's)")
    parser.add_argument(
        "--finetune-epochs", type=int, help="fine-tuning epochs (default: the estimator's)"
    )
    parser.add_argument("--mnist-epochs", type=int, help="sparse epochs for mnist5k only")
    parser.add_argument(
        "--mnist-finetune-epochs", type=int, help="fine-tuning epochs for mnist5k only"
    )
    parser.add_argument("--jobs", type=int, default=1, help="fits at once (processes)")
    parser.add_argument(
        "--out",
        default=os.path.join(os.path.dirname(__file__), "results"),
        help="output directory of accuracy.json and accuracy.md",
    )
    return parser


def main(argv=None):
    args = build_parser().parse_args(argv)
    from cpusparse import SparseMLPClassifier

    defaults = SparseMLPClassifier().get_params()
    if args.quick:
        args.datasets, args.seeds = ["digits"], 1
        args.epochs = args.epochs or 10
        args.finetune_epochs = args.finetune_epochs if args.finetune_epochs is not None else 3
    if args.seeds < 1 or args.jobs < 1:
        raise SystemExit("--seeds and --jobs must be >= 1")
    epochs = {}
    for dataset in args.datasets:
        e = args.epochs if args.epochs is not None else defaults["max_iter"]
        f = args.finetune_epochs if args.finetune_epochs is not None else defaults["finetune_iter"]
        if dataset == "mnist5k":
            e = args.mnist_epochs if args.mnist_epochs is not None else e
            f = args.mnist_finetune_epochs if args.mnist_finetune_epochs is not None else f
        epochs[dataset] = {"max_iter": e, "finetune_iter": f}
    seeds = list(range(args.seeds))
    jobs = [
        (dataset, row, seed, epochs[dataset])
        for dataset in args.datasets
        for row in args.rows
        for seed in seeds
    ]

    runs = []
    t_start = time.perf_counter()

    def report(run):
        runs.append(run)
        print(
            f"[{len(runs):3d}/{len(jobs)}] {run['dataset']:8s} {run['row']:18s} seed {run['seed']}"
            f"  acc {100 * run['accuracy']:6.2f}  density {run['density']:.4f}"
            f"  {run['fit_seconds']:6.1f} s",
            flush=True,
        )

    if args.jobs == 1:
        for job in jobs:
            report(run_one(job))
    else:
        from multiprocessing import get_context

        with get_context("spawn").Pool(args.jobs) as pool:
            for run in pool.imap(run_one, jobs):
                report(run)

    summary = summarise(runs, args.rows, args.datasets)
    tuned = ("learning_rate_init", "score_learning_rate", "batch_size", "n_masks", "init")
    settings = {
        "seeds": seeds,
        "datasets": args.datasets,
        "rows": args.rows,
        "epochs": epochs,
        "jobs": args.jobs,
        "quick": args.quick,
        "hidden_layer_sizes": list(HIDDEN),
        "cpusparse_defaults": ", ".join(f"{k}={defaults[k]}" for k in tuned),
        "estimator_defaults": {k: v if not isinstance(v, tuple) else list(v)
                               for k, v in defaults.items()},
        "wall_seconds": time.perf_counter() - t_start,
        "machine": machine_info(),
    }  # fmt: skip
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "accuracy.json"), "w") as f:
        json.dump({"settings": settings, "summary": summary, "runs": runs}, f, indent=2)
        f.write("\n")
    text = markdown(summary, settings)
    with open(os.path.join(args.out, "accuracy.md"), "w") as f:
        f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
