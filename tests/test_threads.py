"""Results do not depend on the number of Numba threads: bit-identical, not just close."""

import os
import subprocess
import sys

import numba
import numpy as np
import pytest

# One source for the computation, run in subprocesses with NUMBA_NUM_THREADS set and
# in this process with numba.set_num_threads.
COMPUTE = r"""
import numpy as np
from cpusparse import SparseLinear, mlp


def compute():
    results = {}
    rng = np.random.default_rng(20211110)
    for dtype in (np.float32, np.float64):
        for n_batch in (13, 256):
            for granularity in ("weight", "neuron"):
                key = f"{np.dtype(dtype).name}-{n_batch}-{granularity}"
                layer = SparseLinear.random(
                    64, 48, stored_density=0.5, granularity=granularity, activation="relu",
                    dtype=dtype, rng=rng,
                )
                mask = rng.random(layer.n_units) < 0.7
                live = rng.random(64) < 0.8
                x = rng.standard_normal((64, n_batch)).astype(dtype)
                out, cache = layer.forward(x, mask, live=live)
                dout = rng.standard_normal(out.shape).astype(dtype)
                dx, grads = layer.backward(dout, cache)
                results[f"layer-{key}-out"] = out
                results[f"layer-{key}-dx"] = dx
                results[f"layer-{key}-dweight"] = grads["weight"]
                results[f"layer-{key}-dbias"] = grads["bias"]
                for sparse_classifier in (False, True):
                    net = mlp(
                        64, (48, 32), 10, granularity=granularity,
                        sparse_classifier=sparse_classifier, stored_density=0.5, dtype=dtype,
                        rng=rng,
                    )
                    masks = [rng.random(n) < 0.7 for n in net.n_units()]
                    y = rng.integers(0, 10, n_batch)
                    loss, net_grads, logits = net.loss_and_grads(x, y, masks)
                    prefix = f"mlp-{key}-{sparse_classifier}"
                    results[f"{prefix}-loss"] = np.array(loss)
                    results[f"{prefix}-logits"] = logits
                    for name, arr in net_grads.items():
                        results[f"{prefix}-{name}"] = arr
    # The score-vector passes: the Philox masks and the projection (its parallel apply).
    from cpusparse.method import project_scores, sample_masks

    score = rng.random(300_001).astype(np.float32)
    masks, uniforms = sample_masks(score, 3, rng=5, return_uniforms=True)
    results["philox-masks"] = masks
    results["philox-uniforms"] = uniforms
    projected, threshold = project_scores(score * 1.5 - 0.2, 0.1 * score.size)
    results["projection"] = projected
    results["threshold"] = np.array(threshold)
    return results
"""

SCRIPT = COMPUTE + (
    "\nimport sys, numba\nnp.savez(sys.argv[1], n_threads=numba.get_num_threads(), **compute())\n"
)


def _compute_here():
    namespace = {}
    exec(COMPUTE, namespace)  # noqa: S102 - the fixed source above
    return namespace["compute"]()


def _run_subprocess(n_threads, path):
    env = {**os.environ, "NUMBA_NUM_THREADS": str(n_threads)}
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    with np.load(path) as data:
        results = {key: data[key] for key in data.files}
    assert int(results.pop("n_threads")) == n_threads  # the setting took effect
    return results


def _assert_identical(a, b, what):
    assert sorted(a) == sorted(b)
    assert len(a) > 0
    different = [key for key in a if not np.array_equal(a[key], b[key])]
    assert not different, f"{what}: not bit-identical: {different[:10]}"
    for key in a:
        assert a[key].dtype == b[key].dtype, key


def test_results_do_not_depend_on_numba_num_threads(tmp_path):
    one = _run_subprocess(1, tmp_path / "threads1.npz")
    two = _run_subprocess(2, tmp_path / "threads2.npz")
    _assert_identical(one, two, "NUMBA_NUM_THREADS=1 vs 2")
    # And the same as in this process, whatever its thread count.
    _assert_identical(one, _compute_here(), "subprocess vs this process")


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs 2 Numba threads")
def test_results_do_not_depend_on_set_num_threads():
    before = numba.get_num_threads()
    try:
        numba.set_num_threads(1)
        one = _compute_here()
        numba.set_num_threads(2)
        two = _compute_here()
    finally:
        numba.set_num_threads(before)
    _assert_identical(one, two, "set_num_threads(1) vs (2)")


# ---------------------------------------------------------------------------
# n_jobs and the threading layer
# ---------------------------------------------------------------------------


def test_effective_n_jobs_follows_scikit_learn():
    from cpusparse._threads import effective_n_jobs

    cores = numba.config.NUMBA_NUM_THREADS
    assert effective_n_jobs(None) == 1
    assert effective_n_jobs(1) == 1
    assert effective_n_jobs(-1) == cores
    assert effective_n_jobs(-2) == max(cores - 1, 1)
    assert effective_n_jobs(-1000) == 1
    assert effective_n_jobs(10_000) == cores
    with pytest.raises(ValueError, match="n_jobs == 0 has no meaning"):
        effective_n_jobs(0)


def test_the_kernels_run_on_tbb_where_it_is_a_dependency():
    import importlib.metadata
    import platform

    from cpusparse._threads import threading_layer

    layer = threading_layer()
    assert layer in ("tbb", "omp", "workqueue")
    if platform.system() == "Linux" and platform.machine() == "x86_64":
        importlib.metadata.version("tbb")  # installed with cpusparse
        if "NUMBA_THREADING_LAYER" not in os.environ:
            assert layer == "tbb"


def test_concurrent_fits_in_threads_match_serial_fits():
    # Thread workers (Dask's, joblib's threading backend) may run kernels concurrently;
    # the threading layer must allow it and the results must not change.
    import threading

    from sklearn.datasets import load_digits

    from cpusparse import SparseMLPClassifier

    X, y = load_digits(return_X_y=True)
    X = X[:400] / 16.0
    y = y[:400]

    def fit(seed):
        clf = SparseMLPClassifier(
            (32,), max_iter=2, finetune_iter=0, random_state=seed, n_jobs=-1
        ).fit(X, y)
        return clf.predict_proba(X)

    serial = [fit(seed) for seed in (0, 1)]
    results = [None, None]

    def work(i):
        results[i] = fit(i)

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for got, want in zip(results, serial, strict=True):
        assert np.array_equal(got, want)
