"""Layers: finite-difference gradient checks, exact zeros at inactive entries, compact()."""

import numpy as np
import pytest
from conftest import (
    DTYPES,
    assert_close,
    assert_grad_close,
    central_differences,
    dense_entry_mask,
    entry_rows,
    random_csr,
)

from cpusparse import Linear, ReLU, SparseLinear
from cpusparse.testing.reference import dense_backward, dense_forward

N_IN, N_OUT, N_BATCH = 7, 5, 6
KINK = 1e-3  # pre-activations closer to 0 than this are redrawn


def _draw(rng, shape, *, relu, pre_fn, max_tries=200):
    """Draw ``x`` of ``shape`` until every ReLU pre-activation is at least KINK from 0."""
    for _ in range(max_tries):
        x = rng.standard_normal(shape)
        if not relu or np.abs(pre_fn(x)).min(initial=np.inf) >= KINK:
            return x
    raise RuntimeError("could not draw inputs away from the ReLU kink")


def _sparse_layer(rng, granularity, relu):
    indptr, indices, data = random_csr(rng, (N_OUT, N_IN), 0.6, np.float64, empty_rows=1)
    bias = rng.standard_normal(N_OUT)
    return SparseLinear(
        indptr,
        indices,
        data,
        bias,
        N_IN,
        granularity=granularity,
        activation="relu" if relu else None,
    )


def _sparse_setup(rng, granularity, relu, masked, with_live_inputs):
    layer = _sparse_layer(rng, granularity, relu)
    mask = rng.random(layer.n_units) < 0.7 if masked else None
    a = rng.random(N_IN) < 0.6 if with_live_inputs else None
    if granularity == "weight":
        wmask = dense_entry_mask(layer.indptr, layer.indices, layer.shape, mask)
        kw = dict(weight_mask=wmask, col_mask=a)
    else:
        kw = dict(row_mask=mask, col_mask=a)
    weight = layer.to_dense()

    def pre(x):  # pre-activations of the active rows
        p = dense_forward(weight, layer.bias, x, **kw)
        return p if granularity == "weight" or mask is None else p[mask]

    x = _draw(rng, (N_IN, N_BATCH), relu=relu, pre_fn=pre)
    return layer, mask, a, x, kw


@pytest.mark.parametrize("granularity", ["weight", "neuron"])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("with_live_inputs", [False, True])
def test_sparse_linear_finite_differences(rng, granularity, relu, masked, with_live_inputs):
    layer, mask, a, x, _ = _sparse_setup(rng, granularity, relu, masked, with_live_inputs)
    out, cache = layer.forward(x, mask, live=a)
    upstream = rng.standard_normal(out.shape)
    dx, grads = layer.backward(upstream, cache)

    def loss():
        return float(np.sum(layer.forward(x, mask, live=a)[0] * upstream))

    fd_w = central_differences(loss, layer.weight)
    fd_b = central_differences(loss, layer.bias)
    fd_x = central_differences(loss, x)
    assert_grad_close(grads["weight"], fd_w, "weight")
    assert_grad_close(grads["bias"], fd_b, "bias")
    assert_grad_close(dx, fd_x, "x")
    # Something must be nonzero for the check to mean anything.
    assert np.abs(fd_b).max() > 0 or np.abs(fd_w).max() > 0

    # Gradients at inactive entries (by the masks, whichever path computed them) are 0.
    inactive = np.zeros(layer.nnz, dtype=bool)
    if mask is not None and granularity == "weight":
        inactive |= ~mask
    if mask is not None and granularity == "neuron":
        inactive |= ~mask[entry_rows(layer.indptr)]
        assert np.all(grads["bias"][~mask] == 0)
        assert np.all(out[~mask] == 0)
    if a is not None:
        inactive |= ~a[layer.indices]
        assert np.all(dx[~a] == 0)
    assert np.all(grads["weight"][inactive] == 0)
    if inactive.any() and not inactive.all():
        assert np.any(grads["weight"][~inactive] != 0)


@pytest.mark.parametrize("granularity", ["weight", "neuron"])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_sparse_linear_matches_dense_reference(rng, granularity, relu, dtype):
    layer, mask, a, x, kw = _sparse_setup(rng, granularity, relu, True, True)
    layer = SparseLinear(
        layer.indptr,
        layer.indices,
        layer.weight.astype(dtype),
        layer.bias.astype(dtype),
        N_IN,
        granularity=granularity,
        activation=layer.activation,
    )
    x = x.astype(dtype)
    out, cache = layer.forward(x, mask, live=a)
    w64, x64, b64 = (np.asarray(v, np.float64) for v in (layer.to_dense(), x, layer.bias))
    ref = dense_forward(w64, b64, x64, relu=relu, **kw)
    assert_close(out, ref, dense_forward(np.abs(w64), np.abs(b64), np.abs(x64), **kw), dtype)
    dout = rng.standard_normal(out.shape).astype(dtype)
    dx, grads = layer.backward(dout, cache)
    rdx, rdw, rdb = dense_backward(w64, x64, dout.astype(np.float64), out, relu=relu, **kw)
    sdx, sdw, sdb = dense_backward(np.abs(w64), np.abs(x64), np.abs(dout.astype(float)), **kw)
    rows = entry_rows(layer.indptr)
    assert_close(grads["weight"], rdw[rows, layer.indices], sdw[rows, layer.indices], dtype)
    assert_close(grads["bias"], rdb, sdb, dtype)
    assert_close(dx, rdx, sdx, dtype)


def test_sparse_linear_need_dx_false(rng):
    layer, mask, a, x, _ = _sparse_setup(rng, "weight", True, True, False)
    out, cache = layer.forward(x, mask)
    dout = rng.standard_normal(out.shape)
    dx, grads = layer.backward(dout, cache, need_dx=False)
    _, grads_full = layer.backward(dout, cache)
    assert dx is None
    np.testing.assert_array_equal(grads["weight"], grads_full["weight"])
    np.testing.assert_array_equal(grads["bias"], grads_full["bias"])


@pytest.mark.parametrize("relu", [False, True])
def test_linear_finite_differences(rng, relu):
    weight = rng.standard_normal((N_OUT, N_IN))
    bias = rng.standard_normal(N_OUT)
    layer = Linear(weight, bias, activation="relu" if relu else None)
    x = _draw(rng, (N_IN, N_BATCH), relu=relu, pre_fn=lambda x: weight @ x + bias[:, None])
    out, cache = layer.forward(x)
    upstream = rng.standard_normal(out.shape)
    dx, grads = layer.backward(upstream, cache)

    def loss():
        return float(np.sum(layer.forward(x)[0] * upstream))

    assert_grad_close(grads["weight"], central_differences(loss, layer.weight), "weight")
    assert_grad_close(grads["bias"], central_differences(loss, layer.bias), "bias")
    assert_grad_close(dx, central_differences(loss, x), "x")
    assert np.abs(grads["bias"]).max() > 0


def test_relu_finite_differences(rng):
    x = _draw(rng, (N_IN, N_BATCH), relu=True, pre_fn=lambda x: x)
    layer = ReLU()
    out, cache = layer.forward(x)
    upstream = rng.standard_normal(out.shape)
    dx, grads = layer.backward(upstream, cache)
    assert grads == {}
    fd = central_differences(lambda: float(np.sum(layer.forward(x)[0] * upstream)), x)
    assert_grad_close(dx, fd, "x")
    assert np.all(dx[x < 0] == 0) and np.all(out[x < 0] == 0)
    np.testing.assert_array_equal(out[x > 0], x[x > 0])


@pytest.mark.parametrize("granularity", ["weight", "neuron"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_compact_keeps_the_forward_output(rng, granularity, dtype):
    layer = SparseLinear.random(
        N_IN, N_OUT, granularity=granularity, activation="relu", dtype=dtype, rng=rng
    )
    mask = rng.random(layer.n_units) < 0.5
    x = rng.standard_normal((N_IN, 13)).astype(dtype)
    out, _ = layer.forward(x, mask)
    if granularity == "weight":
        keep, new_mask = mask, None
    else:  # drop the stored entries of the masked rows; the mask stays the same
        keep, new_mask = mask[entry_rows(layer.indptr)], mask
    small = layer.compact({"weight": keep})
    assert small.nnz == keep.sum() and small.shape == layer.shape
    np.testing.assert_array_equal(small.weight, layer.weight[keep])
    out_small, _ = small.forward(x, new_mask)
    np.testing.assert_array_equal(out_small, out)
    np.testing.assert_array_equal(small.to_dense(new_mask), layer.to_dense(mask))


def test_sparse_linear_rejects_bad_input():
    layer = SparseLinear.random(4, 3, rng=0, dtype=np.float64)
    x = np.ones((4, 2))
    with pytest.raises(ValueError, match=r"mask must have shape \(12,\)"):
        layer.forward(x, np.ones(3, bool))
    with pytest.raises(TypeError, match="mask must be a boolean array"):
        layer.forward(x, np.ones(12))
    with pytest.raises(ValueError, match="live must have shape"):
        layer.forward(x, live=np.ones(3, bool))
    with pytest.raises(TypeError, match="live must be a boolean array"):
        layer.forward(x, live=np.ones(4, np.int8))
    with pytest.raises(ValueError, match="x must be finite"):
        layer.forward(np.full((4, 2), np.nan))
    with pytest.raises(TypeError, match=r"same dtype as x \(float32\)"):
        layer.forward(x.astype(np.float32))
    out, cache = layer.forward(x)
    with pytest.raises(ValueError, match="dout must have shape"):
        layer.backward(np.ones((3, 5)), cache)
    with pytest.raises(ValueError, match="granularity must be one of"):
        SparseLinear.random(4, 3, granularity="channel", rng=0)
    with pytest.raises(ValueError, match="activation must be one of"):
        SparseLinear.random(4, 3, activation="tanh", rng=0)
    with pytest.raises(TypeError, match="bias must have the same dtype as weight"):
        SparseLinear(layer.indptr, layer.indices, layer.weight, np.zeros(3, np.float32), 4)


def test_linear_and_relu_reject_bad_input():
    layer = Linear(np.ones((3, 4)), np.zeros(3))
    with pytest.raises(ValueError, match=r"x must have shape \(4, n_batch\)"):
        layer.forward(np.ones((3, 2)))
    with pytest.raises(TypeError, match="bias must have the same dtype as weight"):
        Linear(np.ones((3, 4)), np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="x must be finite"):
        ReLU().forward(np.array([[np.inf]]))


# ---------------------------------------------------------------------------
# Neuron granularity computes on the kept block with BLAS
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("stored_density", [1.0, 0.4])
@pytest.mark.parametrize("keep", ["some", "none", "all", "no-inputs"])
@pytest.mark.parametrize("n_batch", [1, 9])
def test_neuron_block_path_matches_the_csr_path(rng, dtype, stored_density, keep, n_batch):
    layer = SparseLinear.random(
        23, 17, stored_density=stored_density, granularity="neuron", activation="relu",
        dtype=dtype, rng=rng,
    )  # fmt: skip
    mask = {"some": rng.random(17) < 0.5, "none": np.zeros(17, bool)}.get(keep)
    live = np.zeros(23, bool) if keep == "no-inputs" else rng.random(23) < 0.7
    x = rng.standard_normal((23, n_batch)).astype(dtype)
    x[~live] = 0
    out, cache = layer.forward(x, mask, live=live)
    assert type(cache).__name__ == "BlockCache"
    ref_out, ref_cache = layer._csr_forward(x, mask, live)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(out, ref_out, rtol=tol, atol=tol)
    assert out.dtype == dtype and out.shape == (17, n_batch)
    if mask is not None:
        assert np.all(out[~mask] == 0)
    dout = rng.standard_normal(out.shape).astype(dtype)
    dx, grads = layer.backward(dout, cache)
    ref_dx, ref_grads = layer._csr_backward(dout, ref_cache, True)
    np.testing.assert_allclose(dx, ref_dx, rtol=tol, atol=tol)
    for name in ("weight", "bias"):
        np.testing.assert_allclose(grads[name], ref_grads[name], rtol=tol, atol=tol)
        assert grads[name].dtype == dtype
    assert np.all(dx[~live] == 0)
    if keep in ("none", "no-inputs"):
        assert not grads["weight"].any()


def test_gather_and_scatter_block_are_inverse_on_the_kept_entries(rng):
    from cpusparse.engine.kernels import csr as kernels

    layer = SparseLinear.random(12, 10, stored_density=0.5, granularity="neuron", rng=rng)
    rows = np.array([0, 3, 7, 9])
    cols = np.array([1, 2, 5, 11])
    col_pos = np.full(12, -1)
    col_pos[cols] = np.arange(4)
    block = np.zeros((4, 4), dtype=layer.dtype)
    kernels.gather_block(layer.indptr, layer.indices, layer.weight, rows, col_pos, block)
    dense = layer.to_dense()
    np.testing.assert_array_equal(block, dense[np.ix_(rows, cols)])
    back = np.zeros(layer.nnz, dtype=layer.dtype)
    kernels.scatter_block(layer.indptr, layer.indices, rows, col_pos, block, back)
    kept = np.zeros(dense.shape, bool)
    kept[np.ix_(rows, cols)] = True
    np.testing.assert_array_equal(layer.dense("weight", back), np.where(kept, dense, 0))


def test_a_cache_from_another_path_is_refused(rng):
    neuron = SparseLinear.random(6, 5, granularity="neuron", rng=rng)
    weight = SparseLinear.random(6, 5, granularity="weight", rng=rng)
    x = rng.standard_normal((6, 3)).astype(np.float32)
    _, neuron_cache = neuron.forward(x)
    _, weight_cache = weight.forward(x)
    with pytest.raises(TypeError, match="cache must come from this layer's forward, got Sparse"):
        neuron.backward(np.ones((5, 3), np.float32), weight_cache)
    with pytest.raises(TypeError, match="cache must come from this layer's forward, got Block"):
        weight.backward(np.ones((5, 3), np.float32), neuron_cache)


@pytest.mark.parametrize("dtype", DTYPES)
def test_neuron_block_of_a_compacted_layer_uses_the_dense_row_view(rng, dtype):
    # Compaction drops whole rows: the stored rows stay full, so the block is taken from
    # the row-major view of the stored values, and agrees with the CSR path.
    layer = SparseLinear.random(
        11, 9, granularity="neuron", activation="relu", dtype=dtype, rng=rng
    )
    dead = np.zeros(9, dtype=bool)
    dead[[0, 4, 8]] = True
    _, kept = layer.units.compaction(dead)
    small = layer.compact(kept)
    assert small._row_positions() is not None and small.nnz == 6 * 11
    assert SparseLinear.random(11, 9, stored_density=0.5, rng=rng)._row_positions() is None
    mask = ~dead & (rng.random(9) < 0.8)
    live = rng.random(11) < 0.7
    x = rng.standard_normal((11, 5)).astype(dtype) * live[:, None]
    out, cache = small.forward(x, mask, live=live)
    ref_out, ref_cache = small._csr_forward(x, mask, live)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    np.testing.assert_allclose(out, ref_out, rtol=tol, atol=tol)
    dout = rng.standard_normal(out.shape).astype(dtype)
    dx, grads = small.backward(dout, cache)
    ref_dx, ref_grads = small._csr_backward(dout, ref_cache, True)
    np.testing.assert_allclose(dx, ref_dx, rtol=tol, atol=tol)
    np.testing.assert_allclose(grads["weight"], ref_grads["weight"], rtol=tol, atol=tol)
    # Without a mask the emptied rows are kept too: they output the bias alone.
    out, cache = small.forward(x, None, live=live)
    ref_out, ref_cache = small._csr_forward(x, None, live)
    np.testing.assert_allclose(out, ref_out, rtol=tol, atol=tol)
    dx, grads = small.backward(dout, cache)
    ref_dx, ref_grads = small._csr_backward(dout, ref_cache, True)
    np.testing.assert_allclose(dx, ref_dx, rtol=tol, atol=tol)
    np.testing.assert_allclose(grads["weight"], ref_grads["weight"], rtol=tol, atol=tol)
    np.testing.assert_allclose(grads["bias"], ref_grads["bias"], rtol=tol, atol=tol)
