"""``python -m ahnet.train`` (console script ``ahnet-train``): one training stage, or every fold with --all-folds.

A command on top of the stages: it builds the run's validator (ahnet.evaluate.validation: CPM of whole validation
cases) and hands it to ahnet.train.train, which cannot import the later stages itself."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ahnet.train.config import build_parser, load_config
from ahnet.evaluate.validation import make_validator

from ahnet.train.dist import run_command
from ahnet.train.errors import TrainingDiverged
from ahnet.train.loop import train, train_all_folds

PROG = "ahnet.train"


def main(argv: Sequence[str] | None = None) -> int:
    """Exit codes: 0 done, 2 bad settings or input (one error line), 3 the run diverged, 4 (under torchrun) a
    rank lost the others."""
    parser = build_parser(PROG)
    return run_command(PROG, lambda: _main(parser, argv), codes={TrainingDiverged: 3})


def _main(parser, argv) -> int:
    cfg, _ = load_config(argv, parser)
    if cfg.all_folds:
        train_all_folds(cfg, validator_for=make_validator)
        return 0
    res = train(cfg, validator_for=make_validator)
    print(f"[train] done: {res['run']} (best epoch {res['best_epoch']}, checkpoints in "
          f"{Path(res['last']).parent})" + (f"; {res['stopped']}" if res['stopped'] else ""))
    return 0
