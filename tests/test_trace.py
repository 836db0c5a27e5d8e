"""Golden traces: round trip, reproducibility, draw order, verify, and a PyTorch replay."""

import hashlib
import importlib.util
import json
import os
import re

import numpy as np
import pytest

from cpusparse.tools.cli import main
from cpusparse.tools.trace import (
    FORMAT_VERSION,
    OUTSIDE_UNIFORM,
    TraceError,
    compare_traces,
    describe_format,
    load_trace,
    make_trace,
    write_trace,
)

DOCS = os.path.join(os.path.dirname(__file__), os.pardir, "docs")
SMALL = dict(layers=(12, 10, 8, 4), steps=2, batch_size=6, n_data=24)


pytestmark = pytest.mark.usefixtures("one_numba_thread")


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("trace") / "ref.npz"
    write_trace(path, **SMALL)
    return path


def _replay_module():
    pytest.importorskip("torch")
    return importlib.import_module("cpusparse.testing.replay_torch")


def _save(path, arrays):
    np.savez(path, **arrays)
    return path


# ---------------------------------------------------------------------------
# Writing and reading
# ---------------------------------------------------------------------------


def test_round_trip(tmp_path):
    path = tmp_path / "t.npz"
    written = write_trace(path, **SMALL, granularity="neuron", dtype="float32")
    loaded = load_trace(path)
    assert list(loaded) == list(written)
    for name, value in written.items():
        assert loaded[name].dtype == value.dtype, name
        assert loaded[name].shape == value.shape, name
        assert np.array_equal(loaded[name], value), name
    with np.load(path, allow_pickle=False) as data:  # plain numpy reads it, no pickles
        assert int(data["meta/format_version"]) == FORMAT_VERSION == 3
        assert data["step1/layer0/masks"].dtype == np.bool_
    assert os.listdir(tmp_path) == ["t.npz"]  # the temporary file is gone


def test_layout_shapes_and_metadata():
    trace = make_trace(**SMALL, n_masks=4, weight_grad="first")
    assert trace["step0/x"].shape == (6, 12) and trace["step0/y"].dtype == np.int64
    assert trace["step1/layer1/uniforms"].shape == (4, 8, 10)
    assert trace["step1/layer1/weight_grad_per_pass"].shape == (1, 8, 10)  # first pass only
    assert trace["step0/losses"].shape == (4,) and trace["step0/losses"].dtype == np.float64
    assert "step0/layer2/score" not in trace  # the dense classifier has no scores
    assert trace["step0/layer2/pattern"].all()
    meta = json.loads(str(trace["meta/config"]))
    assert meta["compact_every"] == 0 and meta["n_masks"] == 4
    options = json.loads(str(trace["meta/options"]))
    assert options["layers"] == [12, 10, 8, 4] and options["seed"] == 0
    assert float(trace["meta/budget"]) == 0.5 * (12 * 10 + 10 * 8)
    for name in ("numpy_version", "numba_version", "cpusparse_version", "conventions"):
        assert str(trace[f"meta/{name}"])


def test_bit_identical_when_written_twice(tmp_path):
    a, b, c = tmp_path / "a.npz", tmp_path / "b.npz", tmp_path / "c.npz"
    write_trace(a, **SMALL, seed=3)
    write_trace(b, **SMALL, seed=3)
    write_trace(c, **SMALL, seed=4)
    ta, tb, tc = load_trace(a), load_trace(b), load_trace(c)
    assert list(ta) == list(tb)
    assert all(np.array_equal(ta[n], tb[n]) and ta[n].dtype == tb[n].dtype for n in ta)
    digest = [hashlib.sha256(p.read_bytes()).hexdigest() for p in (a, b, c)]
    assert digest[0] == digest[1]  # no time stamps anywhere, not even in the zip entries
    assert digest[0] != digest[2]
    assert not np.array_equal(ta["step0/layer0/uniforms"], tc["step0/layer0/uniforms"])


def _philox_uniforms(key, n_masks, n):
    # The documented draw, rebuilt from NumPy's Generator and the Philox kernel's KAT-tested
    # block function, one counter at a time.
    from cpusparse.engine.kernels.philox import philox4x32_10

    k0, k1 = key & 0xFFFFFFFF, key >> 32
    words = np.empty(4, np.uint32)
    u = np.empty((n_masks, n))
    for k in range(n_masks):
        for c in range((n + 3) // 4):
            philox4x32_10(np.array([c, 0, k, 0], np.uint64), np.array([k0, k1], np.uint64), words)
            take = min(4, n - 4 * c)
            u[k, 4 * c : 4 * c + take] = words[:take] * 2.0**-32
    return u


@pytest.mark.parametrize("mask_draw", ["philox", "numpy"])
def test_draw_order_and_pattern_conventions(mask_draw):
    # The documented conventions, replayed: masks stream = 3rd child of SeedSequence(seed);
    # per step one key (philox) or one (K, n_units) draw (numpy) over array[pattern].
    trace = make_trace(
        **{**SMALL, "steps": 3}, seed=7, stored_density=0.6, n_masks=3, mask_draw=mask_draw
    )
    assert json.loads(str(trace["meta/options"]))["mask_draw"] == mask_draw
    mask_rng = np.random.default_rng(np.random.SeedSequence(7).spawn(3)[2])
    n_units = int(trace["meta/n_units"])
    for s in range(3):
        if mask_draw == "numpy":
            expected = mask_rng.random((3, n_units))
        else:
            key = int(mask_rng.integers(0, 2**64, dtype=np.uint64))
            expected = _philox_uniforms(key, 3, n_units)
        flat = []
        for layer in (0, 1):
            pre = f"step{s}/layer{layer}"
            pattern = trace[f"{pre}/pattern"]
            u = trace[f"{pre}/uniforms"]
            assert np.all(u[:, ~pattern] == OUTSIDE_UNIFORM)
            assert np.all(trace[f"{pre}/weight"][~pattern] == 0)
            assert not trace[f"{pre}/masks"][:, ~pattern].any()
            assert np.array_equal(trace[f"{pre}/masks"], u < trace[f"{pre}/score"])
            flat.append(u[:, pattern])
        assert 0.5 < trace["step0/layer0/pattern"].mean() < 0.7
        assert np.array_equal(np.concatenate(flat, axis=1), expected)


def test_steps_chain_and_projection():
    trace = make_trace(**{**SMALL, "steps": 3}, initial_score=0.6)  # infeasible start
    budget = float(trace["meta/budget"])
    thresholds = [float(trace[f"step{s}/threshold"]) for s in range(3)]
    assert thresholds[0] > 0.05  # the budget is active
    for s in range(3):
        pre = f"step{s}"
        total = 0.0
        for layer in (0, 1):
            before = trace[f"{pre}/layer{layer}/score_before_projection"]
            projected = trace[f"{pre}/layer{layer}/score_projected"]
            pattern = trace[f"{pre}/layer{layer}/pattern"]
            expected = np.clip(before - thresholds[s], 0, 1) * pattern
            assert np.array_equal(projected, expected)
            total += projected.sum()
            if s < 2:
                nxt = f"step{s + 1}/layer{layer}"
                assert np.array_equal(trace[f"{nxt}/score"], projected)
        assert total <= budget + 1e-9
        for layer in (0, 1, 2):
            if s < 2:
                for name in ("weight", "bias"):
                    now = trace[f"{pre}/layer{layer}/{name}_updated"]
                    assert np.array_equal(trace[f"step{s + 1}/layer{layer}/{name}"], now)
            per = trace[f"{pre}/layer{layer}/weight_grad_per_pass"]
            np.testing.assert_allclose(
                per.mean(axis=0),
                trace[f"{pre}/layer{layer}/weight_grad_mean"],
                rtol=1e-12,
                atol=1e-15,
            )


def test_digits_dataset_and_option_errors():
    trace = make_trace(layers=(64, 8, 10), dataset="digits", steps=1, batch_size=5)
    assert trace["step0/x"].shape == (5, 64) and trace["step0/x"].max() <= 1.0
    with pytest.raises(ValueError, match="64 inputs and end with 10 classes"):
        make_trace(layers=(20, 8, 10), dataset="digits")
    with pytest.raises(TypeError, match="unknown trace options"):
        make_trace(n_sample=3)
    with pytest.raises(ValueError, match="layers must hold"):
        make_trace(layers=(20, 5))
    with pytest.raises(ValueError, match=r"density must be a number in \(0, 1\]"):
        make_trace(density=1.5)
    with pytest.raises(TypeError, match="lr must be a finite number > 0, got '0.1'"):
        make_trace(lr="0.1")


# ---------------------------------------------------------------------------
# Comparing: the Python API and cpusparse verify
# ---------------------------------------------------------------------------


def test_compare_identical_and_tolerance_override(trace_file):
    ref = load_trace(trace_file)
    assert compare_traces(ref, trace_file).ok
    other = dict(ref)
    name = "step1/layer0/dscore"
    other[name] = ref[name].copy()
    idx = tuple(np.argwhere(ref[name] != 0)[3])
    other[name][idx] *= 1 + 1e-9
    report = compare_traces(ref, other)
    assert not report.ok and report.rtol == 1e-12 and report.atol == 1e-14
    (m,) = report.mismatches
    assert (m.kind, m.step, m.layer, m.element, m.n_bad) == ("value", 1, 0, idx, 1)
    assert m.ref == ref[name][idx] and m.other == other[name][idx]
    assert m.rel_err == pytest.approx(1e-9, rel=1e-3)
    assert compare_traces(ref, other, rtol=1e-6).ok
    assert compare_traces(ref, other, include=["step0/*"]).ok


def test_compare_float32_defaults_and_metadata_notes(tmp_path):
    ref = make_trace(**SMALL, dtype="float32")
    other = dict(ref)
    other["meta/numpy_version"] = np.array("0.0.0")
    other["step0/layer1/weight_updated"] = ref["step0/layer1/weight_updated"] * np.float32(1 + 2e-6)
    report = compare_traces(ref, other)
    assert report.ok and (report.rtol, report.atol) == (1e-5, 1e-6)
    assert any("meta/numpy_version" in note for note in report.notes)
    other["step0/layer1/weight_updated"] = ref["step0/layer1/weight_updated"] * np.float32(1 + 1e-4)
    assert [m.kind for m in compare_traces(ref, other).mismatches] == ["value"]


def test_verify_identical_exit_0(trace_file, capsys):
    assert main(["verify", str(trace_file), str(trace_file)]) == 0
    assert "OK: all arrays agree" in capsys.readouterr().out


@pytest.mark.parametrize("kind", ["value", "mask", "missing", "shape", "dtype"])
def test_verify_reports_each_kind(trace_file, tmp_path, capsys, kind):
    ref = load_trace(trace_file)
    other = dict(ref)
    if kind == "value":
        name = "step1/layer1/weight_grad_mean"
        other[name] = ref[name].copy()
        other[name][2, 3] += 1e-3
        expected = ("value", "   1     1  (2, 3)")
    elif kind == "mask":
        name = "step0/layer0/masks"
        other[name] = ref[name].copy()
        other[name][1, 4, 5] = ~other[name][1, 4, 5]
        expected = ("value", "   0     0  (1, 4, 5)")
    elif kind == "missing":
        name = "step1/layer2/bias_grad_mean"
        del other[name]
        expected = ("missing", "(absent)")
    elif kind == "shape":
        name = "step0/losses"
        other[name] = ref[name][:2]
        expected = ("shape", "(2,)")
    else:
        name = "step0/layer0/bias"
        other[name] = ref[name].astype(np.float32)
        expected = ("dtype", "float32")
    path = _save(tmp_path / "other.npz", other)
    assert main(["verify", str(trace_file), str(path)]) == 1
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if name in line)
    assert row.startswith(expected[0]) and expected[1] in row, row
    assert f"FAIL: 1 of {len(ref) - 11} arrays differ (1 {expected[0]})" in out
    report = compare_traces(ref, other)
    assert [(m.name, m.kind) for m in report.mismatches] == [(name, expected[0])]


def test_verify_usage_and_unreadable_exit_2(trace_file, tmp_path, capsys):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file")
    assert main(["verify", str(trace_file)]) == 2
    assert main(["verify", str(trace_file), str(tmp_path / "absent.npz")]) == 2
    assert main(["verify", str(trace_file), str(garbage)]) == 2
    assert main(["verify", str(trace_file), str(trace_file), "--rtol", "-1"]) == 2
    assert main(["verify", str(trace_file), str(trace_file), "--only", "nothing*"]) == 2
    assert "is not a valid .npz (zip) archive" in capsys.readouterr().err
    with pytest.raises(TraceError, match=r"trace .* is not a valid \.npz \(zip\) archive"):
        load_trace(garbage)
    future = dict(load_trace(trace_file))
    future["meta/format_version"] = np.array(99)
    with pytest.raises(TraceError, match="format version 99"):
        load_trace(_save(tmp_path / "future.npz", future))


def test_trace_cli(tmp_path, capsys):
    out = tmp_path / "cli.npz"
    args = ["--n-in", "12", "--hidden", "10,8", "--n-classes", "4", "--steps", "2"]
    args += [
        "--batch-size",
        "6",
        "--n-data",
        "24",
        "--score-estimator",
        "vrpge-sqrt",
        "--seed",
        "5",
    ]
    assert main(["trace", str(out), *args]) == 0
    assert "wrote" in capsys.readouterr().out
    api = make_trace(**SMALL, score_estimator="vrpge-sqrt", seed=5)
    assert compare_traces(api, out, rtol=0, atol=0).ok  # the CLI and the API agree exactly
    assert main(["trace", str(tmp_path / "x.npz"), "--density", "1.5"]) == 2
    assert main(["trace", str(tmp_path / "x.npz"), "--layers", "4,3,2", "--n-in", "4"]) == 2
    assert main(["trace", str(tmp_path / "x.npz"), "--score-estimator", "nope"]) == 2
    assert main(["trace", "--help"]) == 0
    assert not (tmp_path / "x.npz").exists()


# ---------------------------------------------------------------------------
# The PyTorch replay of cpusparse.testing.replay_torch
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("projection", ["exact", "bisection"])
@pytest.mark.parametrize("estimator", ["vrpge", "vrpge-sqrt"])
@pytest.mark.parametrize("granularity", ["weight", "neuron"])
def test_torch_replay_float64(granularity, estimator, projection):
    pytest.importorskip("torch")
    trace = make_trace(granularity=granularity, score_estimator=estimator, projection=projection)
    assert max(float(trace[f"step{s}/threshold"]) for s in range(3)) > 0
    assert _replay_module().replay(trace) == []


@pytest.mark.parametrize(
    "options",
    [
        dict(dtype="float32"),
        dict(
            dtype="float32",
            granularity="neuron",
            score_estimator="reinforce",
            optimizer="sgd",
            nesterov=True,
            weight_decay=1e-3,
            score_optimizer="sgd",
            clip_norm=0.1,
            weight_grad="first",
            stored_density=0.5,
            sparse_classifier=True,
            schedule="cosine",
        ),
    ],
    ids=["float32-adam", "float32-sgd-neuron-clip"],
)
def test_torch_replay_float32_and_options(options):
    pytest.importorskip("torch")
    trace = make_trace(**options)
    if "clip_norm" in options:
        assert float(trace["step0/grad_norm"]) > options["clip_norm"]  # clipping happens
    assert _replay_module().replay(trace) == []


def test_torch_replay_detects_errors():
    pytest.importorskip("torch")
    replay = _replay_module().replay
    trace = make_trace(**SMALL)
    for name, scale in [
        ("step1/layer0/dscore", 1 + 1e-9),
        ("step0/layer1/weight_grad_per_pass", 1 + 1e-9),
        ("step1/layer2/weight_updated", 1 + 1e-9),
        ("step0/layer0/score_projected", 1 + 1e-9),
    ]:
        bad = dict(trace)
        bad[name] = trace[name] * scale
        failures = replay(bad)
        assert failures and failures[0].startswith(name), (name, failures)
    bad = dict(trace)
    bad["meta/config"] = np.array(str(trace["meta/config"]).replace('"vrpge"', '"vrpge-sqrt"'))
    assert any("dscore" in f for f in replay(bad))


def test_docs_list_every_array():
    text = describe_format()  # the page installed with the package
    with open(os.path.join(DOCS, "trace_format.rst")) as f:
        docs_page = f.read()
    assert ".. include:: ../cpusparse/tools/trace_format.rst" in docs_page
    traces = [
        make_trace(**{**SMALL, "steps": 1}, optimizer="sgd", score_optimizer="sgd"),
        make_trace(**{**SMALL, "steps": 1}, granularity="neuron"),
    ]
    documented = set(re.findall(r"``([a-z0-9_/<>]+)``", text))
    for trace in traces:
        for name in trace:
            generic = re.sub(r"step\d+", "step<s>", re.sub(r"layer\d+", "layer<l>", name))
            assert generic in documented, f"{generic} is not documented in trace_format.rst"
    assert "literalinclude:: ../cpusparse/testing/replay_torch.py" in docs_page
    assert "format version 3" in text and "(m_k - \\bar m)" in text
