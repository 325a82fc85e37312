"""Per-token fields of a sampled rollout in samples.jsonl (what `egrsd inspect` draws): the one owner of
their names and meaning.

For a response of R tokens with teacher entropies H_t (nats, t = 0..R-1):
    tokens             [str]    each token decoded alone
    teacher_entropy    [float]  H_t
    gate               [float]  g(H_t)                       (losses/gate.py, the run's gate settings)
    lookahead_entropy  [float]  H^CL_t = min(H_t, F_t)        (losses/lookahead.py, the run's window and stat)
    gate_lookahead     [float]  g(H^CL_t)
computed for every loss name whose step has the teacher's entropies (the gate is a property of those
entropies, whether the loss uses it or not): every loss but grpo, and grpo with teacher.log_entropy=true
(without it grpo runs no teacher pass). The trainer writes them when the rank that logs holds the
entropies (pipeline parallel size 1; with PP > 1 they live on the last stage and samples carry none).
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence

import torch

from ..config.schema import LossConfig
from ..losses.gate import entropy_gate
from ..losses.lookahead import lookahead_entropy
from .batch import MicroBatch
from .metrics import Record

REQUIRED_FIELDS = ("tokens", "teacher_entropy", "gate")
OPTIONAL_FIELDS = ("lookahead_entropy", "gate_lookahead")
DECIMALS = 4  # JSON size: 4 decimals of nats / weights is far finer than any colour scale shows


def per_token_fields(
    tokenizer: Any,
    response_ids: Sequence[int],
    teacher_entropy: Sequence[float] | torch.Tensor,
    loss_cfg: LossConfig,
    vocab_size: int,
) -> Dict[str, List[Any]]:
    """The fields above for one response; `teacher_entropy` holds one value per response token and
    `loss_cfg` is the run's `loss` section (its gate and lookahead settings)."""
    h = torch.as_tensor(teacher_entropy, dtype=torch.float64).reshape(1, -1)
    if h.shape[1] != len(response_ids):
        raise ValueError(f"per_token_fields: {h.shape[1]} entropies for {len(response_ids)} response tokens")
    mask = torch.ones_like(h, dtype=torch.bool)
    hcl = lookahead_entropy(h, mask, loss_cfg.lookahead.window, loss_cfg.lookahead.stat)
    gate = entropy_gate(h, loss_cfg.gate, mask=mask, vocab_size=vocab_size)
    gate_cl = entropy_gate(hcl, loss_cfg.gate, mask=mask, vocab_size=vocab_size)

    def r(t: torch.Tensor) -> List[float]:
        return [round(float(x), DECIMALS) for x in t[0].tolist()]

    return {
        "tokens": [tokenizer.decode([int(i)]) for i in response_ids],
        "teacher_entropy": r(h),
        "gate": r(gate),
        "lookahead_entropy": r(hcl),
        "gate_lookahead": r(gate_cl),
    }


def sample_entropies(
    micro_batches: Sequence[MicroBatch], records: Sequence[Record], num_samples: int
) -> Dict[int, torch.Tensor]:
    """{sample id: its teacher entropies [R_i]} for the samples whose entropies this rank holds.

    `records` pair one to one with `micro_batches` (the last epoch's student passes, in order); each record
    keeps its micro-batch's valid-token entropies row by row (passes.micro_batch_loss keeps
    stats.teacher_entropy[mask]), so they split by the rows' valid-token counts, and row i is sample
    mb.sample_ids[i]. Ids are positions in the list the micro-batches were made from; only ids below
    `num_samples` (this rank's own samples: the first part of a DP-gathered list on DP rank 0) are kept.
    Empty when this rank holds no entropies: grpo without teacher.log_entropy, or not the last pipeline stage.
    """
    if len(records) != len(micro_batches) or any("teacher_entropy" not in r.tokens for r in records):
        return {}
    out: Dict[int, torch.Tensor] = {}
    for mb, rec in zip(micro_batches, records):
        counts = mb.mask.sum(dim=1).tolist()
        h = rec.tokens["teacher_entropy"]
        if h.numel() != sum(counts):
            return {}
        for sid, part in zip(mb.sample_ids, torch.split(h, counts)):
            if sid < num_samples:
                out[sid] = part
    return out
