"""``cpusparse sweep``: run a grid file on Dask, resumably, and report it.

Examples
--------
A grid file that names an unknown key is a usage error (exit status 2), before any
fit starts:

>>> import pathlib, tempfile
>>> grid = pathlib.Path(tempfile.mkdtemp()) / "grid.toml"
>>> _ = grid.write_text("[[grid]]" + chr(10) + "densty = 0.1" + chr(10))
>>> main([str(grid)])
2
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence

from .._io import OutputPathError, check_output_path
from ..tools._options import int_at_least
from ..tools.cli import CommandError, UsageError, parse_args, run_command
from .grid import ESTIMATORS, Grid, GridError, load_grid
from .report import report_paths, write_report
from .run import INSTALL_HINT, SweepError, check_out, read_results, run_grid

__all__ = ["main", "build_parser"]

_EPILOG = f"""\
Estimators: {"; ".join(f"{k}: {v}" for k, v in ESTIMATORS.items())}.

Records are written under OUT/cells, one JSON file per cell, by this process (workers
on other hosts need no shared disk); a rerun skips the cells already finished. To run
on an existing Dask cluster, start `dask scheduler` and, on every worker host, `dask
worker tcp://HOST:8786 --nthreads 1` with the same cpusparse and its data extras
installed (`pip install 'cpusparse[distributed,mnist,mnist1d]'`), then pass
--scheduler tcp://HOST:8786 (or --scheduler-file). Dask itself: {INSTALL_HINT}.
"""


def build_parser() -> argparse.ArgumentParser:
    """The parser of ``cpusparse sweep``."""
    parser = argparse.ArgumentParser(
        prog="cpusparse sweep",
        description=(
            "Run a grid of fits (models, data sets, granularities, densities, estimators, "
            "K, seeds) on Dask and write one record per cell; --report turns the records "
            "into a markdown table and plots."
        ),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("grid", nargs="?", metavar="GRID.toml", help="the grid file")
    parser.add_argument(
        "--out",
        metavar="DIR",
        help="directory of the records and the report (default: sweep-<grid name>)",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument(
        "--scheduler",
        metavar="ADDRESS",
        help="an existing Dask scheduler, e.g. tcp://HOST:8786 (default: a LocalCluster)",
    )
    where.add_argument(
        "--scheduler-file", metavar="PATH", help="the scheduler file of an existing Dask scheduler"
    )
    where.add_argument(
        "--sequential",
        action="store_true",
        help="run the cells one after another in this process, without Dask",
    )
    parser.add_argument(
        "--workers",
        type=int_at_least(1),
        metavar="N",
        help="workers of the LocalCluster, one thread each (default: the number of cores)",
    )
    parser.add_argument(
        "--report",
        action="store_true",
        help="write the table and plots of the records (of GRID's cells, if given), run nothing",
    )
    parser.add_argument(
        "--dry-run", action="store_true", help="say how many cells would run, and run nothing"
    )
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``cpusparse sweep`` with ``argv`` (without the program name); return the status.

    0 when every cell finished; 1 when a cell failed (the others are recorded), Dask
    is missing or the scheduler cannot be reached; 2 for a usage error (a bad grid
    file naming its key, an output directory that cannot be written).
    """
    args_list = list(sys.argv[1:] if argv is None else argv)
    return run_command("cpusparse sweep", lambda: _main(args_list))


def _main(argv: list[str]) -> int:
    args = parse_args(build_parser(), argv)
    if args.grid is None and not (args.report and args.out):
        raise UsageError("expected a grid file (or --report with --out DIR)")
    if args.workers is not None and (args.scheduler or args.scheduler_file or args.sequential):
        raise UsageError("--workers sizes the LocalCluster: not with --scheduler or --sequential")
    if args.scheduler is not None and not args.scheduler.strip():
        raise UsageError("--scheduler: expected an address such as tcp://HOST:8786, got ''")
    if args.scheduler_file is not None and not os.path.isfile(args.scheduler_file):
        raise UsageError(f"--scheduler-file {args.scheduler_file}: no such file")
    grid = None
    if args.grid is not None:
        try:
            grid = load_grid(args.grid)
        except GridError as exc:
            raise UsageError(str(exc)) from None
    out = args.out or f"sweep-{grid.name if grid else 'results'}"
    try:  # every output path, before any work
        check_out(out, "--out")
        if os.path.isdir(out):
            for path in report_paths(out, grid).values():
                check_output_path(path, "--out")
    except OutputPathError as exc:
        raise UsageError(str(exc)) from None
    problems: list[str] = []
    found = read_results(out, problems=problems) if os.path.isdir(out) else {}
    if problems:
        print(
            f"cpusparse sweep: skipped {len(problems)} files under {os.path.join(out, 'cells')} "
            f"that are not cell records (their cells run again); first: {problems[0]}",
            file=sys.stderr,
        )
    if args.report:
        return _report(out, grid)
    if grid is None:  # (--report returned above)
        raise UsageError("expected a grid file")
    finished = sum(1 for c in grid.cells if found.get(c.key, {}).get("status") == "ok")
    print(
        f"sweep {grid.name}: {len(grid.cells)} cells, {finished} finished in {out}, "
        f"{len(grid.cells) - finished} to run",
        flush=True,
    )
    if args.dry_run:
        return 0
    t0 = time.perf_counter()
    try:
        records = run_grid(
            grid,
            out,
            scheduler="sequential" if args.sequential else args.scheduler,
            scheduler_file=args.scheduler_file,
            n_workers=args.workers,
            progress=not args.quiet,
        )
    except SweepError as exc:
        raise CommandError(str(exc)) from None
    except KeyboardInterrupt:
        done = sum(1 for r in read_results(out).values() if r.get("status") == "ok")
        print(
            f"cpusparse sweep: interrupted; {done} finished cells are in {out}: "
            "run the same command again to finish the grid",
            file=sys.stderr,
        )
        return 130
    failed = [r for r in records if r["status"] != "ok"]
    print(
        f"sweep {grid.name}: {len(records) - len(failed)} of {len(grid.cells)} cells finished "
        f"({len(records) - finished - len(failed)} now, in {time.perf_counter() - t0:.1f} s); "
        f"records in {os.path.join(out, 'cells')}",
        flush=True,
    )
    _report(out, grid)
    if failed:
        raise CommandError(
            f"{len(failed)} cells failed, first {failed[0]['name']}: {failed[0]['error']} "
            "(the error of each is in its record; a rerun runs them again)"
        )
    return 0


def _report(out: str, grid: Grid | None) -> int:
    try:
        paths = write_report(out, grid=grid)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    print(f"report: {paths['markdown']}, {paths['accuracy']}, {paths['variance']}")
    return 0
