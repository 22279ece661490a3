"""Evaluation metrics: reconstruction quality and prompt adherence."""
