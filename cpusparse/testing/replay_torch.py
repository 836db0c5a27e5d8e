"""Replay a cpusparse trace in PyTorch, step by step, and compare every array.

Usage: ``python -m cpusparse.testing.replay_torch TRACE.npz`` (or run this file
alone: it imports nothing of cpusparse). Needs only NumPy and PyTorch: everything is
rebuilt from the stored arrays and the documented conventions (the trace format page
of the documentation). Exit status 0 if the replay agrees with the trace, 1 otherwise.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Mapping

__all__ = ["TOLERANCES", "Checker", "score_gradient", "project", "replay"]

import numpy as np
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
                where = np.unravel_index(np.argmax(bad), bad.shape)
                self.failures.append(f"{name}: max abs error {err.max():.3g}, first at {where}")


def score_gradient(
    losses: torch.Tensor, masks: torch.Tensor, score: torch.Tensor, estimator: str
) -> torch.Tensor:
    """VR-PGE (or REINFORCE) from stored losses (K,), masks (K, ...) and scores, in float64."""
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
    centered = losses - losses.sum() / K
    return (centered.view(shape) * grad_log_p).sum(0) / (K - 1)


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


def replay(trace: Mapping[str, np.ndarray]) -> list[str]:
    """Replay every step of ``trace`` (a dict of arrays); return the list of failures."""
    t = {k: torch.from_numpy(v) for k, v in trace.items() if v.dtype.kind != "U"}
    cfg = json.loads(str(trace["meta/config"]))
    # Traces before cpusparse 0.2 name the estimator "estimator".
    estimator = cfg.get("score_estimator", cfg.get("estimator"))
    layers = json.loads(str(trace["meta/layers"]))
    check = Checker(trace, *TOLERANCES[str(trace["meta/dtype"])])
    budget = float(trace["meta/budget"])
    prunable = [la["index"] for la in layers if la["prunable"]]

    # Parameters and optimizers persist across steps; their state starts at zero.
    params = [
        [t[f"step0/layer{i}/{name}"].clone().requires_grad_() for name in ("weight", "bias")]
        for i in range(len(layers))
    ]
    flat = [p for pair in params for p in pair]
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
        K = losses_ref.shape[0]
        with torch.no_grad():  # start each step from the stored weights and scores
            for i, (w, b) in enumerate(params):
                w.copy_(layer[i]["weight"])
                b.copy_(layer[i]["bias"])
            for i in prunable:
                scores[i].copy_(layer[i]["score"])
        for i in prunable:  # masks = uniforms < scores, compared in float64
            check(f"{pre}/layer{i}/masks", layer[i]["uniforms"] < layer[i]["score"].double())

        # K masked forward passes on the same batch; autograd for the weight gradients.
        n_backward = K if cfg["weight_grad"] == "mean" else 1
        losses, grads = [], []
        for k in range(K):
            h = x
            for i, (w, b) in enumerate(params):
                keep = layer[i]["pattern"]
                if layers[i]["prunable"] and layers[i]["granularity"] == "weight":
                    keep = keep & layer[i]["masks"][k]
                h = h @ (w * keep).T + b
                if layers[i]["activation"] == "relu":
                    h = torch.relu(h)
                if layers[i]["prunable"] and layers[i]["granularity"] == "neuron":
                    h = h * layer[i]["masks"][k]  # a dropped neuron loses its bias too
            loss = torch.nn.functional.cross_entropy(h, y)  # mean over the batch
            losses.append(float(loss.detach()))
            if k < n_backward:
                grads.append(torch.autograd.grad(loss, flat))
        check(f"{pre}/losses", np.array(losses))
        mean = [_sum(g[j] for g in grads) / n_backward for j in range(len(flat))]
        for i in range(len(layers)):
            check(f"{pre}/layer{i}/weight_grad_per_sample", torch.stack([g[2 * i] for g in grads]))
            check(
                f"{pre}/layer{i}/bias_grad_per_sample", torch.stack([g[2 * i + 1] for g in grads])
            )
            check(f"{pre}/layer{i}/weight_grad_mean", mean[2 * i])
            check(f"{pre}/layer{i}/bias_grad_mean", mean[2 * i + 1])

        # Clip the global norm (accumulated in float64); one weight step at the trace's lr.
        norm = float(torch.sqrt(_sum((g.double() ** 2).sum() for g in mean)))
        check(f"{pre}/grad_norm", norm)
        if cfg["clip_norm"] is not None and norm > cfg["clip_norm"]:
            mean = [g * (cfg["clip_norm"] / norm) for g in mean]
        for p, g in zip(flat, mean, strict=True):
            p.grad = g.clone()
        opt.param_groups[0]["lr"] = float(trace[f"{pre}/lr"])
        opt.step()
        for i, (w, b) in enumerate(params):
            check(f"{pre}/layer{i}/weight_updated", w)
            check(f"{pre}/layer{i}/bias_updated", b)

        # Score gradient from the stored losses and masks; one score step; projection.
        for i in prunable:
            dscore = score_gradient(losses_ref, layer[i]["masks"], layer[i]["score"], estimator).to(
                scores[i].dtype
            )
            check(f"{pre}/layer{i}/dscore", dscore)
            scores[i].grad = dscore
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


if __name__ == "__main__":
    with np.load(sys.argv[1], allow_pickle=False) as data:
        trace = {name: data[name] for name in data.files}
    failures = replay(trace)
    print("\n".join(failures) if failures else "replay agrees with the trace")
    sys.exit(1 if failures else 0)
