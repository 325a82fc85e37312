"""Per-token fields of a sampled rollout in samples.jsonl (what `egrsd inspect` draws): the one owner of
their names and meaning.

For a response of R tokens with teacher entropies H_t (nats, t = 0..R-1):
    tokens             [str]    each token decoded alone
    teacher_entropy    [float]  H_t
    gate               [float]  g(H_t)                       (losses/gate.py, the run's gate settings)
    lookahead_entropy  [float]  H^CL_t = min(H_t, F_t)        (losses/lookahead.py, the run's window and stat)
    gate_lookahead     [float]  g(H^CL_t)
computed for every loss name (the gate is a property of the teacher's entropies, whether the loss uses it
or not), so every run's samples can be inspected the same way.
"""
from __future__ import annotations

from typing import Any, Dict, List, Sequence

import torch

from ..losses.gate import entropy_gate
from ..losses.lookahead import lookahead_entropy

REQUIRED_FIELDS = ("tokens", "teacher_entropy", "gate")
OPTIONAL_FIELDS = ("lookahead_entropy", "gate_lookahead")
DECIMALS = 4   # JSON size: 4 decimals of nats / weights is far finer than any colour scale shows


def per_token_fields(tokenizer: Any, response_ids: Sequence[int], teacher_entropy: Sequence[float] | torch.Tensor,
                     loss_cfg: Any, vocab_size: int) -> Dict[str, List[Any]]:
    """The fields above for one response; `teacher_entropy` holds one value per response token."""
    h = torch.as_tensor(teacher_entropy, dtype=torch.float64).reshape(1, -1)
    if h.shape[1] != len(response_ids):
        raise ValueError(f"per_token_fields: {h.shape[1]} entropies for {len(response_ids)} response tokens")
    mask = torch.ones_like(h, dtype=torch.bool)
    hcl = lookahead_entropy(h, mask, loss_cfg.window, loss_cfg.stat)
    gate = entropy_gate(h, loss_cfg, mask=mask, vocab_size=vocab_size)
    gate_cl = entropy_gate(hcl, loss_cfg, mask=mask, vocab_size=vocab_size)

    def r(t: torch.Tensor) -> List[float]:
        return [round(float(x), DECIMALS) for x in t[0].tolist()]
    return {"tokens": [tokenizer.decode([int(i)]) for i in response_ids], "teacher_entropy": r(h),
            "gate": r(gate), "lookahead_entropy": r(hcl), "gate_lookahead": r(gate_cl)}
