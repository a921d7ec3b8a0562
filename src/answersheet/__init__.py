"""answersheet: turn a day of road-camera archives into a labelled YOLO dataset (the answer sheet)."""

__version__ = "0.1.0"
