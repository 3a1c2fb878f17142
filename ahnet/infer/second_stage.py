"""The second stage: candidates rescored by a candidate classifier (false-positive reduction).

A segmentation network ranks its candidates by its own probability p1, which saturates at 1.0 on vessels and
pleura as on nodules. The second stage looks again at each candidate: a crop of the scan (lung window, [0, 1])
and of the first stage's probability map around it, on the scan's own voxel grid (default ``CROP`` = D, H, W
voxels, zero beyond the scan; a rescorer keeps the crop it was trained on), scored by ahnet.nets.CandidateNet as
p2 = the mean of its probabilities over the 8 in-plane views (4 quarter turns, each also mirrored). The
candidate's new score is sqrt(p1 * p2): it ranks high only when both stages agree. Training:
``python -m ahnet.rescore`` (paper_notes/candidates.md).

A run's second stage is ``RUN/rescorer.pt`` (``torch.save`` of {"format", "state_dict", "settings"}; loaded with
``weights_only=True``).
"""
from __future__ import annotations

import contextlib
import functools
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ahnet import paths
from ahnet.checkpoint import CheckpointError, load_checkpoint
from ahnet.nets.candidate_net import CandidateNet
from ahnet.precision import resolve_amp, to_channels_last
from ahnet.infer.candidates import world_to_voxel

__all__ = ["CROP", "RESCORER", "RESCORER_FORMAT", "Rescorer", "crop_at", "candidate_crops", "views",
           "load_rescorer", "load_run_rescorer", "rescore_candidates"]

#: default crop (D, H, W) in voxels of the scan's own grid, centred on the candidate's nearest voxel (20 x 22 x 22 mm
#: at 2.5 mm slices and 0.7 mm pixels; 8 x 48 x 48 scored the same at 2.25x the compute, candidates.md)
CROP = (8, 32, 32)
#: the file of a run's second stage, inside the run folder
RESCORER = paths.RESCORER
RESCORER_FORMAT = 1


def crop_at(array: np.ndarray, centre, size=CROP) -> np.ndarray:
    """(D, H, W) float32 crop of a (z, y, x) array whose voxel (D // 2, H // 2, W // 2) is integer voxel
    ``centre``; zeros where the crop leaves the array."""
    out = np.zeros(tuple(size), np.float32)
    lo = [int(c) - s // 2 for c, s in zip(centre, size)]
    src = tuple(slice(max(l, 0), min(l + s, n)) for l, s, n in zip(lo, size, array.shape))
    if any(sl.stop <= sl.start for sl in src):
        return out
    out[tuple(slice(sl.start - l, sl.stop - l) for sl, l in zip(src, lo))] = array[src]
    return out


def candidate_crops(image01: np.ndarray, prob: np.ndarray, geometry, rows, size=CROP) -> np.ndarray:
    """(n, 2, D, H, W) float32: the scan (scaled to [0, 1]) and the probability map cropped around each
    candidate row (world coordX, coordY, coordZ in mm; ``geometry``: spacing, origin, direction of the scan)."""
    if image01.shape != prob.shape:
        raise ValueError(f"image {image01.shape} and probability map {prob.shape} differ in shape")
    out = np.zeros((len(rows), 2) + tuple(size), np.float32)
    if not len(rows):
        return out
    xyz = np.array([[r["coordX"], r["coordY"], r["coordZ"]] for r in rows], np.float64)
    zyx = np.rint(world_to_voxel(xyz, geometry.spacing, geometry.origin, geometry.direction)).astype(int)
    for i, c in enumerate(zyx):
        out[i, 0], out[i, 1] = crop_at(image01, c, size), crop_at(prob, c, size)
    return out


def views(x: torch.Tensor) -> list:
    """The 8 in-plane views of (N, C, D, H, W) crops: quarter turns k = 0..3 of (H, W), each also mirrored in W."""
    return [torch.rot90(v, k, (-2, -1)) for v in (x, x.flip(-1)) for k in range(4)]


@dataclass
class Rescorer:
    """A trained candidate classifier in eval mode, with the crop it was trained on and its training settings.

    How it computes (``python -m ahnet.predict`` sets these from its own options): ``amp`` (precision.AMP_MODES:
    "bf16" runs the net under bfloat16 autocast, about 2.8x less CPU time per scan with p2 within 1e-4 here,
    performance.md), ``channels_last`` (channels-last 3D crops and net), ``workers`` (threads of one intra-op
    thread each, sharing the 8 views; the same result)."""
    net: CandidateNet
    crop: tuple
    settings: dict
    path: Path | None = None
    amp: str | bool = "off"
    channels_last: bool = False
    workers: int = 1

    def _view_probabilities(self, v: torch.Tensor, amp, device) -> torch.Tensor:
        if self.channels_last:
            v = to_channels_last(v)
        with torch.no_grad(), amp.autocast(device):
            return torch.sigmoid(self.net(v).float())

    @torch.no_grad()
    def probabilities(self, crops: np.ndarray, batch: int = 64) -> np.ndarray:
        """(n, 2, D, H, W) crops -> (n,) float64 p2 in [0, 1], the mean over the 8 views."""
        device = next(self.net.parameters()).device
        amp = resolve_amp(self.amp, device)
        if self.channels_last:
            to_channels_last(self.net)
        out = []
        with ThreadPoolExecutor(self.workers, initializer=torch.set_num_threads, initargs=(1,)) \
                if self.workers > 1 else contextlib.nullcontext() as pool:
            for i in range(0, len(crops), batch):
                x = torch.from_numpy(np.ascontiguousarray(crops[i:i + batch])).to(device)
                run = functools.partial(self._view_probabilities, amp=amp, device=device)
                probs = list(pool.map(run, views(x)) if pool is not None else map(run, views(x)))
                out.append(torch.stack(probs).mean(0).cpu())
        return torch.cat(out).double().numpy() if out else np.zeros(0)


def load_rescorer(path, device="cpu") -> Rescorer:
    """The second stage saved at ``path`` (a rescorer.pt, or a run folder holding one). Raises CheckpointError
    naming the file when it is missing, unsafe, truncated or not a rescorer."""
    path = Path(path)
    if path.is_dir():
        path = path / RESCORER
    if not path.is_file():
        raise CheckpointError(f"{path} does not exist: the run has no second stage yet (train it with python -m "
                              f"ahnet.commands.rescore --run RUN --data DATASET.json)")
    ck = load_checkpoint(path, required_keys=("format", "state_dict", "settings"))
    if ck["format"] != RESCORER_FORMAT:
        raise CheckpointError(f"{path} is a rescorer of format {ck['format']!r}; this version reads "
                              f"{RESCORER_FORMAT}")
    s = dict(ck["settings"])
    try:
        net = CandidateNet(width=int(s["width"]))
        net.load_state_dict(ck["state_dict"])
        crop = tuple(int(v) for v in s["crop"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: not a rescorer this version can rebuild ({str(e).splitlines()[0][:160]})"
                              ) from None
    return Rescorer(net.to(device).eval(), crop, s, path)


def load_run_rescorer(run, device="cpu", rule=None, any_rule: bool = False) -> Rescorer:
    """The second stage of the run folder ``run`` (``--rescore`` of evaluate and predict): ValueError naming
    ``run`` when it is not a folder, or when ``rule`` (the CandidateRule the candidates will come by) is not the
    rule the second stage learnt its candidates by, unless ``any_rule``; else as load_rescorer."""
    if not Path(run).is_dir():
        raise ValueError(f"--rescore needs a run folder holding {RESCORER}; {run} is not a folder")
    rescorer = load_rescorer(run, device)
    learnt = rescorer.settings.get("rule")
    if rule is not None and learnt is not None and rule.describe() != learnt and not any_rule:
        raise ValueError(f"the second stage {rescorer.path} learnt candidates of the rule '{learnt}', not of the "
                         f"rule asked for ('{rule.describe()}'); use that rule, or --rescore-any-rule to apply it")
    return rescorer


def rescore_candidates(rescorer: Rescorer, rows, image01: np.ndarray, prob: np.ndarray, geometry) -> list:
    """Candidate rows of one scan with ``probability`` = sqrt(p1 * p2) and the first stage's score kept as
    ``probability_stage1`` (p1 = the row's probability, p2 = the classifier's)."""
    rows = list(rows)
    p2 = rescorer.probabilities(candidate_crops(image01, prob, geometry, rows, rescorer.crop))
    return [dict(r, probability=float(np.sqrt(float(r["probability"]) * q)), probability_stage1=r["probability"])
            for r, q in zip(rows, p2)]
