"""Checkpoints: HF <-> Megatron mapping and conversion (hf_mapping, megatron_format, convert); train state (train_state)."""
