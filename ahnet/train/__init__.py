"""Training, one stage at a time: ``python -m ahnet.train --stage 2d|3d ...`` (``--help`` explains each flag).

- 2D stage: MC-GCN on (3, H, W) patches; the 3 slices are the channels, the label is the middle slice.
- 3D stage: AH-Net (from scratch, or ``--init transfer --init-from RUN`` via the 2D -> 3D weight transfer)
  or the 3D U-Net baseline on (D, H, W) patches.

Optimiser Adam (the paper's), learning rate per step: optional linear warm-up, then cosine (to
``min_lr_ratio`` x lr) or poly ((1 - t/T)^0.9), T = epochs x steps-per-epoch. Parameters named ``encoder.*``
may get their own learning rate (``--lr-encoder``). Mixed precision: fp16 autocast + GradScaler on CUDA by
default, bf16 as an option (CUDA or CPU), float32 on CPU by default; the loss is always float32.
``--channels-last`` keeps the 3D network in channels-last 3D memory. On a CPU with native bfloat16,
``--amp bf16 --channels-last`` is about 2x faster than float32 (paper_notes/performance.md).

Exact resume: patches are a pure function of (seed, epoch, index), the batch order of an epoch a pure
function of (seed, epoch), and a checkpoint holds model, optimiser, scaler, scheduler, RNG states and the
position inside the epoch; so a run stopped at any step and resumed with ``--resume`` ends with the same
weights as one never stopped.

Several GPUs or nodes: ``torchrun --nproc_per_node N -m ahnet.train ...`` trains with DistributedDataParallel;
``--batch-size`` is then the global batch, each rank takes its shard of every step's patches, rank 0 validates
and writes, and N ranks with ``--sync-bn`` compute what one process with the whole batch computes (``dist``).

Modules: ``loop`` (train() in named steps, train_all_folds), ``model`` (build / transfer / restore the
network), ``data`` (case split, patch datasets from the cache, batch preparation), ``optim`` (Adam, schedule,
scaler, loss), ``order`` (seeded data order and its shards), ``outputs`` (log.csv, progress.png), ``dist`` (the
ranks of a torchrun job: sharding, agreement, failures), ``syncbn`` (BatchNorm over the global batch on any
backend), ``cli`` (the command, on top of the stages: ``python -m ahnet.train``).
"""
from ahnet.train.batches import make_datasets, prepare_batch, split_batch_2d, split_cases
from ahnet.train.errors import DistributedError, TrainError, TrainingDiverged
from ahnet.train.loop import Validator, train, train_all_folds, validate
from ahnet.train.model import build_network, check_patch_size, model_kwargs_for
from ahnet.train.optim import lr_factor, make_optimizer, make_scheduler
from ahnet.train.order import EpochSampler, mix_seed
from ahnet.train.outputs import LOG_COLUMNS

__all__ = ["TrainError", "TrainingDiverged", "DistributedError", "EpochSampler", "mix_seed", "lr_factor",
           "make_optimizer",
           "make_scheduler", "model_kwargs_for", "build_network", "check_patch_size", "split_batch_2d", "split_cases",
           "make_datasets", "prepare_batch", "validate", "Validator", "train", "train_all_folds", "LOG_COLUMNS"]
