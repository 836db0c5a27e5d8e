"""``cpusparse sweep``: grid files, cells, resumable runs on Dask, reports.

The Dask tests run real worker processes: a two-worker ``LocalCluster``, a separately
started ``dask scheduler`` and ``dask worker``, and a sweep whose worker and then
client are killed mid-way.
"""

import datetime
import json
import math
import os
import shutil
import signal
import struct
import subprocess
import sys
import time

import pytest

from cpusparse import __version__
from cpusparse.sweep import (
    GridError,
    SweepError,
    load_grid,
    parse_grid,
    read_results,
    run_cell,
    run_grid,
    summarise,
    write_report,
)
from cpusparse.sweep import run as run_module
from cpusparse.sweep.report import markdown
from cpusparse.sweep.run import TIMING_FIELDS

pytest.importorskip("distributed")

ENV = dict(os.environ, NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
CLI = [sys.executable, "-m", "cpusparse.tools.cli", "sweep"]

# A grid of quick fits: 12 cells of a 32-unit MLP on digits, about 0.2 s each.
TINY = """
name = "tiny"
seeds = 2
[params]
hidden_layer_sizes = [32]
max_iter = 4
finetune_iter = 1
[[grid]]
dataset = "digits"
density = [0.3, 0.1]
estimator = ["vrpge", "reinforce", "random-mask"]
"""


def grid_file(tmp_path, text=TINY, name="grid.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def comparable(record):
    out = {k: v for k, v in record.items() if k not in TIMING_FIELDS}
    out["epochs"] = [
        {k: v for k, v in e.items() if k not in TIMING_FIELDS} for e in record.get("epochs", [])
    ]
    return out


def contents(out):
    cells = out / "cells"
    return {p.name: p.read_bytes() for p in sorted(cells.glob("*.json"))}


@pytest.fixture(scope="module")
def sequential(tmp_path_factory):
    """The tiny grid run in this process: the reference of the Dask runs."""
    tmp = tmp_path_factory.mktemp("sequential")
    grid = load_grid(grid_file(tmp))
    records = run_grid(grid, tmp / "out", scheduler="sequential", progress=False)
    return grid, records, tmp / "out"


# ------------------------------------------------------------------------- grids


def test_a_grid_is_the_union_of_its_blocks_products(tmp_path):
    grid = load_grid(grid_file(tmp_path))
    assert grid.name == "tiny" and len(grid.cells) == 2 * 3 * 2
    axes = {(c.density, c.estimator, c.seed) for c in grid.cells}
    assert len(axes) == 12 and {c.granularity for c in grid.cells} == {"weight"}
    vrpge = next(c for c in grid.cells if c.estimator == "vrpge")
    # Every classifier parameter is resolved (defaults filled in), the axes set theirs.
    assert vrpge.params["hidden_layer_sizes"] == [32] and vrpge.params["batch_size"] == 64
    assert vrpge.params["score_estimator"] == "vrpge" and vrpge.params["random_state"] == 0
    baseline = next(c for c in grid.cells if c.estimator == "random-mask")
    assert (baseline.params["max_iter"], baseline.params["finetune_iter"]) == (0, 5)
    assert baseline.params["fixed_mask"] == "random"


def test_cells_of_equal_settings_run_once_and_dense_is_density_one():
    grid = parse_grid(
        {
            "grid": [
                {"density": [0.5, 0.1], "estimator": ["dense", "vrpge"], "seeds": [3]},
                {"density": 0.1, "estimator": "vrpge", "seeds": [3]},  # a duplicate
            ]
        }
    )
    assert sorted((c.estimator, c.density) for c in grid.cells) == [
        ("dense", 1.0),
        ("vrpge", 0.1),
        ("vrpge", 0.5),
    ]


def test_the_key_covers_every_setting_and_the_version(monkeypatch):
    base = parse_grid({"grid": [{"density": 0.1}]}).cells[0]
    other_param = parse_grid({"grid": [{"density": 0.1, "params": {"batch_size": 32}}]}).cells[0]
    other_seed = parse_grid({"seeds": [1], "grid": [{"density": 0.1}]}).cells[0]
    split = parse_grid({"test_fraction": 0.3, "grid": [{"density": 0.1}]}).cells[0]
    keys = {base.key, other_param.key, other_seed.key, split.key}
    assert len(keys) == 4
    before = base.key
    monkeypatch.setattr("cpusparse.sweep.grid.__version__", __version__ + ".other")
    assert base.key != before
    assert base.name.startswith("mlp-digits-weight-d0.1-vrpge-K2-s0-")


def test_cnn_cells_resolve_the_cnn_classifier():
    grid = parse_grid(
        {"grid": [{"model": ["vgg", "resnet"], "density": 0.5, "params": {"widths": [4, 8]}}]}
    )
    assert [(c.model, c.granularity, c.classifier) for c in grid.cells] == [
        ("vgg", "channel", "SparseCNNClassifier"),
        ("resnet", "channel", "SparseCNNClassifier"),
    ]
    assert [c.params["architecture"] for c in grid.cells] == ["vgg", "resnet"]


BAD_GRIDS = {
    "unknown top key": ({"seed": 3, "grid": [{"density": 0.1}]}, "seed: unknown key"),
    "unknown block key": ({"grid": [{"densty": 0.1}]}, "grid[0].densty: unknown key"),
    "no grid": ({"seeds": 2}, "grid: missing"),
    "grid not tables": ({"grid": 3}, "grid: expected one or more [[grid]] tables"),
    "no density": ({"grid": [{"estimator": "vrpge"}]}, "grid[0].density: missing"),
    "density out of range": (
        {"grid": [{"density": [0.1, 1.5]}]},
        "grid[0].density: expected a number in (0, 1], got 1.5",
    ),
    "density a string": ({"grid": [{"density": "0.1"}]}, "grid[0].density: expected a number"),
    "empty list": ({"grid": [{"density": []}]}, "grid[0].density: expected a value or"),
    "estimator": (
        {"grid": [{"density": 0.1, "estimator": "vr-pge"}]},
        "grid[0].estimator: expected one of vrpge, vrpge-sqrt, reinforce",
    ),
    "model": ({"grid": [{"density": 0.1, "model": "lenet"}]}, "grid[0].model: expected one of"),
    "dataset": (
        {"grid": [{"density": 0.1}, {"density": 0.1, "dataset": "mnist"}]},
        "grid[1].dataset: expected one of digits, mnist5k, mnist1d, got 'mnist'",
    ),
    "granularity of the model": (
        {"grid": [{"density": 0.1, "granularity": "channel"}]},
        "grid[0].granularity: expected one of weight, neuron for model 'mlp', got 'channel'",
    ),
    "K": ({"grid": [{"density": 0.1, "n_masks": 1}]}, "grid[0].n_masks: expected an int >= 2"),
    "seeds": ({"seeds": 0, "grid": [{"density": 0.1}]}, "seeds: expected a number of seeds"),
    "seeds repeated": ({"seeds": [1, 1], "grid": [{"density": 0.1}]}, "expected distinct seeds"),
    "test_fraction": (
        {"test_fraction": 1, "grid": [{"density": 0.1}]},
        "test_fraction: expected a number in (0, 1)",
    ),
    "not a parameter": (
        {"grid": [{"density": 0.1, "params": {"hidden": [3]}}]},
        "grid[0].params.hidden: is not a parameter of SparseMLPClassifier",
    ),
    "an axis in params": (
        {"params": {"score_estimator": "reinforce"}, "grid": [{"density": 0.1}]},
        "params.score_estimator: is set by the grid's axes: use 'estimator'",
    ),
    "a run setting in params": (
        {"grid": [{"density": 0.1, "params": {"n_jobs": 2}}]},
        "grid[0].params.n_jobs: is the sweep's to set",
    ),
    "a bad parameter value": (
        {"grid": [{"density": 0.1, "params": {"max_iter": -2}}]},
        "grid[0].params: The 'max_iter' parameter of SparseMLPClassifier must be",
    ),
    "a name with a separator": (
        {"name": "../up", "grid": [{"density": 0.1}]},
        "name: expected a name of letters, digits, '.', '_' and '-'",
    ),
    "a name with a null": ({"name": "a\x00b", "grid": [{"density": 0.1}]}, "name: expected"),
    "a nested axis value": (
        {"grid": [{"density": 0.1, "model": [["mlp"]]}]},
        "grid[0].model: expected a string or a number, or a list of them, got ['mlp']",
    ),
    "a table as an axis": (
        {"grid": [{"density": 0.1, "estimator": {"a": 1}}]},
        "grid[0].estimator: expected a string or a number",
    ),
    "a date in params": (
        {"grid": [{"density": 0.1, "params": {"batch_size": datetime.date(1979, 5, 27)}}]},
        "grid[0].params.batch_size: expected a finite number, a string, a boolean or a list",
    ),
    "an infinite param": (
        {"params": {"weight_decay": math.inf}, "grid": [{"density": 0.1}]},
        "params.weight_decay: expected a finite number",
    ),
    "a boolean for an int": (
        {"grid": [{"density": 0.1, "params": {"batch_size": True}}]},
        "grid[0].params.batch_size: expected a value like 64, got True",
    ),
    "a string epoch count for a baseline": (
        {"grid": [{"density": 0.1, "estimator": "random-mask", "params": {"max_iter": "3"}}]},
        "grid[0].params: The 'max_iter' parameter of SparseMLPClassifier must be",
    ),
    "a negative epoch count for a baseline": (
        {"grid": [{"density": 0.1, "estimator": "dense", "params": {"max_iter": -5}}]},
        "The 'max_iter' parameter of SparseMLPClassifier must be an int in the range [0, inf)",
    ),
    "a seed beyond 2**32": (
        {"seeds": [2**32], "grid": [{"density": 0.1}]},
        "seeds: expected a number of seeds or a list of ints in [0, 2**32 - 1]",
    ),
    "a bad model setting": (
        {"grid": [{"density": 0.1, "params": {"hidden_layer_sizes": [0]}}]},
        "grid[0].params: hidden_layer_sizes must",
    ),
}


@pytest.mark.parametrize("case", list(BAD_GRIDS))
def test_a_malformed_grid_names_the_key(case):
    data, message = BAD_GRIDS[case]
    with pytest.raises(GridError) as info:
        parse_grid(data, source="g.toml")
    assert str(info.value).startswith("g.toml: ")
    assert message in str(info.value)


def test_grid_files_that_cannot_be_read(tmp_path):
    with pytest.raises(GridError, match="cannot read grid file .*nope.toml"):
        load_grid(tmp_path / "nope.toml")
    with pytest.raises(GridError, match=r"bad.toml is not valid TOML: Invalid value"):
        load_grid(grid_file(tmp_path, "density = [0.1,\n", "bad.toml"))


# ------------------------------------------------------------------------- cells


def test_a_cell_record_holds_the_fit_and_a_failed_one_its_error(sequential):
    grid, records, _ = sequential
    record = records[0]
    assert record["status"] == "ok" and record["key"] == grid.cells[0].key
    assert 0.5 < record["test_accuracy"] <= 1
    assert record["density"] <= 0.3 and record["n_units"] == 64 * 32
    # Multiply-adds: the kept first-layer weights plus the dense 32 x 10 classifier.
    assert record["macs"] == record["n_active"] + 32 * 10
    phases = [e["phase"] for e in record["epochs"]]
    assert phases == ["sparse"] * 4 + ["finetune"]
    assert (
        record["epochs"][0]["grad_variance"] > 0 and record["epochs"][-1]["grad_variance"] is None
    )
    assert record["version"] == __version__ and record["worker"]["datasets_loaded"] == 1
    # A cell whose fit fails is recorded, with the error in one line.
    bad = parse_grid({"grid": [{"density": 1e-6}]}).cells[0]
    failed = run_cell(bad)
    assert failed["status"] == "failed"
    assert failed["error"].startswith("ValueError: density=1e-06 keeps no unit")
    assert "Traceback" in failed["traceback"] and "test_accuracy" not in failed


def test_a_rerun_skips_finished_cells_and_a_grown_grid_runs_only_new_ones(sequential, tmp_path):
    grid, records, out = sequential
    shutil.copytree(out, tmp_path / "out")
    before = contents(tmp_path / "out")
    assert len(before) == len(grid.cells)
    ran = []
    again = run_grid(
        grid, tmp_path / "out", scheduler="sequential", progress=False, on_record=ran.append
    )
    assert ran == [] and again == records and contents(tmp_path / "out") == before
    grown = load_grid(grid_file(tmp_path, TINY.replace("[0.3, 0.1]", "[0.3, 0.1, 0.05]")))
    run_grid(grown, tmp_path / "out", scheduler="sequential", progress=False, on_record=ran.append)
    assert sorted({r["settings"]["density"] for r in ran}) == [0.05] and len(ran) == 6
    after = contents(tmp_path / "out")
    assert all(after[name] == data for name, data in before.items())


def test_failed_cells_run_again(tmp_path):
    cell = parse_grid(
        {"grid": [{"density": 0.2, "params": {"hidden_layer_sizes": [8], "max_iter": 1}}]}
    ).cells[0]
    failed = {**run_cell(cell), "status": "failed", "error": "RuntimeError: a lost worker"}
    (tmp_path / "cells").mkdir()
    (tmp_path / "cells" / f"{cell.name}.json").write_text(json.dumps(failed))
    records = run_grid([cell], tmp_path, scheduler="sequential", progress=False)
    assert records[0]["status"] == "ok"
    assert read_results(tmp_path)[cell.key]["status"] == "ok"


def test_files_that_are_not_whole_records_are_skipped_and_their_cells_run_again(
    sequential, tmp_path
):
    grid, records, out = sequential
    shutil.copytree(out, tmp_path / "out")
    cells = tmp_path / "out" / "cells"
    names = sorted(p.name for p in cells.glob("*.json"))
    truncated = json.loads((cells / names[0]).read_text())
    del truncated["test_accuracy"]  # still says "ok"
    (cells / names[0]).write_text(json.dumps(truncated))
    forged = json.loads((cells / names[1]).read_text())
    forged["settings"]["params"]["batch_size"] = 7  # settings no longer match the key
    (cells / names[1]).write_text(json.dumps(forged))
    (cells / "junk.json").write_text("[1, 2")
    os.mkfifo(cells / "fifo.json")  # would block a reader
    problems = []
    found = read_results(tmp_path / "out", problems=problems)
    assert len(found) == len(records) - 2
    assert sorted(p.split(": ", 1)[1].split(" (")[0] for p in problems) == sorted(
        [
            "a finished record without test_accuracy",
            "its key is not that of its settings and version",
            "not a regular file",
            "Expecting ',' delimiter: line 1 column 6",
        ]
    )
    ran = []
    run_grid(grid, tmp_path / "out", scheduler="sequential", progress=False, on_record=ran.append)
    assert sorted(r["name"] + ".json" for r in ran) == names[:2]


def test_a_record_of_another_version_is_not_reused_and_not_reported(sequential, tmp_path):
    grid, records, out = sequential
    shutil.copytree(out, tmp_path / "out")
    cells = tmp_path / "out" / "cells"
    path = sorted(cells.glob("*.json"))[0]
    old = json.loads(path.read_text())
    old["version"] = "0.1.0"
    old["key"] = run_module.record_key(old)
    old["test_accuracy"] = 0.0
    (cells / "old.json").write_text(json.dumps(old))
    found = read_results(tmp_path / "out")
    assert len(found) == len(records) + 1  # a valid record, of its own version
    ran = []
    run_grid(grid, tmp_path / "out", scheduler="sequential", progress=False, on_record=ran.append)
    assert ran == []  # this version's records are all there
    write_report(tmp_path / "out")
    text = (tmp_path / "out" / "report.md").read_text()
    assert "1 records of other cpusparse versions under" in text
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())["summaries"]
    assert {s["n_seeds"] for s in summary} == {2}  # the old record is in no group


def test_an_output_directory_that_cannot_be_written_is_refused_before_any_fit(tmp_path):
    cell = parse_grid({"grid": [{"density": 0.2}]}).cells[0]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="out .*file: is a regular file, not a directory"):
        run_grid([cell], tmp_path / "file", scheduler="sequential")
    with pytest.raises(ValueError, match="directory .*missing does not exist"):
        run_grid([cell], tmp_path / "missing" / "out", scheduler="sequential")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "cells").write_text("x")
    with pytest.raises(ValueError, match="out .*cells: is a regular file, not a directory"):
        run_grid([cell], tmp_path / "out", scheduler="sequential")


def test_without_dask_the_error_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "distributed", None)
    cell = parse_grid({"grid": [{"density": 0.2}]}).cells[0]
    with pytest.raises(SweepError, match=r"pip install 'cpusparse\[distributed\]'"):
        run_grid([cell], tmp_path, progress=False)
    assert not list((tmp_path / "cells").glob("*.json"))


def test_workers_of_another_version_are_refused():
    from cpusparse.sweep.run import _client

    class FakeClient:
        def run(self, function):
            return {"tcp://10.0.0.2:4001": "0.1.0"}

    client = _client("tcp://10.0.0.1:8786", None)
    client.client = FakeClient()
    with pytest.raises(SweepError, match=r"worker tcp://10.0.0.2:4001 runs cpusparse 0.1.0"):
        client._check_workers()


# --------------------------------------------------------------------------- Dask


def test_a_two_worker_local_cluster_equals_the_sequential_run(sequential, tmp_path):
    grid, records, _ = sequential
    got = run_grid(grid, tmp_path, n_workers=2, progress=False)
    assert [comparable(r) for r in got] == [comparable(r) for r in records]
    pids = {r["worker"]["pid"] for r in got}
    assert len(pids) == 2 and os.getpid() not in pids  # processes, not threads
    # One data set loaded once per worker, however many cells each ran.
    assert {r["worker"]["datasets_loaded"] for r in got} == {1}


def test_a_separately_started_scheduler_and_worker(sequential, tmp_path):
    grid, records, _ = sequential
    dask = shutil.which("dask")
    if dask is None:
        pytest.skip("the dask command is not installed")
    scheduler_file = tmp_path / "scheduler.json"
    procs = [
        subprocess.Popen(
            [
                dask,
                "scheduler",
                "--scheduler-file",
                scheduler_file,
                "--port",
                "0",
                "--dashboard-address",
                ":0",
            ],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    ]
    try:
        deadline = time.monotonic() + 60
        while not scheduler_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        procs.append(
            subprocess.Popen(
                [
                    dask,
                    "worker",
                    "--scheduler-file",
                    scheduler_file,
                    "--nthreads",
                    "1",
                    "--nworkers",
                    "1",
                    "--no-dashboard",
                ],
                env=ENV,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        from distributed import Client

        with Client(scheduler_file=str(scheduler_file), timeout="60s") as client:
            client.wait_for_workers(1, timeout=60)
        result = subprocess.run(
            [
                *CLI,
                grid.source,
                "--out",
                tmp_path / "out",
                "--scheduler-file",
                scheduler_file,
                "--quiet",
            ],
            env=ENV,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        got = [read_results(tmp_path / "out")[c.key] for c in grid.cells]
        assert [comparable(r) for r in got] == [comparable(r) for r in records]
        assert len({r["worker"]["pid"] for r in got}) == 1
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


def _children(pid):
    import psutil

    return psutil.Process(pid).children(recursive=True)


def _wait_for(predicate, timeout=120):
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        time.sleep(0.02)


def test_killed_worker_and_killed_sweep_then_a_rerun_finishes_without_recomputing(
    sequential, tmp_path
):
    grid, records, _ = sequential
    slow = TINY.replace("max_iter = 4", "max_iter = 12").replace("seeds = 2", "seeds = 3")
    path = grid_file(tmp_path, slow)
    n_cells = len(load_grid(path).cells)
    out = tmp_path / "out"
    argv = [*CLI, path, "--out", out, "--workers", "2", "--quiet"]
    sweep = subprocess.Popen(
        argv,
        env=ENV,
        start_new_session=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        n_files = lambda: len(list(out.glob("cells/*.json")))  # noqa: E731
        _wait_for(lambda: n_files() >= 2)
        workers = [p for p in _children(sweep.pid) if "spawn_main" in " ".join(p.cmdline())]
        assert len(workers) == 2
        workers[0].send_signal(signal.SIGKILL)  # Dask runs its cells on the other worker
        _wait_for(lambda: n_files() >= 6)
        os.killpg(sweep.pid, signal.SIGKILL)  # the whole sweep, client and cluster
        sweep.wait(timeout=30)
    finally:
        if sweep.poll() is None:
            os.killpg(sweep.pid, signal.SIGKILL)
    before = contents(out)
    assert 6 <= len(before) < n_cells
    assert all(json.loads(data)["status"] == "ok" for data in before.values())
    result = subprocess.run(
        [*argv[:-1], "--quiet"], env=ENV, capture_output=True, text=True, timeout=300, check=False
    )
    assert result.returncode == 0, result.stderr
    assert f"{len(before)} finished in {out}, {n_cells - len(before)} to run" in result.stdout
    after = contents(out)
    assert len(after) == n_cells
    assert all(after[name] == data for name, data in before.items())  # not recomputed


# ------------------------------------------------------------------------ reports


def _record(estimator, density, seed, accuracy, *, status="ok", granularity="weight"):
    cell = parse_grid(
        {
            "seeds": [seed],
            "grid": [{"density": density, "estimator": estimator, "granularity": granularity}],
        }
    ).cells[0]
    record = {"settings": cell.settings(), "status": status, "key": cell.key,
              "version": __version__}  # fmt: skip
    if status == "ok":
        epochs = [{"phase": "sparse", "grad_variance": 10.0 / (e + 1)} for e in range(3)]
        record.update(
            test_accuracy=accuracy,
            density=density,
            macs=1000,
            fit_seconds=1.0,
            epochs=[*epochs, {"phase": "finetune", "grad_variance": None}],
        )
    return record


def test_records_that_differ_in_more_than_the_seed_are_never_one_group():
    a = _record("vrpge", 0.1, 0, 0.70)
    b = _record("vrpge", 0.1, 0, 0.30)
    b["settings"]["params"].update(max_iter=35, finetune_iter=5)  # same total epochs
    summaries = summarise([a, b])
    assert [s["n_seeds"] for s in summaries] == [1, 1]
    assert summaries[0]["setup"] == summaries[1]["setup"]  # one label ...
    text = markdown(summaries)
    assert text.count("## mlp, digits, weight masks") == 2  # ... but two panels, not one mean
    assert "| vrpge | 70.00 ± 0.00 (1) |" in text and "| vrpge | 30.00 ± 0.00 (1) |" in text
    assert "group " in text


def test_a_dense_only_grid_reports_its_anchors():
    summaries = summarise([_record("dense", 1.0, 0, 0.9),
                           _record("dense", 1.0, 0, 0.8, granularity="neuron")])  # fmt: skip
    text = markdown(summaries)
    assert "| estimator |" not in text
    assert "Dense anchor (every unit, weight network): 90.00" in text
    assert "Dense anchor (every unit, neuron network): 80.00" in text
    failed = markdown(summarise([_record("dense", 1.0, 0, 0.9, status="failed")]))
    assert "all failed (1)." in failed


def test_summaries_are_means_and_sample_deviations_over_seeds():
    records = [
        _record("vrpge", 0.1, 0, 0.90),
        _record("vrpge", 0.1, 1, 0.94),
        _record("vrpge", 0.1, 2, 0.0, status="failed"),
        _record("reinforce", 0.1, 0, 0.80),
        _record("dense", 1.0, 0, 0.97),
    ]
    summaries = {(s["estimator"], s["density"]): s for s in summarise(records)}
    vrpge = summaries[("vrpge", 0.1)]
    assert vrpge["n_seeds"] == 2 and vrpge["seeds"] == [0, 1] and vrpge["n_failed"] == 1
    assert vrpge["accuracy_mean"] == pytest.approx(92.0)
    assert vrpge["accuracy_std"] == pytest.approx(2 * 2**0.5)  # ddof=1
    assert summaries[("reinforce", 0.1)]["accuracy_std"] == 0.0
    text = markdown(list(summaries.values()))
    assert "| vrpge | 92.00 ± 2.83 (2), 1 failed |" in text
    assert "| reinforce | 80.00 ± 0.00 (1) |" in text
    assert "Dense anchor (every unit, weight network): 97.00 ± 0.00 (1)" in text


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


def test_the_report_writes_a_table_a_summary_and_two_plots(sequential, tmp_path):
    _, records, out = sequential
    shutil.copytree(out, tmp_path / "out")
    paths = write_report(tmp_path / "out")
    text = (tmp_path / "out" / "report.md").read_text()
    assert "## mlp, digits, weight masks (hidden 32, 5 epochs, settings" in text
    assert "| estimator | density 0.3 | density 0.1 |" in text
    vrpge = [
        r
        for r in records
        if r["settings"]["estimator"] == "vrpge" and r["settings"]["density"] == 0.3
    ]
    mean = 100 * sum(r["test_accuracy"] for r in vrpge) / 2
    assert f"| vrpge | {mean:.2f} ± " in text
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())["summaries"]
    assert len(summary) == 6 and {s["n_seeds"] for s in summary} == {2}
    width, height = _png_size(tmp_path / "out" / "accuracy_vs_density.png")
    assert width > 400 and height > 300
    width, height = _png_size(tmp_path / "out" / "grad_variance.png")
    assert width > 600  # a panel per density
    assert set(paths) == {"markdown", "summary", "accuracy", "variance"}
    with pytest.raises(ValueError, match="no cell records of cpusparse"):
        write_report(tmp_path)


# -------------------------------------------------------------------------- CLI


def test_the_command_runs_resumes_and_reports(sequential, tmp_path, capsys):
    from cpusparse.tools.cli import main

    grid, records, _ = sequential
    out = tmp_path / "out"
    assert main(["sweep", grid.source, "--out", str(out), "--sequential", "--quiet"]) == 0
    text = capsys.readouterr().out
    assert "sweep tiny: 12 cells, 0 finished" in text and "12 of 12 cells finished" in text
    # The run reports its grid's cells in files named after it.
    assert "| vrpge | " in (out / "tiny.md").read_text()
    assert (out / "tiny-accuracy_vs_density.png").exists() and not (out / "report.md").exists()
    got = [read_results(out)[c.key] for c in grid.cells]
    assert [comparable(r) for r in got] == [comparable(r) for r in records]
    assert main(["sweep", grid.source, "--out", str(out), "--dry-run"]) == 0
    assert "12 finished in" in capsys.readouterr().out
    assert main(["sweep", "--report", "--out", str(out)]) == 0  # every record under out
    assert (out / "report.md").read_text().replace("Sweep results: out", "") == (
        (out / "tiny.md").read_text().replace("Sweep results: tiny", "")
    )


def test_a_failed_cell_does_not_stop_the_sweep_and_exits_1(tmp_path, capsys):
    from cpusparse.tools.cli import main

    path = grid_file(tmp_path, TINY.replace("[0.3, 0.1]", "[0.3, 1e-6]"))
    status = main(["sweep", str(path), "--out", str(tmp_path / "out"), "--sequential", "--quiet"])
    captured = capsys.readouterr()
    assert status == 1
    records = read_results(tmp_path / "out")
    # No estimator keeps a unit at 1e-6: its 3 estimators x 2 seeds fail, the rest finish.
    assert sum(r["status"] == "ok" for r in records.values()) == 6
    assert (
        captured.err.strip()
        .splitlines()[-1]
        .startswith("cpusparse sweep: error: 6 cells failed, first mlp-digits-weight-d1e-06-")
    )
