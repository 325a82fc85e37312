"""Numerical kernels in plain torch (+ torch.distributed): no Megatron import here."""

from .vocab_parallel import NonFiniteLogitsError, TokenStats, token_stats

__all__ = ["NonFiniteLogitsError", "TokenStats", "token_stats"]
