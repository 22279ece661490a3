"""Checkpoint format and key mappings for external layouts."""
