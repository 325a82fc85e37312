"""The teacher pi_T of docs/method.md: the same architecture, scoring with the privileged context.

Modes (`teacher.mode`):
- frozen: a second model instance holding the INITIAL weights for the whole run (memory: one more
  copy of this rank's weight shards, no grads or optimizer states). On resume it is rebuilt from the
  same initial weights, so checkpoints need not carry it.
- live:   the current student weights (no copy); the teacher pass runs them under no_grad.
- sync:   a second instance re-copied from the student every `sync_every` steps (saved in checkpoints,
          since it is not recoverable from the initial weights).

The reference policy of the optional k3 KL term (loss.kl_coef > 0) is also the initial weights: the
frozen teacher's copy when teacher.mode=frozen (no extra memory), else one more `frozen_copy`.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from ..config import TeacherConfig


def frozen_copy(student: torch.nn.Module, build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """A second instance holding the student's CURRENT weights, without grads (this rank's shards only)."""
    copy = build()
    copy.requires_grad_(False)
    copy_weights(copy, student)
    return copy


def copy_weights(dst_model: torch.nn.Module, src_model: torch.nn.Module) -> None:
    with torch.no_grad():
        for dst, src in zip(dst_model.state_dict().values(), src_model.state_dict().values()):
            if isinstance(dst, torch.Tensor):
                dst.copy_(src)


class Teacher:
    """`holds_copy`: losses.weight_copies' verdict (a frozen or sync teacher, and a teacher pass that runs:
    not for grpo); otherwise the teacher is the student itself."""

    def __init__(
        self, cfg: TeacherConfig, student: torch.nn.Module, build: Callable[[], torch.nn.Module], holds_copy: bool
    ):
        self.cfg = cfg
        self.student = student
        self.copy: Optional[torch.nn.Module] = frozen_copy(student, build) if holds_copy else None

    @property
    def model(self) -> torch.nn.Module:
        return self.copy if self.copy is not None else self.student

    @property
    def needs_checkpoint(self) -> bool:
        return self.cfg.mode == "sync" and self.copy is not None

    def sync(self) -> None:
        if self.copy is not None:
            copy_weights(self.copy, self.student)

    def after_step(self, step: int) -> bool:
        """Call after optimizer step `step` (0-based). Returns True when the teacher was re-synced."""
        if self.cfg.mode == "sync" and (step + 1) % self.cfg.sync_every == 0:
            self.sync()
            return True
        return False
