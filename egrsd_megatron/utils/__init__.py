"""Small shared helpers with no project dependencies (atomic file output)."""

from .atomic import atomic_dir, atomic_write_bytes, atomic_write_json, atomic_write_text

__all__ = ["atomic_dir", "atomic_write_bytes", "atomic_write_json", "atomic_write_text"]
