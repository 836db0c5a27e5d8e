"""Hostile inputs: the command line and checkpoint files, as a new user and an attacker try them.

The command-line cases run the real program in a subprocess (``python -m
cpusparse.tools.cli``, and the installed ``cpusparse`` script for some): each error
must be one line on stderr naming the argument or file, never a traceback, with exit
status 2 for a usage error, 1 for a failure and 130 for Ctrl-C. The cases are
independent and start their processes concurrently (most of their time is importing
scikit-learn).
"""

import concurrent.futures
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from cpusparse.models import mlp
from cpusparse.training import TrainConfig, fixed_mask, init_state, run_epoch, spawn_streams
from cpusparse.training.checkpoint import (
    CheckpointError,
    load_checkpoint,
    restore_state,
    save_checkpoint,
)

ROOT = hasattr(os, "geteuid") and os.geteuid() == 0
CLI = [sys.executable, "-m", "cpusparse.tools.cli"]
SCRIPT = shutil.which("cpusparse")
ENV = dict(os.environ, NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1")
TRAIN = ["train", "--quiet", "--epochs", "1", "--finetune-epochs", "0", "--hidden", "8"]
CNN_TRAIN = ["train", "--model", "vgg", "--widths", "4", "--quiet", "--epochs", "1"]
CNN_TRAIN += ["--finetune-epochs", "0"]
BENCH = ["bench", "--quick", "--arch", "8,6,4:4", "--densities", "0.5", "--repeats", "1"]
BENCH += ["--warmup", "0", "--no-startup", "--baselines", "dense-engine"]


def run_cli(argv, cwd, *, script=False, timeout=300):
    command = [SCRIPT] if script and SCRIPT else CLI
    return subprocess.run(
        [*command, *map(str, argv)],
        cwd=cwd,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def one_line_error(result, status, *fragments):
    """The only line of stderr; checks the status, no traceback and the fragments."""
    assert "Traceback" not in result.stderr, result.stderr
    assert result.returncode == status, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert str(fragment) in lines[0], (fragment, lines[0])
    return lines[0]


def make_device(path):
    os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    return path


def edit_checkpoint(src, dst, meta=None, arrays=None):
    """Copy a checkpoint with metadata fields (dotted paths) and arrays changed."""
    with np.load(src) as npz:
        data = {name: npz[name] for name in npz.files}
    doc = json.loads(str(data["meta"]))
    for key, value in (meta or {}).items():
        parent = doc
        *parts, last = key.split(".")
        for part in parts:
            parent = parent[int(part)] if isinstance(parent, list) else parent[part]
        index = int(last) if isinstance(parent, list) else last
        parent[index] = value(parent[index]) if callable(value) else value
    for name, change in (arrays or {}).items():
        if change is None:
            del data[name]
        else:
            data[name] = change(data.get(name))
    data["meta"] = np.array(json.dumps(doc))
    np.savez(dst, **data)
    return dst


def write_file(path, data):
    path.write_bytes(data)
    return path


def npy_named_npz(path):
    with open(path, "wb") as f:
        np.save(f, np.zeros((2, 28, 28), np.uint8))
    return path


def fake_mnist(path, dtype=np.uint8, n=50):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(n, 28, 28)).astype(dtype)
    np.savez(path, x_train=x, y_train=np.arange(n) % 10)
    return path


def corrupt_member(path):
    fake_mnist(path)
    data = bytearray(path.read_bytes())
    data[300:340] = b"x" * 40  # inside x_train: the CRC no longer matches
    path.write_bytes(bytes(data))
    return path


# ---------------------------------------------------------------------------
# The cases: setup(dir, shared) -> argv (None: skipped), exit status, message fragments
# ---------------------------------------------------------------------------


def _root_only(setup):
    return setup if ROOT else (lambda d, s: None)


def _device_case(flag):
    def setup(d, s):
        return [*TRAIN, flag, make_device(d / "null")]

    return _root_only(setup)


def _copy(s, name, d, new="run.npz"):
    shutil.copy(s / name, d / new)
    return d / new


CASES = {
    # 1. devices are not replaced (a node made in the test's directory, not /dev/null)
    "checkpoint_device": (_device_case("--checkpoint"), 2, ["--checkpoint", "character device"]),
    "json_device": (_device_case("--json"), 2, ["--json", "is a character device"]),
    # 2. every output path is checked before the work starts
    "checkpoint_missing_dir": (
        lambda d, s: [*TRAIN, "--checkpoint", d / "none" / "run.npz"],
        2,
        ["--checkpoint", "directory", "none does not exist"],
    ),
    "checkpoint_parent_is_a_file": (
        lambda d, s: [*TRAIN, "--checkpoint", write_file(d / "f.txt", b"x") / "run.npz"],
        2,
        ["--checkpoint", "f.txt is a regular file, not a directory"],
    ),
    "checkpoint_is_a_directory": (
        lambda d, s: [*TRAIN, "--checkpoint", d],
        2,
        ["--checkpoint", "is a directory, not a regular file"],
    ),
    "json_missing_dir": (
        lambda d, s: [*TRAIN, "--json", d / "none" / "m.json"],
        2,
        ["--json", "none does not exist"],
    ),
    "json_parent_is_a_file": (
        lambda d, s: [*TRAIN, "--json", write_file(d / "f.txt", b"x") / "m.json"],
        2,
        ["--json", "f.txt is a regular file, not a directory"],
    ),
    "json_is_a_directory": (lambda d, s: [*TRAIN, "--json", d], 2, ["--json", "is a directory"]),
    "json_dangling_symlink": (
        lambda d, s: [*TRAIN, "--json", _symlink(d / "m.json", d / "gone" / "m.json")],
        2,
        ["--json", "is a symlink to", "which does not exist"],
    ),
    "json_same_as_checkpoint": (
        lambda d, s: [*TRAIN, "--json", d / "x", "--checkpoint", d / "x"],
        2,
        ["--json", "--checkpoint", "are the same file"],
    ),
    "trace_missing_dir": (
        lambda d, s: ["trace", d / "none" / "t.npz", "--steps", "1"],
        2,
        ["cpusparse trace", "none does not exist"],
    ),
    "trace_is_a_directory": (
        lambda d, s: ["trace", d, "--steps", "1"],
        2,
        ["cpusparse trace", "is a directory"],
    ),
    "trace_device": (
        _root_only(lambda d, s: ["trace", make_device(d / "null"), "--steps", "1"]),
        2,
        ["cpusparse trace", "character device"],
    ),
    "bench_missing_parent": (
        lambda d, s: [*BENCH, "--out", d / "none" / "out"],
        2,
        ["cpusparse bench", "--out", "none does not exist"],
    ),
    "bench_out_is_a_file": (
        lambda d, s: [*BENCH, "--out", write_file(d / "f.txt", b"x")],
        2,
        ["--out", "is a regular file, not a directory"],
    ),
    "bench_json_is_a_directory": (
        lambda d, s: [*BENCH, "--out", _mkdirs(d / "out" / "bench.json").parent],
        2,
        ["--out", "bench.json: is a directory"],
    ),
    "checkpoint_empty_name": (
        lambda d, s: [*TRAIN, "--checkpoint", ""],
        2,
        ["--checkpoint '': expected a file name, got ''"],
    ),
    "checkpoint_symlink_loop": (
        lambda d, s: [*TRAIN, "--checkpoint", _symlink(d / "loop", "loop")],
        2,
        ["--checkpoint", "is a symlink that cannot be resolved"],
    ),
    # 3. an existing checkpoint is not replaced without --resume or --overwrite
    "checkpoint_exists": (
        lambda d, s: [*TRAIN, "--checkpoint", _copy(s, "good.npz", d)],
        2,
        ["--checkpoint", "exists", "--resume", "--overwrite"],
    ),
    # 4. and 5. resume errors: one line, naming the file, with the right diagnosis
    "resume_truncated": (
        lambda d, s: _resume(write_file(d / "run.npz", (s / "good.npz").read_bytes()[:-500])),
        1,
        ["run.npz", "is not a valid .npz (zip) archive"],
    ),
    "resume_empty": (
        lambda d, s: _resume(write_file(d / "run.npz", b"")),
        1,
        ["run.npz", "is empty"],
    ),
    "resume_random_bytes": (
        lambda d, s: _resume(write_file(d / "run.npz", np.random.default_rng(1).bytes(4096))),
        1,
        ["run.npz", "is not a valid .npz (zip) archive"],
    ),
    "resume_text": (
        lambda d, s: _resume(write_file(d / "run.npz", b"epoch=3\n")),
        1,
        ["run.npz", "is not a valid .npz (zip) archive"],
    ),
    "resume_npy": (
        lambda d, s: _resume(npy_named_npz(d / "run.npz")),
        1,
        ["run.npz", "is a .npy file"],
    ),
    "resume_pickled": (
        lambda d, s: _resume(_pickled(d / "run.npz")),
        1,
        ["run.npz", "pickled (object) array"],
    ),
    "resume_other_version": (
        lambda d, s: _resume(edit_checkpoint(s / "good.npz", d / "run.npz", {"format_version": 1})),
        1,
        ["run.npz", "format version 1", "reads versions 2, 3"],
    ),
    "resume_budget": (
        lambda d, s: _resume(edit_checkpoint(s / "good.npz", d / "run.npz", {"budget": 1e9})),
        1,
        ["run.npz", "budget"],
    ),
    "resume_negative_epoch": (
        lambda d, s: _resume(edit_checkpoint(s / "good.npz", d / "run.npz", {"epoch": -5})),
        1,
        ["run.npz", "epoch must be an int >= 0, got -5"],
    ),
    "resume_other_parameters": (
        lambda d, s: _resume(_copy(s, "good.npz", d), "--density", "0.2"),
        2,
        ["run.npz", "other parameters", "density: 0.1 != 0.2"],
    ),
    "resume_other_data": (
        lambda d, s: [
            *_resume(_copy(s, "good.npz", d)),
            "--dataset",
            "mnist",
            "--data-path",
            fake_mnist(d / "mnist.npz"),
        ],
        2,
        ["run.npz", "other training data"],
    ),
    # a CNN run: the same checks, and its own settings
    "cnn_resume_other_architecture": (
        lambda d, s: [
            *CNN_TRAIN[:2],
            "resnet",
            *CNN_TRAIN[3:],
            "--checkpoint",
            _copy(s, "cnn.npz", d),
            "--resume",
        ],
        2,
        ["run.npz", "architecture: 'vgg' != 'resnet'"],
    ),
    "cnn_resume_mlp_checkpoint": (
        lambda d, s: [*CNN_TRAIN, "--checkpoint", _copy(s, "good.npz", d), "--resume"],
        2,
        ["run.npz", "was written by SparseMLPClassifier, not SparseCNNClassifier"],
    ),
    "cnn_json_is_a_directory": (
        lambda d, s: [*CNN_TRAIN, "--json", d],
        2,
        ["--json", "is a directory"],
    ),
    "cnn_input_shape_mismatch": (
        lambda d, s: [*CNN_TRAIN, "--input-shape", "3,8,8"],
        2,
        ["--input-shape 3,8,8 has 192 values, but --dataset digits has 64 features"],
    ),
    "cnn_flag_for_mlp": (
        lambda d, s: [*TRAIN, "--widths", "4"],
        2,
        ["--widths is for --model vgg or resnet, got --model mlp"],
    ),
    "resume_and_overwrite": (
        lambda d, s: [*_resume(_copy(s, "good.npz", d)), "--overwrite"],
        2,
        ["--resume and --overwrite exclude each other"],
    ),
    "overwrite_without_checkpoint": (
        lambda d, s: [*TRAIN, "--overwrite"],
        2,
        ["--overwrite needs --checkpoint PATH"],
    ),
    # data files
    "data_npy": (
        lambda d, s: _mnist(npy_named_npz(d / "m.npz")),
        1,
        ["m.npz", "is a .npy file (one array), not an .npz (zip) archive"],
    ),
    "data_empty": (lambda d, s: _mnist(write_file(d / "m.npz", b"")), 1, ["m.npz", "is empty"]),
    "data_text": (
        lambda d, s: _mnist(write_file(d / "m.npz", b"0,1,2\n")),
        1,
        ["m.npz", "is not a valid .npz (zip) archive"],
    ),
    "data_truncated": (
        lambda d, s: _mnist(write_file(d / "m.npz", fake_mnist(d / "m.npz").read_bytes()[:999])),
        1,
        ["m.npz", "is not a valid .npz (zip) archive"],
    ),
    "data_corrupt": (
        lambda d, s: _mnist(corrupt_member(d / "m.npz")),
        1,
        ["m.npz", "is corrupt", "x_train"],
    ),
    "data_wrong_dtype": (
        lambda d, s: _mnist(fake_mnist(d / "m.npz", dtype=np.float64)),
        1,
        ["m.npz", "x_train/y_train: images must have dtype uint8, got float64"],
    ),
    "data_too_small_to_split": (
        lambda d, s: _mnist(fake_mnist(d / "m.npz", n=12)),
        1,
        ["--data-path", "m.npz", "cannot split the 12 samples"],
    ),
    # values checked at parse time, named by their flag
    "seed_negative": (
        lambda d, s: [*TRAIN, "--seed", "-1"],
        2,
        ["argument --seed: must be an int >= 0, got -1"],
    ),
    "bogus_flag_console_script": (
        lambda d, s: ["train", "--bogus"],
        2,
        ["cpusparse train: error: unrecognized arguments: --bogus"],
    ),
    "bench_repeats_zero": (
        lambda d, s: [*BENCH, "--repeats", "0", "--out", d],
        2,
        ["argument --repeats: must be an int >= 1, got 0"],
    ),
    "trace_steps_zero": (
        lambda d, s: ["trace", d / "t.npz", "--steps", "0"],
        2,
        ["--steps must be an int >= 1, got 0"],
    ),
    "verify_malformed_version": (
        lambda d, s: ["verify", s / "trace.npz", _bad_version(s, d)],
        2,
        ["cpusparse verify", "bad.npz", "meta/format_version"],
    ),
    "verify_text_as_trace": (
        lambda d, s: ["verify", s / "trace.npz", write_file(d / "t.npz", b"not a trace")],
        2,
        ["cpusparse verify", "t.npz", "is not a valid .npz (zip) archive"],
    ),
    "verify_rtol_nan": (
        lambda d, s: ["verify", s / "trace.npz", s / "trace.npz", "--rtol", "nan"],
        2,
        ["--rtol must be a finite number >= 0, got nan"],
    ),
    # cpusparse sweep
    "sweep_no_grid": (
        lambda d, s: ["sweep"],
        2,
        ["cpusparse sweep: error:", "expected a grid file"],
    ),
    "sweep_grid_missing": (
        lambda d, s: ["sweep", d / "nope.toml", "--out", d / "o"],
        2,
        ["cpusparse sweep: error: cannot read grid file", "nope.toml"],
    ),
    "sweep_grid_not_toml": (
        lambda d, s: ["sweep", write_file(d / "g.toml", b"density = [0.1,"), "--out", d / "o"],
        2,
        ["g.toml is not valid TOML"],
    ),
    "sweep_grid_unknown_key": (
        lambda d, s: ["sweep", write_file(d / "g.toml", SWEEP_GRID.replace(b"density", b"densty"))],
        2,
        ["g.toml: grid[0].densty: unknown key (expected one of model, dataset"],
    ),
    "sweep_grid_bad_value": (
        lambda d, s: ["sweep", write_file(d / "g.toml", SWEEP_GRID.replace(b"0.5", b"5"))],
        2,
        ["g.toml: grid[0].density: expected a number in (0, 1], got 5"],
    ),
    "sweep_out_is_a_file": (
        lambda d, s: [*_sweep(d), "--out", write_file(d / "f", b"x")],
        2,
        ["--out", "is a regular file, not a directory"],
    ),
    "sweep_out_is_a_device": (
        lambda d, s: [*_sweep(d), "--out", "/dev/null"],
        2,
        ["--out /dev/null: is a character device, not a directory"],
    ),
    "sweep_out_dangling_symlink": (
        lambda d, s: [*_sweep(d), "--out", _symlink(d / "link", d / "gone")],
        2,
        ["--out", "link: is a symlink to", "which does not exist"],
    ),
    "sweep_workers_zero": (
        lambda d, s: [*_sweep(d), "--workers", "0"],
        2,
        ["argument --workers: must be an int >= 1, got 0"],
    ),
    "sweep_workers_with_scheduler": (
        lambda d, s: [*_sweep(d), "--workers", "2", "--scheduler", "tcp://127.0.0.1:9"],
        2,
        ["--workers sizes the LocalCluster: not with --scheduler"],
    ),
    "sweep_scheduler_unreachable": (
        lambda d, s: [*_sweep(d), "--scheduler", "tcp://127.0.0.1:9", "--quiet"],
        1,
        ["cpusparse sweep: error: cannot reach the Dask scheduler tcp://127.0.0.1:9"],
    ),
    "sweep_report_without_records": (
        lambda d, s: ["sweep", "--report", "--out", d],
        2,
        ["no cell records of cpusparse", "under"],
    ),
    # training errors
    "non_finite_loss": (
        lambda d, s: [*TRAIN, "--lr", "1e30"],
        1,
        ["cpusparse train: error:", "non-finite loss"],
    ),
}

# Run through a subprocess too (the others run in this process only: most of a
# subprocess's time is importing scikit-learn). The first ones use the console script.
SCRIPT_CASES = {"checkpoint_device", "bogus_flag_console_script", "seed_negative"}
SUBPROCESS_CASES = SCRIPT_CASES | {
    "json_device",
    "checkpoint_missing_dir",
    "json_dangling_symlink",
    "trace_missing_dir",
    "trace_device",
    "bench_out_is_a_file",
    "bench_json_is_a_directory",
    "checkpoint_exists",
    "resume_truncated",
    "resume_budget",
    "resume_other_parameters",
    "data_npy",
    "data_wrong_dtype",
    "bench_repeats_zero",
    "verify_malformed_version",
    "non_finite_loss",
    "sweep_grid_unknown_key",
    "sweep_out_is_a_device",
    "sweep_scheduler_unreachable",
}


SWEEP_GRID = b"seeds = 1\n[[grid]]\ndensity = 0.5\n[grid.params]\nhidden_layer_sizes = [8]\n"


def _sweep(d):
    return ["sweep", write_file(d / "g.toml", SWEEP_GRID), "--out", d / "out"]


def _symlink(link, target):
    link.symlink_to(target)
    return link


def _mkdirs(path):
    path.mkdir(parents=True)
    return path


def _resume(path, *more):
    return [*TRAIN, "--checkpoint", path, "--resume", *more]


def _mnist(path):
    return [*TRAIN, "--dataset", "mnist", "--data-path", path]


def _pickled(path):
    np.savez(path, meta=np.array([{"epoch": 1}], dtype=object))
    return path


def _bad_version(s, d):
    with np.load(s / "trace.npz") as npz:
        data = {name: npz[name] for name in npz.files}
    data["meta/format_version"] = np.array([1, 2])
    np.savez(d / "bad.npz", **data)
    return d / "bad.npz"


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """A checkpoint written by the command line and a trace, for the cases to copy."""
    from cpusparse.tools.cli import main
    from cpusparse.tools.trace import write_trace

    s = tmp_path_factory.mktemp("shared")
    assert main([*TRAIN, "--checkpoint", str(s / "good.npz")]) == 0
    assert main([*CNN_TRAIN, "--checkpoint", str(s / "cnn.npz")]) == 0
    write_trace(s / "trace.npz", layers=(6, 5, 3), steps=1, batch_size=4, n_data=8)
    return s


@pytest.fixture(scope="module")
def results(shared, tmp_path_factory):
    """The subprocess cases, run once, concurrently: {name: (dir, Future or None)}."""
    base = tmp_path_factory.mktemp("cases")
    jobs = {}
    for name in sorted(SUBPROCESS_CASES):
        d = base / name
        d.mkdir()
        jobs[name] = (d, CASES[name][0](d, shared))
    workers = max(2, min(8, 2 * (os.cpu_count() or 1)))
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        futures = {
            name: pool.submit(run_cli, argv, d, script=name in SCRIPT_CASES)
            for name, (d, argv) in jobs.items()
            if argv is not None
        }
        return {name: (d, futures.get(name)) for name, (d, _) in jobs.items()}


@pytest.mark.parametrize("case", sorted(SUBPROCESS_CASES))
def test_cli_error_is_one_line(results, case):
    d, future = results[case]
    if future is None:
        pytest.skip("needs root (mknod)")
    _, status, fragments = CASES[case]
    one_line_error(future.result(), status, *fragments)


@pytest.mark.parametrize("case", list(CASES))
def test_cli_error_is_one_line_in_process(shared, tmp_path, capsys, case):
    from cpusparse.tools.cli import main

    setup, status, fragments = CASES[case]
    argv = setup(tmp_path, shared)
    if argv is None:
        pytest.skip("needs root (mknod)")
    got = main([str(a) for a in argv])
    captured = capsys.readouterr()
    result = subprocess.CompletedProcess(argv, got, captured.out, captured.err)
    one_line_error(result, status, *fragments)


def test_devices_are_left_alone(results):
    for case in ("checkpoint_device", "json_device", "trace_device"):
        d, future = results[case]
        if future is None:
            pytest.skip("needs root (mknod)")
        future.result()
        assert stat.S_ISCHR(os.stat(d / "null").st_mode), case
        assert os.listdir(d) == ["null"], case


def test_refused_checkpoints_are_left_unchanged(results, shared):
    for case in ("checkpoint_exists", "resume_other_parameters"):
        d, future = results[case]
        future.result()
        assert (d / "run.npz").read_bytes() == (shared / "good.npz").read_bytes(), case
    for case in ("resume_budget", "resume_truncated"):
        d, future = results[case]
        future.result()
        assert sorted(os.listdir(d)) == ["run.npz"], case  # nothing new, no temporary


def test_nothing_is_written_on_a_bad_output_path(results):
    for case in ("checkpoint_missing_dir", "trace_missing_dir"):
        d, future = results[case]
        future.result()
        assert os.listdir(d) == [], case


# ---------------------------------------------------------------------------
# Runs that succeed: symlinks, --overwrite, permissions
# ---------------------------------------------------------------------------


def test_symlinked_checkpoint_updates_its_target(tmp_path, shared):
    (tmp_path / "store").mkdir()
    target = _copy(shared, "good.npz", tmp_path / "store")
    link = tmp_path / "run.npz"
    link.symlink_to(target)
    result = run_cli([*TRAIN, "--hidden", "6", "--checkpoint", link, "--overwrite"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert link.is_symlink() and os.readlink(link) == str(target)  # the link is kept...
    assert load_checkpoint(target)["layers"][0]["shape"][0] == 6  # ...and its target updated
    assert os.listdir(tmp_path / "store") == ["run.npz"]
    resumed = run_cli([*TRAIN, "--hidden", "6", "--checkpoint", link, "--resume"], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert result.stdout.splitlines()[1].split()[:3] == resumed.stdout.splitlines()[1].split()[:3]
    assert link.is_symlink()


def test_overwrite_starts_again_and_keeps_the_file_mode(tmp_path, shared):
    path = _copy(shared, "good.npz", tmp_path)
    os.chmod(path, 0o640)
    inode = os.stat(path).st_ino
    result = run_cli([*TRAIN, "--hidden", "6", "--checkpoint", path, "--overwrite"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert os.stat(path).st_ino != inode  # replaced
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o640
    assert load_checkpoint(path)["layers"][0]["shape"][0] == 6
    assert os.listdir(tmp_path) == ["run.npz"]


# ---------------------------------------------------------------------------
# Ctrl-C
# ---------------------------------------------------------------------------

LONG = ["train", "--epochs", "100000", "--finetune-epochs", "0", "--hidden", "16"]


def _default_sigint():
    # A suite started in the background (nohup, `cmd &`) inherits an ignored SIGINT,
    # and Python then installs no KeyboardInterrupt handler: restore the default.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_ctrl_c_says_where_the_checkpoint_is(tmp_path):
    path = tmp_path / "run.npz"
    proc = subprocess.Popen(
        [*CLI, *LONG, "--quiet", "--checkpoint", str(path)],
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=_default_sigint,
    )
    try:
        deadline = time.monotonic() + 120
        while not path.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        assert path.exists(), "no checkpoint was written"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    result = subprocess.CompletedProcess(proc.args, proc.returncode, "", err)
    line = one_line_error(result, 130, "cpusparse train: interrupted", f"checkpoint is {path}")
    assert "--resume" in line and "epoch" in line
    assert load_checkpoint(path)["phase"] == "sparse"
    assert os.listdir(tmp_path) == ["run.npz"]  # no temporary file left by the interrupt


def test_ctrl_c_without_checkpoint_says_how_to_get_one(tmp_path):
    proc = subprocess.Popen(
        [*CLI, *LONG],  # with the progress bar: its "loss=" means the epochs are running
        cwd=tmp_path,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        preexec_fn=_default_sigint,
    )
    watchdog = threading.Timer(120, proc.kill)
    watchdog.start()
    try:
        seen = b""
        while b"loss=" not in seen:
            chunk = os.read(proc.stderr.fileno(), 4096)
            assert chunk, seen.decode()
            seen += chunk
        proc.send_signal(signal.SIGINT)
        err = (seen + proc.stderr.read()).decode()
        proc.wait()
    finally:
        watchdog.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Traceback" not in err, err
    assert proc.returncode == 130, err
    lines = [line for line in err.replace("\r", "\n").splitlines() if "cpusparse" in line]
    assert len(lines) == 1, err
    assert lines[0].startswith("cpusparse train: interrupted; no checkpoint was being written")
    assert "--checkpoint PATH" in lines[0]


# ---------------------------------------------------------------------------
# 6. Checkpoint metadata is checked against the other fields and the arrays
# ---------------------------------------------------------------------------


def _small_state():
    init, data_rng, mask_rng = spawn_streams(3)
    config = TrainConfig(density=0.25, optimizer="adam")
    net = mlp(6, (5, 4), 3, rng=init, dtype=np.float64)
    state = init_state(net, config, data_rng=data_rng, mask_rng=mask_rng)
    rng = np.random.default_rng(0)
    x = np.ascontiguousarray(rng.normal(size=(6, 16)))
    run_epoch(state, x, rng.integers(0, 3, size=16), config, batch_size=8)
    return state, config


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    state, config = _small_state()
    save_checkpoint(d / "sparse.npz", state, config, epoch=2, phase="sparse", history=[])
    masks = fixed_mask(state)
    save_checkpoint(
        d / "finetune.npz", state, config, epoch=1, phase="finetune", history=[], masks=masks
    )
    return d


INVALID = {
    # (checkpoint, meta changes, array changes) -> message fragment
    "budget_huge": ("sparse", {"budget": 1e9}, {}, "budget must be a finite number in (0, "),
    "budget_off": ("sparse", {"budget": "x"}, {}, "budget must be a number, got 'x'"),
    "epoch_negative": ("sparse", {"epoch": -5}, {}, "epoch must be an int >= 0, got -5"),
    "epoch_float": ("sparse", {"epoch": 2.5}, {}, "epoch must be an int >= 0, got 2.5"),
    "epoch_bool": ("sparse", {"epoch": True}, {}, "epoch must be an int >= 0, got True"),
    "step_negative": ("sparse", {"step": -1}, {}, "step must be an int >= 0, got -1"),
    "phase": ("sparse", {"phase": "dense"}, {}, "phase must be one of ('sparse', 'finetune')"),
    "n_units_initial_small": (
        "sparse",
        {"n_units_initial": 3},
        {},
        "score has",
    ),
    "n_units_initial_zero": ("sparse", {"n_units_initial": 0}, {}, "n_units_initial must be"),
    "score_above_one": (
        "sparse",
        {},
        {"score": lambda a: a + 2},
        "score must be in [0, 1], got values in",
    ),
    "score_nan": ("sparse", {}, {"score": lambda a: a * np.nan}, "score must be finite"),
    "score_int": ("sparse", {}, {"score": lambda a: a.astype(np.int64)}, "score must be a 1-d"),
    "offsets_start": ("sparse", {}, {"offsets": lambda a: a + 1}, "offsets must rise from 0"),
    "offsets_length": (
        "sparse",
        {},
        {"offsets": lambda a: np.array([0, a[-1]])},
        "offsets must give the units of each prunable layer",
    ),
    "score_state_two": (
        "sparse",
        {"score_state_keys": [["step"], ["step"]]},
        {},
        "score_state must hold one dict",
    ),
    "weight_state_short": (
        "sparse",
        {},
        {"weight_state0.exp_avg": lambda a: a[:-1]},
        "weight_state[0]['exp_avg'] (0.weight) must have shape",
    ),
    "weight_state_dtype": (
        "sparse",
        {},
        {"weight_state1.exp_avg_sq": lambda a: a.astype(np.float32)},
        "must have shape (5,) and dtype float64, got shape (5,) and dtype float32",
    ),
    "weight_state_keys": (
        "sparse",
        {"weight_state_keys.0": ["step", "exp_avg"]},
        {},
        "weight_state[0] (0.weight) must have keys",
    ),
    "weight_state_count": (
        "sparse",
        {"weight_state_keys": lambda keys: [*keys, ["step"]]},
        {"weight_state6.step": lambda _: np.zeros((), np.int64)},
        "weight_state must hold one dict per parameter (6), got 7",
    ),
    "score_state_shape": (
        "sparse",
        {},
        {"score_state0.exp_avg": lambda a: np.concatenate([a, a])},
        "score_state[0]['exp_avg'] (score) must have shape",
    ),
    "masks_missing": ("finetune", {"n_masks": None}, {}, "masks are required in phase"),
    "masks_shape": (
        "finetune",
        {},
        {"mask0": lambda a: a[:-1]},
        "masks must be one vector per prunable layer",
    ),
    "masks_count": ("finetune", {"n_masks": 1}, {}, "masks must be one vector per prunable"),
    "masks_dtype": ("finetune", {}, {"mask0": lambda a: a.astype(np.int8)}, "mask0 must be a"),
    "rng_name": (
        "sparse",
        {"data_rng.bit_generator": "seed"},
        {},
        "data_rng must name one of the bit generators",
    ),
    "rng_state": (
        "sparse",
        {"mask_rng.state": {"state": "x"}},
        {},
        "mask_rng is not a valid PCG64 state",
    ),
    "rng_type": ("sparse", {"mask_rng": [1, 2]}, {}, "mask_rng must be a bit-generator state"),
    "config": ("sparse", {"config.lr": -1.0}, {}, "config is not a valid TrainConfig"),
    "config_density": (
        "sparse",
        {"config.density": 0.5},
        {},
        "budget must be density * n_units_initial = 0.5 *",
    ),
    "history": ("sparse", {"history": {"a": 1}}, {}, "history must be a list, got dict"),
    "layers": ("sparse", {"layers.0.type": "Conv9"}, {}, "layers do not make a valid network"),
    "nan_weight": (
        "sparse",
        {},
        {"layer2.weight": lambda a: a * np.nan},
        "finite",
    ),
    "missing_array": ("sparse", {}, {"weight_state0.exp_avg": None}, "missing 'weight_state0."),
    "version": ("sparse", {"format_version": True}, {}, "format version True"),
}


@pytest.mark.parametrize("case", list(INVALID))
def test_edited_checkpoints_are_refused(checkpoints, tmp_path, case):
    source, meta, arrays, message = INVALID[case]
    path = edit_checkpoint(checkpoints / f"{source}.npz", tmp_path / "edited.npz", meta, arrays)
    with pytest.raises(CheckpointError) as exc:
        restore_state(load_checkpoint(path))
    assert message in str(exc.value), str(exc.value)


def test_unedited_checkpoints_and_rounding_of_the_budget_are_accepted(checkpoints, tmp_path):
    for name in ("sparse", "finetune"):
        restore_state(load_checkpoint(checkpoints / f"{name}.npz"))
    budget = load_checkpoint(checkpoints / "sparse.npz")["budget"]
    near = edit_checkpoint(
        checkpoints / "sparse.npz", tmp_path / "near.npz", {"budget": budget * (1 + 1e-12)}
    )
    restore_state(load_checkpoint(near))
    off = edit_checkpoint(
        checkpoints / "sparse.npz", tmp_path / "off.npz", {"budget": budget * (1 + 1e-6)}
    )
    with pytest.raises(CheckpointError, match="budget must be density"):
        restore_state(load_checkpoint(off))
