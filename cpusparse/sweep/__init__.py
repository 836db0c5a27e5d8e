"""Sweeps: grids of fits on Dask's distributed scheduler, resumable, with reports.

- :mod:`cpusparse.sweep.grid`: grid files (TOML) and their cells;
- :mod:`cpusparse.sweep.run`: one cell's fit (:func:`run_cell`), a grid's
  (:func:`run_grid`) on a Dask ``LocalCluster``, an existing scheduler or this process,
  and the records written under ``out/cells``;
- :mod:`cpusparse.sweep.report`: the records as a markdown table and plots;
- :mod:`cpusparse.sweep.command`: ``cpusparse sweep``.

Dask is an extra (``pip install 'cpusparse[distributed]'``); without it, grids run in
this process (``scheduler="sequential"``) and reports are built all the same.
"""

from __future__ import annotations

from .grid import ESTIMATORS, Cell, Grid, GridError, load_grid, parse_grid
from .report import summarise, write_report
from .run import SweepError, read_results, run_cell, run_grid

__all__ = [
    "ESTIMATORS",
    "Cell",
    "Grid",
    "GridError",
    "SweepError",
    "load_grid",
    "parse_grid",
    "read_results",
    "run_cell",
    "run_grid",
    "summarise",
    "write_report",
]
