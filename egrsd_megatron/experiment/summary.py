"""summary.json and summary.md of an experiment, computed from the per-problem outcome files only.

Per benchmark (and "all": the unweighted mean over benchmarks, bootstrap stratified by benchmark), for the
base and for each method (its seeds pooled per problem, experiment/stats.py):
  accuracy, mean length: estimate and bootstrap CI; truncation rate; each seed's accuracy and mean length,
  and their spread over seeds (2+ seeds);
  differences, each method vs each of stats.baselines (base, grpo): paired bootstrap CI of the accuracy
  difference (points) and of the mean-length difference (tokens), and whether each excludes 0.
"""

from __future__ import annotations

import os
from typing import Any, Dict, List, Optional

import numpy as np

from ..utils import atomic_write_json, atomic_write_text
from .runner import read_outcomes, run_name
from .schema import BASE_LABEL, ExperimentSpec
from .stats import bootstrap_interval, paired_difference, pool_seeds, seed_spread

ALL = "all"
METRICS = (("accuracy", "correct"), ("mean_length", "length"))
SEED_POOLING = (
    "seeds pooled per problem (a method's outcome on a problem is the mean over its seeds); "
    "bootstrap over problems (stratified by benchmark for 'all'); the intervals are conditional on "
    "the trained seeds, whose spread is reported separately"
)


def _groups(spec: ExperimentSpec) -> Dict[str, List[str]]:
    """Model group (base, or a method) -> its model labels (one per seed)."""
    out = {BASE_LABEL: [BASE_LABEL]}
    for m in spec.methods:
        out[m] = [run_name(m, s) for s in spec.seeds_of(m)]
    return out


def load_experiment_outcomes(out_dir: str, spec: ExperimentSpec) -> Dict[str, Dict[str, List[Dict[str, Any]]]]:
    """{model label: {benchmark: outcomes}} for every model and benchmark; a missing file is an error."""
    res: Dict[str, Dict[str, List[Dict[str, Any]]]] = {}
    for labels in _groups(spec).values():
        for label in labels:
            res[label] = {}
            for b in spec.benchmarks:
                path = os.path.join(out_dir, "eval", label, f"{b}.jsonl")
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"{path}: no outcomes of {label} on {b}; rerun the experiment to finish")
                res[label][b] = read_outcomes(path)
    for b in spec.benchmarks:
        sizes = {label: len(v[b]) for label, v in res.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"benchmark {b}: the models answered different numbers of problems {sizes}")
    return res


def _arrays(outcomes, labels: List[str], bench: str, field: str) -> List[np.ndarray]:
    return [np.array([r[field] for r in outcomes[label][bench]], dtype=np.float64) for label in labels]


def build_summary(out_dir: str, spec: ExperimentSpec) -> Dict[str, Any]:
    st = spec.stats
    outcomes = load_experiment_outcomes(out_dir, spec)
    groups = _groups(spec)
    benches = list(spec.benchmarks)
    panels = benches + ([ALL] if len(benches) > 1 else [])

    def strata(labels: List[str], panel: str, field: str) -> List[np.ndarray]:
        bs = benches if panel == ALL else [panel]
        return [pool_seeds(_arrays(outcomes, labels, b, field)) for b in bs]

    def per_seed_value(label: str, panel: str, field: str) -> float:
        bs = benches if panel == ALL else [panel]
        return float(np.mean([np.mean([r[field] for r in outcomes[label][b]]) for b in bs]))

    ci = dict(confidence=st.confidence, resamples=st.resamples, seed=st.seed)
    results: Dict[str, Any] = {}
    differences: Dict[str, List[Dict[str, Any]]] = {}
    for panel in panels:
        results[panel] = {}
        for g, labels in groups.items():
            n = int(sum(len(s) for s in strata(labels, panel, "correct")))
            row: Dict[str, Any] = {"models": labels, "num_problems": n}
            for name, fld in METRICS:
                row[name] = bootstrap_interval(strata(labels, panel, fld), **ci).to_dict()
            row["truncation_rate"] = float(np.mean([s.mean() for s in strata(labels, panel, "truncated")]))
            if g != BASE_LABEL:
                seeds = spec.seeds_of(g)
                row["per_seed"] = {
                    str(s): {name: per_seed_value(run_name(g, s), panel, fld) for name, fld in METRICS} for s in seeds
                }
                row["seed_spread"] = {
                    name: seed_spread({s: per_seed_value(run_name(g, s), panel, fld) for s in seeds})
                    for name, fld in METRICS
                }
            results[panel][g] = row
        differences[panel] = []
        for g in spec.methods:
            for base in st.baselines:
                if base == g or base not in groups:
                    continue
                d = {"method": g, "baseline": base}
                for name, fld in METRICS:
                    d[name] = paired_difference(
                        strata(groups[g], panel, fld), strata(groups[base], panel, fld), **ci
                    ).to_dict()
                differences[panel].append(d)
    summary = {
        "benchmarks": benches,
        "panels": panels,
        "groups": groups,
        "results": results,
        "differences": differences,
        "stats": {**ci, "method": "paired percentile bootstrap over problems", "seed_pooling": SEED_POOLING},
    }
    summary["statements"] = statements(summary)
    return summary


# ---------------------------------------------------------------------------------------------- words
def _fmt_ci(iv: Dict[str, Any], scale: float, unit: str, signed: bool = True) -> str:
    f = "{:+.1f}" if signed else "{:.1f}"
    return f"{f.format(scale * iv['estimate'])}{unit} [{f.format(scale * iv['lo'])}, {f.format(scale * iv['hi'])}]"


def statements(summary: Dict[str, Any]) -> List[str]:
    """One sentence per (panel, method, baseline): which differences are significant and which are not."""
    conf = round(100 * summary["stats"]["confidence"])
    out = []
    for panel in summary["panels"]:
        for d in summary["differences"][panel]:
            parts = []
            for name, scale, unit, what in (
                ("accuracy", 100, " points", "accuracy"),
                ("mean_length", 1, " tokens", "mean length"),
            ):
                iv = d[name]
                if iv["significant"]:
                    verdict = f"significantly {'higher' if iv['estimate'] > 0 else 'lower'}"
                else:
                    verdict = "not significantly different"
                parts.append(f"{what} {verdict} ({_fmt_ci(iv, scale, unit)})")
            out.append(f"{panel}: {d['method']} vs {d['baseline']}: {parts[0]}; {parts[1]} at {conf}%.")
    return out


def _md_table(summary: Dict[str, Any], panel: str) -> List[str]:
    res = summary["results"][panel]
    diffs = {(d["method"], d["baseline"]): d for d in summary["differences"][panel]}
    baselines = sorted({d["baseline"] for d in summary["differences"][panel]}, key=lambda b: (b != BASE_LABEL, b))
    head = ["model", "seeds", "accuracy % [CI]", "mean length [CI]", "truncated %"]
    for b in baselines:
        head += [f"d acc vs {b} (points)", f"d length vs {b} (tokens)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for g, row in res.items():
        cells = [
            g,
            str(len(row["models"])),
            _fmt_ci(row["accuracy"], 100, "", signed=False),
            _fmt_ci(row["mean_length"], 1, "", signed=False),
            f"{100 * row['truncation_rate']:.1f}",
        ]
        for b in baselines:
            d = diffs.get((g, b))
            if d is None:
                cells += ["", ""]
            else:
                cells += [
                    _fmt_ci(d["accuracy"], 100, "") + (" *" if d["accuracy"]["significant"] else ""),
                    _fmt_ci(d["mean_length"], 1, "") + (" *" if d["mean_length"]["significant"] else ""),
                ]
        lines.append("| " + " | ".join(cells) + " |")
    spreads = [(g, r["seed_spread"]) for g, r in res.items() if r.get("seed_spread") and r["seed_spread"]["accuracy"]]
    if spreads:
        lines += ["", "Seed-to-seed spread (each seed alone):", ""]
        for g, sp in spreads:
            a, m = sp["accuracy"], sp["mean_length"]
            per = ", ".join(f"s{s}: {100 * v:.1f}%" for s, v in a["per_seed"].items())
            lines.append(
                f"- {g}: accuracy {per} (range {100 * a['range']:.1f} points, sd {100 * a['std']:.1f}); "
                f"mean length range {m['range']:.1f} tokens"
            )
    return lines


def render_markdown(summary: Dict[str, Any]) -> str:
    st = summary["stats"]
    conf = round(100 * st["confidence"])
    lines = [
        "# Experiment summary",
        "",
        f"{conf}% intervals: {st['method']}, {st['resamples']} resamples; {st['seed_pooling']}. "
        f"`*`: the interval excludes 0 (significant at {conf}%).",
        "",
    ]
    for panel in summary["panels"]:
        n = next(iter(summary["results"][panel].values()))["num_problems"]
        title = "all benchmarks (unweighted mean over benchmarks)" if panel == "all" else panel
        lines += [f"## {title} ({n} problems)", "", *_md_table(summary, panel), ""]
    lines += ["## In words", ""] + [f"- {s}" for s in summary["statements"]] + [""]
    if summary.get("training_seconds"):
        lines += ["## Time", "", "| run | training seconds |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in summary["training_seconds"].items()]
        lines.append("")
    return "\n".join(lines)


def write_summary(out_dir: str, summary: Dict[str, Any], md: Optional[str] = None) -> None:
    atomic_write_json(os.path.join(out_dir, "summary.json"), summary)
    atomic_write_text(os.path.join(out_dir, "summary.md"), md if md is not None else render_markdown(summary))
