"""Trainings and second stages side by side on a CPU: each in a spawned process on its share of the cores, started
when what it waits for has ended well (a transferred variant waits for its 2D stage; a second stage for its own
training), lines of output prefixed with the variant's name; a failure or Ctrl-C stops the others, resumable."""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional

from ahnet import failures
from ahnet.train.config import TrainConfig
from ahnet.evaluate.validation import make_validator
from ahnet.train import TrainingDiverged, train
from ahnet.commands.presets import Preset, command_line, parse_variant
from ahnet.commands.rescore import SecondStageConfig, train_rescorer

PROG = "ahnet.experiment"

def training_jobs(asked: Optional[int], preset: Preset, device, world: int) -> int:
    """How many trainings run at once: --jobs, else the preset's on a CPU and 1 on CUDA or under torchrun."""
    if asked is not None and asked > 1 and (device.type != "cpu" or world > 1):
        raise ValueError(f"--jobs {asked} runs trainings side by side on a CPU's cores; on {device} "
                         f"{'under torchrun ' if world > 1 else ''}use --jobs 1")
    if asked is not None:
        return asked
    return preset.jobs if device.type == "cpu" and world == 1 else 1


@dataclass(frozen=True)
class SecondStageJob:
    """One run's second stage: ahnet.commands.rescore.train_rescorer(run, data, device, cfg)."""
    run: Path
    data: Path
    device: str
    cfg: SecondStageConfig

    def command_line(self) -> str:
        return self.cfg.command_line(self.run, self.data, self.device)

    def __call__(self) -> None:
        train_rescorer(self.run, self.data, self.device, self.cfg)


def training_plan(trainings: Dict[str, tuple]) -> Dict[str, Optional[str]]:
    """{run name: (variant, k)} -> each run and the run it must wait for (a transferred variant's k-th training:
    the k-th 2D stage, when it is planned), in the given order."""
    twod = {k: name for name, (v, k) in trainings.items() if v == "mcgcn-2d"}
    return {name: twod.get(k) if parse_variant(v)[1] == "transfer" else None for name, (v, k) in trainings.items()}


def run_when_ready(plan: Dict[str, Optional[str]], start, jobs: int) -> None:
    """Run ``plan``'s items, at most ``jobs`` at once, each once the item it waits for has ended well.
    ``start(name)`` -> an object with ``done()`` and ``result()`` (raises the item's failure); on a failure or
    Ctrl-C, ``stop()`` of the running ones is called (when they have one) and the first error re-raised."""
    waiting, running, ended = list(plan), {}, set()
    try:
        while waiting or running:
            ready = [v for v in waiting if plan[v] is None or plan[v] in ended]
            if not ready and not running:
                raise ValueError(f"{', '.join(waiting)} wait for runs that are not planned")
            for v in ready[:max(0, jobs - len(running))]:
                waiting.remove(v)
                running[v] = start(v)
            for v in [v for v, job in running.items() if job.done()]:
                running.pop(v).result()
                ended.add(v)
            if running:
                time.sleep(0.2)
    except BaseException:
        for job in running.values():
            getattr(job, "stop", lambda: None)()
        raise


class TrainingFailed(Exception):
    """A side-by-side training's process ended with a non-zero exit code: the code of ``python -m ahnet.train``
    (its error line already printed), or minus the signal that killed it."""

    def __init__(self, variant: str, code: int):
        super().__init__(f"{variant}: exit code {code}")
        self.variant, self.code = variant, code


class _Job:
    """One variant's training in a spawned process (``target``, default ``_train_in_child``; the second stage's:
    ``_rescore_in_child``), on ``threads`` CPU threads; ``what`` names the work in the line printed when it ends."""

    def __init__(self, variant: str, cfg, threads: int, target=None, what: str = "trained"):
        import multiprocessing

        self.variant, self.t0, self.what = variant, time.time(), what
        self.proc = multiprocessing.get_context("spawn").Process(
            target=target or _train_in_child, args=(variant, cfg, threads), name=variant)
        self.proc.start()

    def done(self) -> bool:
        return not self.proc.is_alive()

    def result(self) -> None:
        self.proc.join()
        if self.proc.exitcode != 0:
            raise TrainingFailed(self.variant, self.proc.exitcode)
        print(f"[experiment] {self.variant} {self.what} in {time.time() - self.t0:.0f} s", flush=True)

    def stop(self) -> None:
        """Ctrl-C for the child (its run stays resumable), then wait for it to leave."""
        import signal

        if self.proc.is_alive():
            os.kill(self.proc.pid, signal.SIGINT)
        self.proc.join()


def _started_by() -> Optional[int]:
    """The pid of the experiment that spawned this job (None outside a multiprocessing child)."""
    import multiprocessing

    parent = multiprocessing.parent_process()
    return parent.pid if parent is not None else None


def _train_in_child(variant: str, cfg: TrainConfig, threads: int) -> None:
    failures.die_with_parent(_started_by())          # a killed experiment leaves no training behind
    import torch

    torch.set_num_threads(threads)
    sys.stdout = _LinePrefix(sys.stdout, f"[{variant}] ")

    def body() -> None:
        train(cfg, validator_for=make_validator)

    sys.exit(failures.run(f"{PROG} ({variant})", body, {TrainingDiverged: 3}))


def _rescore_in_child(name: str, job: SecondStageJob, threads: int) -> None:
    failures.die_with_parent(_started_by())
    import torch

    torch.set_num_threads(threads)
    sys.stdout = _LinePrefix(sys.stdout, f"[{name}] ")
    sys.stderr = _LinePrefix(sys.stderr, f"[{name}] ")
    sys.exit(failures.run(f"{PROG} ({name} second stage)", job))


def rescore_one_by_one(jobs: Dict[str, SecondStageJob]) -> None:
    """Train every run's second stage in this process, one after another (side by side, ``--jobs`` > 1, they run
    inside ``train_side_by_side``); a failure raises (ValueError, one sentence)."""
    for name, job in jobs.items():
        print(f"[experiment] {name}: {job.command_line()}", flush=True)
        job()


class _LinePrefix:
    """A text stream that starts each line with ``prefix`` (the variant's name on shared output)."""

    def __init__(self, stream, prefix: str):
        self.stream, self.prefix, self.at_start = stream, prefix, True

    def write(self, text: str) -> int:
        out = []
        for piece in text.splitlines(keepends=True):
            out.append((self.prefix if self.at_start else "") + piece)
            self.at_start = piece.endswith("\n")
        self.stream.write("".join(out))
        return len(text)

    def __getattr__(self, name):
        return getattr(self.stream, name)


def train_side_by_side(configs: Dict[str, TrainConfig], plan: Dict[str, Optional[str]], jobs: int,
                       second: Optional[Dict[str, SecondStageJob]] = None) -> int:
    """Train the runs ``jobs`` at a time in spawned processes, the CPU's threads shared evenly, each once the run
    ``plan`` names for it has ended; each run's second stage (``second``) starts once its training has ended and a
    place is free, trainings first. Returns 0, or the exit code of the first process that failed (it printed the
    one error line; the others are stopped, resumable)."""
    import torch

    threads = max(1, torch.get_num_threads() // jobs)
    second = second or {}
    for name, cfg in configs.items():
        print(f"[experiment] {name}: {command_line(cfg)}", flush=True)
    for name, job in second.items():
        print(f"[experiment] {name}, once trained: {job.command_line()}", flush=True)
    print(f"[experiment] training {jobs} at a time, {threads} thread(s) each; lines start with the run", flush=True)
    after = {f"{name} (second stage)": name for name in second}

    def start(item: str) -> _Job:
        if item in after:
            return _Job(after[item], second[after[item]], threads, _rescore_in_child, "second stage trained")
        return _Job(item, configs[item], threads)
    return run_jobs({**plan, **after}, start, jobs, "training process", "resume it")


def run_jobs(plan: Dict[str, Optional[str]], start, jobs: int, what: str, again: str) -> int:
    """run_when_ready over spawned _Jobs: 0, or the exit code of the first that failed (its process printed its
    one error line); one killed by a signal gets a line "<variant>'s <what> was killed by signal N; run the
    experiment again to <again>" and exit code 1."""
    try:
        run_when_ready(plan, start, jobs)
    except TrainingFailed as e:
        if e.code > 0:
            return e.code
        return failures.fail(PROG, f"{e.variant}'s {what} was killed by signal {-e.code}; run the experiment again to "
                              f"{again}", 1)
    return 0
