"""Pools and Flatten: finite differences, PyTorch, the reference, live channels, threads."""

import json

import numba
import numpy as np
import pytest
from conftest import DTYPES, assert_close, assert_grad_close, central_differences

from cpusparse.engine.layers.base import LAYER_TYPES, STRAIGHT_THROUGH
from cpusparse.engine.layers.pool import AvgPool2d, Flatten, GlobalAvgPool2d, MaxPool2d
from cpusparse.testing.reference import (
    avg_pool2d_backward,
    avg_pool2d_forward,
    max_pool2d_backward,
    max_pool2d_forward,
)

POOLS = {"max": MaxPool2d, "avg": AvgPool2d}
REFERENCES = {
    "max": (max_pool2d_forward, max_pool2d_backward),
    "avg": (avg_pool2d_forward, avg_pool2d_backward),
}
# (kernel_size, stride, padding, input shape (C, N, H, W)): stride 1 and 2, padding 0
# and 1, odd sizes, rectangular windows, batches of one.
GEOMETRIES = [
    (2, 2, 0, (2, 2, 4, 6)),
    (2, 2, 0, (2, 1, 5, 7)),
    (3, 1, 1, (2, 2, 5, 5)),
    (3, 2, 1, (3, 1, 7, 5)),
    (3, 2, 0, (2, 2, 5, 6)),
    (2, 1, 0, (1, 3, 3, 4)),
    (2, 2, 1, (2, 1, 5, 5)),
    ((3, 2), (2, 1), (1, 0), (2, 2, 5, 4)),
    (3, None, 0, (1, 2, 6, 7)),
    (3, 1, 1, (1, 2, 2, 2)),  # the kernel is larger than the unpadded input
]
GEOMETRY_IDS = [f"k{k}-s{s}-p{p}-{'x'.join(map(str, shape))}" for k, s, p, shape in GEOMETRIES]


def _distinct(rng, shape, dtype=np.float64):
    """Values at least 0.1 apart (no tie within 1e-6 perturbations), some negative."""
    x = rng.permutation(int(np.prod(shape))).reshape(shape) * 0.1 - 1.0
    return x.astype(dtype)


def _nchw(torch, a):
    return torch.from_numpy(np.ascontiguousarray(np.swapaxes(a, 0, 1)))


def _cnhw(t):
    return np.ascontiguousarray(np.swapaxes(t.detach().numpy(), 0, 1))


def _assert_matches(got, ref, dtype, name):
    ref = np.asarray(ref, dtype=np.float64)
    assert_close(got, ref, np.abs(ref).max(initial=0.0), dtype, name)


def _fd_check(rng, layer, x, live=None):
    out, cache = layer.forward(x, live=live)
    upstream = rng.standard_normal(out.shape)
    dx, grads = layer.backward(upstream, cache)
    assert grads == {}

    def loss():
        return float(np.sum(layer.forward(x, live=live)[0] * upstream))

    fd = central_differences(loss, x)
    assert np.abs(fd).max() > 0
    assert_grad_close(dx, fd, "x")
    return out, dx


# ---------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize(("kernel", "stride", "padding", "shape"), GEOMETRIES, ids=GEOMETRY_IDS)
def test_pool_finite_differences(rng, kind, kernel, stride, padding, shape):
    layer = POOLS[kind](kernel, stride, padding)
    x = _distinct(rng, shape)
    out, _ = _fd_check(rng, layer, x)
    h, w = shape[2:]
    k, s, p = layer.kernel_size, layer.stride, layer.padding
    assert out.shape == (
        *shape[:2],
        (h + 2 * p[0] - k[0]) // s[0] + 1,
        (w + 2 * p[1] - k[1]) // s[1] + 1,
    )


def test_pool_finite_differences_with_dropped_channels(rng):
    live = np.array([True, False, True])
    x = _distinct(rng, (3, 2, 5, 5))
    x[~live] = 0
    for layer in (MaxPool2d(3, 2, 1), AvgPool2d(2, 1), GlobalAvgPool2d()):
        out, dx = _fd_check(rng, layer, x, live)
        assert np.all(out[~live] == 0) and np.all(dx[~live] == 0)


@pytest.mark.parametrize("shape", [(3, 2, 3, 5), (2, 1, 1, 1), (1, 1, 4, 3)])
def test_global_avg_pool_and_flatten_finite_differences(rng, shape):
    x = rng.standard_normal(shape)
    out, _ = _fd_check(rng, GlobalAvgPool2d(), x)
    assert out.shape == shape[:2]
    out, _ = _fd_check(rng, Flatten((shape[0], *shape[2:])), x)
    assert out.shape == (shape[0] * shape[2] * shape[3], shape[1])


# ---------------------------------------------------------------------------- PyTorch


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("kernel", "stride", "padding", "shape"), GEOMETRIES, ids=GEOMETRY_IDS)
def test_pool_matches_torch(rng, kind, dtype, kernel, stride, padding, shape):
    torch = pytest.importorskip("torch")
    fn = {"max": torch.nn.functional.max_pool2d, "avg": torch.nn.functional.avg_pool2d}[kind]
    # Small integers: many ties (the first maximum in row-major order takes the
    # gradient, as in PyTorch), every value negative (padding is -inf, not 0).
    x = (rng.integers(0, 3, shape) - 5.0).astype(dtype)
    layer = POOLS[kind](kernel, stride, padding)
    out, cache = layer.forward(x)
    upstream = rng.standard_normal(out.shape).astype(dtype)
    dx, _ = layer.backward(upstream, cache)

    xt = _nchw(torch, x).requires_grad_()
    out_t = fn(xt, kernel, stride, padding)
    out_t.backward(_nchw(torch, upstream))
    assert out.dtype == dx.dtype == dtype
    _assert_matches(out, _cnhw(out_t), dtype, "out")
    _assert_matches(dx, _cnhw(xt.grad), dtype, "dx")
    if kind == "max":
        assert np.all(out < 0)
        assert np.array_equal(out, _cnhw(out_t))  # a maximum is exact


@pytest.mark.parametrize("dtype", DTYPES)
def test_global_avg_pool_and_flatten_match_torch(rng, dtype):
    torch = pytest.importorskip("torch")
    x = rng.standard_normal((3, 2, 4, 5)).astype(dtype)
    xt = _nchw(torch, x).requires_grad_()

    out, cache = GlobalAvgPool2d().forward(x)
    upstream = rng.standard_normal(out.shape).astype(dtype)
    dx, _ = GlobalAvgPool2d().backward(upstream, cache)
    out_t = torch.nn.functional.adaptive_avg_pool2d(xt, 1).flatten(1)  # (N, C)
    out_t.backward(torch.from_numpy(np.ascontiguousarray(upstream.T)))
    _assert_matches(out, out_t.detach().numpy().T, dtype, "out")
    _assert_matches(dx, _cnhw(xt.grad), dtype, "dx")

    # Flatten: PyTorch's order on (N, C, H, W), as (features, N).
    xt.grad = None
    flat, cache = Flatten((3, 4, 5)).forward(x)
    upstream = rng.standard_normal(flat.shape).astype(dtype)
    dx, _ = Flatten((3, 4, 5)).backward(upstream, cache)
    flat_t = torch.flatten(xt, 1)
    flat_t.backward(torch.from_numpy(np.ascontiguousarray(upstream.T)))
    assert np.array_equal(flat, flat_t.detach().numpy().T)
    assert np.array_equal(dx, _cnhw(xt.grad))
    assert flat.flags.c_contiguous and dx.flags.c_contiguous


# ---------------------------------------------------------------------------- reference


@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("kernel", "stride", "padding", "shape"), GEOMETRIES, ids=GEOMETRY_IDS)
def test_pool_matches_reference(rng, kind, dtype, kernel, stride, padding, shape):
    x = rng.integers(-2, 3, shape) + rng.standard_normal(shape) * (rng.random(shape) < 0.5)
    x = x.astype(dtype)
    layer = POOLS[kind](kernel, stride, padding)
    out, cache = layer.forward(x)
    upstream = rng.standard_normal(out.shape).astype(dtype)
    dx, _ = layer.backward(upstream, cache)
    forward, backward = REFERENCES[kind]
    ref_out = forward(x, kernel, stride, padding)
    ref_dx = backward(x, upstream, kernel, stride, padding)
    assert ref_out.dtype == ref_dx.dtype == dtype
    _assert_matches(out, ref_out, dtype, "out")
    _assert_matches(dx, ref_dx, dtype, "dx")
    if kind == "max":
        assert np.array_equal(out, ref_out)


def test_max_pool_ties_go_to_the_first_maximum():
    x = np.zeros((1, 1, 2, 3))
    out, cache = MaxPool2d(2, 1).forward(x)  # two windows, every value tied
    dx, _ = MaxPool2d(2, 1).backward(np.array([[[[1.0, 2.0]]]]), cache)
    assert np.array_equal(dx[0, 0], [[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]])


# ---------------------------------------------------------------------------- live, threads


@pytest.mark.parametrize("layer", [MaxPool2d(3, 2, 1), AvgPool2d(2), GlobalAvgPool2d()], ids=repr)
def test_dropped_channels_output_zero_and_live_passes(rng, layer):
    live = np.array([False, True, True, False])
    x = rng.standard_normal((4, 2, 6, 6))  # nonzero everywhere: dropped channels ignored
    out, cache = layer.forward(x, live=live)
    dx, _ = layer.backward(np.ones_like(out), cache)
    assert np.all(out[~live] == 0) and np.all(dx[~live] == 0)
    assert np.all(dx[live].sum(axis=tuple(range(1, dx.ndim))) > 0)
    dense_out, dense_cache = layer.forward(x)
    assert np.array_equal(out[live], dense_out[live])
    assert np.array_equal(dx[live], layer.backward(np.ones_like(out), dense_cache)[0][live])
    assert layer.live_outputs(None, live) is live
    assert layer.live_outputs(None, None) is None
    assert layer.n_in is None and layer.n_out is None and layer.params() == {}
    # A straight-through pass is a dense pass too.
    st_out, _ = layer.forward(x, mode=STRAIGHT_THROUGH)
    assert np.array_equal(st_out, dense_out)


def test_flatten_maps_live_channels_to_features(rng):
    layer = Flatten((3, 2, 2))
    live = np.array([True, False, True])
    x = rng.standard_normal((3, 5, 2, 2))
    out, cache = layer.forward(x, live=live)
    live_out = layer.live_outputs(None, live)
    assert np.array_equal(live_out, np.repeat(live, 4))
    assert np.all(out[~live_out] == 0)
    assert np.array_equal(out[live_out], layer.forward(x)[0][live_out])
    dx, _ = layer.backward(np.ones_like(out), cache)
    assert np.all(dx[~live] == 0) and np.all(dx[live] == 1)
    assert layer.live_outputs(None, None) is None
    assert (layer.n_in, layer.n_out) == (3, 12)


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 Numba threads")
@pytest.mark.parametrize("kind", ["max", "avg"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_results_do_not_depend_on_the_thread_count(rng, kind, dtype):
    layer = POOLS[kind](3, 2, 1)
    x = rng.standard_normal((5, 7, 13, 11)).astype(dtype)
    live = rng.random(5) < 0.7
    upstream = rng.standard_normal(layer.forward(x)[0].shape).astype(dtype)
    results = []
    before = numba.get_num_threads()
    try:
        for n_threads in (1, 2):
            numba.set_num_threads(n_threads)
            out, cache = layer.forward(x, live=live)
            dx, _ = layer.backward(upstream, cache)
            results.append((out, dx))
    finally:
        numba.set_num_threads(before)
    (out1, dx1), (out2, dx2) = results
    assert np.array_equal(out1, out2) and np.array_equal(dx1, dx2)
    assert np.abs(dx1).max() > 0


# ---------------------------------------------------------------------------- storage


@pytest.mark.parametrize(
    "layer",
    [MaxPool2d((3, 2), (2, 1), (1, 0)), AvgPool2d(3, 1, 1), GlobalAvgPool2d(), Flatten((2, 5, 4))],
    ids=repr,
)
def test_config_round_trip_is_bit_exact(rng, layer):
    config = json.loads(json.dumps(layer.config()))
    rebuilt = LAYER_TYPES[type(layer).__name__].from_config(config, layer.arrays())
    assert type(rebuilt) is type(layer) and rebuilt.config() == layer.config()
    assert repr(rebuilt) == repr(layer) and layer.arrays() == {}
    x = rng.standard_normal((2, 3, 5, 4)).astype(np.float32)
    a, cache_a = layer.forward(x)
    b, cache_b = rebuilt.forward(x)
    assert np.array_equal(a, b)
    g = np.ones_like(a)
    assert np.array_equal(layer.backward(g, cache_a)[0], rebuilt.backward(g, cache_b)[0])


# ---------------------------------------------------------------------------- errors


@pytest.mark.parametrize("cls", [MaxPool2d, AvgPool2d])
def test_bad_pool_settings_are_refused(cls):
    with pytest.raises(ValueError, match="stride must be >= 1"):
        cls(2, 0)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        cls(2, (1, -1))
    with pytest.raises(ValueError, match="kernel_size must be >= 1"):
        cls(0)
    with pytest.raises(ValueError, match="padding must be >= 0"):
        cls(2, padding=-1)
    with pytest.raises(ValueError, match=r"padding must be at most half of kernel_size \(3, 3\)"):
        cls(3, padding=2)
    with pytest.raises(ValueError, match="padding must be at most half"):
        cls((4, 2), padding=(1, 2))
    for bad in (2.0, True, (2, 2, 2), "2", (2, 1.5)):
        with pytest.raises(TypeError, match="kernel_size must be an int or a pair of ints"):
            cls(bad)
    with pytest.raises(TypeError, match="stride must be an int or a pair"):
        cls(2, 1.0)


@pytest.mark.parametrize(
    "layer", [MaxPool2d(3, 1, 1), AvgPool2d(2), GlobalAvgPool2d(), Flatten((2, 4, 4))], ids=repr
)
def test_bad_inputs_are_refused(layer):
    x = np.ones((2, 3, 4, 4), dtype=np.float32)
    with pytest.raises(ValueError, match="4-D channel-major image batch"):
        layer.forward(np.ones((2, 3, 4), dtype=np.float32))
    for bad in (np.nan, -np.inf):
        x_bad = x.copy()
        x_bad[1, 2, 3, 0] = bad
        with pytest.raises(ValueError, match="x must be finite"):
            layer.forward(x_bad)
    with pytest.raises(ValueError, match=f"{type(layer).__name__} takes no mask"):
        layer.forward(x, np.ones(2, dtype=bool))
    with pytest.raises(TypeError, match="live must be a boolean array"):
        layer.forward(x, live=np.ones(2, dtype=np.int8))
    with pytest.raises(ValueError, match=r"live must have shape \(2,\)"):
        layer.forward(x, live=np.ones(3, dtype=bool))
    with pytest.raises(TypeError, match="x must have dtype float32 or float64"):
        layer.forward(x.astype(np.complex64))
    out, cache = layer.forward(x)
    with pytest.raises(TypeError, match=r"dout must have the same dtype as x \(float32\)"):
        layer.backward(out.astype(np.float64), cache)
    with pytest.raises(ValueError, match="dout"):
        layer.backward(out[:1], cache)
    with pytest.raises(ValueError, match="dout must be finite"):
        layer.backward(np.full_like(out, np.nan), cache)


def test_kernel_larger_than_the_padded_input_is_refused():
    x = np.ones((1, 2, 2, 4))
    with pytest.raises(ValueError, match=r"kernel_size \(5, 5\) must fit in the padded input"):
        MaxPool2d(5, padding=1).forward(x)  # 2 + 2 < 5
    with pytest.raises(ValueError, match="must fit in the padded input"):
        AvgPool2d((2, 5)).forward(x)
    out, _ = AvgPool2d(5, padding=1).forward(np.ones((1, 2, 3, 3)))
    assert out.shape == (1, 2, 1, 1)
    assert MaxPool2d(3).output_size(3, 7) == (1, 2)


def test_bad_flatten_shapes_are_refused():
    layer = Flatten((2, 4, 4))
    with pytest.raises(ValueError, match="must have 2 channels on axis 0"):
        layer.forward(np.ones((3, 1, 4, 4)))
    with pytest.raises(ValueError, match=r"height 4 and width 4 \(Flatten shape \(2, 4, 4\)\)"):
        layer.forward(np.ones((2, 1, 4, 5)))
    with pytest.raises(TypeError, match="shape must be a triple of ints"):
        Flatten((2, 4))
    with pytest.raises(ValueError, match="shape must be positive"):
        Flatten((2, 0, 4))
    _, cache = layer.forward(np.ones((2, 3, 4, 4)))
    with pytest.raises(ValueError, match=r"dout must have shape \(32, n_batch\)"):
        layer.backward(np.ones((31, 3)), cache)
    with pytest.raises(ValueError, match=r"dout must have shape \(32, 3\)"):
        layer.backward(np.ones((32, 2)), cache)
