"""Evaluate dictionaries: fidelity when spliced into the model (SAEBench-shaped JSON)."""

from .fidelity import evaluate_fidelity

__all__ = ["evaluate_fidelity"]
