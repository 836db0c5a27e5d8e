"""A sweep's records as a table and plots: what ``cpusparse sweep --report`` writes.

:func:`summarise` groups the finished records by everything but the seed; one summary
per group holds the mean and standard deviation (``ddof=1``) of the test accuracy over
the seeds and their number. :func:`write_report` writes, under the sweep's ``out``:

- ``report.md``: per model, data set and granularity, a table of estimators (rows)
  by densities (columns), each cell ``mean ± std (seeds)`` in %, the dense anchor and
  the executed multiply-adds;
- ``summary.json``: the summaries;
- ``accuracy_vs_density.png``: test accuracy against density (log axis), one line per
  estimator, the dense anchor as a band;
- ``grad_variance.png``: the score-gradient variance per epoch of the sparse phase,
  one line per estimator (median over the seeds), one panel per density.

With a grid, only its cells, in files named after it (``<name>.md``, ...).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from .._io import atomic_write, check_output_dir
from .._version import __version__
from .grid import ESTIMATORS, Grid
from .run import read_results

__all__ = [
    "summarise",
    "markdown",
    "write_report",
    "report_paths",
    "plot_accuracy",
    "plot_variance",
]

_AXES = ("model", "dataset", "granularity", "estimator", "density", "n_masks")
_ORDER = {name: i for i, name in enumerate(ESTIMATORS)}
_NO_K = ("random-mask", "dense")  # no sampled masks: K does not apply
_GRANULARITY_ORDER = {"weight": 0, "neuron": 1, "channel": 2}
# One style per estimator, the same in every figure.
_STYLE = {
    "vrpge": {"color": "C0", "marker": "o"},
    "vrpge-sqrt": {"color": "C1", "marker": "s"},
    "reinforce": {"color": "C3", "marker": "v"},
    "straight-through": {"color": "C2", "marker": "^"},
    "random-mask": {"color": "0.45", "marker": "x", "linestyle": "--"},
    "dense": {"color": "k"},
}


def _setup(record: dict[str, Any]) -> str:
    """The settings a group shares beyond the axes and the seed (a short digest)."""
    params = dict(record["settings"]["params"])
    for name in (
        "random_state",
        "density",
        "granularity",
        "score_estimator",
        "n_masks",
        "fixed_mask",
        "max_iter",
        "finetune_iter",
    ):
        params.pop(name, None)
    p = record["settings"]["params"]
    total = int(p["max_iter"]) + int(p["finetune_iter"])
    sizes = p.get("hidden_layer_sizes") or p.get("widths") or ()
    name = "hidden" if "hidden_layer_sizes" in p else "widths"
    digest = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]
    return f"{name} {'-'.join(map(str, sizes))}, {total} epochs, settings {digest}"


def _group(record: dict[str, Any]) -> str:
    """Digest of everything but the seed: records of one group differ in the seed only."""
    settings = dict(record["settings"])
    settings["params"] = {k: v for k, v in settings["params"].items() if k != "random_state"}
    settings.pop("seed")
    text = json.dumps({"settings": settings, "version": record["version"]}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def summarise(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary per group of records that differ only in the seed.

    Parameters
    ----------
    records : iterable of dict
        Cell records (:func:`cpusparse.sweep.run.run_cell`); failed ones are counted.

    Returns
    -------
    summaries : list of dict
        The axes (without the seed), ``setup`` (the epochs and a digest of the other
        parameters), ``group`` (a digest of every setting but the seed, and the
        version: records of one summary differ in their seed only), ``n_seeds``,
        ``seeds``, ``accuracy_mean`` and ``accuracy_std`` (%, ``ddof=1``; 0 for one
        seed), ``density_mean``, ``macs_mean``, ``fit_seconds_median``, ``n_failed``;
        sorted by model, data set, granularity, estimator and decreasing density.
    """
    groups: dict[tuple[Any, ...], dict[str, Any]] = {}
    for record in records:
        s = record["settings"]
        key = (*(s[a] for a in _AXES), _setup(record), _group(record))
        group = groups.setdefault(key, {"ok": [], "failed": 0, "params": s["params"]})
        if record.get("status") == "ok":
            group["ok"].append(record)
        else:
            group["failed"] += 1
    out = []
    for key, group in groups.items():
        ok = sorted(group["ok"], key=lambda r: r["settings"]["seed"])
        acc = np.array([100 * r["test_accuracy"] for r in ok])
        summary = dict(zip(_AXES, key[:-2], strict=True))
        summary.update(
            setup=key[-2],
            group=key[-1],
            epochs=int(group["params"]["max_iter"]) + int(group["params"]["finetune_iter"]),
            n_seeds=len(ok),
            seeds=[r["settings"]["seed"] for r in ok],
            accuracy_mean=float(acc.mean()) if ok else None,
            accuracy_std=float(acc.std(ddof=1)) if len(ok) > 1 else (0.0 if ok else None),
            density_mean=float(np.mean([r["density"] for r in ok])) if ok else None,
            macs_mean=float(np.mean([r["macs"] for r in ok])) if ok else None,
            fit_seconds_median=float(np.median([r["fit_seconds"] for r in ok])) if ok else None,
            n_failed=group["failed"],
        )
        out.append(summary)
    out.sort(
        key=lambda s: (
            s["model"],
            s["dataset"],
            _GRANULARITY_ORDER.get(s["granularity"], 9),
            s["setup"],
            _ORDER[s["estimator"]],
            -s["density"],
            s["n_masks"],
        )
    )
    return out


def _panels(summaries: Sequence[dict[str, Any]]) -> dict[tuple[str, ...], list[dict[str, Any]]]:
    """Summaries by (model, dataset, granularity, setup), each with its dense anchor.

    Two groups that would share a table cell (same estimator, density and K, but other
    settings) go to separate panels. The anchor of a panel is the dense fit of the same
    granularity's layers, else one of the same model, data set and setup; a dense fit
    without sparse panels has a panel of its own.
    """
    panels: dict[tuple[str, ...], list[dict[str, Any]]] = {}
    slots: dict[tuple[Any, ...], str] = {}
    for s in summaries:
        key = (s["model"], s["dataset"], s["granularity"], s["setup"])
        slot = (*key, s["estimator"], s["density"], s["n_masks"])
        if slots.setdefault(slot, s["group"]) != s["group"]:
            key = (*key[:3], f"{key[3]}, group {s['group'][:6]}")
        if s["estimator"] != "dense":
            panels.setdefault(key, []).append(s)
    sparse = dict(panels)
    for s in summaries:
        if s["estimator"] != "dense":
            continue
        own = (s["model"], s["dataset"], s["granularity"], s["setup"])
        if own in sparse:  # the dense network of the same layers
            panels[own].append(s)
            continue
        same = [k for k in sparse if (k[0], k[1], k[3]) == (own[0], own[1], own[3])]
        targets = [k for k in same if not any(d["estimator"] == "dense" for d in panels[k])]
        for k in targets if same else [own]:
            panels.setdefault(k, []).append(s)
    return panels


def _cell_text(s: dict[str, Any]) -> str:
    if not s["n_seeds"]:
        return f"all failed ({s['n_failed']})"
    text = f"{s['accuracy_mean']:.2f} ± {s['accuracy_std']:.2f} ({s['n_seeds']})"
    return text + (f", {s['n_failed']} failed" if s["n_failed"] else "")


def _seconds(s: dict[str, Any]) -> str:
    return "" if s["fit_seconds_median"] is None else f"{s['fit_seconds_median']:.1f}"


def _table(
    rest: Sequence[dict[str, Any]],
    densities: Sequence[float],
    ks: Sequence[int],
    text: Callable[[dict[str, Any]], str],
) -> list[str]:
    """Markdown rows: one per estimator (and K), one column per density."""
    lines = ["| estimator | " + " | ".join(f"density {d:g}" for d in densities) + " |"]
    lines.append("|---|" + "---:|" * len(densities))
    for estimator in sorted({s["estimator"] for s in rest}, key=_ORDER.__getitem__):
        for k in ks:
            row = {
                s["density"]: s for s in rest if s["estimator"] == estimator and s["n_masks"] == k
            }
            if not row:
                continue
            label = estimator if len(ks) == 1 or estimator in _NO_K else f"{estimator}, K={k}"
            lines.append(
                f"| {label} | "
                + " | ".join(text(row[d]) if d in row else "" for d in densities)
                + " |"
            )
    return lines


def _macs(value: float | None) -> str:
    if value is None:
        return ""
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if value >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.0f}"


def markdown(summaries: Sequence[dict[str, Any]], *, title: str = "Sweep results") -> str:
    """The summaries as markdown: one table per model, data set and granularity.

    Rows are estimators, columns densities; a cell is the test accuracy in %,
    ``mean ± std (number of seeds)``. Then the same table of the executed forward
    multiply-adds per sample (mean over seeds) and of the median fit time, and the
    dense anchor.
    """
    lines = [f"# {title}", ""]
    lines += [
        "Test accuracy in %, mean ± standard deviation (ddof=1) over the seeds, the "
        "number of seeds in parentheses. Density: the kept fraction of the prunable "
        "units. Estimators: " + "; ".join(f"`{k}`: {v}" for k, v in ESTIMATORS.items()) + ".",
        "",
        "The score-gradient variances (the plot) compare like with like within one "
        "scaling only: `vrpge` and `reinforce` estimate the same gradient, `vrpge-sqrt`'s "
        "is scaled by sqrt(s(1-s)) (which shrinks as the scores polarise) and "
        "`straight-through`'s is another quantity.",
        "",
    ]
    for (model, dataset, granularity, setup), group in _panels(summaries).items():
        dense = [s for s in group if s["estimator"] == "dense"]
        rest = [s for s in group if s["estimator"] != "dense"]
        densities = sorted({s["density"] for s in rest}, reverse=True)
        ks = sorted({s["n_masks"] for s in rest})
        lines += [f"## {model}, {dataset}, {granularity} masks ({setup})", ""]
        if rest:
            lines += _table(rest, densities, ks, _cell_text)
            lines += ["", "Forward multiply-adds per sample with the fixed mask (mean):", ""]
            lines += _table(rest, densities, ks, lambda s: _macs(s["macs_mean"]))
            lines += ["", "Median fit time (s, one thread; indicative: fits shared the cores):", ""]
            lines += _table(rest, densities, ks, _seconds)
        lines.append("")
        for s in dense:
            cost = f", {_macs(s['macs_mean'])} multiply-adds per sample" if s["n_seeds"] else ""
            lines.append(
                f"Dense anchor (every unit, {s['granularity']} network): {_cell_text(s)}{cost}."
            )
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def plot_accuracy(summaries: Sequence[dict[str, Any]]) -> Any:
    """Test accuracy against density, one panel per model, data set and granularity.

    Returns
    -------
    figure : matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import NullFormatter

    panels = {
        k: v for k, v in _panels(summaries).items() if any(s["estimator"] != "dense" for s in v)
    }
    n = max(1, len(panels))
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(5.2 * cols, 4.0 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    shown = list(axes.flat)[: len(panels)]
    for ax, ((model, dataset, granularity, _), group) in zip(shown, panels.items(), strict=True):
        for estimator in sorted({s["estimator"] for s in group}, key=_ORDER.__getitem__):
            points = sorted(
                (s for s in group if s["estimator"] == estimator and s["n_seeds"]),
                key=lambda s: s["density"],
            )
            if not points:
                continue
            style = _STYLE.get(estimator, {})
            if estimator == "dense":
                mean = np.mean([s["accuracy_mean"] for s in points])
                std = max(s["accuracy_std"] for s in points)
                ax.axhline(
                    mean, color="k", linewidth=1.2, label=f"dense ({points[0]['n_seeds']} seeds)"
                )
                ax.axhspan(mean - std, mean + std, color="k", alpha=0.08, linewidth=0)
                continue
            x = [s["density"] for s in points]
            y = [s["accuracy_mean"] for s in points]
            e = [s["accuracy_std"] for s in points]
            ax.errorbar(x, y, yerr=e, capsize=3, label=estimator, **style)
        ax.set_xscale("log")
        ticks = sorted({s["density"] for s in group if s["estimator"] != "dense"})
        ax.set_xticks(ticks, [f"{d:g}" for d in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_title(f"{model} on {dataset}, {granularity} masks", fontsize=10)
        ax.set_xlabel("density (kept fraction of prunable units, log scale)")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8, loc="lower right")
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.suptitle("Test accuracy against density (mean ± std over seeds)")
    fig.tight_layout()
    return fig


def plot_variance(records: Iterable[dict[str, Any]]) -> Any:
    """Score-gradient variance per epoch of the sparse phase, by estimator.

    One row of panels per model, data set and granularity, one panel per density;
    each line is the median over the seeds. Only estimators of one scaling compare:
    ``vrpge`` and ``reinforce`` estimate the same gradient; ``vrpge-sqrt``'s estimate
    is scaled by ``sqrt(s(1-s))`` and ``straight-through``'s is another quantity.

    Returns
    -------
    figure : matplotlib.figure.Figure
    """
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    curves: dict[tuple[Any, ...], dict[str, list[list[float]]]] = {}
    for r in records:
        if r.get("status") != "ok":
            continue
        s = r["settings"]
        values = [e["grad_variance"] for e in r["epochs"] if e.get("phase") == "sparse"]
        if not values or all(v is None for v in values):
            continue
        key = (s["model"], s["dataset"], s["granularity"], _setup(r), s["density"])
        curves.setdefault(key, {}).setdefault(s["estimator"], []).append(
            [np.nan if v is None else v for v in values]
        )
    groups = sorted({k[:4] for k in curves})
    densities = {g: sorted({k[4] for k in curves if k[:4] == g}, reverse=True) for g in groups}
    cols = max([len(d) for d in densities.values()] or [1])
    rows = max(1, len(groups))
    fig = Figure(figsize=(3.6 * cols, 3.0 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, g in enumerate(groups):
        for j in range(cols):
            ax = axes[i, j]
            if j >= len(densities[g]):
                ax.set_visible(False)
                continue
            d = densities[g][j]
            for estimator, runs in sorted(curves[(*g, d)].items(), key=lambda t: _ORDER[t[0]]):
                n = min(len(run) for run in runs)
                median = np.nanmedian(np.array([run[:n] for run in runs]), axis=0)
                style = {k: v for k, v in _STYLE.get(estimator, {}).items() if k != "marker"}
                ax.plot(np.arange(1, n + 1), median, label=estimator, **style)
            ax.set_yscale("log")
            ax.set_title(f"{g[0]}, {g[1]}, {g[2]}, density {d:g}", fontsize=9)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("epoch (sparse phase)")
            ax.set_ylabel("score-gradient variance\n(mean over units)")
            ax.grid(True, which="both", alpha=0.3)
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
    if not groups:
        axes[0, 0].set_visible(False)
    fig.suptitle("Score-gradient variance per epoch (median over seeds)")
    fig.tight_layout()
    return fig


def write_report(
    out: str | os.PathLike[str],
    *,
    grid: Grid | None = None,
    title: str | None = None,
) -> dict[str, str]:
    """Write the markdown table, the summaries and the two plots under ``out``.

    Parameters
    ----------
    out : str or os.PathLike
        A sweep's output directory (its records are in ``out/cells``).
    grid : Grid, optional
        Report only this grid's cells, in files named after it (``<name>.md``,
        ``<name>-summary.json``, ``<name>-accuracy_vs_density.png``,
        ``<name>-grad_variance.png``); by default every record under ``out``, in
        ``report.md``, ``summary.json``, ``accuracy_vs_density.png`` and
        ``grad_variance.png``. Grids that share cells can share a directory.
    title : str, optional
        The report's heading (``"Sweep results: <grid or directory name>"``).

    Returns
    -------
    paths : dict
        ``"markdown"``, ``"summary"``, ``"accuracy"`` and ``"variance"`` -> the files
        written.

    Raises
    ------
    ValueError
        If ``out`` holds no record (of ``grid``'s cells).
    """
    out = check_output_dir(os.fspath(out), "out")
    found = read_results(out)
    paths = report_paths(out, grid)
    if grid is None:  # every record of this version
        records = [r for r in found.values() if r["version"] == __version__]
        other = len(found) - len(records)
        name = os.path.basename(os.path.abspath(out))
    else:
        records = [found[c.key] for c in grid.cells if c.key in found]
        other, name = 0, grid.name
    if not records:
        what = f"of grid {grid.name} " if grid is not None else f"of cpusparse {__version__} "
        raise ValueError(f"out {out}: no cell records {what}under {os.path.join(out, 'cells')}")
    summaries = summarise(records)
    text = markdown(summaries, title=title or f"Sweep results: {name}")
    if other:
        text += (
            f"\n{other} records of other cpusparse versions under {out} are left out "
            f"(this report: {__version__}).\n"
        )
    sources = sorted({str(r.get("sources")) for r in records})
    if len(sources) > 1:
        text += (
            f"\nThe records come from {len(sources)} different source trees "
            f"({', '.join(sources)}; 'None': not recorded): the same version, other code.\n"
        )
    atomic_write(paths["markdown"], lambda f: f.write(text.encode()))
    blob = json.dumps({"summaries": summaries}, indent=1, sort_keys=True) + "\n"
    atomic_write(paths["summary"], lambda f: f.write(blob.encode()))
    for key, fig in (("accuracy", plot_accuracy(summaries)), ("variance", plot_variance(records))):
        _save(fig, paths[key])
    return paths


def report_paths(out: str, grid: Grid | None = None) -> dict[str, str]:
    """The files :func:`write_report` writes under ``out`` (for ``grid``, or for all)."""
    if grid is None:
        names = ("report.md", "summary.json", "accuracy_vs_density.png", "grad_variance.png")
    else:
        stem = grid.name
        names = (f"{stem}.md", f"{stem}-summary.json", f"{stem}-accuracy_vs_density.png",
                 f"{stem}-grad_variance.png")  # fmt: skip
    keys = ("markdown", "summary", "accuracy", "variance")
    return {k: os.path.join(out, v) for k, v in zip(keys, names, strict=True)}


def _save(fig: Any, path: str) -> None:
    """Write ``fig`` as a PNG, atomically."""
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=110))
