"""The dense CNN references: finite differences, PyTorch, and their input checks.

They are the oracles of the convolution, batch-norm and pooling layers, so they are
checked here against two independent oracles of their own.
"""

import numpy as np
import pytest
from conftest import DTYPES, assert_close, assert_grad_close, central_differences

from cpusparse.testing.reference import (
    avg_pool2d_backward,
    avg_pool2d_forward,
    batch_norm_backward,
    batch_norm_forward,
    batch_norm_running_stats,
    conv2d_backward,
    conv2d_forward,
    max_pool2d_backward,
    max_pool2d_forward,
)

# (x shape (C_in, N, H, W), C_out, kernel (kh, kw), stride, padding): stride 1 and 2,
# padding 0 and 1, odd and rectangular sizes, batches of one, 1x1 kernels.
CONVS = [
    ((2, 2, 5, 5), 3, (3, 3), 1, 0),
    ((2, 1, 5, 7), 3, (3, 3), 1, 1),
    ((3, 2, 7, 5), 2, (3, 3), 2, 1),
    ((1, 1, 6, 6), 2, (2, 2), 2, 0),
    ((2, 2, 5, 4), 1, (3, 2), (2, 1), (1, 0)),
    ((3, 1, 4, 4), 2, (1, 1), 1, 0),
    ((2, 3, 3, 3), 2, (3, 3), 2, 1),
]
CONV_IDS = [f"x{'x'.join(map(str, c[0]))}-k{c[2][0]}{c[2][1]}-s{c[3]}-p{c[4]}" for c in CONVS]


def _conv_data(rng, x_shape, c_out, kernel, dtype=np.float64):
    x = rng.standard_normal(x_shape).astype(dtype)
    weight = rng.standard_normal((c_out, x_shape[0], *kernel)).astype(dtype)
    bias = rng.standard_normal(c_out).astype(dtype)
    return x, weight, bias


def _nchw(torch, a):
    return torch.from_numpy(np.ascontiguousarray(np.swapaxes(a, 0, 1)))


def _cnhw(t):
    return np.ascontiguousarray(np.swapaxes(t.detach().numpy(), 0, 1))


def _assert_matches(got, ref, dtype, name):
    ref = np.asarray(ref, dtype=np.float64)
    assert_close(got, ref, np.abs(ref).max(initial=0.0), dtype, name)


# ---------------------------------------------------------------------------- conv2d


@pytest.mark.parametrize(("x_shape", "c_out", "kernel", "stride", "padding"), CONVS, ids=CONV_IDS)
def test_conv2d_finite_differences(rng, x_shape, c_out, kernel, stride, padding):
    x, weight, bias = _conv_data(rng, x_shape, c_out, kernel)
    out = conv2d_forward(x, weight, bias, stride=stride, padding=padding)
    upstream = rng.standard_normal(out.shape)
    dx, dweight, dbias = conv2d_backward(x, weight, upstream, stride=stride, padding=padding)
    assert dx.shape == x.shape and dweight.shape == weight.shape and dbias.shape == bias.shape

    def loss():
        return float(
            np.sum(conv2d_forward(x, weight, bias, stride=stride, padding=padding) * upstream)
        )

    for name, got, arr in (("x", dx, x), ("weight", dweight, weight), ("bias", dbias, bias)):
        fd = central_differences(loss, arr)
        assert np.abs(fd).max() > 0, name
        assert_grad_close(got, fd, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("x_shape", "c_out", "kernel", "stride", "padding"), CONVS, ids=CONV_IDS)
def test_conv2d_matches_torch(rng, dtype, x_shape, c_out, kernel, stride, padding):
    torch = pytest.importorskip("torch")
    x, weight, bias = _conv_data(rng, x_shape, c_out, kernel, dtype)
    out = conv2d_forward(x, weight, bias, stride=stride, padding=padding)
    upstream = rng.standard_normal(out.shape).astype(dtype)
    dx, dweight, dbias = conv2d_backward(x, weight, upstream, stride=stride, padding=padding)
    assert out.dtype == dx.dtype == dweight.dtype == dbias.dtype == dtype

    xt = _nchw(torch, x).requires_grad_()
    wt = torch.from_numpy(weight).requires_grad_()
    bt = torch.from_numpy(bias).requires_grad_()
    out_t = torch.nn.functional.conv2d(xt, wt, bt, stride=stride, padding=padding)
    out_t.backward(_nchw(torch, upstream))
    _assert_matches(out, _cnhw(out_t), dtype, "out")
    _assert_matches(dx, _cnhw(xt.grad), dtype, "dx")
    _assert_matches(dweight, wt.grad.numpy(), dtype, "dweight")
    _assert_matches(dbias, bt.grad.numpy(), dtype, "dbias")


def test_conv2d_without_bias_and_by_hand():
    x = np.arange(2 * 3 * 3, dtype=np.float64).reshape(2, 1, 3, 3)
    weight = np.zeros((1, 2, 3, 3))
    weight[0, 1, 1, 1] = 2.0  # the centre of channel 1, doubled
    out = conv2d_forward(x, weight, padding=1)
    assert np.array_equal(out[0], 2 * x[1])
    out = conv2d_forward(x, weight, None, stride=2, padding=1)
    assert np.array_equal(out[0, 0], 2 * x[1, 0, ::2, ::2])


# ---------------------------------------------------------------------------- batch norm


@pytest.mark.parametrize("shape", [(3, 5), (2, 2, 3, 3), (2, 1, 2, 3)])
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_finite_differences(rng, shape, training):
    n = shape[0]
    x = rng.standard_normal(shape) * 2 + 1
    weight, bias = rng.standard_normal(n), rng.standard_normal(n)
    stats = dict(running_mean=rng.standard_normal(n), running_var=rng.uniform(0.5, 2, n))
    kw = dict(eps=1e-5, training=training, **stats)
    out = batch_norm_forward(x, weight, bias, **kw)
    upstream = rng.standard_normal(out.shape)
    dx, dweight, dbias = batch_norm_backward(x, weight, upstream, **kw)

    def loss():
        return float(np.sum(batch_norm_forward(x, weight, bias, **kw) * upstream))

    for name, got, arr in (("x", dx, x), ("weight", dweight, weight), ("bias", dbias, bias)):
        fd = central_differences(loss, arr)
        assert np.abs(fd).max() > 0, name
        assert_grad_close(got, fd, name)


@pytest.mark.parametrize("shape", [(4, 6), (3, 2, 4, 3)])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_matches_torch(rng, shape, dtype, training):
    torch = pytest.importorskip("torch")
    n = shape[0]
    x = (rng.standard_normal(shape) * 3 - 1).astype(dtype)
    weight, bias = (rng.standard_normal(n).astype(dtype) for _ in range(2))
    mean, var = rng.standard_normal(n).astype(dtype), rng.uniform(0.5, 2, n).astype(dtype)
    kw = dict(eps=1e-3, training=training, running_mean=mean, running_var=var)
    out = batch_norm_forward(x, weight, bias, **kw)
    upstream = rng.standard_normal(shape).astype(dtype)
    dx, dweight, dbias = batch_norm_backward(x, weight, upstream, **kw)
    new_mean, new_var = batch_norm_running_stats(x, mean, var, momentum=0.3)
    assert np.array_equal(kw["running_mean"], mean)  # not modified

    xt = _nchw(torch, x).requires_grad_()
    wt = torch.from_numpy(weight.copy()).requires_grad_()
    bt = torch.from_numpy(bias.copy()).requires_grad_()
    mt, vt = torch.from_numpy(mean.copy()), torch.from_numpy(var.copy())
    out_t = torch.nn.functional.batch_norm(xt, mt, vt, wt, bt, training, 0.3, 1e-3)
    out_t.backward(_nchw(torch, upstream))
    _assert_matches(out, _cnhw(out_t), dtype, "out")
    _assert_matches(dx, _cnhw(xt.grad), dtype, "dx")
    _assert_matches(dweight, wt.grad.numpy(), dtype, "dweight")
    _assert_matches(dbias, bt.grad.numpy(), dtype, "dbias")
    if training:
        _assert_matches(new_mean, mt.numpy(), dtype, "running_mean")
        _assert_matches(new_var, vt.numpy(), dtype, "running_var")
    assert out.dtype == dx.dtype == new_var.dtype == dtype


# ---------------------------------------------------------------------------- pools


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("kernel", "stride", "padding", "shape"),
    [
        (2, None, 0, (2, 2, 4, 4)),
        (3, 2, 1, (2, 1, 5, 7)),
        (3, 1, 1, (1, 2, 2, 3)),
        ((2, 3), (1, 2), (1, 1), (2, 2, 5, 5)),
    ],
)
def test_pools_match_torch(rng, kind, dtype, kernel, stride, padding, shape):
    torch = pytest.importorskip("torch")
    forward, backward, fn = {
        "max": (max_pool2d_forward, max_pool2d_backward, torch.nn.functional.max_pool2d),
        "avg": (avg_pool2d_forward, avg_pool2d_backward, torch.nn.functional.avg_pool2d),
    }[kind]
    x = rng.integers(0, 3, shape) - 4 + rng.standard_normal(shape) * (rng.random(shape) < 0.3)
    x = x.astype(dtype)  # ties and negative values
    out = forward(x, kernel, stride, padding)
    upstream = rng.standard_normal(out.shape).astype(dtype)
    dx = backward(x, upstream, kernel, stride, padding)
    xt = _nchw(torch, x).requires_grad_()
    out_t = fn(xt, kernel, stride, padding)
    out_t.backward(_nchw(torch, upstream))
    _assert_matches(out, _cnhw(out_t), dtype, "out")
    _assert_matches(dx, _cnhw(xt.grad), dtype, "dx")


# ---------------------------------------------------------------------------- errors


def test_mixed_dtypes_are_refused():
    x32, x64 = np.ones((2, 1, 3, 3), np.float32), np.ones((2, 1, 3, 3))
    w32, w64 = np.ones((1, 2, 2, 2), np.float32), np.ones((1, 2, 2, 2))
    c32, c64 = np.ones(2, np.float32), np.ones(2)
    cases = [
        lambda: conv2d_forward(x32, w64),
        lambda: conv2d_forward(x32, w32, np.ones(1)),
        lambda: conv2d_backward(x64, w64, np.ones((1, 1, 2, 2), np.float32)),
        lambda: conv2d_backward(x32, w64, np.ones((1, 1, 2, 2), np.float32)),
        lambda: batch_norm_forward(x32, c64, c64, training=True),
        lambda: batch_norm_forward(
            x32, c32, c32, training=False, running_mean=c64, running_var=c32
        ),
        lambda: batch_norm_backward(x64, c64, x32, training=True),
        lambda: batch_norm_running_stats(x32, c32, c64),
        lambda: max_pool2d_backward(x32, np.ones((2, 1, 1, 1)), 2),
        lambda: avg_pool2d_backward(x64, np.ones((2, 1, 1, 1), np.float32), 2),
    ]
    for case in cases:
        with pytest.raises(TypeError, match="same dtype"):
            case()


def test_bad_values_are_refused():
    x = np.ones((2, 1, 3, 3))
    with pytest.raises(ValueError, match=r"weight must have shape \(C_out, 2, kh, kw\)"):
        conv2d_forward(x, np.ones((1, 3, 2, 2)))
    with pytest.raises(ValueError, match=r"bias must have shape \(1,\)"):
        conv2d_forward(x, np.ones((1, 2, 2, 2)), np.ones(2))
    with pytest.raises(ValueError, match="must fit in the padded input"):
        conv2d_forward(x, np.ones((1, 2, 4, 4)))
    with pytest.raises(ValueError, match="stride must be >= 1"):
        conv2d_forward(x, np.ones((1, 2, 2, 2)), stride=0)
    with pytest.raises(ValueError, match="padding must be >= 0"):
        conv2d_forward(x, np.ones((1, 2, 2, 2)), padding=-1)
    with pytest.raises(TypeError, match="stride must be an int or a pair"):
        conv2d_forward(x, np.ones((1, 2, 2, 2)), stride=1.5)
    with pytest.raises(ValueError, match=r"dout must have shape \(1, 1, 2, 2\)"):
        conv2d_backward(x, np.ones((1, 2, 2, 2)), np.ones((1, 1, 3, 3)))
    with pytest.raises(ValueError, match="4-D channel-major"):
        conv2d_forward(np.ones((2, 3, 3)), np.ones((1, 2, 2, 2)))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        batch_norm_forward(np.ones((2, 1)), np.ones(2), np.zeros(2), training=True)
    with pytest.raises(ValueError, match="running_mean and running_var are required"):
        batch_norm_forward(x, np.ones(2), np.zeros(2), training=False)
    with pytest.raises(ValueError, match=r"weight must have shape \(2,\)"):
        batch_norm_forward(x, np.ones(3), np.zeros(2), training=True)
    with pytest.raises(ValueError, match=r"dout must have shape \(2, 1, 3, 3\)"):
        batch_norm_backward(x, np.ones(2), np.ones((2, 1, 3, 2)), training=True)
    with pytest.raises(ValueError, match="must fit in the padded input"):
        max_pool2d_forward(x, 4)
    with pytest.raises(ValueError, match="padding must be at most half of kernel_size"):
        max_pool2d_backward(x, np.ones((2, 1, 4, 4)), 2, 1, 2)
    with pytest.raises(ValueError, match=r"dout must have shape \(2, 1, 1, 1\)"):
        avg_pool2d_backward(x, np.ones((2, 1, 2, 2)), 3)
