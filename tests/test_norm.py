"""Batch norm layers: finite differences, PyTorch, the reference, live channels, storage."""

import json

import numpy as np
import pytest
from conftest import DTYPES, assert_close, assert_grad_close, central_differences

from cpusparse.engine.layers.base import EVAL, LAYER_TYPES, STRAIGHT_THROUGH, TRAIN, Mode
from cpusparse.engine.layers.norm import BatchNorm1d, BatchNorm2d
from cpusparse.testing.reference import (
    batch_norm_backward,
    batch_norm_forward,
    batch_norm_running_stats,
)

SHAPES = {"1d": (4, 6), "2d": (3, 2, 3, 3)}
KINDS = {"1d": BatchNorm1d, "2d": BatchNorm2d}
NO_UPDATE = Mode(update_stats=False)


def _layer(rng, kind, dtype=np.float64, mask_order="after_norm", momentum=0.1):
    """A layer with random parameters and running statistics."""
    n = SHAPES[kind][0]
    return KINDS[kind](
        rng.standard_normal(n).astype(dtype),
        rng.standard_normal(n).astype(dtype),
        rng.standard_normal(n).astype(dtype),
        rng.uniform(0.5, 2.0, n).astype(dtype),
        momentum=momentum,
        mask_order=mask_order,
    )


def _live(kind):
    live = np.ones(SHAPES[kind][0], dtype=bool)
    live[1] = False
    return live


def _input(rng, shape, dtype=np.float64, live=None):
    """Random input, scaled and shifted, exactly zero in the channels outside ``live``."""
    x = (rng.standard_normal(shape) * 2 + 0.5).astype(dtype)
    if live is not None:
        x[~live] = 0
    return x


def _torch_bn(torch, layer, arrays=None, keep=None):
    """PyTorch's batch norm with the layer's settings and ``arrays`` (default the layer's).

    ``keep`` selects channels: the module then has only those.
    """
    arrays = layer.arrays() if arrays is None else arrays
    keep = np.ones(layer.n_channels, dtype=bool) if keep is None else keep
    cls = torch.nn.BatchNorm1d if isinstance(layer, BatchNorm1d) else torch.nn.BatchNorm2d
    module = cls(int(keep.sum()), eps=layer.eps, momentum=layer.momentum).to(
        torch.float64 if layer.dtype == np.float64 else torch.float32
    )
    with torch.no_grad():
        for name, value in arrays.items():
            getattr(module, name).copy_(torch.from_numpy(value[keep].copy()))
    return module


def _nchw(torch, a):
    """A channel-major numpy array as a PyTorch (N, C, ...) tensor."""
    return torch.from_numpy(np.ascontiguousarray(np.swapaxes(a, 0, 1)))


def _cnhw(t):
    return np.ascontiguousarray(np.swapaxes(t.detach().numpy(), 0, 1))


def _assert_matches(got, ref, dtype, name):
    ref = np.asarray(ref, dtype=np.float64)
    assert_close(got, ref, np.abs(ref).max(initial=0.0), dtype, name)


# ---------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("kind", ["1d", "2d"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("mask_order", ["after_norm", "before_norm"])
@pytest.mark.parametrize("with_live", [False, True])
def test_batch_norm_finite_differences(rng, kind, training, mask_order, with_live):
    layer = _layer(rng, kind, mask_order=mask_order)
    live = _live(kind) if with_live else None
    x = _input(rng, SHAPES[kind], live=live)
    mode = Mode(training=training, update_stats=False)
    out, cache = layer.forward(x, live=live, mode=mode)
    upstream = rng.standard_normal(out.shape)
    dx, grads = layer.backward(upstream, cache)

    def loss():
        return float(np.sum(layer.forward(x, live=live, mode=mode)[0] * upstream))

    assert_grad_close(dx, central_differences(loss, x), "x")
    fd_w = central_differences(loss, layer.weight)
    fd_b = central_differences(loss, layer.bias)
    assert_grad_close(grads["weight"], fd_w, "weight")
    assert_grad_close(grads["bias"], fd_b, "bias")
    assert np.abs(fd_w).min() > 0 or (with_live and np.abs(fd_w[live]).min() > 0)
    if with_live:
        assert np.all(dx[~live] == 0)
        if mask_order == "before_norm":
            assert np.all(fd_b != 0)  # a dropped channel outputs beta: it has a gradient


@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_2d_batch_of_one_finite_differences(rng, training):
    layer = _layer(rng, "2d")
    x = _input(rng, (3, 1, 3, 5))
    mode = Mode(training=training, update_stats=False)
    out, cache = layer.forward(x, mode=mode)
    upstream = rng.standard_normal(out.shape)
    dx, grads = layer.backward(upstream, cache)

    def loss():
        return float(np.sum(layer.forward(x, mode=mode)[0] * upstream))

    assert_grad_close(dx, central_differences(loss, x), "x")
    assert_grad_close(grads["weight"], central_differences(loss, layer.weight), "weight")
    assert_grad_close(grads["bias"], central_differences(loss, layer.bias), "bias")


# ---------------------------------------------------------------------------- PyTorch


@pytest.mark.parametrize("kind", ["1d", "2d"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_matches_torch(rng, kind, dtype, training):
    torch = pytest.importorskip("torch")
    layer = _layer(rng, kind, dtype, momentum=0.3)
    module = _torch_bn(torch, layer)
    module.train(training)
    x = _input(rng, SHAPES[kind], dtype)
    upstream = rng.standard_normal(x.shape).astype(dtype)

    out, cache = layer.forward(x, mode=TRAIN if training else EVAL)
    dx, grads = layer.backward(upstream, cache)
    xt = _nchw(torch, x).requires_grad_()
    out_t = module(xt)
    out_t.backward(_nchw(torch, upstream))

    _assert_matches(out, _cnhw(out_t), dtype, "out")
    _assert_matches(dx, _cnhw(xt.grad), dtype, "dx")
    _assert_matches(grads["weight"], module.weight.grad.numpy(), dtype, "dweight")
    _assert_matches(grads["bias"], module.bias.grad.numpy(), dtype, "dbias")
    _assert_matches(layer.running_mean, module.running_mean.numpy(), dtype, "running_mean")
    _assert_matches(layer.running_var, module.running_var.numpy(), dtype, "running_var")
    assert out.dtype == dx.dtype == grads["weight"].dtype == layer.running_var.dtype == dtype


@pytest.mark.parametrize("mask_order", ["after_norm", "before_norm"])
def test_batch_norm_with_dropped_channels_matches_torch(rng, mask_order):
    # after_norm: PyTorch on the live channels only, zeros elsewhere, running statistics
    # of the dropped channels untouched. before_norm: PyTorch's dense batch norm on the
    # input with the dropped channels zeroed (dx excepted: 0 outside live).
    torch = pytest.importorskip("torch")
    layer = _layer(rng, "2d", mask_order=mask_order)
    before = {k: v.copy() for k, v in layer.buffers().items()}
    live = _live("2d")
    x = _input(rng, SHAPES["2d"], live=live)
    upstream = rng.standard_normal(x.shape)
    out, cache = layer.forward(x, live=live)
    dx, grads = layer.backward(upstream, cache)

    keep = live if mask_order == "after_norm" else np.ones_like(live)
    module = _torch_bn(torch, layer, {**layer.params(), **before}, keep)
    xt = _nchw(torch, x[keep]).requires_grad_()
    out_t = module(xt)
    out_t.backward(_nchw(torch, upstream[keep]))

    _assert_matches(out[keep], _cnhw(out_t), np.float64, "out")
    _assert_matches(dx[live], _cnhw(xt.grad)[live[keep]], np.float64, "dx")
    _assert_matches(grads["weight"][keep], module.weight.grad.numpy(), np.float64, "dweight")
    _assert_matches(grads["bias"][keep], module.bias.grad.numpy(), np.float64, "dbias")
    _assert_matches(layer.running_mean[keep], module.running_mean.numpy(), np.float64, "mean")
    _assert_matches(layer.running_var[keep], module.running_var.numpy(), np.float64, "var")
    assert np.all(dx[~live] == 0)
    if mask_order == "after_norm":
        assert np.all(out[~live] == 0)
        for name, value in before.items():
            assert np.array_equal(layer.buffers()[name][~live], value[~live]), name


# ---------------------------------------------------------------------------- reference


@pytest.mark.parametrize("kind", ["1d", "2d"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("training", [True, False])
def test_batch_norm_matches_reference(rng, kind, dtype, training):
    layer = _layer(rng, kind, dtype, momentum=0.2)
    stats = {k: v.copy() for k, v in layer.buffers().items()}
    x = _input(rng, SHAPES[kind], dtype)
    upstream = rng.standard_normal(x.shape).astype(dtype)
    out, cache = layer.forward(x, mode=TRAIN if training else EVAL)
    dx, grads = layer.backward(upstream, cache)

    kw = dict(eps=layer.eps, training=training, **stats)
    x64, w64, b64, g64 = (
        np.asarray(a, np.float64) for a in (x, layer.weight, layer.bias, upstream)
    )
    kw64 = {k: np.asarray(v, np.float64) if isinstance(v, np.ndarray) else v for k, v in kw.items()}
    _assert_matches(out, batch_norm_forward(x64, w64, b64, **kw64), dtype, "out")
    ref_dx, ref_dw, ref_db = batch_norm_backward(x64, w64, g64, **kw64)
    _assert_matches(dx, ref_dx, dtype, "dx")
    _assert_matches(grads["weight"], ref_dw, dtype, "dweight")
    _assert_matches(grads["bias"], ref_db, dtype, "dbias")
    if training:
        mean, var = batch_norm_running_stats(
            x64,
            stats["running_mean"].astype(np.float64),
            stats["running_var"].astype(np.float64),
            momentum=0.2,
        )
    else:
        mean, var = stats["running_mean"], stats["running_var"]
    _assert_matches(layer.running_mean, mean, dtype, "running_mean")
    _assert_matches(layer.running_var, var, dtype, "running_var")


# ---------------------------------------------------------------------------- semantics


@pytest.mark.parametrize("kind", ["1d", "2d"])
@pytest.mark.parametrize("training", [True, False])
def test_after_norm_dropped_channels_are_exact_zeros(rng, kind, training):
    layer = _layer(rng, kind)
    before = {k: v.copy() for k, v in layer.buffers().items()}
    live = _live(kind)
    x = _input(rng, SHAPES[kind])  # nonzero in the dropped channel: it must be ignored
    mode = TRAIN if training else EVAL
    out, cache = layer.forward(x, live=live, mode=mode)
    dx, grads = layer.backward(rng.standard_normal(out.shape), cache)
    assert np.all(out[~live] == 0) and np.all(out[live] != 0)
    assert np.all(dx[~live] == 0) and np.all(dx[live] != 0)
    assert np.all(grads["weight"][~live] == 0) and np.all(grads["bias"][~live] == 0)
    assert np.all(grads["bias"][live] != 0)
    for name, value in before.items():
        now = layer.buffers()[name]
        assert np.array_equal(now[~live], value[~live]), name
        assert np.array_equal(now[live], value[live]) != training, name
    assert layer.live_outputs(None, live) is live
    # The live channels are computed as without `live` (on the same values).
    dense = KINDS[kind](layer.weight, layer.bias, *(v.copy() for v in before.values()))
    x_zeroed = np.where(live.reshape((-1,) + (1,) * (x.ndim - 1)), x, 0)
    ref_out, _ = dense.forward(x_zeroed, mode=mode)
    assert np.array_equal(out[live], ref_out[live])


@pytest.mark.parametrize("training", [True, False])
def test_before_norm_zero_channel_outputs_beta(rng, training):
    layer = _layer(rng, "2d", mask_order="before_norm")
    before = {k: v.copy() for k, v in layer.buffers().items()}
    live = _live("2d")
    x = _input(rng, SHAPES["2d"], live=live)
    mode = TRAIN if training else EVAL
    out, cache = layer.forward(x, live=live, mode=mode)
    assert layer.live_outputs(None, live) is None
    if training:
        assert np.all(out[1] == layer.bias[1])
        # A zero channel has batch mean and variance 0: its running statistics decay.
        assert layer.running_mean[1] == np.float64(0.9) * before["running_mean"][1]
        assert layer.running_var[1] == np.float64(0.9) * before["running_var"][1]
    else:
        mean, var = before["running_mean"][1], before["running_var"][1]
        expected = layer.weight[1] * (0 - mean) / np.sqrt(var + layer.eps) + layer.bias[1]
        assert_close(out[1], np.full(out[1].shape, expected), abs(expected), np.float64)
        assert np.all(out[1] == out[1].flat[0])
    # The same as a dense pass (no live) on the input with the dropped channel zeroed.
    dense = BatchNorm2d(
        layer.weight, layer.bias, *(v.copy() for v in before.values()), mask_order="before_norm"
    )
    dense_out, _ = dense.forward(x, mode=mode)
    assert_close(out, dense_out, np.abs(dense_out).max(), np.float64)
    if training:
        assert np.all(dense_out[1] == layer.bias[1])


def test_update_stats_false_and_eval_leave_buffers_untouched(rng):
    layer = _layer(rng, "2d")
    x = _input(rng, SHAPES["2d"])
    before = {k: v.copy() for k, v in layer.buffers().items()}
    out_no_update, _ = layer.forward(x, mode=NO_UPDATE)
    layer.forward(x, mode=EVAL)
    layer.forward(x, mode=Mode(training=False, update_stats=True))
    for name, value in before.items():
        assert np.array_equal(layer.buffers()[name], value), name
    out_update, _ = layer.forward(x, mode=TRAIN)
    assert np.array_equal(out_update, out_no_update)  # batch statistics either way
    for name, value in before.items():
        assert not np.array_equal(layer.buffers()[name], value), name


def test_straight_through_uses_batch_statistics(rng):
    layer = _layer(rng, "1d")
    x = _input(rng, SHAPES["1d"])
    train_out, _ = layer.forward(x, mode=NO_UPDATE)
    st_out, _ = layer.forward(
        x, mode=Mode(training=False, straight_through=True, update_stats=False)
    )
    eval_out, _ = layer.forward(x, mode=EVAL)
    assert np.array_equal(st_out, train_out) and not np.array_equal(st_out, eval_out)
    before = layer.running_mean.copy()
    layer.forward(x, mode=STRAIGHT_THROUGH)
    assert not np.array_equal(layer.running_mean, before)


@pytest.mark.parametrize("shape", [(3, 1), (3, 1, 1, 1)])
def test_one_value_per_channel_in_training_is_an_error(shape):
    layer = (BatchNorm1d if len(shape) == 2 else BatchNorm2d).new(3, dtype=np.float64)
    x = np.ones(shape)
    with pytest.raises(ValueError, match="more than 1 value per channel when training"):
        layer.forward(x)
    with pytest.raises(ValueError, match="more than 1 value per channel when training"):
        layer.forward(x, mode=NO_UPDATE)
    out, _ = layer.forward(x, mode=EVAL)
    assert out.shape == shape and np.all(layer.running_var == 1)


def test_new_initialises_like_torch():
    layer = BatchNorm2d.new(3)
    assert layer.dtype == np.float32 and layer.n_in == layer.n_out == 3
    assert np.array_equal(layer.weight, np.ones(3)) and np.array_equal(layer.bias, np.zeros(3))
    assert np.array_equal(layer.running_mean, np.zeros(3))
    assert np.array_equal(layer.running_var, np.ones(3))
    assert set(layer.params()) == {"weight", "bias"}
    assert set(layer.buffers()) == {"running_mean", "running_var"}
    assert isinstance(BatchNorm1d.new(2), BatchNorm1d)


# ---------------------------------------------------------------------------- storage


@pytest.mark.parametrize("kind", ["1d", "2d"])
@pytest.mark.parametrize("mask_order", ["after_norm", "before_norm"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_config_round_trip_is_bit_exact(rng, kind, mask_order, dtype):
    layer = _layer(rng, kind, dtype, mask_order=mask_order, momentum=0.25)
    layer.eps = 1e-3
    config = json.loads(json.dumps(layer.config()))
    arrays = {k: v.copy() for k, v in layer.arrays().items()}
    assert set(arrays) == {"weight", "bias", "running_mean", "running_var"}
    rebuilt = LAYER_TYPES[type(layer).__name__].from_config(config, arrays)
    assert type(rebuilt) is type(layer) and rebuilt.config() == layer.config()
    live = _live(kind)
    x = _input(rng, SHAPES[kind], dtype)
    for mode in (EVAL, TRAIN, TRAIN):
        a, cache_a = layer.forward(x, live=live, mode=mode)
        b, cache_b = rebuilt.forward(x, live=live, mode=mode)
        assert np.array_equal(a, b)
        g = np.ones_like(a)
        assert np.array_equal(layer.backward(g, cache_a)[0], rebuilt.backward(g, cache_b)[0])
        for name, value in layer.buffers().items():
            assert np.array_equal(rebuilt.buffers()[name], value), name


def test_from_config_checks_the_size():
    layer = BatchNorm2d.new(3)
    config = dict(layer.config(), n_channels=4)
    with pytest.raises(ValueError, match=r"weight must have shape \(4,\)"):
        BatchNorm2d.from_config(config, layer.arrays())


# ---------------------------------------------------------------------------- errors


def test_bad_inputs_are_refused():
    bn2 = BatchNorm2d.new(3)
    bn1 = BatchNorm1d.new(3)
    x = np.ones((3, 2, 2, 2), dtype=np.float32)
    with pytest.raises(ValueError, match="4-D channel-major"):
        bn2.forward(np.ones((3, 4), dtype=np.float32))
    with pytest.raises(ValueError, match=r"2-D, got shape \(3, 2, 2, 2\)"):
        bn1.forward(x)
    with pytest.raises(ValueError, match="must have 3 channels on axis 0"):
        bn2.forward(np.ones((2, 3, 2, 2), dtype=np.float32))
    with pytest.raises(ValueError, match=r"shape \(3, n_batch\)"):
        bn1.forward(np.ones((4, 3), dtype=np.float32))
    for bad in (np.nan, np.inf):
        x_bad = x.copy()
        x_bad[0, 0, 0, 0] = bad
        with pytest.raises(ValueError, match="x must be finite"):
            bn2.forward(x_bad)
    with pytest.raises(ValueError, match="BatchNorm2d takes no mask"):
        bn2.forward(x, np.ones(3, dtype=bool))
    with pytest.raises(TypeError, match="live must be a boolean array"):
        bn2.forward(x, live=np.ones(3))
    with pytest.raises(ValueError, match=r"live must have shape \(3,\)"):
        bn2.forward(x, live=np.ones(4, dtype=bool))
    with pytest.raises(TypeError, match="same dtype"):
        bn2.forward(x.astype(np.float64))
    out, cache = bn2.forward(x)
    with pytest.raises(TypeError, match="same dtype"):
        bn2.backward(out.astype(np.float64), cache)
    with pytest.raises(ValueError, match=r"dout must have shape \(3, 2, 2, 2\)"):
        bn2.backward(np.ones((3, 1, 2, 2), dtype=np.float32), cache)
    with pytest.raises(ValueError, match="dout must be finite"):
        bn2.backward(np.full_like(out, np.nan), cache)


def test_bad_construction_is_refused():
    ones, zeros = np.ones(3), np.zeros(3)
    with pytest.raises(TypeError, match="running_var must have the same dtype as weight"):
        BatchNorm2d(ones, zeros, zeros, ones.astype(np.float32))
    with pytest.raises(ValueError, match=r"bias must have shape \(3,\)"):
        BatchNorm2d(ones, np.zeros(2), zeros, ones)
    with pytest.raises(ValueError, match="running_var must be >= 0"):
        BatchNorm2d(ones, zeros, zeros, -ones)
    with pytest.raises(ValueError, match="weight must be finite"):
        BatchNorm2d(np.full(3, np.nan), zeros, zeros, ones)
    with pytest.raises(ValueError, match="mask_order must be one of"):
        BatchNorm2d(ones, zeros, zeros, ones, mask_order="after")
    with pytest.raises(ValueError, match=r"eps must be in \(0"):
        BatchNorm2d(ones, zeros, zeros, ones, eps=0.0)
    with pytest.raises(ValueError, match=r"momentum must be in \[0"):
        BatchNorm2d(ones, zeros, zeros, ones, momentum=1.5)
    with pytest.raises(TypeError, match="momentum must be a real number"):
        BatchNorm2d(ones, zeros, zeros, ones, momentum=None)
    with pytest.raises(ValueError, match="n_channels must be >= 1"):
        BatchNorm2d.new(0)
    with pytest.raises(TypeError, match="n_channels must be an int"):
        BatchNorm2d.new(2.0)
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        BatchNorm2d.new(2, dtype=np.int32)
