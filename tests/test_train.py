"""The training step: each stage of Algorithm 1 checked against an independent computation."""

import copy

import numpy as np
import pytest

from cpusparse import method as estimators
from cpusparse import mlp
from cpusparse.engine.losses import softmax_cross_entropy
from cpusparse.training import (
    NonFiniteError,
    TrainConfig,
    compact,
    dead_units,
    droppable_fraction,
    expected_density,
    fixed_mask,
    init_state,
    iterate_batches,
    run_epoch,
    spawn_streams,
    split_masks,
    train_step,
)


def make_problem(granularity="weight", *, seed=0, dtype=np.float64, density=0.4, **cfg):
    init, data, mask = spawn_streams(seed)
    net = mlp(6, (7, 5), 3, granularity=granularity, dtype=dtype, rng=init)
    config = TrainConfig(density=density, **{"compact_every": 0, **cfg})
    state = init_state(net, config, data_rng=data, mask_rng=mask)
    rng = np.random.default_rng(seed + 100)
    x = rng.standard_normal((6, 9)).astype(dtype)
    y = rng.integers(0, 3, size=9)
    return state, config, x, y


def dense_loss(state, x, y, flat_mask):
    """Loss of the MLP with real-valued masks, in plain NumPy (no cpusparse kernels)."""
    masks = split_masks(state, np.asarray(flat_mask, dtype=np.float64))
    h = x
    p = 0
    layers = state.network.layers
    for i, layer in enumerate(layers):
        if i in state.network.prunable:
            w = layer.to_dense()
            m = masks[p]
            p += 1
            if layer.granularity == "weight":
                dense_m = layer.to_dense(np.ones(layer.nnz, dtype=bool)) * 0
                rows = np.repeat(np.arange(layer.shape[0]), np.diff(layer.indptr))
                dense_m[rows, layer.indices] = m
                pre = (w * dense_m) @ h + layer.bias[:, None]
                h = np.maximum(pre, 0) if layer.activation == "relu" else pre
            else:
                pre = w @ h + layer.bias[:, None]
                act = np.maximum(pre, 0) if layer.activation == "relu" else pre
                h = m[:, None] * act
        else:
            h = layer.weight @ h + layer.bias[:, None]
    return softmax_cross_entropy(h, y)[0]


@pytest.mark.parametrize("granularity", ["weight", "neuron"])
def test_step_is_bit_reproducible(granularity):
    results = []
    for _ in range(2):
        state, config, x, y = make_problem(granularity)
        losses = [train_step(state, x, y, config).losses for _ in range(5)]
        results.append((np.array(losses), state.score.copy(), state.param_list()))
    (l1, s1, p1), (l2, s2, p2) = results
    assert np.array_equal(l1, l2) and np.array_equal(s1, s2)
    assert all(np.array_equal(a, b) for a, b in zip(p1, p2, strict=True))
    state, config, x, y = make_problem(granularity, seed=1)
    other = np.array([train_step(state, x, y, config).losses for _ in range(5)])
    assert not np.array_equal(l1, other)


@pytest.mark.parametrize("granularity", ["weight", "neuron"])
@pytest.mark.parametrize("estimator", ["vrpge", "vrpge-sqrt", "reinforce"])
@pytest.mark.parametrize("n_masks", [2, 3])
def test_step_stages_match_independent_computation(granularity, estimator, n_masks):
    state, config, x, y = make_problem(granularity, score_estimator=estimator, n_masks=n_masks)
    train_step(state, x, y, config)  # move away from the uniform initial scores
    before = copy.deepcopy(state.network)
    record = train_step(state, x, y, config, record=True).record

    # 1. masks are the documented comparison of the uniforms with the scores
    assert np.array_equal(record.masks, record.uniforms < record.score)
    # 2. the K losses are those of the masked network (plain NumPy forward)
    ref_state = copy.copy(state)
    ref_state.network = before
    for k in range(n_masks):
        expected = dense_loss(ref_state, x, y, record.masks[k])
        assert record.losses[k] == pytest.approx(expected, rel=1e-12)
    # 3. the weight gradient is the mean of the per-sample sparse backward passes
    per_sample = record.weight_grads_per_pass
    assert len(per_sample) == n_masks
    for j, g in enumerate(record.weight_grads):
        np.testing.assert_allclose(g, np.mean([s[j] for s in per_sample], axis=0), rtol=1e-12)
    for k in range(n_masks):
        _, grads, _ = before.loss_and_grads(x, y, split_masks(state, record.masks[k]))
        flat = list(grads.values())
        for a, b in zip(flat, per_sample[k], strict=True):
            np.testing.assert_array_equal(a, b)
    # 4. the score gradient is the chosen estimator of those losses and masks
    fn = {
        "vrpge": lambda *a: estimators.vrpge_grad(*a),
        "vrpge-sqrt": lambda *a: estimators.vrpge_grad(*a, scaling="sqrt"),
        "reinforce": lambda *a: estimators.reinforce_grad(*a),
    }[estimator]
    expected = fn(record.losses, record.masks, record.score)
    np.testing.assert_allclose(record.dscore, expected, rtol=1e-12, atol=1e-15)
    # 6. the new scores are the projection of the optimizer's output
    projected = np.clip(record.score_before_projection - record.threshold, 0, 1)
    np.testing.assert_allclose(state.score, projected, atol=1e-12)
    assert state.score.sum() <= state.budget + 1e-9


def test_weight_grad_first_uses_one_backward():
    state, config, x, y = make_problem(weight_grad="first", n_masks=3)
    record = train_step(state, x, y, config, record=True).record
    assert len(record.weight_grads_per_pass) == 1
    for a, b in zip(record.weight_grads, record.weight_grads_per_pass[0], strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("granularity", ["weight", "neuron"])
def test_straight_through_score_gradient_is_dloss_dmask(granularity):
    state, config, x, y = make_problem(granularity, score_estimator="straight-through")
    before = copy.deepcopy(state.network)
    record = train_step(state, x, y, config, record=True).record
    ref_state = copy.copy(state)
    ref_state.network = before
    fd = []
    eps = 1e-6
    for mask in record.masks:
        m = mask.astype(np.float64)
        g = np.empty_like(m)
        for i in range(m.size):
            up, down = m.copy(), m.copy()
            up[i] += eps
            down[i] -= eps
            g[i] = (dense_loss(ref_state, x, y, up) - dense_loss(ref_state, x, y, down)) / (2 * eps)
        fd.append(g)
    np.testing.assert_allclose(record.dscore, np.mean(fd, axis=0), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("projection", ["exact", "bisection"])
def test_scores_stay_feasible_during_training(projection):
    state, config, x, y = make_problem(
        projection=projection, score_lr=0.3, dtype=np.float32, density=0.3
    )
    tol = 0 if projection == "exact" else config.projection_tol
    for _ in range(20):
        train_step(state, x, y, config)
        assert state.score.min() >= 0 and state.score.max() <= 1
        assert state.score.sum(dtype=np.float64) <= state.budget + tol + 1e-4
    assert expected_density(state) <= 0.3 + 1e-4


def test_compact_drops_zero_scores_and_keeps_everything_else_aligned():
    state, config, x, y = make_problem(density=0.5)
    for _ in range(3):
        train_step(state, x, y, config)
    layer = state.network.layers[0]
    n0 = state.score.shape[0]
    s = state.score[: layer.nnz]
    s[::3] = 0  # units that can never be sampled again
    keep = s > 0
    old_weight = layer.weight.copy()
    old_state = {k: v.copy() for k, v in state.weight_state[0].items()}
    old_scores = state.score.copy()
    x_masks = [np.ones(n, dtype=bool) for n in state.network.n_units()]
    x_masks[0] = keep.copy()
    out_before, _ = state.network.forward(x, x_masks)

    kept = compact(state, state.score == 0)

    dropped = int((~keep).sum())
    assert kept.shape == (n0,) and int((~kept).sum()) == dropped
    assert state.score.shape[0] == n0 - dropped
    new = state.network.layers[0]
    np.testing.assert_array_equal(new.weight, old_weight[keep])
    for key, value in old_state.items():
        if np.ndim(value):
            np.testing.assert_array_equal(state.weight_state[0][key], value[keep])
    kept_scores = np.concatenate([old_scores[: layer.nnz][keep], old_scores[layer.nnz :]])
    np.testing.assert_array_equal(state.score, kept_scores)
    np.testing.assert_array_equal(state.offsets, np.cumsum([0, *state.network.n_units()]))
    new_masks = [np.ones(n, dtype=bool) for n in state.network.n_units()]
    out_after, _ = state.network.forward(x, new_masks)
    np.testing.assert_array_equal(out_before, out_after)
    train_step(state, x, y, config)  # the compacted state trains on


def test_fixed_mask_topk_is_within_budget_and_takes_the_largest_scores():
    state, config, x, y = make_problem(density=0.25)
    for _ in range(5):
        train_step(state, x, y, config)
    masks = fixed_mask(state)
    flat = np.concatenate(masks)
    k = int(np.floor(state.budget))
    assert flat.sum() == min(k, int((state.score > 0).sum()))
    assert flat.sum() / state.n_units_initial <= 0.25
    if flat.any() and (~flat).any():
        assert state.score[flat].min() >= state.score[~flat].max()


def test_nonfinite_loss_stops_training_with_the_step():
    state, config, x, y = make_problem(lr=1e30, optimizer="sgd", momentum=0.0, dtype=np.float32)
    with pytest.raises(NonFiniteError, match="step"), np.errstate(all="ignore"):
        for _ in range(10):
            train_step(state, x, y, config)


def test_run_epoch_covers_the_data_once():
    state, config, x, y = make_problem()
    seen = []
    batches = []
    rng_copy = copy.deepcopy(state.data_rng)
    stats = run_epoch(state, x, y, config, batch_size=4, on_step=lambda s, loss: seen.append(loss))
    assert stats.n_steps == 3 == len(seen)
    order = np.concatenate(iterate_batches(y.shape[0], 4, rng_copy))
    np.testing.assert_array_equal(np.sort(order), np.arange(y.shape[0]))
    batches = iterate_batches(y.shape[0], 4, copy.deepcopy(rng_copy))
    assert [b.shape[0] for b in batches] == [4, 4, 1]
    assert stats.loss == pytest.approx(np.mean(seen))
    assert 0 < stats.realised_density < 1


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"density": 0.0}, "density"),
        ({"density": 1.5}, "density"),
        ({"n_masks": 1}, "n_masks"),
        ({"score_estimator": "foo"}, "estimator"),
        ({"projection": "foo"}, "projection"),
        ({"lr": -1.0}, "lr"),
        ({"clip_norm": 0.0}, "clip_norm"),
        ({"projection_tol": 0.0}, "projection_tol"),
        ({"projection_max_iter": 0}, "projection_max_iter"),
        ({"compact_every": -1}, "compact_every"),
        ({"compact_fraction": 1.5}, "compact_fraction"),
        ({"momentum": 1.0}, r"momentum must be a number in \[0, 1\), got 1.0"),
        ({"initial_score": 1.5}, r"initial_score must be a number in \[0, 1\] or None"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"compact_every": 0.5}, "compact_every must be an int >= 0, got 0.5"),
        ({"n_masks": True}, "n_masks must be an int >= 2, got True"),
        ({"density": "0.1"}, r"density must be a number in \(0, 1\], got '0.1'"),
        ({"nesterov": 1}, "nesterov must be True or False, got 1"),
    ],
)
def test_config_rejects_bad_types(kwargs, match):
    with pytest.raises(TypeError, match=match):
        TrainConfig(**kwargs)


@pytest.mark.parametrize("granularity", ["weight", "neuron"])
def test_step_compacts_once_enough_stored_weights_are_dead(granularity):
    state, _, x, y = make_problem(granularity, density=0.5)
    config = TrainConfig(density=0.5, compact_every=1, compact_fraction=0.25)
    first = state.network.layers[0]
    n_first = state.offsets[1]
    per_unit = 1 if granularity == "weight" else first.shape[1]
    total = sum(state.network.layers[i].nnz for i in state.network.prunable)
    nnz_before = first.nnz

    # a tenth of the stored weights dead: below the threshold
    n_dead = max(1, total // 10 // per_unit)
    state.score[:n_dead] = 0
    dead = dead_units(state, config)
    assert droppable_fraction(state, dead) == pytest.approx(n_dead * per_unit / total)

    # most of the first layer dead: the next step drops it
    state.score[: n_first * 3 // 4] = 0
    assert droppable_fraction(state, dead_units(state, config)) >= 0.25
    info = train_step(state, x, y, config)
    assert info.kept is not None
    if granularity == "weight":
        assert not info.kept[: n_first * 3 // 4].any()
    else:  # neurons keep their (zero) score; their rows lose their weights
        assert info.kept.all()
        assert np.diff(state.network.layers[0].indptr)[: n_first * 3 // 4].sum() == 0
    assert droppable_fraction(state, dead_units(state, config)) < 0.25
    assert state.network.layers[0].nnz < nnz_before


@pytest.mark.parametrize("granularity", ["weight", "neuron"])
@pytest.mark.parametrize(
    "optimizer", [{"score_optimizer": "adam"}, {"score_optimizer": "sgd", "score_momentum": 0.9}]
)
def test_dead_units_never_come_back(granularity, optimizer):
    # What makes compaction exact: without compaction, a unit that dead_units calls
    # dead keeps a score of exactly 0 for the rest of training. A score at 0 whose
    # optimizer average still points up is not called dead (it can come back).
    state, config, x, y = make_problem(
        granularity, density=0.2, score_lr=0.3, compact_every=0, **optimizer
    )
    ever_dead = np.zeros(state.score.shape[0], dtype=bool)
    zero_not_dead = 0
    for _ in range(60):
        train_step(state, x, y, config)
        dead = dead_units(state, config)
        assert np.all(state.score[ever_dead] == 0)
        ever_dead |= dead
        zero_not_dead += int(np.count_nonzero((state.score == 0) & ~dead))
    assert ever_dead.any()
    if optimizer["score_optimizer"] == "adam" and granularity == "weight":
        assert zero_not_dead > 0  # the optimizer-state condition matters here


def test_a_zero_score_with_an_upward_average_is_not_dead_and_comes_back():
    state, config, x, y = make_problem(density=0.3, compact_every=0)
    train_step(state, x, y, config)
    state.score[0] = 0
    state.score_state[0]["exp_avg"][0] = -1.0  # Adam's average pushes the score up
    state.score_state[0]["exp_avg_sq"][0] = 1.0
    assert not dead_units(state, config)[0]
    train_step(state, x, y, config)
    assert state.score[0] > 0


def test_straight_through_has_no_dead_units():
    state, config, x, y = make_problem(score_estimator="straight-through", score_lr=0.3)
    for _ in range(5):
        train_step(state, x, y, config)
    state.score[:5] = 0
    assert not dead_units(state, config).any()


def test_restored_state_keeps_a_layer_compacted_to_nothing(tmp_path):
    from cpusparse.training.checkpoint import load_checkpoint, restore_state, save_checkpoint

    state, config, x, y = make_problem(density=0.3)
    train_step(state, x, y, config)
    state.score[state.offsets[1] : state.offsets[2]] = 0  # the whole second layer
    compact(state, state.score == 0)
    assert state.network.layers[1].nnz == 0 and state.network.prunable == [0, 1]
    path = tmp_path / "ckpt.npz"
    save_checkpoint(path, state, config, epoch=1, phase="sparse", history=[])
    restored, _ = restore_state(load_checkpoint(path))
    assert restored.network.prunable == [0, 1]
    np.testing.assert_array_equal(restored.offsets, state.offsets)
    a, b = train_step(state, x, y, config), train_step(restored, x, y, config)
    np.testing.assert_array_equal(a.losses, b.losses)


def test_overflowing_inputs_name_the_layer_and_the_cause():
    state, config, x, y = make_problem(dtype=np.float32, density=1.0)
    with pytest.raises(
        NonFiniteError, match=r"output of layer \d \(\w+\) of pass 0 .*scale the data"
    ):
        train_step(state, np.sign(x) * np.float32(3e38), y, config)
    state, config, x, y = make_problem()
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(NonFiniteError, match="input batch holds NaN"):
        train_step(state, bad, y, config)
    state, config, x, y = make_problem()
    state.network.layers[1].weight[:] = np.inf  # whatever the masks keep
    with pytest.raises(NonFiniteError, match=r"weight of layer 1 \(SparseLinear\) is not finite"):
        train_step(state, x, y, config)


def test_score_overflow_is_a_non_finite_error_naming_the_step():
    state, config, x, y = make_problem(dtype=np.float32, score_optimizer="sgd", score_lr=1e300)
    with pytest.raises(
        NonFiniteError, match="scores are not finite after the score step at step 0"
    ):
        train_step(state, x, y, config)


def test_a_density_that_keeps_no_unit_is_refused():
    init, data, masks = spawn_streams(0)
    net = mlp(6, (7, 5), 3, rng=init)  # 42 + 35 = 77 prunable weights
    with pytest.raises(
        ValueError, match=r"keep at least one of the 77 .* smallest density .* 0.013"
    ):
        init_state(net, TrainConfig(density=0.01), data_rng=data, mask_rng=masks)
    init_state(net, TrainConfig(density=0.013), data_rng=data, mask_rng=masks)  # keeps one


def test_a_number_of_masks_that_cannot_fit_in_memory_is_refused():
    init, data, masks = spawn_streams(0)
    net = mlp(6, (7, 5), 3, rng=init)
    with pytest.raises(ValueError, match=r"n_masks=1000000000000 needs .* GiB per step"):
        init_state(net, TrainConfig(n_masks=10**12), data_rng=data, mask_rng=masks)


def test_nesterov_needs_sgd_with_momentum():
    with pytest.raises(ValueError, match="nesterov=True needs optimizer='sgd' and momentum > 0"):
        TrainConfig(optimizer="sgd", momentum=0.0, nesterov=True)
    with pytest.raises(ValueError, match="got optimizer='adam'"):
        TrainConfig(nesterov=True)
    TrainConfig(optimizer="sgd", nesterov=True)
