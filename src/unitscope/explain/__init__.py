"""Explain units: statistics, top examples and logit-lens tokens, written as Parquet tables."""

from .examples import write_tables
from .logit_lens import logit_lens

__all__ = ["logit_lens", "write_tables"]
