"""cpusparse._io: output-path checks, atomic writes (kinds, symlinks, modes, stale temps), .npz."""

import os
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest

from cpusparse._io import (
    NpzError,
    OutputPathError,
    atomic_write,
    check_output_dir,
    check_output_path,
    read_npz,
)

ROOT = os.geteuid() == 0 if hasattr(os, "geteuid") else False
needs_root = pytest.mark.skipif(not ROOT, reason="mknod of a character device needs root")


def write_bytes(data):
    return lambda f: f.write(data)


def make_device(path):
    """A character device like /dev/null (1, 3), made in a temporary directory."""
    os.mknod(path, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    return path


def make_fifo(path):
    os.mkfifo(path)
    return path


def make_socket(path):
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(path))
    sock.close()
    return path


NON_REGULAR = {
    "directory": (lambda p: p.mkdir() or p, "is a directory, not a regular file"),
    "fifo": (make_fifo, "is a FIFO (named pipe), not a regular file"),
    "socket": (make_socket, "is a socket, not a regular file"),
    "device": (make_device, "is a character device, not a regular file"),
}


# ---------------------------------------------------------------------------
# atomic_write
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(NON_REGULAR))
def test_atomic_write_refuses_non_regular_targets(tmp_path, kind):
    if kind == "device" and not ROOT:
        pytest.skip("mknod of a character device needs root")
    make, message = NON_REGULAR[kind]
    path = make(tmp_path / "out")
    mode = os.lstat(path).st_mode
    with pytest.raises(OutputPathError) as exc:
        atomic_write(path, write_bytes(b"data"))
    assert str(exc.value) == f"{path}: {message}"
    assert os.lstat(path).st_mode == mode  # still the same kind of file
    assert sorted(os.listdir(tmp_path)) == ["out"]  # and no temporary file


@needs_root
def test_atomic_write_refuses_a_symlink_to_a_device(tmp_path):
    device = make_device(tmp_path / "null")
    link = tmp_path / "link"
    link.symlink_to(device)
    with pytest.raises(OutputPathError) as exc:
        atomic_write(link, write_bytes(b"data"))
    assert (
        str(exc.value)
        == f"{link}: is a symlink to {device}, which is a character device, not a regular file"
    )
    assert stat.S_ISCHR(os.stat(device).st_mode) and link.is_symlink()


def test_atomic_write_follows_symlinks_to_their_final_target(tmp_path):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "run.npz"
    target.write_bytes(b"old")
    first = tmp_path / "first"
    first.symlink_to(target)
    link = tmp_path / "link"
    link.symlink_to("first")  # a relative link to a link
    atomic_write(link, write_bytes(b"new"))
    assert link.is_symlink() and first.is_symlink()  # the links are left in place
    assert os.readlink(link) == "first"
    assert target.read_bytes() == b"new"
    assert os.listdir(tmp_path / "real") == ["run.npz"]  # the temporary was next to the target
    # a symlink to a file that does not exist yet is refused, as is a loop
    dangling = tmp_path / "dangling"
    dangling.symlink_to(tmp_path / "nowhere.npz")
    with pytest.raises(OutputPathError, match="which does not exist"):
        atomic_write(dangling, write_bytes(b"x"))
    loop = tmp_path / "loop"
    loop.symlink_to("loop")
    with pytest.raises(OutputPathError, match="cannot be resolved"):
        atomic_write(loop, write_bytes(b"x"))
    assert not (tmp_path / "nowhere.npz").exists()


def test_atomic_write_keeps_permission_bits(tmp_path):
    path = tmp_path / "shared.json"
    path.write_bytes(b"old")
    os.chmod(path, 0o664)
    atomic_write(path, write_bytes(b"new"))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o664 and path.read_bytes() == b"new"
    os.chmod(path, 0o400)
    atomic_write(path, write_bytes(b"newer"))
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o400 and path.read_bytes() == b"newer"


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_atomic_write_new_file_mode_follows_the_umask(tmp_path, umask):
    old = os.umask(umask)
    try:
        atomic_write(tmp_path / "new.json", write_bytes(b"{}"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "new.json").st_mode) == 0o666 & ~umask


def dead_pid():
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporary_files_of_dead_writers_are_removed(tmp_path):
    path = tmp_path / "run.npz"
    path.write_bytes(b"old")
    stale = tmp_path / f".run.npz.{dead_pid()}.0123abcd.tmp"
    stale.write_bytes(b"half-written")
    live = tmp_path / f".run.npz.{os.getppid()}.89abcdef.tmp"  # a writer that still runs
    live.write_bytes(b"in progress")
    other = tmp_path / f".other.npz.{dead_pid()}.0123abcd.tmp"  # another file's temporary
    other.write_bytes(b"not ours")
    atomic_write(path, write_bytes(b"new"))
    assert path.read_bytes() == b"new"
    assert sorted(os.listdir(tmp_path)) == sorted(["run.npz", live.name, other.name])


def test_a_killed_writer_leaves_a_temporary_that_the_next_write_removes(tmp_path):
    path = tmp_path / "run.npz"
    path.write_bytes(b"old")
    code = textwrap.dedent(
        f"""
        import sys, time
        from cpusparse._io import atomic_write
        def write(f):
            f.write(b"partial")
            f.flush()
            print("writing", flush=True)
            time.sleep(60)
        atomic_write({str(path)!r}, write)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        temps = [n for n in os.listdir(tmp_path) if n != "run.npz"]
        assert len(temps) == 1 and temps[0].startswith(f".run.npz.{proc.pid}.")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert sorted(os.listdir(tmp_path)) == sorted(["run.npz", temps[0]])  # left behind
    assert path.read_bytes() == b"old"
    atomic_write(path, write_bytes(b"new"))
    assert os.listdir(tmp_path) == ["run.npz"] and path.read_bytes() == b"new"


def test_a_failed_write_removes_its_temporary_and_keeps_the_old_file(tmp_path):
    path = tmp_path / "run.npz"
    path.write_bytes(b"old")

    def fail(f):
        f.write(b"part")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, fail)
    assert os.listdir(tmp_path) == ["run.npz"] and path.read_bytes() == b"old"


# ---------------------------------------------------------------------------
# check_output_path and check_output_dir
# ---------------------------------------------------------------------------


def test_check_output_path_accepts_new_existing_and_linked_files(tmp_path):
    assert check_output_path(tmp_path / "new.npz", "--checkpoint") == str(tmp_path / "new.npz")
    (tmp_path / "old.npz").write_bytes(b"x")
    assert check_output_path(tmp_path / "old.npz") == str(tmp_path / "old.npz")
    (tmp_path / "link").symlink_to(tmp_path / "old.npz")
    assert check_output_path(tmp_path / "link") == str(tmp_path / "old.npz")
    assert sorted(os.listdir(tmp_path)) == ["link", "old.npz"]  # the probe is gone


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing", "--checkpoint {d}/none/run.npz: directory {d}/none does not exist"),
        ("missing2", "--checkpoint {d}/a/b/run.npz: directory {d}/a/b does not exist"),
        ("parent_file", "--checkpoint {d}/file.txt/run.npz: {d}/file.txt is a regular file, not"),
        ("grandparent_file", "--checkpoint {d}/file.txt/x/run.npz: {d}/file.txt is a regular"),
        ("directory", "--checkpoint {d}/sub: is a directory, not a regular file"),
        ("trailing_slash", "--checkpoint {d}/sub/: expected a file name"),
        ("dangling", "--checkpoint {d}/dangling: is a symlink to {d}/nowhere, which does not"),
        ("fifo", "--checkpoint {d}/fifo: is a FIFO (named pipe), not a regular file"),
        ("device", "--checkpoint {d}/null: is a character device, not a regular file"),
    ],
)
def test_check_output_path_refuses(tmp_path, case, message):
    if case == "device" and not ROOT:
        pytest.skip("mknod of a character device needs root")
    d = tmp_path
    (d / "file.txt").write_text("x")
    (d / "sub").mkdir()
    (d / "dangling").symlink_to(d / "nowhere")
    make_fifo(d / "fifo")
    if ROOT:
        make_device(d / "null")
    paths = {
        "missing": d / "none" / "run.npz",
        "missing2": d / "a" / "b" / "run.npz",
        "parent_file": d / "file.txt" / "run.npz",
        "grandparent_file": d / "file.txt" / "x" / "run.npz",
        "directory": d / "sub",
        "trailing_slash": f"{d}/sub/",
        "dangling": d / "dangling",
        "fifo": d / "fifo",
        "device": d / "null",
    }
    before = sorted(os.listdir(d))
    with pytest.raises(OutputPathError) as exc:
        check_output_path(paths[case], "--checkpoint")
    assert str(exc.value).startswith(message.format(d=d)), str(exc.value)
    assert "\n" not in str(exc.value)
    assert sorted(os.listdir(d)) == before


@pytest.mark.skipif(ROOT, reason="root writes into read-only directories")
def test_check_output_path_refuses_a_read_only_directory(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    os.chmod(ro, 0o500)
    try:
        with pytest.raises(OutputPathError, match=f"--json {ro}/m.json: directory {ro} is not wri"):
            check_output_path(ro / "m.json", "--json")
    finally:
        os.chmod(ro, 0o700)


def test_check_output_path_probes_the_directory_for_real(tmp_path, monkeypatch):
    # What os.access cannot see (root on a read-only mount): creating a file fails.
    real_open = os.open

    def read_only_fs(path, flags, *args, **kwargs):
        if flags & os.O_CREAT:
            raise OSError(30, "Read-only file system", path)
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", read_only_fs)
    with pytest.raises(OutputPathError, match=r"cannot create files in directory .*Read-only"):
        check_output_path(tmp_path / "x.npz", "OUT.npz")


def test_check_output_dir(tmp_path):
    assert check_output_dir(tmp_path / "new", "--out") == str(tmp_path / "new")
    assert not (tmp_path / "new").exists()  # nothing is created
    assert check_output_dir(tmp_path, "--out") == str(tmp_path)
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputPathError, match=f"--out {tmp_path}/f: is a regular file, not a dir"):
        check_output_dir(tmp_path / "f", "--out")
    with pytest.raises(OutputPathError, match=f"directory {tmp_path}/a does not exist"):
        check_output_dir(tmp_path / "a" / "b", "--out")
    (tmp_path / "d").symlink_to(tmp_path / "nowhere")
    with pytest.raises(OutputPathError, match="which does not exist"):
        check_output_dir(tmp_path / "d", "--out")


# ---------------------------------------------------------------------------
# Reading .npz files: say what the file is
# ---------------------------------------------------------------------------


def written(path, data):
    path.write_bytes(data)
    return path


def good_npz(path):
    np.savez(path, a=np.arange(3), b=np.ones((2, 2)))
    return path


def npz_with_pickle(path):
    np.savez(path, a=np.array([1, "x"], dtype=object))
    return path


def npz_with_text_member(path):
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("notes.txt", "hello")
    return path


def npy_renamed(path):
    with open(path, "wb") as f:
        np.save(f, np.zeros(3))
    return path


BAD_FILES = {
    "text": (lambda p: written(p, b"hello\n"), "is not a valid .npz (zip) archive"),
    "random": (
        lambda p: written(p, np.random.default_rng(0).bytes(1000)),
        "is not a valid .npz (zip) archive",
    ),
    "empty": (lambda p: written(p, b""), "is empty, not an .npz (zip) archive"),
    "npy": (npy_renamed, "is a .npy file (one array), not an .npz (zip) archive"),
    "truncated": (
        lambda p: written(p, good_npz(p).read_bytes()[:-30]),
        "is not a valid .npz (zip) archive",
    ),
    "pickled": (npz_with_pickle, "holds a pickled (object) array 'a'; such arrays are never"),
    "text_member": (npz_with_text_member, "holds a member 'notes.txt' that is not a .npy array"),
    "directory": (lambda p: p.mkdir() or p, "is a directory, not an .npz file"),
}


def test_read_npz_round_trip(tmp_path):
    arrays = read_npz(good_npz(tmp_path / "a.npz"))
    assert list(arrays) == ["a", "b"] and arrays["b"].flags.writeable
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_npz(tmp_path / "missing.npz")


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_read_npz_says_what_the_file_is(tmp_path, kind):
    make, message = BAD_FILES[kind]
    path = make(tmp_path / "x.npz")
    with pytest.raises(NpzError) as exc:
        read_npz(path, "checkpoint")
    assert str(exc.value).startswith(f"checkpoint {str(path)!r} ")
    assert message in str(exc.value)
    assert "unsafely" not in str(exc.value)


@pytest.mark.parametrize("kind", ["text", "random", "empty", "npy", "truncated"])
@pytest.mark.parametrize("loader", ["checkpoint", "trace", "dataset"])
def test_loaders_say_not_an_npz_archive(tmp_path, kind, loader):
    # A text file or random bytes named .npz used to be reported as "pickled (object)
    # data ... load it unsafely", and a renamed .npy failed with a TypeError.
    from cpusparse.tools.datasets import load_dataset
    from cpusparse.tools.trace import TraceError, load_trace
    from cpusparse.training.checkpoint import CheckpointError, load_checkpoint

    make, message = BAD_FILES[kind]
    path = make(tmp_path / "x.npz")
    load, error = {
        "checkpoint": (load_checkpoint, CheckpointError),
        "trace": (load_trace, TraceError),
        "dataset": (lambda p: load_dataset("mnist", path=p), ValueError),
    }[loader]
    with pytest.raises(error) as exc:
        load(path)
    assert message in str(exc.value) and str(path) in str(exc.value)
    assert "pickled" not in str(exc.value) and "unsafely" not in str(exc.value)


def test_idx_gzip_errors_are_value_errors(tmp_path):
    import gzip

    from cpusparse.tools.datasets import load_dataset

    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(b"\0\0\x08\x03")[:-6])
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(b"not gzip")
    with pytest.raises(ValueError, match="is not a readable gzip-compressed IDX file"):
        load_dataset("mnist", path=tmp_path)


def test_dataset_errors_name_the_file(tmp_path):
    from cpusparse.tools.datasets import load_dataset

    f = tmp_path / "float.npz"
    np.savez(f, x_train=np.zeros((2, 28, 28)), y_train=np.zeros(2, np.int64))
    with pytest.raises(TypeError, match=f"'{f}' x_train/y_train: images must have dtype uint8"):
        load_dataset("mnist", path=f)
    f = tmp_path / "empty.npz"
    np.savez(f, x_train=np.zeros((0, 28, 28), np.uint8), y_train=np.zeros(0, np.int64))
    with pytest.raises(ValueError, match="must hold at least one image"):
        load_dataset("mnist", path=f)
