"""Conv2d (channel and weight masks) and the Residual block: gradients, PyTorch, errors."""

import numpy as np
import pytest
from conftest import DTYPES, assert_close, central_differences

from cpusparse.engine.containers import Residual, Sequential
from cpusparse.engine.layers import EVAL, STRAIGHT_THROUGH, TRAIN, ReLU
from cpusparse.engine.layers.conv import Conv2d
from cpusparse.engine.losses import softmax_cross_entropy
from cpusparse.testing import reference

# (C_in, C_out, kernel, stride, padding, H, W, N): odd sizes, stride 1 and 2, padding
# 0 and 1, batch 1, a 1x1 kernel, a non-square kernel.
GEOMETRIES = [
    (3, 4, 3, 1, 1, 7, 6, 2),
    (2, 5, 3, 2, 0, 9, 8, 1),
    (4, 3, 1, 2, 0, 5, 5, 3),
    (3, 2, (2, 3), 1, 1, 4, 5, 2),
    (2, 3, 3, 2, 1, 5, 7, 1),
]


def _conv(geometry, granularity, *, relu=False, bias=True, dtype=np.float64, seed=0):
    c_in, c_out, k, s, p, _, _, _ = geometry
    return Conv2d.random(
        c_in,
        c_out,
        k,
        stride=s,
        padding=p,
        bias=bias,
        granularity=granularity,
        activation="relu" if relu else None,
        dtype=dtype,
        rng=seed,
    )


def _input(rng, geometry, dtype=np.float64):
    c_in, _, _, _, _, h, w, n = geometry
    return rng.standard_normal((c_in, n, h, w)).astype(dtype)


def _masks(rng, conv, which):
    # None / some / all units kept.
    n = conv.units.n_units
    if which == "none":
        return np.zeros(n, dtype=bool)
    if which == "all":
        return np.ones(n, dtype=bool)
    mask = rng.random(n) < 0.5
    mask[0] = True
    return mask


def _effective_weight(conv, mask, live):
    # The dense weight the masked layer computes with.
    w = conv.weight.copy()
    if mask is not None:
        w = w * conv.units.kept_weights(mask)
    if live is not None:
        w = w * live[None, :, None, None]
    return w


def _reference(conv, x, mask, live):
    # Dense reference output of the masked layer (the activation and the mask of a
    # channel granularity applied after it).
    w = _effective_weight(conv, mask, live)
    out = reference.conv2d_forward(x, w, conv.bias, stride=conv.stride, padding=conv.padding)
    if conv.activation == "relu":
        out = np.maximum(out, 0)
    if conv.granularity == "channel" and mask is not None:
        out = out * mask[:, None, None, None]
    return out


@pytest.mark.parametrize("granularity", ["channel", "weight"])
@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("which", ["none", "some", "all"])
def test_conv_forward_matches_the_dense_reference(rng, granularity, geometry, which):
    conv = _conv(geometry, granularity, relu=True)
    x = _input(rng, geometry)
    mask = _masks(rng, conv, which)
    live = rng.random(conv.n_in) < 0.6
    out, _ = conv.forward(x, mask, live=live)
    ref = _reference(conv, np.where(live[:, None, None, None], x, 0.0), mask, None)
    assert_close(out, ref, np.abs(ref).max() + 1, np.float64, "out")
    if granularity == "channel":
        assert not out[~mask].any()  # dropped filters are exactly 0


@pytest.mark.parametrize("granularity", ["channel", "weight"])
@pytest.mark.parametrize("geometry", GEOMETRIES)
@pytest.mark.parametrize("relu", [False, True])
def test_conv_finite_differences(rng, granularity, geometry, relu):
    conv = _conv(geometry, granularity, relu=relu)
    x = _input(rng, geometry)
    mask = _masks(rng, conv, "some")
    live = np.ones(conv.n_in, dtype=bool)
    live[-1] = False
    out, _ = conv.forward(x, mask, live=live)
    g = rng.standard_normal(out.shape)

    def loss():
        return float((conv.forward(x, mask, live=live)[0] * g).sum())

    out, cache = conv.forward(x, mask, live=live)
    dx, grads = conv.backward(g, cache)
    for name, arr in conv.params().items():
        assert_close(grads[name], central_differences(loss, arr), 1e-6, np.float32, name)
    fd_x = central_differences(loss, x)
    fd_x[~live] = 0.0  # inputs outside live are treated as zero
    assert_close(dx, fd_x, 1e-6, np.float32, "dx")
    assert not dx[~live].any()


@pytest.mark.parametrize("granularity", ["channel", "weight"])
def test_conv_straight_through_mask_gradient(rng, granularity):
    geometry = GEOMETRIES[0]
    conv = _conv(geometry, granularity, relu=True)
    x = _input(rng, geometry)
    mask = _masks(rng, conv, "some").astype(np.float64)
    g = None

    def loss_of(m):
        w = conv.weight * (m.reshape(conv.weight.shape) if granularity == "weight" else 1)
        out = np.maximum(reference.conv2d_forward(x, w, conv.bias, stride=1, padding=1), 0)
        if granularity == "channel":
            out = out * m[:, None, None, None]
        return float((out * g).sum())

    out, cache = conv.forward(x, mask.astype(bool), mode=STRAIGHT_THROUGH)
    g = rng.standard_normal(out.shape)
    _, grads = conv.backward(g, cache)
    fd = central_differences(lambda: loss_of(mask), mask)
    assert_close(grads["mask"], fd, 1e-6, np.float32, "mask")
    assert_close(out, _reference(conv, x, mask.astype(bool), None), 1.0, np.float64, "out")


def test_conv_matches_pytorch_autograd(rng):
    torch = pytest.importorskip("torch")
    for dtype in DTYPES:
        for geometry in GEOMETRIES:
            for granularity in ("channel", "weight"):
                conv = _conv(geometry, granularity, relu=True, dtype=dtype)
                x = _input(rng, geometry, dtype)
                mask = _masks(rng, conv, "some")
                out, cache = conv.forward(x, mask)
                g = rng.standard_normal(out.shape).astype(dtype)
                dx, grads = conv.backward(g, cache)
                tx = torch.tensor(x.transpose(1, 0, 2, 3).copy(), requires_grad=True)
                tw = torch.tensor(conv.weight, requires_grad=True)
                tb = torch.tensor(conv.bias, requires_grad=True)
                tm = torch.tensor(conv.units.kept_weights(mask).astype(dtype))
                weight = tw * tm if granularity == "weight" else tw
                to = torch.relu(
                    torch.nn.functional.conv2d(
                        tx, weight, tb, stride=conv.stride, padding=conv.padding
                    )
                )
                if granularity == "channel":
                    to = to * torch.tensor(mask.astype(dtype))[None, :, None, None]
                to.backward(torch.tensor(g.transpose(1, 0, 2, 3).copy()))
                scale = 1.0 + np.abs(g).max() * x.shape[0] * 9
                assert_close(out, to.detach().numpy().transpose(1, 0, 2, 3), scale, dtype)
                assert_close(dx, tx.grad.numpy().transpose(1, 0, 2, 3), scale, dtype, "dx")
                assert_close(grads["weight"], tw.grad.numpy(), scale * x.size, dtype, "dw")
                assert_close(grads["bias"], tb.grad.numpy(), scale * x.size, dtype, "db")


@pytest.mark.parametrize("granularity", ["channel", "weight"])
def test_conv_batch_chunks_give_the_same_result(rng, granularity, monkeypatch):
    # Chunks of one sample (the channel path's BLOCK_CHUNK_BYTES, the weight path's
    # max_cols_bytes), columns rebuilt in the backward pass: the same results, to
    # rounding (the weight gradient is summed chunk by chunk).
    from cpusparse.engine.layers import conv as conv_module

    geometry = (3, 4, 3, 1, 1, 6, 5, 5)
    conv = _conv(geometry, granularity, relu=True)
    x = _input(rng, geometry)
    mask = _masks(rng, conv, "some")
    out, cache = conv.forward(x, mask)
    g = rng.standard_normal(out.shape)
    dx, grads = conv.backward(g, cache)
    assert cache.cols is not None and len(cache.cols) == 1
    monkeypatch.setattr(conv_module, "BLOCK_CHUNK_BYTES", 1)
    small = Conv2d.from_config({**conv.config(), "max_cols_bytes": 1}, conv.arrays())
    out_small, cache_small = small.forward(x, mask)
    assert cache_small.cols is None
    assert len(small._chunks(x, 1)[1]) == x.shape[1]
    dx_small, grads_small = small.backward(g, cache_small)
    assert_close(out_small, out, 1.0, np.float64, "out")
    assert_close(dx_small, dx, 1.0, np.float64, "dx")
    for name in grads:
        assert_close(grads_small[name], grads[name], 1.0, np.float64, name)


@pytest.mark.parametrize("granularity", ["channel", "weight"])
def test_conv_same_bits_on_one_and_two_threads(rng, granularity, monkeypatch):
    # Small chunks, so that the channel path runs several tasks on two threads.
    from cpusparse._threads import numba_threads
    from cpusparse.engine.layers import conv as conv_module

    monkeypatch.setattr(conv_module, "BLOCK_CHUNK_BYTES", 4096)
    geometry = (8, 8, 3, 1, 1, 9, 9, 6)
    conv = _conv(geometry, granularity, relu=True, dtype=np.float32)
    x = _input(rng, geometry, np.float32)
    mask = _masks(rng, conv, "some")
    live = rng.random(8) < 0.7
    if granularity == "channel":
        assert len(conv._chunks(x, conv_module.BLOCK_CHUNK_BYTES, int(live.sum()))[1]) > 2
    results = []
    for threads in (1, 2):
        with numba_threads(threads):
            out, cache = conv.forward(x, mask, live=live)
            dx, grads = conv.backward(out, cache)
        results.append((out, dx, grads["weight"], grads["bias"]))
    for a, b in zip(*results, strict=True):
        np.testing.assert_array_equal(a, b)


def test_conv_im2col_kernels_are_adjoint(rng):
    # <im2col(x), c> == <x, col2im(c)> for every geometry: col2im is im2col's transpose.
    from cpusparse.engine.kernels import conv as kernels

    for c_in, _, k, s, p, h, w, n in GEOMETRIES:
        kh, kw = (k, k) if np.isscalar(k) else k
        ho, wo = (h + 2 * p - kh) // s + 1, (w + 2 * p - kw) // s + 1
        x = rng.standard_normal((c_in, n, h, w))
        cols = np.empty((c_in * kh * kw, n * ho * wo))
        chans = np.arange(c_in)
        kernels.im2col(x, chans, 0, kh, kw, s, s, p, p, ho, wo, cols)
        c = rng.standard_normal(cols.shape)
        back = np.zeros_like(x)
        kernels.col2im(c, chans, 0, kh, kw, s, s, p, p, ho, wo, back)
        assert np.isclose((cols * c).sum(), (x * back).sum(), rtol=1e-12)


def test_conv_layers_skip_dropped_channels_downstream(rng):
    # A channel dropped by the first convolution is known zero in the second, whose
    # block then has fewer input channels; the result equals the dense computation.
    a = Conv2d.random(2, 6, 3, padding=1, rng=0, dtype=np.float64, activation="relu")
    b = Conv2d.random(6, 4, 3, padding=1, rng=1, dtype=np.float64)
    net = Sequential([a, b])
    x = rng.standard_normal((2, 3, 5, 5))
    masks = [np.array([True, False, True, False, False, True]), np.ones(4, dtype=bool)]
    out, caches = net.forward(x, masks)
    # Between them only the 3 kept channels are stored: the first writes them alone.
    assert caches[0].out.shape == (3, 3, 5, 5) and caches[1].x.shape == (3, 3, 5, 5)
    assert caches[1].w_chans.tolist() == [0, 2, 5]
    h = _reference(a, x, masks[0], None)
    ref = reference.conv2d_forward(h, b.weight, b.bias, stride=1, padding=1)
    assert_close(out, ref, 1.0, np.float64)
    assert b.n_active(masks[1], masks[0]) == 4 * 3 * 9


def test_conv_checkpoint_round_trip_and_repr():
    conv = Conv2d.random(3, 4, (3, 2), stride=(2, 1), padding=(1, 0), bias=False, rng=0)
    again = Conv2d.from_config(conv.config(), conv.arrays())
    assert again.config() == conv.config() and "bias" not in again.params()
    np.testing.assert_array_equal(again.weight, conv.weight)
    assert "kernel_size=(3, 2)" in repr(conv)
    x = np.ones((3, 2, 5, 5), dtype=np.float32)
    np.testing.assert_array_equal(conv.forward(x)[0], again.forward(x)[0])


@pytest.mark.parametrize(
    ("make", "error", "match"),
    [
        (lambda: Conv2d(np.ones((2, 3, 3))), ValueError, r"4-D array \(C_out, C_in, kh, kw\)"),
        (lambda: Conv2d(np.ones((2, 3, 3, 3)), stride=0), ValueError, "stride must be >= 1"),
        (lambda: Conv2d(np.ones((2, 3, 3, 3)), padding=-1), ValueError, "padding must be >= 0"),
        (lambda: Conv2d(np.ones((2, 3, 3, 3)), stride=1.5), TypeError, "stride must be an int"),
        (lambda: Conv2d(np.ones((2, 3, 3, 3)), np.ones(3)), ValueError, r"bias must have shape"),
        (
            lambda: Conv2d(np.ones((2, 1, 1, 1)), np.ones(2, dtype=np.float32)),
            TypeError,
            "same dtype",
        ),
        (lambda: Conv2d(np.ones((2, 3, 3, 3)), granularity="neuron"), ValueError, "granularity"),
        (lambda: Conv2d(np.full((1, 1, 1, 1), np.nan)), ValueError, "weight must be finite"),
    ],
)
def test_conv_rejects_bad_construction(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_conv_rejects_bad_input():
    conv = Conv2d.random(3, 4, 3, rng=0)
    good = np.ones((3, 2, 5, 5), dtype=np.float32)
    with pytest.raises(ValueError, match=r"4-D channel-major image batch .* got shape \(3, 50\)"):
        conv.forward(np.ones((3, 50), dtype=np.float32))
    with pytest.raises(ValueError, match=r"3 channels on axis 0 .* got shape \(2, 3, 5, 5\)"):
        conv.forward(np.ones((2, 3, 5, 5), dtype=np.float32))
    with pytest.raises(ValueError, match=r"kernel_size \(3, 3\) must fit in the padded input"):
        conv.forward(np.ones((3, 2, 2, 5), dtype=np.float32))
    with pytest.raises(TypeError, match="same dtype"):
        conv.forward(good.astype(np.float64))
    with pytest.raises(ValueError, match="must be finite"):
        bad = good.copy()
        bad[0, 0, 0, 0] = np.inf
        conv.forward(bad)
    with pytest.raises(ValueError, match=r"mask must have shape \(4,\) \(one bit per channel\)"):
        conv.forward(good, np.ones(3, dtype=bool))
    with pytest.raises(TypeError, match="mask must be a boolean array"):
        conv.forward(good, np.ones(4))
    with pytest.raises(ValueError, match=r"live must have shape \(3,\)"):
        conv.forward(good, live=np.ones(4, dtype=bool))
    out, cache = conv.forward(good)
    with pytest.raises(ValueError, match="dout must have shape"):
        conv.backward(out[:, :1], cache)


# ---------------------------------------------------------------------- residual


def _block(shortcut, stride, granularity="channel"):
    main = [
        Conv2d.random(
            3,
            4,
            3,
            stride=stride,
            padding=1,
            rng=1,
            dtype=np.float64,
            granularity=granularity,
            activation="relu",
        ),
        Conv2d.random(4, 4, 3, padding=1, rng=2, dtype=np.float64, granularity=granularity),
    ]
    if shortcut == "identity":
        main[0] = Conv2d.random(
            4, 4, 3, padding=1, rng=1, dtype=np.float64, granularity=granularity, activation="relu"
        )
        return Residual(main)
    proj = [Conv2d.random(3, 4, 1, stride=stride, rng=3, dtype=np.float64, granularity=granularity)]
    return Residual(main, proj)


@pytest.mark.parametrize(
    ("shortcut", "stride"), [("identity", 1), ("projection", 1), ("projection", 2)]
)
@pytest.mark.parametrize("granularity", ["channel", "weight"])
def test_residual_finite_differences(rng, shortcut, stride, granularity):
    block = _block(shortcut, stride, granularity)
    net = Sequential([block, ReLU()])
    x = rng.standard_normal((block.n_in, 2, 5, 5))
    masks = [rng.random(n) < 0.7 for n in net.n_units()]
    out, _ = net.forward(x, masks)
    g = rng.standard_normal(out.shape)

    def loss():
        return float((net.forward(x, masks)[0] * g).sum())

    out, caches = net.forward(x, masks)
    dx, grads = net.backward(g, caches, need_dx=True)
    assert sorted(grads) == sorted(net.params())
    # Two ReLUs in a row: a smaller step keeps the differences off their kinks.
    for name, arr in net.params().items():
        fd = central_differences(loss, arr, eps=1e-7)
        assert_close(grads[name], fd, 1e-2, np.float32, name)
    assert_close(dx, central_differences(loss, x, eps=1e-7), 1e-2, np.float32, "dx")


def test_residual_known_zeros_need_both_branches_zero(rng):
    # Projection: a channel is known zero only where the main branch's last conv and
    # the shortcut both drop it. Identity: nothing the main branch drops is zero.
    block = _block("projection", 1)
    x = rng.standard_normal((3, 2, 5, 5))
    masks = [np.ones(4, bool), np.array([1, 0, 0, 1], bool), np.array([1, 1, 0, 0], bool)]
    _, _, live = block._run(x, masks, None, TRAIN)
    assert live.tolist() == [True, True, False, True]
    identity = _block("identity", 1)
    x4 = rng.standard_normal((4, 2, 5, 5))
    _, _, live = identity._run(x4, [np.ones(4, bool), np.zeros(4, bool)], None, TRAIN)
    assert live is None
    out, _ = identity.forward(x4, [np.ones(4, bool), np.zeros(4, bool)])
    np.testing.assert_array_equal(out, np.maximum(x4, 0))  # the shortcut alone


def test_residual_matches_pytorch(rng):
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    block = _block("projection", 2)
    x = rng.standard_normal((3, 2, 6, 6))
    masks = [rng.random(4) < 0.7 for _ in range(3)]
    out, cache = block.forward(x, masks)
    g = rng.standard_normal(out.shape)
    dx, grads = block.backward(g, cache)
    params = {k: torch.tensor(v, requires_grad=True) for k, v in block.params().items()}
    tm = [torch.tensor(m.astype(np.float64))[None, :, None, None] for m in masks]
    tx = torch.tensor(x.transpose(1, 0, 2, 3).copy(), requires_grad=True)
    h = torch.relu(F.conv2d(tx, params["0.0.weight"], params["0.0.bias"], stride=2, padding=1))
    h = h * tm[0]
    h = F.conv2d(h, params["0.1.weight"], params["0.1.bias"], padding=1) * tm[1]
    s = F.conv2d(tx, params["1.0.weight"], params["1.0.bias"], stride=2) * tm[2]
    to = torch.relu(h + s)
    to.backward(torch.tensor(g.transpose(1, 0, 2, 3).copy()))
    assert_close(out, to.detach().numpy().transpose(1, 0, 2, 3), 1.0, np.float64)
    assert_close(dx, tx.grad.numpy().transpose(1, 0, 2, 3), 10.0, np.float64, "dx")
    for k, v in params.items():
        assert_close(grads[k], v.grad.numpy(), 100.0, np.float64, k)


def test_residual_rejects_mismatched_branches(rng):
    main = [Conv2d.random(3, 4, 3, padding=1, rng=0)]
    with pytest.raises(ValueError, match="same number of channels"):
        Residual(main, [Conv2d.random(3, 5, 1, rng=0)])
    with pytest.raises(ValueError, match="same number of channels"):
        Residual(main)  # identity needs C_in == C_out
    block = Residual([Conv2d.random(3, 3, 3, stride=2, padding=1, rng=0)])
    with pytest.raises(ValueError, match="give the shortcut the main branch's stride"):
        block.forward(np.ones((3, 1, 6, 6), dtype=np.float32))


def test_residual_checkpoint_round_trip(rng):
    block = _block("projection", 2)
    net = Sequential([block])
    again = Sequential.from_config(net.config(), net.arrays())
    x = rng.standard_normal((3, 2, 6, 6))
    masks = [rng.random(n) < 0.7 for n in net.n_units()]
    np.testing.assert_array_equal(net.forward(x, masks)[0], again.forward(x, masks)[0])
    assert [type(layer).__name__ for layer in again.prunable_layers()] == ["Conv2d"] * 3


def test_conv_network_eval_mode_and_loss(rng):
    # A conv net feeds a dense classifier through reshaping; eval and train passes of
    # a layer without buffers agree, and the loss is finite.
    conv = Conv2d.random(1, 2, 3, padding=1, rng=0, dtype=np.float64, activation="relu")
    x = rng.standard_normal((1, 4, 3, 3))
    mask = np.array([True, False])
    a, _ = conv.forward(x, mask, mode=TRAIN)
    b, _ = conv.forward(x, mask, mode=EVAL)
    np.testing.assert_array_equal(a, b)
    logits = a.reshape(2, 4, 9).sum(axis=2)
    loss, _ = softmax_cross_entropy(logits, np.array([0, 1, 0, 1]))
    assert np.isfinite(loss)


def test_conv_im2col_reads_and_col2im_writes_only_the_listed_channels(rng):
    from cpusparse.engine.kernels import conv as kernels

    x = rng.standard_normal((5, 2, 6, 7))
    chans = np.array([4, 1, 3])
    ho, wo = 6, 7
    cols = np.empty((3 * 9, 2 * ho * wo))
    kernels.im2col(x, chans, 0, 3, 3, 1, 1, 1, 1, ho, wo, cols)
    ref = np.empty_like(cols)
    kernels.im2col(np.ascontiguousarray(x[chans]), np.arange(3), 0, 3, 3, 1, 1, 1, 1, ho, wo, ref)
    np.testing.assert_array_equal(cols, ref)
    dx = np.zeros_like(x)
    kernels.col2im(cols, chans, 0, 3, 3, 1, 1, 1, 1, ho, wo, dx)
    assert not dx[[0, 2]].any()
    ref_dx = np.zeros((3, 2, 6, 7))
    kernels.col2im(ref, np.arange(3), 0, 3, 3, 1, 1, 1, 1, ho, wo, ref_dx)
    np.testing.assert_array_equal(dx[chans], ref_dx)


def test_backward_passes_leave_dout_alone(rng):
    # Both branches of a residual block get the same dout: no layer may write into it.
    from cpusparse.engine.layers import BatchNorm2d, GlobalAvgPool2d, MaxPool2d

    x = rng.standard_normal((3, 2, 6, 6))
    layers = [
        Conv2d.random(3, 4, 3, padding=1, activation="relu", dtype=np.float64, rng=0),
        Conv2d.random(3, 4, 3, padding=1, activation="relu", dtype=np.float64, rng=0,
                      granularity="weight"),
        Conv2d.random(3, 3, 1, activation="relu", dtype=np.float64, rng=0),
        BatchNorm2d.new(3, dtype=np.float64),
        MaxPool2d(2),
        GlobalAvgPool2d(),
        ReLU(),
    ]  # fmt: skip
    for layer in layers:
        for mode in (TRAIN, STRAIGHT_THROUGH):
            if mode is STRAIGHT_THROUGH and layer.units is None:
                continue
            out, cache = layer.forward(x, mode=mode)
            dout = rng.standard_normal(out.shape)
            before = dout.copy()
            layer.backward(dout, cache)
            np.testing.assert_array_equal(dout, before, err_msg=repr(layer))


@pytest.mark.parametrize("granularity", ["channel", "weight"])
def test_residual_whose_main_branch_ends_in_a_relu_conv(rng, granularity):
    block = Residual(
        [Conv2d.random(2, 2, 3, padding=1, activation="relu", dtype=np.float64, rng=0,
                       granularity=granularity)],
        [Conv2d.random(2, 2, 1, dtype=np.float64, rng=1, granularity=granularity)],
        activation=None,
    )  # fmt: skip
    x = rng.standard_normal((2, 2, 5, 5))
    masks = [np.ones(n, dtype=bool) for n in Sequential([block]).n_units()]
    out, cache = block.forward(x, masks)
    g = rng.standard_normal(out.shape)

    def loss():
        return float((block.forward(x, masks)[0] * g).sum())

    dx, grads = block.backward(g, cache)
    for name, arr in block.params().items():
        fd = central_differences(loss, arr, eps=1e-7)
        assert_close(grads[name], fd, 1e-2, np.float32, name)
    assert_close(dx, central_differences(loss, x, eps=1e-7), 1e-2, np.float32, "dx")
