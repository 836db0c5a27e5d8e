"""The layer protocol: a layer kind defined here, outside the package, trains, checkpoints
and traces with no change to any file of the package; golden traces written by the
previous layout still verify bit for bit."""

import json
import pathlib

import numpy as np
import pytest
from conftest import assert_grad_close, central_differences

from cpusparse import Linear, ReLU, Sequential, SparseLinear
from cpusparse.engine.layers.base import LAYER_TYPES, STRAIGHT_THROUGH, TRAIN, Layer, UnitMap
from cpusparse.tools.trace import compare_traces, load_trace, make_trace, record_trace
from cpusparse.training import (
    TrainConfig,
    init_state,
    load_checkpoint,
    restore_state,
    run_epoch,
    save_checkpoint,
    spawn_streams,
    train_step,
)

pytestmark = pytest.mark.usefixtures("one_numba_thread")

DATA = pathlib.Path(__file__).parent / "data"


# ---------------------------------------------------------------------------
# A toy layer kind: a masked element-wise scale, out = (s * m) x, one unit per feature
# ---------------------------------------------------------------------------


class FeatureUnits(UnitMap):
    """One mask bit per feature of a :class:`MaskedScale`."""

    granularity = "feature"
    zeroes_outputs = True
    thins_fan_in = False

    def __init__(self, layer):
        self.layer = layer

    @property
    def n_units(self):
        return self.layer.scale.shape[0]

    @property
    def n_units_full(self):
        return self.n_units

    def stored_per_unit(self):
        return np.ones(self.n_units, dtype=np.int64)

    def compaction(self, dead):
        # A dropped feature keeps its place (it fixes the next layer's input size).
        return np.ones(dead.shape[0], dtype=bool), {"scale": np.ones(self.n_units, bool)}


class MaskedScale(Layer):
    """``out[j] = scale[j] * m[j] * x[j]``: a dropped feature is exactly 0."""

    def __init__(self, scale):
        self.scale = np.asarray(scale)
        self.units = FeatureUnits(self)

    @property
    def n_in(self):
        return self.scale.shape[0]

    @property
    def n_out(self):
        return self.scale.shape[0]

    def params(self):
        return {"scale": self.scale}

    def live_outputs(self, mask, live):
        if mask is None:
            return live
        return mask if live is None else mask & live

    def _forward(self, x, mask, live, mode):
        m = np.ones(self.n_in, dtype=bool) if mask is None else mask
        gain = self.scale * m
        out = gain[:, None] * x
        return out, (x, m, mode.straight_through)

    def _backward(self, dout, cache, need_dx):
        x, m, straight_through = cache
        dgain = np.einsum("jb,jb->j", dout, x)
        grads = {"scale": dgain * m}
        if straight_through:
            grads["mask"] = dgain * self.scale
        return (self.scale * m)[:, None] * dout if need_dx else None, grads

    def config(self):
        return {}


def toy_network(rng, dtype=np.float64):
    return Sequential(
        [
            SparseLinear.random(8, 6, activation="relu", dtype=dtype, rng=rng),
            MaskedScale(np.ones(6, dtype=dtype)),
            ReLU(),
            Linear.random(6, 3, dtype=dtype, rng=rng),
        ]
    )


def toy_data(seed=0, n=48):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 8))
    y = np.argmax(x[:, :3], axis=1)
    return x, y


def toy_state(config, seed=0):
    init, data, masks = spawn_streams(seed)
    return init_state(toy_network(init), config, data_rng=data, mask_rng=masks)


def test_a_layer_kind_defined_outside_the_package_is_registered():
    assert LAYER_TYPES["MaskedScale"] is MaskedScale
    net = toy_network(0)
    assert net.n_units() == [48, 6] and net.n_masks == 2
    assert [type(layer) for layer in net.prunable_layers()] == [SparseLinear, MaskedScale]


def test_the_toy_layer_gradients_by_finite_differences():
    rng = np.random.default_rng(1)
    net = toy_network(rng)
    net.layers[1].scale[:] = rng.uniform(0.5, 1.5, 6)
    x, y = toy_data(1, n=5)
    x = np.ascontiguousarray(x.T)
    masks = [rng.random(48) < 0.7, np.array([True, False, True, True, False, True])]
    loss, grads, _ = net.loss_and_grads(x, y, masks)

    def f():
        return net.loss_and_grads(x, y, masks)[0]

    for name, arr in net.params().items():
        assert_grad_close(grads[name], central_differences(f, arr), name)
    assert np.all(grads["1.scale"][~masks[1]] == 0) and np.any(grads["1.scale"] != 0)
    # A dropped feature is known zero downstream: the container tells the next layer.
    front = Sequential(net.layers[:3])
    out, _, live = front._run(x, masks, None, TRAIN)
    np.testing.assert_array_equal(live, masks[1])
    # Inside a container only the live rows are stored (a compact activation); the
    # full-array pass puts zeros in the others.
    full, _ = front._forward(x, masks, None, TRAIN)
    assert out.shape == (int(masks[1].sum()), x.shape[1])
    np.testing.assert_array_equal(full[masks[1]], out)
    assert np.all(full[~masks[1]] == 0)


@pytest.mark.parametrize("score_estimator", ["vrpge", "straight-through"])
def test_the_toy_layer_trains(score_estimator):
    config = TrainConfig(
        density=0.5, score_estimator=score_estimator, lr=0.05, score_lr=0.05, compact_every=0
    )
    state = toy_state(config)
    x, y = toy_data()
    x = np.ascontiguousarray(x.T)
    scale0 = state.network.layers[1].scale.copy()
    losses = [run_epoch(state, x, y, config, batch_size=8).loss for _ in range(15)]
    assert losses[-1] < 0.8 * losses[0], losses
    assert not np.array_equal(state.network.layers[1].scale, scale0)
    toy_scores = state.score[state.offsets[1] : state.offsets[2]]
    assert np.any(toy_scores != 0.5)  # the toy layer's keep probabilities learn too
    assert state.score.sum() <= state.budget * (1 + 1e-9)


def test_the_toy_layer_straight_through_pass_gives_the_mask_gradient():
    net = toy_network(2)
    x, y = toy_data(2, n=4)
    x = np.ascontiguousarray(x.T)
    masks = [np.ones(48, bool), np.ones(6, bool)]
    logits, caches = net._forward(x, masks, None, STRAIGHT_THROUGH)
    from cpusparse.engine.losses import softmax_cross_entropy

    _, dlogits = softmax_cross_entropy(logits, y)
    _, grads = net._backward(dlogits, caches)
    # dL/dm_j at m = 1 equals dL/dscale_j * scale_j / m_j (here scale = 1).
    np.testing.assert_allclose(grads["1.mask"], grads["1.scale"], rtol=1e-12)


def test_the_toy_layer_checkpoints_and_resumes_bit_identically(tmp_path):
    config = TrainConfig(density=0.5, lr=0.05, score_lr=0.05)
    x, y = toy_data()
    x = np.ascontiguousarray(x.T)
    straight = toy_state(config)
    for _ in range(3):
        run_epoch(straight, x, y, config, batch_size=8)
    resumed = toy_state(config)
    run_epoch(resumed, x, y, config, batch_size=8)
    path = tmp_path / "toy.npz"
    save_checkpoint(path, resumed, config, epoch=1, phase="sparse", history=[])
    ckpt = load_checkpoint(path)
    assert [rec["type"] for rec in ckpt["layers"]] == [
        "SparseLinear",
        "MaskedScale",
        "ReLU",
        "Linear",
    ]
    resumed, config2 = restore_state(ckpt)
    assert isinstance(resumed.network.layers[1], MaskedScale) and config2 == config
    for _ in range(2):
        run_epoch(resumed, x, y, config2, batch_size=8)
    pairs = zip(straight.network.params().items(), resumed.network.params().values(), strict=True)
    for (name, a), b in pairs:
        np.testing.assert_array_equal(a, b, err_msg=name)
    np.testing.assert_array_equal(straight.score, resumed.score)


def test_the_toy_layer_traces():
    config = TrainConfig(density=0.5, n_masks=3, lr=0.05, score_lr=0.05, compact_every=0)
    x, y = toy_data()
    trace = record_trace(toy_state(config), config, x, y, steps=2, batch_size=8)
    again = record_trace(toy_state(config), config, x, y, steps=2, batch_size=8)
    assert compare_traces(trace, again, rtol=0, atol=0).ok
    layers = json.loads(str(trace["meta/layers"]))
    assert layers[1]["type"] == "MaskedScale" and layers[1]["granularity"] == "feature"
    for s in range(2):
        pre = f"step{s}/layer1"
        assert trace[f"{pre}/masks"].shape == (3, 6)
        np.testing.assert_array_equal(
            trace[f"{pre}/masks"], trace[f"{pre}/uniforms"] < trace[f"{pre}/score"]
        )
        np.testing.assert_allclose(
            trace[f"{pre}/scale_grad_mean"], trace[f"{pre}/scale_grad_per_pass"].mean(axis=0)
        )
        assert not np.array_equal(trace[f"{pre}/scale_updated"], trace[f"{pre}/scale"])
        assert f"{pre}/pattern" not in trace  # the toy layer stores no weight matrix
    with pytest.raises(ValueError, match="compact_every must be 0"):
        record_trace(toy_state(TrainConfig(density=0.5)), TrainConfig(density=0.5), x, y,
                     steps=1, batch_size=8)  # fmt: skip


def test_train_step_record_matches_the_state_it_leaves():
    config = TrainConfig(density=0.5, compact_every=0)
    state = toy_state(config)
    x, y = toy_data(n=8)
    result = train_step(state, np.ascontiguousarray(x.T), y, config, record=True)
    record = result.record
    np.testing.assert_array_equal(record.dscore, result.dscore)
    np.testing.assert_array_equal(
        state.score, np.clip(record.score_before_projection - record.threshold, 0, 1)
    )
    assert train_step(state, np.ascontiguousarray(x.T), y, config).record is None


# ---------------------------------------------------------------------------
# Golden traces written by cpusparse 0.1 (format version 1) stay readable
# ---------------------------------------------------------------------------

GOLDEN = sorted(DATA.glob("golden_v1_*.npz"))
# The score-gradient formula of these estimators is unchanged since format version 1.
UNCHANGED = ("golden_v1_sparse_clf_reinforce_k4", "golden_v1_straight_through")


def test_there_are_golden_traces():
    assert len(GOLDEN) >= 4
    assert {p.stem for p in GOLDEN} >= set(UNCHANGED)


def _rerun_tolerance(trace):
    """Bit for bit, except where format version 3 changed values to rounding.

    Neuron layers now compute on BLAS blocks, and from 4,096 units on the projection's
    threshold comes from the selection, which agrees with the sort to rounding.
    """
    options = json.loads(str(trace["meta/options"]))
    if options.get("granularity") == "neuron" or int(trace["meta/n_units"]) >= 4096:
        return {}  # the verify defaults
    return {"rtol": 0, "atol": 0}


def _rerun(ref):
    options = json.loads(str(ref["meta/options"]))
    return make_trace(**options)


@pytest.mark.parametrize("path", [p for p in GOLDEN if p.stem in UNCHANGED], ids=lambda p: p.stem)
def test_golden_trace_verifies_bit_for_bit(path):
    ref = load_trace(path)  # upgraded to the current names
    assert int(ref["meta/upgraded_from"]) == 1
    trace = _rerun(ref)
    report = compare_traces(ref, trace, rtol=0, atol=0)
    assert report.ok, report.format()
    assert [n for n in ref if n != "meta/upgraded_from"] == list(trace)  # same order


@pytest.mark.parametrize(
    "path", [p for p in GOLDEN if p.stem not in UNCHANGED], ids=lambda p: p.stem
)
def test_golden_vrpge_trace_agrees_until_its_score_gradient(path):
    # Version 1 computed VR-PGE in the paper's form; everything before the first score
    # gradient is bit-identical, the gradient itself agrees to rounding (and is exactly
    # 0 now where all masks agree, where version 1 kept a residue).
    ref = load_trace(path)
    trace = _rerun(ref)
    before = [
        "step0/x", "step0/y", "step0/losses", "step0/grad_norm", "step0/layer*/masks",
        "step0/layer*/uniforms", "step0/layer*/score", "step0/layer*/weight",
        "step0/layer*/bias", "step0/layer*/*_grad_*",
    ]  # fmt: skip
    # Neuron layers compute on BLAS blocks since format version 3: the same values to
    # rounding (the verify defaults), not bit for bit.
    report = compare_traces(ref, trace, include=before, **_rerun_tolerance(ref))
    assert report.ok and report.n_compared > 20, report.format()
    for layer in (0, 1):
        name = f"step0/layer{layer}/dscore"
        masks = ref[f"step0/layer{layer}/masks"]
        agree = masks.all(axis=0) | ~masks.any(axis=0)
        scale = np.abs(ref[name]).max()
        np.testing.assert_allclose(trace[name], ref[name], rtol=0, atol=1e-6 * scale)
        assert np.all(trace[name][agree] == 0)


@pytest.mark.parametrize(
    "path", [p for p in GOLDEN if "straight_through" not in p.stem], ids=lambda p: p.stem
)
def test_golden_v1_traces_replay_in_pytorch(path):
    # The stage-isolated replay reads version 1 as written and as upgraded by load_trace.
    replay = pytest.importorskip("cpusparse.testing.replay_torch").replay
    with np.load(path, allow_pickle=False) as data:
        raw = {name: data[name] for name in data.files}
    assert replay(raw) == []
    assert replay(load_trace(path)) == []


# ---------------------------------------------------------------------------
# Golden traces written by cpusparse 0.2 before the Philox draw (format version 2)
# ---------------------------------------------------------------------------

GOLDEN_V2 = sorted(DATA.glob("golden_v2_*.npz"))


def test_there_are_version_2_golden_traces():
    assert len(GOLDEN_V2) >= 3
    sizes = [int(load_trace(p)["meta/n_units"]) for p in GOLDEN_V2]
    assert max(sizes) >= 4096  # one takes the selection path of the projection


@pytest.mark.parametrize("path", GOLDEN_V2, ids=lambda p: p.stem)
def test_golden_v2_trace_reruns_bit_for_bit_with_its_own_draw(path):
    # load_trace marks them mask_draw="numpy" (their draw), so a rerun of their options
    # reproduces every array, bit for bit (to rounding where neuron layers now compute
    # on BLAS blocks); with the Philox draw the masks differ.
    ref = load_trace(path)
    assert int(ref["meta/upgraded_from"]) == 2
    options = json.loads(str(ref["meta/options"]))
    assert options["mask_draw"] == "numpy"
    assert json.loads(str(ref["meta/config"]))["mask_draw"] == "numpy"
    trace = make_trace(**options)
    report = compare_traces(ref, trace, **_rerun_tolerance(ref))
    assert report.ok, report.format()
    philox = make_trace(**{**options, "mask_draw": "philox"})
    assert not np.array_equal(philox["step0/layer0/uniforms"], ref["step0/layer0/uniforms"])


@pytest.mark.parametrize("path", GOLDEN_V2, ids=lambda p: p.stem)
def test_golden_v2_traces_replay_in_pytorch(path):
    replay = pytest.importorskip("cpusparse.testing.replay_torch").replay
    with np.load(path, allow_pickle=False) as data:
        raw = {name: data[name] for name in data.files}
    assert replay(raw) == []
    assert replay(load_trace(path)) == []


# ---------------------------------------------------------------------------
# Containers inside containers, and a layer of any kind in last position
# ---------------------------------------------------------------------------


def nested_network(rng, dtype=np.float64):
    block = Sequential(
        [
            SparseLinear.random(6, 5, activation="relu", dtype=dtype, rng=rng),
            MaskedScale(np.ones(5)),
        ]
    )
    return Sequential(
        [
            SparseLinear.random(8, 6, activation="relu", dtype=dtype, rng=rng),
            block,
            Linear.random(5, 3, dtype=dtype, rng=rng),
        ]
    )


def test_a_nested_container_takes_its_masks_and_gives_its_gradients():
    rng = np.random.default_rng(11)
    net = nested_network(rng)
    assert net.n_masks == 3 and net.n_units() == [48, 30, 5]
    assert [type(la).__name__ for la in net.prunable_layers()] == [
        "SparseLinear",
        "SparseLinear",
        "MaskedScale",
    ]
    x, y = toy_data(5, n=4)
    x = np.ascontiguousarray(x.T)
    masks = [rng.random(n) < 0.7 for n in net.n_units()]
    loss, grads, _ = net.loss_and_grads(x, y, masks)
    assert set(grads) == set(net.params()) and "1.1.scale" in grads

    def f():
        return net.loss_and_grads(x, y, masks)[0]

    for name, arr in net.params().items():
        assert_grad_close(grads[name], central_differences(f, arr), name)


def test_a_nested_network_trains_compacts_and_checkpoints(tmp_path):
    config = TrainConfig(density=0.3, lr=0.05, score_lr=0.3, compact_fraction=0.01)
    init, data, masks = spawn_streams(2)
    state = init_state(nested_network(init), config, data_rng=data, mask_rng=masks)
    x, y = toy_data(6)
    x = np.ascontiguousarray(x.T)
    for _ in range(6):
        run_epoch(state, x, y, config, batch_size=8)
    inner = state.network.layers[1].layers[0]
    assert inner.nnz < 30  # the nested layer was compacted in place of the old one
    assert state.score.shape[0] == sum(state.network.n_units())
    path = tmp_path / "nested.npz"
    save_checkpoint(path, state, config, epoch=6, phase="sparse", history=[])
    restored, _ = restore_state(load_checkpoint(path))
    assert isinstance(restored.network.layers[1], Sequential)
    for (name, a), b in zip(
        state.network.params().items(), restored.network.params().values(), strict=True
    ):
        np.testing.assert_array_equal(a, b, err_msg=name)


def test_any_layer_kind_can_be_last():
    rng = np.random.default_rng(12)
    net = Sequential(
        [
            SparseLinear.random(8, 6, activation="relu", dtype=np.float64, rng=rng),
            Linear.random(6, 3, dtype=np.float64, rng=rng),
            MaskedScale(np.full(3, 2.0)),
        ]
    )
    x = rng.standard_normal((8, 5))
    out, caches = net.forward(x)
    dx, grads = net.backward(np.ones_like(out), caches, need_dx=True)
    assert dx.shape == x.shape and grads["2.scale"].shape == (3,)
    with pytest.raises(ValueError, match="dout must have shape"):
        net.backward(np.ones((4, 5)), caches)
