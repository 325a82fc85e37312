"""Process groups from torchrun / Slurm, Megatron parallel_state, per-rank seeding, teardown."""

from .runtime import DistInfo, init_distributed, parallel_info, seed_everything, teardown

__all__ = ["DistInfo", "init_distributed", "parallel_info", "seed_everything", "teardown"]
