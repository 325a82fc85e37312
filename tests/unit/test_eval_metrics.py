"""Evaluation metrics against hand computations; evaluate_problems wiring with a scripted engine."""

from __future__ import annotations

from math import comb
from types import SimpleNamespace

import pytest

from egrsd_megatron.eval.metrics import average_summaries, compute_metrics, default_ks, pass_at_k
from egrsd_megatron.eval.validation import evaluate_problems, validation_scalars
from egrsd_megatron.rollout import Completion, RolloutEngine, SamplingParams


def _rec(p, s, correct, n, trunc=False):
    return {"problem_index": p, "sample_index": s, "correct": correct, "num_tokens": n, "truncated": trunc}


# 3 problems x 4 samples. Correct counts c = 0, 1, 3.
FIXTURE = (
    [_rec(0, s, False, n, t) for s, (n, t) in enumerate([(10, False), (20, False), (30, True), (40, True)])]
    + [_rec(1, s, c, n) for s, (c, n) in enumerate([(True, 5), (False, 15), (False, 25), (False, 35)])]
    + [_rec(2, s, c, n) for s, (c, n) in enumerate([(True, 2), (True, 4), (False, 6), (True, 8)])]
)


def test_pass_at_k_matches_binomial_formula():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                ref = 1.0 - comb(n - c, k) / comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(ref, abs=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(3, 1, 4)
    with pytest.raises(ValueError):
        pass_at_k(3, 4, 1)


def test_metrics_on_fixture_equal_hand_computation():
    m = compute_metrics(FIXTURE)
    assert m["num_problems"] == 3 and m["num_samples"] == 12 and m["samples_per_problem"] == 4
    # avg@4 = mean(0/4, 1/4, 3/4) = 1/3
    assert m["avg@4"] == pytest.approx(1 / 3) and m["accuracy"] == m["avg@4"]
    # pass@1 = avg; pass@2 = mean(0, 1 - C(3,2)/C(4,2), 1 - C(1,2)/C(4,2)) = mean(0, 1 - 3/6, 1) = 1/2
    assert m["pass@1"] == pytest.approx(1 / 3)
    assert m["pass@2"] == pytest.approx(0.5)
    # pass@4 = fraction of problems with any correct = 2/3
    assert m["pass@4"] == pytest.approx(2 / 3)
    # lengths: all 12 sum 100 + 80 + 20 = 200; sorted 2 4 5 6 8 10 15 20 25 30 35 40 -> median (10+15)/2
    assert m["mean_length"] == pytest.approx(200 / 12)
    assert m["median_length"] == 12.5
    # correct: 5, 2, 4, 8 -> mean 4.75, median 4.5 ; wrong: 10 20 30 40 15 25 35 6 -> mean 22.625, median 22.5
    assert m["mean_length_correct"] == pytest.approx(4.75) and m["median_length_correct"] == 4.5
    assert m["mean_length_wrong"] == pytest.approx(181 / 8) and m["median_length_wrong"] == 22.5
    assert m["truncation_rate"] == pytest.approx(2 / 12)


def test_metrics_edge_cases():
    m = compute_metrics([_rec(0, 0, False, 3)])
    assert m["mean_length_correct"] is None and m["accuracy"] == 0.0 and m["pass@1"] == 0.0
    assert default_ks(16) == [1, 2, 4, 8, 16] and default_ks(6) == [1, 2, 4, 6] and default_ks(1) == [1]
    with pytest.raises(ValueError, match="no sample"):
        compute_metrics([])
    with pytest.raises(ValueError, match="pass@8"):
        compute_metrics(FIXTURE, ks=[8])
    avg = average_summaries(
        {
            "a": {"accuracy": 0.5, "mean_length": 10.0, "x": "s", "num_samples": 4},
            "b": {"accuracy": 0.25, "mean_length": 30.0, "num_samples": 6},
        }
    )
    assert avg == {"accuracy": 0.375, "mean_length": 20.0, "num_samples": 10}


class ScriptedEngine(RolloutEngine):
    """Answers with the seed's parity and a length set by the seed: a pure function of the row's seed."""

    def __init__(self):
        self.calls = []

    def generate(self, prompts, params, seeds=None):
        self.calls.append(len(prompts))
        out = []
        for p, s in zip(prompts, seeds):
            n = 3 + s % 5
            out.append(
                Completion(prompt_ids=p, response_ids=list(range(n)), text=f"The answer is {s % 2}", truncated=n == 7)
            )
        return out

    def update_weights(self, named_tensors):
        raise NotImplementedError


class Builder:
    def student_prompt_ids(self, problem):
        return [1, 2, problem.index]


def test_evaluate_problems_scores_records_and_resumes():
    problems = [SimpleNamespace(problem=f"q{i}", answer="1", index=i) for i in range(5)]
    params = SamplingParams(temperature=0.6, max_new_tokens=8, seed=0)
    eng = ScriptedEngine()
    seen = []
    summary, recs = evaluate_problems(
        eng, Builder(), problems, "final_number", params, k=3, on_result=seen.append, benchmark="b", batch_size=4
    )
    assert eng.calls == [4, 4, 4, 3] and len(seen) == 15 and seen == recs
    for r in recs:
        assert r["correct"] == (r["seed"] % 2 == 1) and r["reward"] == float(r["correct"])
        assert r["num_tokens"] == 3 + r["seed"] % 5 and r["truncated"] == (r["num_tokens"] == 7)
    assert summary == compute_metrics(recs)
    # resume from the first 7 records (a partial batch): same records, only the rest generated
    eng2 = ScriptedEngine()
    again = []
    s2, recs2 = evaluate_problems(
        eng2,
        Builder(),
        problems,
        "final_number",
        params,
        k=3,
        on_result=again.append,
        benchmark="b",
        batch_size=5,
        done={(r["problem_index"], r["sample_index"]): r for r in recs[:7]},
    )
    assert recs2 == recs and s2 == summary and again == recs[7:] and sum(eng2.calls) == 8
    # another benchmark name gives other seeds
    _, recs3 = evaluate_problems(ScriptedEngine(), Builder(), problems, "final_number", params, k=3, benchmark="c")
    assert [r["seed"] for r in recs3] != [r["seed"] for r in recs]
    scal = validation_scalars(summary)
    assert scal["val/accuracy"] == summary["accuracy"] and "val/samples_per_problem" in scal
