"""Moved to answersheet.detector (issue 11). Only what `detect.detect_day` still imports from here, until
its imports are updated (then delete this file)."""

from answersheet.detector.preprocess import check_imgsz

__all__ = ["check_imgsz"]
