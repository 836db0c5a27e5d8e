"""SparseCNNClassifier: scikit-learn's checks, real data, input shapes, resume, threads."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from conftest import assert_same_fit
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from sklearn.utils.estimator_checks import check_estimator

import cpusparse.sklearn as estimator_module
from cpusparse.sklearn import SparseCNNClassifier, infer_input_shape
from cpusparse.training.checkpoint import load_checkpoint
from cpusparse.training.loop import run_epoch

pytestmark = pytest.mark.usefixtures("one_numba_thread")

SMALL = dict(widths=(8, 16), density=0.5, random_state=0)


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return train_test_split(X / 16, y, test_size=0.2, stratify=y, random_state=0)


@pytest.fixture(scope="module")
def fitted(digits):
    X_train, _, y_train, _ = digits
    return SparseCNNClassifier(**SMALL).fit(X_train, y_train)


@pytest.mark.parametrize("architecture", ["vgg", "resnet"])
def test_check_estimator(architecture):
    # One stage of 4 channels at density 0.5: arbitrary feature counts are 1-D signals.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_estimator(
            SparseCNNClassifier(
                architecture=architecture,
                widths=(4,),
                density=0.5,
                max_iter=5,
                finetune_iter=2,
                batch_size=16,
                learning_rate_init=0.05,
            )
        )


def test_learns_digits_within_the_budget(fitted, digits):
    # VGG (8, 16) at channel density 0.5, the defaults' 12 + 3 epochs: 0.92 measured on
    # the test split (chance 0.10).
    _, X_test, _, y_test = digits
    assert fitted.input_shape_ == (1, 8, 8)
    assert fitted.score(X_test, y_test) > 0.85
    report = fitted.layer_densities()
    prunable = [r for r in report if r["prunable"]]
    assert [r["type"] for r in report] == ["Conv2d"] * 4 + ["Linear"]
    assert [r["n_units"] for r in prunable] == [8, 8, 16, 16]  # channels
    assert [r["shape"] for r in prunable][:2] == [(8, 1, 3, 3), (8, 8, 3, 3)]
    assert sum(r["active"] for r in prunable) == fitted.n_active_
    assert fitted.n_active_ == sum(int(m.sum()) for m in fitted.masks_)
    assert fitted.density_ == fitted.n_active_ / 48 <= 0.5
    assert [r["phase"] for r in fitted.history_].count("finetune") == 3
    # dropped channels really are zero at prediction: the kept network alone decides
    proba = fitted.predict_proba(X_test)
    assert proba.shape == (len(y_test), 10)
    np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-6)


def test_layer_names_reach_inside_residual_blocks(digits):
    X_train, _, y_train, _ = digits
    clf = SparseCNNClassifier(architecture="resnet", widths=(4, 8), max_iter=1, finetune_iter=0)
    clf.fit(X_train[:200], y_train[:200])
    names = [r["name"] for r in clf.layer_densities()]
    # stem, block 3 (main: 0.0, 0.3), block 4 (main 4.0.0, 4.0.3; projection 4.1.0), classifier
    assert names == ["0", "3.0.0", "3.0.3", "4.0.0", "4.0.3", "4.1.0", "6"]
    params = clf.network_.params()
    for name in names:
        assert f"{name}.weight" in params


def test_input_shape_inference():
    assert infer_input_shape(64, 3) == (1, 8, 8)
    assert infer_input_shape(784, 3) == (1, 28, 28)
    assert infer_input_shape(40, 3) == (1, 1, 40)
    with pytest.raises(ValueError, match=r"a 2x2 image, too small for 3 stages"):
        infer_input_shape(4, 3)  # never silently read as a signal
    assert infer_input_shape(4, 1) == (1, 2, 2)
    assert infer_input_shape(16, 3) == (1, 4, 4)
    with pytest.raises(ValueError, match="n_features = 1 is too small for 2 stages"):
        infer_input_shape(1, 2)


def test_image_input_equals_flat_input(digits):
    # (n, 1, 8, 8) and (n, 64) are the same data: the same fit bit for bit.
    X_train, X_test, y_train, _ = digits
    params = dict(widths=(4, 8), max_iter=2, finetune_iter=1, random_state=3)
    flat = SparseCNNClassifier(**params).fit(X_train, y_train)
    images = SparseCNNClassifier(**params).fit(X_train.reshape(-1, 1, 8, 8), y_train)
    assert images.input_shape_ == (1, 8, 8) and images.n_features_in_ == 64
    assert_same_fit(flat, images, X_test)
    np.testing.assert_array_equal(
        images.predict_proba(X_test.reshape(-1, 1, 8, 8)), flat.predict_proba(X_test)
    )


def test_one_dimensional_signals():
    # 40 features are a signal (1, 1, 40): 1 x 3 kernels, 1 x 2 pools.
    rng = np.random.default_rng(0)
    y = np.arange(300) % 2
    t = np.linspace(0, 1, 40)
    X = np.sin(2 * np.pi * (2 + 3 * y[:, None]) * t) + 0.3 * rng.standard_normal((300, 40))
    clf = SparseCNNClassifier(
        widths=(8, 16), density=0.5, max_iter=10, finetune_iter=3, batch_size=16, random_state=0
    )
    clf.fit(X[:200], y[:200])
    assert clf.input_shape_ == (1, 1, 40)
    assert clf.network_.prunable_layers()[0].kernel_size == (1, 3)
    assert clf.score(X[200:], y[200:]) > 0.9


def test_explicit_input_shape_and_its_errors(digits):
    X_train, X_test, y_train, _ = digits
    clf = SparseCNNClassifier(widths=(4,), input_shape=(1, 4, 16), max_iter=1, finetune_iter=0)
    clf.fit(X_train[:100], y_train[:100])
    assert clf.input_shape_ == (1, 4, 16)
    with pytest.raises(ValueError, match=r"input_shape \(1, 8, 9\) has 72 values, but the data"):
        SparseCNNClassifier(input_shape=(1, 8, 9)).fit(X_train, y_train)
    with pytest.raises(ValueError, match=r"X has images of shape \(1, 8, 8\), but input_shape"):
        SparseCNNClassifier(input_shape=(1, 4, 16)).fit(X_train.reshape(-1, 1, 8, 8), y_train)
    with pytest.raises(ValueError, match=r"input_shape must be None or \(C, H, W\)"):
        SparseCNNClassifier(input_shape=(8, 8)).fit(X_train, y_train)
    with pytest.raises(ValueError, match="widths must be a nonempty sequence"):
        SparseCNNClassifier(widths=(4, 0)).fit(X_train, y_train)
    with pytest.raises(ValueError, match="fitted on images of shape"):
        clf.predict(X_test.reshape(-1, 1, 8, 8))
    with pytest.raises(ValueError, match="too small for 4 stages"):
        SparseCNNClassifier(widths=(2, 2, 2, 2), input_shape=(1, 4, 4)).fit(
            X_train[:, :16], y_train
        )


def test_prune_first_false_leaves_the_first_convolution_out_of_the_budget(digits):
    X_train, _, y_train, _ = digits
    clf = SparseCNNClassifier(widths=(4, 8), prune_first=False, max_iter=1, finetune_iter=0)
    clf.fit(X_train[:200], y_train[:200])
    report = clf.layer_densities()
    assert not report[0]["prunable"] and report[0]["n_units"] == 4 * 9  # its weights
    assert len(clf.masks_) == 3 and clf.keep_prob_.shape == (4 + 8 + 8,)


def test_weight_granularity(digits):
    X_train, X_test, y_train, y_test = digits
    clf = SparseCNNClassifier(granularity="weight", widths=(4, 8), density=0.3, random_state=0)
    clf.fit(X_train, y_train)
    prunable = [r for r in clf.layer_densities() if r["prunable"]]
    assert [r["n_units"] for r in prunable] == [36, 144, 288, 576]
    assert clf.density_ <= 0.3
    assert clf.score(X_test, y_test) > 0.6


def test_results_do_not_depend_on_the_thread_count(digits):
    X_train, X_test, y_train, _ = digits
    params = dict(architecture="resnet", widths=(4, 8), max_iter=2, finetune_iter=1)
    one = SparseCNNClassifier(**params, random_state=5, n_jobs=1).fit(X_train, y_train)
    two = SparseCNNClassifier(**params, random_state=5, n_jobs=2).fit(X_train, y_train)
    assert_same_fit(one, two, X_test)


class Interrupt(Exception):
    """Stands for a crash in the middle of an epoch."""


@pytest.mark.parametrize("crash_after", [1, 3])  # in the sparse phase, in fine-tuning
def test_resume_is_bit_identical(tmp_path, monkeypatch, digits, crash_after):
    X_train, X_test, y_train, _ = digits
    params = dict(
        architecture="resnet",
        widths=(4, 8),
        max_iter=2,
        finetune_iter=2,
        fixed_mask="best-of-n",
        validation_fraction=0.2,
        norm_updates="every_pass",
        random_state=2,
    )
    reference = SparseCNNClassifier(**params).fit(X_train, y_train)
    calls = []

    def run_epoch_then_crash(*args, **kwargs):
        if len(calls) == crash_after:
            raise Interrupt
        calls.append(1)
        return run_epoch(*args, **kwargs)

    path = tmp_path / "run.npz"
    monkeypatch.setattr(estimator_module, "run_epoch", run_epoch_then_crash)
    with pytest.raises(Interrupt):
        SparseCNNClassifier(**params, checkpoint=path).fit(X_train, y_train)
    assert len(load_checkpoint(path)["history"]) == crash_after
    monkeypatch.undo()
    resumed = SparseCNNClassifier(**params, checkpoint=path, resume=True).fit(X_train, y_train)
    assert_same_fit(reference, resumed, X_test)
    # a checkpoint of another architecture is refused by name
    with pytest.raises(ValueError, match="architecture: 'resnet' != 'vgg'"):
        SparseCNNClassifier(**dict(params, architecture="vgg"), checkpoint=path, resume=True).fit(
            X_train, y_train
        )


def test_norm_updates_changes_the_running_statistics(digits):
    X_train, _, y_train, _ = digits
    params = dict(widths=(4,), max_iter=1, finetune_iter=0, random_state=0)
    once = SparseCNNClassifier(**params).fit(X_train[:256], y_train[:256])
    every = SparseCNNClassifier(**params, norm_updates="every_pass").fit(
        X_train[:256], y_train[:256]
    )
    a, b = once.network_.buffers(), every.network_.buffers()
    assert a.keys() == b.keys() and any("running_mean" in k for k in a)
    assert any(not np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="norm_updates"):
        SparseCNNClassifier(norm_updates="sometimes").fit(X_train, y_train)


def test_a_refit_on_other_images_equals_a_fresh_fit(digits):
    # Nothing of the previous fit (its input shape) carries over.
    X_train, _, y_train, _ = digits
    X, y = X_train[:300], y_train[:300]
    params = dict(widths=(4, 8), max_iter=2, finetune_iter=1, random_state=0)
    fresh = SparseCNNClassifier(**params).fit(X.reshape(-1, 1, 4, 16), y)
    reused = SparseCNNClassifier(**params).fit(X, y).fit(X.reshape(-1, 1, 4, 16), y)
    assert reused.input_shape_ == (1, 4, 16)
    assert_same_fit(fresh, reused, X)
    # a tuple of images is images too
    as_tuple = tuple(map(tuple, X.reshape(-1, 1, 8, 8)[:4].tolist()))
    np.testing.assert_array_equal(reused.predict(X[:4]), fresh.predict(X[:4]))
    assert SparseCNNClassifier(**params).fit(X, y).predict(as_tuple).shape == (4,)


def test_resume_refuses_another_input_shape_or_classifier(tmp_path, digits):
    from cpusparse.sklearn import SparseMLPClassifier

    X_train, _, y_train, _ = digits
    X, y = X_train[:200], y_train[:200]
    path = tmp_path / "c.npz"
    params = dict(widths=(4,), max_iter=1, finetune_iter=0, random_state=0)
    SparseCNNClassifier(**params, checkpoint=path).fit(X.reshape(-1, 4, 4, 4), y)
    with pytest.raises(ValueError, match=r"another network \(\{'input_shape': \[4, 4, 4\]\}"):
        SparseCNNClassifier(**params, checkpoint=path, resume=True).fit(X, y)
    with pytest.raises(ValueError, match="was written by SparseCNNClassifier, not SparseMLP"):
        SparseMLPClassifier(max_iter=1, checkpoint=path, resume=True, random_state=0).fit(X, y)
