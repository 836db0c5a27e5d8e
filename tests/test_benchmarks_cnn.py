"""Tests of the CNN benchmark scripts: MAC counts, resumable cells, the report, --quick."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest

from cpusparse.models import resnet, vgg

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


def _masks(*bits):
    return [np.array(b, dtype=bool) for b in bits]


def test_macs_of_a_tiny_vgg_match_a_hand_count(acc):
    # vgg((2, 4)) on 1x6x6: conv 1->2, conv 2->2 (6x6), pool to 3x3, conv 2->4, conv 4->4,
    # global pool, linear 4->3 (dense: all 12 weights).
    net = vgg((2, 4), (1, 6, 6), 3, rng=0)
    masks = _masks([1, 0], [1, 1], [1, 0, 1, 0], [0, 0, 1, 1])
    macs = acc.count_macs(net, masks, (1, 6, 6))
    hand = [
        1 * 1 * 9 * 36,  # 1 kept filter on the 1 input channel
        2 * 1 * 9 * 36,  # 2 kept filters on the 1 live channel of conv 0
        2 * 2 * 9 * 9,  # after the pool: 2 kept on 2 live
        2 * 2 * 9 * 9,  # 2 kept on the 2 channels conv 2 kept
        4 * 3,
    ]
    assert [m for _, m in macs["layers"]] == hand
    assert macs["total"] == sum(hand) == 1632
    assert macs["conv"] == sum(hand[:4])
    dense = 2 * 9 * 36 + 4 * 9 * 36 + 8 * 9 * 9 + 16 * 9 * 9 + 12
    assert acc.count_macs(net, None, (1, 6, 6))["total"] == dense
    assert acc.dense_cnn_macs("vgg", (2, 4), (1, 6, 6), 3) == dense


def test_macs_of_a_residual_block_follow_the_live_channels(acc):
    # Stem 1->4, block conv 4->4 and conv 4->4 with an identity shortcut, on 1x4x4.
    net = resnet((4,), (1, 4, 4), 10, rng=0)
    masks = _masks([1, 1, 0, 0], [0, 0, 0, 1], [0, 1, 1, 0])
    macs = acc.count_macs(net, masks, (1, 4, 4))
    hand = [2 * 1 * 9 * 16, 1 * 2 * 9 * 16, 2 * 1 * 9 * 16, 4 * 10]
    assert [m for _, m in macs["layers"]] == hand


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
