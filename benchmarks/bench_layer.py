"""Benchmark one sparse layer step against dense NumPy/BLAS.

A layer step is the forward product, the input gradient and the weight gradient:

- sparse: ``select_active`` from an entry mask, ``masked_matmul`` and
  ``masked_matmul_backward(need_dx=True)`` (the private, unvalidated entry points
  that :class:`cpusparse.engine.layers.SparseLinear` calls);
- dense: ``W @ x``, ``W.T @ dout`` and ``dout @ x.T`` with BLAS (feature-major
  activations, as in cpusparse), i.e. the three GEMMs of a dense layer and nothing
  else.

Dense and sparse repetitions are interleaved, medians are reported and every ratio
comes from the same run. ``FLOP limit`` is ``1 / density``: the speed-up if the
sparse step ran at the dense step's FLOP rate.

Usage::

    python benchmarks/bench_layer.py [--quick] [--threads N] [--dtype float32]
                                     [--json PATH] [--pieces]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cpusparse.tools.bench import interleaved_times, machine_info  # noqa: E402

DENSITIES = (0.5, 0.2, 0.1, 0.05, 0.01)


def _setup(n_out, n_in, n_batch, density, mask_keep, dtype, rng):
    from cpusparse.engine import csr

    stored = min(1.0, density / mask_keep)
    indptr, indices = csr.random_pattern((n_out, n_in), stored, rng=rng)
    data = rng.standard_normal(indices.shape[0]).astype(dtype)
    if mask_keep >= 1.0:
        entry_mask = np.ones(indices.shape[0], dtype=bool)
    else:
        entry_mask = rng.random(indices.shape[0]) < mask_keep
    weight = csr.to_dense(indptr, indices, data, (n_out, n_in), entry_mask=entry_mask)
    bias = rng.standard_normal(n_out).astype(dtype)
    x = rng.standard_normal((n_in, n_batch)).astype(dtype)
    dout = rng.standard_normal((n_out, n_batch)).astype(dtype)
    return indptr, indices, data, entry_mask, weight, bias, x, dout


def _step_funcs(csr, indptr, indices, data, shape, entry_mask, weight, bias, x, dout, pieces):
    """The timed callables: the dense and sparse steps, and optionally the pieces."""

    def select():
        return csr._select_active(indptr, indices, data, shape, entry_mask, None, None)

    def sparse_step():
        active = select()
        csr._masked_matmul(active, x, bias, False)
        return csr._masked_matmul_backward(active, x, dout, None, False, True)

    def dense_step():
        weight @ x
        weight.T @ dout
        return dout @ x.T

    funcs = {"dense": dense_step, "sparse": sparse_step}
    if pieces:
        active = select()
        funcs["select_active"] = select
        funcs["forward"] = lambda: csr._masked_matmul(active, x, bias, False)
        funcs["dweight"] = lambda: csr._masked_matmul_backward(active, x, dout, None, False, False)
        funcs["dweight+dx"] = lambda: csr._masked_matmul_backward(
            active, x, dout, None, False, True
        )
    return funcs


def run(args):
    """Run the benchmark; return the rows of the table as dicts."""
    import numba
    from threadpoolctl import threadpool_limits

    from cpusparse.engine import csr

    numba.set_num_threads(args.threads)
    dtype = np.dtype(args.dtype)
    n_out = n_in = args.size
    shape = (n_out, n_in)
    rng = np.random.default_rng(0)
    rows = []
    with threadpool_limits(limits=args.threads, user_api="blas"):
        for density in args.densities:
            indptr, indices, data, entry_mask, weight, bias, x, dout = _setup(
                n_out, n_in, args.batch, density, args.mask_keep, dtype, rng
            )

            funcs = _step_funcs(
                csr,
                indptr,
                indices,
                data,
                shape,
                entry_mask,
                weight,
                bias,
                x,
                dout,
                args.pieces,
            )
            times = interleaved_times(funcs, repeats=args.repeats, warmup=3)
            med = {name: float(np.median(t)) for name, t in times.items()}
            ratios = [d / s for d, s in zip(times["dense"], times["sparse"], strict=True)]
            row = {
                "density": density,
                "n_active": int(np.count_nonzero(entry_mask)),
                "dense_ms": 1e3 * med["dense"],
                "sparse_ms": 1e3 * med["sparse"],
                "ratio": med["dense"] / med["sparse"],
                "ratio_iqr": [float(np.percentile(ratios, 25)), float(np.percentile(ratios, 75))],
                "flop_limit": 1.0 / density,
            }
            if args.pieces:
                row["pieces_ms"] = {
                    k: 1e3 * v for k, v in med.items() if k not in ("dense", "sparse")
                }
            rows.append(row)
    return rows


def format_table(rows, info, args):
    """The markdown report: machine header and one line per density."""
    lines = [
        f"Layer {args.size}x{args.size}, batch {args.batch}, {args.dtype}, "
        f"{args.threads} thread(s), mask keeps {args.mask_keep:g} of the stored entries, "
        f"medians of {args.repeats} interleaved repetitions",
        "",
        "Machine: " + ", ".join(f"{k}={v}" for k, v in info.items()),
        "",
        "| density | n_active | dense ms | sparse ms | ratio | FLOP limit |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['density']:g} | {r['n_active']} | {r['dense_ms']:.3f} | "
            f"{r['sparse_ms']:.3f} | {r['ratio']:.1f}x | {r['flop_limit']:.0f}x |"
        )
    if args.pieces:
        lines += ["", "| density | " + " | ".join(rows[0]["pieces_ms"]) + " |"]
        lines.append("|---:" * (1 + len(rows[0]["pieces_ms"])) + "|")
        for r in rows:
            lines.append(
                f"| {r['density']:g} | "
                + " | ".join(f"{v:.3f} ms" for v in r["pieces_ms"].values())
                + " |"
            )
    return "\n".join(lines)


def main(argv=None):
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    parser.add_argument("--size", type=int, default=1024, help="n_in = n_out")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument(
        "--densities", type=float, nargs="+", default=list(DENSITIES), help="active fractions"
    )
    parser.add_argument(
        "--mask-keep",
        type=float,
        default=1.0,
        help="fraction of the stored entries the entry mask keeps (the pattern is "
        "stored at density / mask_keep); 1.0 keeps all",
    )
    parser.add_argument("--pieces", action="store_true", help="also time each piece")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 15 if args.quick else 60
    rows = run(args)
    info = machine_info(args.threads)
    print(format_table(rows, info, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "args": vars(args), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
