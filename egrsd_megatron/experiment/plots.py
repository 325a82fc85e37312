"""Experiment plots: the accuracy-length frontier with bootstrap error bars, and training curves.

frontier.png: one panel per benchmark (+ "all"); each model group (base, each method with its seeds
pooled) is a point at (mean length, accuracy) with the experiment's confidence intervals as error bars in
both directions; each seed alone is a small marker of the same colour; the Pareto frontier of the pooled
points (eval.plots.pareto_front) is the dashed staircase.
curves.png: per training metric (reward accuracy, response length, gate statistics when the run logged
them), one line per method (mean over its seeds, per step) and thin lines per seed.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, Dict, List

from ..eval.plots import PANEL_H, PANEL_W, pareto_front, pyplot, save
from .runner import run_name
from .schema import ExperimentSpec

# (metrics.jsonl key, panel title, scale); a key no run logged is left out.
CURVE_KEYS = (
    ("accuracy", "training reward (accuracy, %)", 100.0),
    ("response_length", "response length (tokens)", 1.0),
    ("gate_mean", "gate mean", 1.0),
    ("gate_floor_frac", "fraction of tokens at the gate floor", 1.0),
    ("teacher_entropy_mean", "teacher entropy (nats)", 1.0),
    ("spike_count", "lookahead-forgiven spikes", 1.0),
)


def plot_experiment_frontier(summary: Dict[str, Any], out: str) -> str:
    plt = pyplot()
    panels = summary["panels"]
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(PANEL_W * cols, PANEL_H * rows), squeeze=False)
    colors = plt.get_cmap("tab10")
    groups = list(summary["groups"])
    for ax, panel in zip(axes.flat, panels):
        res = summary["results"][panel]
        pts = []
        for i, g in enumerate(groups):
            r = res[g]
            x, y = r["mean_length"]["estimate"], 100 * r["accuracy"]["estimate"]
            pts.append((x, y))
            xerr = [[x - r["mean_length"]["lo"]], [r["mean_length"]["hi"] - x]]
            yerr = [[y - 100 * r["accuracy"]["lo"]], [100 * r["accuracy"]["hi"] - y]]
            ax.errorbar(
                [x],
                [y],
                xerr=xerr,
                yerr=yerr,
                fmt="o",
                color=colors(i % 10),
                capsize=3,
                markersize=6,
                label=g,
                zorder=3,
            )
            ax.annotate(g, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
            for s in (r.get("per_seed") or {}).values():
                ax.scatter(
                    [s["mean_length"]],
                    [100 * s["accuracy"]],
                    s=14,
                    color=colors(i % 10),
                    alpha=0.5,
                    marker="x",
                    zorder=2,
                )
        front = pareto_front(pts)
        if len(front) > 1:
            ax.step(
                [pts[i][0] for i in front],
                [pts[i][1] for i in front],
                where="post",
                linestyle="--",
                color="0.35",
                linewidth=1.1,
                zorder=1,
                label="Pareto frontier",
            )
        n = next(iter(res.values()))["num_problems"]
        ax.set_title(f"{panel} ({n} problems)", fontsize=11)
        ax.set_xlabel("mean response length (tokens)")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        ax.margins(0.15)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    ncol = max(1, min(len(labels), 2 * cols))
    legend_in = 0.3 * math.ceil(len(labels) / ncol) + 0.1
    fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=9, frameon=False)
    conf = round(100 * summary["stats"]["confidence"])
    fig.suptitle(
        f"Accuracy vs response length, {conf}% bootstrap intervals; x = single seeds (up-left is better)", fontsize=11
    )
    fig.tight_layout(rect=(0, legend_in / (PANEL_H * rows), 1, 0.95))
    save(fig, out)
    plt.close(fig)
    return out


def read_metrics(run_dir: str) -> List[Dict[str, Any]]:
    """metrics.jsonl rows of a run (empty when it has none yet)."""
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    rows = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError as e:
                    raise ValueError(f"{path} line {n}: not JSON ({e})") from e
    return rows


def plot_experiment_curves(out_dir: str, spec: ExperimentSpec, out: str) -> str:
    runs = {
        m: {s: read_metrics(os.path.join(out_dir, "runs", run_name(m, s))) for s in spec.seeds_of(m)}
        for m in spec.methods
    }
    keys = [
        k
        for k in CURVE_KEYS
        if any(
            isinstance(r.get(k[0]), (int, float)) for seeds in runs.values() for rows in seeds.values() for r in rows
        )
    ]
    if not keys:
        keys = list(CURVE_KEYS[:2])
    plt = pyplot()
    cols = min(3, len(keys))
    nrows = math.ceil(len(keys) / cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(PANEL_W * cols, PANEL_H * nrows), squeeze=False)
    colors = plt.get_cmap("tab10")
    for ax, (key, title, scale) in zip(axes.flat, keys):
        for i, (m, seeds) in enumerate(runs.items()):
            color = colors((i + 1) % 10)  # colour i + 1: colour 0 is the base's in the frontier
            per_step: Dict[int, List[float]] = {}
            for rows in seeds.values():
                pts = [(int(r["step"]), scale * float(r[key])) for r in rows if isinstance(r.get(key), (int, float))]
                if len(seeds) > 1 and pts:
                    ax.plot(*zip(*pts), color=color, alpha=0.3, linewidth=0.8)
                for st, v in pts:
                    per_step.setdefault(st, []).append(v)
            if per_step:
                steps = sorted(per_step)
                ax.plot(
                    steps,
                    [sum(per_step[s]) / len(per_step[s]) for s in steps],
                    color=color,
                    linewidth=1.6,
                    label=f"{m} ({len(seeds)} seed{'s' if len(seeds) > 1 else ''})",
                )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=9, frameon=False)
    fig.suptitle("Training curves (thick: mean over seeds; thin: single seeds)", fontsize=11)
    fig.tight_layout(rect=(0, 0.5 / (PANEL_H * nrows), 1, 0.95))
    save(fig, out)
    plt.close(fig)
    return out
