"""PyTorch autograd as a second, independent oracle for the masked MLP."""

import numpy as np
import pytest
from conftest import by_layer, entry_rows

from cpusparse import Linear, SparseLinear, mlp

torch = pytest.importorskip("torch")

N_IN, HIDDEN, N_CLASSES = 10, (12, 8), 5
TOL = {np.float32: dict(rtol=1e-4, atol=1e-6), np.float64: dict(rtol=1e-10, atol=1e-13)}


def _torch_loss_and_grads(net, masks, x, y):
    """The same masked MLP in torch, batch-major (x.T), with dense masked weights."""
    prunable_masks = dict(zip(net.prunable, masks, strict=True))
    weights, biases = [], []
    h = torch.from_numpy(np.ascontiguousarray(x.T))
    for i, layer in enumerate(net.layers):
        w = torch.from_numpy(
            layer.to_dense() if isinstance(layer, SparseLinear) else layer.weight.copy()
        ).requires_grad_(True)
        b = torch.from_numpy(layer.bias.copy()).requires_grad_(True)
        weights.append(w)
        biases.append(b)
        mask = prunable_masks.get(i)
        keep_rows = None
        if isinstance(layer, SparseLinear) and mask is not None:
            if layer.granularity == "weight":
                dense = np.zeros(layer.shape, dtype=bool)
                dense[entry_rows(layer.indptr), layer.indices] = mask
                w = w * torch.from_numpy(dense).to(w.dtype)
            else:
                keep_rows = torch.from_numpy(mask).to(w.dtype)
        h = h @ w.T + b
        if layer.activation == "relu":
            h = torch.relu(h)
        if keep_rows is not None:
            h = h * keep_rows
    loss = torch.nn.functional.cross_entropy(h, torch.from_numpy(y))
    loss.backward()
    return float(loss.detach()), h.detach().numpy().T, weights, biases


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("granularity", ["weight", "neuron"])
@pytest.mark.parametrize("sparse_classifier", [False, True])
@pytest.mark.parametrize("n_batch", [1, 13])
def test_mlp_matches_torch_autograd(rng, dtype, granularity, sparse_classifier, n_batch):
    net = mlp(
        N_IN,
        HIDDEN,
        N_CLASSES,
        granularity=granularity,
        sparse_classifier=sparse_classifier,
        stored_density=0.7,
        dtype=dtype,
        rng=rng,
    )
    masks = [rng.random(n) < 0.6 for n in net.n_units()]
    x = rng.standard_normal((N_IN, n_batch)).astype(dtype)
    y = rng.integers(0, N_CLASSES, n_batch)
    loss, grads, logits = net.loss_and_grads(x, y, masks)
    grads = by_layer(grads, len(net.layers))
    t_loss, t_logits, t_weights, t_biases = _torch_loss_and_grads(net, masks, x, y)

    tol = TOL[dtype]
    np.testing.assert_allclose(logits, t_logits, **tol)
    np.testing.assert_allclose(loss, t_loss, **tol)
    for i, layer in enumerate(net.layers):
        t_dw = t_weights[i].grad.numpy()
        if isinstance(layer, SparseLinear):
            t_dw = t_dw[entry_rows(layer.indptr), layer.indices]  # stored entries only
        else:
            assert isinstance(layer, Linear)
        assert grads[i]["weight"].dtype == dtype
        np.testing.assert_allclose(grads[i]["weight"], t_dw, **tol, err_msg=f"layer {i} weight")
        np.testing.assert_allclose(
            grads[i]["bias"], t_biases[i].grad.numpy(), **tol, err_msg=f"layer {i} bias"
        )
    # Not vacuous: some gradient is nonzero in every layer.
    assert all(np.abs(g["weight"]).max() > 0 for g in grads)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("granularity", ["weight", "neuron"])
def test_sparse_linear_with_live_inputs_matches_torch(rng, dtype, granularity):
    layer = SparseLinear.random(
        N_IN,
        7,
        stored_density=0.6,
        granularity=granularity,
        activation="relu",
        dtype=dtype,
        rng=rng,
    )
    mask = rng.random(layer.n_units) < 0.6
    a = rng.random(N_IN) < 0.6
    x = rng.standard_normal((N_IN, 13)).astype(dtype)
    out, cache = layer.forward(x, mask, live=a)
    dout = rng.standard_normal(out.shape).astype(dtype)
    dx, grads = layer.backward(dout, cache)

    tx = torch.from_numpy(x.copy()).requires_grad_(True)
    w = torch.from_numpy(layer.to_dense()).requires_grad_(True)
    b = torch.from_numpy(layer.bias.copy()).requires_grad_(True)
    w_eff = w
    if granularity == "weight":
        dense = np.zeros(layer.shape, dtype=bool)
        dense[entry_rows(layer.indptr), layer.indices] = mask
        w_eff = w * torch.from_numpy(dense).to(w.dtype)
    t_out = torch.relu(w_eff @ (tx * torch.from_numpy(a).to(w.dtype)[:, None]) + b[:, None])
    if granularity == "neuron":
        t_out = t_out * torch.from_numpy(mask).to(w.dtype)[:, None]
    t_out.backward(torch.from_numpy(dout))

    tol = TOL[dtype]
    np.testing.assert_allclose(out, t_out.detach().numpy(), **tol)
    np.testing.assert_allclose(dx, tx.grad.numpy(), **tol)
    t_dw = w.grad.numpy()[entry_rows(layer.indptr), layer.indices]
    np.testing.assert_allclose(grads["weight"], t_dw, **tol)
    np.testing.assert_allclose(grads["bias"], b.grad.numpy(), **tol)
