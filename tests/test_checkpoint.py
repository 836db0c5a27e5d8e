"""Checkpoints: round trip, atomic writes, errors, bit-identical resume of both phases."""

import json
import os

import numpy as np
import pytest
from conftest import assert_same_fit
from sklearn.datasets import load_digits

import cpusparse.sklearn as estimator_module
import cpusparse.training.checkpoint as checkpoint_module
from cpusparse.models import mlp
from cpusparse.sklearn import SparseMLPClassifier
from cpusparse.training import (
    NonFiniteError,
    TrainConfig,
    fixed_mask,
    init_state,
    run_epoch,
    spawn_streams,
)
from cpusparse.training.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    load_checkpoint,
    restore_state,
    save_checkpoint,
)

pytestmark = pytest.mark.usefixtures("one_numba_thread")


@pytest.fixture(scope="module")
def data():
    X, y = load_digits(return_X_y=True)
    return X[:600] / 16, y[:600]


def small_state(granularity="weight", optimizer="adam"):
    init, data_rng, mask_rng = spawn_streams(5)
    config = TrainConfig(
        density=0.3, optimizer=optimizer, schedule="cosine", total_steps=40, compact_every=3
    )
    net = mlp(6, (5, 4), 3, granularity=granularity, rng=init, dtype=np.float64)
    state = init_state(net, config, data_rng=data_rng, mask_rng=mask_rng)
    rng = np.random.default_rng(0)
    x = np.ascontiguousarray(rng.normal(size=(6, 30)))
    y = rng.integers(0, 3, size=30)
    return state, config, x, y


def fingerprint(state):
    """Everything a step reads, as comparable Python objects."""
    arrays = [arr for layer in state.network.layers for arr in layer.params().values()]
    arrays += [layer.indices for layer in state.network.layers if hasattr(layer, "indices")]
    arrays += [state.score, state.offsets]
    arrays += [v for entry in state.weight_state + state.score_state for v in entry.values()]
    return arrays, (state.step, state.budget, state.n_units_initial)


def assert_same_state(a, b):
    arrays_a, scalars_a = fingerprint(a)
    arrays_b, scalars_b = fingerprint(b)
    assert scalars_a == scalars_b
    assert len(arrays_a) == len(arrays_b)
    for u, v in zip(arrays_a, arrays_b, strict=True):
        assert u.dtype == v.dtype and u.shape == v.shape
        np.testing.assert_array_equal(u, v)


@pytest.mark.parametrize("granularity, optimizer", [("weight", "adam"), ("neuron", "sgd")])
def test_round_trip_then_identical_continuation(tmp_path, granularity, optimizer):
    state, config, x, y = small_state(granularity, optimizer)
    nnz_before = [layer.nnz for layer in state.network.layers[:2]]
    state.score[: state.offsets[1] * 3 // 4] = 0  # dead units: the next compaction drops them
    run_epoch(state, x, y, config, batch_size=8)  # 4 steps, compaction checked at step 3
    assert [layer.nnz for layer in state.network.layers[:2]] < nnz_before
    masks = fixed_mask(state)
    history = [{"phase": "sparse", "epoch": 1, "loss": 0.1 + 0.2, "grad_variance": float("nan")}]
    path = tmp_path / "ckpt.npz"
    save_checkpoint(
        path, state, config, epoch=1, phase="finetune", history=history, masks=masks, extra={"a": 1}
    )
    ckpt = load_checkpoint(path)
    assert ckpt["format_version"] == FORMAT_VERSION and ckpt["phase"] == "finetune"
    assert ckpt["epoch"] == 1 and ckpt["extra"] == {"a": 1}
    assert json.dumps(ckpt["history"]) == json.dumps(history)  # NaN and 0.30000000000000004
    for m, n in zip(masks, ckpt["masks"], strict=True):
        np.testing.assert_array_equal(m, n)
    restored, config2 = restore_state(ckpt)
    assert config2 == config
    assert_same_state(state, restored)
    for a, b in zip(state.network.layers, restored.network.layers, strict=True):
        assert type(a) is type(b) and a.shape == b.shape
        assert getattr(a, "granularity", None) == getattr(b, "granularity", None)
        assert a.activation == b.activation
    if optimizer == "adam":
        assert ckpt["weight_state"][0]["step"].shape == ()  # 0-d arrays survive
    # the random streams continue exactly where they were
    assert restored.data_rng.bit_generator.state == state.data_rng.bit_generator.state
    assert restored.mask_rng.bit_generator.state == state.mask_rng.bit_generator.state
    for _ in range(2):
        run_epoch(state, x, y, config, batch_size=8)
        run_epoch(restored, x, y, config2, batch_size=8)
    assert_same_state(state, restored)


def test_missing_corrupt_and_wrong_version(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint file not found"):
        load_checkpoint(tmp_path / "nope.npz")
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not a zip file at all")
    with pytest.raises(CheckpointError, match=r"is not a valid \.npz \(zip\) archive"):
        load_checkpoint(bad)
    state, config, _, _ = small_state()
    good = tmp_path / "good.npz"
    save_checkpoint(good, state, config, epoch=0, phase="sparse", history=[])
    truncated = tmp_path / "truncated.npz"
    truncated.write_bytes(good.read_bytes()[:-200])
    with pytest.raises(CheckpointError, match=r"is not a valid \.npz \(zip\) archive"):
        load_checkpoint(truncated)
    with np.load(good) as npz:
        arrays = {k: npz[k] for k in npz.files}
    meta = json.loads(str(arrays["meta"]))
    meta["format_version"] = FORMAT_VERSION + 1
    arrays["meta"] = np.array(json.dumps(meta))
    other = tmp_path / "other.npz"
    np.savez(other, **arrays)
    with pytest.raises(CheckpointError, match=f"format version {FORMAT_VERSION + 1}"):
        load_checkpoint(other)
    no_meta = tmp_path / "no_meta.npz"
    np.savez(no_meta, score=np.zeros(3))
    with pytest.raises(CheckpointError, match="no valid metadata"):
        load_checkpoint(no_meta)


def test_crash_during_write_keeps_old_checkpoint(tmp_path, monkeypatch):
    state, config, x, y = small_state()
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, state, config, epoch=0, phase="sparse", history=[])
    before = path.read_bytes()
    run_epoch(state, x, y, config, batch_size=8)

    def crash(src, dst):
        raise OSError("simulated crash before the rename")

    monkeypatch.setattr(checkpoint_module.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        save_checkpoint(path, state, config, epoch=1, phase="sparse", history=[])
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["ckpt.npz"]  # no temporary file left behind
    monkeypatch.undo()
    save_checkpoint(path, state, config, epoch=1, phase="sparse", history=[])
    assert load_checkpoint(path)["epoch"] == 1 and os.listdir(tmp_path) == ["ckpt.npz"]


class Interrupt(Exception):
    """Stands for a crash (kill, power loss) in the middle of an epoch."""


def interrupt_after(monkeypatch, n_epochs):
    """Make the estimator's run_epoch crash when it starts epoch ``n_epochs + 1``."""
    calls = []

    def run_epoch_then_crash(*args, **kwargs):
        if len(calls) == n_epochs:
            raise Interrupt
        calls.append(1)
        return run_epoch(*args, **kwargs)

    monkeypatch.setattr(estimator_module, "run_epoch", run_epoch_then_crash)


@pytest.mark.parametrize(
    "crash_after, params",
    [
        (2, {}),  # in the sparse phase
        (5, {"fixed_mask": "best-of-n", "validation_fraction": 0.2}),  # in fine-tuning
    ],
)
def test_resume_is_bit_identical(tmp_path, monkeypatch, data, crash_after, params):
    X, y = data
    params = dict(
        hidden_layer_sizes=(32,),
        density=0.2,
        max_iter=4,
        finetune_iter=2,
        learning_rate_init=0.01,
        random_state=11,
        **params,
    )
    reference = SparseMLPClassifier(**params, checkpoint=tmp_path / "ref.npz").fit(X, y)

    path = tmp_path / "run.npz"
    interrupt_after(monkeypatch, crash_after)
    with pytest.raises(Interrupt):
        SparseMLPClassifier(**params, checkpoint=path).fit(X, y)
    saved = load_checkpoint(path)
    phase = "sparse" if crash_after <= 4 else "finetune"
    assert saved["phase"] == phase and len(saved["history"]) == crash_after
    monkeypatch.undo()

    resumed = SparseMLPClassifier(**params, checkpoint=path, resume=True).fit(X, y)
    assert_same_fit(reference, resumed, X)
    final, ref_final = load_checkpoint(path), load_checkpoint(tmp_path / "ref.npz")
    assert final["phase"] == ref_final["phase"] == "finetune" and final["epoch"] == 2
    np.testing.assert_array_equal(final["score"], ref_final["score"])
    # resuming a finished run reproduces it without training
    again = SparseMLPClassifier(**params, checkpoint=path, resume=True).fit(X, y)
    assert_same_fit(reference, again, X)


def test_resume_refuses_other_parameters_or_data(tmp_path, data):
    X, y = data
    path = tmp_path / "run.npz"
    params = dict(hidden_layer_sizes=(8,), max_iter=1, finetune_iter=0, random_state=0)
    SparseMLPClassifier(**params, checkpoint=path).fit(X, y)
    with pytest.raises(ValueError, match=r"other parameters \(density: 0.1 != 0.2\)"):
        SparseMLPClassifier(**params, density=0.2, checkpoint=path, resume=True).fit(X, y)
    with pytest.raises(ValueError, match="other training data"):
        SparseMLPClassifier(**params, checkpoint=path, resume=True).fit(X[:-1], y[:-1])
    with pytest.raises(ValueError, match="random_state=0, got 1"):
        SparseMLPClassifier(**dict(params, random_state=1), checkpoint=path, resume=True).fit(X, y)
    # random_state=None takes the checkpoint's seed
    kwargs = dict(params, random_state=None)
    resumed = SparseMLPClassifier(**kwargs, checkpoint=path, resume=True).fit(X, y)
    assert resumed.n_iter_ == 1


def test_non_finite_parameter_stops_training_and_keeps_last_checkpoint(tmp_path, monkeypatch, data):
    X, y = data
    path = tmp_path / "run.npz"
    snapshots = []
    save = estimator_module.save_checkpoint

    def save_and_snapshot(*args, **kwargs):
        save(*args, **kwargs)
        snapshots.append(path.read_bytes())

    calls = []

    def run_epoch_poisoning_second(state, *args, **kwargs):
        stats = run_epoch(state, *args, **kwargs)
        calls.append(1)
        if len(calls) == 2:
            state.network.layers[0].weight[3] = np.nan
        return stats

    monkeypatch.setattr(estimator_module, "save_checkpoint", save_and_snapshot)
    monkeypatch.setattr(estimator_module, "run_epoch", run_epoch_poisoning_second)
    clf = SparseMLPClassifier(hidden_layer_sizes=(8,), max_iter=3, random_state=0, checkpoint=path)
    n_steps = 2 * -(-len(y) // 64)
    with pytest.raises(NonFiniteError, match=rf"layer 0 \(SparseLinear\) weight .* step {n_steps}"):
        clf.fit(X, y)
    assert len(snapshots) == 1 and path.read_bytes() == snapshots[0]
    assert load_checkpoint(path)["epoch"] == 1 and os.listdir(tmp_path) == ["run.npz"]


def test_huge_learning_rate_keeps_previous_checkpoint(tmp_path, data):
    X, y = data
    path = tmp_path / "run.npz"
    params = dict(hidden_layer_sizes=(8,), max_iter=1, finetune_iter=0, random_state=0)
    SparseMLPClassifier(**params, checkpoint=path).fit(X, y)
    before = path.read_bytes()
    clf = SparseMLPClassifier(**params, learning_rate_init=1e30, checkpoint=path)
    with pytest.raises(NonFiniteError, match=r"non-finite loss .* at step \d+"):
        clf.fit(X, y)
    assert path.read_bytes() == before


def test_a_version_2_checkpoint_resumes_with_its_own_mask_draw(tmp_path):
    # Version 2 checkpoints predate mask_draw: they were drawn with rng.random, and a
    # resumed run must keep drawing that way to stay bit-identical.
    state, config, _, _ = small_state()
    good = tmp_path / "good.npz"
    save_checkpoint(good, state, config, epoch=0, phase="sparse", history=[])
    with np.load(good) as npz:
        arrays = {k: npz[k] for k in npz.files}
    meta = json.loads(str(arrays["meta"]))
    assert meta["format_version"] == FORMAT_VERSION == 3
    assert meta["config"]["mask_draw"] == "philox"
    meta["format_version"] = 2
    del meta["config"]["mask_draw"]
    arrays["meta"] = np.array(json.dumps(meta))
    old = tmp_path / "v2.npz"
    np.savez(old, **arrays)
    _, restored = restore_state(load_checkpoint(old))
    assert restored.mask_draw == "numpy"
    _, current = restore_state(load_checkpoint(good))
    assert current.mask_draw == "philox"
