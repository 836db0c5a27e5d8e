"""Running a grid: one fit per cell, on Dask's distributed scheduler or in this process.

Each cell runs :func:`run_cell` on a worker, which returns the cell's record to the
client; the client writes it atomically to one JSON file under ``out/cells/``
(workers on other hosts never write to the client's disk). A rerun reads the files
first and runs only the cells whose key (every resolved setting and the package
version, :attr:`Cell.key`) has no finished record: a sweep killed half-way, or a grid
grown by new cells, runs only what is missing. Failed cells are recorded with their
error and run again on the next run.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import math
import os
import socket
import stat
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from .._io import atomic_write, check_output_dir
from .._version import __version__
from .grid import Cell, Grid, classifier_for

__all__ = ["SCHEMA", "TIMING_FIELDS", "run_cell", "run_grid", "read_results", "SweepError"]

SCHEMA = 1
"""The version of a cell record's layout."""

TIMING_FIELDS = ("fit_seconds", "seconds", "worker", "finished_at", "sources")
"""Fields of a record (and of its epochs) that differ between runs of the same cell
(``sources``: between checkouts)."""

INSTALL_HINT = "pip install 'cpusparse[distributed]'"


class SweepError(RuntimeError):
    """A sweep that cannot start or reach its workers; the message says why."""


# ------------------------------------------------------------------------ one cell


@functools.lru_cache(maxsize=4)
def _dataset(name: str) -> tuple[np.ndarray, np.ndarray, int | None]:
    """The data set's samples, labels and official training size: loaded once per process."""
    from ..tools.datasets import load_dataset

    if name == "mnist1d":
        train = load_dataset(name, split="train")
        test = load_dataset(name, split="test")
        return np.concatenate([train.X, test.X]), np.concatenate([train.y, test.y]), len(train.y)
    ds = load_dataset(name)
    return ds.X, ds.y, None


@functools.cache
def source_digest() -> str:
    """SHA-256 (16 hex digits) of this process's cpusparse sources, read once.

    Recorded in every record (not in its key): records made by different code under
    one version can be told apart.
    """
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    h = hashlib.sha256()
    for path in sorted(glob.glob(os.path.join(root, "**", "*.py"), recursive=True)):
        h.update(os.path.relpath(path, root).encode())
        with open(path, "rb") as f:
            h.update(f.read())
    return h.hexdigest()[:16]


def load_count() -> int:
    """How many data sets this process has loaded (one per name, however many cells ran)."""
    return _dataset.cache_info().misses


def _split(cell: Cell) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    X, y, n_train = _dataset(cell.dataset)
    if n_train is not None:  # the official split
        return X[:n_train], X[n_train:], y[:n_train], y[n_train:]
    return train_test_split(X, y, test_size=cell.test_fraction, stratify=y, random_state=cell.seed)


def run_cell(cell: Cell) -> dict[str, Any]:
    """Fit one cell with one thread and return its record (never raises for a bad fit).

    Parameters
    ----------
    cell : Cell

    Returns
    -------
    record : dict
        ``key``, ``name``, ``status`` (``"ok"`` or ``"failed"``), ``settings``, the
        package ``version``, ``worker`` (host, process and the number of data sets it
        has loaded: one per name), ``fit_seconds`` and, when
        the fit finished: ``test_accuracy``, ``density`` (``density_``), ``n_active``,
        ``n_units``, ``macs`` (forward multiply-adds per sample with the fixed mask,
        :func:`cpusparse.models.count_macs`) and ``epochs``, one record per epoch
        (``phase``, ``loss``, ``grad_variance``, ``expected_density``, ``seconds``).
        A failed fit has ``error`` (one line) and ``traceback``.
    """
    from threadpoolctl import threadpool_limits

    from ..models import count_macs

    record: dict[str, Any] = {
        "schema": SCHEMA,
        "key": cell.key,
        "name": cell.name,
        "settings": cell.settings(),
        "version": __version__,
        "sources": source_digest(),
        "worker": {"host": socket.gethostname(), "pid": os.getpid()},
    }
    t0 = time.perf_counter()
    try:
        X_train, X_test, y_train, y_test = _split(cell)
        record["worker"]["datasets_loaded"] = load_count()
        clf = classifier_for(cell, n_jobs=1, verbose=False)
        with warnings.catch_warnings(), threadpool_limits(1):
            warnings.simplefilter("ignore")
            clf.fit(X_train, y_train)
        fit_seconds = time.perf_counter() - t0
        shape = getattr(clf, "input_shape_", None)
        record.update(
            status="ok",
            test_accuracy=float(clf.score(X_test, y_test)),
            density=float(clf.density_),
            n_active=int(clf.n_active_),
            n_units=int(round(clf.n_active_ / clf.density_)) if clf.density_ else None,
            macs=int(count_macs(clf.network_, clf.masks_, shape)["total"]),
            epochs=[_epoch(r) for r in clf.history_],
            fit_seconds=fit_seconds,
        )
    except Exception as exc:  # recorded, and the sweep goes on
        record.update(
            status="failed",
            error=f"{type(exc).__name__}: {' '.join(str(exc).split())}",
            traceback=traceback.format_exc(),
            fit_seconds=time.perf_counter() - t0,
        )
    record["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return record


def _epoch(history: dict[str, Any]) -> dict[str, Any]:
    keep = (
        "epoch",
        "phase",
        "loss",
        "grad_variance",
        "expected_density",
        "realised_density",
        "val_accuracy",
        "seconds",
    )
    return {k: _plain(history[k]) for k in keep if k in history}


def _plain(value: Any) -> Any:
    """A JSON value: numpy scalars as Python ones, NaN (no variance in fine-tuning) as None."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


# ----------------------------------------------------------------------- records


def cells_dir(out: str) -> str:
    """The directory of the cell records under ``out``."""
    return os.path.join(out, "cells")


def check_out(out: str | os.PathLike[str], what: str = "out") -> str:
    """Check that records can be written under ``out`` (and ``out/cells``); return ``out``.

    Raises
    ------
    cpusparse._io.OutputPathError
        Naming ``what``: ``out`` or ``out/cells`` exists and is not a writable directory
        (a file, a device, a dangling symlink), or cannot be created.
    """
    out = check_output_dir(os.fspath(out), what)
    if os.path.lexists(cells_dir(out)) or os.path.isdir(out):
        check_output_dir(cells_dir(out), what)
    return out


_OK_FIELDS = ("test_accuracy", "density", "n_active", "macs", "epochs", "fit_seconds")


def record_key(record: dict[str, Any]) -> str:
    """The key of a record, from its settings and version (as :attr:`Cell.key`)."""
    text = json.dumps(
        {"settings": record["settings"], "version": record["version"]}, sort_keys=True
    )
    return hashlib.sha256(text.encode()).hexdigest()


def read_results(
    out: str | os.PathLike[str], *, problems: list[str] | None = None
) -> dict[str, dict[str, Any]]:
    """The records under ``out/cells``, by key; files that are not records are skipped.

    A record counts if it is a regular file holding a JSON object of this
    :data:`SCHEMA` whose key is that of its settings and version and, when finished,
    with every field of a finished record. Anything else is skipped (and so run
    again by a sweep of its cell).

    Parameters
    ----------
    out : str or os.PathLike
        The sweep's ``--out`` directory.
    problems : list, optional
        Gets one line per skipped file.

    Returns
    -------
    records : dict
        ``key -> record``, finished and failed.
    """
    found: dict[str, dict[str, Any]] = {}
    for path in sorted(glob.glob(os.path.join(cells_dir(os.fspath(out)), "*.json"))):
        reason = None
        try:
            if not stat.S_ISREG(os.stat(path).st_mode):
                raise ValueError("not a regular file")
            with open(path, encoding="utf-8") as f:
                record = json.load(f)
            if not isinstance(record, dict) or record.get("schema") != SCHEMA:
                raise ValueError(f"not a cell record of schema {SCHEMA}")
            if record.get("key") != record_key(record):
                raise ValueError("its key is not that of its settings and version")
            missing = [k for k in _OK_FIELDS if k not in record]
            if record.get("status") == "ok" and missing:
                raise ValueError(f"a finished record without {', '.join(missing)}")
        except (OSError, ValueError, KeyError, TypeError) as exc:
            reason = f"{type(exc).__name__}: {exc}" if isinstance(exc, KeyError) else str(exc)
        if reason is not None:
            if problems is not None:
                problems.append(f"{path}: {reason}")
            continue
        found[record["key"]] = record
    return found


def _finite(value: Any) -> Any:
    """``value`` with every non-finite float as None (JSON has no NaN)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _write(out: str, record: dict[str, Any]) -> dict[str, Any]:
    """Write ``record`` atomically under ``out/cells``; return it as written."""
    record = _finite(record)
    path = os.path.join(cells_dir(out), record["name"] + ".json")
    text = json.dumps(record, sort_keys=True, separators=(",", ":"), allow_nan=False) + "\n"
    atomic_write(path, lambda f: f.write(text.encode()))
    return record


# ------------------------------------------------------------------------ a grid


def run_grid(
    grid: Grid | Sequence[Cell],
    out: str | os.PathLike[str],
    *,
    scheduler: str | None = None,
    scheduler_file: str | os.PathLike[str] | None = None,
    n_workers: int | None = None,
    progress: bool = True,
    on_record: Callable[[dict[str, Any]], None] | None = None,
) -> list[dict[str, Any]]:
    """Run every cell of ``grid`` that has no finished record under ``out``.

    Parameters
    ----------
    grid : Grid or sequence of Cell
    out : str or os.PathLike
        Directory of the records (created if missing; its parent must exist).
    scheduler : str, optional
        None: a Dask ``LocalCluster`` of ``n_workers`` processes with one thread each
        (unless ``scheduler_file`` is given). ``"tcp://HOST:PORT"``: an existing Dask
        scheduler. ``"sequential"``: this process, one cell after another, without
        Dask.
    scheduler_file : str or os.PathLike, optional
        The scheduler file of an existing Dask scheduler (``dask scheduler
        --scheduler-file``), instead of ``scheduler``.
    n_workers : int, optional
        Workers of the local cluster; the number of cores by default.
    progress : bool, default=True
        A progress bar over the cells (on stderr).
    on_record : callable, optional
        Called with each new record once it is written.

    Returns
    -------
    records : list of dict
        One per cell of ``grid``, in grid order: those found under ``out`` and those
        run now.

    Raises
    ------
    SweepError
        If Dask is missing (with the command that installs it), the scheduler cannot
        be reached, or a worker runs another version of cpusparse.
    cpusparse._io.OutputPathError
        If ``out`` cannot be written (checked before any fit).
    """
    cells = list(grid.cells if isinstance(grid, Grid) else grid)
    out = check_out(out)
    os.makedirs(cells_dir(out), exist_ok=True)
    done = {k: r for k, r in read_results(out).items() if r.get("status") == "ok"}
    todo = list({c.key: c for c in cells if c.key not in done}.values())  # each cell once
    new: dict[str, dict[str, Any]] = {}
    bar = _bar(len(cells), len(cells) - len(todo), progress)

    def finish(cell: Cell, record: dict[str, Any]) -> None:
        if record.get("version") != __version__:  # a worker of another version
            record = _failed(
                cell,
                SweepError(
                    f"the worker ran cpusparse {record.get('version')}, this client {__version__}"
                ),
            )
        # The cell's identity is the client's, whatever the worker computed.
        record.update(key=cell.key, name=cell.name, settings=cell.settings())
        record = _write(out, record)
        new[cell.key] = record
        bar.update(1)
        if record["status"] != "ok":
            bar.write(f"failed: {cell.name}: {record['error']}", file=sys.stderr)
        if on_record is not None:
            on_record(record)

    try:
        if todo and scheduler == "sequential":
            for cell in todo:
                finish(cell, run_cell(cell))
        elif todo:
            with _client(scheduler, n_workers, scheduler_file) as client:
                _run_on(client, todo, finish)
    finally:
        bar.close()
    records = {**done, **new}
    return [records[c.key] for c in cells if c.key in records]


def _bar(total: int, initial: int, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(
        total=total,
        initial=initial,
        desc="sweep",
        unit="cell",
        disable=not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
    )


def _import_distributed() -> Any:
    try:
        import distributed
    except ImportError:
        raise SweepError(
            "running a sweep on Dask needs the distributed scheduler, which is not installed: "
            f"{INSTALL_HINT} (or run in this process with scheduler='sequential')"
        ) from None
    return distributed


class _client:
    """A Dask client: of a new LocalCluster, or of the scheduler given."""

    def __init__(
        self,
        scheduler: str | None,
        n_workers: int | None,
        scheduler_file: str | os.PathLike[str] | None = None,
    ) -> None:
        if scheduler is not None and scheduler_file is not None:
            raise ValueError("expected a scheduler or a scheduler file, got both")
        if scheduler is not None and not scheduler.strip():
            raise ValueError("scheduler must be an address such as tcp://HOST:8786, got ''")
        self.scheduler = scheduler if scheduler_file is None else os.fspath(scheduler_file)
        self.from_file = scheduler_file is not None
        self.n_workers = n_workers
        self.cluster: Any = None
        self.client: Any = None

    def __enter__(self) -> Any:
        distributed = _import_distributed()
        import logging

        if self.scheduler is None:
            n = self.n_workers or os.cpu_count() or 1
            one_thread = {
                v: "1"
                for v in (
                    "OMP_NUM_THREADS",
                    "OPENBLAS_NUM_THREADS",
                    "MKL_NUM_THREADS",
                    "NUMBA_NUM_THREADS",
                )
            }
            self.cluster = distributed.LocalCluster(
                n_workers=n,
                threads_per_worker=1,
                processes=True,
                dashboard_address=":0",  # any free port: never a clash
                silence_logs=logging.ERROR,
                env=one_thread,
            )
            self.client = distributed.Client(self.cluster)
        else:
            try:
                if self.from_file:
                    self.client = distributed.Client(scheduler_file=self.scheduler, timeout="5s")
                else:
                    self.client = distributed.Client(self.scheduler, timeout="5s")
            except (OSError, TimeoutError, ValueError) as exc:
                raise SweepError(
                    f"cannot reach the Dask scheduler {self.scheduler}: {exc}"
                ) from None
            self._check_workers()
        return self.client

    def _check_workers(self) -> None:
        try:
            versions = self.client.run(_worker_version)
        except Exception as exc:  # a worker without cpusparse cannot unpickle the call
            raise SweepError(
                f"the workers of {self.scheduler} cannot run cpusparse ({exc}): install the "
                f"same version ({__version__}) on every worker host"
            ) from None
        if not versions:
            raise SweepError(f"the Dask scheduler {self.scheduler} has no workers")
        other = {w: v for w, v in versions.items() if v != __version__}
        if other:
            worker, version = next(iter(other.items()))
            raise SweepError(
                f"worker {worker} runs cpusparse {version}, this client {__version__}: "
                "install the same version on every worker host"
            )

    def __exit__(self, *exc: object) -> None:
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            self.cluster.close()


def _worker_version() -> str:
    """The version of cpusparse where this runs (a worker's, through ``client.run``)."""
    return __version__


def _run_on(
    client: Any, cells: Iterable[Cell], done: Callable[[Cell, dict[str, Any]], None]
) -> None:
    """Submit the cells; hand each record to ``done`` as soon as it arrives."""
    import distributed

    futures = {}
    for cell in cells:
        future = client.submit(run_cell, cell, key=f"cell-{cell.key}", pure=False)
        futures[future] = cell
    for future in distributed.as_completed(futures):
        cell = futures[future]
        try:
            record = future.result()
        except Exception as exc:  # the worker died (KilledWorker) or the task was lost
            record = _failed(cell, exc)
        done(cell, record)


def _failed(cell: Cell, exc: BaseException) -> dict[str, Any]:
    """The record of a cell that produced no result of its own."""
    return {
        "schema": SCHEMA,
        "key": cell.key,
        "name": cell.name,
        "settings": cell.settings(),
        "version": __version__,
        "status": "failed",
        "error": f"{type(exc).__name__}: {' '.join(str(exc).split())}",
        "traceback": "".join(traceback.format_exception(exc)),
        "worker": None,
        "fit_seconds": None,
        "finished_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
