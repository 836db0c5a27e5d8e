"""Tests of the CNN benchmark scripts: matched widths, resumable cells, the report, --quick."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # (dataclasses look their module up there)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def acc():
    return _load("cnn_accuracy")


def test_matched_widths_invert_the_cost(acc):
    target = acc.dense_cnn_macs("vgg", (5, 10, 20), (1, 28, 28), 10)
    w, costs = acc.matched_vgg_width(target, (1, 28, 28), 10, max_width=16)
    assert w == 5 and costs[5] == target
    assert acc.matched_mlp_width(acc.mlp_macs(40, (37, 37), 10), 40, 10) == 37


TINY = {"architecture": "vgg", "widths": (4, 8), "density": 0.5}


def test_a_finished_cell_is_not_refitted(acc, tmp_path, monkeypatch):
    rows = {
        "tiny": acc.Row("tiny CNN", "cnn", "digits", TINY),
        "tiny-same-cost": acc.Row("same cost", "cnn-matched", "digits", TINY, match="tiny"),
    }
    calls = []
    fit = acc.FITS["cnn"]

    def counting(row, seed, *args, **kwargs):
        calls.append((row.label, seed))
        return fit(row, seed, *args, **kwargs)

    monkeypatch.setitem(acc.FITS, "cnn", counting)
    first, ran = acc.run_cell("tiny", 0, str(tmp_path), 1, 0, rows=rows)
    assert ran and len(calls) == 1
    path = Path(acc.cell_path(str(tmp_path), "tiny", 0, 1, 0))
    assert json.loads(path.read_text())["accuracy"] == first["accuracy"]
    second, ran = acc.run_cell("tiny", 0, str(tmp_path), 1, 0, rows=rows)
    assert not ran and len(calls) == 1 and second == first
    # The same-cost row reuses the finished cell it matches (one new fit: its own).
    matched, ran = acc.run_cell("tiny-same-cost", 0, str(tmp_path), 1, 0, rows=rows)
    assert ran and calls == [("tiny CNN", 0), ("same cost", 0)]
    assert matched["target_macs"] == first["macs"]
    # Other epochs are another cell; a truncated file is not a finished cell.
    assert acc.run_cell("tiny", 0, str(tmp_path), 2, 0, rows=rows)[1]
    path.write_text('{"schema": 1, "accur')
    assert acc.read_cell(str(path)) is None


def _fake(acc, tmp_path, seed, accuracy, macs, epochs=12):
    record = {
        "schema": acc.SCHEMA,
        "row": "vgg16-dense",
        "label": "fake row",
        "kind": "cnn",
        "dataset": "mnist5k",
        "seed": seed,
        "epochs": epochs,
        "finetune_epochs": 3,
        "target": 97.5,
        "accuracy": accuracy,
        "density": 1.0,
        "macs": macs,
        "dense_macs": 7338880,
        "fit_seconds": 10.0,
    }
    acc.write_json_atomic(acc.cell_path(str(tmp_path), "vgg16-dense", seed, epochs, 3), record)


def test_report_gives_mean_and_std_of_the_cells(acc, tmp_path):
    _fake(acc, tmp_path, 0, 0.97, 7_000_000)
    _fake(acc, tmp_path, 1, 0.98, 8_000_000)
    _fake(acc, tmp_path, 2, 0.50, 1, epochs=5)  # other epochs: not in this table
    report = tmp_path / "report" / "accuracy.md"
    text = acc.write_report(str(tmp_path), str(report), 12, 3)
    assert report.read_text() == text
    std = math.sqrt(2 * 0.5**2)  # ddof=1 of 97 and 98
    line = next(x for x in text.splitlines() if x.startswith("| fake row"))
    assert f"| 97.50 ± {std:.2f} | 2 |" in line
    assert "≥ 97.5: met" in line and "7.50 M" in line and "7.34 M" in line
    summary = json.loads(report.with_suffix(".json").read_text())["summary"]
    assert summary[0]["seeds"] == [0, 1]


def test_speed_script_quick_has_every_row(tmp_path, capsys):
    pytest.importorskip("torch")
    import numba
    import torch
    from threadpoolctl import threadpool_info, threadpool_limits

    threads = numba.get_num_threads(), torch.get_num_threads()
    blas = [p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"]
    bench = _load("bench_cnn_fit")
    try:
        argv = ["--quick", "--n-train", "64", "--out", str(tmp_path)]
        assert bench.main(argv) == 0
    finally:
        numba.set_num_threads(threads[0])
        torch.set_num_threads(threads[1])
        if blas:
            threadpool_limits(limits=max(blas), user_api="blas")
    text = (tmp_path / "bench_cnn_fit_quick.md").read_text()
    assert text.strip() in capsys.readouterr().out
    result = json.loads((tmp_path / "bench_cnn_fit_quick.json").read_text())
    keys = [r["row"] for r in result["rows"]]
    assert keys == [
        f"{kind}-{arch}"
        for arch in ("vgg", "resnet")
        for kind in ("cpusparse", "torch-dense", "torch-narrow")
    ]
    by_key = {r["row"]: r for r in result["rows"]}
    assert by_key["torch-dense-vgg"]["torch_dense_over_row"] == 1.0
    # The narrow network has as many channels per convolution as the fit kept (VGG).
    kept = by_key["cpusparse-vgg"]["kept_channels_per_run"][0]
    assert by_key["torch-narrow-vgg"]["conv_widths_per_run"][0] == [max(1, k) for k in kept]
    assert by_key["torch-dense-vgg"]["conv_widths"] == [4, 4, 8, 8, 16, 16]
    assert all(r["per_epoch_s"] > 0 for r in result["rows"])
    assert "Target (cpusparse VGG >= 3x PyTorch dense per epoch)" in text


def test_importing_the_scripts_leaves_the_thread_settings_alone(monkeypatch):
    # Run as scripts they pin every library to one thread; imported (as here) they must
    # not: Numba refuses a new NUMBA_NUM_THREADS once its threads run, and every later
    # parallel kernel of the process would fail.
    names = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")
    for var in names:
        monkeypatch.delenv(var, raising=False)
    for script in ("bench_cnn_fit", "cnn_accuracy"):
        _load(script)
    import os

    assert [var for var in names if var in os.environ] == []
