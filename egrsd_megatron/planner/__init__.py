"""`egrsd plan`: the parallel layout and per-GPU memory of a run, checked before a job is queued."""

from .layout import Layout, make_layout
from .memory import (
    GB,
    MicroBatchShape,
    Plan,
    PlanSettings,
    check_fits,
    format_plan,
    layer_params,
    micro_batch_shape,
    plan,
    stage_params,
)

__all__ = [
    "GB",
    "Layout",
    "MicroBatchShape",
    "Plan",
    "PlanSettings",
    "check_fits",
    "format_plan",
    "layer_params",
    "make_layout",
    "micro_batch_shape",
    "plan",
    "stage_params",
]
