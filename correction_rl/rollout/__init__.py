"""Rollout engines: the ``Generator`` protocol and its HF and vLLM implementations."""

from correction_rl.rollout.base import Generator

__all__ = ["Generator"]
