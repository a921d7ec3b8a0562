"""Moved to answersheet.detector.postprocess (issue 11). Only what `detect.detect_day` still imports from
here, until its imports are updated (then delete this file)."""

from answersheet.detector.postprocess import predictions_jsonl, resolve_classes

__all__ = ["predictions_jsonl", "resolve_classes"]
