"""Evaluation: metrics (avg@k, pass@k, lengths), the resumable runner behind `egrsd eval`, the training
validation hook, and the frontier / training-curve plots."""

from .metrics import average_summaries, compute_metrics, pass_at_k
from .validation import evaluate_problems, validation_scalars

__all__ = ["average_summaries", "compute_metrics", "pass_at_k", "evaluate_problems", "validation_scalars"]
