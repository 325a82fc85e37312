"""Assign sequences to data-parallel ranks and to token-budget micro-batches, by token count. Deterministic.

Two problems, two algorithms (as verl does; NeMo-RL packs with first-fit decreasing too):

1. Data-parallel ranks: a FIXED number k of parts, minimise the largest part's token sum (the slowest
   rank sets the step time). `partition_balanced` is the Karmarkar-Karp largest differencing method for
   k-way partitioning (verl's `get_seqlen_balanced_partitions`): its makespan is at most
   (4/3 - 1/(3k)) x OPT (Michiels et al., "Performance ratios of the Karmarkar-Karp differencing method",
   2007), and in practice far closer to OPT than greedy longest-first.
2. Micro-batches: a HARD token budget per pack (the activation memory of a micro-batch, which `egrsd plan`
   counts), minimise the number of packs (each is one forward/backward). `pack_bins` is first-fit
   decreasing: at most 11/9 OPT + 6/9 bins (Dosa 2007, tight), and never two bins at most half full.
   Karmarkar-Karp cannot guarantee a budget, which is why the micro-batch step uses FFD.

`plan_micro_batches` does 1 then 2 on each rank: plan[rank][micro_batch] = sequence indices.
Ties are broken by index everywhere (sort key (-length, index)), so the plan is a pure function of the
lengths. A sequence longer than the budget is a ConfigError: it cannot share a pack, and giving it an
oversized pack of its own would break the memory bound the budget exists for.
"""

from __future__ import annotations

import heapq
from typing import List, Sequence

from ..config.schema import ConfigError

BUDGET_KEY = "parallel.max_tokens_per_micro_batch"


def _check_lengths(lengths: Sequence[int]) -> None:
    for i, n in enumerate(lengths):
        if int(n) != n or n < 0:
            raise ValueError(f"sequence {i}: length {n!r} is not a non-negative integer")


def check_budget(lengths: Sequence[int], max_tokens: int) -> None:
    """ConfigError naming the first sequence longer than the per-micro-batch token budget."""
    _check_lengths(lengths)
    if max_tokens < 1:
        raise ConfigError(f"config key '{BUDGET_KEY}': {max_tokens} must be >= 1")
    for i, n in enumerate(lengths):
        if n > max_tokens:
            raise ConfigError(
                f"config key '{BUDGET_KEY}': sequence {i} has {n} tokens > the budget {max_tokens}; "
                f"set it to at least the longest prompt + rollout.max_new_tokens"
            )


def _decreasing(lengths: Sequence[int]) -> List[int]:
    """Indices by length, longest first; equal lengths by index (the one tie-break rule)."""
    return sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))


def pack_bins(lengths: Sequence[int], max_tokens: int) -> List[List[int]]:
    """First-fit decreasing: bins of sequence indices with sum(lengths) <= max_tokens each.

    Bins are returned in creation order, indices inside a bin ascending. Raises ConfigError naming the
    first sequence longer than `max_tokens`.
    """
    check_budget(lengths, max_tokens)
    bins: List[List[int]] = []
    free: List[int] = []
    for i in _decreasing(lengths):
        # First fit: the earliest bin with room. O(n x bins) is nothing next to a forward pass.
        for b, room in enumerate(free):
            if lengths[i] <= room:
                bins[b].append(i)
                free[b] -= lengths[i]
                break
        else:
            bins.append([i])
            free.append(max_tokens - lengths[i])
    return [sorted(b) for b in bins]


def partition_balanced(lengths: Sequence[int], k: int) -> List[List[int]]:
    """Karmarkar-Karp k-way partition of sequence indices minimising the spread of token sums.

    Each sequence starts as a k-tuple of parts (itself + k-1 empty ones); repeatedly the two tuples with the
    largest spread (max - min part sum) are merged, pairing the heaviest part of one with the lightest of
    the other. Returns k parts (some empty if there are fewer than k sequences), ordered by their smallest
    index (empty parts last), indices ascending inside a part.
    """
    _check_lengths(lengths)
    if k < 1:
        raise ValueError(f"partition_balanced: k={k} must be >= 1")
    # heap entries: (-spread, creation counter, parts); parts = [(sum, indices)] sorted heaviest first.
    # The counter makes the order total and deterministic (a tuple never compares parts).
    heap = []
    for c, i in enumerate(_decreasing(lengths)):
        parts = [(lengths[i], [i])] + [(0, []) for _ in range(k - 1)]
        heapq.heappush(heap, (-lengths[i], c, parts))
    counter = len(heap)
    while len(heap) > 1:
        _, _, a = heapq.heappop(heap)
        _, _, b = heapq.heappop(heap)
        merged = [(sa + sb, ia + ib) for (sa, ia), (sb, ib) in zip(a, reversed(b))]
        merged.sort(key=lambda p: (-p[0], min(p[1], default=len(lengths))))
        heapq.heappush(heap, (-(merged[0][0] - merged[-1][0]), counter, merged))
        counter += 1
    parts = [sorted(ix) for _, ix in heap[0][2]] if heap else [[] for _ in range(k)]
    return sorted(parts, key=lambda ix: ix[0] if ix else len(lengths))


def plan_micro_batches(lengths: Sequence[int], dp_size: int, max_tokens: int) -> List[List[List[int]]]:
    """plan[dp_rank][micro_batch] = indices into `lengths`: KK across ranks, then FFD under the budget.

    Every index appears exactly once. Ranks may get different numbers of micro-batches (each pipeline runs
    its own schedule; gradients are reduced after it); a rank gets none only if there are fewer sequences
    than ranks. For a teacher pass that shares the student's packs use lengths = max(student, teacher) per
    sample, so one plan fits both budgets.
    """
    if dp_size < 1:
        raise ValueError(f"plan_micro_batches: dp_size={dp_size} must be >= 1")
    check_budget(lengths, max_tokens)  # here, so the error names the global index
    plan = []
    for part in partition_balanced(lengths, dp_size):
        bins = pack_bins([lengths[i] for i in part], max_tokens)
        plan.append([[part[j] for j in b] for b in bins])
    return plan
