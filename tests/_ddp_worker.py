"""One rank of a data-parallel test job: ``python -m tests._ddp_worker SPEC`` with torchrun's environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) set by tests/test_ddp.py (or by torchrun itself).

SPEC (JSON): {"runs": [TrainConfig fields, ...]}, trained one after another through ahnet.train.train with the
CPU-tiny stand-ins below (model_kwargs {"dropout": p} adds dropout); a run may carry faults under "faults":
{"kill" | "hang" | "nan": {"rank": r, "step": k}}: SIGKILL after step k, sleep after step k, a NaN loss at
step k, on rank r. "tf32": false turns TF32 off on CUDA. Errors follow
``python -m ahnet.train``'s contract (ahnet.train.dist.run_command), so the tests read real error lines.
"""
import json
import os
import signal
import sys
import time

import torch
import torch.nn as nn

from ahnet.train.config import TrainConfig
from ahnet.train import TrainingDiverged, train
from ahnet.train.dist import run_command
from tests._tiny import TinyPatches


def tiny_patches(n, patch, seed):
    """The worker's data: TinyPatches with 2 x 6 x 6 blocks."""
    return TinyPatches(n, patch, seed=seed, block=(2, 6, 6))


class TinyBN(nn.Module):
    """conv-BN-ReLU twice and a head; no bias before a BatchNorm (its gradient is rounding noise, which Adam would
    turn into full-size steps). ``nan_step``: the training forward of that step returns NaN."""
    input_multiple = (1, 4, 4)

    def __init__(self, in_channels=1, out_channels=1, encoder="resnet18", pfn_depth=0, dropout=0.0, nan_step=None):
        super().__init__()
        self.encoder = nn.Sequential(nn.Conv3d(in_channels, 4, (1, 3, 3), padding=(0, 1, 1), bias=False),
                                     nn.BatchNorm3d(4), nn.ReLU())
        self.mid = nn.Sequential(nn.Conv3d(4, 4, 3, padding=1, bias=False), nn.BatchNorm3d(4), nn.ReLU())
        self.drop = nn.Dropout3d(dropout) if dropout else nn.Identity()
        self.head = nn.Conv3d(4, out_channels, 1)
        self.nan_step, self.calls = nan_step, 0

    def forward(self, x):
        out = self.head(self.drop(self.mid(self.encoder(x))))
        if self.training:
            self.calls += 1
            if self.calls == self.nan_step:
                out = out * float("nan")
        return out


def datasets(cfg):
    return tiny_patches(12, cfg.patch_size, cfg.seed), tiny_patches(4, cfg.patch_size, cfg.seed + 1)


def main() -> int:
    spec = json.loads(sys.argv[1])
    rank = int(os.environ.get("RANK", "0"))
    if spec.get("tf32") is False:               # CUDA: full float32 convolutions, for a tight comparison
        torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    faults: dict = {}

    def builder(name, **kw):
        kw.pop("nan_step", None)
        return TinyBN(**kw, nan_step=faults["nan"]["step"] if "nan" in faults else None)

    def on_step(step):
        if "kill" in faults and step == faults["kill"]["step"]:
            os.kill(os.getpid(), signal.SIGKILL)
        if "hang" in faults and step == faults["hang"]["step"]:
            time.sleep(3600)

    def body():
        for run in spec["runs"]:
            run = dict(run)
            faults.clear()
            faults.update({k: f for k, f in run.pop("faults", {}).items() if f["rank"] == rank})
            cfg = TrainConfig(**run)
            train(cfg, datasets=datasets(cfg), builder=builder, on_step=on_step)

    return run_command("ahnet.train", body, codes={TrainingDiverged: 3})


if __name__ == "__main__":
    sys.exit(main())
