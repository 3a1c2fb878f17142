"""Data-parallel training over several processes: ``torchrun --nproc_per_node N -m ahnet.train ...``.

torchrun starts one process (a rank) per device and sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and
MASTER_PORT (several nodes: torchrun's rendezvous, README "Scaling up"). Without WORLD_SIZE > 1 none of this
acts: ``DistContext()`` is one process and every method below is then the plain single-process behaviour.

- Backend: NCCL on CUDA (rank r trains on cuda:LOCAL_RANK), gloo on CPUs (``--dist-backend``).
- Data: ``--batch-size`` is the global batch B. The epoch's order is EpochSampler's, a pure function of
  (seed, epoch); step k's global batch is order[kB:(k+1)B] and rank r takes slice r of B/N patches of it. So N
  ranks with B/N patches each see exactly the patches one process with B sees, in the same steps.
- Model: DistributedDataParallel averages the gradients. ``--sync-bn`` gives BatchNorm the statistics of the
  global batch (torch's SyncBatchNorm on CUDA, ahnet.train.syncbn on CPUs) and the batch Dice loss sums over
  the global batch, so N ranks then compute what one process with the whole batch computes (float rounding
  aside; tests/test_ddp.py). Without it each rank normalises with its own B/N patches.
- Decisions: per step one all-reduce of (loss finite?, loss): a non-finite loss on any rank skips the step on
  every rank, and the logged loss is the global batch's. Validation runs on rank 0 and its result is broadcast
  (``from_main``): the best epoch, and any stop decision computed from it, are the same on every rank;
  ``any_rank`` agrees on other flags.
- Writes: rank 0 only (checkpoints, log, plot, config.json), atomically as always. A checkpoint carries every
  rank's RNG state (gathered before rank 0 writes), every rank resumes from the same last.pt, and a run killed
  on any rank continues with --resume to the weights of a run never stopped.
- Failures end every rank with one line, never a hang: settings that cannot work (a batch that does not divide,
  NCCL on a CPU, a GPU index under torchrun) before any work (exit 2); a peer lost mid-run (its connection
  breaks, or torchrun's SIGTERM) as DistributedError (exit 4); and a watchdog thread ends a rank that makes no
  progress for ``--dist-timeout`` seconds (a hung peer, a stuck collective, a rank that never joins). The
  process group's own timeout is that plus a minute, so the watchdog speaks first.
"""
from __future__ import annotations

import contextlib
import datetime
import os
import signal
import sys
import threading
import time
import traceback
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Mapping

import torch
import torch.distributed as dist
import torch.nn as nn

from ahnet import failures
from ahnet.train.losses import DiceLoss

from ahnet.train.errors import DistributedError, TrainError
from ahnet.train.syncbn import all_reduce_sum, convert_batchnorm

__all__ = ["DistContext", "env_world", "check_batch", "plan", "start", "wrap_model", "global_batch_loss",
           "rank_rng_state", "run_command", "BACKENDS", "PEER_FAILURE_EXIT"]

BACKENDS = ("auto", "nccl", "gloo")
PEER_FAILURE_EXIT = 4
#: how much longer than --dist-timeout the process group's own timeout is (the watchdog's line comes first)
GROUP_TIMEOUT_MARGIN_S = 60.0
#: words in the RuntimeError of a collective whose peer is gone (gloo raises a plain RuntimeError)
_COMM_WORDS = ("gloo", "nccl", "connection reset", "connection closed", "broken pipe", "processgroup", "c10d",
               "socket")


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) when WORLD_SIZE is not set."""
    raw = {k: os.environ.get(k, "") for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    if not raw["WORLD_SIZE"]:
        return 0, 1, 0
    try:
        world, rank = int(raw["WORLD_SIZE"]), int(raw["RANK"] or 0)
        local = int(raw["LOCAL_RANK"] or rank)
    except ValueError:
        raise TrainError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers (torchrun sets them), got "
                         f"{raw}.") from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise TrainError(f"RANK {rank} / WORLD_SIZE {world} / LOCAL_RANK {local} do not describe a rank of a "
                         f"job (torchrun sets them).")
    return rank, world, local


def check_batch(batch_size: int) -> int:
    """The global batch must divide over the ranks (checked before any work, by train() and by the commands
    that train several stages). Returns the world size."""
    _, world, _ = env_world()
    if world > 1 and batch_size % world:
        good = world * max(1, round(batch_size / world))
        raise TrainError(f"--batch-size {batch_size} is the global batch (patches per optimiser step over all "
                         f"ranks) and must divide evenly over the {world} ranks torchrun started; use a multiple "
                         f"of {world}, e.g. --batch-size {good}.")
    return world


@dataclass
class DistContext:
    """This process's place in a data-parallel job; the default is one process (every method then a no-op)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None
    timeout_s: float = 1800.0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def label(self) -> str:
        return f"rank {self.rank} of {self.world_size}"

    # ----------------------------------------------------------------------------------- agreement
    def guard(self, doing: str):
        """Watchdog over a wait for the other ranks (a collective): no progress for timeout_s ends the rank."""
        return WATCHDOG.guard(doing, self.timeout_s, self.label) if self.enabled else contextlib.nullcontext()

    def _device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")

    def from_main(self, fn: Callable[[], Any], doing: str = "waiting for rank 0") -> Any:
        """``fn()`` on rank 0, its (picklable) result broadcast to every rank; the others do not call fn. An error
        a person can act on (ValueError, OSError) on rank 0 is raised on every rank with rank 0's sentence."""
        if not self.enabled:
            return fn()
        box: list = [None]
        if self.is_main:
            try:
                box = [("ok", fn())]
            except (ValueError, OSError) as e:
                with self.guard(doing):
                    dist.broadcast_object_list([("error", failures.one_line(e))], src=0, device=self._device())
                raise
        with self.guard(doing):
            dist.broadcast_object_list(box, src=0, device=self._device())
        kind, value = box[0]
        if kind == "error":
            raise TrainError(f"rank 0 stopped: {value}")
        return value

    def main_first(self, fn: Callable[[], Any], doing: str = "waiting for rank 0 to prepare the data") -> Any:
        """``fn()`` on rank 0 first, then on the others (what rank 0 builds, such as a cache, they then find)."""
        if not self.enabled:
            return fn()
        out: list = [None]

        def first():
            out[0] = fn()

        self.from_main(first, doing)
        return out[0] if self.is_main else fn()

    def gather(self, obj: Any, doing: str = "gathering the ranks' states") -> list:
        """[obj of rank 0, obj of rank 1, ...] on every rank ([obj] for one process)."""
        if not self.enabled:
            return [obj]
        out: list = [None] * self.world_size
        with self.guard(doing):
            dist.all_gather_object(out, obj)
        return out

    def agree_on_loss(self, loss: torch.Tensor) -> tuple[bool, float]:
        """(every rank's loss finite, the global batch's loss): one all-reduce; for one process the loss itself."""
        value = loss.detach().float().reshape(1)
        if not self.enabled:
            finite = bool(torch.isfinite(value))
            return finite, float(value) if finite else float("nan")
        ok = torch.isfinite(value)
        both = torch.cat([ok.float(), torch.where(ok, value, torch.zeros_like(value))]).to(self._device())
        dist.all_reduce(both)
        n_ok, total = both.tolist()
        finite = int(round(n_ok)) == self.world_size
        return finite, total / self.world_size if finite else float("nan")

    def any_rank(self, flag: bool, doing: str = "agreeing on a decision") -> bool:
        """True on every rank when ``flag`` is True on any rank."""
        if not self.enabled:
            return bool(flag)
        t = torch.tensor([1.0 if flag else 0.0], device=self._device())
        with self.guard(doing):
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item() > 0)

    def barrier(self, doing: str) -> None:
        if self.enabled:
            with self.guard(doing):
                kw = {"device_ids": [torch.cuda.current_device()]} if self.backend == "nccl" else {}
                dist.barrier(**kw)

    # ----------------------------------------------------------------------------------- failures
    @contextlib.contextmanager
    def watched(self, doing: str) -> Iterator[None]:
        """The training loop: the watchdog armed (``progress`` after each unit of work keeps it quiet), and a lost
        peer turned into DistributedError (one line, exit 4) instead of a traceback."""
        if not self.enabled:
            yield
            return
        with WATCHDOG.guard(doing, self.timeout_s, self.label):
            try:
                yield
            except RuntimeError as e:
                if not is_peer_failure(e):
                    raise
                raise DistributedError(f"{self.label} lost contact with another rank while "
                                       f"{WATCHDOG.doing} ({failures.one_line(e)[:200]}); every rank stops: see the "
                                       f"failed rank's own line, then continue with --resume.") from None

    def progress(self, doing: str) -> None:
        """This rank is alive and now ``doing`` (a step, a validation): the watchdog's clock starts again."""
        if self.enabled:
            WATCHDOG.pet(doing)


def is_peer_failure(e: BaseException) -> bool:
    """A RuntimeError from a collective whose peer is gone (gloo and NCCL raise plain RuntimeErrors)."""
    text = str(e).lower()
    return isinstance(e, getattr(dist, "DistError", ())) or any(w in text for w in _COMM_WORDS)


class Watchdog:
    """One daemon thread per process: while armed, a rank that makes no progress (``pet``) for ``timeout``
    seconds prints one error line and exits (code 4). A hung peer or a collective that never completes thus
    ends in a bounded time with a sentence, before the process group's own (longer) timeout."""

    def __init__(self):
        self.deadline: float | None = None
        self.timeout = 0.0
        self.doing = ""
        self.label = ""
        self.depth = 0
        self._thread: threading.Thread | None = None

    def pet(self, doing: str) -> None:
        self.doing = doing
        if self.depth:
            self.deadline = time.monotonic() + self.timeout

    @contextlib.contextmanager
    def guard(self, doing: str, timeout: float, label: str):
        outer = self.depth > 0
        if not outer:
            self.timeout, self.label = float(timeout), label
        self.depth += 1
        self.pet(doing)
        if self._thread is None:
            self._thread = threading.Thread(target=self._watch, name="ahnet-dist-watchdog", daemon=True)
            self._thread.start()
        try:
            yield
        finally:
            self.depth -= 1
            self.deadline = time.monotonic() + self.timeout if self.depth else None

    def _watch(self) -> None:
        while True:
            time.sleep(max(0.05, min(1.0, self.timeout / 20)))
            deadline = self.deadline
            if deadline is not None and time.monotonic() > deadline:
                failures.fail(failures.program(), f"{self.label} made no progress for {self.timeout:g} s while {self.doing} "
                         f"(another rank died or hangs, or --dist-timeout is shorter than a step, a validation or "
                         f"a checkpoint write); every rank stops: continue with --resume.")
                sys.stdout.flush()
                os._exit(PEER_FAILURE_EXIT)


WATCHDOG = Watchdog()


# ---------------------------------------------------------------------------------------------- setup
def plan(device_flag: str, device: torch.device, backend: str = "auto",
         timeout_s: float = 1800.0) -> tuple[DistContext, torch.device]:
    """(this rank's DistContext, the device it trains on) from torchrun's environment, --device (as given, and
    resolved), --dist-backend and --dist-timeout; a setup that cannot work raises TrainError here, before the
    process group or any other work."""
    rank, world, local = env_world()
    if world == 1:
        return DistContext(), device
    if device.type == "cuda":
        if device_flag not in ("auto", "cuda"):
            raise TrainError(f"--device {device_flag}: under torchrun each rank trains on the GPU of its LOCAL_RANK; "
                             f"pass --device cuda (or auto) and choose the GPUs with CUDA_VISIBLE_DEVICES.")
        if local >= torch.cuda.device_count():
            raise TrainError(f"LOCAL_RANK {local} has no GPU: this node has {torch.cuda.device_count()}; start at "
                             f"most that many processes per node (torchrun --nproc_per_node).")
        device = torch.device("cuda", local)
    elif device.type != "cpu":
        raise TrainError(f"--device {device_flag}: data-parallel training runs on CUDA GPUs (nccl) or CPUs (gloo).")
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise TrainError(f"--dist-backend nccl needs CUDA devices but this rank trains on {device.type} (--device "
                         f"{device_flag}); use --dist-backend gloo (or auto) to train on CPUs.")
    available = {"nccl": dist.is_nccl_available(), "gloo": dist.is_gloo_available()}[backend]
    if not available:
        raise TrainError(f"--dist-backend {backend}: this torch ({torch.__version__}) was built without it; use "
                         f"--dist-backend {'gloo' if backend == 'nccl' else 'nccl'}.")
    return DistContext(rank, world, local, backend, float(timeout_s)), device


def start(ctx: DistContext, device: torch.device) -> DistContext:
    """Join (or reuse) the process group of ``ctx``; a torchrun SIGTERM then ends the rank with one line."""
    if not ctx.enabled:
        return ctx
    if dist.is_initialized():
        if dist.get_backend() != ctx.backend:
            raise TrainError(f"this process already trains over {dist.get_backend()}; a later stage cannot switch "
                             f"to --dist-backend {ctx.backend}.")
        return ctx
    if device.type == "cuda":
        torch.cuda.set_device(device)
    timeout = datetime.timedelta(seconds=ctx.timeout_s + GROUP_TIMEOUT_MARGIN_S)
    try:
        with ctx.guard(f"waiting for the {ctx.world_size} ranks to join"):
            dist.init_process_group(ctx.backend, rank=ctx.rank, world_size=ctx.world_size, timeout=timeout)
    except (RuntimeError, ValueError) as e:
        raise DistributedError(f"{ctx.label} could not join the process group ({failures.one_line(e)[:200]}); start "
                               f"every rank with torchrun (README 'Scaling up').") from None
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    return ctx


def _on_sigterm(signum, frame):
    raise DistributedError("stopped by SIGTERM (torchrun stops every rank when one fails: that rank's own line "
                           "says why); continue with --resume.")


def check_same_start(ctx: DistContext, resume_ck: dict | None, last) -> None:
    """Every rank must see the same run folder: the same last.pt at the same step, or none."""
    mine = None if resume_ck is None else int(resume_ck["step"])
    seen = ctx.gather(mine, "comparing the ranks' run folders")
    for r, other in enumerate(seen):
        if other != seen[0]:
            say = {None: "no checkpoint"}
            raise TrainError(f"the ranks disagree about {last}: rank 0 sees {say.get(seen[0], f'step {seen[0]}')}, "
                             f"rank {r} sees {say.get(other, f'step {other}')}; the run folder must be on a "
                             f"filesystem that every rank reads (one shared disk for all nodes).")


def wrap_model(model: nn.Module, ctx: DistContext, device: torch.device, sync_bn: bool) -> nn.Module:
    """The module a step calls: ``model`` itself for one process; else DistributedDataParallel around it, its
    BatchNorms synchronised over the ranks first when ``sync_bn`` (in place: ``model`` keeps its names)."""
    if not ctx.enabled:
        return model
    if sync_bn:
        if device.type == "cuda":
            nn.SyncBatchNorm.convert_sync_batchnorm(model)
        else:
            convert_batchnorm(model)
    ids = [device.index] if device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(model, device_ids=ids, output_device=ids[0] if ids else None)


def global_batch_loss(loss_fn: nn.Module, ctx: DistContext) -> nn.Module:
    """Batch Dice terms of ``loss_fn`` sum over every rank's patches (an autograd-aware all-reduce), so the
    loss is the global batch's; a no-op for one process."""
    if ctx.enabled:
        for m in loss_fn.modules():
            if isinstance(m, DiceLoss) and m.batch:
                m.sum_reduce = all_reduce_sum
    return loss_fn


def rank_rng_state(ctx: DistContext, ck: dict) -> dict | None:
    """This rank's RNG state in a checkpoint, or None when the checkpoint was written by another number of
    ranks (the random streams then start afresh)."""
    saved = int(ck.get("world_size", 1))
    if saved != ctx.world_size:
        return None
    states = ck.get("rng_ranks")
    return states[ctx.rank] if states else ck["rng"]


# ---------------------------------------------------------------------------------------------- commands
def quiet_other_ranks() -> None:
    """Under torchrun only rank 0 prints progress to stdout (every rank still prints its errors)."""
    with contextlib.suppress(TrainError):
        if env_world()[0] != 0:
            sys.stdout = open(os.devnull, "w")


def run_command(prog: str, body: Callable[[], int | None], codes: Mapping[type, int] | None = None) -> int:
    """failures.run(prog, body, codes) for a command that may run under torchrun: ranks other than 0 print errors
    only, a lost peer exits 4, a failed rank leaves at once (a broken process group must not hang its exit) and
    a finished one leaves the group and exits at once (status 0; no interpreter finalization, see below)."""
    quiet_other_ranks()
    try:
        rc = failures.run(prog, body, {**(codes or {}), DistributedError: PEER_FAILURE_EXIT})
    except BaseException as e:                # a bug (its traceback) or an exit: out without waiting on the group
        if not (dist.is_available() and dist.is_initialized()):
            raise
        if isinstance(e, SystemExit):
            rc = e.code if isinstance(e.code, int) else 1
        else:
            traceback.print_exc()
            rc = 1
    if dist.is_available() and dist.is_initialized():
        sys.stdout.flush()
        sys.stderr.flush()
        if rc:
            os._exit(rc)
        dist.destroy_process_group()
        # A finished rank leaves without interpreter finalization: there gloo's worker threads can still hold
        # work objects and abort the process ("terminate called without an active exception", SIGABRT; seen
        # once in CI on a rank whose run had finished and been written). Every file is closed by now.
        os._exit(0)
    return rc
