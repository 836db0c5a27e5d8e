"""Wall time of a sweep on a LocalCluster of 1 worker against 2 (or more), same cells.

Runs the cells of a grid file (optionally only those of some data sets) into fresh
temporary directories, once per worker count, interleaved over the repeats, and
reports the median wall time of each and the speed-up against 1 worker. The whole
``run_grid`` is timed: the cluster's start, the workers' imports and data loading and
every fit. Records of the runs are compared too: they must agree bit for bit.

Usage::

    python benchmarks/sweep_speedup.py [--grid benchmarks/grids/estimators_mlp.toml]
        [--datasets digits] [--workers 1 2] [--repeats 1]
        [--out benchmarks/results/sweep/speedup.md]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from cpusparse.sweep import load_grid, run_grid  # noqa: E402
from cpusparse.sweep.run import TIMING_FIELDS  # noqa: E402
from cpusparse.tools.bench import machine_info  # noqa: E402


def comparable(record):
    """A record without its timings and worker (what must not depend on the workers)."""
    out = {k: v for k, v in record.items() if k not in TIMING_FIELDS}
    out["epochs"] = [
        {k: v for k, v in e.items() if k not in TIMING_FIELDS} for e in record.get("epochs", [])
    ]
    return out


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", default=os.path.join(HERE, "grids", "estimators_mlp.toml"))
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=["digits"],
        help="only the cells of these data sets ('all': every cell)",
    )
    parser.add_argument("--workers", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", default=os.path.join(HERE, "results", "sweep", "speedup.md"))
    args = parser.parse_args(argv)

    grid = load_grid(args.grid)
    cells = [c for c in grid.cells if "all" in args.datasets or c.dataset in args.datasets]
    seconds = {w: [] for w in args.workers}
    records = {}
    for _ in range(args.repeats):
        for w in args.workers:
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.perf_counter()
                got = run_grid(cells, tmp, n_workers=w, progress=False)
                seconds[w].append(time.perf_counter() - t0)
            records.setdefault(w, [comparable(r) for r in got])
            print(f"{w} worker(s): {seconds[w][-1]:.1f} s for {len(cells)} cells", flush=True)
    base = args.workers[0]
    same = all(records[w] == records[base] for w in args.workers)
    failed = sum(r["status"] != "ok" for r in records[base])
    median = {w: float(np.median(s)) for w, s in seconds.items()}
    lines = [
        "# Sweep wall time against the number of workers",
        "",
        f"Grid `{os.path.relpath(args.grid, os.path.dirname(HERE))}`, data sets "
        f"{', '.join(args.datasets)}: {len(cells)} cells ({failed} failed). A LocalCluster "
        "of N worker processes with one thread each; the whole `run_grid` timed (cluster "
        "start, imports, data loading, every fit). Median of "
        f"{args.repeats} run(s), interleaved. Records equal bit for bit across worker "
        f"counts (timings aside): {'yes' if same else '**no**'}.",
        "",
        "| workers | wall time (s) | speed-up vs " + f"{base} |",
        "|---:|---:|---:|",
    ]
    for w in args.workers:
        lines.append(f"| {w} | {median[w]:.1f} | {median[base] / median[w]:.2f}x |")
    info = machine_info()
    lines += ["", f"Machine: {json.dumps(info, sort_keys=True)}", ""]
    text = "\n".join(lines)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)
    print(text)
    return 0 if same and not failed else 1


if __name__ == "__main__":
    sys.exit(main())
