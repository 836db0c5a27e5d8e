"""Small VGG and ResNet networks built from the image layers: gradients, PyTorch, training.

The models module of the CNN issue will build these; here they are assembled by hand
from the layers, so that the engine's protocol (masks, known zeros through batch norm,
pooling and residual adds, buffers, checkpoints) is checked on whole networks.
"""

import numpy as np
import pytest
from conftest import assert_close, central_differences

from cpusparse.engine import (
    BatchNorm2d,
    Conv2d,
    Flatten,
    GlobalAvgPool2d,
    Linear,
    MaxPool2d,
    ReLU,
    Residual,
    Sequential,
)
from cpusparse.engine.layers import EVAL, TRAIN
from cpusparse.engine.losses import softmax_cross_entropy
from cpusparse.testing import reference
from cpusparse.training import TrainConfig
from cpusparse.training.state import init_state, spawn_streams
from cpusparse.training.step import train_step


def _conv(c_in, c_out, granularity, seed, **kw):
    return Conv2d.random(
        c_in, c_out, kw.pop("k", 3), granularity=granularity, dtype=np.float64, rng=seed, **kw
    )


def _bn(c, seed, dtype=np.float64):
    # Batch norm with random affine parameters and running statistics, so that
    # every term of its gradient is exercised.
    rng = np.random.default_rng(seed)
    bn = BatchNorm2d.new(c, dtype=dtype)
    bn.weight[:] = rng.uniform(0.5, 1.5, c)
    bn.bias[:] = rng.uniform(-0.5, 0.5, c)
    bn.running_mean[:] = rng.uniform(-0.2, 0.2, c)
    bn.running_var[:] = rng.uniform(0.5, 1.5, c)
    return bn


def small_vgg(granularity, c_in=1, size=6, widths=(3, 4), n_classes=3, pool="global"):
    """conv-BN-ReLU x2, max pool, conv-BN-ReLU, global average pool (or flatten), linear."""
    a, b = widths
    layers = [
        _conv(c_in, a, granularity, 1, padding=1),
        _bn(a, 2),
        ReLU(),
        _conv(a, a, granularity, 3, padding=1),
        _bn(a, 4),
        ReLU(),
        MaxPool2d(2),
        _conv(a, b, granularity, 5, padding=1),
        _bn(b, 6),
        ReLU(),
    ]
    if pool == "global":
        layers += [GlobalAvgPool2d(), Linear.random(b, n_classes, dtype=np.float64, rng=7)]
    else:
        half = size // 2
        layers += [
            Flatten((b, half, half)),
            Linear.random(b * half * half, n_classes, dtype=np.float64, rng=7),
        ]
    return Sequential(layers)


def small_resnet(granularity, c_in=1, width=3, n_classes=3):
    """3x3 stem, an identity block, a stride-2 projection block, pooling, linear."""
    w2 = width + 1
    return Sequential(
        [
            _conv(c_in, width, granularity, 1, padding=1),
            _bn(width, 2),
            ReLU(),
            Residual(
                [
                    _conv(width, width, granularity, 3, padding=1),
                    _bn(width, 4),
                    ReLU(),
                    _conv(width, width, granularity, 5, padding=1),
                    _bn(width, 6),
                ]
            ),
            Residual(
                [
                    _conv(width, w2, granularity, 7, stride=2, padding=1),
                    _bn(w2, 8),
                    ReLU(),
                    _conv(w2, w2, granularity, 9, padding=1),
                    _bn(w2, 10),
                ],
                [_conv(width, w2, granularity, 11, k=1, stride=2), _bn(w2, 12)],
            ),
            GlobalAvgPool2d(),
            Linear.random(w2, n_classes, dtype=np.float64, rng=13),
        ]
    )


NETS = {
    "vgg": small_vgg,
    "vgg-flatten": lambda g: small_vgg(g, pool="flatten"),
    "resnet": small_resnet,
}


def _masks(rng, net, which):
    if which == "all":
        return [np.ones(n, dtype=bool) for n in net.n_units()]
    masks = []
    for n in net.n_units():
        m = rng.random(n) < 0.6
        m[rng.integers(n)] = True  # every layer keeps something
        masks.append(m)
    if which == "none-in-one":
        masks[1][:] = False  # one layer keeps nothing
    return masks


@pytest.mark.parametrize("name", list(NETS))
@pytest.mark.parametrize("granularity", ["channel", "weight"])
@pytest.mark.parametrize("which", ["some", "all", "none-in-one"])
@pytest.mark.parametrize("mode", [TRAIN, EVAL], ids=["train", "eval"])
def test_network_finite_differences(rng, name, granularity, which, mode):
    net = NETS[name](granularity)
    x = rng.standard_normal((1, 3, 6, 6))  # a batch of 3 (batch 1 is the BN tests' case)
    y = np.array([0, 2, 1])
    masks = _masks(rng, net, which)
    buffers = {k: v.copy() for k, v in net.buffers().items()}
    test_mode = mode._replace(update_stats=False)  # FD re-runs must not move buffers

    def loss():
        logits, _ = net._forward(x, masks, None, test_mode)
        return softmax_cross_entropy(logits, y)[0]

    logits, caches = net._forward(x, masks, None, test_mode)
    _, dlogits = softmax_cross_entropy(logits, y)
    dx, grads = net._backward(dlogits, caches, True)
    assert sorted(grads) == sorted(net.params())
    for key, arr in net.params().items():
        fd = central_differences(loss, arr, eps=1e-7)
        assert_close(grads[key], fd, 1e-2, np.float32, key)
    assert_close(dx, central_differences(loss, x, eps=1e-7), 1e-2, np.float32, "dx")
    for key, before in buffers.items():
        np.testing.assert_array_equal(net.buffers()[key], before)


def _torch_forward(torch, net, x, masks, training):
    """The same network in PyTorch (masks after the norms), from the layers' arrays."""
    F = torch.nn.functional
    params = {k: torch.tensor(v, requires_grad=True) for k, v in net.params().items()}
    buffers = {k: torch.tensor(v.copy()) for k, v in net.buffers().items()}
    mask_iter = iter(masks)
    norm_masks = {}  # batch-norm key -> the channel mask applied after it (or None)

    def run(layers, prefix, h, pending):
        for i, layer in enumerate(layers):
            key = f"{prefix}{i}."
            kind = type(layer).__name__
            if kind == "Conv2d":
                m = torch.tensor(next(mask_iter).astype(np.float64))
                w = params[key + "weight"]
                if layer.granularity == "weight":
                    w = w * m.reshape(w.shape)
                    pending = None
                else:
                    pending = m[None, :, None, None]
                h = F.conv2d(h, w, params.get(key + "bias"), layer.stride, layer.padding)
                if pending is not None and not isinstance(layers[i + 1], BatchNorm2d):
                    h, pending = h * pending, None
            elif kind == "BatchNorm2d":
                norm_masks[key] = None if pending is None else pending.reshape(-1).numpy() > 0
                h = F.batch_norm(
                    h,
                    buffers[key + "running_mean"],
                    buffers[key + "running_var"],
                    params[key + "weight"],
                    params[key + "bias"],
                    training=training,
                    momentum=layer.momentum,
                    eps=layer.eps,
                )
                if pending is not None:
                    h, pending = h * pending, None
            elif kind == "ReLU":
                h = torch.relu(h)
            elif kind == "MaxPool2d":
                h = F.max_pool2d(h, layer.kernel_size, layer.stride, layer.padding)
            elif kind == "GlobalAvgPool2d":
                h = h.mean(dim=(2, 3))
            elif kind == "Flatten":
                h = h.flatten(1)
            elif kind == "Linear":
                h = F.linear(h, params[key + "weight"], params[key + "bias"])
            elif kind == "Residual":
                a, _ = run(layer.main.layers, key + "0.", h, None)
                s = (
                    h
                    if layer.shortcut is None
                    else run(layer.shortcut.layers, key + "1.", h, None)[0]
                )
                h = torch.relu(a + s)
            else:
                raise AssertionError(kind)
        return h, pending

    tx = torch.tensor(x.transpose(1, 0, 2, 3).copy(), requires_grad=True)
    logits, _ = run(net.layers, "", tx, None)
    return logits, tx, params, buffers, norm_masks


@pytest.mark.parametrize("name", list(NETS))
@pytest.mark.parametrize("granularity", ["channel", "weight"])
@pytest.mark.parametrize("training", [True, False])
def test_network_matches_pytorch(rng, name, granularity, training):
    torch = pytest.importorskip("torch")
    net = NETS[name](granularity)
    x = rng.standard_normal((1, 4, 6, 6))
    y = np.array([0, 2, 1, 1])
    masks = _masks(rng, net, "some")
    before = {k: v.copy() for k, v in net.buffers().items()}
    logits_t, tx, params, buffers, norm_masks = _torch_forward(torch, net, x, masks, training)
    loss_t = torch.nn.functional.cross_entropy(logits_t, torch.tensor(y), reduction="mean")
    loss_t.backward()
    mode = TRAIN if training else EVAL
    logits, caches = net._forward(x, masks, None, mode)
    loss, dlogits = softmax_cross_entropy(logits, y)
    dx, grads = net._backward(dlogits, caches, True)
    assert abs(loss - loss_t.item()) < 1e-12
    assert_close(logits, logits_t.detach().numpy().T, 1.0, np.float64, "logits")
    assert_close(dx, tx.grad.numpy().transpose(1, 0, 2, 3), 1.0, np.float64, "dx")
    for key, value in params.items():
        assert_close(grads[key], value.grad.numpy(), 1.0, np.float64, key)
    # Running statistics: PyTorch moves every channel; cpusparse leaves a dropped
    # channel's statistics alone (its output is 0 whatever they are).
    for key, value in buffers.items():
        got, expected = net.buffers()[key], value.numpy().copy()
        dropped = norm_masks[key[: key.rindex(".") + 1]]
        if training and dropped is not None:
            expected[~dropped] = before[key][~dropped]
        assert_close(got, expected, 1.0, np.float64, key)


def test_dropped_channels_are_known_zero_through_norm_and_pool(rng):
    net = small_vgg("channel")
    x = rng.standard_normal((1, 2, 6, 6))
    masks = [np.ones(n, dtype=bool) for n in net.n_units()]
    masks[1][:] = [True, False, True]
    _, caches, live = net._run(x, masks, None, TRAIN)
    # The conv after the max pool computes with the two kept channels only.
    assert caches[7].w_chans.tolist() == [0, 2] and caches[7].x.shape[0] == 2
    assert live is None  # the dense classifier's outputs
    bn_running = net.layers[4].running_mean.copy()
    net._run(x, masks, None, TRAIN)
    assert net.layers[4].running_mean[1] == bn_running[1]  # dropped: untouched
    assert net.layers[4].running_mean[0] != bn_running[0]  # kept: moved


@pytest.mark.parametrize("name", ["vgg", "resnet"])
def test_network_checkpoint_round_trip_keeps_buffers(rng, name):
    net = NETS[name]("channel")
    x = rng.standard_normal((1, 3, 6, 6))
    masks = _masks(rng, net, "some")
    net._forward(x, masks, None, TRAIN)  # move the running statistics
    again = Sequential.from_config(net.config(), net.arrays())
    for key, value in net.buffers().items():
        np.testing.assert_array_equal(again.buffers()[key], value)
    a, _ = net._forward(x, masks, None, EVAL)
    b, _ = again._forward(x, masks, None, EVAL)
    np.testing.assert_array_equal(a, b)
    assert sorted(again.arrays()) == sorted(net.arrays())


@pytest.mark.parametrize("norm_updates", ["once", "every_pass"])
def test_running_statistics_follow_one_or_every_pass(rng, norm_updates):
    # K = 3 passes with independent weight masks: "once" moves the first norm's
    # statistics by one momentum step from pass 0's batch, "every_pass" by three,
    # one per pass in order, as PyTorch's train-mode passes would.
    net = small_vgg("weight")
    config = TrainConfig(density=0.5, n_masks=3, norm_updates=norm_updates)
    _, data_rng, mask_rng = spawn_streams(0)
    state = init_state(net, config, data_rng=data_rng, mask_rng=mask_rng)
    conv, bn = net.layers[0], net.layers[1]
    mean, var = bn.running_mean.copy(), bn.running_var.copy()
    x = rng.standard_normal((1, 8, 6, 6)) + 1.0
    weight = conv.weight.copy()
    n0 = conv.units.n_units
    record = train_step(state, x, rng.integers(0, 3, 8), config, record=True).record
    passes = range(3) if norm_updates == "every_pass" else range(1)
    m = bn.momentum
    for k in passes:
        mask = record.masks[k, :n0].reshape(weight.shape)
        h = reference.conv2d_forward(x, weight * mask, conv.bias, stride=1, padding=1)
        flat = h.reshape(h.shape[0], -1)
        mean = (1 - m) * mean + m * flat.mean(axis=1)
        var = (1 - m) * var + m * flat.var(axis=1, ddof=1)
    assert_close(bn.running_mean, mean, 10.0, np.float64, "running_mean")
    assert_close(bn.running_var, var, 10.0, np.float64, "running_var")


def test_a_channel_sparse_cnn_learns_digits():
    # Real data: scikit-learn's 8x8 digits, a channel-sparse CNN with batch norm,
    # 8 epochs of VR-PGE at density 0.5, then 3 of fine-tuning on the kept channels
    # (the running statistics gathered under random masks do not fit one fixed mask
    # until then): the loss falls and accuracy beats chance (10 %) by far.
    from sklearn.datasets import load_digits

    from cpusparse.training.step import finetune_step

    digits = load_digits()
    x_all = (digits.images / 16.0).astype(np.float32)[None]  # (1, N, 8, 8)
    y_all = digits.target
    rng = np.random.default_rng(0)
    net = Sequential(
        [
            Conv2d.random(1, 8, 3, padding=1, bias=False, rng=1),
            BatchNorm2d.new(8),
            ReLU(),
            MaxPool2d(2),
            Conv2d.random(8, 16, 3, padding=1, bias=False, rng=2),
            BatchNorm2d.new(16),
            ReLU(),
            GlobalAvgPool2d(),
            Linear.random(16, 10, rng=3),
        ]
    )
    config = TrainConfig(density=0.5, lr=1e-2, score_lr=0.05)
    _, data_rng, mask_rng = spawn_streams(0)
    state = init_state(net, config, data_rng=data_rng, mask_rng=mask_rng)
    train, test = np.arange(0, 1400), np.arange(1400, len(y_all))

    def batches():
        order = rng.permutation(train)
        for start in range(0, len(order), 64):
            idx = order[start : start + 64]
            yield np.ascontiguousarray(x_all[:, idx]), y_all[idx]

    losses = [
        [float(train_step(state, xb, yb, config).losses.mean()) for xb, yb in batches()]
        for _ in range(8)
    ]
    assert abs(state.score.sum() - 0.5 * state.score.size) < 1e-4
    masks = [s >= 0.5 for s in np.split(state.score, state.offsets[1:-1])]
    for _ in range(3):
        for xb, yb in batches():
            finetune_step(state, xb, yb, masks, config)
    logits, _ = net._forward(np.ascontiguousarray(x_all[:, test]), masks, None, EVAL)
    accuracy = float((logits.argmax(axis=0) == y_all[test]).mean())
    assert np.mean(losses[-1]) < 0.5 * np.mean(losses[0])
    assert accuracy > 0.75, accuracy
    assert 0 < sum(int(m.sum()) for m in masks) < state.score.size


def test_cnn_training_steps_are_the_same_bits_on_one_and_two_threads(rng):
    # Batch norm, channel masks, a residual block: three steps with the K passes run
    # in parallel (two threads) or in turn (one) give the same parameters, buffers
    # and scores.
    from cpusparse._threads import numba_threads

    x = rng.standard_normal((1, 6, 6, 6))
    y = rng.integers(0, 3, 6)
    results = []
    for threads in (1, 2):
        net = small_resnet("channel")
        config = TrainConfig(density=0.6, n_masks=3)
        _, data_rng, mask_rng = spawn_streams(0)
        state = init_state(net, config, data_rng=data_rng, mask_rng=mask_rng)
        with numba_threads(threads):
            for _ in range(3):
                train_step(state, x, y, config)
        results.append(({**net.params(), **net.buffers()}, state.score.copy()))
    (a, sa), (b, sb) = results
    np.testing.assert_array_equal(sa, sb)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


@pytest.mark.parametrize("mode", [TRAIN, EVAL], ids=["train", "eval"])
def test_compact_activations_give_the_bits_of_full_ones(rng, mode):
    # Inside a container only the kept channels are stored between layers. Chaining
    # the layers' public (full-array, zeros-where-dropped) passes by hand must give the
    # same bits: outputs, every gradient and the running statistics.
    from cpusparse.models import vgg

    nets = [vgg((4, 6), (1, 6, 6), 3, dtype=np.float64, rng=s) for s in (0, 0)]
    x = rng.standard_normal((1, 5, 6, 6))
    masks = [rng.random(n) < 0.5 for n in nets[0].n_units()]
    masks[1][:] = False  # a layer that keeps nothing
    out, caches = nets[0].forward(x, masks, mode=mode)
    assert caches[0].out.shape[0] == int(masks[0].sum())  # stored compact
    g = rng.standard_normal(out.shape)
    _, grads = nets[0].backward(g, caches)

    h, live, by_hand, it = x, None, [], iter(masks)
    for layer in nets[1].layers:
        mask = next(it) if layer.units is not None else None
        h, cache = layer.forward(h, mask, live=live, mode=mode)
        by_hand.append(cache)
        live = layer.live_outputs(mask, live)
    np.testing.assert_array_equal(h, out)
    d, hand_grads = g, {}
    for i in range(len(nets[1].layers) - 1, -1, -1):
        d, layer_grads = nets[1].layers[i].backward(d, by_hand[i], need_dx=i > 0)
        hand_grads.update({f"{i}.{k}": v for k, v in layer_grads.items()})
    assert sorted(hand_grads) == sorted(grads)
    for name in grads:
        np.testing.assert_array_equal(grads[name], hand_grads[name], err_msg=name)
    for name, value in nets[0].buffers().items():
        np.testing.assert_array_equal(value, nets[1].buffers()[name], err_msg=name)


@pytest.mark.parametrize("first", ["relu", "norm", "conv"])
def test_a_straight_through_pass_with_live_inputs_computes_on_zeros(rng, first):
    # Straight-through computes every entry: the container runs on x with zeros outside
    # ``live`` (never on compact rows a layer would take for all of them), and the
    # input gradient is 0 there, as for any pass with ``live``.
    from cpusparse.engine.layers.base import STRAIGHT_THROUGH

    head = {
        "relu": ReLU(),
        "norm": BatchNorm2d.new(4, dtype=np.float64),
        "conv": Conv2d.random(4, 4, 1, dtype=np.float64, rng=2),
    }[first]
    layers = [head, Conv2d.random(4, 3, 3, padding=1, dtype=np.float64, rng=0)]
    layers += [GlobalAvgPool2d(), Linear.random(3, 2, dtype=np.float64, rng=1)]
    net = Sequential(layers)
    x = rng.standard_normal((4, 5, 8, 8))
    live = np.array([True, True, False, False])
    masks = [np.ones(n, dtype=bool) for n in net.n_units()]
    out, caches = net.forward(x, masks, live=live, mode=STRAIGHT_THROUGH)
    zeroed = x * live[:, None, None, None]
    ref, ref_caches = net.forward(zeroed, masks, mode=STRAIGHT_THROUGH)
    np.testing.assert_array_equal(out, ref)
    g = rng.standard_normal(out.shape)
    dx, grads = net.backward(g, caches, need_dx=True)
    ref_dx, ref_grads = net.backward(g, ref_caches, need_dx=True)
    np.testing.assert_array_equal(dx[live], ref_dx[live])
    assert np.all(dx[~live] == 0)
    for name in grads:
        np.testing.assert_array_equal(grads[name], ref_grads[name], err_msg=name)
