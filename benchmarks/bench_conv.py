"""Benchmark one convolution layer step of cpusparse against ``torch.nn.Conv2d``.

The convolution rows of ``cpusparse bench`` on their own (the code is
:func:`cpusparse.tools.bench.run_conv`): forward, input gradient and weight gradient
of a 128 -> 128 3 x 3 padding-1 float32 convolution on 14 x 14, batch 128, without
bias, for

- PyTorch dense ``torch.nn.Conv2d`` (the baseline; without PyTorch the rows have
  no ratio);
- cpusparse channel granularity at densities 1.0 (the dense engine convolution),
  0.5 and 0.25 of the output and of the input channels (``d**2`` of the
  multiply-adds);
- cpusparse weight granularity with a random mask keeping 1/16 of the weights (the
  multiply-adds of channel 0.25);

then the peak memory (tracemalloc) and time of a weight-granularity step of a 64 ->
64 convolution on 28 x 28, batch 256, with the im2col matrix chunked at the default
``max_cols_bytes`` and in one chunk. Every method and thread count is timed in the
same interleaved rounds; medians; ratios from the same run.

Usage::

    python benchmarks/bench_conv.py [--quick] [--threads 1 [2 ...]] [--repeats N]
                                    [--no-memory] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cpusparse.tools import bench  # noqa: E402


def main(argv=None):
    """Command-line entry point; prints the markdown of the rows."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"{bench.QUICK_CONV_REPEATS} repetitions, {bench.QUICK_CONV_MEMORY_REPEATS} "
        "for the memory rows",
    )
    parser.add_argument(
        "--threads",
        type=bench._threads,
        nargs="+",
        default=[1],
        metavar="N",
        help="Numba/BLAS/torch threads: ints or 'all'; several are interleaved (default 1)",
    )
    parser.add_argument(
        "--repeats",
        type=bench.int_at_least(1),
        default=None,
        help=f"interleaved repetitions (default {bench.CONV_REPEATS})",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the memory rows")
    parser.add_argument("--json", default=None, help="also write the result to this file")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = bench.QUICK_CONV_REPEATS if args.quick else bench.CONV_REPEATS
    memory_repeats = bench.QUICK_CONV_MEMORY_REPEATS if args.quick else bench.CONV_MEMORY_REPEATS
    bench._quiet_openmp(args.threads)  # before PyTorch is imported

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    conv = bench.run_conv(
        repeats=args.repeats,
        thread_counts=args.threads,
        memory=not args.no_memory,
        memory_repeats=memory_repeats,
        log=log,
    )
    info = bench.machine_info(args.threads[0] if len(args.threads) == 1 else None)
    print(bench.format_conv(conv))
    print("Machine: " + ", ".join(f"{k}={v}" for k, v in info.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"conv": conv, "machine": info}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
