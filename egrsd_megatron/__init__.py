"""EGRSD / CL-EGRSD on Megatron-Core."""

__version__ = "0.1.0"
