"""The errors of a training run."""
from __future__ import annotations


class TrainError(ValueError):
    """A training run that cannot start or continue; the message says what to change (one sentence)."""


class TrainingDiverged(TrainError):
    """Too many non-finite losses in a row."""


class DistributedError(TrainError):
    """The ranks of a torchrun job could not form their process group, or lost one of them (a rank died, hung
    or its connection broke); every rank stops with one line (exit code 4) and the run continues with --resume."""
