"""Test accuracy of channel-sparse CNN training (SparseCNNClassifier) on MNIST-5k and MNIST-1D.

Every cell (row, seed) is one fit whose record -- test accuracy, ``density_``, the
multiply-adds the fixed masks execute, seconds, settings -- is written atomically to
its own JSON file under ``--out``; a rerun skips the cells already done, so the table
can be built over several sessions. ``--report`` builds the markdown table (mean ± std
over the seeds, ddof=1) from whatever cells exist.

Data: MNIST-5k split 80/20, stratified, with the run's seed as the split seed (X of
shape (n, 784) in [0, 1], read as 1x28x28 images); MNIST-1D with its official split
(4,000 / 1,000 sequences of length 40, read as 1x1x40 signals). No choice is made on
the test data: the only choices (the widths of the same-cost rows) follow from
multiply-add counts of the training fit, not from any accuracy; no row tunes anything
on a validation split.

Rows (``ROWS``); every fit uses the :class:`~cpusparse.SparseCNNClassifier` defaults
(``max_iter=12`` sparse + ``finetune_iter=3`` fine-tuning epochs, batch 64, Adam lr
0.01, score lr 0.05, K = 2, VR-PGE, channel granularity, ``prune_first=True``) except
the stated architecture, widths and density, with the same epochs for every row:

- ``vgg16-dense``: VGG (16, 32, 64) at density 1.0 (target >= 97.5 %);
- ``vgg32-c0.25``: VGG (32, 64, 128) at channel density 0.25 (target >= 96.5 %);
- ``vgg-same-cost``: the dense VGG (w, 2w, 4w) whose forward multiply-adds per sample
  are closest to those the same seed's ``vgg32-c0.25`` fit keeps (its fixed masks);
- ``vgg32-random-c0.25``: VGG (32, 64, 128) on a fixed channel mask drawn uniformly at
  random (``floor(0.25 n)`` of the ``n`` channels, from the mask stream), whose weights
  alone are trained for ``max_iter + finetune_iter`` epochs with
  :mod:`cpusparse.training` (same initialisation, optimizer and cosine schedule; no
  score learning): what learning the mask adds;
- ``resnet16-dense``, ``resnet16-c0.5``, ``resnet16-c0.25``: ResNet (16, 32, 64)
  (one basic block per stage) at density 1.0, 0.5 and 0.25;
- ``mnist1d-cnn-c0.5``: 1-D VGG (16, 32, 64) at channel density 0.5 on MNIST-1D;
- ``mnist1d-mlp-same-cost``: a dense :class:`~cpusparse.SparseMLPClassifier` (density
  1.0) with two hidden layers (h, h), h chosen so that its multiply-adds per sample
  are closest to those the same seed's ``mnist1d-cnn-c0.5`` fit keeps.

Multiply-adds (:func:`cpusparse.models.count_macs`) are per sample and forward, with the
fixed masks: a convolution costs ``C_out_kept * C_in_live * kh * kw * H_out * W_out`` (the kept
filters times the input channels that may be nonzero), a linear layer its kept
weights on live inputs (the dense classifier: its live inputs' columns). A training step runs K
such forward passes plus their backward passes (about twice as many), with sampled
rather than fixed masks.

Usage::

    python benchmarks/cnn_accuracy.py [--seeds 0 1 2 3 4] [--rows ...] [--epochs N]
        [--finetune-epochs N] [--stop-after MINUTES] [--out DIR] [--report]
        [--report-only] [--quick]
"""

from __future__ import annotations

import os

# One thread per library, before NumPy and Numba are imported.
# (As a script only: imported, e.g. by the tests, it leaves the process's settings alone;
# Numba refuses a new thread count once its threads run.)
if __name__ == "__main__":
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import glob  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cpusparse.models import count_macs  # noqa: E402
from cpusparse.sweep.run import source_digest  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cnn")
DEFAULT_OUT = os.path.join(RESULTS, "accuracy")
DEFAULT_SEEDS = (0, 1, 2, 3, 4)
SCHEMA = 1


@dataclasses.dataclass(frozen=True)
class Row:
    """One row of the table: what one cell fits.

    ``kind`` picks the fit (``FITS``); ``params`` are the classifier's parameters
    (without the epochs and the seed); ``match`` names the row whose kept
    multiply-adds a same-cost row matches; ``target`` is the accuracy aim in %.
    """

    label: str
    kind: str
    dataset: str
    params: dict
    match: str | None = None
    target: float | None = None


ROWS = {
    "vgg16-dense": Row("VGG (16,32,64), density 1.0 (dense)", "cnn", "mnist5k",
                       {"architecture": "vgg", "widths": (16, 32, 64), "density": 1.0},
                       target=97.5),
    "vgg32-c0.25": Row("VGG (32,64,128), channel density 0.25", "cnn", "mnist5k",
                       {"architecture": "vgg", "widths": (32, 64, 128), "density": 0.25},
                       target=96.5),
    "vgg-same-cost": Row("dense VGG (w,2w,4w) of the kept cost of VGG (32,64,128) at 0.25",
                         "cnn-matched", "mnist5k", {"architecture": "vgg", "density": 1.0},
                         match="vgg32-c0.25"),
    "vgg32-random-c0.25": Row("VGG (32,64,128), random fixed channel mask 0.25 (weights only)",
                              "random-mask", "mnist5k",
                              {"architecture": "vgg", "widths": (32, 64, 128), "density": 0.25}),
    "resnet16-dense": Row("ResNet (16,32,64), density 1.0 (dense)", "cnn", "mnist5k",
                          {"architecture": "resnet", "widths": (16, 32, 64), "density": 1.0}),
    "resnet16-c0.5": Row("ResNet (16,32,64), channel density 0.5", "cnn", "mnist5k",
                         {"architecture": "resnet", "widths": (16, 32, 64), "density": 0.5}),
    "resnet16-c0.25": Row("ResNet (16,32,64), channel density 0.25", "cnn", "mnist5k",
                          {"architecture": "resnet", "widths": (16, 32, 64), "density": 0.25}),
    "mnist1d-cnn-c0.5": Row("MNIST-1D: 1-D VGG (16,32,64), channel density 0.5", "cnn",
                            "mnist1d",
                            {"architecture": "vgg", "widths": (16, 32, 64), "density": 0.5}),
    "mnist1d-mlp-same-cost": Row("MNIST-1D: dense MLP (h,h) of the kept cost of the 1-D CNN",
                                 "mlp-matched", "mnist1d", {"density": 1.0},
                                 match="mnist1d-cnn-c0.5"),
}  # fmt: skip


# ----------------------------------------------------------------- multiply-adds


def dense_cnn_macs(architecture, widths, input_shape, n_classes):
    """Forward multiply-adds per sample of the dense CNN (every channel kept)."""
    from cpusparse import models

    build = models.vgg if architecture == "vgg" else models.resnet
    net = build(tuple(widths), input_shape, n_classes, rng=0)
    return count_macs(net, None, input_shape)["total"]


def matched_vgg_width(target, input_shape, n_classes, max_width=256):
    """The ``w`` whose dense VGG (w, 2w, 4w) has the multiply-adds closest to ``target``.

    Returns ``w`` and the costs tried, ``{w: macs}`` (the cost grows with ``w``, so the
    search stops at the first width above ``target``).
    """
    costs = {}
    for w in range(1, max_width + 1):
        costs[w] = dense_cnn_macs("vgg", (w, 2 * w, 4 * w), input_shape, n_classes)
        if costs[w] >= target:
            break
    return min(costs, key=lambda w: (abs(costs[w] - target), w)), costs


def mlp_macs(n_in, hidden, n_out):
    """Multiply-adds per sample of a dense MLP."""
    sizes = (n_in, *hidden, n_out)
    return int(sum(a * b for a, b in zip(sizes[:-1], sizes[1:], strict=True)))


def matched_mlp_width(target, n_in, n_out, n_hidden=2, max_width=4096):
    """The ``h`` whose dense MLP with ``n_hidden`` layers of ``h`` is closest to ``target``."""
    return min(
        range(1, max_width + 1),
        key=lambda h: (abs(mlp_macs(n_in, (h,) * n_hidden, n_out) - target), h),
    )


# -------------------------------------------------------------------------- data


@functools.lru_cache(maxsize=4)
def load_split(dataset, seed):
    """``(X_train, X_test, y_train, y_test)``: 80/20 stratified by ``seed``, or official."""
    from cpusparse.tools.datasets import load_dataset

    if dataset == "mnist1d":
        train, test = load_dataset("mnist1d", split="train"), load_dataset("mnist1d", split="test")
        return train.X, test.X, train.y, test.y
    from sklearn.model_selection import train_test_split

    ds = load_dataset(dataset)
    return tuple(train_test_split(ds.X, ds.y, test_size=0.2, stratify=ds.y, random_state=seed))


# --------------------------------------------------------------------------- fits


def _cnn_record(clf, X_test, y_test, params, seconds):
    shape = clf.input_shape_
    n_classes = int(clf.classes_.shape[0])
    macs = count_macs(clf.network_, clf.masks_, shape)
    prunable = [r for r in clf.layer_densities() if r["prunable"]]
    return {
        "accuracy": float(clf.score(X_test, y_test)),
        "density": float(clf.density_),
        "n_active": int(clf.n_active_),
        "kept_channels": [int(r["active"]) for r in prunable],
        "n_channels": [int(r["n_units"]) for r in prunable],
        "macs": macs["total"],
        "macs_layers": macs["layers"],
        "dense_macs": dense_cnn_macs(params["architecture"], params["widths"], shape, n_classes),
        "input_shape": list(shape),
        "n_classes": n_classes,
        "fit_seconds": seconds,
        "epoch_seconds": [float(r["seconds"]) for r in clf.history_],
        "final_loss": float(clf.loss_curve_[-1]),
    }


def fit_cnn(row, seed, epochs, finetune_epochs, **_):
    """One :class:`~cpusparse.SparseCNNClassifier` fit of ``row.params``."""
    from cpusparse import SparseCNNClassifier

    X_train, X_test, y_train, y_test = load_split(row.dataset, seed)
    params = dict(row.params)
    params["widths"] = tuple(params["widths"])
    clf = SparseCNNClassifier(
        **params, max_iter=epochs, finetune_iter=finetune_epochs, n_jobs=1, random_state=seed
    )
    t0 = time.perf_counter()
    clf.fit(X_train, y_train)
    seconds = time.perf_counter() - t0
    return {"params": _jsonable(params), **_cnn_record(clf, X_test, y_test, params, seconds)}


def fit_cnn_matched(row, seed, epochs, finetune_epochs, out, rows, log=None):
    """The dense VGG (w, 2w, 4w) of the kept multiply-adds of ``row.match``'s cell."""
    ref, _ = run_cell(row.match, seed, out, epochs, finetune_epochs, rows=rows, log=log)
    w, _ = matched_vgg_width(ref["macs"], tuple(ref["input_shape"]), ref["n_classes"])
    matched = Row(row.label, "cnn", row.dataset, {**row.params, "widths": (w, 2 * w, 4 * w)})
    record = FITS["cnn"](matched, seed, epochs, finetune_epochs)
    record.update(matched_to=row.match, target_macs=ref["macs"], matched_width=w)
    return record


def fit_mlp_matched(row, seed, epochs, finetune_epochs, out, rows, log=None):
    """A dense SparseMLPClassifier (h, h) of the kept multiply-adds of ``row.match``."""
    from cpusparse import SparseMLPClassifier

    ref, _ = run_cell(row.match, seed, out, epochs, finetune_epochs, rows=rows, log=log)
    X_train, X_test, y_train, y_test = load_split(row.dataset, seed)
    n_in, n_out = X_train.shape[1], int(np.unique(y_train).shape[0])
    h = matched_mlp_width(ref["macs"], n_in, n_out)
    params = {**row.params, "hidden_layer_sizes": (h, h)}
    clf = SparseMLPClassifier(
        **params, max_iter=epochs, finetune_iter=finetune_epochs, n_jobs=1, random_state=seed
    )
    t0 = time.perf_counter()
    clf.fit(X_train, y_train)
    seconds = time.perf_counter() - t0
    return {
        "params": _jsonable(params),
        "accuracy": float(clf.score(X_test, y_test)),
        "density": float(clf.density_),
        "n_active": int(clf.n_active_),
        "macs": count_macs(clf.network_, clf.masks_, None)["total"],
        "dense_macs": mlp_macs(n_in, (h, h), n_out),
        "fit_seconds": seconds,
        "epoch_seconds": [float(r["seconds"]) for r in clf.history_],
        "final_loss": float(clf.loss_curve_[-1]),
        "matched_to": row.match,
        "target_macs": ref["macs"],
        "matched_width": h,
    }


def fit_random_mask(row, seed, epochs, finetune_epochs, **_):
    """Train the weights only, on a fixed uniformly random channel mask (no scores).

    The network, initialisation, optimizer, batch size and cosine schedule of
    :class:`~cpusparse.SparseCNNClassifier` with its defaults; ``floor(k)`` channels
    drawn without replacement from the mask stream over all prunable layers; every
    one of the ``epochs + finetune_epochs`` epochs is a fine-tuning epoch on it.
    """
    from cpusparse import SparseCNNClassifier, models
    from cpusparse.sklearn import infer_input_shape
    from cpusparse.training import (
        TrainConfig,
        evaluate,
        init_state,
        run_epoch,
        spawn_streams,
        split_masks,
    )
    from cpusparse.training.state import budget_units

    X_train, X_test, y_train, y_test = load_split(row.dataset, seed)
    params = dict(row.params)
    params["widths"] = tuple(params["widths"])
    p = {**SparseCNNClassifier().get_params(), **params}
    dtype = np.dtype(p["dtype"])
    shape = infer_input_shape(X_train.shape[1], len(p["widths"]))
    x_train = np.ascontiguousarray(X_train.reshape(-1, *shape), dtype=dtype)  # samples first
    x_test = np.ascontiguousarray(np.swapaxes(X_test.reshape(-1, *shape), 0, 1), dtype=dtype)
    y_train = np.asarray(y_train, dtype=np.int64)
    y_test = np.asarray(y_test, dtype=np.int64)
    n_classes = int(max(y_train.max(), y_test.max())) + 1
    n_epochs = epochs + finetune_epochs
    n_batches = -(-y_train.shape[0] // p["batch_size"])

    t0 = time.perf_counter()
    config = TrainConfig(
        density=p["density"],
        n_masks=p["n_masks"],
        optimizer=p["optimizer"],
        lr=p["learning_rate_init"],
        score_optimizer=p["score_optimizer"],
        score_lr=p["score_learning_rate"],
        weight_decay=p["weight_decay"],
        norm_updates=p["norm_updates"],
        schedule="cosine",
        total_steps=n_epochs * n_batches,
    )
    init_rng, data_rng, mask_rng = spawn_streams(seed)
    build = models.vgg if p["architecture"] == "vgg" else models.resnet
    network = build(
        p["widths"],
        shape,
        n_classes,
        granularity=p["granularity"],
        prune_first=p["prune_first"],
        density=p["density"],
        dtype=dtype,
        rng=init_rng,
    )
    state = init_state(network, config, data_rng=data_rng, mask_rng=mask_rng)
    k = budget_units(state.budget)
    flat = np.zeros(state.n_units_initial, dtype=bool)
    flat[mask_rng.choice(state.n_units_initial, size=k, replace=False)] = True
    masks = [m.copy() for m in split_masks(state, flat)]
    epoch_seconds, loss = [], math.nan
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for _ in range(n_epochs):
            e0 = time.perf_counter()
            stats = run_epoch(
                state,
                x_train,
                y_train,
                config,
                batch_size=p["batch_size"],
                masks=masks,
                samples_first=True,
            )
            loss = stats.loss
            epoch_seconds.append(time.perf_counter() - e0)
    seconds = time.perf_counter() - t0
    macs = count_macs(network, masks, shape)
    return {
        "params": _jsonable(params),
        "accuracy": float(evaluate(network, x_test, y_test, masks)[1]),
        "density": k / state.n_units_initial,
        "n_active": int(k),
        "kept_channels": [int(m.sum()) for m in masks],
        "n_channels": [int(m.shape[0]) for m in masks],
        "macs": macs["total"],
        "macs_layers": macs["layers"],
        "dense_macs": dense_cnn_macs(p["architecture"], p["widths"], shape, n_classes),
        "input_shape": list(shape),
        "n_classes": n_classes,
        "fit_seconds": seconds,
        "epoch_seconds": epoch_seconds,
        "final_loss": float(loss),
    }


FITS = {
    "cnn": fit_cnn,
    "cnn-matched": fit_cnn_matched,
    "mlp-matched": fit_mlp_matched,
    "random-mask": fit_random_mask,
}


def _jsonable(value):
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, tuple | list):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


# --------------------------------------------------------------------- the cells


def cell_path(out, row, seed, epochs, finetune_epochs):
    """The JSON file of one cell (the epochs are part of its name)."""
    return os.path.join(out, f"{row}__seed{seed}__e{epochs}+{finetune_epochs}.json")


def write_json_atomic(path, data):
    """Write ``data`` as JSON to ``path`` through a temporary file and a rename."""
    directory = os.path.dirname(os.path.abspath(path))
    if os.path.islink(path) or (os.path.exists(path) and not os.path.isfile(path)):
        raise ValueError(f"refusing to replace {path!r}: not a regular file")
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def read_cell(path):
    """The record of a finished cell, or None if the file is missing or unreadable."""
    try:
        with open(path) as f:
            record = json.load(f)
    except (OSError, ValueError):
        return None
    return record if record.get("schema") == SCHEMA and "accuracy" in record else None


def run_cell(name, seed, out, epochs, finetune_epochs, *, rows=None, log=None):
    """Fit one cell unless its JSON file exists; return ``(record, ran)``."""
    rows = ROWS if rows is None else rows
    path = cell_path(out, name, seed, epochs, finetune_epochs)
    record = read_cell(path)
    if record is not None:
        return record, False
    row = rows[name]
    result = FITS[row.kind](row, seed, epochs, finetune_epochs, out=out, rows=rows, log=log)
    record = {
        "schema": SCHEMA,
        "row": name,
        "label": row.label,
        "kind": row.kind,
        "dataset": row.dataset,
        "seed": seed,
        "epochs": epochs,
        "finetune_epochs": finetune_epochs,
        "target": row.target,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "cpusparse_source": source_digest(),
        **result,
    }
    record = json.loads(json.dumps(record))  # as a rerun reads it back
    os.makedirs(out, exist_ok=True)
    write_json_atomic(path, record)
    if log is not None:
        log(
            f"{name:22s} seed {seed}  acc {100 * record['accuracy']:6.2f}  density "
            f"{record['density']:.4f}  MACs {record['macs']:,}  {record['fit_seconds']:6.1f} s"
        )
    return record, True


# ------------------------------------------------------------------------ report


def summarise(records, rows=None):
    """Mean ± std (ddof=1) of the accuracy in % per row, in the order of ``rows``."""
    rows = ROWS if rows is None else rows
    out = []
    names = list(rows) + sorted({r["row"] for r in records} - set(rows))
    for name in names:
        rs = sorted((r for r in records if r["row"] == name), key=lambda r: r["seed"])
        if not rs:
            continue
        acc = 100 * np.array([r["accuracy"] for r in rs], dtype=np.float64)
        target = rs[0].get("target")
        out.append(
            {
                "row": name,
                "label": rs[0]["label"],
                "dataset": rs[0]["dataset"],
                "seeds": [r["seed"] for r in rs],
                "n_seeds": len(rs),
                "accuracy_mean": float(acc.mean()),
                "accuracy_std": float(acc.std(ddof=1)) if len(rs) > 1 else float("nan"),
                "density_mean": float(np.mean([r["density"] for r in rs])),
                "macs_mean": float(np.mean([r["macs"] for r in rs])),
                "dense_macs": sorted({int(r["dense_macs"]) for r in rs}),
                "matched_width": sorted({r["matched_width"] for r in rs if "matched_width" in r}),
                "target_macs_mean": (
                    float(np.mean([r["target_macs"] for r in rs])) if "target_macs" in rs[0]
                    else None
                ),
                "fit_seconds_mean": float(np.mean([r["fit_seconds"] for r in rs])),
                "epoch_seconds_median": float(
                    np.median([e for r in rs for e in r.get("epoch_seconds", [])] or [np.nan])
                ),
                "target": target,
                "target_met": None if target is None else bool(acc.mean() >= target),
            }
        )  # fmt: skip
    return out


def _macs_text(m):
    return f"{m / 1e6:.2f} M" if m >= 1e5 else f"{m / 1e3:.1f} k"


def markdown(summary, epochs, finetune_epochs):
    """The markdown table of :func:`summarise`'s rows."""
    lines = [
        "# Accuracy of channel-sparse CNN training (cpusparse SparseCNNClassifier)",
        "",
        f"{epochs} sparse + {finetune_epochs} fine-tuning epochs for every row; "
        "SparseCNNClassifier defaults otherwise (batch 64, Adam lr 0.01, score lr 0.05, "
        "K = 2, VR-PGE, channel masks, prune_first). MNIST-5k: 80/20 stratified split "
        "with the seed as split seed; MNIST-1D: official split. Test accuracy in %, mean ± "
        "std (ddof=1) over the seeds. MACs: forward multiply-adds per sample with the fixed "
        "masks (a convolution: kept filters x live input channels x kh x kw x H_out x W_out); "
        "'dense MACs' is the same architecture with every channel. Density = kept fraction "
        "of the prunable channels (`density_`). s / epoch: median epoch of the row's fits, one "
        "thread, on a shared 2-core machine (indicative only). Built by "
        "`python benchmarks/cnn_accuracy.py --report`.",
        "",
        "| row | data | test accuracy (%) | seeds | target | density | MACs (kept) | "
        "dense MACs | s / epoch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        std = "" if math.isnan(s["accuracy_std"]) else f" ± {s['accuracy_std']:.2f}"
        target = ""
        if s["target"] is not None:
            target = f"≥ {s['target']:g}: " + ("met" if s["target_met"] else "**not met**")
        label = s["label"]
        if s["matched_width"]:
            w = s["matched_width"]
            label += f" (width{'s' if len(w) > 1 else ''} {', '.join(map(str, w))}"
            label += f"; matched to {_macs_text(s['target_macs_mean'])})"
        dense = ", ".join(_macs_text(m) for m in s["dense_macs"])
        lines.append(
            f"| {label} | {s['dataset']} | {s['accuracy_mean']:.2f}{std} | {s['n_seeds']} | "
            f"{target} | {s['density_mean']:.3f} | {_macs_text(s['macs_mean'])} | {dense} | "
            f"{s['epoch_seconds_median']:.1f} |"
        )
    lines += [
        "",
        "Same-cost rows: the dense VGG (w, 2w, 4w), or MLP (h, h), whose forward MACs are "
        "closest to the kept MACs of the same seed's sparse fit (its width per seed in "
        "parentheses). The random-mask row trains the weights only, for all epochs, on "
        "floor(0.25 n) channels drawn uniformly over all prunable layers.",
        "",
    ]
    return "\n".join(lines)


def load_records(out, epochs, finetune_epochs):
    """The records of the cells under ``out`` run with these epochs."""
    records = []
    for path in sorted(glob.glob(os.path.join(out, "*.json"))):
        record = read_cell(path)
        if record is None:
            continue
        if record["epochs"] == epochs and record["finetune_epochs"] == finetune_epochs:
            records.append(record)
    return records


def source_counts(records):
    """Number of cells per cpusparse source digest (None: not recorded)."""
    counts = {}
    for record in records:
        key = record.get("cpusparse_source")
        counts[key] = counts.get(key, 0) + 1
    return counts


def write_report(out, report_path, epochs, finetune_epochs, rows=None):
    """Build the markdown (and a JSON summary) from the cells; return the markdown."""
    records = load_records(out, epochs, finetune_epochs)
    summary = summarise(records, rows)
    text = markdown(summary, epochs, finetune_epochs)
    sources = source_counts(records)
    if len(sources) > 1 or None in sources:
        parts = [
            f"{n} cell{'s' if n > 1 else ''} with {'an unrecorded version' if k is None else k}"
            for k, n in sources.items()
        ]
        text += (
            "cpusparse sources (SHA-256 prefix of the package's .py files, read when the "
            f"run started): {'; '.join(parts)}. Cells of different versions may be mixed in "
            "this table (if the versions differ in anything that changes a fit).\n"
        )
    directory = os.path.dirname(os.path.abspath(report_path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".md")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, report_path)
    write_json_atomic(
        os.path.splitext(report_path)[0] + ".json",
        {
            "epochs": epochs,
            "finetune_epochs": finetune_epochs,
            "summary": summary,
            "sources": {str(k): n for k, n in sources.items()},
        },
    )
    return text


# -------------------------------------------------------------------------- main


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS))
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--epochs", type=int, help="sparse epochs (default: the estimator's 12)")
    parser.add_argument(
        "--finetune-epochs", type=int, help="fine-tuning epochs (default: the estimator's 3)"
    )
    parser.add_argument(
        "--stop-after",
        type=float,
        default=None,
        metavar="MINUTES",
        help="start no new cell after this many minutes",
    )
    parser.add_argument("--out", default=DEFAULT_OUT, help="directory of the cells' JSON files")
    parser.add_argument(
        "--report", action="store_true", help="also build the markdown table at the end"
    )
    parser.add_argument("--report-only", action="store_true", help="only build the table")
    parser.add_argument(
        "--report-file", default=None, help="markdown path (default: <out>/../accuracy.md)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="smoke run: seed 0, 1 + 1 epochs, under <out>/quick"
    )
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    from cpusparse import SparseCNNClassifier

    source_digest()  # the sources as imported now
    defaults = SparseCNNClassifier().get_params()
    if args.quick:
        args.seeds = [0]
        args.epochs = 1 if args.epochs is None else args.epochs
        args.finetune_epochs = 1 if args.finetune_epochs is None else args.finetune_epochs
        args.out = os.path.join(args.out, "quick")
    epochs = defaults["max_iter"] if args.epochs is None else args.epochs
    finetune = defaults["finetune_iter"] if args.finetune_epochs is None else args.finetune_epochs
    if epochs < 1 or finetune < 0:
        parser.error(f"--epochs must be >= 1 and --finetune-epochs >= 0, got {epochs}, {finetune}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out must be a directory, got the file {args.out!r}")
    report_file = args.report_file or os.path.join(
        os.path.dirname(os.path.abspath(args.out)),
        "accuracy_quick.md" if args.quick else "accuracy.md",
    )
    if args.report_only:
        print(write_report(args.out, report_file, epochs, finetune))
        return 0
    os.makedirs(args.out, exist_ok=True)

    from tqdm.auto import tqdm

    cells = [(row, seed) for seed in args.seeds for row in args.rows]
    t_start = time.perf_counter()
    bar = tqdm(cells, file=sys.stderr, unit="cell", dynamic_ncols=True)
    stopped = False
    try:
        for row, seed in bar:
            bar.set_postfix_str(f"{row} seed {seed}")
            if (
                args.stop_after is not None
                and (time.perf_counter() - t_start) / 60 > args.stop_after
            ):
                if not os.path.exists(cell_path(args.out, row, seed, epochs, finetune)):
                    stopped = True
                    break
            record, ran = run_cell(row, seed, args.out, epochs, finetune, log=bar.write)
            if not ran:
                bar.write(
                    f"{row:22s} seed {seed}  done before (acc {100 * record['accuracy']:.2f})"
                )
    except KeyboardInterrupt:
        print(
            "\ninterrupted: finished cells are saved; rerun the same command to resume",
            file=sys.stderr,
        )
        return 1
    finally:
        bar.close()
    if stopped:
        print(f"--stop-after {args.stop_after} min reached: rerun to continue", file=sys.stderr)
    if args.report:
        print(write_report(args.out, report_file, epochs, finetune))
    return 0


if __name__ == "__main__":
    sys.exit(main())
