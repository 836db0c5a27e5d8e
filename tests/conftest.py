"""Shared helpers for the engine tests: random CSR data, tolerances, finite differences."""

import numpy as np
import pytest

from cpusparse._threads import numba_threads
from cpusparse.engine import csr as sparse

DTYPES = [np.float32, np.float64]

# Relative tolerance of a comparison with the float64 dense reference. The absolute
# part is RTOL times the same expression evaluated on absolute values (a bound on the
# rounding of a sum of products), so cancellation cannot cause false failures.
RTOL = {np.dtype(np.float32): 1e-5, np.dtype(np.float64): 1e-12}


def assert_close(got, ref, scale, dtype, name="array"):
    """Assert ``|got - ref| <= rtol * (|ref| + scale)`` elementwise, rtol from ``dtype``."""
    rtol = RTOL[np.dtype(dtype)]
    got = np.asarray(got, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    assert got.shape == ref.shape, f"{name}: shape {got.shape} != {ref.shape}"
    err = np.abs(got - ref)
    bound = rtol * (np.abs(ref) + np.asarray(scale, dtype=np.float64))
    bad = err > bound
    assert not bad.any(), (
        f"{name}: {int(bad.sum())} of {bad.size} elements out of tolerance; "
        f"max error {err.max():.3g}, at {np.argwhere(bad)[0].tolist()}"
    )


def random_csr(rng, shape, density, dtype, *, empty_rows=0):
    """A random canonical pattern with values; the first ``empty_rows`` rows are empty."""
    dense_mask = rng.random(shape) < density
    dense_mask[:empty_rows] = False
    indptr, indices = sparse.pattern_from_dense(dense_mask)
    data = rng.standard_normal(indices.shape[0]).astype(dtype)
    return indptr, indices, data


def entry_rows(indptr):
    """Row index of each stored entry."""
    indptr = np.asarray(indptr)
    return np.repeat(np.arange(indptr.shape[0] - 1), np.diff(indptr))


def dense_entry_mask(indptr, indices, shape, entry_mask=None):
    """Dense boolean ``(n_out, n_in)`` mask of the stored (and kept) entries."""
    dense = np.zeros(shape, dtype=bool)
    keep = np.ones(len(indices), dtype=bool) if entry_mask is None else entry_mask
    dense[entry_rows(indptr)[keep], np.asarray(indices)[keep]] = True
    return dense


def central_differences(f, arr, eps=1e-6):
    """Central finite differences of scalar ``f()`` with respect to every entry of ``arr``.

    ``arr`` is perturbed in place and restored exactly.
    """
    grad = np.zeros(arr.shape, dtype=np.float64)
    flat = arr.reshape(-1)
    assert arr.size == 0 or np.shares_memory(flat, arr), "arr must be contiguous"
    for i in range(flat.shape[0]):
        orig = flat[i]
        flat[i] = orig + eps
        f_plus = f()
        flat[i] = orig - eps
        f_minus = f()
        flat[i] = orig
        grad.reshape(-1)[i] = (f_plus - f_minus) / (2 * eps)
    return grad


def assert_grad_close(got, fd, name, tol=1e-6):
    """Relative error ``max|got - fd| / max(|got|, |fd|)`` below ``tol``."""
    got = np.asarray(got, dtype=np.float64)
    scale = max(np.abs(got).max(initial=0.0), np.abs(fd).max(initial=0.0))
    if scale == 0.0:
        return
    rel = np.abs(got - fd).max() / scale
    assert rel < tol, f"{name}: relative error {rel:.3g} >= {tol}"


@pytest.fixture
def rng(request):
    """A Generator seeded from the test's name, so every test has its own stream."""
    seed = int.from_bytes(request.node.nodeid.encode(), "little") % (2**63)
    return np.random.default_rng(seed)


@pytest.fixture(scope="module")
def one_numba_thread():
    """Run a module's tests on one Numba thread.

    Results do not depend on the thread count (test_threads.py and
    test_estimator.py check that); one thread avoids the parallel overhead that
    dominates tiny problems.
    """
    with numba_threads(1):
        yield


def by_layer(flat, n_layers):
    """A container's flat ``{"<position>.<name>": array}`` dict as one dict per layer."""
    out = [{} for _ in range(n_layers)]
    for key, value in flat.items():
        position, name = key.split(".", 1)
        out[int(position)][name] = value
    return out


def history_text(history):
    """A fit's history as JSON without the wall times (everything else is reproducible)."""
    import json

    return json.dumps([{k: v for k, v in r.items() if k != "seconds"} for r in history])


def assert_same_fit(a, b, X):
    """Two fitted classifiers agree bit for bit: history, scores, masks, every array."""
    assert history_text(a.history_) == history_text(b.history_)
    np.testing.assert_array_equal(a.keep_prob_, b.keep_prob_)
    for m, n in zip(a.masks_, b.masks_, strict=True):
        np.testing.assert_array_equal(m, n)
    for arrays in ("params", "buffers"):
        pa, pb = getattr(a.network_, arrays)(), getattr(b.network_, arrays)()
        assert pa.keys() == pb.keys()
        for name in pa:
            assert np.array_equal(pa[name], pb[name]), name
    np.testing.assert_array_equal(a.predict_proba(X), b.predict_proba(X))
    assert (a.n_active_, a.density_, a.n_iter_) == (b.n_active_, b.density_, b.n_iter_)
