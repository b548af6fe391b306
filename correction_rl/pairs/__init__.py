"""Corrections become training pairs here: token-consistent (x, y, y') pairs, reference log-probs, and the one ingest step every mode uses."""
