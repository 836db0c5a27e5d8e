"""Replay a cpusparse trace in PyTorch and compare every array, or run a free port of it.

Two ports of the trace format (the trace format page of the documentation), for
checking a GPU or PyTorch implementation against ``cpusparse trace``:

- :func:`replay` is *stage-isolated*: it rebuilds every stage of every step from the
  arrays the trace stores (weights, scores, masks, losses) and compares each result,
  for MLP and CNN (VGG, ResNet: convolutions, batch norms, pools, residual blocks)
  traces.
- :func:`replay_free` is *free-running* (MLP traces only): it starts from what a port
  has at step 0 (:func:`free_run_inputs`) and runs every step on its own state,
  writing a trace of its own, to be compared with ``cpusparse verify`` (or
  ``compare_traces``) at the default tolerances in float64 and at
  :func:`float32_tolerances` in float32.

Usage: ``python -m cpusparse.testing.replay_torch TRACE.npz`` (stage-isolated) or
``python -m cpusparse.testing.replay_torch TRACE.npz --free OUT.npz`` (free-running;
then ``cpusparse verify TRACE.npz OUT.npz``). This module imports nothing of
cpusparse (run the file alone if you like) and needs only NumPy and PyTorch. Exit
status 0 if the replay agrees with the trace (or the free run was written), 1 otherwise.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

__all__ = [
    "TOLERANCES",
    "Checker",
    "score_gradient",
    "project",
    "REPLAYED_TYPES",
    "CNN_TYPES",
    "replay",
    "FREE_RUN_INPUTS",
    "RESYNC_INPUTS",
    "free_run_inputs",
    "learning_rate",
    "FreeRun",
    "replay_free",
    "stage_key",
    "EPS32",
    "LOSS_ULPS",
    "GRAD_ULPS",
    "ROUND_ULPS",
    "dscore_error_bound",
    "float32_error_bounds",
    "float32_tolerances",
    "main",
]

import numpy as np

if TYPE_CHECKING:
    import numpy.typing as npt
import torch

TOLERANCES = {"float32": (1e-5, 1e-6), "float64": (1e-12, 1e-14)}  # (rtol, atol)


class Checker:
    """Compare replayed arrays with the trace: ``|got - ref| <= atol + rtol * |ref|``."""

    def __init__(self, trace: Mapping[str, np.ndarray], rtol: float, atol: float) -> None:
        self.trace, self.rtol, self.atol = trace, rtol, atol
        self.failures: list[str] = []

    def __call__(self, name: str, got: torch.Tensor | npt.ArrayLike) -> None:
        """Check ``got`` against the trace's array ``name``."""
        got = got.detach().numpy() if torch.is_tensor(got) else np.asarray(got)
        ref = np.asarray(self.trace[name])
        if got.shape != ref.shape:
            self.failures.append(f"{name}: shape {got.shape} != {ref.shape}")
        elif ref.dtype == bool:
            if not np.array_equal(got, ref):
                self.failures.append(f"{name}: {int((got != ref).sum())} entries differ")
        else:
            err = np.abs(got.astype(np.float64) - ref.astype(np.float64))
            bad = err > self.atol + self.rtol * np.abs(ref.astype(np.float64))
            if bad.any():
                where = tuple(int(i) for i in np.unravel_index(np.argmax(bad), bad.shape))
                self.failures.append(f"{name}: max abs error {err.max():.3g}, first at {where}")


def score_gradient(
    losses: torch.Tensor,
    masks: torch.Tensor,
    score: torch.Tensor,
    estimator: str,
    format_version: int = 2,
) -> torch.Tensor:
    """VR-PGE (or REINFORCE) from stored losses (K,), masks (K, ...) and scores, in float64.

    ``format_version`` 1 computes VR-PGE in the paper's form, ``(m_k - s)``, as
    cpusparse 0.1 did (its rounding residues where all masks agree included).
    """
    s = score.double()
    m = masks.double()
    interior = (s > 0) & (s < 1)
    var = torch.where(interior, s * (1 - s), torch.ones_like(s))
    denom = var.sqrt() if estimator == "vrpge-sqrt" else var
    grad_log_p = torch.where(interior, (m - s) / denom, torch.zeros_like(m))
    K = losses.shape[0]
    shape = (K,) + (1,) * s.dim()
    if estimator == "reinforce":
        return (losses.view(shape) * grad_log_p).sum(0) / K
    # VR-PGE as the trace format (version 2) computes it: with the mean mask in place of
    # s, so that a unit on which all K masks agree gets exactly 0.
    centered = losses - losses.sum() / K
    if format_version == 1:
        return (centered.view(shape) * grad_log_p).sum(0) / (K - 1)
    mean_mask = m.sum(0) / K
    total = torch.zeros_like(s)
    for k in range(K):
        total = total + centered[k] * (m[k] - mean_mask)
    return torch.where(interior, total / (K - 1) / denom, torch.zeros_like(s))


def project(
    s: torch.Tensor, budget: float, method: str, tol: float, max_iter: int
) -> tuple[float, torch.Tensor]:
    """Threshold v >= 0 and clip(s - v, 0, 1) onto {0 <= x <= 1, sum x <= budget} (float64)."""

    def f(v: float) -> torch.Tensor:
        return torch.clamp(s - v, 0, 1).sum()

    if f(0.0) <= budget:
        return 0.0, torch.clamp(s, 0, 1)
    if method == "bisection":  # the authors' loop
        lo, hi = 0.0, float(s.max())
        for _ in range(max_iter):
            v = 0.5 * (lo + hi)
            total = float(f(v))
            if abs(total - budget) < tol:
                break
            lo, hi = (v, hi) if total > budget else (lo, v)
    else:  # exact: f is piecewise linear with breakpoints s_i and s_i - 1; sort them
        cand = torch.cat([torch.zeros(1, dtype=s.dtype), s, s - 1])
        cand = torch.unique(cand[(cand >= 0) & (cand <= s.max())])  # sorted
        values = torch.clamp(s[None, :] - cand[:, None], 0, 1).sum(1)
        hi = int(torch.nonzero(values <= budget)[0])  # first breakpoint with f <= budget
        left, right = float(cand[hi - 1]), float(cand[hi])
        if float(values[hi]) == budget:
            v = right
        else:  # f(v) = |U| + sum_A s - v |A| on (left, right)
            mid = 0.5 * (left + right)
            active = (s > mid) & (s < mid + 1)
            v = (float((s >= mid + 1).sum()) + float(s[active].sum()) - budget) / int(active.sum())
            v = min(max(v, left), right)
    return v, torch.clamp(s - v, 0, 1)


def _sum(terms: Iterable[torch.Tensor]) -> torch.Tensor:
    """``sum(terms)``, Python's sum from 0, of a nonempty iterable of tensors."""
    total = sum(terms)
    if not (isinstance(total, torch.Tensor)):
        raise RuntimeError("internal error: not the 0 of an empty sum")
    return total


REPLAYED_TYPES = (
    "SparseLinear",
    "Linear",
    "Conv2d",
    "BatchNorm2d",
    "ReLU",
    "MaxPool2d",
    "AvgPool2d",
    "GlobalAvgPool2d",
    "Flatten",
)
"""The layer types (``meta/layers``) :func:`replay` rebuilds; :func:`replay_free` runs
the first two only (MLP traces)."""

CNN_TYPES = frozenset(REPLAYED_TYPES[2:])
"""Layer types that make a trace a CNN trace (images, batch norms, pools)."""


def _param_names(la: Mapping[str, Any]) -> list[str]:
    # CNN traces list each layer's parameters; in MLP traces every layer has both.
    return list(la.get("params", ("weight", "bias")))


def _batch_norm(
    h: torch.Tensor,
    la: Mapping[str, Any],
    weight: torch.Tensor,
    bias: torch.Tensor,
    running: list[torch.Tensor] | None,
    live: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A training pass of a ``BatchNorm2d`` as the engine runs it.

    ``running`` (``[mean, var]``, replaced in place in the list) is updated when given.
    With ``mask_order="after_norm"`` only the ``live`` channels are normalised: a dead
    channel outputs exactly 0 and keeps its running statistics. With ``"before_norm"``
    every channel is normalised (a dead one, whose input is exactly 0, outputs beta).
    """
    momentum, eps = float(la["momentum"]), float(la["eps"])
    new = None if running is None else [r.clone() for r in running]
    out = torch.nn.functional.batch_norm(
        h,
        None if new is None else new[0],
        None if new is None else new[1],
        weight,
        bias,
        training=True,
        momentum=momentum,
        eps=eps,
    )
    after = la.get("mask_order", "after_norm") == "after_norm"
    if running is not None and new is not None:
        for j in range(2):
            running[j] = (
                new[j] if live is None or not after else torch.where(live, new[j], running[j])
            )
    if not after:
        return out, None
    if live is not None:
        out = out * live[None, :, None, None]
    return out, live


def _forward_graph(
    x: torch.Tensor,
    layers: Sequence[Mapping[str, Any]],
    blocks: Sequence[Mapping[str, Any]],
    params: Mapping[tuple[int, str], torch.Tensor],
    patterns: Mapping[int, torch.Tensor],
    masks: Mapping[int, torch.Tensor],
    running: dict[int, list[torch.Tensor]] | None,
) -> torch.Tensor:
    """Logits of one masked pass through the leaf layers and residual blocks of a trace.

    ``masks[l]`` is the mask of prunable layer ``l``; ``running[l]`` the running
    statistics of batch norm ``l``, updated in place when given (None: no update).
    ``live`` follows the engine's known-zero channels: the kept channels after a
    channel-masked convolution, unchanged through batch norms (after_norm), ReLUs and
    pools, the union of both branches after a residual add.
    """
    starts = {blk["main"][0]: blk for blk in blocks}

    def leaf(i: int, h: torch.Tensor, live: torch.Tensor | None) -> tuple[torch.Tensor, Any]:
        la = layers[i]
        kind, gran, mask = la["type"], la["granularity"], masks.get(i)
        if kind in ("SparseLinear", "Linear"):
            keep = patterns[i]
            if mask is not None and gran == "weight":
                keep = keep & mask
            h = h @ (params[(i, "weight")] * keep).T + params[(i, "bias")]
            if la["activation"] == "relu":
                h = torch.relu(h)
            if mask is not None and gran != "weight":  # a dropped neuron loses its bias too
                h = h * mask
            return h, None
        if kind == "Conv2d":
            weight = params[(i, "weight")]
            if mask is not None and gran == "weight":
                weight = weight * mask
            h = torch.nn.functional.conv2d(
                h,
                weight,
                params.get((i, "bias")),
                stride=tuple(la["stride"]),
                padding=tuple(la["padding"]),
            )
            if la["activation"] == "relu":
                h = torch.relu(h)
            if mask is not None and gran == "channel":  # a dropped channel is exactly 0
                return h * mask[None, :, None, None], mask
            return h, None
        if kind == "BatchNorm2d":
            stats = None if running is None else running[i]
            return _batch_norm(h, la, params[(i, "weight")], params[(i, "bias")], stats, live)
        if kind == "ReLU":
            return torch.relu(h), live
        if kind == "MaxPool2d":
            size, stride, pad = la["kernel_size"], la["stride"], la["padding"]
            return torch.nn.functional.max_pool2d(h, size, stride, pad), live
        if kind == "AvgPool2d":
            size, stride, pad = la["kernel_size"], la["stride"], la["padding"]
            return torch.nn.functional.avg_pool2d(h, size, stride, pad), live
        if kind == "GlobalAvgPool2d":
            return h.mean(dim=(2, 3)), live
        if kind == "Flatten":
            return h.flatten(1), None
        raise ValueError(f"meta/layers: layer {i} of type {kind!r} is not replayed")

    def run(
        indices: Sequence[int], h: torch.Tensor, live: torch.Tensor | None, inside: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        j = 0
        while j < len(indices):
            blk = None if inside else starts.get(indices[j])
            if blk is None:
                h, live = leaf(indices[j], h, live)
                j += 1
                continue
            a, live_a = run(blk["main"], h, live, True)
            shortcut = blk["shortcut"] or []
            b, live_b = run(shortcut, h, live, True) if shortcut else (h, live)
            h = a + b
            if blk["activation"] == "relu":
                h = torch.relu(h)
            live = None if live_a is None or live_b is None else live_a | live_b
            j += len(blk["main"]) + len(shortcut)
        return h, live

    return run(range(len(layers)), x, None, False)[0]


def _check_blocks(
    layers: Sequence[Mapping[str, Any]], blocks: Sequence[Mapping[str, Any]]
) -> list[str]:
    """Why the layers and blocks of a trace cannot be replayed (empty if they can)."""
    errors = [
        f"meta/layers: layer {la['index']} of type {la['type']!r} is not replayed"
        for la in layers
        if la["type"] not in REPLAYED_TYPES
    ]
    seen: set[int] = set()
    for blk in blocks:
        if blk.get("type") != "Residual":
            errors.append(f"meta/blocks: block {blk.get('path')} of type {blk.get('type')!r}")
        inside = [*blk["main"], *(blk["shortcut"] or [])]
        if seen & set(inside) or inside != list(range(inside[0], inside[0] + len(inside))):
            errors.append(
                f"meta/blocks: block {blk.get('path')} is nested or not contiguous (replay "
                "runs residual blocks of leaf layers)"
            )
        seen |= set(inside)
    return errors


def replay(
    trace: Mapping[str, np.ndarray], *, rtol: float | None = None, atol: float | None = None
) -> list[str]:
    """Replay every step of ``trace`` (a dict of arrays); return the list of failures.

    Stage-isolated: each step starts from the trace's own parameters, running
    statistics and scores, and every stage is rebuilt in PyTorch from the trace's
    inputs and compared (:class:`Checker`, :data:`TOLERANCES` by ``meta/dtype``):
    masks, the K masked forward passes and their losses (and, for CNNs, the running
    statistics they leave), the weight gradients by autograd, the score gradient
    (:func:`score_gradient`, from the stored losses and masks), the gradient norm and
    clipping and one optimizer step of the weights (from the stored gradients) and of
    the scores, and the projection (:func:`project`).

    MLP traces (``SparseLinear`` and ``Linear`` layers) and CNN traces
    (:data:`REPLAYED_TYPES`: ``Conv2d`` by ``torch.nn.functional.conv2d``,
    ``BatchNorm2d`` by ``batch_norm`` in training mode with the engine's momentum,
    pools, and the residual blocks of ``meta/blocks``, ``relu(main + shortcut)``) are
    replayed. A channel mask multiplies the convolution's output; with
    ``mask_order="after_norm"`` the batch norm after it outputs exactly 0 on a dropped
    channel and leaves its running statistics alone; a weight mask multiplies the
    weight. ``norm_updates`` (``meta/config``) says whether the first pass or every
    pass (in order) updates the running statistics.

    Parameters
    ----------
    trace : dict of str to ndarray
        A trace of any readable format version, as written or as upgraded by
        ``cpusparse.tools.trace.load_trace``.
    rtol, atol : float, optional
        The comparison's tolerances (:data:`TOLERANCES` of the trace's dtype by
        default). Rounding grows with depth: a float64 VGG-19 differs from PyTorch by
        up to about 1e-13 in its first layers' weight gradients.

    Returns
    -------
    failures : list of str
        One line per array that differs (its name first), in computation order
        within each step; empty if the replay agrees.
    """
    t = {k: torch.from_numpy(v) for k, v in trace.items() if v.dtype.kind != "U"}
    cfg = json.loads(str(trace["meta/config"]))
    # Format version 1 (cpusparse 0.1) names the estimator "estimator" and the gradients of
    # each mask pass "*_grad_per_sample", and computes VR-PGE in the paper's form. A version
    # 1 trace read by cpusparse's load_trace has the version 2 names and says where it came
    # from in meta/upgraded_from.
    estimator = cfg.get("score_estimator", cfg.get("estimator"))
    if "meta/upgraded_from" in trace:
        version = int(trace["meta/upgraded_from"])
    else:
        version = int(trace["meta/format_version"]) if "meta/format_version" in trace else 3
    if estimator not in ("vrpge", "vrpge-sqrt", "reinforce"):
        return [
            f"meta/config: score estimator {estimator!r} is not replayed (only vrpge, "
            "vrpge-sqrt and reinforce are)"
        ]
    per = "per_sample" if "step0/layer0/weight_grad_per_sample" in trace else "per_pass"
    with_scores = cfg.get("clip_scope", "weights") == "weights+scores"
    layers = json.loads(str(trace["meta/layers"]))
    blocks = json.loads(str(trace["meta/blocks"])) if "meta/blocks" in trace else []
    errors = _check_blocks(layers, blocks)
    if "meta/blocks" not in trace and any("." in str(la.get("path", "")) for la in layers):
        errors.append("meta/blocks: missing, but meta/layers has layers inside containers")
    if errors:
        return errors
    every_pass = cfg.get("norm_updates", "once") == "every_pass"
    default_rtol, default_atol = TOLERANCES[str(trace["meta/dtype"])]
    check = Checker(
        trace,
        default_rtol if rtol is None else rtol,
        default_atol if atol is None else atol,
    )
    budget = float(trace["meta/budget"])
    prunable = [la["index"] for la in layers if la["prunable"]]
    # The flat parameter list: leaf layers in order, each layer's parameters in order.
    keys = [(la["index"], name) for la in layers for name in _param_names(la)]
    norms = [la["index"] for la in layers if la["type"] == "BatchNorm2d"]

    # Parameters and optimizers persist across steps; their state starts at zero.
    params = {(i, name): t[f"step0/layer{i}/{name}"].clone().requires_grad_() for i, name in keys}
    flat = list(params.values())
    opt: torch.optim.Optimizer
    if cfg["optimizer"] == "adam":
        opt = torch.optim.Adam(flat, lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    else:
        opt = torch.optim.SGD(
            flat,
            lr=cfg["lr"],
            momentum=cfg["momentum"],
            nesterov=cfg["nesterov"],
            weight_decay=cfg["weight_decay"],
        )
    scores = {i: t[f"step0/layer{i}/score"].clone() for i in prunable}
    score_opt: torch.optim.Optimizer
    if cfg["score_optimizer"] == "adam":
        score_opt = torch.optim.Adam(scores.values(), lr=cfg["score_lr"])
    else:
        score_opt = torch.optim.SGD(
            scores.values(), lr=cfg["score_lr"], momentum=cfg["score_momentum"]
        )

    for s in range(int(trace["meta/n_steps"])):
        pre = f"step{s}"
        x, y, losses_ref = t[f"{pre}/x"], t[f"{pre}/y"], t[f"{pre}/losses"]
        layer = [
            {k.split("/")[-1]: v for k, v in t.items() if k.startswith(f"{pre}/layer{i}/")}
            for i in range(len(layers))
        ]
        patterns = {i: layer[i]["pattern"] for i in range(len(layers)) if "pattern" in layer[i]}
        K = losses_ref.shape[0]
        with torch.no_grad():  # start each step from the stored weights and scores
            for (i, name), p in params.items():
                p.copy_(layer[i][name])
            for i in prunable:
                scores[i].copy_(layer[i]["score"])
        running = {i: [layer[i]["running_mean"], layer[i]["running_var"]] for i in norms}
        for i in prunable:  # masks = uniforms < scores, compared in float64
            check(f"{pre}/layer{i}/masks", layer[i]["uniforms"] < layer[i]["score"].double())

        # K masked forward passes on the same batch; autograd for the weight gradients.
        # Running statistics follow the first pass (norm_updates="once") or every pass.
        n_backward = K if cfg["weight_grad"] == "mean" else 1
        losses, grads = [], []
        for k in range(K):
            masks = {i: layer[i]["masks"][k] for i in prunable}
            stats = running if k == 0 or every_pass else None
            try:
                h = _forward_graph(x, layers, blocks, params, patterns, masks, stats)
            except (RuntimeError, ValueError) as exc:  # e.g. shapes that do not chain
                return [*check.failures, f"{pre}: forward pass {k} failed: {exc}"]
            loss = torch.nn.functional.cross_entropy(h, y)  # mean over the batch
            losses.append(float(loss.detach()))
            if k < n_backward:
                grads.append(torch.autograd.grad(loss, flat))
        check(f"{pre}/losses", np.array(losses))
        for i in norms:
            check(f"{pre}/layer{i}/running_mean_updated", running[i][0])
            check(f"{pre}/layer{i}/running_var_updated", running[i][1])
        mean = [_sum(g[j] for g in grads) / n_backward for j in range(len(flat))]
        at = {key: j for j, key in enumerate(keys)}
        for la in layers:
            i, names = la["index"], _param_names(la)
            for name in names:
                per_pass = torch.stack([g[at[(i, name)]] for g in grads])
                check(f"{pre}/layer{i}/{name}_grad_{per}", per_pass)
            for name in names:
                check(f"{pre}/layer{i}/{name}_grad_mean", mean[at[(i, name)]])

        # Stage isolation: the optimizer steps start from the stored gradients, as the
        # score gradient starts from the stored losses (Adam's m / (sqrt(v) + eps) turns
        # the rounding of a gradient that is a residue of an exact 0 into a step).
        mean = [layer[i][f"{name}_grad_mean"] for i, name in keys]

        # Score gradient from the stored losses and masks (checked below).
        dscores = {
            i: score_gradient(
                losses_ref, layer[i]["masks"], layer[i]["score"], estimator, version
            ).to(scores[i].dtype)
            for i in prunable
        }
        # Clip the global norm (accumulated in float64, the parameters in order, then the
        # scores with clip_scope="weights+scores"); one weight step.
        clipped = mean + [dscores[i] for i in prunable] if with_scores else mean
        norm = float(torch.sqrt(_sum((g.double() ** 2).sum() for g in clipped)))
        check(f"{pre}/grad_norm", norm)
        if cfg["clip_norm"] is not None and norm > cfg["clip_norm"]:
            clipped = [g * (cfg["clip_norm"] / norm) for g in clipped]
        mean, score_steps = clipped[: len(flat)], clipped[len(flat) :]
        for p, g in zip(flat, mean, strict=True):
            p.grad = g.clone()
        opt.param_groups[0]["lr"] = float(trace[f"{pre}/lr"])
        opt.step()
        for (i, name), p in params.items():
            check(f"{pre}/layer{i}/{name}_updated", p)

        # The score gradient (stored before clipping); one score step; projection.
        for n, i in enumerate(prunable):
            check(f"{pre}/layer{i}/dscore", dscores[i])
            scores[i].grad = score_steps[n] if with_scores else dscores[i]
        score_opt.param_groups[0]["lr"] = float(trace[f"{pre}/score_lr"])
        score_opt.step()
        units = []  # the flat unit vector: array[pattern] (weight) or the array (neuron)
        for i in prunable:
            check(f"{pre}/layer{i}/score_before_projection", scores[i])
            weight_gran = layers[i]["granularity"] == "weight"
            units.append(scores[i][layer[i]["pattern"]] if weight_gran else scores[i])
        threshold, projected = project(
            torch.cat(units).double(),
            budget,
            cfg["projection"],
            cfg["projection_tol"],
            cfg["projection_max_iter"],
        )
        check(f"{pre}/threshold", threshold)
        start = 0
        for i in prunable:
            dense = torch.zeros_like(scores[i])
            where = layer[i]["pattern"] if layers[i]["granularity"] == "weight" else slice(None)
            n = dense[where].numel()
            dense[where] = projected[start : start + n].to(dense.dtype)
            start += n
            check(f"{pre}/layer{i}/score_projected", dense)
    return check.failures


# ---------------------------------------------------------------------------
# The free-running port
# ---------------------------------------------------------------------------

FREE_RUN_INPUTS = (
    "meta/format_version",
    "meta/dtype",
    "meta/n_steps",
    "meta/budget",
    "meta/config",
    "meta/layers",
    "step0/layer<l>/pattern",
    "step0/layer<l>/weight",
    "step0/layer<l>/bias",
    "step0/layer<l>/score",
    "step<s>/batch_index",
    "step<s>/x",
    "step<s>/y",
    "step<s>/layer<l>/uniforms",
)
"""The arrays a free-running port starts from (``<s>``: any step, ``<l>``: any layer).

The initial parameters, scores and pattern, the data and the uniforms of every step
(a port re-uses the trace's random numbers instead of re-implementing NumPy's PCG64),
and the metadata. Everything else :func:`replay_free` computes.
"""

RESYNC_INPUTS = ("step<s>/layer<l>/masks",)
"""The reference's masks: with ``resync_masks=True`` they replace the port's own."""


def _names_regex(patterns: Iterable[str]) -> re.Pattern[str]:
    alternatives = (re.escape(p).replace("<s>", r"\d+").replace("<l>", r"\d+") for p in patterns)
    return re.compile("|".join(alternatives))


def free_run_inputs(
    trace: Mapping[str, np.ndarray], *, masks: bool = False
) -> dict[str, np.ndarray]:
    """The arrays of ``trace`` that a free-running port may read (:data:`FREE_RUN_INPUTS`).

    Parameters
    ----------
    trace : dict of str to ndarray
        A reference trace.
    masks : bool, default=False
        Also the reference's masks (:data:`RESYNC_INPUTS`).

    Returns
    -------
    inputs : dict of str to ndarray
        The same arrays (not copies), in the trace's order.
    """
    regex = _names_regex(FREE_RUN_INPUTS + (RESYNC_INPUTS if masks else ()))
    return {name: value for name, value in trace.items() if regex.fullmatch(name)}


def learning_rate(base_lr: float, schedule: str, step: int, total_steps: int) -> float:
    r"""The learning rate of step ``step`` (0, 1, ...) of a schedule of ``meta/config``.

    Parameters
    ----------
    base_lr : float
        ``lr`` or ``score_lr`` of ``meta/config``.
    schedule : {"constant", "cosine"}
        ``schedule`` of ``meta/config``.
    step : int
        Number of steps already taken (0 for the first step).
    total_steps : int
        ``total_steps`` of ``meta/config`` (the trace's number of steps).

    Returns
    -------
    lr : float

    Notes
    -----
    The cosine schedule decays to 0 without warm-up, as
    ``torch.optim.lr_scheduler.CosineAnnealingLR(T_max=total_steps, eta_min=0)`` but
    in closed form (the scheduler's recursive form rounds differently):

    .. math::

        \eta_t = \eta_{\min} + \tfrac12 (\eta - \eta_{\min})
        \Big(1 + \cos\frac{\pi t}{T}\Big) \ (t < T), \qquad \eta_t = \eta_{\min} = 0
        \ (t \ge T).

    Examples
    --------
    >>> [learning_rate(0.1, "cosine", t, 4) for t in range(5)]  # doctest: +ELLIPSIS
    [0.1, 0.085..., 0.05..., 0.014..., 0.0]
    """
    if schedule == "constant":
        return base_lr
    if schedule != "cosine":
        raise ValueError(f"schedule must be 'constant' or 'cosine', got {schedule!r}")
    min_lr = 0.0
    if step >= total_steps:
        return min_lr
    progress = step / total_steps
    return min_lr + 0.5 * (base_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def _optimizer(
    kind: str,
    params: list[torch.Tensor],
    lr: float,
    *,
    momentum: float,
    nesterov: bool,
    weight_decay: float,
) -> torch.optim.Optimizer:
    """``torch.optim.Adam`` (betas, eps at their defaults) or ``SGD`` (dampening 0)."""
    if kind == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay, foreach=False)
    if kind == "sgd":
        return torch.optim.SGD(
            params,
            lr=lr,
            momentum=momentum,
            nesterov=nesterov,
            weight_decay=weight_decay,
            foreach=False,
        )
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got {kind!r}")


def _weight_optimizer(cfg: Mapping[str, Any], params: list[torch.Tensor]) -> torch.optim.Optimizer:
    """The optimizer of the weights and biases (L2 weight decay on them only)."""
    return _optimizer(
        str(cfg["optimizer"]),
        params,
        float(cfg["lr"]),
        momentum=float(cfg["momentum"]),
        nesterov=bool(cfg["nesterov"]),
        weight_decay=float(cfg["weight_decay"]),
    )


def _score_optimizer(cfg: Mapping[str, Any], scores: list[torch.Tensor]) -> torch.optim.Optimizer:
    """The optimizer of the scores: no weight decay, no Nesterov."""
    return _optimizer(
        str(cfg["score_optimizer"]),
        scores,
        float(cfg["score_lr"]),
        momentum=float(cfg["score_momentum"]),
        nesterov=False,
        weight_decay=0.0,
    )


def _optimizer_state(
    opt: torch.optim.Optimizer, param: torch.Tensor, prefix: str, out: dict[str, np.ndarray]
) -> None:
    """Write the state of one parameter as ``<prefix>/step``, ``exp_avg``, ... arrays."""
    state = opt.state[param]
    for key in ("step", "exp_avg", "exp_avg_sq", "momentum_buffer"):
        value = state.get(key)
        if value is None:  # SGD without momentum keeps no buffer; Adam no buffer at all
            continue
        if key == "step":
            out[f"{prefix}/step"] = np.array(int(value), dtype=np.int64)
        else:
            out[f"{prefix}/{key}"] = _numpy(value)


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    """A NumPy copy of ``tensor`` (never a view of a parameter that changes later)."""
    return tensor.detach().numpy().copy()


def _forward(
    x: torch.Tensor,
    params: list[list[torch.Tensor]],
    layers: list[dict],
    patterns: list[torch.Tensor],
    masks: Mapping[int, torch.Tensor],
) -> torch.Tensor:
    """Logits of one masked pass: ``masks[l]`` is the mask of prunable layer ``l``."""
    h = x
    for i, (weight, bias) in enumerate(params):
        keep = patterns[i]
        weight_mask = i in masks and layers[i]["granularity"] == "weight"
        if weight_mask:
            keep = keep & masks[i]
        h = h @ (weight * keep).T + bias
        if layers[i]["activation"] == "relu":
            h = torch.relu(h)
        if i in masks and not weight_mask:  # neuron: a dropped unit outputs 0, bias included
            h = h * masks[i]
    return h


@dataclasses.dataclass
class FreeRun:
    """Result of :func:`replay_free`.

    Attributes
    ----------
    trace : dict of str to ndarray
        The port's own trace: every array name of a reference trace (and the trivial
        ``meta/*`` ones: format_version, dtype, n_steps, n_units, budget, config,
        layers), empty if ``errors`` is not. ``masks`` are the masks the port used.
    mask_flips : dict of str to int
        Per ``step<s>/layer<l>/masks`` of the reference: how many decisions
        ``uniforms < score`` on the port's own scores differ from the reference's
        masks (with ``resync_masks=True``, decisions that were resynchronised).
    errors : list of str
        Why the trace could not be run (e.g. an estimator that is not ported).
    """

    trace: dict[str, np.ndarray]
    mask_flips: dict[str, int]
    errors: list[str]

    @property
    def n_mask_flips(self) -> int:
        """Total number of flipped mask decisions over all steps and layers."""
        return sum(self.mask_flips.values())


def replay_free(trace: Mapping[str, np.ndarray], *, resync_masks: bool = True) -> FreeRun:
    r"""Run every step of ``trace`` from step 0 on the port's own state; write its trace.

    A free-running PyTorch port of the trace format: it reads only
    :func:`free_run_inputs` of ``trace`` (initial weights, biases, patterns and
    scores; the data and the uniforms of every step; ``meta/config``,
    ``meta/layers``, ``meta/budget``; and the reference's masks, to count flipped
    decisions and, with ``resync_masks``, to use them) and then computes everything
    itself, step after step: masks ``uniforms < score`` from its own scores, K masked
    forward passes and the backward passes with autograd, the weight-gradient mean
    (or the first pass's), its own score gradient from its own losses
    (:func:`score_gradient`, format version 2), the global-norm clipping (of the
    weights, or of weights and scores with ``clip_scope="weights+scores"``), one
    ``torch.optim.Adam``/``SGD`` step of the weights and of the scores (states
    carried across steps), the learning-rate schedule (:func:`learning_rate`) and
    the projection (:func:`project`).

    Parameters
    ----------
    trace : dict of str to ndarray
        A reference trace of format version 2 or 3 (or without ``meta/format_version``).
    resync_masks : bool, default=True
        Use the reference's masks (when ``trace`` has them) instead of the port's own.
        In float32 a decision ``u < s`` flips when the port's score differs from the
        reference's by rounding, and one flipped mask changes a loss, hence every
        later step; resynchronising keeps the comparison meaningful.
        :attr:`FreeRun.mask_flips` counts the decisions that differ either way.

    Returns
    -------
    FreeRun
        The port's trace (compare it with ``cpusparse verify REF OTHER`` or
        ``cpusparse.tools.trace.compare_traces(ref, run.trace)``: at the default
        tolerances in float64, at :func:`float32_tolerances` in float32), the mask
        flips, and the reasons if the trace cannot be run (straight-through, a
        version 1 trace, a CNN trace or any layers other than (sparse) linear ones, a
        non-finite loss). CNN traces are checked by the stage-isolated :func:`replay`
        only.

    Notes
    -----
    Losses are stored as the float64 mean of the per-sample losses of the trace's
    dtype; the backward pass differentiates their mean in the trace's dtype. The
    gradient norm and the projection are computed in float64; the score gradient in
    float64 and cast to the trace's dtype.
    """
    # An upgraded trace (cpusparse's load_trace) says version 3 but keeps version 1 values.
    # Versions 2 and 3 differ only in how the uniforms were drawn, which are inputs here.
    version = int(trace.get("meta/upgraded_from", trace.get("meta/format_version", 3)))
    if version not in (2, 3):
        return FreeRun(
            {},
            {},
            [
                f"meta/format_version: the trace's values are of format version {version}; "
                "replay_free runs versions 2 and 3 (VR-PGE with the mean mask)"
            ],
        )
    inputs = free_run_inputs(trace, masks=True)
    cfg = json.loads(str(inputs["meta/config"]))
    layers = json.loads(str(inputs["meta/layers"]))
    estimator = cfg["score_estimator"]
    errors = []
    if estimator not in ("vrpge", "vrpge-sqrt", "reinforce"):
        errors.append(
            f"meta/config: score estimator {estimator!r} is not ported by replay_free (only "
            "vrpge, vrpge-sqrt and reinforce are: straight-through needs the chain-rule "
            "gradient with respect to the masks)"
        )
    cnn = sorted({la["type"] for la in layers if la["type"] in CNN_TYPES})
    if cnn or "meta/blocks" in trace:
        errors.append(
            f"meta/layers: a CNN trace ({', '.join(cnn) or 'residual blocks'}) is not run by "
            "replay_free, which ports MLP traces (SparseLinear and Linear layers) only; "
            "check a CNN trace stage by stage with replay()"
        )
    for la in layers:
        if la["type"] not in ("SparseLinear", "Linear") and la["type"] not in CNN_TYPES:
            errors.append(f"meta/layers: layer {la['index']} of type {la['type']!r} is not ported")
    if errors:
        return FreeRun({}, {}, errors)

    t = {k: torch.from_numpy(v) for k, v in inputs.items() if v.dtype.kind != "U"}
    dtype_name = str(inputs["meta/dtype"])
    n_steps = int(inputs["meta/n_steps"])
    budget = float(inputs["meta/budget"])
    n_masks = int(cfg["n_masks"])
    n_backward = n_masks if cfg["weight_grad"] == "mean" else 1
    with_scores = cfg.get("clip_scope", "weights") == "weights+scores"
    prunable = [la["index"] for la in layers if la["prunable"]]
    weight_units = {i: layers[i]["granularity"] == "weight" for i in prunable}
    patterns = [t[f"step0/layer{i}/pattern"] for i in range(len(layers))]
    n_units = sum(
        int(patterns[i].sum()) if weight_units[i] else layers[i]["n_out"] for i in prunable
    )
    out: dict[str, np.ndarray] = {
        "meta/format_version": np.array(3, dtype=np.int64),
        "meta/dtype": np.array(dtype_name),
        "meta/n_steps": np.array(n_steps, dtype=np.int64),
        "meta/n_units": np.array(n_units, dtype=np.int64),
        "meta/budget": np.array(budget, dtype=np.float64),
        "meta/config": np.array(str(inputs["meta/config"])),
        "meta/layers": np.array(str(inputs["meta/layers"])),
        "meta/port": np.array(
            f"cpusparse.testing.replay_torch.replay_free, torch {torch.__version__}"
        ),
    }
    mask_flips: dict[str, int] = {}

    # The port's state: parameters, scores and both optimizers (zero state at step 0).
    params = [
        [t[f"step0/layer{i}/{name}"].clone().requires_grad_() for name in ("weight", "bias")]
        for i in range(len(layers))
    ]
    flat = [p for pair in params for p in pair]
    scores = {i: t[f"step0/layer{i}/score"].clone() for i in prunable}
    weight_opt = _weight_optimizer(cfg, flat)
    score_opt = _score_optimizer(cfg, list(scores.values()))

    for s in range(n_steps):
        pre = f"step{s}"
        x, y = t[f"{pre}/x"], t[f"{pre}/y"]
        for name in ("batch_index", "x", "y"):
            if f"{pre}/{name}" in inputs:
                out[f"{pre}/{name}"] = inputs[f"{pre}/{name}"].copy()
        lr = learning_rate(cfg["lr"], cfg["schedule"], s, cfg["total_steps"])
        score_lr = learning_rate(cfg["score_lr"], cfg["schedule"], s, cfg["total_steps"])
        layer_out: list[dict[str, np.ndarray]] = [{} for _ in layers]
        for i, (weight, bias) in enumerate(params):
            layer_out[i]["pattern"] = _numpy(patterns[i])
            layer_out[i]["weight"] = _numpy(weight)
            layer_out[i]["bias"] = _numpy(bias)

        # 1. Masks from the port's own scores (or the reference's, resynchronised).
        masks = {}
        for i in prunable:
            uniforms = t[f"{pre}/layer{i}/uniforms"]
            own = uniforms < scores[i].double()
            masks[i] = own
            ref_name = f"{pre}/layer{i}/masks"
            if ref_name in t:
                mask_flips[ref_name] = int((own != t[ref_name]).sum())
                if resync_masks:
                    masks[i] = t[ref_name]
            layer_out[i]["score"] = _numpy(scores[i])
            layer_out[i]["uniforms"] = inputs[f"{pre}/layer{i}/uniforms"].copy()
            layer_out[i]["masks"] = _numpy(masks[i])

        # 2.-3. K masked forward passes; autograd for the first n_backward of them.
        losses, grads = [], []
        for k in range(n_masks):
            logits = _forward(x, params, layers, patterns, {i: masks[i][k] for i in prunable})
            per_sample = torch.nn.functional.cross_entropy(logits, y, reduction="none")
            losses.append(float(per_sample.detach().double().mean()))
            if k < n_backward:
                grads.append(torch.autograd.grad(per_sample.mean(), flat))
        if not all(math.isfinite(v) for v in losses):
            return FreeRun({}, mask_flips, [f"{pre}/losses: non-finite loss {losses}"])
        out[f"{pre}/losses"] = np.array(losses, dtype=np.float64)
        mean = [_sum(g[j] for g in grads) / n_backward for j in range(len(flat))]
        for i in range(len(layers)):
            for j, name in enumerate(("weight", "bias")):
                per_pass = torch.stack([g[2 * i + j] for g in grads])
                layer_out[i][f"{name}_grad_per_pass"] = _numpy(per_pass)
                layer_out[i][f"{name}_grad_mean"] = _numpy(mean[2 * i + j])

        # 4. Score gradient from the port's own losses and masks (float64, then cast).
        losses64 = torch.tensor(losses, dtype=torch.float64)
        dscores = []
        for i in prunable:
            dscore = score_gradient(losses64, masks[i], scores[i], estimator).to(scores[i].dtype)
            layer_out[i]["dscore"] = _numpy(dscore)  # stored before clipping
            dscores.append(dscore)

        # 5. Clip the global norm (accumulated in float64, weights then biases layer by
        #    layer, then the scores with clip_scope="weights+scores"); one step of each
        #    optimizer.
        clipped = mean + dscores if with_scores else mean
        norm = float(torch.sqrt(_sum((g.double() ** 2).sum() for g in clipped)))
        out[f"{pre}/grad_norm"] = np.array(norm, dtype=np.float64)
        if cfg["clip_norm"] is not None and norm > cfg["clip_norm"]:
            clipped = [g * (cfg["clip_norm"] / norm) for g in clipped]
        for p, g in zip(flat, clipped[: len(flat)], strict=True):
            p.grad = g.clone()
        for i, g in zip(prunable, clipped[len(flat) :] if with_scores else dscores, strict=True):
            scores[i].grad = g
        weight_opt.param_groups[0]["lr"] = lr
        weight_opt.step()
        score_opt.param_groups[0]["lr"] = score_lr
        score_opt.step()
        out[f"{pre}/lr"] = np.array(lr, dtype=np.float64)
        out[f"{pre}/score_lr"] = np.array(score_lr, dtype=np.float64)

        # 6. Projection over the flat unit vector (float64), back into each layer.
        units = [scores[i][patterns[i]] if weight_units[i] else scores[i] for i in prunable]
        for i in prunable:
            layer_out[i]["score_before_projection"] = _numpy(scores[i])
        threshold, projected = project(
            torch.cat(units).double(),
            budget,
            cfg["projection"],
            cfg["projection_tol"],
            cfg["projection_max_iter"],
        )
        out[f"{pre}/threshold"] = np.array(threshold, dtype=np.float64)
        start = 0
        with torch.no_grad():
            for i in prunable:
                dense = torch.zeros_like(scores[i])
                where = patterns[i] if weight_units[i] else slice(None)
                n = dense[where].numel()
                dense[where] = projected[start : start + n].to(dense.dtype)
                start += n
                scores[i].copy_(dense)  # in place: the score optimizer holds this tensor
                layer_out[i]["score_projected"] = _numpy(scores[i])

        for i, (weight, bias) in enumerate(params):
            layer_out[i]["weight_updated"] = _numpy(weight)
            layer_out[i]["bias_updated"] = _numpy(bias)
            _optimizer_state(weight_opt, weight, "weight_state", layer_out[i])
            _optimizer_state(weight_opt, bias, "bias_state", layer_out[i])
            if i in scores:
                _optimizer_state(score_opt, scores[i], "score_state", layer_out[i])
            out.update({f"{pre}/layer{i}/{name}": v for name, v in layer_out[i].items()})
    return FreeRun(out, mask_flips, [])


# ---------------------------------------------------------------------------
# Order of the stages, for reading a comparison
# ---------------------------------------------------------------------------

_STAGES = (
    ("batch_index", "x", "y", "lr", "score_lr", "pattern", "weight", "bias", "score"),
    ("running_mean", "running_var"),
    ("uniforms",),
    ("masks",),
    ("losses",),
    ("running_mean_updated", "running_var_updated"),
    ("weight_grad_per_pass", "bias_grad_per_pass"),
    ("weight_grad_mean", "bias_grad_mean"),
    ("dscore",),
    ("grad_norm",),
    ("weight_updated", "bias_updated", "weight_state", "bias_state"),
    ("score_state", "score_before_projection"),
    ("threshold",),
    ("score_projected",),
)
_STAGE_OF = {name: i for i, names in enumerate(_STAGES) for name in names}
_STEP_NAME_RE = re.compile(r"step(\d+)/(?:layer(\d+)/)?([^/]+)")


def stage_key(name: str) -> tuple[int, int, int, str]:
    """Sort key of a trace array name in the order a step computes it.

    A trace lists the arrays of a step layer by layer, so the first mismatch of a
    comparison in file order is rarely the first one computed. Sorting the
    mismatches' names by this key (step, then stage in the documented order within a
    step: inputs, running statistics, uniforms, masks, losses, updated running
    statistics, weight gradients, their mean, score gradient, norm, weight step, score
    step, threshold, projection; then layer)
    gives the stage where a port starts to diverge.

    Parameters
    ----------
    name : str
        E.g. ``"step1/layer0/dscore"``.

    Returns
    -------
    key : tuple of (int, int, int, str)
        ``(step, stage, layer, name)``; ``meta/*`` arrays sort first, unknown names
        last in their step.

    Examples
    --------
    >>> sorted(["step0/threshold", "step0/layer0/weight_updated", "step0/layer1/dscore"],
    ...        key=stage_key)
    ['step0/layer1/dscore', 'step0/layer0/weight_updated', 'step0/threshold']
    """
    match = _STEP_NAME_RE.match(name)
    if match is None:
        return (-1, -1, -1, name)
    step, layer, stage = match.groups()
    return (
        int(step),
        _STAGE_OF.get(stage, len(_STAGES)),
        -1 if layer is None else int(layer),
        name,
    )


# ---------------------------------------------------------------------------
# Error model of a free-running float32 port
# ---------------------------------------------------------------------------

EPS32 = float(np.finfo(np.float32).eps)
"""Machine epsilon of float32, ``2**-23``: the unit of the float32 error model."""

LOSS_ULPS = 1.0
"""Bound on ``|L_k(port) - L_k(ref)|`` in units of ``EPS32 * max_k |L_k|`` (measured: 0.54)."""

GRAD_ULPS = 16.0
"""Bound on a weight-gradient error in units of ``EPS32 * max |gradient array|`` (measured: 3.8)."""

ROUND_ULPS = 4.0
"""Rounding of one stored float32 value, relative, in units of ``EPS32`` (the ``rtol``)."""


def dscore_error_bound(
    losses: npt.ArrayLike,
    masks: npt.ArrayLike,
    score: npt.ArrayLike,
    estimator: str,
    *,
    loss_error: float,
    score_error: npt.ArrayLike = 0.0,
) -> np.ndarray:
    r"""Elementwise bound on the error of a port's score gradient.

    Parameters
    ----------
    losses : array-like of shape (K,)
        The reference's losses.
    masks : array-like of bool, shape (K,) + S
        The masks (the same in the port and the reference).
    score : array-like of shape S
        The reference's scores.
    estimator : {"vrpge", "vrpge-sqrt", "reinforce"}
    loss_error : float
        Bound on ``|L_k(port) - L_k(ref)|`` (the same for every k).
    score_error : float or array-like of shape S, default=0.0
        Bound on ``|s(port) - s(ref)|``.

    Returns
    -------
    bound : ndarray of float64, shape S
        0 where ``s`` is 0 or 1 and, for VR-PGE, where all K masks agree (the
        estimate is exactly 0 there in every correct port).

    Notes
    -----
    VR-PGE is :math:`\hat g = N / d(s)` with :math:`N = \frac{1}{K-1} \sum_k c_k
    (m_k - \bar m)`, :math:`c_k = L_k - \bar L` and :math:`d = s(1-s)` (or its square
    root). The centred losses are differences of losses, so an error :math:`\delta`
    on every :math:`L_k` gives :math:`|\delta c_k| \le 2\delta`: the error grows
    with the losses' magnitude, not with :math:`\hat g`'s,

    .. math::

        |\delta \hat g| \le \frac{2 \delta \sum_k |m_k - \bar m|}{(K - 1)\, d(s)}
        + |N| \frac{|d'(s)|}{d(s)^2} \delta_s
        + \tfrac12 \epsilon_{32} |\hat g| ,

    the second term for the port's scores being off by :math:`\delta_s` (with
    :math:`d' = 1 - 2s`, or :math:`(1 - 2s) / (2\sqrt{s(1-s)})`), the third for
    the cast to float32. REINFORCE, :math:`N = \frac1K \sum_k L_k (m_k - s)`, gets
    :math:`\frac{\delta}{K} \sum_k |m_k - s| + |\bar L| \delta_s` for
    :math:`|\delta N|`.
    """
    losses = np.asarray(losses, dtype=np.float64)
    m = np.asarray(masks, dtype=np.float64)
    s = np.asarray(score, dtype=np.float64)
    ds = np.broadcast_to(np.asarray(score_error, dtype=np.float64), s.shape)
    n_masks = losses.shape[0]
    interior = (s > 0) & (s < 1)
    var = np.where(interior, s * (1 - s), 1.0)
    if estimator == "vrpge-sqrt":
        denom, slope = np.sqrt(var), np.abs(1 - 2 * s) / (2 * np.sqrt(var))
    else:
        denom, slope = var, np.abs(1 - 2 * s)
    if estimator == "reinforce":
        numer = (losses.reshape((-1,) + (1,) * s.ndim) * (m - s)).sum(0) / n_masks
        numer_err = loss_error * np.abs(m - s).sum(0) / n_masks + abs(losses.mean()) * ds
    else:
        centered = losses - losses.mean()
        spread = m - m.mean(0)
        numer = (centered.reshape((-1,) + (1,) * s.ndim) * spread).sum(0) / (n_masks - 1)
        numer_err = 2 * loss_error * np.abs(spread).sum(0) / (n_masks - 1)
    bound = numer_err / denom + np.abs(numer) * slope / denom**2 * ds
    bound += 0.5 * EPS32 * np.abs(numer / denom)
    return np.where(interior, bound, 0.0)


def _adam_derivative_bound(
    t: int, d_hist: list[np.ndarray], dd_hist: list[np.ndarray], m: np.ndarray, v: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """First-order bounds on the errors of Adam's update, exp_avg and exp_avg_sq.

    ``t`` updates so far, ``d_hist[j]`` the reference's gradients (weight decay
    included) of update ``j + 1`` and ``dd_hist[j]`` bounds on their errors, ``m`` and
    ``v`` the reference's moments after update ``t``.
    """
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    bc1, bc2 = 1 - beta1**t, 1 - beta2**t
    vhat = v / bc2
    root = np.sqrt(vhat)
    denom = root + eps
    safe_root = np.where(root > 0, root, 1.0)
    du = np.zeros_like(m)
    dm = np.zeros_like(m)
    dv = np.zeros_like(m)
    for j, (d, dd) in enumerate(zip(d_hist, dd_hist, strict=True)):
        w1 = (1 - beta1) * beta1 ** (t - 1 - j)
        w2 = (1 - beta2) * beta2 ** (t - 1 - j)
        dm += w1 * dd
        dv += 2 * w2 * np.abs(d) * dd
        # dU/dd_j of U = (m / bc1) / (sqrt(v / bc2) + eps), with its sign: at t = 1 the
        # two terms cancel (U = d / (|d| + eps) hardly depends on d).
        dmean = w1 / (bc1 * denom)
        dsq = np.where(root > 0, (m / bc1) * w2 * d / (bc2 * safe_root * denom**2), 0.0)
        du += np.abs(dmean - dsq) * dd
    # |U| <= (sqrt(bc2) / bc1) (1 - beta1) / sqrt(1 - beta2) sqrt(sum_k (beta1^2 / beta2)^k)
    ratio = beta1**2 / beta2
    u_max = (
        math.sqrt(bc2) / bc1 * (1 - beta1) / math.sqrt(1 - beta2)
        * math.sqrt((1 - ratio**t) / (1 - ratio))
    )  # fmt: skip
    return np.minimum(du, 2 * u_max), dm, dv


def _update_error(
    kind: str,
    hyper: Mapping[str, float],
    t: int,
    d_hist: list[np.ndarray],
    dd_hist: list[np.ndarray],
    state: Mapping[str, np.ndarray],
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Bound on the error of one optimizer update direction and of its state arrays."""
    if kind == "adam":
        m, v = state["exp_avg"].astype(np.float64), state["exp_avg_sq"].astype(np.float64)
        du, dm, dv = _adam_derivative_bound(t, d_hist, dd_hist, m, v)
        return du, {"exp_avg": dm, "exp_avg_sq": dv}
    momentum = hyper["momentum"]
    if momentum == 0:
        return dd_hist[-1], {}
    dbuf = np.zeros_like(dd_hist[-1])
    for j, dd in enumerate(dd_hist):
        dbuf += momentum ** (t - 1 - j) * dd
    du = dd_hist[-1] + momentum * dbuf if hyper["nesterov"] else dbuf
    return du, {"momentum_buffer": dbuf}


def _clipped(
    g: np.ndarray, dg: np.ndarray, scale: float, norm_rel_err: float
) -> tuple[np.ndarray, np.ndarray]:
    """A gradient scaled by ``scale = min(1, c / |g|)`` and its error bound.

    ``d(c g / |g|) = (c / |g|) (dg + |g| d|g| / |g|)``, with ``norm_rel_err = d|g| / |g|``.
    """
    if scale == 1.0:
        return g, dg
    return scale * g, scale * (dg + np.abs(g) * norm_rel_err)


def float32_error_bounds(trace: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    r"""Elementwise bounds on the errors of a correct free-running float32 port.

    The model of :func:`float32_tolerances`, elementwise: for every floating array
    of ``trace`` (a reference trace), a float64 array of the same shape bounding
    ``|port - ref|`` for a port run with ``resync_masks=True``, to which a relative
    ``ROUND_ULPS * EPS32 * |ref|`` is added.

    Parameters
    ----------
    trace : dict of str to ndarray
        A float32 (or float64: the same model, in float32 units) reference trace
        of a vrpge, vrpge-sqrt or reinforce run.

    Returns
    -------
    bounds : dict of str to ndarray

    Raises
    ------
    ValueError
        For a CNN trace (:data:`CNN_TYPES`): the model is that of the MLP port
        :func:`replay_free`.

    Notes
    -----
    With :math:`\epsilon = 2^{-23}` and the masks shared, a first-order model of the
    differences between two correct float32 implementations, evaluated on the
    reference's arrays, step after step:

    - The data, uniforms, learning rates and step counts are exact.
    - Losses: :math:`\delta_L = \text{LOSS\_ULPS}\ \epsilon \max_k |L_k|` (float32
      per-sample losses; the weights differ only by rounding since, masks given, the
      weight path does not depend on the scores).
    - Weight gradients: :math:`\text{GRAD\_ULPS}\ \epsilon \max |g|` over the array,
      and 0 where the reference's is exactly 0 (dropped entries, dead units).
    - Score gradient: :func:`dscore_error_bound` with the losses' and the scores'
      errors: an absolute error proportional to the losses, not to the gradient.
    - The norm: :math:`\|\delta g\|_2` over the clipped gradients (with
      ``clip_scope="weights+scores"`` the score gradient's too); clipping to
      :math:`c` turns :math:`\delta g` into :math:`\frac{c}{\|g\|}(\delta g + |g|
      \frac{\delta \|g\|}{\|g\|})`.
    - Optimizer steps propagate the gradients' errors at first order: SGD
      linearly (momentum sums), Adam through its exact derivative
      :math:`\partial U_t / \partial d_j` of the normalised update
      :math:`U_t = \hat m_t / (\sqrt{\hat v_t} + \epsilon_{Adam})` with respect to
      every past gradient :math:`d_j`, evaluated on the reference's gradients and
      moments (so the insensitive first update, :math:`U_1 = d / (|d| + \epsilon)`,
      and the sensitive ones, of gradients close to 0, both get their due); a
      parameter's error accumulates :math:`\eta_t |\delta U_t|` plus the rounding
      :math:`\text{ROUND\_ULPS}\ \epsilon (|\theta| + \eta_t |U_t|)` of each update.
    - Projection: the threshold is :math:`v = (|U| + \sum_A s_i - k) / |A|` on the
      reference's active set :math:`A` (exact method), so :math:`|\delta v| \le`
      the mean of the scores' error bounds over :math:`A`; a bisection's midpoints
      are fixed fractions of :math:`\max s`, so :math:`|\delta v| \le (v / \max s)
      \delta_{s_{\max}}`. The projected scores get :math:`\delta_s + |\delta v|`.

    Not modelled (a correct port can still differ there): a decision that flips on
    rounding besides the masks (a ReLU at exactly 0, a bisection test
    :math:`|f(v) - k| <` tol, a score reaching exactly 0 or 1).
    """
    cfg = json.loads(str(trace["meta/config"]))
    layers = json.loads(str(trace["meta/layers"]))
    cnn = sorted({la["type"] for la in layers if la["type"] in CNN_TYPES})
    if cnn:
        raise ValueError(
            f"trace must be an MLP trace (the error model is that of replay_free), got a "
            f"CNN trace with layers of type {', '.join(cnn)}"
        )
    n_steps = int(trace["meta/n_steps"])
    estimator = cfg["score_estimator"]
    prunable = [la["index"] for la in layers if la["prunable"]]
    weight_units = {i: layers[i]["granularity"] == "weight" for i in prunable}
    patterns = [np.asarray(trace[f"step0/layer{i}/pattern"]) for i in range(len(layers))]
    weight_hyper = {"momentum": cfg["momentum"], "nesterov": cfg["nesterov"]}
    score_hyper = {"momentum": cfg["score_momentum"], "nesterov": False}
    with_scores = cfg.get("clip_scope", "weights") == "weights+scores"
    eps = EPS32
    bounds = {
        name: np.zeros(value.shape)
        for name, value in trace.items()
        if value.dtype.kind == "f" and not name.startswith("meta/")
    }

    def f64(name: str) -> np.ndarray:
        return np.asarray(trace[name], dtype=np.float64)

    def rounding(values: np.ndarray) -> np.ndarray:
        return ROUND_ULPS * eps * np.abs(values)

    # Per parameter: error bound of its value, gradient history and its error bounds.
    params = [(i, name) for i in range(len(layers)) for name in ("weight", "bias")]
    theta_err = {
        key: np.zeros(patterns[key[0]].shape[: 2 if key[1] == "weight" else 1]) for key in params
    }
    d_hist: dict[object, list[np.ndarray]] = {key: [] for key in params}
    dd_hist: dict[object, list[np.ndarray]] = {key: [] for key in params}
    score_err = {i: np.zeros(trace[f"step0/layer{i}/score"].shape) for i in prunable}
    for i in prunable:
        d_hist[i], dd_hist[i] = [], []

    for s in range(n_steps):
        pre = f"step{s}"
        t = s + 1
        lr, score_lr = float(trace[f"{pre}/lr"]), float(trace[f"{pre}/score_lr"])
        losses = f64(f"{pre}/losses")
        loss_err = LOSS_ULPS * eps * float(np.abs(losses).max())
        bounds[f"{pre}/losses"][...] = loss_err

        # Weight and score gradients, their norm and the clipping.
        grad_err = {}
        for i, name in params:
            lpre = f"{pre}/layer{i}/{name}"
            bounds[f"{lpre}"][...] = theta_err[(i, name)]
            for what in ("grad_mean", "grad_per_pass"):
                g = f64(f"{lpre}_{what}")
                scale = GRAD_ULPS * eps * float(np.abs(g).max(initial=0.0))
                bounds[f"{lpre}_{what}"] = np.where(g != 0, scale, 0.0)
            grad_err[(i, name)] = bounds[f"{lpre}_grad_mean"]
        for i in prunable:
            lpre = f"{pre}/layer{i}"
            bounds[f"{lpre}/score"] = score_err[i]
            bounds[f"{lpre}/dscore"] = dscore_error_bound(
                losses,
                trace[f"{lpre}/masks"],
                trace[f"{lpre}/score"],
                estimator,
                loss_error=loss_err,
                score_error=score_err[i],
            )
        in_norm = list(grad_err.values())
        if with_scores:
            in_norm += [bounds[f"{pre}/layer{i}/dscore"] for i in prunable]
        norm = float(trace[f"{pre}/grad_norm"])
        norm_err = math.sqrt(sum(float((e**2).sum()) for e in in_norm))
        bounds[f"{pre}/grad_norm"][...] = norm_err
        clip = cfg["clip_norm"]
        scale = 1.0 if clip is None or norm <= clip else clip / norm

        # The weight step.
        for i, name in params:
            lpre = f"{pre}/layer{i}/{name}"
            g, dg = _clipped(f64(f"{lpre}_grad_mean"), grad_err[(i, name)], scale, norm_err / norm)
            theta = f64(lpre)
            d_hist[(i, name)].append(g + cfg["weight_decay"] * theta)
            dd_hist[(i, name)].append(dg + cfg["weight_decay"] * theta_err[(i, name)])
            state = {
                key.rsplit("/", 1)[1]: trace[key]
                for key in trace
                if key.startswith(f"{lpre}_state/") and trace[key].ndim > 0
            }
            du, state_err = _update_error(
                cfg["optimizer"], weight_hyper, t, d_hist[(i, name)], dd_hist[(i, name)], state
            )
            for key, err in state_err.items():
                bounds[f"{lpre}_state/{key}"] = err
            updated = f64(f"{lpre}_updated")
            theta_err[(i, name)] = theta_err[(i, name)] + lr * du
            theta_err[(i, name)] += rounding(updated) + rounding(updated - theta)
            bounds[f"{lpre}_updated"] = theta_err[(i, name)]

        # The score step (no weight decay; clipped with clip_scope="weights+scores").
        before_err = {}
        for i in prunable:
            lpre = f"{pre}/layer{i}"
            g, dg = f64(f"{lpre}/dscore"), bounds[f"{lpre}/dscore"]
            if with_scores:
                g, dg = _clipped(g, dg, scale, norm_err / norm)
            d_hist[i].append(g)
            dd_hist[i].append(dg)
            state = {
                key.rsplit("/", 1)[1]: trace[key]
                for key in trace
                if key.startswith(f"{lpre}/score_state/") and trace[key].ndim > 0
            }
            du, state_err = _update_error(
                cfg["score_optimizer"], score_hyper, t, d_hist[i], dd_hist[i], state
            )
            for key, err in state_err.items():
                bounds[f"{lpre}/score_state/{key}"] = err
            before = f64(f"{lpre}/score_before_projection")
            step = before - f64(f"{lpre}/score")
            before_err[i] = score_err[i] + score_lr * du + rounding(before) + rounding(step)
            bounds[f"{lpre}/score_before_projection"] = before_err[i]

        # The projection over the flat unit vector.
        threshold = float(trace[f"{pre}/threshold"])
        flat = [f64(f"{pre}/layer{i}/score_before_projection") for i in prunable]
        flat_err = [before_err[i] for i in prunable]
        if any(weight_units.values()):
            flat = [
                a[patterns[i]] if weight_units[i] else a
                for i, a in zip(prunable, flat, strict=True)
            ]
            flat_err = [
                a[patterns[i]] if weight_units[i] else a
                for i, a in zip(prunable, flat_err, strict=True)
            ]
        units, units_err = np.concatenate(flat), np.concatenate(flat_err)
        if threshold == 0.0:
            threshold_err = 0.0
        elif cfg["projection"] == "bisection":
            top = int(np.argmax(units))
            threshold_err = threshold / units[top] * float(units_err[top])
        else:
            active = (units > threshold) & (units < threshold + 1)
            threshold_err = float(units_err[active].mean()) if active.any() else 0.0
        bounds[f"{pre}/threshold"][...] = threshold_err + rounding(np.array(threshold))
        for i in prunable:
            lpre = f"{pre}/layer{i}"
            projected = f64(f"{lpre}/score_projected")
            inside = patterns[i] if weight_units[i] else np.ones(projected.shape, dtype=bool)
            score_err[i] = np.where(inside, before_err[i] + threshold_err, 0.0) + rounding(
                projected
            )
            bounds[f"{lpre}/score_projected"] = score_err[i]
    return bounds


def float32_tolerances(trace: Mapping[str, np.ndarray]) -> dict[str, tuple[float, float]]:
    """Per-array ``(rtol, atol)`` that a correct free-running float32 port meets.

    For ``compare_traces(ref, port, include=[name], rtol=rtol, atol=atol)`` (or
    ``cpusparse verify --only NAME --rtol RTOL --atol ATOL``), array by array:
    ``rtol = ROUND_ULPS * EPS32`` and ``atol`` the largest of
    :func:`float32_error_bounds` over the array (see there for the model).

    Parameters
    ----------
    trace : dict of str to ndarray
        The reference trace (float32).

    Returns
    -------
    tolerances : dict of str to (float, float)
        For every floating, non-metadata array of ``trace``.
    """
    rtol = ROUND_ULPS * EPS32
    return {
        name: (rtol, float(bound.max(initial=0.0)))
        for name, bound in float32_error_bounds(trace).items()
    }


def _save_npz(path: str, arrays: Mapping[str, np.ndarray]) -> None:
    """Write ``arrays`` as an uncompressed ``.npz``, atomically (temporary file, rename)."""
    import io
    import os
    import tempfile
    import zipfile

    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED) as zf:
            for name, value in arrays.items():
                buf = io.BytesIO()
                np.lib.format.write_array(buf, np.asarray(value), allow_pickle=False)
                zf.writestr(name + ".npy", buf.getvalue())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m cpusparse.testing.replay_torch TRACE.npz [--free OUT.npz]``.

    Without ``--free``: the stage-isolated :func:`replay`; exit status 0 if it agrees
    with the trace, 1 otherwise. With ``--free OUT.npz``: the free-running
    :func:`replay_free` (masks resynchronised), written atomically to ``OUT.npz`` for
    ``cpusparse verify TRACE.npz OUT.npz``; 0 if written, 1 if the trace cannot be
    run. 2 on a usage error (a missing or unreadable trace, an unwritable output). Every
    error is one line on stderr.
    """
    import argparse
    import os
    import zipfile

    prog = "python -m cpusparse.testing.replay_torch"
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Replay a cpusparse trace in PyTorch and compare every array.",
        allow_abbrev=False,
    )
    parser.add_argument("trace", metavar="TRACE.npz", help="trace written by cpusparse trace")
    parser.add_argument(
        "--free", metavar="OUT.npz", help="run the free-running port and write its trace here"
    )
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    except SystemExit as exc:
        return 0 if exc.code in (0, None) else 2

    def fail(message: str) -> int:
        print(f"{prog}: error: {message}", file=sys.stderr)
        return 2

    if not os.path.isfile(args.trace):
        return fail(f"{args.trace}: no such file")
    if not zipfile.is_zipfile(args.trace):
        return fail(f"{args.trace}: not a valid .npz (zip) archive")
    if args.free is not None:
        out_dir = os.path.dirname(os.path.abspath(args.free))
        if not os.path.isdir(out_dir):
            return fail(f"--free {args.free}: directory {out_dir} does not exist")
        if os.path.isdir(args.free) or (
            os.path.exists(args.free) and not os.path.isfile(args.free)
        ):
            return fail(f"--free {args.free}: is not a regular file")
    try:
        with np.load(args.trace, allow_pickle=False) as data:
            trace = {name: data[name] for name in data.files}
    except (OSError, ValueError) as exc:
        return fail(f"{args.trace}: cannot be read as a trace ({exc})")
    if args.free is None:
        failures = replay(trace)
        print("\n".join(failures) if failures else "replay agrees with the trace")
        return 1 if failures else 0
    run = replay_free(trace)
    if run.errors:
        print("\n".join(run.errors))
        return 1
    try:
        _save_npz(args.free, run.trace)
    except OSError as exc:
        return fail(f"--free {args.free}: {exc.strerror or exc}")
    print(
        f"wrote {args.free}: {len(run.trace)} arrays, {run.n_mask_flips} mask decisions "
        f"resynchronised; compare with: cpusparse verify {args.trace} {args.free} (float32: "
        "at float32_tolerances)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
