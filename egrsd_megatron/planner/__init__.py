"""`egrsd plan`: the parallel layout and per-GPU memory of a run, checked before a job is queued."""

from .layout import Layout, make_layout
from .memory import GB, Plan, PlanSettings, check_fits, format_plan, layer_params, plan, stage_params

__all__ = [
    "GB",
    "Layout",
    "Plan",
    "PlanSettings",
    "check_fits",
    "format_plan",
    "layer_params",
    "make_layout",
    "plan",
    "stage_params",
]
