"""Wiring of the training step: each option reaches the stage it belongs to.

Every test recomputes a stage from the step's record with plain NumPy (an independent
optimizer update, the schedule's closed form, the projection called directly), so a
step that hands an option to the wrong stage, or shifts it by one step, fails.
"""

import math

import numpy as np
import pytest

from cpusparse import mlp
from cpusparse.method import project_scores
from cpusparse.training import TrainConfig, fixed_mask, init_state, spawn_streams, train_step


def problem(*, seed=0, density=0.4, **cfg):
    init, data, masks = spawn_streams(seed)
    net = mlp(6, (7, 5), 3, dtype=np.float64, rng=init)
    config = TrainConfig(density=density, **{"compact_every": 0, **cfg})
    state = init_state(net, config, data_rng=data, mask_rng=masks)
    rng = np.random.default_rng(seed + 1)
    x = rng.standard_normal((6, 9))
    y = rng.integers(0, 3, size=9)
    return state, config, x, y


def adam_reference(p, g, m, v, t, lr, weight_decay, betas=(0.9, 0.999), eps=1e-8):
    """One Adam step written from Kingma and Ba (L2 decay added to the gradient)."""
    d = g + weight_decay * p
    m = betas[0] * m + (1 - betas[0]) * d
    v = betas[1] * v + (1 - betas[1]) * d * d
    m_hat = m / (1 - betas[0] ** t)
    v_hat = v / (1 - betas[1] ** t)
    return p - lr * m_hat / (np.sqrt(v_hat) + eps), m, v


def sgd_reference(p, g, buf, lr, momentum, weight_decay, nesterov):
    d = g + weight_decay * p
    buf = momentum * buf + d if buf is not None else d
    step = d + momentum * buf if nesterov else buf
    return p - lr * step, buf


@pytest.mark.parametrize("optimizer", ["adam", "sgd"])
def test_weight_decay_goes_to_the_weights_only(optimizer):
    wd = 0.3
    state, config, x, y = problem(
        optimizer=optimizer, score_optimizer=optimizer, weight_decay=wd, lr=0.05, score_lr=0.05
    )
    before = [p.copy() for p in state.param_list()]
    score_before = state.score.copy()
    record = train_step(state, x, y, config, record=True).record
    for p0, p1, g in zip(before, state.param_list(), record.weight_grads, strict=True):
        if optimizer == "adam":
            want, _, _ = adam_reference(p0, g, 0 * p0, 0 * p0, 1, 0.05, wd)
        else:
            want, _ = sgd_reference(p0, g, None, 0.05, 0.9, wd, False)
        np.testing.assert_allclose(p1, want, rtol=1e-10, atol=1e-12)
        without, _, _ = adam_reference(p0, g, 0 * p0, 0 * p0, 1, 0.05, 0.0)
        assert optimizer == "sgd" or not np.allclose(p1, without, rtol=1e-10, atol=1e-12)
    # The scores: no weight decay, whatever the weights get.
    if optimizer == "adam":
        s, _, _ = adam_reference(score_before, record.dscore, 0, 0, 1, 0.05, 0.0)
    else:
        s, _ = sgd_reference(score_before, record.dscore, None, 0.05, 0.9, 0.0, False)
    np.testing.assert_allclose(record.score_before_projection, s, rtol=1e-10, atol=1e-12)


def test_nesterov_applies_to_the_weights_not_the_scores():
    state, config, x, y = problem(optimizer="sgd", score_optimizer="sgd", nesterov=True)
    score_before = state.score.copy()
    weights_before = [p.copy() for p in state.param_list()]
    record = train_step(state, x, y, config, record=True).record
    want, _ = sgd_reference(score_before, record.dscore, None, 1e-2, 0.9, 0.0, False)
    np.testing.assert_allclose(record.score_before_projection, want, rtol=1e-12)
    w_want, _ = sgd_reference(weights_before[0], record.weight_grads[0], None, 1e-3, 0.9, 0, True)
    np.testing.assert_allclose(state.param_list()[0], w_want, rtol=1e-12)


def test_topk_fixed_mask_never_takes_a_zero_score():
    state, config, x, y = problem(density=0.5)
    state.score[:] = 0.0
    state.score[[3, 17, 40]] = [0.2, 0.9, 0.5]
    assert math.floor(state.budget) > 3
    masks = fixed_mask(state, "topk")
    flat = np.concatenate(masks)
    assert flat.sum() == 3
    np.testing.assert_array_equal(np.flatnonzero(flat), [3, 17, 40])


def test_topk_fixed_mask_takes_the_largest_scores_within_the_budget():
    state, config, x, y = problem(density=0.1)
    rng = np.random.default_rng(5)
    state.score[:] = rng.uniform(0.01, 1, state.score.shape[0])
    k = math.floor(state.budget)
    flat = np.concatenate(fixed_mask(state, "topk"))
    assert flat.sum() == k
    assert state.score[flat].min() >= state.score[~flat].max()


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_recorded_learning_rates_follow_the_schedule_formula(schedule):
    total = 5
    state, config, x, y = problem(schedule=schedule, total_steps=total, lr=0.2, score_lr=0.4)
    for t in range(total + 2):
        record = train_step(state, x, y, config, record=True).record
        factor = (
            1.0 if schedule == "constant" else 0.5 * (1 + math.cos(math.pi * min(t, total) / total))
        )
        assert record.lr == pytest.approx(0.2 * factor, rel=1e-12, abs=1e-15), t
        assert record.score_lr == pytest.approx(0.4 * factor, rel=1e-12, abs=1e-15), t


def test_projection_settings_reach_the_projection():
    # A loose tolerance and a single bisection step give a visibly different threshold
    # from the defaults: the step must pass both settings on.
    state, config, x, y = problem(projection="bisection", projection_tol=0.4, projection_max_iter=1)
    record = train_step(state, x, y, config, record=True).record
    want, threshold = project_scores(
        record.score_before_projection, state.budget, method="bisection", tol=0.4, max_iter=1
    )
    _, default_threshold = project_scores(
        record.score_before_projection, state.budget, method="bisection"
    )
    assert threshold != default_threshold
    assert record.threshold == threshold
    np.testing.assert_array_equal(state.score, want)


@pytest.mark.parametrize("scope", ["weights", "weights+scores"])
def test_clip_scope_decides_what_enters_the_clipped_norm(scope):
    state, config, x, y = problem(
        clip_norm=1e-3, clip_scope=scope, optimizer="sgd", score_optimizer="sgd", momentum=0.0,
        score_momentum=0.0, lr=0.5, score_lr=0.5,
    )  # fmt: skip
    before = [p.copy() for p in state.param_list()]
    score_before = state.score.copy()
    record = train_step(state, x, y, config, record=True).record
    squares = sum(float(np.sum(g.astype(np.float64) ** 2)) for g in record.weight_grads)
    score_square = float(np.sum(record.dscore.astype(np.float64) ** 2))
    norm = math.sqrt(squares + (score_square if scope == "weights+scores" else 0.0))
    assert record.grad_norm == pytest.approx(norm, rel=1e-12)
    scale = 1e-3 / norm
    for p0, p1, g in zip(before, state.param_list(), record.weight_grads, strict=True):
        np.testing.assert_allclose(p1, p0 - 0.5 * g * scale, rtol=1e-10, atol=1e-15)
    score_scale = scale if scope == "weights+scores" else 1.0
    np.testing.assert_allclose(
        record.score_before_projection, score_before - 0.5 * record.dscore * score_scale,
        rtol=1e-10, atol=1e-15,
    )  # fmt: skip


def test_the_authors_preset():
    from cpusparse.tools.trace import make_trace
    from cpusparse.training.config import PRESETS, preset

    config = preset("authors", density=0.3)
    # The settings read in x-zho14/VRPGE-Sparse-Training (utils/conv_type.py,
    # trainers/default.py, utils/net_utils.py, configs/config.yaml), written out here
    # independently of the preset table.
    audited = dict(
        score_estimator="vrpge-sqrt", n_masks=2, projection="bisection", projection_tol=1e-3,
        projection_max_iter=21, clip_norm=3.0, clip_scope="weights+scores", optimizer="sgd",
        lr=0.1, momentum=0.9, nesterov=False, weight_decay=5e-4, score_optimizer="adam",
        score_lr=0.012, schedule="cosine", weight_grad="mean", finetune_lr=1e-3,
    )  # fmt: skip
    for name, value in audited.items():
        assert getattr(config, name) == value, name
    assert config.density == 0.3
    assert set(PRESETS["paper"]) == set()  # the paper preset is the table's defaults
    with pytest.raises(ValueError, match="preset must be one of 'paper', 'authors', got 'x'"):
        preset("x")
    trace = make_trace(preset="authors", steps=2, lr=0.05)
    import json

    meta = json.loads(str(trace["meta/config"]))
    assert meta["score_estimator"] == "vrpge-sqrt" and meta["lr"] == 0.05  # explicit wins
    assert meta["clip_norm"] == 3.0 and meta["projection_max_iter"] == 21


def test_finetune_lr_is_the_constant_rate_of_the_fixed_mask_phase():
    from cpusparse.training import finetune_step

    state, config, x, y = problem(
        optimizer="sgd", momentum=0.0, lr=0.5, schedule="cosine", total_steps=4, finetune_lr=0.02
    )
    masks = fixed_mask(state)
    for _ in range(6):  # past the end of the schedule, where it would be 0
        before = [p.copy() for p in state.param_list()]
        finetune_step(state, x, y, masks, config)
        moved = [
            float(np.abs(a - b).max()) for a, b in zip(state.param_list(), before, strict=True)
        ]
        assert max(moved) > 0
    # One step at lr 0.02 from the current weights, computed independently.
    from cpusparse.engine.losses import softmax_cross_entropy

    before = [p.copy() for p in state.param_list()]
    logits, caches = state.network._forward(x, masks)
    _, dlogits = softmax_cross_entropy(logits, y)
    _, grads = state.network._backward(dlogits, caches)
    finetune_step(state, x, y, masks, config)
    for p0, p1, g in zip(before, state.param_list(), grads.values(), strict=True):
        np.testing.assert_allclose(p1, p0 - 0.02 * g, rtol=1e-12, atol=1e-15)
