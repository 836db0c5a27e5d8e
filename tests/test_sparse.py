"""The validated CSR wrappers of cpusparse.engine.csr against the dense NumPy reference."""

import numpy as np
import pytest
from conftest import DTYPES, assert_close, dense_entry_mask, entry_rows, random_csr
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from cpusparse.engine import csr as sparse
from cpusparse.testing.reference import dense_backward, dense_forward

# ----------------------------------------------------------------------------- cases
PATTERNS = {
    # name: (shape, density, empty leading rows)
    "random": ((9, 11), 0.4, 2),
    "empty": ((5, 7), 0.0, 0),  # nnz = 0
    "full": ((6, 5), 1.0, 0),
    "one_row": ((1, 10), 0.6, 0),
    "one_col": ((8, 1), 0.7, 0),
}
MASKS = [
    "none",
    "entry",
    "row",
    "col",
    "entry+col",
    "row+col",
    "entry+row+col",
    "entry_all_off",
    "row_all_off",
    "col_all_off",
    "all_on",
]
BATCHES = [1, 7, 13, 32]


def _masks(kind, rng, nnz, shape):
    n_out, n_in = shape
    entry = row = col = None
    if "entry" in kind:
        entry = rng.random(nnz) < 0.6
    if "row" in kind:
        row = rng.random(n_out) < 0.6
    if "col" in kind:
        col = rng.random(n_in) < 0.6
    if kind == "entry_all_off":
        entry = np.zeros(nnz, dtype=bool)
    elif kind == "row_all_off":
        row = np.zeros(n_out, dtype=bool)
    elif kind == "col_all_off":
        col = np.zeros(n_in, dtype=bool)
    elif kind == "all_on":
        entry, row, col = np.ones(nnz, bool), np.ones(n_out, bool), np.ones(n_in, bool)
    return entry, row, col


def _case(rng, pattern, mask_kind, n_batch, dtype):
    shape, density, empty_rows = PATTERNS[pattern]
    indptr, indices, data = random_csr(rng, shape, density, dtype, empty_rows=empty_rows)
    x = rng.standard_normal((shape[1], n_batch)).astype(dtype)
    bias = rng.standard_normal(shape[0]).astype(dtype)
    entry, row, col = _masks(mask_kind, rng, indices.shape[0], shape)
    return shape, indptr, indices, data, x, bias, entry, row, col


def _f64(*arrays):
    return [None if a is None else np.asarray(a, dtype=np.float64) for a in arrays]


# --------------------------------------------------------------- forward and backward
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("pattern", list(PATTERNS))
@pytest.mark.parametrize("n_batch", BATCHES)
def test_masked_matmul_and_backward_match_dense(rng, dtype, relu, mask_kind, pattern, n_batch):
    shape, indptr, indices, data, x, bias, entry, row, col = _case(
        rng, pattern, mask_kind, n_batch, dtype
    )
    active = sparse.select_active(
        indptr, indices, data, shape, entry_mask=entry, row_mask=row, col_mask=col
    )
    weight = sparse.to_dense(indptr, indices, data, shape)
    wmask = dense_entry_mask(indptr, indices, shape, entry)
    kw = dict(weight_mask=wmask, row_mask=row, col_mask=col)
    w64, x64, b64 = _f64(weight, x, bias)

    out = sparse.masked_matmul(active, x, bias, relu=relu)
    assert out.dtype == dtype and out.shape == (shape[0], n_batch)
    ref = dense_forward(w64, b64, x64, relu=relu, **kw)
    scale = dense_forward(np.abs(w64), np.abs(b64), np.abs(x64), **kw)
    assert_close(out, ref, scale, dtype, "out")
    if row is not None:  # dropped units output exactly 0, bias included
        assert np.all(out[~row] == 0)

    dout = rng.standard_normal(out.shape).astype(dtype)
    dx, dweight, dbias = sparse.masked_matmul_backward(active, x, dout, out, relu=relu)
    assert dx.dtype == dweight.dtype == dbias.dtype == dtype
    # The reference takes the engine's `out`, so ReLU's 0/1 factor is the same for both.
    rdx, rdw, rdb = dense_backward(w64, x64, _f64(dout)[0], _f64(out)[0], relu=relu, **kw)
    adout = np.abs(_f64(dout)[0])
    sdx, sdw, sdb = dense_backward(np.abs(w64), np.abs(x64), adout, None, **kw)
    rows = entry_rows(indptr)
    assert dweight.shape == (indices.shape[0],)
    assert_close(dweight, rdw[rows, indices], sdw[rows, indices], dtype, "dweight")
    assert_close(dbias, rdb, sdb, dtype, "dbias")
    assert_close(dx, rdx, sdx, dtype, "dx")
    # Exact zeros outside the active pattern: inactive entries, dropped rows/inputs.
    inactive = np.ones(indices.shape[0], dtype=bool)
    inactive[active.pos] = False
    assert np.all(dweight[inactive] == 0)
    if row is not None:
        assert np.all(dbias[~row] == 0)
    if col is not None:
        assert np.all(dx[~col] == 0)

    dx2, dweight2, dbias2 = sparse.masked_matmul_backward(
        active, x, dout, out, relu=relu, need_dx=False
    )
    assert dx2 is None
    np.testing.assert_array_equal(dweight2, dweight)
    np.testing.assert_array_equal(dbias2, dbias)


@pytest.mark.parametrize("dtype", DTYPES)
def test_masked_matmul_without_bias_is_the_product(rng, dtype):
    shape = (6, 9)
    indptr, indices, data = random_csr(rng, shape, 0.5, dtype, empty_rows=1)
    x = rng.standard_normal((9, 13)).astype(dtype)
    active = sparse.select_active(indptr, indices, data, shape)
    out = sparse.masked_matmul(active, x)
    w64, x64 = _f64(sparse.to_dense(indptr, indices, data, shape), x)
    assert_close(out, w64 @ x64, np.abs(w64) @ np.abs(x64), dtype, "out")


@pytest.mark.parametrize("layout", ["fortran", "strided"])
def test_noncontiguous_inputs_give_the_same_result(rng, layout):
    shape = (5, 8)
    indptr, indices, data = random_csr(rng, shape, 0.6, np.float64)
    big = rng.standard_normal((8, 26))
    x = np.asfortranarray(big[:, :13]) if layout == "fortran" else big[:, ::2]
    dout = rng.standard_normal((5, 26))
    dout = np.asfortranarray(dout[:, :13]) if layout == "fortran" else dout[:, ::2]
    active = sparse.select_active(indptr, indices, data, shape)
    out = sparse.masked_matmul(active, x, relu=True)
    out_c = sparse.masked_matmul(active, np.ascontiguousarray(x), relu=True)
    np.testing.assert_array_equal(out, out_c)
    got = sparse.masked_matmul_backward(active, x, dout, out, relu=True)
    want = sparse.masked_matmul_backward(
        active, np.ascontiguousarray(x), np.ascontiguousarray(dout), out_c, relu=True
    )
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)


@pytest.mark.parametrize("dtype", DTYPES)
def test_to_dense_applies_masks(rng, dtype):
    shape = (7, 6)
    indptr, indices, data = random_csr(rng, shape, 0.5, dtype, empty_rows=2)
    rows = entry_rows(indptr)
    want = np.zeros(shape, dtype)
    want[rows, indices] = data
    got = sparse.to_dense(indptr, indices, data, shape)
    assert got.dtype == dtype
    np.testing.assert_array_equal(got, want)
    entry = rng.random(indices.shape[0]) < 0.5
    row = rng.random(shape[0]) < 0.5
    np.testing.assert_array_equal(
        sparse.to_dense(indptr, indices, data, shape, entry_mask=entry),
        np.where(dense_entry_mask(indptr, indices, shape, entry), want, 0),
    )
    np.testing.assert_array_equal(
        sparse.to_dense(indptr, indices, data, shape, row_mask=row),
        np.where(row[:, None], want, 0),
    )


def test_full_pattern_stores_every_entry():
    indptr, indices = sparse.full_pattern((3, 4))
    np.testing.assert_array_equal(
        sparse.to_dense(indptr, indices, np.ones(12), (3, 4)), np.ones((3, 4))
    )
    indptr, indices = sparse.full_pattern((0, 4))
    assert indptr.tolist() == [0] and indices.size == 0


@pytest.mark.parametrize("density", [0.05, 0.3, 1.0])
def test_random_pattern_is_canonical_with_the_right_size(density):
    shape = (13, 17)
    indptr, indices = sparse.random_pattern(shape, density, rng=3)
    sparse.check_pattern(indptr, indices, shape)
    assert indptr[-1] == round(density * shape[0] * shape[1])
    again = sparse.random_pattern(shape, density, rng=3)
    np.testing.assert_array_equal(again[1], indices)


# ----------------------------------------------------------------------- check_pattern
BAD_PATTERNS = [
    # indptr, indices, shape, match
    ([0, 2], [1, 0], (1, 3), "sorted and unique"),
    ([0, 2], [1, 1], (1, 3), "sorted and unique"),
    ([0, 1, 4], [2, 0, 2, 2], (2, 3), "sorted and unique"),
    ([0, 2], [0, 3], (1, 3), r"indices must be in \[0, n_in\)"),
    ([0, 2], [-1, 1], (1, 3), r"indices must be in \[0, n_in\)"),
    ([0, 1], [0], (2, 3), "indptr must have n_out \\+ 1"),
    ([1, 2, 2], [0, 1], (2, 3), "indptr must be nondecreasing"),
    ([0, 2, 1, 3], [0, 1, 2], (3, 3), "indptr must be nondecreasing"),
    ([0, 1, 1], [0, 1], (2, 3), "indptr must be nondecreasing"),
    ([0, 2, 3], [0, 1], (2, 3), "indptr must be nondecreasing"),
    ([0.0, 1.0], [0], (1, 3), "indptr must be a 1-D integer array"),
    ([0, 1], [0.5], (1, 3), "indices must be a 1-D integer array"),
    ([[0, 1]], [0], (1, 3), "indptr must be a 1-D integer array"),
    ([0, 1], [0], (1, -3), "shape must be a pair"),
]


@pytest.mark.parametrize(("indptr", "indices", "shape", "match"), BAD_PATTERNS)
def test_check_pattern_rejects(indptr, indices, shape, match):
    with pytest.raises(ValueError, match=match):
        sparse.check_pattern(indptr, indices, shape)


def test_check_pattern_accepts_decreasing_across_rows():
    # A row may start below the previous row's last column.
    indptr, indices = sparse.check_pattern([0, 2, 2, 4], [3, 5, 0, 1], (3, 6))
    assert indptr.dtype == indices.dtype == np.int64
    np.testing.assert_array_equal(indices, [3, 5, 0, 1])


# ------------------------------------------------------------------- property tests
dense_masks = st.tuples(st.integers(0, 7), st.integers(0, 7)).flatmap(
    lambda s: hnp.arrays(np.bool_, s)
)


@settings(max_examples=60, deadline=None)
@given(mask=dense_masks, seed=st.integers(0, 2**32 - 1))
def test_pattern_from_dense_round_trip(mask, seed):
    indptr, indices = sparse.pattern_from_dense(mask)
    sparse.check_pattern(indptr, indices, mask.shape)  # always canonical
    assert indptr[-1] == mask.sum()
    np.testing.assert_array_equal(np.diff(indptr), mask.sum(axis=1))
    values = np.random.default_rng(seed).standard_normal(mask.shape) + 10.0
    dense = sparse.to_dense(indptr, indices, values[mask], mask.shape)
    np.testing.assert_array_equal(dense, np.where(mask, values, 0.0))
    back = sparse.pattern_from_dense(dense != 0)
    np.testing.assert_array_equal(back[0], indptr)
    np.testing.assert_array_equal(back[1], indices)


@settings(max_examples=60, deadline=None)
@given(mask=dense_masks, data=st.data())
def test_compact_pattern_equals_rebuilding_from_kept_mask(mask, data):
    indptr, indices = sparse.pattern_from_dense(mask)
    keep = data.draw(hnp.arrays(np.bool_, indices.shape[0]))
    new_indptr, new_indices = sparse.compact_pattern(indptr, indices, keep)
    kept = dense_entry_mask(indptr, indices, mask.shape, keep)
    want_indptr, want_indices = sparse.pattern_from_dense(kept)
    np.testing.assert_array_equal(new_indptr, want_indptr)
    np.testing.assert_array_equal(new_indices, want_indices)
    sparse.check_pattern(new_indptr, new_indices, mask.shape)


@settings(max_examples=60, deadline=None)
@given(mask=dense_masks, data=st.data())
def test_select_active_is_consistent(mask, data):
    shape = mask.shape
    indptr, indices = sparse.pattern_from_dense(mask)
    nnz = indices.shape[0]
    values = np.arange(1.0, nnz + 1.0)
    entry = data.draw(st.none() | hnp.arrays(np.bool_, nnz))
    row = data.draw(st.none() | hnp.arrays(np.bool_, shape[0]))
    col = data.draw(st.none() | hnp.arrays(np.bool_, shape[1]))
    a = sparse.select_active(
        indptr, indices, values, shape, entry_mask=entry, row_mask=row, col_mask=col
    )
    rows = entry_rows(indptr)
    keep = np.ones(nnz, dtype=bool)
    if entry is not None:
        keep &= entry
    if row is not None:
        keep &= row[rows]
    if col is not None:
        keep &= col[indices]
    np.testing.assert_array_equal(a.pos, np.flatnonzero(keep))
    np.testing.assert_array_equal(a.indices, indices[a.pos])
    np.testing.assert_array_equal(a.data, values[a.pos])
    assert a.n_active == keep.sum() and a.nnz == nnz and a.shape == shape
    sparse.check_pattern(a.indptr, a.indices, shape)
    np.testing.assert_array_equal(entry_rows(a.indptr), rows[a.pos])


# ------------------------------------------------------------------------ bad input
def _layer_inputs(dtype=np.float64):
    rng = np.random.default_rng(0)
    indptr, indices, data = random_csr(rng, (4, 5), 0.6, dtype)
    return indptr, indices, data, (4, 5)


@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        (lambda nnz: dict(entry_mask=np.ones(nnz - 1, bool)), ValueError, "entry_mask must"),
        (lambda nnz: dict(entry_mask=np.ones(nnz, np.int64)), TypeError, "entry_mask must be"),
        (lambda nnz: dict(row_mask=np.ones(5, bool)), ValueError, "row_mask must have shape"),
        (lambda nnz: dict(row_mask=np.ones(4)), TypeError, "row_mask must be a boolean array"),
        (lambda nnz: dict(col_mask=np.ones(4, bool)), ValueError, "col_mask must have shape"),
        (lambda nnz: dict(col_mask=np.ones((5, 1), bool)), ValueError, "col_mask must have"),
        (lambda nnz: dict(col_mask=np.ones(5, np.uint8)), TypeError, "col_mask must be a"),
    ],
)
def test_select_active_rejects_bad_masks(make, exc, match):
    indptr, indices, data, shape = _layer_inputs()
    with pytest.raises(exc, match=match):
        sparse.select_active(indptr, indices, data, shape, **make(indices.shape[0]))


def test_select_active_rejects_bad_data():
    indptr, indices, data, shape = _layer_inputs()
    with pytest.raises(ValueError, match="data must have shape"):
        sparse.select_active(indptr, indices, data[:-1], shape)
    with pytest.raises(TypeError, match="data must have dtype float32 or float64"):
        sparse.select_active(indptr, indices, data.astype(np.float16), shape)
    with pytest.raises(ValueError, match="indices must be sorted"):
        sparse.select_active(indptr, indices[::-1], data, shape)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_masked_matmul_rejects_nonfinite(bad):
    indptr, indices, data, shape = _layer_inputs()
    active = sparse.select_active(indptr, indices, data, shape)
    x = np.ones((5, 3))
    x[2, 1] = bad
    with pytest.raises(ValueError, match="x must be finite"):
        sparse.masked_matmul(active, x)
    bias = np.zeros(4)
    bias[0] = bad
    with pytest.raises(ValueError, match="bias must be finite"):
        sparse.masked_matmul(active, np.ones((5, 3)), bias)
    dout = np.ones((4, 3))
    dout[1, 1] = bad
    with pytest.raises(ValueError, match="dout must be finite"):
        sparse.masked_matmul_backward(active, np.ones((5, 3)), dout)


def test_masked_matmul_rejects_bad_shapes_and_dtypes():
    indptr, indices, data, shape = _layer_inputs()
    active = sparse.select_active(indptr, indices, data, shape)
    with pytest.raises(ValueError, match=r"x must have shape \(5, n_batch\)"):
        sparse.masked_matmul(active, np.ones((4, 3)))
    with pytest.raises(ValueError, match="x must be 2-D"):
        sparse.masked_matmul(active, np.ones(5))
    with pytest.raises(ValueError, match="bias must have shape"):
        sparse.masked_matmul(active, np.ones((5, 3)), np.zeros(5))
    with pytest.raises(TypeError, match=r"same dtype as x \(float"):
        sparse.masked_matmul(active, np.ones((5, 3), np.float32))
    with pytest.raises(TypeError, match="bias must have the same dtype"):
        sparse.masked_matmul(active, np.ones((5, 3)), np.zeros(4, np.float32))
    active32 = sparse.select_active(indptr, indices, data.astype(np.float32), shape)
    with pytest.raises(TypeError, match=r"same dtype as x \(float"):
        sparse.masked_matmul(active32, np.ones((5, 3)))


def test_masked_matmul_backward_rejects_bad_input():
    indptr, indices, data, shape = _layer_inputs()
    active = sparse.select_active(indptr, indices, data, shape)
    x = np.ones((5, 3))
    with pytest.raises(ValueError, match="dout must have n_batch = 3"):
        sparse.masked_matmul_backward(active, x, np.ones((4, 2)))
    with pytest.raises(ValueError, match=r"dout must have shape \(4, n_batch\)"):
        sparse.masked_matmul_backward(active, x, np.ones((3, 3)))
    with pytest.raises(TypeError, match=r"same dtype as dout \(float32\)"):
        sparse.masked_matmul_backward(active, x, np.ones((4, 3), np.float32))
    with pytest.raises(ValueError, match="out is required when relu is True"):
        sparse.masked_matmul_backward(active, x, np.ones((4, 3)), relu=True)
    with pytest.raises(ValueError, match=r"out must have shape \(4, n_batch\)"):
        sparse.masked_matmul_backward(active, x, np.ones((4, 3)), np.ones((5, 3)), relu=True)


def test_compact_pattern_rejects_bad_keep():
    indptr, indices, _, _ = _layer_inputs()
    with pytest.raises(ValueError, match="keep must have shape"):
        sparse.compact_pattern(indptr, indices, np.ones(indices.shape[0] + 1, bool))
    with pytest.raises(TypeError, match="keep must be a boolean array"):
        sparse.compact_pattern(indptr, indices, np.ones(indices.shape[0]))


def test_pattern_helpers_reject_bad_values():
    with pytest.raises(ValueError, match="mask must be 2-D"):
        sparse.pattern_from_dense(np.ones(3, bool))
    for density in (0.0, -0.5, 1.5):
        with pytest.raises(ValueError, match="density must be in"):
            sparse.random_pattern((3, 3), density, rng=0)
    with pytest.raises(TypeError, match="rng must be"):
        sparse.random_pattern((3, 3), 0.5, rng="seed")


@pytest.mark.parametrize("name", ["entry_mask", "row_mask"])
def test_to_dense_rejects_masks_of_wrong_length(name):
    indptr, indices, data, shape = _layer_inputs()
    n = indices.shape[0] if name == "entry_mask" else shape[0]
    with pytest.raises(ValueError, match=name):
        sparse.to_dense(indptr, indices, data, shape, **{name: np.ones(n + 1, bool)})


@pytest.mark.parametrize("name", ["entry_mask", "row_mask"])
def test_to_dense_rejects_non_bool_masks(name):
    indptr, indices, data, shape = _layer_inputs()
    n = indices.shape[0] if name == "entry_mask" else shape[0]
    with pytest.raises(TypeError, match=name):
        sparse.to_dense(indptr, indices, data, shape, **{name: np.full(n, 0.5)})


def test_masked_matmul_backward_ignores_out_without_relu():
    # Without ReLU the forward output is not needed; it used to reach the kernel
    # unchecked (a list failed inside Numba).
    indptr, indices = sparse.full_pattern((2, 3))
    active = sparse.select_active(indptr, indices, np.arange(6.0), (2, 3))
    x, dout = np.ones((3, 4)), np.ones((2, 4))
    want = sparse.masked_matmul_backward(active, x, dout)
    got = sparse.masked_matmul_backward(active, x, dout, out=[[1.0] * 4] * 2)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_array_equal(g, w)
