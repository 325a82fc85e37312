"""Evaluate a rollout engine on a list of problems: sample k responses each, score them, summarise.

Used by the trainer's validation hook (every `train.eval_every` steps, on data.eval_path) and by
`egrsd eval` (which passes `on_result` to append records to a jsonl as they finish, and `done` to resume).

Reproducibility: sample s of problem i is generated with seed stable_seed(benchmark, i, s, params.seed),
and every engine samples each row from its own stream, so a record does not depend on batching, on which
samples were already done, or on how often the run was interrupted.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from ..rewards import score_batch
from ..rollout import RolloutEngine, SamplingParams, stable_seed
from ..utils.progress import Progress
from .metrics import compute_metrics

Record = Dict[str, Any]
# A sample counts as correct when it gets the full reward (rewards are 1 for a verified answer).
CORRECT_AT = 1.0 - 1e-6


def sample_key(record: Mapping[str, Any]) -> Tuple[int, int]:
    return int(record["problem_index"]), int(record["sample_index"])


def evaluate_problems(
    engine: RolloutEngine,
    prompt_builder: Any,
    problems: Sequence[Any],
    reward_name: str,
    params: SamplingParams,
    k: int = 1,
    on_result: Optional[Callable[[Record], None]] = None,
    *,
    benchmark: str = "val",
    done: Optional[Mapping[Tuple[int, int], Record]] = None,
    batch_size: int = 16,
    reward_timeout_s: float = 5.0,
    reward_workers: int = 0,
    progress: bool = False,
) -> Tuple[Dict[str, Any], List[Record]]:
    """(summary metrics, per-sample records sorted by (problem_index, sample_index)).

    `problems`: items with .problem/.answer/.index (data.Problem). `done`: records already computed (keyed by
    (problem_index, sample_index)); they are not regenerated and are part of the result. `on_result` is
    called once per NEW record, in order, right after its batch is scored.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    wanted = {(p.index, s) for p in problems for s in range(k)}
    done = {key: r for key, r in (done or {}).items() if key in wanted}
    prompts = {p.index: prompt_builder.student_prompt_ids(p) for p in problems}
    todo = [(p, s) for p in problems for s in range(k) if (p.index, s) not in done]
    records: Dict[Tuple[int, int], Record] = dict(done)
    bar = None
    if progress:
        bar = Progress(len(problems) * k, initial=len(problems) * k - len(todo), desc=benchmark, unit="sample")
    try:
        for start in range(0, len(todo), batch_size):
            chunk = todo[start : start + batch_size]
            seeds = [stable_seed(benchmark, p.index, s, params.seed) for p, s in chunk]
            comps = engine.generate([prompts[p.index] for p, _ in chunk], params, seeds=seeds)
            rewards, _ = score_batch(
                [c.text for c in comps],
                [p.answer for p, _ in chunk],
                name=reward_name,
                timeout_s=reward_timeout_s,
                num_workers=reward_workers,
            )
            for (p, s), seed, c, r in zip(chunk, seeds, comps, rewards):
                rec = {
                    "benchmark": benchmark,
                    "problem_index": p.index,
                    "sample_index": s,
                    "seed": seed,
                    "prompt_tokens": len(c.prompt_ids),
                    "num_tokens": len(c.response_ids),
                    "truncated": bool(c.truncated),
                    "reward": float(r),
                    "correct": float(r) >= CORRECT_AT,
                    "answer": p.answer,
                    "response": c.text,
                }
                records[(p.index, s)] = rec
                if on_result is not None:
                    on_result(rec)
            if bar is not None:
                bar.update(len(chunk))
    finally:
        if bar is not None:
            bar.close()
    ordered = [records[key] for key in sorted(records)]
    return compute_metrics(ordered), ordered


def validation_scalars(summary: Mapping[str, Any], prefix: str = "val") -> Dict[str, float]:
    """The numeric entries of a summary as TensorBoard scalar names, e.g. val/accuracy, val/mean_length."""
    return {
        f"{prefix}/{k}": float(v) for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)
    }
