"""Tests for cpusparse.method.

Oracles: exhaustive enumeration over all 2**n masks (exact_grad), central finite
differences of the exact expectation, and the closed-form log-likelihood of a
Bernoulli mask. Statistical tolerances come from the measured standard error.
"""

import warnings

import numpy as np
import pytest

from cpusparse import check_rng
from cpusparse.method import (
    exact_expectation,
    exact_grad,
    reinforce_grad,
    sample_masks,
    score_function,
    vrpge_grad,
)

N_UNITS = 7
N_DRAWS = 10_000
N_SE = 4.0  # per-coordinate tolerance in standard errors


# ---------------------------------------------------------------------------
# A small nonlinear loss, vectorised over any leading axes of the mask array
# ---------------------------------------------------------------------------


def make_problem(seed=0, n=N_UNITS):
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=n)
    a = rng.normal(size=n)
    target = 0.7
    c = 0.3
    pair = rng.normal(size=(n, n))
    pair = np.triu(pair, 1)

    def loss_batch(masks):
        m = masks.astype(np.float64)
        pred = m @ (a * weight)
        interaction = np.einsum("...i,ij,...j->...", m, pair, m)
        return (pred - target) ** 2 + c * m.sum(axis=-1) + np.sin(interaction)

    def loss_fn(mask):
        return float(loss_batch(mask[None, :])[0])

    score = rng.uniform(0.1, 0.9, size=n)
    return loss_fn, loss_batch, score


def draw_estimates(estimator, loss_batch, score, n_masks, *, seed, shift=0.0, **kwargs):
    n = score.shape[0]
    masks = sample_masks(score, N_DRAWS * n_masks, rng=seed).reshape(N_DRAWS, n_masks, n)
    losses = loss_batch(masks) + shift
    return np.array([estimator(losses[d], masks[d], score, **kwargs) for d in range(N_DRAWS)])


def assert_mean_within_se(estimates, expected):
    mean = estimates.mean(axis=0)
    se = estimates.std(axis=0, ddof=1) / np.sqrt(estimates.shape[0])
    assert np.all(se > 0)
    z = np.abs(mean - expected) / se
    assert np.all(z < N_SE), f"max |z| = {z.max():.2f}, z = {z}"
    return se


# ---------------------------------------------------------------------------
# Unbiasedness against exhaustive enumeration
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("n_masks", [2, 4])
def test_vrpge_is_unbiased(n_masks):
    loss_fn, loss_batch, score = make_problem()
    expected = exact_grad(loss_fn, score)
    estimates = draw_estimates(vrpge_grad, loss_batch, score, n_masks, seed=10 + n_masks)
    se = assert_mean_within_se(estimates, expected)
    # The test has power: a 1/K normalisation (bias factor (K-1)/K) is rejected.
    biased = estimates.mean(axis=0) * (n_masks - 1) / n_masks
    assert np.any(np.abs(biased - expected) / se > N_SE)


def test_reinforce_is_unbiased():
    loss_fn, loss_batch, score = make_problem()
    expected = exact_grad(loss_fn, score)
    estimates = draw_estimates(reinforce_grad, loss_batch, score, 2, seed=3)
    assert_mean_within_se(estimates, expected)


@pytest.mark.parametrize("estimator", [vrpge_grad, reinforce_grad])
def test_sqrt_variant_estimates_preconditioned_gradient(estimator):
    loss_fn, loss_batch, score = make_problem()
    expected = np.sqrt(score * (1 - score)) * exact_grad(loss_fn, score)
    estimates = draw_estimates(estimator, loss_batch, score, 2, seed=5, scaling="sqrt")
    se = assert_mean_within_se(estimates, expected)
    # ... and not the gradient itself.
    plain = exact_grad(loss_fn, score)
    assert np.any(np.abs(estimates.mean(axis=0) - plain) / se > N_SE)


def test_vrpge_matches_leave_one_out_form():
    rng = np.random.default_rng(1)
    for n_masks in (2, 3, 5):
        score = rng.uniform(0.05, 0.95, size=6)
        masks = sample_masks(score, n_masks, rng=rng)
        losses = rng.normal(size=n_masks)
        g = score_function(masks, score)
        loo = (losses.sum() - losses) / (n_masks - 1)
        expected = ((losses - loo)[:, None] * g).mean(axis=0)
        atol = 1e-14 * np.abs(losses).max() * np.abs(g).max()
        np.testing.assert_allclose(
            vrpge_grad(losses, masks, score), expected, rtol=1e-12, atol=atol
        )


# ---------------------------------------------------------------------------
# Constant shift of the loss
# ---------------------------------------------------------------------------


def test_vrpge_invariant_to_constant_and_far_below_reinforce():
    _, loss_batch, score = make_problem()
    shift = 1e3
    n_masks = 2
    base = draw_estimates(vrpge_grad, loss_batch, score, n_masks, seed=7)
    shifted = draw_estimates(vrpge_grad, loss_batch, score, n_masks, seed=7, shift=shift)
    # Same masks, so the estimates agree up to the rounding of L + shift.
    scale = np.abs(score_function(np.ones_like(score, dtype=bool), score)).max()
    np.testing.assert_allclose(shifted, base, rtol=0, atol=50 * shift * np.finfo(float).eps * scale)
    np.testing.assert_allclose(shifted.var(axis=0), base.var(axis=0), rtol=1e-6)
    reinforce = draw_estimates(reinforce_grad, loss_batch, score, n_masks, seed=7, shift=shift)
    assert reinforce.var(axis=0).min() > 100 * shifted.var(axis=0).max()


# ---------------------------------------------------------------------------
# exact_grad / exact_expectation
# ---------------------------------------------------------------------------


def test_exact_grad_matches_central_differences():
    loss_fn, _, score = make_problem(seed=2)
    grad = exact_grad(loss_fn, score)
    h = 1e-5
    fd = np.empty_like(score)
    for i in range(score.shape[0]):
        e = np.zeros_like(score)
        e[i] = h
        fd[i] = (exact_expectation(loss_fn, score + e) - exact_expectation(loss_fn, score - e)) / (
            2 * h
        )
    rel = np.abs(grad - fd) / np.maximum(np.abs(fd), 1e-12)
    assert rel.max() < 1e-6


def test_exact_grad_at_endpoints_matches_one_sided_differences():
    loss_fn, _, score = make_problem(seed=4, n=5)
    score = score.copy()
    score[0], score[3] = 0.0, 1.0
    grad = exact_grad(loss_fn, score)
    assert np.all(np.isfinite(grad))
    h = 1e-5
    for i in range(score.shape[0]):
        step = -h if score[i] == 1.0 else h  # stay inside [0, 1]
        e = np.zeros_like(score)
        e[i] = step
        fd = (exact_expectation(loss_fn, score + e) - exact_expectation(loss_fn, score)) / step
        # E[L] is affine in each s_i, so the one-sided difference is exact up to rounding.
        np.testing.assert_allclose(grad[i], fd, rtol=1e-6, atol=1e-9)


def test_exact_grad_matches_score_function_sum():
    loss_fn, loss_batch, score = make_problem(seed=6, n=6)
    n = score.shape[0]
    all_masks = ((np.arange(2**n)[:, None] >> np.arange(n)) & 1).astype(bool)
    prob = np.where(all_masks, score, 1 - score).prod(axis=1)
    expected = (loss_batch(all_masks) * prob) @ score_function(all_masks, score)
    np.testing.assert_allclose(exact_grad(loss_fn, score), expected, rtol=1e-10)
    np.testing.assert_allclose(
        exact_expectation(loss_fn, score), loss_batch(all_masks) @ prob, rtol=1e-12
    )


def test_exact_grad_refuses_too_many_units():
    with pytest.raises(ValueError, match="max_units"):
        exact_grad(lambda m: 0.0, np.full(5, 0.5), max_units=4)
    with pytest.raises(ValueError, match="max_units"):
        exact_expectation(lambda m: 0.0, np.full(21, 0.5))


def test_exact_grad_rejects_bad_loss_fn():
    with pytest.raises(ValueError, match="loss_fn must return a finite"):
        exact_grad(lambda m: float("nan"), np.full(3, 0.5))
    with pytest.raises(ValueError, match="loss_fn must return a finite"):
        exact_grad(lambda m: np.ones(2), np.full(3, 0.5))
    with pytest.raises(TypeError, match="loss_fn must be callable"):
        exact_grad(3.0, np.full(3, 0.5))


def test_exact_oracle_passes_fresh_masks():
    seen = []

    def loss_fn(mask):
        seen.append(mask.copy())
        mask[:] = True  # mutating the argument must not affect later calls
        return 0.0

    exact_expectation(loss_fn, np.full(3, 0.5))
    assert len({tuple(m) for m in seen}) == 8


# ---------------------------------------------------------------------------
# score_function
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("scaling", ["exact", "sqrt"])
def test_score_function_is_zero_at_endpoints_without_warning(scaling):
    score = np.array([0.0, 1.0, 0.0, 1.0, 0.5])
    masks = np.array([[False, True, True, False, True], [False, True, False, True, False]])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with np.errstate(all="raise"):
            out = score_function(masks, score, scaling=scaling)
    assert np.all(np.isfinite(out))
    np.testing.assert_array_equal(out[:, :4], 0.0)
    assert np.all(out[:, 4] != 0)


def test_score_function_matches_derivative_of_log_likelihood():
    rng = np.random.default_rng(8)
    score = rng.uniform(0.05, 0.95, size=9)
    masks = sample_masks(score, 3, rng=rng)

    def log_p(s):
        return np.where(masks, np.log(s), np.log1p(-s)).sum(axis=1)

    h = 1e-6
    fd = np.empty(masks.shape)
    for i in range(score.shape[0]):
        e = np.zeros_like(score)
        e[i] = h
        fd[:, i] = (log_p(score + e) - log_p(score - e)) / (2 * h)
    np.testing.assert_allclose(score_function(masks, score), fd, rtol=1e-6)
    np.testing.assert_allclose(
        score_function(masks, score, scaling="sqrt"),
        np.sqrt(score * (1 - score)) * score_function(masks, score),
        rtol=1e-12,
    )


def test_score_function_has_zero_mean():
    score = np.array([0.2, 0.5, 0.9])
    n = score.shape[0]
    all_masks = ((np.arange(2**n)[:, None] >> np.arange(n)) & 1).astype(bool)
    prob = np.where(all_masks, score, 1 - score).prod(axis=1)
    np.testing.assert_allclose(prob @ score_function(all_masks, score), 0.0, atol=1e-12)


def test_score_function_accepts_single_mask():
    score = np.array([0.25, 0.75])
    one = score_function(np.array([True, False]), score)
    stacked = score_function(np.array([[True, False]]), score)
    assert one.shape == (2,)
    np.testing.assert_array_equal(one, stacked[0])


# ---------------------------------------------------------------------------
# dtypes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_output_dtype_follows_score(dtype):
    score = np.array([0.3, 0.6, 0.0], dtype=dtype)
    masks = sample_masks(score, 3, rng=0)
    losses = np.array([1.0, 2.0, 4.0])
    assert score_function(masks, score).dtype == dtype
    assert reinforce_grad(losses, masks, score).dtype == dtype
    assert vrpge_grad(losses, masks, score).dtype == dtype
    ref = vrpge_grad(losses, masks, score.astype(np.float64))
    np.testing.assert_allclose(vrpge_grad(losses, masks, score), ref, rtol=1e-6)


def test_integer_score_gives_float64():
    masks = np.array([[True, False], [True, False]])
    out = vrpge_grad([1.0, 2.0], masks, np.array([1, 0]))
    assert out.dtype == np.float64
    np.testing.assert_array_equal(out, 0.0)


# ---------------------------------------------------------------------------
# Sampling and reproducibility
# ---------------------------------------------------------------------------


def test_same_seed_same_masks_and_uniforms():
    score = np.linspace(0, 1, 11)
    m1, u1 = sample_masks(score, 5, rng=123, return_uniforms=True)
    m2, u2 = sample_masks(score, 5, rng=123, return_uniforms=True)
    np.testing.assert_array_equal(m1, m2)
    np.testing.assert_array_equal(u1, u2)
    m3, u3 = sample_masks(score, 5, rng=124, return_uniforms=True)
    assert not np.array_equal(u1, u3)
    assert not np.array_equal(m1, m3)


def test_numpy_draw_order_is_replayable():
    score = np.linspace(0, 1, 13, dtype=np.float32)
    masks, uniforms = sample_masks(
        score, 4, rng=np.random.default_rng(9), return_uniforms=True, draw="numpy"
    )
    replay = np.random.default_rng(9).random((4, 13))
    np.testing.assert_array_equal(uniforms, replay)
    assert uniforms.dtype == np.float64 and uniforms.flags.c_contiguous
    np.testing.assert_array_equal(masks, replay < score.astype(np.float64))
    assert masks.dtype == np.bool_
    assert not masks[:, 0].any() and masks[:, -1].all()


_PHILOX_M, _PHILOX_W = (0xD2511F53, 0xCD9E8D57), (0x9E3779B9, 0xBB67AE85)


def _philox_reference(counter, key):
    # Philox4x32-10 in plain Python integers, from Salmon et al. (2011), section 3.
    c, k = list(counter), list(key)
    for _ in range(10):
        p0, p1 = _PHILOX_M[0] * c[0], _PHILOX_M[1] * c[2]
        c = [(p1 >> 32) ^ c[1] ^ k[0], p1 & 0xFFFFFFFF, (p0 >> 32) ^ c[3] ^ k[1], p0 & 0xFFFFFFFF]
        k = [(k[0] + _PHILOX_W[0]) & 0xFFFFFFFF, (k[1] + _PHILOX_W[1]) & 0xFFFFFFFF]
    return c


# Random123's tests/kat_vectors, the three "philox4x32 10" lines: counter, key, result.
PHILOX_KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    (
        (0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344),
        (0xA4093822, 0x299F31D0),
        (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1),
    ),
]


@pytest.mark.parametrize("counter, key, expected", PHILOX_KAT)
def test_philox_known_answers(counter, key, expected):
    from cpusparse.engine.kernels import philox

    out = np.empty(4, np.uint32)
    philox.philox4x32_10(np.array(counter, np.uint64), np.array(key, np.uint64), out)
    assert tuple(int(w) for w in out) == expected
    assert tuple(_philox_reference(counter, key)) == expected


@pytest.mark.parametrize("n", [1, 3, 4, 13, 1021, 4 * 256 + 5, 3 * 4 * 256])
def test_philox_draw_order_is_replayable(n):
    # The documented layout, rebuilt from the reference: key from one integers() draw,
    # units 4c..4c+3 of mask k from counter (c, 0, k, 0); every chunk boundary and tail.
    score = np.linspace(0, 1, n, dtype=np.float32)
    masks, uniforms = sample_masks(score, 3, rng=np.random.default_rng(9), return_uniforms=True)
    key = int(np.random.default_rng(9).integers(0, 2**64, dtype=np.uint64))
    k0, k1 = key & 0xFFFFFFFF, key >> 32
    units = [0, n // 2, n - 1] + list(range(min(n, 9)))
    for k in range(3):
        for i in units:
            word = _philox_reference((i // 4, 0, k, 0), (k0, k1))[i % 4]
            assert uniforms[k, i] == word * 2.0**-32
    assert uniforms.dtype == np.float64 and uniforms.shape == (3, n)
    np.testing.assert_array_equal(masks, uniforms < score.astype(np.float64))
    # Without the uniforms: the same masks from the same key.
    again = sample_masks(score, 3, rng=np.random.default_rng(9))
    np.testing.assert_array_equal(again, masks)
    assert not masks[:, 0].any() and (n == 1 or masks[:, -1].all())


def test_sample_masks_rejects_an_unknown_draw():
    with pytest.raises(ValueError, match=r"draw must be one of \('philox', 'numpy'\), got 'mt'"):
        sample_masks([0.5], 2, rng=0, draw="mt")


@pytest.mark.parametrize("draw", ["philox", "numpy"])
def test_sample_masks_frequencies_of_both_draws(draw):
    score = np.array([0.0, 1e-3, 0.1, 0.5, 0.8, 1.0])
    n_masks = 40_000
    freq = sample_masks(score, n_masks, rng=3, draw=draw).mean(axis=0)
    se = np.sqrt(score * (1 - score) / n_masks)
    assert np.all(np.abs(freq - score) <= N_SE * se + 1e-12)
    assert freq[0] == 0.0 and freq[-1] == 1.0


def test_generator_state_advances():
    gen = np.random.default_rng(0)
    first = sample_masks(np.full(50, 0.5), 2, rng=gen)
    second = sample_masks(np.full(50, 0.5), 2, rng=gen)
    assert not np.array_equal(first, second)


def test_sample_masks_frequencies():
    score = np.array([0.1, 0.5, 0.8])
    n_masks = 20_000
    freq = sample_masks(score, n_masks, rng=1).mean(axis=0)
    se = np.sqrt(score * (1 - score) / n_masks)
    assert np.all(np.abs(freq - score) < N_SE * se)


def test_check_rng():
    gen = np.random.default_rng(0)
    assert check_rng(gen) is gen
    assert isinstance(check_rng(None), np.random.Generator)
    a = check_rng(np.int64(5)).random(3)
    np.testing.assert_array_equal(a, np.random.default_rng(5).random(3))
    with pytest.raises(TypeError, match="rng must be"):
        check_rng(np.random.RandomState(0))
    with pytest.raises(TypeError, match="rng must be"):
        check_rng("0")
    with pytest.raises(TypeError, match="rng must be"):
        check_rng(True)
    with pytest.raises(ValueError, match="rng must be a non-negative"):
        check_rng(-1)


# ---------------------------------------------------------------------------
# Bad inputs
# ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("score", "match"),
    [
        (np.full((2, 2), 0.5), "score must be 1-D"),
        (np.array([0.5, np.nan]), "score must be finite"),
        (np.array([0.5, np.inf]), "score must be finite"),
        (np.array([0.5, 1.5]), r"score must be in \[0, 1\]"),
        (np.array([-0.1, 0.5]), r"score must be in \[0, 1\]"),
    ],
)
def test_bad_score(score, match):
    with pytest.raises(ValueError, match=match):
        sample_masks(score, 2)
    with pytest.raises(ValueError, match=match):
        score_function(np.zeros(score.shape, dtype=bool), score)


def test_bad_score_type():
    with pytest.raises(TypeError, match="score must be a real"):
        sample_masks(np.array(["a", "b"]), 2)


def test_bad_n_samples():
    with pytest.raises(ValueError, match="n_masks must be >= 1"):
        sample_masks([0.5], 0)
    with pytest.raises(TypeError, match="n_masks must be an int"):
        sample_masks([0.5], 2.0)


def test_bad_scaling():
    masks = np.array([[True], [False]])
    with pytest.raises(ValueError, match="scaling must be one of"):
        score_function(masks, [0.5], scaling="eps")
    with pytest.raises(ValueError, match="scaling must be one of"):
        vrpge_grad([1.0, 2.0], masks, [0.5], scaling="natural")


def test_vrpge_needs_two_samples():
    with pytest.raises(ValueError, match="n_masks >= 2"):
        vrpge_grad([1.0], np.array([[True, False]]), [0.5, 0.5])
    reinforce_grad([1.0], np.array([[True, False]]), [0.5, 0.5])  # K = 1 is fine here


def test_bad_estimator_inputs():
    score = np.array([0.5, 0.5])
    masks = np.array([[True, False], [False, True], [True, True]])
    with pytest.raises(ValueError, match="losses must have shape"):
        vrpge_grad([1.0, 2.0], masks, score)
    with pytest.raises(ValueError, match="losses must be finite"):
        vrpge_grad([1.0, np.nan, 2.0], masks, score)
    with pytest.raises(ValueError, match="losses must be finite"):
        reinforce_grad([1.0, np.inf, 2.0], masks, score)
    with pytest.raises(TypeError, match="masks must be a bool array"):
        vrpge_grad([1.0, 2.0, 3.0], masks.astype(int), score)
    with pytest.raises(ValueError, match="masks must have shape"):
        vrpge_grad([1.0, 2.0, 3.0], masks[:, :1], score)
    with pytest.raises(ValueError, match="masks must have shape"):
        vrpge_grad([1.0, 2.0], masks[0], score)
    with pytest.raises(ValueError, match="score must be 1-D"):
        vrpge_grad([1.0, 2.0, 3.0], masks, score[None, :])


@pytest.mark.parametrize("scaling", ["exact", "sqrt"])
@pytest.mark.parametrize("n_masks", [2, 3, 7])
def test_vrpge_is_exactly_zero_where_the_masks_agree(scaling, n_masks):
    # Where all K masks agree the estimate is 0 in exact arithmetic; the computed form
    # (L_k - mean L)(m_k - mean m) gives exactly 0, not a rounding residue, so that
    # Adam's m / (sqrt(v) + eps) does not turn noise into a step.
    rng = np.random.default_rng(n_masks)
    score = rng.uniform(0.05, 0.95, 400)
    masks = rng.random((n_masks, 400)) < score
    masks[:, :50] = True
    masks[:, 50:100] = False
    losses = rng.uniform(1.0, 3.0, n_masks) * np.array([1.0, 1 + 1e-9, *([1.0] * (n_masks - 2))])
    got = vrpge_grad(losses, masks, score, scaling=scaling)
    assert np.all(got[:100] == 0.0)
    # Elsewhere it equals the paper's form to rounding.
    g = score_function(masks, score, scaling=scaling)
    paper = ((losses - losses.mean())[:, None] * g).sum(axis=0) / (n_masks - 1)
    agree = masks.all(axis=0) | ~masks.any(axis=0)
    np.testing.assert_allclose(got[~agree], paper[~agree], rtol=1e-9, atol=1e-12)
    if n_masks > 2:  # with K = 2 the two centred losses cancel exactly in either form
        assert np.abs(paper[:100]).max() > 0  # the paper's form leaves a residue there


@pytest.mark.parametrize("scaling", ["exact", "sqrt"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("k", [2, 3, 4, 5])
def test_vrpge_kernel_is_the_documented_formula_bit_for_bit(scaling, dtype, k):
    # The fused pass does the documented operations in the documented order (K = 2 and
    # 4 divide by powers of two, K = 3 and 5 do not; n spans several chunks and a tail).
    rng = np.random.default_rng(5 + k)
    n = 5001
    score = rng.uniform(0, 1, n).astype(dtype)
    score[:10] = 0.0
    score[10:20] = 1.0
    masks = rng.random((k, n)) < score
    losses = rng.uniform(1, 3, k)
    centered = losses - losses.sum() / k
    mean_mask = masks.sum(axis=0, dtype=np.float64) / k
    total = np.zeros(n)
    for j in range(k):
        total += centered[j] * (masks[j] - mean_mask)
    s = score.astype(np.float64)
    var = s * (1.0 - s)
    denom = var if scaling == "exact" else np.sqrt(var)
    interior = (s > 0) & (s < 1)
    want = np.zeros(n)
    want[interior] = (total / (k - 1))[interior] / denom[interior]
    got = vrpge_grad(losses, masks, score, scaling=scaling)
    np.testing.assert_array_equal(got, want.astype(got.dtype))
    assert np.array_equal(np.signbit(got), np.signbit(want.astype(got.dtype)))  # zeros too
