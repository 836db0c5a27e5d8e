"""The PyTorch ports of golden traces: free-running (replay_free) and stage-isolated (replay).

The free-running port starts from what a port has at step 0 and writes a trace of its
own, compared here with cpusparse's own comparison (``compare_traces``, i.e. ``cpusparse
verify``): at the default tolerances in float64, at the error model of
``float32_tolerances`` in float32. Every acceptance test has a twin showing that it
fails for a wrong port (a mutation of the port or a corrupted trace).
"""

import json

import numpy as np
import pytest

from cpusparse.tools.cli import main as cli_main
from cpusparse.tools.trace import DEFAULT_TOLERANCES, compare_traces, make_trace
from cpusparse.training.optim import cosine_schedule

rt = pytest.importorskip("cpusparse.testing.replay_torch")  # needs PyTorch

pytestmark = pytest.mark.usefixtures("one_numba_thread")

STEPS = 6
# The options of configuration (b): every optimizer feature at once.
SGD_OPTIONS = dict(
    optimizer="sgd",
    nesterov=True,
    weight_decay=1e-3,
    clip_norm=0.1,
    schedule="cosine",
    sparse_classifier=True,
    stored_density=0.5,
    weight_grad="first",
)


def _free(ref, **kwargs):
    run = rt.replay_free(ref, **kwargs)
    assert run.errors == []
    return run


def _first_stage(names):
    """The name computed first (step, then stage, then layer)."""
    return min(names, key=rt.stage_key)


def _float32_failures(ref, port):
    """Names of the arrays where ``port`` breaks the float32 error model.

    Each floating array is checked with ``compare_traces`` at its ``float32_tolerances``
    and elementwise against ``float32_error_bounds``; the other arrays must be equal.
    """
    exact = [n for n, a in ref.items() if a.dtype.kind != "f" and not n.startswith("meta/")]
    failures = [m.name for m in compare_traces(ref, port, include=exact).mismatches]
    bounds = rt.float32_error_bounds(ref)
    for name, (rtol, atol) in rt.float32_tolerances(ref).items():
        if not compare_traces(ref, port, include=[name], rtol=rtol, atol=atol).ok:
            failures.append(name)
            continue
        r = ref[name].astype(np.float64)
        err = np.abs(port[name].astype(np.float64) - r)
        if np.any(err > bounds[name] + rtol * np.abs(r)):
            failures.append(name)
    return failures


def _non_meta(trace):
    return {n for n in trace if not n.startswith("meta/")}


# ---------------------------------------------------------------------------
# (a) float64, Adam on the scores: the default tolerances of cpusparse verify
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("n_masks", [2, 3])
@pytest.mark.parametrize("projection", ["exact", "bisection"])
@pytest.mark.parametrize("estimator", ["vrpge", "vrpge-sqrt"])
@pytest.mark.parametrize("granularity", ["weight", "neuron"])
def test_free_float64_adam_meets_the_default_tolerances(
    granularity, estimator, projection, n_masks
):
    ref = make_trace(
        steps=STEPS,
        granularity=granularity,
        score_estimator=estimator,
        projection=projection,
        n_masks=n_masks,
        initial_score=0.6,  # start above the budget: the projection is active
    )
    config = json.loads(str(ref["meta/config"]))
    assert config["score_optimizer"] == "adam" and config["optimizer"] == "adam"
    assert any(float(ref[f"step{s}/threshold"]) > 0 for s in range(STEPS))
    # Some units have K agreeing masks (VR-PGE exactly 0 there), others not.
    masks = ref[f"step{STEPS - 1}/layer0/masks"]
    agree = masks.all(0) | ~masks.any(0)
    assert agree.any() and not agree.all()

    run = _free(ref, resync_masks=False)  # the port's own masks, from its own scores
    assert run.n_mask_flips == 0
    assert _non_meta(run.trace) == _non_meta(ref)
    report = compare_traces(ref, run.trace)
    assert (report.rtol, report.atol) == DEFAULT_TOLERANCES["float64"]
    assert report.ok, report.format()


def test_free_float64_fails_with_the_paper_form_of_vrpge(monkeypatch):
    # The paper's form sum_k c_k (m_k - s) leaves rounding residues (~1e-16) where all
    # K masks agree instead of exact zeros. The residue is below dscore's atol, but the
    # score's Adam step turns it into a move of ~lr * residue / (residue + eps): the
    # comparison fails from the first score step on.
    ref = make_trace(steps=STEPS, n_masks=3)
    score_gradient = rt.score_gradient

    def paper_form(losses, masks, score, estimator, format_version=2):
        return score_gradient(losses, masks, score, estimator, format_version=1)

    monkeypatch.setattr(rt, "score_gradient", paper_form)
    report = compare_traces(ref, _free(ref).trace)
    assert not report.ok
    assert _first_stage(m.name for m in report.mismatches) == "step0/layer0/score_before_projection"


# ---------------------------------------------------------------------------
# (b) float64 with SGD, Nesterov, weight decay, clipping, cosine, sparse classifier
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("granularity", ["weight", "neuron"])
def test_free_float64_sgd_options_meet_the_default_tolerances(granularity):
    ref = make_trace(steps=STEPS, granularity=granularity, **SGD_OPTIONS)
    layers = json.loads(str(ref["meta/layers"]))
    assert layers[-1]["prunable"] and layers[-1]["granularity"] == "weight"
    assert all(float(ref[f"step{s}/grad_norm"]) > 0.1 for s in range(STEPS))  # clipped
    lrs = [float(ref[f"step{s}/lr"]) for s in range(STEPS)]
    assert all(a > b for a, b in zip(lrs, lrs[1:], strict=False))  # cosine
    assert ref["step0/layer0/weight_grad_per_pass"].shape[0] == 1  # weight_grad="first"
    assert 0.3 < ref["step0/layer0/pattern"].mean() < 0.7  # stored_density=0.5
    assert "step0/layer0/weight_state/momentum_buffer" in ref

    run = _free(ref, resync_masks=False)
    assert run.n_mask_flips == 0
    assert _non_meta(run.trace) == _non_meta(ref)
    report = compare_traces(ref, run.trace)
    assert report.ok, report.format()


# The authors' settings clip one norm over weights and scores (clip_scope="weights+scores");
# a lower clip_norm than theirs (3) makes the clipping active in these small traces.
AUTHORS = dict(preset="authors", clip_norm=0.3)


def test_authors_preset_clips_weights_and_scores_together():
    ref = make_trace(steps=STEPS, **AUTHORS)
    config = json.loads(str(ref["meta/config"]))
    assert config["clip_scope"] == "weights+scores" and config["score_estimator"] == "vrpge-sqrt"
    assert sum(float(ref[f"step{s}/grad_norm"]) > 0.3 for s in range(STEPS)) >= 2
    report = compare_traces(ref, _free(ref, resync_masks=False).trace)
    assert report.ok, report.format()
    assert rt.replay(ref) == []
    # Clipping the weights only is caught: first in the norm, before anything else.
    weights_only = dict(ref)
    weights_only["meta/config"] = np.array(json.dumps({**config, "clip_scope": "weights"}))
    names = [m.name for m in compare_traces(ref, _free(weights_only).trace).mismatches]
    assert _first_stage(names) == "step0/grad_norm"
    assert rt.replay(weights_only)[0].startswith("step0/grad_norm")


@pytest.mark.parametrize(
    "options",
    [
        dict(score_optimizer="sgd", momentum=0.0, nesterov=False, score_momentum=0.0),
        dict(score_estimator="reinforce", granularity="neuron"),
        dict(dataset="digits", layers=(64, 16, 10), projection="bisection", n_masks=2),
    ],
    ids=["sgd-without-momentum", "reinforce", "digits"],
)
def test_free_float64_other_options(options):
    ref = make_trace(steps=4, **{**SGD_OPTIONS, **options})
    run = _free(ref, resync_masks=False)
    report = compare_traces(ref, run.trace)
    assert report.ok, report.format()


# ---------------------------------------------------------------------------
# (c) float32: the error model
# ---------------------------------------------------------------------------

FLOAT32_CASES = {
    "weight-vrpge": dict(weight_decay=1e-3),
    "neuron-sqrt-K2": dict(
        granularity="neuron", score_estimator="vrpge-sqrt", n_masks=2, weight_decay=1e-3
    ),
    "sgd-options": dict(SGD_OPTIONS),
    "bisection-sgd-scores": dict(
        projection="bisection", score_optimizer="sgd", initial_score=0.6, weight_decay=1e-3
    ),
    "authors": dict(AUTHORS),
}


@pytest.fixture(scope="module")
def float32_traces():
    return {
        case: make_trace(steps=STEPS, dtype="float32", **options)
        for case, options in FLOAT32_CASES.items()
    }


@pytest.mark.parametrize("case", sorted(FLOAT32_CASES))
def test_free_float32_meets_the_error_model(float32_traces, case):
    ref = float32_traces[case]
    run = _free(ref)
    assert _non_meta(run.trace) == _non_meta(ref)
    assert _float32_failures(ref, run.trace) == []
    # The model is not vacuous: the score gradient is checked to a few 1e-4 of its
    # scale, the scores (in [0, 1]) to 1e-3.
    tolerances = rt.float32_tolerances(ref)
    for s in range(STEPS):
        dscore = ref[f"step{s}/layer0/dscore"]
        assert tolerances[f"step{s}/layer0/dscore"][1] < 1e-2 * np.abs(dscore).max()
        assert tolerances[f"step{s}/layer0/score_projected"][1] < 1e-3


def _swap_sqrt(score_gradient):
    swapped = {"vrpge": "vrpge-sqrt", "vrpge-sqrt": "vrpge"}

    def wrong(losses, masks, score, estimator, format_version=2):
        return score_gradient(losses, masks, score, swapped.get(estimator, estimator))

    return wrong


def _decay_scores(cfg, scores):
    return rt._optimizer(
        cfg["score_optimizer"],
        scores,
        cfg["score_lr"],
        momentum=cfg["score_momentum"],
        nesterov=False,
        weight_decay=cfg["weight_decay"],
    )


@pytest.mark.parametrize("mutation", ["sqrt-swapped", "weight-decay-on-scores"])
@pytest.mark.parametrize("case", ["weight-vrpge", "neuron-sqrt-K2"])
def test_float32_model_catches_a_wrong_port(float32_traces, monkeypatch, case, mutation):
    ref = float32_traces[case]
    if mutation == "sqrt-swapped":
        monkeypatch.setattr(rt, "score_gradient", _swap_sqrt(rt.score_gradient))
        first = "step0/layer0/dscore"
    else:  # the score gradient is right, the score step is not
        monkeypatch.setattr(rt, "_score_optimizer", _decay_scores)
        first = "step0/layer0/score_before_projection"
    failures = _float32_failures(ref, _free(ref).trace)
    assert failures and _first_stage(failures) == first


def test_dscore_error_bound():
    losses = np.array([1.0, 1.25, 0.5])
    masks = np.array([[1, 1, 0, 1], [1, 0, 1, 1], [1, 1, 0, 0]], dtype=bool)
    score = np.array([0.5, 0.25, 0.5, 1.0])
    bound = rt.dscore_error_bound(losses, masks, score, "vrpge", loss_error=1e-7)
    # Unit 0: all masks agree; unit 3: s = 1. Both are exactly 0 in every port.
    assert bound[0] == 0 and bound[3] == 0
    spread = np.abs(masks[:, 1] - masks[:, 1].mean()).sum()
    numer = 2 * 1e-7 * spread / 2 / (0.25 * 0.75)
    dscore1 = (losses - losses.mean()) @ (masks[:, 1] - masks[:, 1].mean()) / 2 / (0.25 * 0.75)
    assert bound[1] == pytest.approx(numer + 0.5 * rt.EPS32 * abs(dscore1), rel=1e-12)
    sqrt = rt.dscore_error_bound(losses, masks, score, "vrpge-sqrt", loss_error=1e-7)
    assert sqrt[2] == pytest.approx(bound[2] * 0.5, rel=1e-6)  # sqrt(s(1-s)) = 2 s(1-s)
    # An error of the scores adds |N| |d'(s)| / d(s)^2 * ds: 0 at s = 1/2.
    drift = rt.dscore_error_bound(losses, masks, score, "vrpge", loss_error=1e-7, score_error=1e-4)
    assert drift[2] == bound[2] and drift[1] > bound[1]


# ---------------------------------------------------------------------------
# (d) both ports point at the stage where a broken trace goes wrong
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("granularity", ["weight", "neuron"])
def test_both_replays_point_at_dscore_of_a_mislabelled_trace(granularity, dtype):
    # Made with vrpge, labelled vrpge-sqrt: every stage before the score gradient holds.
    made = make_trace(steps=3, granularity=granularity, dtype=dtype)
    bad = dict(made)
    bad["meta/config"] = np.array(str(made["meta/config"]).replace('"vrpge"', '"vrpge-sqrt"'))
    assert json.loads(str(bad["meta/config"]))["score_estimator"] == "vrpge-sqrt"

    failures = rt.replay(bad)
    assert failures and failures[0].startswith("step0/layer0/dscore"), failures

    port = _free(bad).trace
    if dtype == "float64":
        names = [m.name for m in compare_traces(bad, port).mismatches]
    else:
        names = _float32_failures(bad, port)
    assert names and _first_stage(names) == "step0/layer0/dscore"
    # The same port agrees with the trace as it was made.
    assert rt.replay(made) == []


def test_stage_key_orders_by_computation():
    names = [
        "step1/layer0/weight",
        "step0/threshold",
        "step0/layer1/dscore",
        "step0/layer2/weight_updated",
        "step0/layer0/score_state/exp_avg",
        "step0/losses",
        "meta/config",
        "step0/layer0/masks",
    ]
    assert sorted(names, key=rt.stage_key) == [
        "meta/config",
        "step0/layer0/masks",
        "step0/losses",
        "step0/layer1/dscore",
        "step0/layer2/weight_updated",
        "step0/layer0/score_state/exp_avg",
        "step0/threshold",
        "step1/layer0/weight",
    ]


# ---------------------------------------------------------------------------
# What the free-running port reads, mask resynchronisation, errors, schedule, CLI
# ---------------------------------------------------------------------------


def test_free_run_reads_only_its_inputs():
    ref = make_trace(steps=3, granularity="neuron", **SGD_OPTIONS)
    inputs = rt.free_run_inputs(ref)
    per_layer = [n for n in inputs if n.startswith("step") and "/layer" in n]
    assert {n.split("/", 2)[2] for n in per_layer} == {
        "pattern",
        "weight",
        "bias",
        "score",
        "uniforms",
    }
    assert all(n.startswith("step0/") for n in per_layer if not n.endswith("/uniforms"))
    assert "step2/layer1/uniforms" in inputs and "step2/x" in inputs
    assert "step0/layer0/masks" in rt.free_run_inputs(ref, masks=True)
    # Corrupt everything else (masks included): the port's trace does not change.
    corrupted = {
        name: value * 2 if value.dtype.kind == "f" else value for name, value in ref.items()
    }
    corrupted.update(inputs)
    for name in ref:
        if name.endswith("/masks"):
            corrupted[name] = ~ref[name]
    a = _free(ref, resync_masks=False).trace
    b = _free(corrupted, resync_masks=False).trace
    c = _free(inputs).trace  # no masks given: nothing to resynchronise
    for other in (b, c):
        assert list(other) == list(a)
        assert all(np.array_equal(a[n], other[n]) and a[n].dtype == other[n].dtype for n in a)


def test_resync_masks_takes_the_reference_masks_and_counts_flips():
    ref = make_trace(steps=4)
    # Move one uniform of step 2 just above its score: the port's own decision becomes
    # "drop" while the reference (computed with the original uniform) kept the weight.
    step, layer = 2, 1
    name = f"step{step}/layer{layer}/uniforms"
    masks = ref[f"step{step}/layer{layer}/masks"]
    k, row, col = np.argwhere(masks)[0]
    shifted = dict(ref)
    shifted[name] = ref[name].copy()
    shifted[name][k, row, col] = ref[f"step{step}/layer{layer}/score"][row, col] + 1e-9

    resynced = _free(shifted)
    assert resynced.n_mask_flips == 1
    assert resynced.mask_flips[f"step{step}/layer{layer}/masks"] == 1
    report = compare_traces(ref, resynced.trace)
    assert [m.name for m in report.mismatches] == [name]  # only the uniform we moved

    own = _free(shifted, resync_masks=False)
    assert own.n_mask_flips >= 1
    report = compare_traces(ref, own.trace)
    names = [m.name for m in report.mismatches if m.name != name]
    assert _first_stage(names) == f"step{step}/layer{layer}/masks"
    assert f"step{step}/losses" in names and f"step{step + 1}/layer0/weight" in names


def test_masks_compare_in_float64_even_for_float32():
    # A uniform just below a float32 score: u < s in float64 (the format's rule), but
    # float32(u) == s. The reference stays consistent (its mask was True already).
    ref = make_trace(steps=2, dtype="float32")
    masks, score = ref["step0/layer0/masks"], ref["step0/layer0/score"]
    k, row, col = np.argwhere(masks)[0]
    edge = dict(ref)
    edge["step0/layer0/uniforms"] = ref["step0/layer0/uniforms"].copy()
    edge["step0/layer0/uniforms"][k, row, col] = np.float64(score[row, col]) - 1e-12
    assert np.float32(edge["step0/layer0/uniforms"][k, row, col]) == score[row, col]
    run = _free(edge, resync_masks=False)
    assert run.n_mask_flips == 0
    assert np.array_equal(run.trace["step0/layer0/masks"], masks)


def test_free_run_errors():
    run = rt.replay_free(make_trace(steps=1, score_estimator="straight-through"))
    assert run.trace == {} and len(run.errors) == 1
    assert "straight-through" in run.errors[0] and "not ported" in run.errors[0]
    old = dict(make_trace(steps=1))
    old["meta/upgraded_from"] = np.array(1)  # what load_trace does to a version 1 file
    (error,) = rt.replay_free(old).errors
    assert "format version 1" in error


def test_learning_rate_is_cpusparse_schedule():
    for step in range(8):
        assert rt.learning_rate(0.05, "cosine", step, 6) == cosine_schedule(0.05, 6)(step)
        assert rt.learning_rate(0.05, "constant", step, 6) == 0.05
    with pytest.raises(ValueError, match="schedule must be"):
        rt.learning_rate(0.05, "step", 0, 6)


def test_command_line(tmp_path, capsys):
    ref_path, out_path = tmp_path / "ref.npz", tmp_path / "port.npz"
    np.savez(ref_path, **make_trace(steps=2))
    assert rt.main([str(ref_path)]) == 0
    assert rt.main([str(ref_path), "--free", str(out_path)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert cli_main(["verify", str(ref_path), str(out_path)]) == 0
    assert "OK: all arrays agree" in capsys.readouterr().out
    assert rt.main([str(ref_path), "--fre", str(out_path)]) == 2


def test_the_replay_command_line_errors_are_one_line(tmp_path, capsys):
    from cpusparse.testing.replay_torch import main as replay_main

    assert replay_main([str(tmp_path / "missing.npz")]) == 2
    (tmp_path / "text.npz").write_text("not a zip")
    assert replay_main([str(tmp_path / "text.npz")]) == 2
    from cpusparse.tools.trace import write_trace

    write_trace(tmp_path / "ref.npz", steps=1)
    assert replay_main([str(tmp_path / "ref.npz"), "--free", str(tmp_path / "no/x.npz")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 3 and all(line.startswith("python -m cpusparse") for line in err)
    assert "no such file" in err[0] and "not a valid .npz" in err[1] and "does not exist" in err[2]
    assert replay_main([str(tmp_path / "ref.npz"), "--free", str(tmp_path / "free.npz")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["free.npz", "ref.npz", "text.npz"]
