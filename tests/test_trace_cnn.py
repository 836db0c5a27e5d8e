"""Golden traces of CNNs: VGG and ResNet traces, their PyTorch replay, verify, goldens.

Run ``python tests/test_trace_cnn.py`` to (re)write the golden CNN traces of
``tests/data`` (``GOLDEN``) after a deliberate change of the format or the engine.
"""

import hashlib
import json
import pathlib
import re
import sys

import numpy as np
import pytest

from cpusparse.tools.cli import main
from cpusparse.tools.trace import (
    FORMAT_VERSION,
    compare_traces,
    describe_format,
    load_trace,
    make_trace,
    write_trace,
)

pytestmark = pytest.mark.usefixtures("one_numba_thread")

DATA = pathlib.Path(__file__).parent / "data"

# Small and quick: two stages, 8x8 images, two steps.
VGG = dict(model="vgg", widths=(2, 4), input_shape=(3, 8, 8), n_classes=5, steps=2,
           batch_size=3, n_data=12, n_masks=2, initial_score=0.6)  # fmt: skip
RESNET = {**VGG, "model": "resnet"}

# The layouts GPU ports build, on 3x32x32 images: VGG-19's (5 stages of 2, 2, 4, 4, 4
# convolutions) at the paper's settings, and ResNet-20's (3 stages of 3 basic blocks)
# at the authors' settings, whose K passes each update the batch norms.
_GOLDEN_COMMON = dict(input_shape=(3, 32, 32), n_classes=10, steps=1, batch_size=2,
                      n_data=8, n_masks=2, initial_score=0.6)  # fmt: skip
GOLDEN = {
    "golden_v3_vgg19_channel_adam_f64": dict(
        model="vgg", widths=(2, 4, 8, 8, 8), convs_per_stage=(2, 2, 4, 4, 4), **_GOLDEN_COMMON
    ),
    "golden_v3_resnet20_authors_every_pass_f64": dict(
        model="resnet",
        widths=(2, 4, 8),
        blocks_per_stage=3,
        preset="authors",
        norm_updates="every_pass",
        **_GOLDEN_COMMON,
    ),  # fmt: skip
}
VERSION_KEYS = ("meta/cpusparse_version", "meta/numpy_version", "meta/numba_version")


def _replay():
    return pytest.importorskip("cpusparse.testing.replay_torch").replay


@pytest.fixture(scope="module")
def vgg_trace():
    return make_trace(**VGG)


@pytest.fixture(scope="module")
def resnet_trace():
    return make_trace(**RESNET)


def _layers(trace):
    return json.loads(str(trace["meta/layers"]))


# ---------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------


def test_vgg_layout_names_and_shapes(vgg_trace):
    t = vgg_trace
    layers = _layers(t)
    types = [la["type"] for la in layers]
    assert types == ["Conv2d", "BatchNorm2d", "ReLU"] * 2 + ["MaxPool2d"] + [
        "Conv2d", "BatchNorm2d", "ReLU"
    ] * 2 + ["GlobalAvgPool2d", "Linear"]  # fmt: skip
    assert [la["path"] for la in layers] == [str(i) for i in range(len(layers))]
    assert json.loads(str(t["meta/blocks"])) == []
    assert t["step0/x"].shape == (3, 3, 8, 8)  # (N, C, H, W)
    assert t["step0/layer0/weight"].shape == (2, 3, 3, 3)  # (C_out, C_in, kh, kw)
    assert t["step0/layer0/pattern"].shape == (2, 3, 3, 3) and t["step0/layer0/pattern"].all()
    assert t["step0/layer7/weight_grad_per_pass"].shape == (2, 4, 2, 3, 3)
    assert t["step0/layer0/masks"].shape == (2, 2)  # K x C_out: channel granularity
    assert "step0/layer0/bias" not in t  # convolutions before a batch norm have no bias
    assert "step0/layer2/weight" not in t  # a ReLU stores nothing but takes a number
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert t[f"step1/layer8/{name}"].shape == (4,)
    np.testing.assert_array_equal(t["step0/layer1/running_var"], 1.0)
    assert layers[1]["mask_order"] == "after_norm" and layers[1]["momentum"] == 0.1
    options = json.loads(str(t["meta/options"]))
    assert options["model"] == "vgg" and options["input_shape"] == [3, 8, 8]
    assert "layers" not in options and "sparse_classifier" not in options
    assert int(t["meta/format_version"]) == FORMAT_VERSION == 3
    assert "(n_batch, C, H, W)" in str(t["meta/cnn_conventions"])


def test_steps_chain_the_running_statistics(vgg_trace):
    t = vgg_trace
    for i in (1, 4, 8, 11):
        for stat in ("running_mean", "running_var"):
            before, after = t[f"step0/layer{i}/{stat}"], t[f"step0/layer{i}/{stat}_updated"]
            np.testing.assert_array_equal(t[f"step1/layer{i}/{stat}"], after)
            # A channel dropped in pass 0 (the only update, norm_updates="once") keeps
            # its statistics (mask_order="after_norm"); a kept one moves.
            kept = t[f"step0/layer{i - 1}/masks"][0]
            np.testing.assert_array_equal(after[~kept], before[~kept])
            assert np.all(after[kept] != before[kept])


def test_resnet_blocks_paths_and_parameter_order(resnet_trace):
    t = resnet_trace
    layers = _layers(t)
    blocks = json.loads(str(t["meta/blocks"]))
    assert [(b["path"], b["main"], b["shortcut"]) for b in blocks] == [
        ("3", [3, 4, 5, 6, 7], None),
        ("4", [8, 9, 10, 11, 12], [13, 14]),
    ]
    assert [la["path"] for la in layers[12:16]] == ["4.0.4", "4.1.0", "4.1.1", "5"]
    # The nested layers are reached: the shortcut's 1x1 convolution has stride 2 and
    # a mask of its own, after those of the main branch.
    assert layers[13]["type"] == "Conv2d" and layers[13]["stride"] == [2, 2]
    assert t["step0/layer13/weight"].shape == (4, 2, 1, 1) and "step0/layer13/masks" in t
    prunable = [la["index"] for la in layers if la["prunable"]]
    assert prunable == [0, 3, 6, 8, 11, 13]
    assert int(t["meta/n_units"]) == sum(t[f"step0/layer{i}/score"].size for i in prunable)


# ---------------------------------------------------------------------------
# The PyTorch replay
# ---------------------------------------------------------------------------


def test_vgg_and_resnet_replay_in_pytorch(vgg_trace, resnet_trace):
    replay = _replay()
    for trace in (vgg_trace, resnet_trace):
        assert max(float(trace[f"step{s}/threshold"]) for s in range(2)) > 0  # projection
        masks = trace["step1/layer3/masks"]
        assert masks.any() and not masks.all()  # some channels dropped, some kept
        assert replay(trace) == []


@pytest.mark.parametrize(
    "options",
    [
        dict(RESNET, norm_updates="every_pass", n_masks=3),
        dict(VGG, granularity="weight", mask_order="before_norm", prune_first=False),
        dict(RESNET, preset="authors", dtype="float32"),
    ],
    ids=["resnet-every-pass-k3", "vgg-weight-before-norm-dense-first", "resnet-authors-f32"],
)
def test_options_replay_in_pytorch(options):
    replay = _replay()
    trace = make_trace(**options)
    layers = _layers(trace)
    if options.get("prune_first") is False:
        assert not layers[0]["prunable"] and "step0/layer0/score" not in trace
    if options.get("granularity") == "weight":
        assert trace["step0/layer3/masks"].shape == (2, 2, 2, 3, 3)
    assert replay(trace) == []


def test_every_pass_is_k_updates(resnet_trace):
    # The same trace with norm_updates="every_pass" moves the statistics K times, and
    # a replay told the wrong mode names the running statistics.
    replay = _replay()
    every = make_trace(**RESNET, norm_updates="every_pass")
    assert json.loads(str(every["meta/config"]))["norm_updates"] == "every_pass"
    once, name = resnet_trace, "step0/layer1/running_mean_updated"
    np.testing.assert_array_equal(
        every["step0/layer1/running_mean"], once["step0/layer1/running_mean"]
    )
    assert not np.allclose(every[name], once[name])
    wrong = dict(every)
    wrong["meta/config"] = np.array(str(every["meta/config"]).replace("every_pass", "once"))
    failures = replay(wrong)
    assert failures and all("running_" in f for f in failures), failures
    assert any(f.startswith(name) for f in failures)


@pytest.mark.parametrize(
    "name",
    [
        "step0/layer6/weight_grad_per_pass",  # a conv inside a residual block
        "step1/layer14/bias_grad_mean",  # the batch norm of a shortcut
        "step0/layer4/running_var_updated",
        "step1/layer13/weight_updated",
        "step0/layer11/dscore",
    ],
)
def test_replay_names_a_broken_array(resnet_trace, name):
    replay = _replay()
    bad = dict(resnet_trace)
    bad[name] = resnet_trace[name] * (1 + 1e-9) + 1e-9
    failures = replay(bad)
    assert failures and failures[0].startswith(name), failures
    report = compare_traces(resnet_trace, bad)
    assert [m.name for m in report.mismatches] == [name]


def test_a_swapped_channel_mask_is_named(vgg_trace):
    replay = _replay()
    bad = dict(vgg_trace)
    name = "step0/layer7/masks"
    bad[name] = vgg_trace[name][::-1].copy()  # the two passes' masks swapped
    assert not np.array_equal(bad[name], vgg_trace[name])
    failures = replay(bad)
    assert failures[0].startswith(name), failures
    assert [m.name for m in compare_traces(vgg_trace, bad).mismatches] == [name]


def test_replay_free_refuses_cnn_traces(vgg_trace):
    rt = pytest.importorskip("cpusparse.testing.replay_torch")
    run = rt.replay_free(vgg_trace)
    assert run.trace == {} and len(run.errors) == 1
    assert "CNN trace" in run.errors[0] and "replay()" in run.errors[0]
    with pytest.raises(ValueError, match="must be an MLP trace"):
        rt.float32_tolerances(vgg_trace)


# ---------------------------------------------------------------------------
# Golden traces
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("stem", sorted(GOLDEN))
def test_golden_cnn_trace_rewrites_byte_for_byte(stem, tmp_path):
    path = DATA / f"{stem}.npz"
    assert path.stat().st_size < 750_000  # float64, about 700 arrays (VGG-19: 16 convolutions)
    ref = load_trace(path)
    options = json.loads(str(ref["meta/options"]))
    expected = {k: list(v) if isinstance(v, tuple) else v for k, v in GOLDEN[stem].items()}
    assert {k: options[k] for k in expected} == expected
    again = tmp_path / "again.npz"
    trace = write_trace(again, **options)  # the trace's own record of its options
    assert list(trace) == list(ref)
    report = compare_traces(ref, trace, rtol=0, atol=0)
    assert report.ok, report.format()
    same_versions = all(str(ref[k]) == str(trace[k]) for k in VERSION_KEYS)
    if same_versions:  # the versions are written in the file, so then every byte agrees
        assert again.read_bytes() == path.read_bytes()
    # PyTorch's float64 products round differently: through VGG-19's 16 convolutions
    # the first layers' weight gradients differ by up to 7e-14 (atol 1e-14 by default).
    atol = 1e-13 if "vgg19" in stem else None
    assert _replay()(ref, atol=atol) == []


def test_golden_cnn_traces_hold_the_layouts():
    vgg = load_trace(DATA / "golden_v3_vgg19_channel_adam_f64.npz")
    convs = [la for la in _layers(vgg) if la["type"] == "Conv2d"]
    assert len(convs) == 16 and vgg["step0/x"].shape == (2, 3, 32, 32)  # VGG-19's
    assert [c["n_out"] for c in convs] == [2] * 2 + [4] * 2 + [8] * 12
    resnet = load_trace(DATA / "golden_v3_resnet20_authors_every_pass_f64.npz")
    blocks = json.loads(str(resnet["meta/blocks"]))
    convs = [la for la in _layers(resnet) if la["type"] == "Conv2d"]
    assert len(blocks) == 9 and len(convs) == 1 + 2 * 9 + 2  # stem, blocks, shortcuts
    assert [b["shortcut"] is not None for b in blocks] == [False] * 3 + [True, False, False] * 2
    assert json.loads(str(resnet["meta/config"]))["norm_updates"] == "every_pass"


# ---------------------------------------------------------------------------
# Command line: cpusparse trace --model and cpusparse verify
# ---------------------------------------------------------------------------

CLI_VGG = ["--model", "vgg", "--widths", "2,4", "--input-shape", "3,8,8", "--n-classes",
           "5", "--steps", "2", "--batch-size", "3", "--n-data", "12", "--n-masks", "2",
           "--initial-score", "0.6"]  # fmt: skip


def test_trace_cli_writes_the_api_trace(tmp_path, capsys):
    out = tmp_path / "vgg.npz"
    assert main(["trace", str(out), *CLI_VGG]) == 0
    assert "vgg widths 2,4 on 3x8x8 images" in capsys.readouterr().out
    report = compare_traces(make_trace(**VGG), out, rtol=0, atol=0)
    assert report.ok and not report.notes, report.format()
    resnet = tmp_path / "resnet.npz"
    args = ["--model", "resnet", "--blocks-per-stage", "2", "--no-prune-first", "--steps", "1"]
    assert main(["trace", str(resnet), *args, "--granularity", "weight"]) == 0
    trace = load_trace(resnet)
    options = json.loads(str(trace["meta/options"]))
    assert options["blocks_per_stage"] == 2 and options["prune_first"] is False
    assert options["granularity"] == "weight" and not _layers(trace)[0]["prunable"]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--model", "vgg", "--widths", "0"], "argument --widths: must be positive ints"),
        (["--model", "vgg", "--input-shape", "3,32"], "--input-shape must be C,H,W"),
        (["--model", "foo"], "argument --model: invalid choice: 'foo'"),
        (["--model", "vgg", "--input-shape", "3,4,4", "--widths", "2,2,2,2"], "too small"),
        (["--model", "resnet", "--blocks-per-stage", "0"], "--blocks-per-stage must be"),
        (["--model", "resnet", "--convs-per-stage", "2"], "--convs-per-stage is for"),
        (["--model", "vgg", "--widths", "2,4", "--convs-per-stage", "1,2,3"], "one per stage"),
        (["--model", "vgg", "--granularity", "neuron"], "--granularity must be channel or"),
        (["--model", "vgg", "--layers", "4,3,2"], "--layers is for --model mlp"),
        (["--widths", "2,4"], "--widths is for --model vgg or resnet"),
    ],
)
def test_trace_cli_bad_flags_exit_2_with_one_line(tmp_path, capsys, args, fragment):
    out = tmp_path / "t.npz"
    assert main(["trace", str(out), *args]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    assert lines[0].startswith("cpusparse trace: error:") and fragment in lines[0], lines[0]
    assert not out.exists()


def test_verify_cnn_traces(tmp_path, capsys, vgg_trace):
    ref = tmp_path / "ref.npz"
    assert main(["trace", str(ref), *CLI_VGG]) == 0
    assert main(["verify", str(ref), str(ref)]) == 0
    assert "OK: all arrays agree" in capsys.readouterr().out
    other = dict(load_trace(ref))
    name = "step1/layer7/weight_grad_mean"  # a conv weight gradient, (C_out, C_in, kh, kw)
    other[name] = other[name].copy()
    other[name][3, 1, 2, 0] += 1e-6
    np.savez(tmp_path / "other.npz", **other)
    assert main(["verify", str(ref), str(tmp_path / "other.npz")]) == 1
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if name in line)
    assert row.startswith("value") and "(3, 1, 2, 0)" in row and "   1     7  " in row, row
    assert "FAIL: 1 of" in out


# ---------------------------------------------------------------------------
# Documentation
# ---------------------------------------------------------------------------


def test_format_page_lists_every_cnn_array(vgg_trace, resnet_trace):
    documented = set(re.findall(r"``([a-z0-9_/<>]+)``", describe_format()))
    sgd = make_trace(**{**RESNET, "steps": 1}, optimizer="sgd", score_optimizer="sgd")
    for trace in (vgg_trace, resnet_trace, sgd):
        for name in trace:
            generic = re.sub(r"step\d+", "step<s>", re.sub(r"layer\d+", "layer<l>", name))
            assert generic in documented, f"{generic} is not documented in trace_format.rst"


def _write_goldens():  # pragma: no cover - run by hand
    for stem, options in GOLDEN.items():
        path = DATA / f"{stem}.npz"
        write_trace(path, **options)
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        print(f"wrote {path} ({path.stat().st_size} bytes, sha256 {digest})")


if __name__ == "__main__":  # pragma: no cover
    from cpusparse._threads import numba_threads

    with numba_threads(1):
        _write_goldens()
    sys.exit(0)
