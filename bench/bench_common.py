"""What the bench scripts share (imported by name: bench/ is sys.path[0] when a script runs)."""

from __future__ import annotations

from typing import List


def timed_run_overrides(data_path: str, steps: int) -> List[str]:
    """Trainer overrides of a timed bench run on `data_path`: `steps` steps, the final_number reward in this
    process, and nothing beside the step itself (no checkpoints, sampled rollouts, TensorBoard or resume)."""
    return [
        f"data.train_path={data_path}",
        f"train.steps={steps}",
        "train.save_every=0",
        "train.sample_every=0",
        "train.resume=none",
        "logging.tensorboard=false",
        "reward.name=final_number",
        "reward.num_workers=1",
    ]
