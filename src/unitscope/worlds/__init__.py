"""Offline worlds whose truth is exact: drawn scenes with per-pixel masks, the small networks trained on them,
and a synthetic-catalogue sequential recommender. Everything is seeded, so a world is the same on every run."""
