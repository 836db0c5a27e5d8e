import math
import pickle

import numpy as np
import pytest

from cpusparse.training import (
    SGD,
    Adam,
    clip_grad_norm,
    compact_state,
    constant_schedule,
    cosine_schedule,
)

SHAPES = [(3, 4), (5,), ()]
N_STEPS = 6
# Per-dtype tolerances for comparing implementations that round differently.
TOL = {np.float64: dict(rtol=1e-12, atol=1e-14), np.float32: dict(rtol=2e-5, atol=2e-6)}

SGD_CONFIGS = [
    dict(lr=0.1),
    dict(lr=0.05, weight_decay=0.01),
    dict(lr=0.1, momentum=0.9),
    dict(lr=0.1, momentum=0.9, weight_decay=1e-2),
    dict(lr=0.1, momentum=0.8, nesterov=True),
    dict(lr=0.02, momentum=0.5, nesterov=True, weight_decay=0.1),
]
ADAM_CONFIGS = [
    dict(lr=1e-3),
    dict(lr=0.1, betas=(0.8, 0.99)),
    dict(lr=0.01, weight_decay=0.1),
    dict(lr=0.05, betas=(0.0, 0.5), eps=1e-3),
]


def _problem(dtype, seed=0):
    """Parameters and a fixed sequence of gradients for N_STEPS steps."""
    rng = np.random.default_rng(seed)
    params = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    grads = [[rng.standard_normal(s).astype(dtype) for s in SHAPES] for _ in range(N_STEPS)]
    return params, grads


def _run(opt, params, grad_seq, lrs=None):
    params = [p.copy() for p in params]
    state = opt.init_state(params)
    for t, grads in enumerate(grad_seq):
        opt.step(params, grads, state, lr=None if lrs is None else lrs[t])
    return params, state


# ----------------------------------------------------------------- reference formulas
def _sgd_reference(params, grad_seq, lr, momentum=0.0, nesterov=False, weight_decay=0.0):
    """Textbook SGD in float64 (the PyTorch rule, written out independently)."""
    out = []
    for i, p in enumerate(params):
        theta = p.astype(np.float64)
        buf = None
        for grads in grad_seq:
            d = grads[i].astype(np.float64) + weight_decay * theta
            if momentum:
                buf = d.copy() if buf is None else momentum * buf + d
                d = d + momentum * buf if nesterov else buf
            theta = theta - lr * d
        out.append(theta)
    return out


def _adam_reference(params, grad_seq, lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
    """Textbook Adam (Kingma & Ba, with L2 added to the gradient) in float64."""
    b1, b2 = betas
    out = []
    for i, p in enumerate(params):
        theta = p.astype(np.float64)
        m = np.zeros_like(theta)
        v = np.zeros_like(theta)
        for t, grads in enumerate(grad_seq, start=1):
            d = grads[i].astype(np.float64) + weight_decay * theta
            m = b1 * m + (1 - b1) * d
            v = b2 * v + (1 - b2) * d**2
            m_hat = m / (1 - b1**t)
            v_hat = v / (1 - b2**t)
            theta = theta - lr * m_hat / (np.sqrt(v_hat) + eps)
        out.append(theta)
    return out


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("config", SGD_CONFIGS)
def test_sgd_matches_formula(config, dtype):
    params, grad_seq = _problem(dtype)
    got, state = _run(SGD(**config), params, grad_seq)
    want = _sgd_reference(params, grad_seq, **config)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == dtype
        np.testing.assert_allclose(g, w, **TOL[dtype])
    for s, p in zip(state, params, strict=True):
        if config.get("momentum"):
            assert set(s) == {"momentum_buffer"}
            assert s["momentum_buffer"].dtype == dtype
            assert s["momentum_buffer"].shape == p.shape
        else:
            assert s == {}


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("config", ADAM_CONFIGS)
def test_adam_matches_formula(config, dtype):
    params, grad_seq = _problem(dtype)
    got, state = _run(Adam(**config), params, grad_seq)
    want = _adam_reference(params, grad_seq, **config)
    for g, w in zip(got, want, strict=True):
        assert g.dtype == dtype
        np.testing.assert_allclose(g, w, **TOL[dtype])
    for s, p in zip(state, params, strict=True):
        assert s["step"].shape == () and s["step"].dtype == np.int64
        assert int(s["step"]) == N_STEPS
        assert s["exp_avg"].dtype == dtype and s["exp_avg_sq"].dtype == dtype
        assert s["exp_avg"].shape == p.shape


def _torch_run(torch_opt_cls, config, params, grad_seq, lrs=None):
    torch = pytest.importorskip("torch")
    tparams = [torch.tensor(p.copy(), requires_grad=True) for p in params]
    config = dict(config)
    if "betas" in config:
        config["betas"] = tuple(config["betas"])
    opt = torch_opt_cls(tparams, **config)
    for t, grads in enumerate(grad_seq):
        if lrs is not None:
            for group in opt.param_groups:
                group["lr"] = lrs[t]
        for tp, g in zip(tparams, grads, strict=True):
            tp.grad = torch.tensor(g.copy())
        opt.step()
    return [tp.detach().numpy() for tp in tparams], opt


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("config", SGD_CONFIGS)
def test_sgd_matches_torch(config, dtype):
    torch = pytest.importorskip("torch")
    params, grad_seq = _problem(dtype, seed=1)
    got, state = _run(SGD(**config), params, grad_seq)
    want, topt = _torch_run(torch.optim.SGD, config, params, grad_seq)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert w.dtype == dtype
        np.testing.assert_allclose(g, w, **TOL[dtype])
        if config.get("momentum"):
            tbuf = topt.state[topt.param_groups[0]["params"][i]]["momentum_buffer"]
            np.testing.assert_allclose(state[i]["momentum_buffer"], tbuf.numpy(), **TOL[dtype])


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("config", ADAM_CONFIGS)
def test_adam_matches_torch(config, dtype):
    torch = pytest.importorskip("torch")
    params, grad_seq = _problem(dtype, seed=2)
    got, state = _run(Adam(**config), params, grad_seq)
    want, topt = _torch_run(torch.optim.Adam, config, params, grad_seq)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        assert w.dtype == dtype
        np.testing.assert_allclose(g, w, **TOL[dtype])
        ts = topt.state[topt.param_groups[0]["params"][i]]
        np.testing.assert_allclose(state[i]["exp_avg"], ts["exp_avg"].numpy(), **TOL[dtype])
        np.testing.assert_allclose(state[i]["exp_avg_sq"], ts["exp_avg_sq"].numpy(), **TOL[dtype])
        assert int(state[i]["step"]) == int(ts["step"])


@pytest.mark.parametrize(
    ("cls", "torch_name", "config"),
    [(SGD, "SGD", dict(lr=0.1, momentum=0.9)), (Adam, "Adam", dict(lr=0.1))],
)
def test_lr_override_matches_torch(cls, torch_name, config):
    torch = pytest.importorskip("torch")
    params, grad_seq = _problem(np.float64, seed=3)
    schedule = cosine_schedule(config["lr"], N_STEPS, warmup_steps=2)
    lrs = [schedule(t) for t in range(N_STEPS)]
    got, _ = _run(cls(**config), params, grad_seq, lrs)
    want, _ = _torch_run(getattr(torch.optim, torch_name), config, params, grad_seq, lrs)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, **TOL[np.float64])
    # The override really is used: a different schedule gives different parameters.
    other, _ = _run(cls(**config), params, grad_seq)
    assert not np.allclose(other[0], got[0])


def test_lr_override_does_not_change_hyperparameters():
    opt = SGD(lr=0.1)
    p = [np.ones(2)]
    opt.step(p, [np.ones(2)], opt.init_state(p), lr=0.5)
    np.testing.assert_array_equal(p[0], [0.5, 0.5])
    assert opt.lr == 0.1


@pytest.mark.parametrize("opt", [SGD(momentum=0.9), Adam(lr=0.1)])
def test_step_does_not_modify_grads(opt):
    params, grad_seq = _problem(np.float64)
    grads = grad_seq[0]
    before = [g.copy() for g in grads]
    state = opt.init_state(params)
    opt.step(params, grads, state)
    opt.step(params, grads, state)
    for g, b in zip(grads, before, strict=True):
        np.testing.assert_array_equal(g, b)


def test_init_state_is_fresh_zeros():
    params = [np.ones((2, 2), np.float32)]
    s1 = Adam().init_state(params)
    s2 = Adam().init_state(params)
    assert s1[0]["exp_avg"] is not s2[0]["exp_avg"]
    np.testing.assert_array_equal(s1[0]["exp_avg"], 0)
    assert int(s1[0]["step"]) == 0


# ----------------------------------------------------------------------- compact_state
@pytest.mark.parametrize(
    "opt", [SGD(lr=0.1, momentum=0.9, nesterov=True), Adam(lr=0.05, weight_decay=0.1)]
)
@pytest.mark.parametrize("keep_kind", ["mask", "index"])
def test_compact_state_stays_aligned(opt, keep_kind):
    rng = np.random.default_rng(4)
    n = 20
    w = rng.standard_normal(n)
    state = opt.init_state([w])
    for _ in range(3):
        opt.step([w], [rng.standard_normal(n)], state)
    mask = rng.random(n) < 0.6
    keep = mask if keep_kind == "mask" else np.flatnonzero(mask)
    g = rng.standard_normal(n)

    # Path 1: step the full state, then subset.
    w_full = w.copy()
    state_full = [{k: v.copy() for k, v in state[0].items()}]
    opt.step([w_full], [g], state_full)

    # Path 2: subset, then step the compacted state.
    w_small = w[keep].copy()
    state_small = [compact_state(state[0], keep)]
    opt.step([w_small], [g[keep]], state_small)

    np.testing.assert_array_equal(w_small, w_full[keep])
    for key, value in state_full[0].items():
        expected = value if value.ndim == 0 else value[keep]
        np.testing.assert_array_equal(state_small[0][key], expected)


def test_compact_state_copies_and_leaves_original():
    s = {"step": np.array(4, dtype=np.int64), "exp_avg": np.arange(5.0)}
    out = compact_state(s, np.array([0, 2]))
    np.testing.assert_array_equal(out["exp_avg"], [0.0, 2.0])
    out["step"] += 1
    out["exp_avg"][0] = 99
    assert int(s["step"]) == 4 and s["exp_avg"][0] == 0.0
    assert compact_state({}, np.array([True])) == {}


def test_compact_state_2d_mask():
    s = {"buf": np.arange(6.0).reshape(2, 3)}
    mask = np.array([[True, False, True], [False, True, False]])
    np.testing.assert_array_equal(compact_state(s, mask)["buf"], [0.0, 2.0, 4.0])
    np.testing.assert_array_equal(
        compact_state(s, np.array([False, True]))["buf"], [[3.0, 4.0, 5.0]]
    )


def test_compact_state_bad_inputs():
    s = {"buf": np.zeros(4)}
    with pytest.raises(ValueError, match="keep has shape"):
        compact_state(s, np.array([True, False]))
    with pytest.raises(ValueError, match="indices must be in"):
        compact_state(s, np.array([0, 4]))
    with pytest.raises(TypeError, match="boolean mask or an integer"):
        compact_state(s, np.array([0.0, 1.0]))
    with pytest.raises(ValueError, match="1-D"):
        compact_state(s, np.zeros((1, 1), dtype=np.int64))
    with pytest.raises(ValueError, match="at least one dimension"):
        compact_state(s, np.int64(0))
    with pytest.raises(TypeError, match="state_i must be a dict"):
        compact_state([np.zeros(4)], np.array([0]))
    with pytest.raises(TypeError, match=r"state_i\['buf'\] must be an ndarray"):
        compact_state({"buf": [0.0]}, np.array([0]))


# ---------------------------------------------------------------------- clip_grad_norm
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_clip_grad_norm_scales_to_max_norm(dtype):
    rng = np.random.default_rng(5)
    grads = [rng.standard_normal(s).astype(dtype) for s in SHAPES]
    norm = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads))
    clipped, total = clip_grad_norm(grads, 0.5)
    assert total == pytest.approx(norm, rel=1e-14)
    new_norm = math.sqrt(sum(float(np.sum(c.astype(np.float64) ** 2)) for c in clipped))
    assert new_norm == pytest.approx(0.5, rel=1e-15 if dtype == np.float64 else 1e-6)
    for c, g in zip(clipped, grads, strict=True):
        assert c.dtype == dtype and c.shape == g.shape
        np.testing.assert_allclose(c, g * (0.5 / norm), **TOL[dtype])
        assert not np.shares_memory(c, g)


def test_clip_grad_norm_leaves_small_grads():
    grads = [np.array([0.3, 0.4]), np.array([[0.0]])]
    clipped, total = clip_grad_norm(grads, 1.0)
    assert total == pytest.approx(0.5)
    for c, g in zip(clipped, grads, strict=True):
        np.testing.assert_array_equal(c, g)
        assert c is not g
    clipped, total = clip_grad_norm(grads, None)
    assert total == pytest.approx(0.5)
    assert all(c is g for c, g in zip(clipped, grads, strict=True))
    clipped, total = clip_grad_norm([np.zeros(3)], 1.0)
    assert total == 0.0
    np.testing.assert_array_equal(clipped[0], 0.0)
    assert clip_grad_norm([], 1.0) == ([], 0.0)


def test_clip_grad_norm_matches_torch_norm():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(6)
    grads = [np.asarray(rng.standard_normal(s) * 10) for s in SHAPES]
    tparams = [torch.zeros(s, dtype=torch.float64, requires_grad=True) for s in SHAPES]
    for tp, g in zip(tparams, grads, strict=True):
        tp.grad = torch.tensor(g)
    tnorm = torch.nn.utils.clip_grad_norm_(tparams, 1.0)
    clipped, total = clip_grad_norm(grads, 1.0)
    assert total == pytest.approx(float(tnorm), rel=1e-12)
    # torch divides by (norm + 1e-6); only that difference remains.
    for c, tp in zip(clipped, tparams, strict=True):
        np.testing.assert_allclose(c, tp.grad.numpy(), rtol=1e-6)


def test_clip_grad_norm_bad_inputs():
    with pytest.raises(ValueError, match="max_norm must be finite and in"):
        clip_grad_norm([np.ones(2)], 0.0)
    with pytest.raises(ValueError, match="max_norm"):
        clip_grad_norm([np.ones(2)], -1.0)
    with pytest.raises(ValueError, match="gradient norm must be finite"):
        clip_grad_norm([np.array([np.inf])], 1.0)
    with pytest.raises(TypeError, match=r"grads\[0\] must have dtype"):
        clip_grad_norm([np.ones(2, dtype=np.int64)], 1.0)
    with pytest.raises(TypeError, match="grads must be a list"):
        clip_grad_norm(np.ones(2), 1.0)


# --------------------------------------------------------------------------- schedules
def test_constant_schedule():
    schedule = constant_schedule(0.3)
    assert [schedule(t) for t in (0, 1, 10**6)] == [0.3, 0.3, 0.3]
    with pytest.raises(ValueError, match="lr must be"):
        constant_schedule(-0.1)


@pytest.mark.parametrize("warmup", [0, 1, 5])
@pytest.mark.parametrize("min_lr", [0.0, 0.01])
def test_cosine_schedule_endpoints_and_monotonicity(warmup, min_lr):
    lr, total = 0.1, 50
    schedule = cosine_schedule(lr, total, min_lr=min_lr, warmup_steps=warmup)
    values = np.array([schedule(t) for t in range(total + 10)])
    assert values[warmup] == pytest.approx(lr, abs=0, rel=1e-15)
    assert values[total] == pytest.approx(min_lr, abs=1e-17)
    np.testing.assert_array_equal(values[total:], min_lr)
    if warmup:
        assert values[0] == pytest.approx(lr / warmup)
        assert np.all(np.diff(values[: warmup + 1]) >= 0)
        assert values[warmup - 1] == pytest.approx(lr)
    # Strictly decreasing from the peak to the end, never below min_lr.
    assert np.all(np.diff(values[warmup : total + 1]) < 0)
    assert values.min() >= min_lr and values.max() <= lr
    # Midpoint of the cosine phase is the average of lr and min_lr.
    if (total - warmup) % 2 == 0:
        mid = warmup + (total - warmup) // 2
        assert values[mid] == pytest.approx((lr + min_lr) / 2)


def test_cosine_matches_torch_cosine_annealing():
    torch = pytest.importorskip("torch")
    lr, total = 0.2, 12
    p = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([p], lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=0.02)
    ours = cosine_schedule(lr, total, min_lr=0.02)
    for t in range(total + 1):
        assert ours(t) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12)
        opt.step()
        sched.step()


def test_schedules_pickle():
    schedule = cosine_schedule(0.1, 10, warmup_steps=3, min_lr=0.001)
    clone = pickle.loads(pickle.dumps(schedule))
    assert [clone(t) for t in range(12)] == [schedule(t) for t in range(12)]
    assert "cosine_schedule(0.1, 10" in repr(schedule)


def test_schedule_bad_inputs():
    with pytest.raises(ValueError, match="warmup_steps must be < total_steps"):
        cosine_schedule(0.1, 5, warmup_steps=5)
    with pytest.raises(ValueError, match="total_steps must be >= 1"):
        cosine_schedule(0.1, 0)
    with pytest.raises(TypeError, match="total_steps must be an integer"):
        cosine_schedule(0.1, 10.0)
    with pytest.raises(ValueError, match=r"min_lr must be finite and in \[0, 0.1\]"):
        cosine_schedule(0.1, 10, min_lr=0.2)
    with pytest.raises(ValueError, match="warmup_steps must be >= 0"):
        cosine_schedule(0.1, 10, warmup_steps=-1)
    schedule = cosine_schedule(0.1, 10)
    with pytest.raises(ValueError, match="step must be >= 0"):
        schedule(-1)
    with pytest.raises(TypeError, match="step must be an integer"):
        schedule(1.5)
    with pytest.raises(TypeError, match="step must be an integer"):
        constant_schedule(0.1)(True)


# ------------------------------------------------------------------------ validation
@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(lr=-0.1), ValueError, r"lr must be finite and in \[0, inf\), got -0.1"),
        (dict(lr=float("nan")), ValueError, "lr must be finite"),
        (dict(lr="0.1"), TypeError, "lr must be a real number, got str"),
        (dict(momentum=1.0), ValueError, r"momentum must be finite and in \[0, 1\)"),
        (dict(momentum=-0.1), ValueError, "momentum"),
        (dict(nesterov=True), ValueError, "nesterov=True requires momentum > 0"),
        (dict(momentum=0.9, nesterov=1), TypeError, "nesterov must be a bool"),
        (dict(weight_decay=-1.0), ValueError, "weight_decay"),
    ],
)
def test_sgd_bad_hyperparameters(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        SGD(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(lr=-1.0), ValueError, "lr must be"),
        (dict(betas=(1.0, 0.999)), ValueError, r"betas\[0\] must be finite and in \[0, 1\)"),
        (dict(betas=(0.9, -0.1)), ValueError, r"betas\[1\]"),
        (dict(betas=(0.9,)), ValueError, "betas must be a pair"),
        (dict(eps=-1e-8), ValueError, "eps"),
        (dict(weight_decay=-0.1), ValueError, "weight_decay"),
    ],
)
def test_adam_bad_hyperparameters(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        Adam(**kwargs)


@pytest.mark.parametrize("opt", [SGD(momentum=0.9), Adam()])
def test_step_bad_inputs(opt):
    params = [np.zeros((2, 3)), np.zeros(4)]
    grads = [np.ones((2, 3)), np.ones(4)]
    state = opt.init_state(params)

    def check(exc, match, p=params, g=grads, s=state, **kw):
        with pytest.raises(exc, match=match):
            opt.step(p, g, s, **kw)

    check(ValueError, "same length, got 2, 1 and 2", g=grads[:1])
    check(ValueError, "same length", s=state[:1])
    check(ValueError, r"grads\[1\] must have shape \(4,\)", g=[grads[0], np.ones(5)])
    check(TypeError, r"grads\[1\] must have dtype float64", g=[grads[0], np.ones(4, np.float32)])
    check(
        TypeError,
        r"params\[0\] must have dtype float32 or float64",
        p=[params[0].astype(np.int64), params[1]],
    )
    check(TypeError, r"params\[0\] must be an ndarray", p=[[0.0] * 3, params[1]])
    check(TypeError, "params must be a list or tuple", p=np.zeros(3))
    check(ValueError, "lr must be", lr=-1.0)
    check(ValueError, r"state\[0\] must have keys", s=[{}, state[1]])
    check(TypeError, r"state\[0\] must be a dict", s=[None, state[1]])
    key = "momentum_buffer" if isinstance(opt, SGD) else "exp_avg"
    bad = dict(state[0], **{key: state[0][key].astype(np.float32)})
    check(TypeError, rf"state\[0\]\['{key}'\] must have dtype float64", s=[bad, state[1]])
    bad = dict(state[0], **{key: np.zeros(6)})
    check(ValueError, rf"state\[0\]\['{key}'\] must have shape", s=[bad, state[1]])
    frozen = params[0].copy()
    frozen.flags.writeable = False
    check(ValueError, "must be writeable", p=[frozen, params[1]])
    if isinstance(opt, Adam):
        bad = dict(state[0], step=np.zeros(1, np.int64))
        check(ValueError, r"'step'\] must be a 0-d int64 array", s=[bad, state[1]])
    # A failed validation changed nothing.
    np.testing.assert_array_equal(params[0], 0.0)
    for s in state:
        for v in s.values():
            np.testing.assert_array_equal(v, 0)


def test_sgd_without_momentum_uses_empty_state():
    opt = SGD(lr=0.1)
    params = [np.ones(3)]
    state = opt.init_state(params)
    assert state == [{}]
    with pytest.raises(ValueError, match="must have keys"):
        opt.step(params, [np.ones(3)], [{"momentum_buffer": np.zeros(3)}])


def test_reprs():
    assert repr(SGD(lr=0.5, momentum=0.9)) == (
        "SGD(lr=0.5, momentum=0.9, nesterov=False, weight_decay=0.0)"
    )
    assert repr(Adam()).startswith("Adam(lr=0.001, betas=(0.9, 0.999)")


# ---------------------------------------------------------------------------
# The element-wise kernels are the NumPy expressions of the docstrings, bit for bit
# ---------------------------------------------------------------------------


def _adam_numpy(p, g, m, v, t, lr, beta1, beta2, eps, wd):
    cast = p.dtype.type
    d = g + cast(wd) * p if wd != 0.0 else g
    m += cast(1.0 - beta1) * (d - m)
    v *= cast(beta2)
    v += cast(1.0 - beta2) * (d * d)
    denom = np.sqrt(v) / cast(np.sqrt(1.0 - beta2**t))
    denom += cast(eps)
    p -= cast(lr / (1.0 - beta1**t)) * m / denom


def _sgd_numpy(p, g, buf, lr, momentum, nesterov, wd):
    cast = p.dtype.type
    d = g + cast(wd) * p if wd != 0.0 else g
    if momentum != 0.0:
        buf *= cast(momentum)
        buf += d
        d = d + cast(momentum) * buf if nesterov else buf
    p -= cast(lr) * d


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("wd", [0.0, 5e-4])
def test_adam_kernel_is_the_numpy_expression_bit_for_bit(dtype, wd):
    rng = np.random.default_rng(4)
    p = rng.standard_normal((37, 29)).astype(dtype)
    ref_p, ref_m, ref_v = p.copy(), np.zeros_like(p), np.zeros_like(p)
    opt = Adam(lr=0.03, betas=(0.8, 0.99), eps=1e-6, weight_decay=wd)
    state = opt.init_state([p])
    for t in range(1, 6):
        g = (rng.standard_normal(p.shape) * 10.0 ** rng.integers(-4, 4, p.shape)).astype(dtype)
        opt.step([p], [g], state)
        _adam_numpy(ref_p, g, ref_m, ref_v, t, 0.03, 0.8, 0.99, 1e-6, wd)
        assert np.array_equal(p, ref_p) and np.array_equal(state[0]["exp_avg"], ref_m)
        assert np.array_equal(state[0]["exp_avg_sq"], ref_v)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(
    "momentum, nesterov, wd", [(0.0, False, 0.0), (0.9, False, 1e-3), (0.9, True, 0.0)]
)
def test_sgd_kernel_is_the_numpy_expression_bit_for_bit(dtype, momentum, nesterov, wd):
    rng = np.random.default_rng(5)
    p = rng.standard_normal(101).astype(dtype)
    ref_p, ref_buf = p.copy(), np.zeros_like(p)
    opt = SGD(lr=0.1, momentum=momentum, nesterov=nesterov, weight_decay=wd)
    state = opt.init_state([p])
    for _ in range(4):
        g = rng.standard_normal(p.shape).astype(dtype)
        opt.step([p], [g], state)
        _sgd_numpy(ref_p, g, ref_buf, 0.1, momentum, nesterov, wd)
        assert np.array_equal(p, ref_p)
        if momentum:
            assert np.array_equal(state[0]["momentum_buffer"], ref_buf)


def test_optimizers_refuse_a_parameter_they_cannot_update_in_place():
    p = np.ones((6, 4))[:, ::2]  # a strided view
    g = np.ones_like(p)
    for opt in (Adam(), SGD(momentum=0.9)):
        with pytest.raises(ValueError, match=r"must be C-contiguous \(updated in place\)"):
            opt.step([p], [g], opt.init_state([p]))
    grad_view = np.ones((3, 4))[:, ::2]  # a strided gradient is fine: it is only read
    q = np.zeros((3, 2))
    Adam(lr=0.1).step([q], [grad_view], Adam().init_state([q]))
    assert np.allclose(q, -0.1)


def test_accumulate_moments_is_the_numpy_expression():
    from cpusparse.engine.kernels.elementwise import accumulate_moments

    rng = np.random.default_rng(8)
    total, total_sq = np.zeros(1001), np.zeros(1001)
    ref, ref_sq = np.zeros(1001), np.zeros(1001)
    for dtype in (np.float32, np.float64, np.float32):
        g = (rng.standard_normal(1001) * 1e3).astype(dtype)
        accumulate_moments(g, total, total_sq)
        g64 = g.astype(np.float64)
        ref += g64
        ref_sq += g64 * g64
    assert np.array_equal(total, ref) and np.array_equal(total_sq, ref_sq)
