"""The CNN builders: vgg and resnet layouts, masks, known zeros, checkpoints, errors."""

import numpy as np
import pytest
from conftest import assert_close

from cpusparse.engine import Conv2d, Residual, Sequential
from cpusparse.engine.layers import EVAL, TRAIN
from cpusparse.models import count_macs, mlp, resnet, vgg


def _kinds(layers):
    return [type(layer).__name__ for layer in layers]


def test_vgg_layout_and_units():
    net = vgg((3, 5, 7), (2, 8, 8), 4, convs_per_stage=2, rng=0, dtype=np.float64)
    stage = ["Conv2d", "BatchNorm2d", "ReLU"] * 2
    assert _kinds(net.layers) == [
        *stage, "MaxPool2d", *stage, "MaxPool2d", *stage, "GlobalAvgPool2d", "Linear"
    ]  # fmt: skip
    assert net.n_units() == [3, 3, 5, 5, 7, 7]
    convs = net.prunable_layers()
    assert [c.n_in for c in convs] == [2, 3, 3, 5, 5, 7]
    assert all(c.bias is None and c.kernel_size == (3, 3) and c.padding == (1, 1) for c in convs)
    out, _ = net.forward(np.zeros((2, 3, 8, 8)))
    assert out.shape == (4, 3)


def test_resnet_layout_strides_and_shortcuts():
    net = resnet((4, 6, 8), (1, 8, 8), 3, blocks_per_stage=2, rng=0, dtype=np.float64)
    assert _kinds(net.layers) == [
        "Conv2d", "BatchNorm2d", "ReLU", *["Residual"] * 6, "GlobalAvgPool2d", "Linear"
    ]  # fmt: skip
    blocks = [layer for layer in net.layers if isinstance(layer, Residual)]
    # Stage 1 keeps its width (identity shortcuts); the first block of each later stage
    # has stride 2 and a 1x1 projection.
    shortcuts = [None if b.shortcut is None else b.shortcut.layers[0] for b in blocks]
    assert [s is None for s in shortcuts] == [True, True, False, True, False, True]
    strides = [b.main.layers[0].stride[0] for b in blocks]
    assert strides == [1, 1, 2, 1, 2, 1]
    assert shortcuts[2].kernel_size == (1, 1) and shortcuts[2].stride == (2, 2)
    # stem, 2 convs per block, plus the two projections
    assert net.n_masks == 1 + 2 * 6 + 2
    out, _ = net.forward(np.zeros((1, 2, 8, 8)))
    assert out.shape == (3, 2)


@pytest.mark.parametrize("build", [vgg, resnet])
@pytest.mark.parametrize("granularity", ["channel", "weight"])
def test_cnn_builders_train_and_eval_passes_and_checkpoint(rng, build, granularity):
    net = build((3, 4), (1, 6, 6), 5, granularity=granularity, density=0.5, rng=1)
    x = rng.standard_normal((1, 4, 6, 6)).astype(np.float32)
    masks = [rng.random(n) < 0.6 for n in net.n_units()]
    logits, caches = net.forward(x, masks, mode=TRAIN)
    assert np.isfinite(logits).all() and logits.shape == (5, 4)
    dx, grads = net.backward(np.ones_like(logits), caches, need_dx=True)
    assert sorted(grads) == sorted(net.params()) and dx.shape == x.shape
    again = Sequential.from_config(net.config(), net.arrays())
    a, _ = net.forward(x, masks, mode=EVAL)
    b, _ = again.forward(x, masks, mode=EVAL)
    np.testing.assert_array_equal(a, b)


def test_a_dropped_channel_is_skipped_by_the_next_convolution(rng):
    net = vgg((4,), (1, 5, 5), 2, convs_per_stage=2, rng=0, dtype=np.float64)
    x = rng.standard_normal((1, 3, 5, 5))
    masks = [np.array([True, False, True, False]), np.ones(4, dtype=bool)]
    _, caches = net.forward(x, masks)
    assert caches[3].w_chans.tolist() == [0, 2]  # the second conv reads two channels
    assert caches[3].x.shape[0] == 2  # ... stored alone, and the first writes them alone
    assert caches[0].out.shape[0] == 2
    # ... and computes what the dense network with those channels zeroed computes.
    h = x
    for i, layer in enumerate(net.layers[:3]):
        h, _ = layer._forward(h, masks[0] if i == 0 else None, None, TRAIN)
    h = h * masks[0][:, None, None, None]
    ref, _ = net.layers[3]._forward(h, None, None, TRAIN)
    assert_close(caches[3].out, ref, 1.0, np.float64)


def test_density_scales_the_fan_in_of_masked_layers():
    # Channel masks: the first conv sees every input channel, later ones a fraction.
    full = vgg((8, 8), (1, 8, 8), 2, rng=0, density=1.0).prunable_layers()
    half = vgg((8, 8), (1, 8, 8), 2, rng=0, density=0.25).prunable_layers()
    np.testing.assert_allclose(half[0].weight, full[0].weight)
    np.testing.assert_allclose(half[1].weight, 2.0 * full[1].weight, rtol=1e-6)


@pytest.mark.parametrize(
    ("call", "error", "match"),
    [
        (lambda: vgg((), (1, 8, 8), 2), ValueError, "widths must be a nonempty"),
        (lambda: vgg((4, 0), (1, 8, 8), 2), ValueError, r"widths\[1\] must be a positive int"),
        (lambda: vgg((4,), (8, 8), 2), ValueError, r"input_shape must be \(C, H, W\)"),
        (lambda: vgg((4, 4, 4, 4), (1, 4, 4), 2), ValueError, "too small for 4 stages"),
        (lambda: resnet((4,), (1, 8, 8), 2, granularity="neuron"), ValueError, "granularity"),
        (lambda: resnet((4,), (1, 8, 8), 0), ValueError, "n_classes must be a positive int"),
        (lambda: vgg(4, (1, 8, 8), 2), TypeError, "sequences of ints"),
        (lambda: vgg((4,), (1, 8, 8), 2, density=0), ValueError, "density"),
    ],
)
def test_cnn_builders_reject_bad_arguments(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_builders_return_conv_layers_in_pytorch_layout():
    net = resnet((2, 3), (3, 8, 8), 2, rng=0)
    for conv in net.prunable_layers():
        assert isinstance(conv, Conv2d)
        assert conv.weight.ndim == 4 and conv.weight.flags.c_contiguous


def test_a_channel_sparse_resnet_from_the_builder_learns_digits():
    # scikit-learn's 8x8 digits, resnet((8, 16)) at channel density 0.5: 8 epochs of
    # VR-PGE, 3 of fine-tuning on the kept channels; 0.91 measured, chance is 0.10.
    from sklearn.datasets import load_digits

    from cpusparse.training import TrainConfig
    from cpusparse.training.state import init_state, spawn_streams
    from cpusparse.training.step import finetune_step, train_step

    digits = load_digits()
    x_all = (digits.images / 16.0).astype(np.float32)[None]
    y_all = digits.target
    rng = np.random.default_rng(0)
    net = resnet((8, 16), (1, 8, 8), 10, density=0.5, rng=1)
    config = TrainConfig(density=0.5, lr=1e-2, score_lr=0.05)
    _, data_rng, mask_rng = spawn_streams(0)
    state = init_state(net, config, data_rng=data_rng, mask_rng=mask_rng)
    train, test = np.arange(1400), np.arange(1400, len(y_all))

    def batches():
        order = rng.permutation(train)
        for start in range(0, len(order), 64):
            idx = order[start : start + 64]
            yield np.ascontiguousarray(x_all[:, idx]), y_all[idx]

    for _ in range(8):
        for xb, yb in batches():
            train_step(state, xb, yb, config)
    masks = [s >= 0.5 for s in np.split(state.score, state.offsets[1:-1])]
    for _ in range(3):
        for xb, yb in batches():
            finetune_step(state, xb, yb, masks, config)
    logits, _ = net.forward(np.ascontiguousarray(x_all[:, test]), masks, mode=EVAL)
    accuracy = float((logits.argmax(axis=0) == y_all[test]).mean())
    kept = sum(int(m.sum()) for m in masks)
    assert accuracy > 0.8, accuracy
    assert 0 < kept < state.score.size


def test_vrpge_is_unbiased_on_a_tiny_cnn_with_batch_norm():
    # The paper's setting in miniature: two channel-masked convolutions with batch norm
    # (6 channels, 64 masks), the loss of a real batch in train mode. The enumeration
    # oracle gives the exact gradient of the expected loss; the mean of 20,000 VR-PGE
    # estimates (K = 2) lies within 4 standard errors of it in every coordinate, and a
    # 1/K normalisation would not.
    from cpusparse.engine.losses import softmax_cross_entropy
    from cpusparse.method import exact_grad, sample_masks, vrpge_grad
    from cpusparse.method.exact import _all_masks

    rng = np.random.default_rng(0)
    net = vgg((3,), (1, 5, 5), 2, convs_per_stage=2, dtype=np.float64, rng=2)
    x = rng.standard_normal((1, 6, 5, 5))
    y = np.array([0, 1, 1, 0, 1, 0])
    sizes = net.n_units()
    mode = TRAIN._replace(update_stats=False)

    def loss_fn(mask):
        masks = np.split(mask, np.cumsum(sizes)[:-1])
        logits, _ = net._forward(x, masks, None, mode)
        return softmax_cross_entropy(logits, y)[0]

    score = np.array([0.3, 0.6, 0.8, 0.5, 0.2, 0.7])
    expected = exact_grad(loss_fn, score)
    # Every mask's loss once; the draws look theirs up.
    table = {m.tobytes(): loss_fn(m) for m in _all_masks(6)}
    n_draws, k = 20_000, 2
    draws = sample_masks(score, n_draws * k, rng=1).reshape(n_draws, k, 6)
    losses = np.array([[table[m.tobytes()] for m in pair] for pair in draws])
    estimates = np.array([vrpge_grad(losses[d], draws[d], score) for d in range(n_draws)])
    mean = estimates.mean(axis=0)
    se = estimates.std(axis=0, ddof=1) / np.sqrt(n_draws)
    z = np.abs(mean - expected) / se
    assert np.all(z < 4.0), z
    assert np.any(np.abs(mean * (k - 1) / k - expected) / se > 4.0)
    # A dropped channel changes the loss: the gradient is not trivially zero.
    assert np.all(np.abs(expected) > 0)


def test_named_leaves_are_the_prefixes_of_the_parameter_names():
    net = resnet((4, 8), (1, 8, 8), 10, rng=0)
    leaves = list(net.named_leaves())
    names = [name for name, _ in leaves]
    assert names[:4] == ["0", "1", "2", "3.0.0"] and "4.1.0" in names  # a projection
    expected = {f"{name}.{key}" for name, layer in leaves for key in layer.params()}
    assert expected == set(net.params())
    assert [layer for _, layer in leaves if layer.units is not None] == net.prunable_layers()
    conv = net.prunable_layers()[0]
    assert list(conv.named_leaves("x.")) == [("x", conv)]


def test_vgg_takes_one_count_of_convolutions_per_stage():
    # VGG-19's layout is 2, 2, 4, 4, 4 convolutions per stage.
    net = vgg((2, 4, 8, 8, 8), (3, 32, 32), 10, convs_per_stage=(2, 2, 4, 4, 4), rng=0)
    convs = net.prunable_layers()
    assert [c.n_out for c in convs] == [2, 2, 4, 4] + [8] * 12
    assert net.forward(np.zeros((3, 2, 32, 32), np.float32))[0].shape == (10, 2)
    with pytest.raises(ValueError, match=r"one count per stage \(2, one per width\), got \[2\]"):
        vgg((2, 4), (1, 8, 8), 10, convs_per_stage=[2])
    with pytest.raises(ValueError, match=r"convs_per_stage\[1\] must be a positive int"):
        vgg((2, 4), (1, 8, 8), 10, convs_per_stage=(2, 0))


def _masks(*bits):
    return [np.array(b, dtype=bool) for b in bits]


def test_macs_of_a_tiny_vgg_match_a_hand_count():
    # vgg((2, 4)) on 1x6x6: conv 1->2, conv 2->2 (6x6), pool to 3x3, conv 2->4, conv 4->4,
    # global pool, linear 4->3 (dense, on the 2 channels the last conv kept).
    net = vgg((2, 4), (1, 6, 6), 3, rng=0)
    masks = _masks([1, 0], [1, 1], [1, 0, 1, 0], [0, 0, 1, 1])
    macs = count_macs(net, masks, (1, 6, 6))
    hand = [
        1 * 1 * 9 * 36,  # 1 kept filter on the 1 input channel
        2 * 1 * 9 * 36,  # 2 kept filters on the 1 live channel of conv 0
        2 * 2 * 9 * 9,  # after the pool: 2 kept on 2 live
        2 * 2 * 9 * 9,  # 2 kept on the 2 channels conv 2 kept
        2 * 3,
    ]
    assert [m for _, m in macs["layers"]] == hand
    assert macs["total"] == sum(hand) == 1626
    assert macs["conv"] == sum(hand[:4])
    dense = 2 * 9 * 36 + 4 * 9 * 36 + 8 * 9 * 9 + 16 * 9 * 9 + 12
    assert count_macs(net, None, (1, 6, 6))["total"] == dense


def test_macs_of_a_residual_block_follow_the_live_channels():
    # Stem 1->4, block conv 4->4 and conv 4->4 with an identity shortcut, on 1x4x4.
    net = resnet((4,), (1, 4, 4), 10, rng=0)
    masks = _masks([1, 1, 0, 0], [0, 0, 0, 1], [0, 1, 1, 0])
    macs = count_macs(net, masks, (1, 4, 4))
    # The classifier reads the sum's live channels: the stem's 2 and the block's 2 (3 in all).
    hand = [2 * 1 * 9 * 16, 1 * 2 * 9 * 16, 2 * 1 * 9 * 16, 3 * 10]
    assert [m for _, m in macs["layers"]] == hand


def test_macs_name_the_layers_by_path_and_need_a_spatial_size_for_a_cnn():
    net = resnet((4,), (1, 4, 4), 10, rng=0)
    names = [name for name, _ in count_macs(net, None, (1, 4, 4))["layers"]]
    assert names == [name for name, layer in net.named_leaves() if layer.n_active()]
    assert names[1].startswith("3.0.")  # inside the residual block's main branch
    with pytest.raises(ValueError, match="a convolution needs inputs of a spatial size"):
        count_macs(net, None, None)
    with pytest.raises(ValueError, match=r"one entry per prunable layer \(3\), got 2"):
        count_macs(net, [None, None], (1, 4, 4))
    # An MLP: the kept weights of each layer on its live inputs.
    mlp_net = mlp(6, (4,), 3, granularity="neuron", rng=0)
    keep = np.array([1, 0, 1, 0], dtype=bool)
    # 2 kept neurons x 6 inputs, then the classifier on the 2 live inputs.
    assert count_macs(mlp_net, [keep], None)["total"] == 2 * 6 + 2 * 3
