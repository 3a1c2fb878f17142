"""The errors of a training run."""
from __future__ import annotations


class TrainError(ValueError):
    """A training run that cannot start or continue; the message says what to change (one sentence)."""


class TrainingDiverged(TrainError):
    """Too many non-finite losses in a row."""
