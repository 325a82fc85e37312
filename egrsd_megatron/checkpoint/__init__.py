"""Checkpoints: Hugging Face folders (hf_io), resharding (reshard, layout, source), on-disk formats (formats,
megatron_format, metadata), offline conversion (convert) and the training state (train_state)."""
