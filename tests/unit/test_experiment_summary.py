"""Experiment file validation, and the summary recomputed from per-problem outcome files written here."""

import json
import os

import numpy as np
import pytest

from egrsd_megatron.config.schema import ConfigError
from egrsd_megatron.experiment.runner import read_outcomes, write_outcomes
from egrsd_megatron.experiment.schema import DataSource, ExperimentSpec, MethodSpec, SynthSource, load_experiment
from egrsd_megatron.experiment.stats import bootstrap_interval, paired_difference
from egrsd_megatron.experiment.summary import build_summary, render_markdown

BENCH = {"b1": 30, "b2": 20}


def _spec():
    return ExperimentSpec(
        benchmarks={b: DataSource(synth=SynthSource(n=n, seed=1)) for b, n in BENCH.items()},
        methods=["grpo", "cl_egrsd"],
        seeds=[1],
        per_method={"grpo": MethodSpec(seeds=[1, 2])},
    )


def _write(tmp, label, bench, correct, length):
    os.makedirs(tmp / "eval" / label, exist_ok=True)
    with open(tmp / "eval" / label / f"{bench}.jsonl", "w") as f:
        for i, (c, n) in enumerate(zip(correct, length)):
            f.write(
                json.dumps(
                    {
                        "problem_id": f"p{i}",
                        "problem_index": i,
                        "correct": float(c),
                        "length": float(n),
                        "truncated": float(n >= 90),
                        "samples": 1,
                    }
                )
                + "\n"
            )


def test_summary_is_recomputed_from_the_outcome_files(tmp_path):
    rng = np.random.default_rng(0)
    data = {}
    for label, p, mu in [("base", 0.3, 80), ("grpo_s1", 0.4, 70), ("grpo_s2", 0.45, 72), ("cl_egrsd_s1", 0.9, 50)]:
        for b, n in BENCH.items():
            c = (rng.random(n) < p).astype(float)
            ln = np.minimum(rng.normal(mu, 10, n).round(), 96)
            _write(tmp_path, label, b, c, ln)
            data[label, b] = (c, ln)
    spec = _spec()
    s = build_summary(str(tmp_path), spec)
    assert s["panels"] == ["b1", "b2", "all"]

    # Read the files back independently and recompute every point estimate by plain means.
    def col(label, b, field):
        with open(tmp_path / "eval" / label / f"{b}.jsonl") as f:
            return np.array([json.loads(x)[field] for x in f])

    groups = {"base": ["base"], "grpo": ["grpo_s1", "grpo_s2"], "cl_egrsd": ["cl_egrsd_s1"]}
    for b in BENCH:
        for g, labels in groups.items():
            acc = np.mean([col(lb, b, "correct") for lb in labels], axis=0)  # seeds pooled per problem
            assert s["results"][b][g]["accuracy"]["estimate"] == pytest.approx(acc.mean(), abs=1e-12)
            ln = np.mean([col(lb, b, "length") for lb in labels], axis=0)
            assert s["results"][b][g]["mean_length"]["estimate"] == pytest.approx(ln.mean(), abs=1e-12)
            trunc = np.mean([col(lb, b, "truncated") for lb in labels])
            assert s["results"][b][g]["truncation_rate"] == pytest.approx(trunc, abs=1e-12)
    # grpo's seeds alone, and their spread
    sp = s["results"]["b1"]["grpo"]["seed_spread"]["accuracy"]
    per = [col(f"grpo_s{k}", "b1", "correct").mean() for k in (1, 2)]
    assert sp["per_seed"] == {"1": pytest.approx(per[0]), "2": pytest.approx(per[1])}
    assert sp["range"] == pytest.approx(abs(per[0] - per[1]))
    # "all" is the unweighted mean over the two benchmarks
    all_acc = np.mean([np.mean([col(lb, b, "correct") for lb in groups["grpo"]]) for b in BENCH])
    assert s["results"]["all"]["grpo"]["accuracy"]["estimate"] == pytest.approx(all_acc)
    # differences: every method vs base and vs grpo, paired per problem
    pairs = [(d["method"], d["baseline"]) for d in s["differences"]["b1"]]
    assert pairs == [("grpo", "base"), ("cl_egrsd", "base"), ("cl_egrsd", "grpo")]
    d = s["differences"]["b2"][2]
    a = np.mean([col("cl_egrsd_s1", "b2", "correct")], axis=0)
    g = np.mean([col(lb, "b2", "correct") for lb in groups["grpo"]], axis=0)
    assert d["accuracy"]["estimate"] == pytest.approx(a.mean() - g.mean())
    ref = paired_difference(a, g, resamples=spec.stats.resamples, seed=spec.stats.seed)
    assert (d["accuracy"]["lo"], d["accuracy"]["hi"]) == (ref.lo, ref.hi)
    # the stratified 'all' interval of one group
    strata = [np.mean([col(lb, b, "length") for lb in groups["grpo"]], axis=0) for b in BENCH]
    ref = bootstrap_interval(strata, resamples=spec.stats.resamples, seed=spec.stats.seed)
    assert s["results"]["all"]["grpo"]["mean_length"]["lo"] == ref.lo
    # words: cl_egrsd (p=0.9) vs base (p=0.3) on 50 problems is a large, significant gain
    big = s["differences"]["all"][1]
    assert big["accuracy"]["significant"] and big["accuracy"]["lo"] > 0
    line = [t for t in s["statements"] if t.startswith("all: cl_egrsd vs base")][0]
    assert "accuracy significantly higher" in line and "mean length significantly lower" in line
    md = render_markdown(s)
    assert f"{100 * big['accuracy']['estimate']:+.1f}" in md and "Seed-to-seed spread" in md


def test_summary_refuses_unpaired_or_missing_outcomes(tmp_path):
    for label in ("base", "grpo_s1", "grpo_s2", "cl_egrsd_s1"):
        for b, n in BENCH.items():
            _write(tmp_path, label, b, np.zeros(n), np.ones(n))
    _write(tmp_path, "base", "b1", np.zeros(29), np.ones(29))
    with pytest.raises(ValueError, match="different numbers of problems"):
        build_summary(str(tmp_path), _spec())
    os.remove(tmp_path / "eval" / "grpo_s2" / "b2.jsonl")
    with pytest.raises(FileNotFoundError, match="grpo_s2"):
        build_summary(str(tmp_path), _spec())


def test_outcomes_from_sample_records(tmp_path):
    bench = tmp_path / "b.jsonl"
    bench.write_text(
        "".join(
            json.dumps({"problem": "q", "answer": "1", **({"id": "x7"} if i == 1 else {})}) + "\n" for i in range(2)
        )
    )
    recs = {
        (p, s): {"correct": (p + s) % 2 == 0, "num_tokens": 10 * (s + 1), "truncated": s == 1}
        for p in range(2)
        for s in range(2)
    }
    # problem 0: s0 correct, s1 wrong+truncated; problem 1: s0 wrong, s1 correct but truncated
    write_outcomes(str(tmp_path / "o.jsonl"), recs, str(bench), k=2)
    out = read_outcomes(str(tmp_path / "o.jsonl"))
    common = {"length": 15.0, "truncated": 0.5, "verifier_correct": 0.5, "samples": 2}
    assert out == [
        {"problem_id": 0, "problem_index": 0, "correct": 0.5, **common},
        {"problem_id": "x7", "problem_index": 1, "correct": 0.0, **common},
    ]  # truncated: not correct
    write_outcomes(str(tmp_path / "o.jsonl"), recs, str(bench), k=2, truncated_is_wrong=False)
    assert [r["correct"] for r in read_outcomes(str(tmp_path / "o.jsonl"))] == [0.5, 0.5]
    del recs[(1, 1)]
    with pytest.raises(RuntimeError, match="fewer than 2 samples"):
        write_outcomes(str(tmp_path / "o2.jsonl"), recs, str(bench), k=2)


def _yaml(tmp_path, text):
    p = tmp_path / "e.yaml"
    p.write_text(text)
    return str(p)


GOOD = "train_config: tiny_cpu\ntrain_data: {synth: {n: 8, seed: 1}}\nbenchmarks: {b: {synth: {n: 4, seed: 2}}}\n"


def test_experiment_file_loads_and_orders_runs(tmp_path):
    spec = load_experiment(
        _yaml(tmp_path, GOOD + "methods: [grpo, cl_egrsd]\nper_method: {grpo: {seeds: [1, 2]}}\n"),
        ["benchmarks.extra={synth: {n: 3, seed: 4, phrasing: scene}}"],
    )
    assert spec.runs() == [("grpo", 1), ("cl_egrsd", 1), ("grpo", 2)]
    assert spec.benchmarks["extra"].synth.phrasing == "scene"


@pytest.mark.parametrize(
    "extra,over,match",
    [
        ("methodz: [grpo]\n", [], "did you mean 'methods'"),
        ("", ["benchmarks.b.synth.phrasin=arith"], "benchmarks.b.synth.phrasing"),
        ("methods: [grpo, ppo]\n", [], "unknown method 'ppo'"),
        ("methods: [grpo]\nper_method: {rlsd: {seeds: [1]}}\n", [], "per_method.rlsd"),
        ("", ["benchmarks.b.synth.phrasing=poetry"], "benchmarks.b.synth.phrasing"),
        ("", ["benchmarks.c={path: /nonexistent.jsonl}"], "benchmarks.c.path"),
        ("methods: [grpo]\nper_method: {grpo: {overrides: [optim.learning_rate=1]}}\n", [], "method grpo"),
        ("seeds: [1, 1]\n", [], "seeds"),
        ("stats: {confidence: 2}\n", [], "stats.confidence"),
    ],
)
def test_experiment_file_errors_name_the_key(tmp_path, extra, over, match):
    with pytest.raises(ConfigError, match=match):
        load_experiment(_yaml(tmp_path, GOOD + extra), over)


def test_runner_refuses_to_mix_settings(tmp_path):
    """Finished work done with other settings is an error naming what to delete; nothing is launched."""
    from egrsd_megatron.experiment.runner import Experiment

    spec = load_experiment(_yaml(tmp_path, GOOD + "methods: [grpo]\n"))
    exp = Experiment(spec, str(tmp_path / "out"))
    exp.prepare_data()
    hf = exp.base_hf_dir()
    rdir = tmp_path / "out" / "runs" / "grpo_s1"
    os.makedirs(rdir)
    record = {
        "overrides": [*exp.run_overrides("grpo", 1, hf)[:-1], "train.resume=none"],
        "config": exp.train_config,
        "status": "done",
    }
    (rdir / "run.json").write_text(json.dumps(record))
    with pytest.raises(ConfigError, match="trained with other settings"):
        exp.train("grpo", 1, hf)
    record["overrides"] = exp.run_overrides("grpo", 1, hf)
    (rdir / "run.json").write_text(json.dumps(record))
    exp.train("grpo", 1, hf)  # done with the same settings: returns without launching
    # A benchmark whose problems changed under a finished evaluation.
    spec2 = load_experiment(_yaml(tmp_path, GOOD.replace("n: 4, seed: 2", "n: 5, seed: 2") + "methods: [grpo]\n"))
    with pytest.raises(ConfigError, match=r"delete .*data/eval/b\.jsonl.*raw/b\.\*"):
        Experiment(spec2, str(tmp_path / "out")).prepare_data()
    # Evaluation settings changed after an evaluation.
    (tmp_path / "out" / "eval" / "base").mkdir(parents=True)
    fp = exp.eval_fingerprint("m")
    fp["eval"]["max_new_tokens"] += 1
    (tmp_path / "out" / "eval" / "base" / "settings.json").write_text(json.dumps(fp))
    with pytest.raises(ConfigError, match="other settings .*eval"):
        exp.evaluate("base", "m", ["b"])
