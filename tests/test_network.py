"""The whole MLP: finite differences, the dense reference, neuron masks, validation."""

import numpy as np
import pytest
from conftest import (
    DTYPES,
    RTOL,
    assert_close,
    assert_grad_close,
    by_layer,
    central_differences,
    dense_entry_mask,
    entry_rows,
)

from cpusparse import Linear, ReLU, Sequential, SparseLinear, mlp
from cpusparse.testing.reference import dense_mlp_loss_and_grads

N_IN, HIDDEN, N_CLASSES, N_BATCH = 6, (7, 5), 4, 9
KINK = 1e-3


def _dense_args(net, masks):
    """Dense weights, biases and masks for reference.dense_mlp_loss_and_grads."""
    weights = [
        layer.to_dense() if isinstance(layer, SparseLinear) else layer.weight
        for layer in net.layers
    ]
    biases = [layer.bias for layer in net.layers]
    weight_masks, row_masks = [], []
    prunable_masks = dict(zip(net.prunable, masks, strict=True))
    for i, layer in enumerate(net.layers):
        mask = prunable_masks.get(i)
        wm = rm = None
        if isinstance(layer, SparseLinear):
            if layer.granularity == "weight":
                wm = dense_entry_mask(layer.indptr, layer.indices, layer.shape, mask)
            else:
                rm = mask
        weight_masks.append(wm)
        row_masks.append(rm)
    return weights, biases, dict(weight_masks=weight_masks, row_masks=row_masks)


def _hidden_preactivations(net, x, masks):
    """Pre-activations of the kept hidden units, from the dense reference."""
    weights, biases, kw = _dense_args(net, masks)
    pres, h = [], x
    for i in range(len(weights) - 1):
        w = weights[i] if kw["weight_masks"][i] is None else weights[i] * kw["weight_masks"][i]
        pre = w @ h + biases[i][:, None]
        rm = kw["row_masks"][i]
        pres.append(pre if rm is None else pre[rm])
        h = np.maximum(pre, 0) if rm is None else np.where(rm[:, None], np.maximum(pre, 0), 0)
    return pres


def _setup(rng, granularity, sparse_classifier, dtype=np.float64, density=0.8):
    net = mlp(
        N_IN,
        HIDDEN,
        N_CLASSES,
        granularity=granularity,
        sparse_classifier=sparse_classifier,
        stored_density=density,
        dtype=dtype,
        rng=rng,
    )
    masks = [rng.random(n) < 0.7 for n in net.n_units()]
    for m in masks:
        m[0] = True  # keep at least one unit per layer
    y = rng.integers(0, N_CLASSES, N_BATCH)
    for _ in range(200):
        x = rng.standard_normal((N_IN, N_BATCH)).astype(dtype)
        pres = _hidden_preactivations(net, x.astype(np.float64), masks)
        if min(np.abs(p).min(initial=np.inf) for p in pres) >= KINK:
            return net, masks, x, y
    raise RuntimeError("could not draw inputs away from the ReLU kinks")


CONFIGS = [("weight", False), ("neuron", False), ("weight", True), ("neuron", True)]


@pytest.mark.parametrize(("granularity", "sparse_classifier"), CONFIGS)
def test_mlp_finite_differences(rng, granularity, sparse_classifier):
    net, masks, x, y = _setup(rng, granularity, sparse_classifier)
    loss, grads, _ = net.loss_and_grads(x, y, masks)
    grads = by_layer(grads, len(net.layers))
    assert len(net.layers) == 3

    def f():
        return net.loss_and_grads(x, y, masks)[0]

    assert f() == loss
    for i, params in enumerate(by_layer(net.params(), len(net.layers))):
        for name, arr in params.items():
            fd = central_differences(f, arr)
            assert_grad_close(grads[i][name], fd, f"layer {i} {name}")
    # The check must not be vacuous.
    assert all(np.abs(g["bias"]).max() > 0 for g in grads)


@pytest.mark.parametrize(("granularity", "sparse_classifier"), CONFIGS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_mlp_matches_dense_reference(rng, granularity, sparse_classifier, dtype):
    net, masks, x, y = _setup(rng, granularity, sparse_classifier, dtype=dtype, density=0.6)
    loss, grads, logits = net.loss_and_grads(x, y, masks)
    grads = by_layer(grads, len(net.layers))
    weights, biases, kw = _dense_args(net, masks)
    w64 = [np.asarray(w, np.float64) for w in weights]
    b64 = [np.asarray(b, np.float64) for b in biases]
    ref_loss, ref_dw, ref_db = dense_mlp_loss_and_grads(w64, b64, x.astype(np.float64), y, **kw)
    # Gradients are O(1/n_batch) sums of O(1) terms: scale the absolute tolerance by 10
    # (float32 rounding compounds through three layers).
    factor = 1.0 if dtype == np.float64 else 10.0
    rtol = RTOL[np.dtype(dtype)]
    assert abs(loss - ref_loss) <= factor * rtol * (abs(ref_loss) + 1)
    for i, layer in enumerate(net.layers):
        scale = factor * (np.abs(ref_dw[i]) + 1.0)
        if isinstance(layer, SparseLinear):
            rows = entry_rows(layer.indptr)
            got, ref = grads[i]["weight"], ref_dw[i][rows, layer.indices]
            scale = scale[rows, layer.indices]
        else:
            got, ref = grads[i]["weight"], ref_dw[i]
        assert_close(got, ref, scale, dtype, f"layer {i} weight")
        assert_close(grads[i]["bias"], ref_db[i], factor * (np.abs(ref_db[i]) + 1), dtype)


@pytest.mark.parametrize("sparse_classifier", [False, True])
def test_neuron_mask_gives_exact_zero_activations(rng, sparse_classifier):
    net, masks, x, y = _setup(rng, "neuron", sparse_classifier)
    masks[0][1] = masks[1][2] = False
    out, caches = net.forward(x, masks)
    for k, i in enumerate(net.prunable[: len(HIDDEN)]):
        h = caches[i].out
        assert np.all(h[~masks[k]] == 0), f"hidden layer {i}: dropped units are not 0"
        assert np.any(h[masks[k]] != 0)
    # The next layer skips the dropped inputs: no active entry in a dropped column.
    for k, i in enumerate(net.prunable[1 : len(HIDDEN)], start=1):
        kept_inputs = caches[i].cols  # the block path's input columns
        assert not np.any(np.isin(kept_inputs, np.flatnonzero(~masks[k - 1])))
        assert np.isin(np.flatnonzero(masks[k - 1]), kept_inputs).all()
    _, grads = net.backward(np.ones_like(out) / out.size, caches)
    grads = by_layer(grads, len(net.layers))
    for k, i in enumerate(net.prunable[: len(HIDDEN)]):
        layer = net.layers[i]
        dropped_entries = ~masks[k][entry_rows(layer.indptr)]
        assert np.all(grads[i]["weight"][dropped_entries] == 0)
        assert np.all(grads[i]["bias"][~masks[k]] == 0)


def test_sequential_rejects_wrong_number_of_masks():
    net = mlp(N_IN, HIDDEN, N_CLASSES, rng=0, dtype=np.float64)
    x = np.ones((N_IN, 3))
    masks = [np.ones(n, dtype=bool) for n in net.n_units()]
    for bad in (masks[:1], [*masks, masks[0]], []):
        with pytest.raises(
            ValueError, match=r"masks must be a list with one array per prunable layer \(2\)"
        ):
            net.forward(x, bad)
    with pytest.raises(ValueError, match="mask must have shape"):
        net.forward(x, [masks[0], masks[0]])
    with pytest.raises(TypeError, match="mask must be a boolean array"):
        net.forward(x, [masks[0], masks[1].astype(np.int64)])
    with pytest.raises(ValueError, match="layers must be a nonempty list"):
        Sequential([])
    with pytest.raises(TypeError, match="all layers must share one dtype"):
        Sequential([Linear(np.ones((2, 2)), np.zeros(2)), ReLU(), Linear.random(2, 2, rng=0)])


def test_sequential_none_masks_keep_everything(rng):
    net, masks, x, y = _setup(rng, "weight", True)
    full = [np.ones(n, dtype=bool) for n in net.n_units()]
    loss_none, grads_none, _ = net.loss_and_grads(x, y, None)
    loss_full, grads_full, _ = net.loss_and_grads(x, y, full)
    assert loss_none == loss_full
    assert list(grads_none) == list(grads_full) == list(net.params())
    for name in grads_none:
        np.testing.assert_array_equal(grads_none[name], grads_full[name])


@pytest.mark.parametrize("granularity", ["weight", "neuron"])
@pytest.mark.parametrize("sparse_classifier", [False, True])
def test_make_mlp_is_reproducible(granularity, sparse_classifier):
    kw = dict(granularity=granularity, sparse_classifier=sparse_classifier, stored_density=0.5)
    a = mlp(N_IN, HIDDEN, N_CLASSES, rng=7, **kw)
    b = mlp(N_IN, HIDDEN, N_CLASSES, rng=np.random.default_rng(7), **kw)
    c = mlp(N_IN, HIDDEN, N_CLASSES, rng=8, **kw)
    assert [type(layer) for layer in a.layers] == [type(layer) for layer in b.layers]
    for la, lb in zip(a.layers, b.layers, strict=True):
        for name, arr in la.params().items():
            np.testing.assert_array_equal(arr, lb.params()[name])
        if isinstance(la, SparseLinear):
            np.testing.assert_array_equal(la.indices, lb.indices)
            np.testing.assert_array_equal(la.indptr, lb.indptr)
    assert not np.array_equal(a.layers[0].weight, c.layers[0].weight)
    assert a.dtype == np.float32
    assert isinstance(a.layers[-1], SparseLinear if sparse_classifier else Linear)


def test_make_mlp_rejects_bad_arguments():
    with pytest.raises(ValueError, match="granularity must be one of"):
        mlp(3, (4,), 2, granularity="channel")
    with pytest.raises(ValueError, match="stored_density must be in"):
        mlp(3, (4,), 2, stored_density=0.0)
    with pytest.raises(ValueError, match=r"hidden_layer_sizes\[0\] must be a positive int, got 0"):
        mlp(3, (0,), 2)
    with pytest.raises(ValueError, match=r"n_in must be a positive int, got 6.9"):
        mlp(6.9, (8,), 3)
    with pytest.raises(ValueError, match=r"hidden_layer_sizes\[0\] must be a positive int"):
        mlp(6, (8.5,), 3)


# ---------------------------------------------------------------- Sequential.backward


def _sparse_classifier_net():
    rng = np.random.default_rng(1)
    net = mlp(5, (6,), 3, sparse_classifier=True, dtype=np.float64, rng=0)
    x = rng.standard_normal((5, 16))
    out, caches = net.forward(x)
    return net, caches, rng.standard_normal(out.shape)


def test_sequential_backward_fortran_dout_gives_the_same_gradients():
    net, caches, dout = _sparse_classifier_net()
    _, want = net.backward(dout, caches)
    _, got = net.backward(np.asfortranarray(dout), caches)
    assert list(got) == list(want) == list(net.params())
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])


def test_sequential_backward_rejects_mixed_dtype_dout():
    net, caches, dout = _sparse_classifier_net()
    with pytest.raises(TypeError, match="dout"):
        net.backward(dout.astype(np.float32), caches)


def test_sequential_backward_rejects_dout_of_wrong_shape():
    net, caches, dout = _sparse_classifier_net()
    with pytest.raises(ValueError, match="dout"):
        net.backward(np.ascontiguousarray(dout[:, :5]), caches)


def test_sequential_forward_validates_live():
    # live reached the kernels unchecked: a short one was read out of bounds.
    net = mlp(4, (3,), 2, rng=0, dtype=np.float64)
    x = np.ones((4, 5))
    with pytest.raises(ValueError, match="live"):
        net.forward(x, [None], live=np.array([True, True]))
    with pytest.raises(TypeError, match="live"):
        net.forward(x, [None], live=np.ones(4))
    live = [True, False, True, True]
    got, _ = net.forward(x, [None], live=live)
    want, _ = net.forward(np.where(np.array(live)[:, None], x, 0.0), [None])
    np.testing.assert_array_equal(got, want)


def test_sequential_rejects_layers_whose_sizes_do_not_chain():
    first = SparseLinear.random(4, 3, rng=0, dtype=np.float64)
    with pytest.raises(
        ValueError, match=r"layers\[1\] .* takes 5 input features, but layers\[0\] outputs 3"
    ):
        Sequential([first, Linear.random(5, 2, rng=0, dtype=np.float64)])
    with pytest.raises(TypeError, match=r"layers\[1\] must be a cpusparse Layer, got function"):
        Sequential([first, lambda x: x])
    Sequential([first, ReLU(), Linear.random(3, 2, rng=0, dtype=np.float64)])  # ReLU takes any size
