"""Export: the narrowed dense network and the PyTorch module predict as the sparse one."""

import io
import sys

import numpy as np
import pytest
from conftest import assert_close

from cpusparse.engine import Residual, Sequential
from cpusparse.engine.layers import (
    EVAL,
    AvgPool2d,
    BatchNorm1d,
    BatchNorm2d,
    Conv2d,
    Flatten,
    Layer,
    Linear,
    MaxPool2d,
    ReLU,
    SparseLinear,
)
from cpusparse.export import kept_outputs, narrow, to_torch
from cpusparse.models import mlp, resnet, vgg

torch = pytest.importorskip("torch")


# ---------------------------------------------------------------------- helpers


def _norms(layers):
    for layer in layers:
        if isinstance(layer, Residual):
            yield from _norms(layer.main.layers)
            if layer.shortcut is not None:
                yield from _norms(layer.shortcut.layers)
        elif isinstance(layer, BatchNorm1d | BatchNorm2d):
            yield layer


def randomize_norms(net, rng):
    """Trained-looking batch norms: gamma, beta and running statistics away from 1, 0."""
    for bn in _norms(net.layers):
        n, dtype = bn.n_channels, bn.dtype
        bn.weight[:] = rng.uniform(0.5, 1.5, n).astype(dtype)
        bn.bias[:] = rng.uniform(-0.5, 0.5, n).astype(dtype)
        bn.running_mean[:] = rng.uniform(-0.3, 0.3, n).astype(dtype)
        bn.running_var[:] = rng.uniform(0.5, 2.0, n).astype(dtype)
    return net


def random_masks(net, rng, p=0.5):
    """Random masks, each keeping at least one unit."""
    masks = []
    for n in net.n_units():
        m = rng.random(n) < p
        m[rng.integers(n)] = True
        masks.append(m)
    return masks


def torch_logits(model, x):
    """Logits ``(n_classes, N)`` of the torch module on cpusparse's layout of ``x``."""
    t = x.T if x.ndim == 2 else x.transpose(1, 0, 2, 3)
    with torch.no_grad():
        return model(torch.from_numpy(np.ascontiguousarray(t))).numpy().T


def check_exports(net, masks, x):
    """narrow() and to_torch() give the sparse network's eval logits; returns narrowed."""
    ref, _ = net.forward(x, masks, mode=EVAL)
    small = narrow(net, masks)
    assert small.n_masks == 0 and small.dtype == net.dtype
    out, _ = small.forward(x, mode=EVAL)
    scale = np.abs(ref).max()
    assert_close(out, ref, scale, x.dtype, "narrowed logits")
    model = to_torch(net, masks)
    assert not model.training
    assert_close(torch_logits(model, x), ref, scale, x.dtype, "torch logits")
    return small


def convs(layers):
    """The convolutions of a network, depth-first (main branch, then shortcut)."""
    out = []
    for layer in layers:
        if isinstance(layer, Residual):
            out += convs(layer.main.layers)
            if layer.shortcut is not None:
                out += convs(layer.shortcut.layers)
        elif isinstance(layer, Conv2d):
            out.append(layer)
    return out


def multiply_adds(layers, caches):
    """Multiply-adds per sample that a forward pass executed, read from its caches."""
    total = 0
    for layer, cache in zip(layers, caches, strict=True):
        if isinstance(layer, Residual):
            total += multiply_adds(layer.main.layers, cache.main)
            if layer.shortcut is not None:
                total += multiply_adds(layer.shortcut.layers, cache.shortcut)
        elif isinstance(layer, Conv2d):
            kh, kw = layer.kernel_size
            ho, wo = cache.out.shape[2:]
            total += len(cache.rows) * len(cache.chans) * kh * kw * ho * wo
        elif isinstance(layer, Linear):
            total += layer.n_out * (layer.n_in if cache.cols is None else len(cache.cols))
        elif isinstance(layer, SparseLinear):  # neuron granularity: a dense block
            total += cache.block.size
    return total


def executed(net, x, masks=None):
    _, caches = net.forward(x, masks, mode=EVAL)
    return multiply_adds(net.layers, caches)


# ---------------------------------------------------------------------- MLPs


def test_neuron_mlp_drops_rows_and_columns(rng):
    net = mlp(12, (20, 16), 5, granularity="neuron", dtype=np.float64, rng=0)
    masks = random_masks(net, rng)
    x = rng.standard_normal((12, 7))
    small = check_exports(net, masks, x)
    linears = [layer for layer in small.layers if isinstance(layer, Linear)]
    widths = [int(m.sum()) for m in masks]
    assert [lin.weight.shape for lin in linears] == [
        (widths[0], 12), (widths[1], widths[0]), (5, widths[1])
    ]  # fmt: skip
    assert [type(layer).__name__ for layer in small.layers] == [
        "Linear", "ReLU", "Linear", "ReLU", "Linear"
    ]  # fmt: skip
    assert [k.tolist() for k in kept_outputs(net, masks)] == [
        np.flatnonzero(m).tolist() for m in masks
    ]
    # The narrowed network executes what the sparse one does, far less than dense.
    assert executed(small, x) == executed(net, x, masks) < executed(net, x)


def test_weight_mlp_keeps_shapes_with_masked_weights_zero(rng):
    net = mlp(10, (9,), 4, granularity="weight", stored_density=0.7, dtype=np.float64, rng=1)
    masks = random_masks(net, rng, p=0.3)
    small = check_exports(net, masks, rng.standard_normal((10, 6)))
    np.testing.assert_array_equal(small.layers[0].weight, net.layers[0].to_dense(masks[0]))
    np.testing.assert_array_equal(small.layers[0].bias, net.layers[0].bias)
    assert kept_outputs(net, masks)[0].tolist() == list(range(9))


def test_masks_none_gives_the_dense_equivalent(rng):
    net = mlp(6, (5,), 3, granularity="neuron", dtype=np.float64, rng=2)
    small = check_exports(net, None, rng.standard_normal((6, 4)))
    assert small.layers[0].weight.shape == (5, 6)


# ---------------------------------------------------------------------- CNNs


@pytest.mark.parametrize("shape", [(2, 8, 8), (1, 1, 40)], ids=["image", "signal"])
def test_channel_vgg_with_global_pool(rng, shape):
    net = randomize_norms(vgg((4, 6), shape, 5, dtype=np.float64, rng=3), rng)
    masks = random_masks(net, rng)
    x = rng.standard_normal((shape[0], 3, *shape[1:]))
    small = check_exports(net, masks, x)
    widths = [int(m.sum()) for m in masks]
    assert [c.weight.shape[:2] for c in convs(small.layers)] == list(
        zip(widths, [shape[0], *widths[:-1]], strict=True)
    )
    assert all(c.granularity is None for c in convs(small.layers))
    assert small.layers[-1].weight.shape == (5, widths[-1])
    assert executed(small, x) == executed(net, x, masks) < executed(net, x)


def flatten_cnn(rng, mask_order="after_norm", features_order="after_norm"):
    """A hand-built CNN with a Flatten head, biases, fused ReLUs and an average pool."""
    dt = np.float64

    def bn(n):
        return BatchNorm2d.new(n, dtype=dt, mask_order=mask_order)

    layers = [
        Conv2d.random(2, 5, 3, padding=1, activation="relu", dtype=dt, rng=rng),
        bn(5),
        MaxPool2d(2),
        Conv2d.random(5, 4, 3, padding=1, bias=False, dtype=dt, rng=rng),
        bn(4),
        ReLU(),
        AvgPool2d(3, stride=1, padding=1),
        Flatten((4, 3, 3)),
        BatchNorm1d.new(36, dtype=dt, mask_order=features_order),
        SparseLinear.random(36, 7, granularity="neuron", activation="relu", dtype=dt, rng=rng),
        Linear.random(7, 3, dtype=dt, rng=rng),
    ]
    return randomize_norms(Sequential(layers), rng)


def test_flatten_head_drops_each_channels_block_of_columns(rng):
    net = flatten_cnn(rng)
    masks = [np.array([1, 0, 1, 1, 0], bool), np.array([0, 1, 0, 1], bool), rng.random(7) < 0.6]
    masks[2][0] = True
    x = rng.standard_normal((2, 4, 6, 6))
    small = check_exports(net, masks, x)
    flatten = next(layer for layer in small.layers if isinstance(layer, Flatten))
    assert flatten.shape == (2, 3, 3)
    norm1d = next(layer for layer in small.layers if isinstance(layer, BatchNorm1d))
    kept = np.r_[9:18, 27:36]  # channels 1 and 3, 9 features each
    np.testing.assert_array_equal(norm1d.running_mean, net.layers[8].running_mean[kept])
    hidden = [layer for layer in small.layers if isinstance(layer, Linear)][0]
    np.testing.assert_array_equal(
        hidden.weight, net.layers[9].to_dense(masks[2])[np.ix_(np.flatnonzero(masks[2]), kept)]
    )
    assert executed(small, x) == executed(net, x, masks)


def test_before_norm_keeps_dropped_channels_as_constants(rng):
    net = flatten_cnn(rng, mask_order="before_norm")
    masks = [np.array([1, 0, 1, 1, 0], bool), np.array([0, 1, 0, 1], bool), np.ones(7, bool)]
    x = rng.standard_normal((2, 3, 6, 6))
    ref, _ = net.forward(x, masks, mode=EVAL)
    # The dropped channels are not zero after the norm...
    no_masks, _ = net.forward(x, [np.ones(5, bool), np.ones(4, bool), masks[2]], mode=EVAL)
    assert not np.allclose(ref, no_masks)
    small = check_exports(net, masks, x)
    # ... so they stay: zero filters, the norm's parameters kept.
    first = convs(small.layers)[0]
    assert first.n_out == 5 and not first.weight[[1, 4]].any() and not first.bias[[1, 4]].any()
    np.testing.assert_array_equal(small.layers[2].weight, net.layers[1].weight)
    assert [k.tolist() for k in kept_outputs(net, masks)[:2]] == [[0, 1, 2, 3, 4], [0, 1, 2, 3]]


def test_a_feature_norm_before_its_mask_keeps_the_channels_it_reads(rng):
    # A BatchNorm1d with mask_order="before_norm" after the Flatten outputs a constant on
    # the dropped channels' features: they, hence the channels, stay.
    net = flatten_cnn(rng, features_order="before_norm")
    masks = [np.array([1, 0, 1, 1, 0], bool), np.array([0, 1, 0, 1], bool), np.ones(7, bool)]
    small = check_exports(net, masks, rng.standard_normal((2, 3, 6, 6)))
    assert [c.n_out for c in convs(small.layers)] == [3, 4]
    assert kept_outputs(net, masks)[1].tolist() == [0, 1, 2, 3]


def test_weight_granularity_cnn(rng):
    net = randomize_norms(
        vgg((3, 4), (1, 6, 6), 3, granularity="weight", dtype=np.float64, rng=4), rng
    )
    masks = random_masks(net, rng, p=0.4)
    small = check_exports(net, masks, rng.standard_normal((1, 2, 6, 6)))
    for conv, orig, m in zip(convs(small.layers), net.prunable_layers(), masks, strict=True):
        np.testing.assert_array_equal(conv.weight, orig.weight * m.reshape(orig.weight.shape))


@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 1, 40)], ids=["image", "signal"])
def test_channel_resnet_keeps_the_union_at_residual_joins(rng, shape):
    # stem, block 1 (identity: a, b), block 2 (projection: c, d, shortcut e)
    net = randomize_norms(resnet((4, 6), shape, 3, dtype=np.float64, rng=5), rng)
    masks = random_masks(net, rng)
    m0, _, m2, _, m4, m5 = masks
    x = rng.standard_normal((shape[0], 3, *shape[1:]))
    small = check_exports(net, masks, x)
    union1, union2 = m0 | m2, m4 | m5
    expected = [union1, masks[1], union1, masks[3], union2, union2]
    assert [k.tolist() for k in kept_outputs(net, masks)] == [
        np.flatnonzero(m).tolist() for m in expected
    ]
    assert [c.n_out for c in convs(small.layers)] == [int(m.sum()) for m in expected]
    assert small.layers[-1].n_in == int(union2.sum())
    # Filters kept for the union only are zero, and so are their norms' gamma and beta.
    b = convs(small.layers)[2]
    extra = ~m2[np.flatnonzero(union1)]
    assert not b.weight[extra].any()
    norm_b = small.layers[3].main.layers[4]
    assert not norm_b.weight[extra].any() and not norm_b.bias[extra].any()
    assert executed(net, x, masks) <= executed(small, x) < executed(net, x)


def test_nested_sequential(rng):
    net = mlp(6, (5,), 3, granularity="neuron", dtype=np.float64, rng=12)
    nested = Sequential([Sequential(net.layers[:1]), ReLU(), net.layers[1]])
    masks = [np.array([1, 0, 1, 1, 0], bool)]
    small = check_exports(nested, masks, rng.standard_normal((6, 4)))
    assert isinstance(small.layers[0], Sequential) and small.layers[0].n_out == 3


def test_resnet_with_identity_blocks_in_every_stage(rng):
    net = randomize_norms(
        resnet((3, 5), (1, 8, 8), 2, blocks_per_stage=2, dtype=np.float64, rng=6), rng
    )
    masks = random_masks(net, rng, p=0.4)
    check_exports(net, masks, rng.standard_normal((1, 2, 8, 8)))


@pytest.mark.parametrize("build", [vgg, resnet])
def test_prune_first_false_narrows_the_inputs_of_the_next_layers(rng, build):
    net = randomize_norms(
        build((4, 6), (2, 8, 8), 3, prune_first=False, dtype=np.float64, rng=7), rng
    )
    assert net.layers[0].granularity is None
    masks = random_masks(net, rng)
    small = check_exports(net, masks, rng.standard_normal((2, 2, 8, 8)))
    assert convs(small.layers)[0].n_out == 4
    assert convs(small.layers)[1].n_out == int(masks[0].sum())


@pytest.mark.parametrize("which", [0, 1, 3])
def test_a_mask_that_keeps_nothing_gives_one_zero_channel(rng, which):
    net = randomize_norms(resnet((4, 6), (1, 8, 8), 3, dtype=np.float64, rng=8), rng)
    masks = random_masks(net, rng)
    masks[which][:] = False
    if which == 0:
        masks[2][:] = False  # nothing left in the stage's channels either
    small = check_exports(net, masks, rng.standard_normal((1, 2, 8, 8)))
    conv = convs(small.layers)[which]
    assert conv.n_out == 1 and not conv.weight.any()


def test_an_mlp_layer_that_keeps_nothing(rng):
    net = mlp(6, (5, 4), 3, granularity="neuron", dtype=np.float64, rng=9)
    masks = [np.ones(5, bool), np.zeros(4, bool)]
    small = check_exports(net, masks, rng.standard_normal((6, 3)))
    assert small.layers[2].weight.shape == (1, 5) and not small.layers[2].weight.any()
    np.testing.assert_allclose(small.forward(np.zeros((6, 1)))[0][:, 0], net.layers[2].bias)


# ---------------------------------------------------------------------- PyTorch


def test_torch_state_dict_is_the_narrowed_networks_arrays(rng):
    net = randomize_norms(resnet((4, 6), (1, 8, 8), 3, dtype=np.float64, rng=10), rng)
    masks = random_masks(net, rng)
    arrays = narrow(net, masks).arrays()
    model = to_torch(net, masks)
    state = model.state_dict()
    tracked = {k for k in state if k.endswith("num_batches_tracked")}
    assert set(state) - tracked == set(arrays) and "3.0.0.weight" in arrays
    for key, value in arrays.items():
        assert state[key].dtype == torch.float64
        np.testing.assert_array_equal(state[key].numpy(), value)
    block = model[3]
    assert type(block).__name__ == "TorchResidual" and block.shortcut is None
    assert isinstance(model[4].shortcut[0], torch.nn.Conv2d)
    assert model[1].eps == net.layers[1].eps == 1e-5
    # The module pickles (torch.save of the whole module), and loads back equal.
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    again = torch.load(buffer, weights_only=False)
    x = rng.standard_normal((1, 2, 8, 8))
    np.testing.assert_array_equal(torch_logits(again, x), torch_logits(model, x))


def test_torch_float32(rng):
    net = randomize_norms(vgg((4,), (1, 6, 6), 3, rng=11), rng)
    masks = random_masks(net, rng)
    model = to_torch(net, masks)
    assert next(model.parameters()).dtype == torch.float32
    check_exports(net, masks, rng.standard_normal((1, 5, 6, 6)).astype(np.float32))


def test_to_torch_without_torch_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "torch", None)
    net = mlp(3, (2,), 2, rng=0)
    with pytest.raises(ImportError, match="pip install torch"):
        to_torch(net)


# ---------------------------------------------------------------------- trained


def test_a_trained_channel_vgg_exports_with_equal_predictions():
    from sklearn.datasets import load_digits

    from cpusparse.training import TrainConfig
    from cpusparse.training.loop import fixed_mask
    from cpusparse.training.state import init_state, spawn_streams
    from cpusparse.training.step import train_step

    digits = load_digits()
    x_all = (digits.images / 16.0).astype(np.float32)[None]  # (1, N, 8, 8)
    y_all = digits.target
    init, data_rng, mask_rng = spawn_streams(0)
    net = vgg((6, 8), (1, 8, 8), 10, convs_per_stage=1, density=0.5, rng=init)
    config = TrainConfig(density=0.5, lr=1e-2, score_lr=0.05)
    state = init_state(net, config, data_rng=data_rng, mask_rng=mask_rng)
    order = np.random.default_rng(0).permutation(1200)
    for start in range(0, 1200, 100):
        idx = order[start : start + 100]
        train_step(state, np.ascontiguousarray(x_all[:, idx]), y_all[idx], config)
    masks = fixed_mask(state)
    assert 0 < sum(int(m.sum()) for m in masks) < sum(net.n_units())
    assert not np.allclose(net.layers[1].running_var, 1)  # trained statistics
    x = np.ascontiguousarray(x_all[:, 1200:1400])
    ref, _ = net.forward(x, masks, mode=EVAL)
    small = check_exports(net, masks, x)
    out, _ = small.forward(x, mode=EVAL)
    assert (out.argmax(axis=0) == ref.argmax(axis=0)).all()
    assert [c.n_out for c in convs(small.layers)] == [int(m.sum()) for m in masks]


# ---------------------------------------------------------------------- errors


class Doubling(Layer):
    """An elementwise layer export does not know."""

    def _forward(self, x, mask=None, live=None, mode=EVAL):
        return 2 * x, None

    def _backward(self, dout, cache, need_dx=True):
        return 2 * dout, {}

    def config(self):
        return {}


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (
            lambda net: narrow(net, [np.ones(4, bool)]),
            ValueError,
            r"one mask per prunable layer \(2",
        ),
        (lambda net: narrow(net, [np.ones(4, bool), np.ones(5, bool)]), ValueError, r"masks\[1\]"),
        (
            lambda net: narrow(net, [np.ones(4), np.ones(3, bool)]),
            TypeError,
            r"masks\[0\].*boolean",
        ),
        (lambda net: narrow(net, np.ones(7, bool)), TypeError, "list of boolean arrays"),
        (lambda net: narrow(net.layers[0], None), TypeError, "must be a cpusparse Sequential"),
        (
            lambda net: kept_outputs(Sequential([*net.layers, Doubling()]), None),
            TypeError,
            "Doubling",
        ),
        (
            lambda net: to_torch(Sequential([Residual([net.layers[0], Doubling()])]), None),
            TypeError,
            r"layer type Doubling \(at network.layers\[0\].main.layers\[1\]\)",
        ),
    ],
)
def test_bad_input_is_refused_with_a_clear_error(call, error, match):
    net = mlp(4, (4, 3), 2, granularity="neuron", rng=0)
    with pytest.raises(error, match=match):
        call(net)
