"""Moved to answersheet.detector (issue 11): `save_random_checkpoint` keeps its old import path for the
tests, the benchmarks and the demo."""

from answersheet.detector.random_init import save_random_checkpoint

__all__ = ["save_random_checkpoint"]
