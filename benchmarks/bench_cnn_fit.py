"""Whole-fit speed of SparseCNNClassifier against PyTorch dense training of the same CNN.

Times ``SparseCNNClassifier(architecture=..., widths=..., density=...,
granularity="channel", n_jobs=1).fit`` on MNIST-5k (80/20 stratified split, seed 0;
``X`` of shape (n, 784) in [0, 1], inferred input 1x28x28) per epoch, after a JIT
warm-up, against PyTorch training loops (Adam, cross-entropy, a new shuffle every
epoch, one intra-op thread) in the same process, interleaved, with the same batch
size and epochs:

- ``torch-dense``: the dense network of the same architecture,
  ``cpusparse.export.to_torch(cpusparse.models.vgg(...), masks=None)`` (conv 3x3
  without bias + batch norm + ReLU, twice per stage, 2x2 max pools between stages,
  global average pool, linear), re-initialised with PyTorch's own defaults;
- ``torch-narrow``: the honest alternative, PyTorch training the dense *narrow*
  network of the channels that fit actually kept: ``to_torch(clf.network_,
  clf.masks_)`` (every convolution as wide as its kept channels, as
  :func:`cpusparse.export.narrow` builds it), re-initialised and trained from
  scratch;

for a VGG (the target: cpusparse at least 3x faster than ``torch-dense``)
and a ResNet of the same widths and density (no target). The cpusparse fit runs
``max_iter=epochs`` sparse epochs and no fine-tuning (``finetune_iter=0``); its
epoch times are ``clf.history_[i]["seconds"]``, PyTorch's are timed around each
epoch the same way. Each row's figure is the median over the repeats of the run's
mean epoch (never the best); ratios are ``torch-dense / row`` from the same run.
Test accuracies are after these few epochs only (not a full fit).

``--profile`` instead runs cProfile on one cpusparse VGG epoch and writes the top 15
functions by cumulative time.

Usage::

    python benchmarks/bench_cnn_fit.py [--quick] [--epochs 3] [--repeats 3]
        [--widths 64 128 256] [--density 0.25] [--batch-size 64]
        [--architectures vgg resnet] [--n-train N] [--profile]
        [--out benchmarks/results/cnn]
"""

from __future__ import annotations

import os

# One thread per library, before NumPy, Numba and PyTorch are imported.
# (As a script only: imported, e.g. by the tests, it leaves the process's settings alone;
# Numba refuses a new thread count once its threads run.)
if __name__ == "__main__":
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS"):
        os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DEFAULT_OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "cnn")
ARCHITECTURES = ("vgg", "resnet")
TARGET_SPEEDUP = 3.0  # cpusparse VGG vs PyTorch dense VGG, per epoch
TORCH_LR = 1e-3
QUICK_WIDTHS = (4, 8, 16)
QUICK_N_TRAIN = 256
WARMUP_SAMPLES = 256
WARMUP_BATCH = 32
SEED = 0


def _write_atomic(path, text):
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _peak_rss_mb():
    # ru_maxrss is in KiB on Linux; it is the peak of the whole process so far.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_data(n_train=None, seed=SEED):
    """MNIST-5k split 80/20 (stratified, ``seed``); optionally the first ``n_train``."""
    from cpusparse.tools.bench import fit_data

    data = fit_data("mnist5k", seed=seed)
    if n_train is not None:
        n_test = max(1, n_train // 4)
        data = data._replace(
            x_train=data.x_train[:n_train],
            y_train=data.y_train[:n_train],
            x_test=data.x_test[:n_test],
            y_test=data.y_test[:n_test],
        )
    return data


def _classifier(architecture, widths, density, batch_size, epochs, seed=SEED):
    from cpusparse import SparseCNNClassifier

    return SparseCNNClassifier(
        architecture=architecture,
        widths=tuple(widths),
        density=density,
        granularity="channel",
        batch_size=batch_size,
        max_iter=epochs,
        finetune_iter=0,
        n_jobs=1,
        random_state=seed,
    )


def fit_cpusparse(data, architecture, widths, density, batch_size, epochs, seed=SEED):
    """One timed fit; the epochs' seconds from ``history_``; the fitted classifier."""
    clf = _classifier(architecture, widths, density, batch_size, epochs, seed)
    t0 = time.perf_counter()
    clf.fit(data.x_train, data.y_train)
    total = time.perf_counter() - t0
    run = {
        "total_s": total,
        "epoch_s": [float(r["seconds"]) for r in clf.history_],
        "test_accuracy": float(clf.score(data.x_test, data.y_test)),
    }
    return run, clf


def torch_dense_model(architecture, widths, input_shape, n_classes, seed=SEED):
    """The dense PyTorch network of the architecture (cpusparse's builder, exported)."""
    from cpusparse import models
    from cpusparse.export import to_torch

    build = models.vgg if architecture == "vgg" else models.resnet
    net = build(tuple(widths), input_shape, n_classes, granularity="channel", rng=seed)
    return _reinit(to_torch(net, None), seed)


def torch_narrow_model(clf, seed=SEED):
    """The dense narrow network of the channels ``clf`` kept, freshly initialised."""
    from cpusparse.export import to_torch

    return _reinit(to_torch(clf.network_, clf.masks_), seed)


def _reinit(model, seed):
    import torch

    torch.manual_seed(seed)
    for module in model.modules():
        if hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return model.train()


def conv_widths(model):
    """Output channels of every ``torch.nn.Conv2d`` of ``model``, in order."""
    import torch

    return [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]


def fit_torch(model, data, input_shape, batch_size, epochs, seed=SEED, lr=TORCH_LR):
    """Train ``model`` (Adam, cross-entropy); seconds of each epoch, test accuracy."""
    import torch

    x = torch.from_numpy(
        np.ascontiguousarray(data.x_train, dtype=np.float32).reshape(-1, *input_shape)
    )
    y = torch.from_numpy(np.asarray(data.y_train, dtype=np.int64))
    t0 = time.perf_counter()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    n = x.shape[0]
    epoch_s = []
    model.train()
    for _ in range(epochs):
        e0 = time.perf_counter()
        order = torch.randperm(n, generator=gen)
        for i in range(0, n, batch_size):
            idx = order[i : i + batch_size]
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            loss.backward()
            opt.step()
        epoch_s.append(time.perf_counter() - e0)
    total = time.perf_counter() - t0
    model.eval()
    xt = np.ascontiguousarray(data.x_test, dtype=np.float32).reshape(-1, *input_shape)
    with torch.no_grad():
        pred = model(torch.from_numpy(xt)).argmax(1).numpy()
    accuracy = float((pred == np.asarray(data.y_test)).mean())
    return {"total_s": total, "epoch_s": epoch_s, "test_accuracy": accuracy}


def warm_up(data, architectures, input_shape, use_torch):
    """Compile the Numba kernels (and warm PyTorch) on a tiny fit of each architecture."""
    tiny = data._replace(
        x_train=data.x_train[:WARMUP_SAMPLES],
        y_train=data.y_train[:WARMUP_SAMPLES],
        x_test=data.x_test[:64],
        y_test=data.y_test[:64],
    )
    for arch in architectures:
        _, clf = fit_cpusparse(tiny, arch, (4, 8, 16), 0.5, WARMUP_BATCH, 1)
        if use_torch:
            model = torch_dense_model(arch, (4, 8, 16), input_shape, data.n_classes)
            fit_torch(model, tiny, input_shape, WARMUP_BATCH, 1)
            fit_torch(torch_narrow_model(clf), tiny, input_shape, WARMUP_BATCH, 1)


def _median_row(runs):
    per_epoch = [sum(r["epoch_s"]) / len(r["epoch_s"]) for r in runs]
    n_epochs = min(len(r["epoch_s"]) for r in runs)
    return {
        "per_epoch_s": statistics.median(per_epoch),
        "per_epoch_s_runs": per_epoch,
        "epoch_s_median": [
            statistics.median(r["epoch_s"][e] for r in runs) for e in range(n_epochs)
        ],
        "total_s": statistics.median(r["total_s"] for r in runs),
        "test_accuracy": statistics.median(r["test_accuracy"] for r in runs),
        "runs": runs,
    }


def run(args, log=print):
    """Time every row, interleaved over the repeats; return the JSON result."""
    from benchmarks.cnn_accuracy import source_digest
    from cpusparse.tools.bench import _set_threads, machine_info

    use_torch = _torch_available()
    _set_threads(1)
    data = load_data(args.n_train)
    input_shape = (1, 28, 28)
    log(f"data: {data.x_train.shape[0]} train / {data.x_test.shape[0]} test samples")
    warm_up(data, args.architectures, input_shape, use_torch)
    rss_after_warmup = _peak_rss_mb()

    runs = {}  # row key -> list of runs
    meta = {}  # row key -> facts of the row
    peaks = {}
    for rep in range(args.repeats):
        for arch in args.architectures:
            run_cs, clf = fit_cpusparse(
                data, arch, args.widths, args.density, args.batch_size, args.epochs
            )
            key = f"cpusparse-{arch}"
            runs.setdefault(key, []).append(run_cs)
            kept = [r["active"] for r in clf.layer_densities() if r["prunable"]]
            units = [r["n_units"] for r in clf.layer_densities() if r["prunable"]]
            meta.setdefault(key, {"kept_channels_per_run": []})
            meta[key].update(
                architecture=arch,
                widths=list(args.widths),
                kind="cpusparse",
                density=args.density,
                units=units,
            )
            meta[key]["kept_channels_per_run"].append(kept)
            meta[key]["density_per_run"] = meta[key].get("density_per_run", []) + [
                float(clf.density_)
            ]
            peaks.setdefault(key, _peak_rss_mb())
            log(
                f"[{rep + 1}/{args.repeats}] {key:18s} {np.mean(run_cs['epoch_s']):7.2f} s/epoch"
                f"  acc {run_cs['test_accuracy']:.3f}  kept {kept}"
            )
            if not use_torch:
                continue
            model = torch_dense_model(arch, args.widths, input_shape, data.n_classes)
            key = f"torch-dense-{arch}"
            run_t = fit_torch(model, data, input_shape, args.batch_size, args.epochs)
            runs.setdefault(key, []).append(run_t)
            meta[key] = {
                "architecture": arch,
                "kind": "torch-dense",
                "conv_widths": conv_widths(model),
            }
            peaks.setdefault(key, _peak_rss_mb())
            log(
                f"[{rep + 1}/{args.repeats}] {key:18s} {np.mean(run_t['epoch_s']):7.2f} s/epoch"
                f"  acc {run_t['test_accuracy']:.3f}"
            )
            model = torch_narrow_model(clf)
            key = f"torch-narrow-{arch}"
            run_n = fit_torch(model, data, input_shape, args.batch_size, args.epochs)
            runs.setdefault(key, []).append(run_n)
            meta.setdefault(key, {"conv_widths_per_run": []})
            meta[key].update(architecture=arch, kind="torch-narrow")
            meta[key]["conv_widths_per_run"].append(conv_widths(model))
            peaks.setdefault(key, _peak_rss_mb())
            log(
                f"[{rep + 1}/{args.repeats}] {key:18s} {np.mean(run_n['epoch_s']):7.2f} s/epoch"
                f"  acc {run_n['test_accuracy']:.3f}  convs {conv_widths(model)}"
            )

    rows = []
    for key, rs in runs.items():
        row = {"row": key, **meta[key], **_median_row(rs)}
        row["process_peak_rss_mb_after_first_run"] = peaks[key]
        dense = runs.get(f"torch-dense-{meta[key]['architecture']}")
        if dense:
            ref = _median_row(dense)["per_epoch_s"]
            row["torch_dense_over_row"] = ref / row["per_epoch_s"]
        rows.append(row)
    info = machine_info(1)
    info["blas_numpy"] = _numpy_blas()
    return {
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
        "settings": {
            "widths": list(args.widths),
            "density": args.density,
            "granularity": "channel",
            "batch_size": args.batch_size,
            "epochs": args.epochs,
            "repeats": args.repeats,
            "architectures": list(args.architectures),
            "n_train": int(data.x_train.shape[0]),
            "n_test": int(data.x_test.shape[0]),
            "torch_lr": TORCH_LR,
            "cpusparse_lr": _classifier("vgg", (1,), 1.0, 1, 1).learning_rate_init,
            "threads": 1,
            "quick": bool(args.quick),
        },
        "machine": info,
        "cpusparse_source": source_digest(),
        "process_peak_rss_mb_after_warmup": rss_after_warmup,
        "process_peak_rss_mb": _peak_rss_mb(),
        "target": {"row": "cpusparse-vgg", "min_torch_dense_over_row": TARGET_SPEEDUP},
        "rows": rows,
    }


def _torch_available():
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def _numpy_blas():
    # The BLAS NumPy was built with (numpy.show_config's "Build Dependencies").
    try:
        config = np.show_config(mode="dicts")
        blas = config["Build Dependencies"]["blas"]
        return f"{blas.get('name')} {blas.get('version')}"
    except Exception:  # noqa: BLE001 - older NumPy: no dict mode
        return None


LABELS = {
    "cpusparse": "cpusparse, channel density {density:g}",
    "torch-dense": "PyTorch dense, same architecture",
    "torch-narrow": "PyTorch dense narrow (kept channels)",
}


def markdown(result):
    """The markdown report of :func:`run`'s result."""
    s = result["settings"]
    lines = [
        "# Whole-fit speed: SparseCNNClassifier vs PyTorch (one thread)",
        "",
        f"Command: `{result['command']}`",
        "",
        f"MNIST-5k ({s['n_train']} training / {s['n_test']} test images, 1x28x28), widths "
        f"{tuple(s['widths'])}, channel density {s['density']:g}, batch {s['batch_size']}, "
        f"{s['epochs']} epochs per fit, {s['repeats']} interleaved repeats; seconds per epoch "
        "are the median over the repeats of each run's mean epoch (after a JIT warm-up fit). "
        f"cpusparse: `finetune_iter=0`, Adam lr {s['cpusparse_lr']}; PyTorch: Adam lr "
        f"{s['torch_lr']}, `torch.set_num_threads(1)`. Ratio = PyTorch dense s/epoch / row "
        "s/epoch (above 1: faster than PyTorch dense). Test accuracy after these few epochs "
        "only (median). Peak RSS: the whole process's peak (getrusage) when the row first "
        "finished, so it only grows down the table.",
        "",
        "| row | architecture | s / epoch | PyTorch dense / row | test acc | kept / conv "
        "channels | process peak RSS (MB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        label = LABELS[row["kind"]].format(density=s["density"])
        ratio = row.get("torch_dense_over_row")
        if row["kind"] == "cpusparse":
            chans = " / ".join(str(k) for k in row["kept_channels_per_run"][0])
            chans += f" of {' / '.join(str(u) for u in row['units'])}"
        elif row["kind"] == "torch-narrow":
            chans = " / ".join(str(k) for k in row["conv_widths_per_run"][0])
        else:
            chans = " / ".join(str(k) for k in row["conv_widths"])
        lines.append(
            f"| {label} | {row['architecture']} | {row['per_epoch_s']:.2f} | "
            f"{'' if ratio is None else f'{ratio:.2f}x'} | {row['test_accuracy']:.3f} | "
            f"{chans} | {row['process_peak_rss_mb_after_first_run']:.0f} |"
        )
    target = next((r for r in result["rows"] if r["row"] == "cpusparse-vgg"), None)
    lines.append("")
    if target is not None and target.get("torch_dense_over_row") is not None:
        met = target["torch_dense_over_row"] >= TARGET_SPEEDUP
        lines.append(
            f"Target (cpusparse VGG >= {TARGET_SPEEDUP:g}x PyTorch dense per epoch): "
            f"{target['torch_dense_over_row']:.2f}x, {'met' if met else '**not met**'}."
        )
        lines.append("")
    m = result["machine"]
    lines.append("Machine: " + ", ".join(f"{k}={v}" for k, v in m.items()))
    lines.append("")
    return "\n".join(lines)


def profile_epoch(args, path):
    """cProfile of one cpusparse VGG epoch (after a warm-up): top 15 by cumulative and own time."""
    import cProfile
    import io
    import pstats

    from benchmarks.cnn_accuracy import source_digest
    from cpusparse.tools.bench import _set_threads

    _set_threads(1)
    data = load_data(args.n_train)
    warm_up(data, ["vgg"], (1, 28, 28), use_torch=False)
    clf = _classifier("vgg", args.widths, args.density, args.batch_size, 1)
    profiler = cProfile.Profile()
    profiler.enable()
    clf.fit(data.x_train, data.y_train)
    profiler.disable()
    buf = io.StringIO()
    stats = pstats.Stats(profiler, stream=buf)
    stats.sort_stats("cumulative").print_stats(15)
    stats.sort_stats("tottime").print_stats(15)
    text = (
        f"cProfile of one epoch of SparseCNNClassifier(vgg, widths={tuple(args.widths)}, "
        f"density={args.density}, channel, batch {args.batch_size}) on "
        f"{data.x_train.shape[0]} images; epoch {clf.history_[0]['seconds']:.2f} s "
        f"(under the profiler); cpusparse sources {source_digest()}\n\n" + buf.getvalue()
    )
    _write_atomic(path, text)
    return text


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs per fit (default 3)")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats (default 3)")
    parser.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--density", type=float, default=0.25)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--architectures", nargs="+", choices=ARCHITECTURES, default=ARCHITECTURES)
    parser.add_argument(
        "--n-train", type=int, default=None, help="use only the first N training images"
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: widths {QUICK_WIDTHS}, 1 epoch, 1 repeat, {QUICK_N_TRAIN} images",
    )
    parser.add_argument(
        "--profile", action="store_true", help="profile one cpusparse VGG epoch instead"
    )
    parser.add_argument("--out", default=DEFAULT_OUT, help="output directory")
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:
        args.widths, args.epochs, args.repeats = list(QUICK_WIDTHS), 1, 1
        args.n_train = args.n_train or QUICK_N_TRAIN
    for name in ("epochs", "repeats", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if not 0 < args.density <= 1:
        parser.error(f"--density must be in (0, 1], got {args.density}")
    if min(args.widths) < 1:
        parser.error(f"--widths must be positive, got {args.widths}")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        parser.error(f"--out must be a directory, got the file {args.out!r}")
    os.makedirs(args.out, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    if args.profile:
        print(profile_epoch(args, os.path.join(args.out, f"profile_vgg{suffix}.txt")))
        return 0

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    result = run(args, log=log)
    stem = os.path.join(args.out, f"bench_cnn_fit{suffix}")
    _write_atomic(stem + ".json", json.dumps(result, indent=2) + "\n")
    text = markdown(result)
    _write_atomic(stem + ".md", text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
