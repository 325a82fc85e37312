"""Plots users look at: the accuracy-length frontier of several evaluations, and training curves.

frontier: one panel per benchmark plus "average"; each result folder (a method or checkpoint) is a point at
(mean response length, accuracy); the Pareto frontier (no other point is both shorter and more accurate)
is drawn as a dashed staircase. curves: accuracy and mean response length per step from metrics.jsonl.
"""

from __future__ import annotations

import io
import json
import math
import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

from ..utils import atomic_write_bytes
from ..utils.errors import InputError, MissingInputError

PANEL_W, PANEL_H, DPI = 4.8, 3.9, 100


def pareto_front(points: Sequence[Tuple[float, float]]) -> List[int]:
    """Indices of the points not dominated under (shorter x, higher y), sorted by x.

    p dominates q when p.x <= q.x and p.y >= q.y with at least one strict; duplicates all stay.
    """
    idx = []
    for i, (x, y) in enumerate(points):
        dominated = any((x2 <= x and y2 >= y) and (x2 < x or y2 > y) for j, (x2, y2) in enumerate(points) if j != i)
        if not dominated:
            idx.append(i)
    return sorted(idx, key=lambda i: (points[i][0], -points[i][1]))


def pyplot():
    # Imported on first plot: matplotlib.use("Agg") must run before pyplot is imported (headless: never needs a
    # display), and importing it at module level would select a backend for whoever imports eval.
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, out: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format=os.path.splitext(out)[1].lstrip(".") or "png", dpi=DPI)
    atomic_write_bytes(out, buf.getvalue())


# ------------------------------------------------------------------------------------------ frontier
def load_result(result_dir: str) -> Dict[str, Any]:
    path = os.path.join(result_dir, "summary.json")
    if not os.path.isfile(path):
        raise MissingInputError(f"{result_dir}: no summary.json (expected an `egrsd eval --out` folder)")
    with open(path) as f:
        s = json.load(f)
    if not isinstance(s.get("benchmarks"), dict) or not s["benchmarks"]:
        raise InputError(f"{path}: no 'benchmarks' entries; rerun `egrsd eval` to completion")
    for name, m in s["benchmarks"].items():
        for key in ("accuracy", "mean_length"):
            if not isinstance(m.get(key), (int, float)):
                raise InputError(f"{path}: benchmark '{name}' has no numeric '{key}'")
    return s


def frontier_table(
    result_dirs: Sequence[str], labels: Optional[Sequence[str]] = None
) -> Tuple[List[str], Dict[str, List[Tuple[float, float]]]]:
    """(labels, {panel: [(mean_length, accuracy) per result]}); panel "average" averages the benchmarks that
    EVERY result has, so all points of that panel average the same set."""
    if labels is not None and len(labels) != len(result_dirs):
        raise InputError(f"--labels: got {len(labels)} labels for {len(result_dirs)} result folders")
    results = [load_result(d) for d in result_dirs]
    names = (
        list(labels)
        if labels
        else [r.get("label") or os.path.basename(os.path.normpath(d)) for r, d in zip(results, result_dirs)]
    )
    benches: List[str] = []
    for r in results:
        benches += [b for b in r["benchmarks"] if b not in benches]
    panels: Dict[str, List[Tuple[float, float]]] = {}
    for b in benches:
        panels[b] = [
            (r["benchmarks"][b]["mean_length"], r["benchmarks"][b]["accuracy"])
            if b in r["benchmarks"]
            else (math.nan, math.nan)
            for r in results
        ]
    common = [b for b in benches if all(b in r["benchmarks"] for r in results)]
    if len(benches) > 1 and common:
        panels[f"average ({len(common)} benchmarks)"] = [
            (
                sum(r["benchmarks"][b]["mean_length"] for b in common) / len(common),
                sum(r["benchmarks"][b]["accuracy"] for b in common) / len(common),
            )
            for r in results
        ]
    return names, panels


def plot_frontier(result_dirs: Sequence[str], out: str, labels: Optional[Sequence[str]] = None) -> str:
    names, panels = frontier_table(result_dirs, labels)
    plt = pyplot()
    n = len(panels)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(PANEL_W * cols, PANEL_H * rows), squeeze=False)
    colors = plt.get_cmap("tab10")
    for ax, (panel, pts) in zip(axes.flat, panels.items()):
        valid = [i for i, (x, y) in enumerate(pts) if not (math.isnan(x) or math.isnan(y))]
        for i in valid:
            x, y = pts[i]
            ax.scatter([x], [100 * y], s=46, color=colors(i % 10), label=names[i], zorder=3)
            ax.annotate(names[i], (x, 100 * y), textcoords="offset points", xytext=(5, 4), fontsize=8)
        front = [valid[j] for j in pareto_front([pts[i] for i in valid])]
        ax.scatter(
            [pts[i][0] for i in front],
            [100 * pts[i][1] for i in front],
            s=110,
            facecolors="none",
            edgecolors="0.2",
            linewidths=1.1,
            zorder=4,
            label="on the Pareto frontier",
        )
        if len(front) > 1:
            xs, ys = [pts[i][0] for i in front], [100 * pts[i][1] for i in front]
            ax.step(
                xs, ys, where="post", linestyle="--", color="0.35", linewidth=1.2, zorder=2, label="Pareto frontier"
            )
        ax.set_title(panel, fontsize=11)
        ax.set_xlabel("mean response length (tokens)")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
        ax.margins(0.15)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    handles, lbls = [], []
    for ax in axes.flat:  # one legend for the figure: every label once, from whichever panel has it
        for h, lbl in zip(*ax.get_legend_handles_labels()):
            if lbl not in lbls:
                handles.append(h)
                lbls.append(lbl)
    ncol = max(1, min(len(lbls), 2 * cols))  # ~2 entries per panel width fit without clipping
    legend_in = 0.3 * math.ceil(len(lbls) / ncol) + 0.1  # legend height in inches, reserved at the bottom
    fig.legend(handles, lbls, loc="lower center", ncol=ncol, fontsize=9, frameon=False)
    fig.suptitle("Accuracy vs response length (up-left is better)", fontsize=12)
    fig.tight_layout(rect=(0, legend_in / (PANEL_H * rows), 1, 0.95))
    save(fig, out)
    plt.close(fig)
    return out


# ------------------------------------------------------------------------------------------ curves
CURVE_KEYS = ("step", "accuracy", "response_length")


def load_curve(run_dir: str) -> Dict[str, List[float]]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise MissingInputError(f"{run_dir}: no metrics.jsonl (expected a training run folder)")
    out: Dict[str, List[float]] = {k: [] for k in CURVE_KEYS}
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise InputError(f"{path} line {i}: not JSON ({e})") from e
            missing = [k for k in CURVE_KEYS if not isinstance(row.get(k), (int, float))]
            if missing:
                raise InputError(f"{path} line {i}: missing numeric key(s) {', '.join(missing)}")
            for k in CURVE_KEYS:
                out[k].append(float(row[k]))
    if not out["step"]:
        raise InputError(f"{path}: no rows")
    return out


def plot_curves(run_dirs: Sequence[str], out: str, labels: Optional[Sequence[str]] = None) -> str:
    if labels is not None and len(labels) != len(run_dirs):
        raise InputError(f"--labels: got {len(labels)} labels for {len(run_dirs)} run folders")
    curves = [load_curve(d) for d in run_dirs]
    names = list(labels) if labels else [os.path.basename(os.path.normpath(d)) for d in run_dirs]
    plt = pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(PANEL_W * 2, PANEL_H), squeeze=True)
    for name, c in zip(names, curves):
        a1.plot(c["step"], [100 * v for v in c["accuracy"]], label=name, linewidth=1.4)
        a2.plot(c["step"], c["response_length"], label=name, linewidth=1.4)
    a1.set_title("training accuracy (reward)")
    a1.set_ylabel("accuracy (%)")
    a2.set_title("mean response length")
    a2.set_ylabel("tokens")
    for ax in (a1, a2):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, out)
    plt.close(fig)
    return out
