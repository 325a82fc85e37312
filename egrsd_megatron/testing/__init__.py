"""Test utilities shipped with the package (so benches and downstream users can reuse them)."""

from .spawn import run_distributed

__all__ = ["run_distributed"]
