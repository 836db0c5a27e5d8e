"""Tests of the benchmark library (cpusparse.tools.bench): counts and outputs, no timings."""

import json

import numpy as np
import pytest

from cpusparse import mlp
from cpusparse.tools import bench
from cpusparse.training import TrainConfig, init_state, spawn_streams

N_BATCH = 5


def _net(granularity):
    # SparseLinear 3 -> 4 (12 stored), SparseLinear 4 -> 2 (8 stored), Linear 2 -> 2 (4).
    return mlp(3, (4, 2), 2, granularity=granularity, dtype=np.float64, rng=0)


def test_count_macs_weight_granularity_by_hand():
    net = _net("weight")
    m0 = np.zeros(12, dtype=bool)
    m0[[0, 3, 4, 7, 11]] = True  # 5 active weights in the first layer
    m1 = np.zeros(8, dtype=bool)
    m1[[1, 2, 6]] = True  # 3 in the second
    got = bench.count_macs(net, [m0, m1], N_BATCH)
    # forward: (5 + 3 + 4) * B; backward: first layer dweight only (5 B), then
    # dweight + dx for the second sparse layer (2 * 3 B) and the dense classifier (2 * 4 B).
    assert got["n_active"] == [5, 3, 4]
    assert got["forward"] == (5 + 3 + 4) * N_BATCH
    assert got["backward"] == 5 * N_BATCH + 2 * 3 * N_BATCH + 2 * 4 * N_BATCH


def test_count_macs_neuron_granularity_skips_dropped_columns():
    net = _net("neuron")
    rows0 = np.array([True, False, True, False])  # 2 rows x 3 inputs = 6 weights
    rows1 = np.array([True, False])  # 1 row x 2 surviving inputs = 2 weights
    got = bench.count_macs(net, [rows0, rows1], N_BATCH)
    assert got["n_active"] == [6, 2, 4]
    assert got["forward"] == (6 + 2 + 4) * N_BATCH
    assert got["backward"] == 6 * N_BATCH + 2 * 2 * N_BATCH + 2 * 4 * N_BATCH


@pytest.mark.parametrize("granularity", ["weight", "neuron"])
def test_straight_through_counts_every_stored_weight_like_dense(granularity):
    net = _net(granularity)
    masks = [np.zeros(n, dtype=bool) for n in net.n_units()]
    got = bench.count_macs(net, masks, N_BATCH, straight_through=True)
    dense = bench.dense_macs((3, 4, 2, 2), N_BATCH)
    assert got["n_active"] == [12, 8, 4]
    assert (got["forward"], got["backward"]) == (dense["forward"], dense["backward"])
    assert dense == {"forward": 120, "backward": 180, "total": 300}


@pytest.mark.parametrize("granularity", ["weight", "neuron"])
def test_steady_state_is_an_exact_budget_compacted_pattern(granularity):
    init_rng, data_rng, mask_rng = spawn_streams(0)
    net = mlp(20, (16, 8), 4, granularity=granularity, rng=init_rng)
    config = TrainConfig(density=0.25, compact_every=0)
    state = init_state(net, config, data_rng=data_rng, mask_rng=mask_rng)
    bench.steady_state(state, rng=1)
    assert set(np.unique(state.score)) <= {0.0, 1.0}
    assert state.score.sum() <= state.budget
    layers = [state.network.layers[i] for i in state.network.prunable]
    kept = (
        [int(np.floor(0.25 * n)) for n in (20 * 16, 16 * 8)] if granularity == "weight" else [4, 2]
    )
    if granularity == "weight":
        assert [layer.nnz for layer in layers] == kept
        assert np.all(state.score == 1)
    else:
        assert [layer.nnz for layer in layers] == [4 * 20, 2 * 16]
    # Deterministic masks: K = 2 passes over the kept pattern, counted exactly.
    macs = bench.iteration_macs(state, config, N_BATCH)
    one = bench.count_macs(state.network, [None] * len(layers), N_BATCH)
    if granularity == "weight":
        assert macs["total"] == 2 * (one["forward"] + one["backward"])
    else:
        assert 0 < macs["total"] < 2 * (one["forward"] + one["backward"])


def test_quick_run_writes_json_markdown_and_png(tmp_path):
    baselines = ["dense-engine"]
    for module in ("torch", "sklearn"):
        try:
            __import__(module)
            baselines.append(module)
        except ImportError:
            pass
    argv = [
        "--quick",
        "--out",
        str(tmp_path),
        "--arch",
        "20,16,8,4:8",
        "--densities",
        "0.5",
        "0.25",
        "--repeats",
        "1",
        "--warmup",
        "0",
        "--no-startup",
        "--baselines",
        *baselines,
    ]
    assert bench.main(argv) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    rows = result["rows"]
    # per density: 2 granularities x (VR-PGE start + steady, straight-through) + baselines
    assert len(rows) == 2 * (2 * 3 + len(baselines))
    expected = {
        "architecture",
        "n_batch",
        "density",
        "method",
        "granularity",
        "regime",
        "median_ms",
        "peak_step_bytes",
        "state_bytes",
        "macs",
        "macs_forward",
        "macs_backward",
        "dense_macs",
        *(f"speedup_vs_{b}" for b in baselines),
    }
    for row in rows:
        assert expected <= set(row), expected - set(row)
        assert row["median_ms"] > 0
        assert row["state_bytes"] > 0
        assert row["macs"] == row["macs_forward"] + row["macs_backward"] > 0
    engine = [r for r in rows if r["method"] in ("vrpge", "straight-through")]
    assert all(r["peak_step_bytes"] > 0 for r in engine)
    assert {(r["method"], r["regime"]) for r in engine} == {
        ("vrpge", "start"),
        ("vrpge", "steady"),
        ("straight-through", "start"),
    }
    assert all("speedup_vs_straight_through" in r for r in engine if r["method"] == "vrpge")
    assert {r["method"] for r in rows} == {"vrpge", "straight-through", *baselines}
    md = (tmp_path / "bench.md").read_text()
    assert "| method |" in md and "steady" in md and "start" in md and "20-16-8-4" in md
    png = (tmp_path / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_threads_is_a_usage_error(tmp_path, capsys):
    assert bench.main(["--threads", "0", "--out", str(tmp_path)]) == 2
    assert "argument --threads: must be an int >= 1, got 0" in capsys.readouterr().err
