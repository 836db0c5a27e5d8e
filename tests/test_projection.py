"""Tests for cpusparse.method: KKT / variational-inequality properties,
agreement of the exact and bisection solvers, and an SLSQP reference."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy.optimize import minimize

from cpusparse.method import concat_scores, project_scores, split_scores

settings.register_profile("cpusparse-projection", deadline=None, max_examples=150)
PROFILE = settings.get_profile("cpusparse-projection")

finite = st.floats(-3.0, 3.0, allow_nan=False, allow_infinity=False, width=64)
# Values on a coarse grid produce many ties and exact breakpoints (s_i - 1 == s_j).
grid = st.integers(-8, 16).map(lambda k: k / 4)
score_arrays = st.one_of(
    arrays(np.float64, st.integers(1, 30), elements=finite),
    arrays(np.float64, st.integers(1, 30), elements=grid),
)
budgets = st.floats(0.0, 32.0, allow_nan=False, allow_infinity=False)


def eps_for(s):
    return 1e-12 * (1.0 + s.size) * (1.0 + np.abs(s).max())


def project_both(s, budget):
    return project_scores(s, budget, method="exact"), project_scores(s, budget, method="bisection")


# ---------------------------------------------------------------------------
# Properties of the exact projection
# ---------------------------------------------------------------------------


@PROFILE
@given(score_arrays, budgets)
def test_feasible_and_of_threshold_form(s, budget):
    p, v = project_scores(s, budget)
    eps = eps_for(s)
    assert p.shape == s.shape and p.dtype == np.float64
    assert np.all(p >= 0) and np.all(p <= 1)
    assert p.sum() <= budget + eps
    assert isinstance(v, float) and v >= 0
    np.testing.assert_array_equal(p, np.clip(s - v, 0, 1))
    # Complementary slackness: v > 0 only if the budget is tight.
    if v > 0:
        assert abs(p.sum() - budget) <= eps
    else:
        assert np.clip(s, 0, 1).sum() <= budget


@PROFILE
@given(score_arrays, budgets, st.integers(0, 2**32 - 1))
def test_variational_inequality(s, budget, seed):
    # P(s) is the projection iff <s - P(s), z - P(s)> <= 0 for every feasible z.
    p, _ = project_scores(s, budget)
    rng = np.random.default_rng(seed)
    z = rng.uniform(0, 1, size=(20, s.size))
    z[:5] = rng.integers(0, 2, size=(5, s.size))  # vertices of the cube
    total = z.sum(axis=1, keepdims=True)
    z = np.where(total > budget, z * budget / np.maximum(total, 1e-300), z)
    assert np.all(z.sum(axis=1) <= budget + 1e-9)
    inner = (z - p) @ (s - p)
    assert np.all(inner <= 1e-9 * (1 + np.abs(s).sum()))


@PROFILE
@given(score_arrays, budgets)
def test_idempotent(s, budget):
    p, _ = project_scores(s, budget)
    q, _ = project_scores(p, budget)
    np.testing.assert_allclose(q, p, rtol=0, atol=eps_for(s))


@PROFILE
@given(arrays(np.float64, st.integers(1, 30), elements=st.floats(0, 1)), budgets)
def test_identity_when_feasible(s, budget):
    if s.sum() > budget:
        budget = float(s.sum())
    for method in ("exact", "bisection"):
        p, v = project_scores(s, budget, method=method)
        np.testing.assert_array_equal(p, s)
        assert v == 0.0
        assert p is not s


@PROFILE
@given(score_arrays, budgets, st.randoms(use_true_random=False))
def test_permutation_equivariant_and_ties_equal(s, budget, random):
    perm = np.arange(s.size)
    random.shuffle(perm)
    p, v = project_scores(s, budget)
    pp, vp = project_scores(s[perm], budget)
    np.testing.assert_allclose(pp, p[perm], rtol=0, atol=eps_for(s))
    # Equal scores are projected to equal values.
    for value in np.unique(s):
        assert np.ptp(p[s == value]) == 0


@PROFILE
@given(finite, budgets)
def test_single_unit(x, budget):
    p, _ = project_scores(np.array([x]), budget)
    # In 1-D the set is the interval [0, min(1, budget)].
    np.testing.assert_allclose(p, [np.clip(x, 0.0, min(1.0, budget))], rtol=0, atol=1e-12)


@PROFILE
@given(score_arrays)
def test_budget_at_least_n_is_clipping(s):
    for budget in (float(s.size), s.size + 0.5):
        p, v = project_scores(s, budget)
        np.testing.assert_array_equal(p, np.clip(s, 0, 1))
        assert v == 0.0


@PROFILE
@given(score_arrays)
def test_zero_budget(s):
    for method in ("exact", "bisection"):
        p, v = project_scores(s, 0.0, method=method, tol=1e-12, max_iter=60)
        assert np.all(p <= 1e-12)
        if method == "exact":
            np.testing.assert_array_equal(p, 0.0)
            assert v >= s.max() or s.max() <= 0


def test_ties_at_breakpoints():
    # Repeated values, and s_i - 1 coinciding with s_j.
    s = np.array([1.5, 0.5, 0.5, 0.5, 1.5, 0.5])
    for budget in (0.5, 1.0, 2.0, 2.5, 3.0):
        p, v = project_scores(s, budget)
        assert abs(p.sum() - budget) < 1e-12
        np.testing.assert_array_equal(p, np.clip(s - v, 0, 1))
        assert np.ptp(p[s == 0.5]) == 0 and np.ptp(p[s == 1.5]) == 0
        np.testing.assert_allclose(p, slsqp_projection(s, budget), atol=1e-6)


# ---------------------------------------------------------------------------
# Independent reference: SLSQP on the quadratic program
# ---------------------------------------------------------------------------


def slsqp_projection(s, budget):
    n = s.size
    res = minimize(
        lambda x: 0.5 * np.sum((x - s) ** 2),
        x0=np.full(n, min(1.0, budget / n)),
        jac=lambda x: x - s,
        bounds=[(0.0, 1.0)] * n,
        constraints=[
            {"type": "ineq", "fun": lambda x: budget - x.sum(), "jac": lambda x: -np.ones(n)}
        ],
        method="SLSQP",
        options={"ftol": 1e-14, "maxiter": 500},
    )
    assert res.success, res.message
    return res.x


@pytest.mark.parametrize("seed", range(25))
def test_exact_matches_slsqp(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 8))
    s = rng.normal(0.5, 1.0, size=n)
    budget = float(rng.uniform(0, n))
    p, _ = project_scores(s, budget)
    np.testing.assert_allclose(p, slsqp_projection(s, budget), atol=1e-6)


# ---------------------------------------------------------------------------
# Exact vs bisection
# ---------------------------------------------------------------------------


@PROFILE
@given(
    score_arrays,
    budgets,
    st.sampled_from([1e-1, 1e-3, 1e-6]),
    st.integers(1, 40),
)
def test_bisection_agrees_with_exact(s, budget, tol, max_iter):
    pe, ve = project_scores(s, budget)
    pb, vb = project_scores(s, budget, method="bisection", tol=tol, max_iter=max_iter)
    assert pb.dtype == np.float64 and np.all((pb >= 0) & (pb <= 1))
    np.testing.assert_array_equal(pb, np.clip(s - vb, 0, 1))
    if ve == 0.0:
        assert vb == 0.0
        np.testing.assert_array_equal(pb, pe)
        return
    rounding = eps_for(s)
    # Always: the bracket after max_iter halvings bounds the threshold error.
    converged = abs(pb.sum() - budget) < tol
    if converged:
        # Both are clip(s - v, 0, 1): differences share one sign, so the L1 gap is the sum gap.
        assert np.abs(pb - pe).sum() <= tol + rounding
    else:
        assert np.abs(pb - pe).max() <= s.max() * 2.0**-max_iter + rounding


def test_bisection_default_parameters_are_the_authors():
    rng = np.random.default_rng(0)
    s = rng.uniform(-0.5, 1.5, size=1000)
    budget = 100.0
    pb, _ = project_scores(s, budget, method="bisection")
    pe, _ = project_scores(s, budget)
    assert abs(pb.sum() - budget) < 1e-3 or np.abs(pb - pe).max() <= s.max() * 2.0**-20
    # A looser tolerance really stops earlier.
    loose, _ = project_scores(s, budget, method="bisection", tol=5.0, max_iter=50)
    assert 1e-3 < abs(loose.sum() - budget) < 5.0


# ---------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["exact", "bisection"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dtype_preserved(method, dtype):
    rng = np.random.default_rng(1)
    s = rng.uniform(-0.5, 1.5, size=50).astype(dtype)
    p, v = project_scores(s, 10.0, method=method)
    assert p.dtype == dtype
    assert isinstance(v, float)
    ref, _ = project_scores(s.astype(np.float64), 10.0, method=method)
    np.testing.assert_allclose(p, ref, rtol=0, atol=np.finfo(dtype).eps)
    assert p.sum(dtype=np.float64) <= 10.0 + 50 * np.finfo(dtype).eps + (method == "bisection")


def test_integer_input_gives_float64():
    p, _ = project_scores(np.array([3, 0, 1]), 1.5)
    assert p.dtype == np.float64
    np.testing.assert_allclose(p.sum(), 1.5)


# ---------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"score": np.array([0.5, np.nan])}, ValueError, "score must be finite"),
        ({"score": np.array([np.inf, 0.5])}, ValueError, "score must be finite"),
        ({"score": np.ones((2, 2))}, ValueError, "score must be 1-D"),
        ({"score": np.array(0.5)}, ValueError, "score must be 1-D"),
        ({"score": np.array([1 + 1j])}, TypeError, "score must be a real"),
        ({"budget": -1.0}, ValueError, "budget must be a finite number >= 0"),
        ({"budget": float("nan")}, ValueError, "budget must be a finite number"),
        ({"budget": float("inf")}, ValueError, "budget must be a finite number"),
        ({"budget": "1"}, TypeError, "budget must be a real number"),
        ({"method": "newton"}, ValueError, "method must be one of"),
        ({"tol": 0.0}, ValueError, "tol must be a finite number > 0"),
        ({"tol": float("nan")}, ValueError, "tol must be a finite number > 0"),
        ({"max_iter": 0}, ValueError, "max_iter must be >= 1"),
        ({"max_iter": 2.5}, TypeError, "max_iter must be an int"),
    ],
)
def test_bad_inputs(kwargs, exc, match):
    args = {"score": np.array([0.5, 0.9]), "budget": 1.0}
    args.update(kwargs)
    score, budget = args.pop("score"), args.pop("budget")
    with pytest.raises(exc, match=match):
        project_scores(score, budget, **args)


# ---------------------------------------------------------------------------
# concat_scores / split_scores
# ---------------------------------------------------------------------------

shapes = st.lists(
    st.lists(st.integers(0, 4), min_size=1, max_size=3).map(tuple), min_size=1, max_size=5
)


@PROFILE
@given(shapes, st.sampled_from([np.float32, np.float64]), st.integers(0, 2**32 - 1))
def test_concat_split_roundtrip(layer_shapes, dtype, seed):
    rng = np.random.default_rng(seed)
    layers = [rng.uniform(size=shape).astype(dtype) for shape in layer_shapes]
    flat, offsets = concat_scores(layers)
    assert flat.ndim == 1 and flat.dtype == dtype
    assert offsets.dtype == np.int64 and offsets.shape == (len(layers) + 1,)
    assert offsets[0] == 0 and offsets[-1] == flat.size
    back = split_scores(flat, offsets, shapes=[a.shape for a in layers])
    assert len(back) == len(layers)
    for a, b in zip(layers, back, strict=True):
        assert b.shape == a.shape and b.dtype == a.dtype
        np.testing.assert_array_equal(a, b)
    flat_back = split_scores(flat, offsets)
    assert all(b.ndim == 1 for b in flat_back)
    assert not any(np.shares_memory(b, flat) for b in back + flat_back)  # copies, not views


def test_global_budget_spans_layers():
    rng = np.random.default_rng(3)
    layers = [rng.uniform(-0.5, 1.5, size=(4, 3)), rng.uniform(-0.5, 1.5, size=7)]
    flat, offsets = concat_scores(layers)
    projected, v = project_scores(flat, 5.0)
    pieces = split_scores(projected, offsets, shapes=[a.shape for a in layers])
    assert abs(sum(p.sum() for p in pieces) - 5.0) < 1e-12
    for layer, piece in zip(layers, pieces, strict=True):
        np.testing.assert_array_equal(piece, np.clip(layer - v, 0, 1))


def test_concat_split_bad_inputs():
    with pytest.raises(ValueError, match="scores must hold at least one layer"):
        concat_scores([])
    with pytest.raises(TypeError, match="scores must all have the same floating dtype"):
        concat_scores([np.zeros(2, np.float32), np.zeros(2, np.float64)])
    with pytest.raises(TypeError, match="scores must all have the same floating dtype"):
        concat_scores([np.zeros(2, int)])
    with pytest.raises(TypeError, match="scores must be a sequence"):
        concat_scores(np.zeros(3))
    flat = np.zeros(5)
    with pytest.raises(ValueError, match="offsets must be"):
        split_scores(flat, np.array([0, 2, 4]))
    with pytest.raises(ValueError, match="offsets must be"):
        split_scores(flat, np.array([0, 3, 2, 5]))
    with pytest.raises(ValueError, match="offsets must be"):
        split_scores(flat, np.array([1, 5]))
    with pytest.raises(TypeError, match="offsets must be an integer array"):
        split_scores(flat, np.array([0.0, 5.0]))
    with pytest.raises(ValueError, match="flat must be 1-D"):
        split_scores(np.zeros((5, 1)), np.array([0, 5]))
    with pytest.raises(ValueError, match="shapes must give one shape per layer"):
        split_scores(flat, np.array([0, 2, 5]), shapes=[(2,), (2, 2)])


# ---------------------------------------------------------------------------
# The O(n) selection against the sorting oracle
# ---------------------------------------------------------------------------

from cpusparse.engine.kernels import scores as _score_kernels  # noqa: E402
from cpusparse.method import projection as _projection  # noqa: E402


def _both_thresholds(s, budget):
    s = np.asarray(s, dtype=np.float64)
    return _projection._threshold_exact(s, budget), _projection._threshold_sort(s, budget)


def _assert_selection_agrees(s, budget, fast, sort):
    # Same threshold to rounding (relative to the scale of the scores), the budget met
    # to 1e-9 relative, and the projections equal to the same rounding.
    # Rounding of the threshold: v = (|U| + sum_A s - k) / |A| from float64 sums of the
    # |A| linear scores, each with an error of a few ulps of its terms times log2(n).
    linear = (s > sort) & (s < sort + 1.0)
    n_lin = max(int(linear.sum()), 1)
    terms = (np.abs(s[linear]).sum() + budget + s.size) / n_lin + abs(sort) + 1.0
    tol = 16 * np.finfo(np.float64).eps * np.log2(s.size + 2) * terms
    assert abs(fast - sort) <= tol, (fast, sort, tol)
    total = np.clip(s - fast, 0.0, 1.0).sum()
    assert abs(total - budget) <= 1e-9 * max(1.0, budget), (total, budget)
    diff = np.abs(np.clip(s - fast, 0, 1) - np.clip(s - sort, 0, 1)).max()
    assert diff <= tol


@PROFILE
@given(score_arrays, budgets)
def test_selection_threshold_agrees_with_sorting(s, budget):
    # Force the selection on small arrays: ties, exact breakpoints, 0 and 1.
    if not np.clip(s, 0, 1).sum() > budget:
        return  # clipping alone is feasible: no threshold is searched
    original = _projection._SELECT_MIN_SIZE
    _projection._SELECT_MIN_SIZE = 0
    try:
        fast, sort = _both_thresholds(s, budget)
    finally:
        _projection._SELECT_MIN_SIZE = original
    _assert_selection_agrees(s, budget, fast, sort)


LARGE = [
    "uniform", "ties", "zeros-and-ones", "adam-step", "all-equal", "narrow", "sorted",
    "near-0-and-1",
]  # fmt: skip


def _large_scores(kind, n=50_000):
    rng = np.random.default_rng(7)
    return {
        "uniform": rng.uniform(-0.5, 1.5, n),
        "ties": rng.integers(0, 9, n) / 8.0,
        "zeros-and-ones": (rng.random(n) < 0.3).astype(np.float64),
        "adam-step": 0.1 + 0.01 * np.sign(rng.standard_normal(n)) * (rng.random(n) < 0.9),
        "all-equal": np.full(n, 0.37),
        "narrow": 0.5 + 1e-12 * rng.standard_normal(n),
        "sorted": np.sort(rng.uniform(-1.0, 2.5, n)),
        # Half the scores just above 0, half just below 1: the last rounds decide few
        # units each, and a budget of 1 leaves no room for drift in the sums.
        "near-0-and-1": np.concatenate(
            [1e-9 * rng.random(n // 2), 1 - 1e-9 * rng.random(n - n // 2)]
        ),
    }[kind]


@pytest.mark.parametrize("kind", LARGE)
def test_selection_threshold_on_large_arrays(kind):
    s = _large_scores(kind)
    n = s.size
    for budget in (0.0, 1.0, 0.1 * n, 0.25 * n, np.clip(s, 0, 1).sum() * (1 - 1e-9)):
        if not np.clip(s, 0, 1).sum() > budget:
            continue
        fast, sort = _both_thresholds(s, budget)
        _assert_selection_agrees(s, budget, fast, sort)
        if budget == 0.0:
            assert fast == sort == s.max()  # every unit at 0, exactly


@pytest.mark.parametrize("kind", LARGE)
def test_selection_on_float32_scores_in_place(kind):
    # The training step's call: float32 scores, the result written over them.
    s = _large_scores(kind).astype(np.float32)
    budget = 0.1 * s.size
    reference, threshold_ref = project_scores(s.astype(np.float64), budget)
    out = s.copy()
    projected, threshold = project_scores(out, budget, out=out)
    assert projected is out and out.dtype == np.float32
    if threshold_ref == 0.0:
        assert threshold == 0.0
    np.testing.assert_allclose(out, reference.astype(np.float32), rtol=0, atol=1e-6)
    assert out.astype(np.float64).sum() <= budget * (1 + 1e-6)


def test_selection_decides_tied_scores_in_one_round():
    # Three distinct values (the first step of training): the first round's pivots are
    # breakpoints themselves, so every unit is decided at once (a bisection of the
    # interval could never separate the tied groups).
    s = np.repeat([0.0, 0.1, 0.2], 100_000)
    work = np.empty(s.size, np.int32)
    p, q = _score_kernels._pivots(s, work, s.size, True, 0.0, 0.2, 0.0, 0, 0.05 * s.size, 1)
    assert {p, q} <= {0.0, 0.1, 0.2}
    fp, fq = _score_kernels._evaluate(s, work, s.size, True, p, q)
    lo, hi = (q, 0.2) if fq > 0.05 * s.size else ((p, q) if fp > 0.05 * s.size else (0.0, p))
    _, _, _, kept = _score_kernels._classify(s, work, s.size, True, lo, hi)
    assert kept == 0
    v = _score_kernels.projection_threshold(s, 0.05 * s.size, 0.2, work)
    assert abs(np.clip(s - v, 0, 1).sum() - 0.05 * s.size) <= 1e-9 * s.size


def test_project_scores_rejects_a_bad_out():
    s = np.full(5000, 0.5)
    with pytest.raises(
        ValueError, match=r"out must be a float64 array of shape \(5000,\), got float32"
    ):
        project_scores(s, 10.0, out=np.empty(5000, np.float32))
    with pytest.raises(ValueError, match="out must be a float64 array.*got list"):
        project_scores(s[:10], 1.0, out=[0.0] * 10)


@pytest.mark.parametrize("n", [10, 5000])  # the NumPy path and the selection
def test_project_scores_refuses_an_out_it_cannot_write_safely(n):
    s = np.linspace(-0.5, 1.5, n)
    frozen = np.empty(n)
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="out must be writeable, got a read-only array"):
        project_scores(s, 1.0, out=frozen)
    with pytest.raises(ValueError, match="out must be score itself or not overlap it"):
        project_scores(s, 1.0, out=s[::-1])
    expected, _ = project_scores(s, 1.0)
    inplace = s.copy()
    project_scores(inplace, 1.0, out=inplace)  # the score itself is fine
    np.testing.assert_array_equal(inplace, expected)


def test_clipped_sum_flags_infinities_and_nan():
    s = np.full(40_000, 0.25)
    assert _score_kernels.clipped_sum(s)[2]
    for bad in (np.inf, -np.inf, np.nan):
        t = s.copy()
        t[31_111] = bad
        total, top, finite = _score_kernels.clipped_sum(t)
        assert not finite
    total, top, finite = _score_kernels.clipped_sum(s)
    assert total == pytest.approx(10_000.0, rel=1e-15) and top == 0.25


def test_large_project_scores_rejects_non_finite_scores():
    s = np.full(5000, 0.5)
    s[4321] = np.nan
    with pytest.raises(ValueError, match="score must be finite"):
        project_scores(s, 10.0)


@pytest.mark.parametrize("n", [10, 5000])
def test_the_threshold_is_a_python_float(n):
    s = np.linspace(-0.5, 1.5, n)
    for budget in (1.0, 10.0 * n):  # active and inactive budgets
        _, v = project_scores(s, budget)
        assert type(v) is float
