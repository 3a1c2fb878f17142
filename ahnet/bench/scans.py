"""Whole scans through the inference stage, against MONAI's inferer (``python -m ahnet.bench --scans``).

One scan per worker process (its peak memory its own), in HU on the project's grid (z, y, x) = (slices, 512 or
192 pixels): a body of soft tissue with lungs and noise, made in the worker (not timed).

- ours: the library path of ``python -m ahnet.predict --rescore``: the HU scaled to [0, 1] in place
  (``scale_in_place``), the first stage (``predict_volume``: sliding windows, Gaussian blending; then
  ``extract_candidates`` with the default rule), the second stage (``rescore_candidates``: crops and
  CandidateNet over 8 views), each timed apart; reading and writing files are not part of it. The network is
  the paper's AH-Net (ResNet50, 4 pyramid levels, trilinear) with its initial weights (BatchNorm folded as
  ``load_member`` folds it; ``fold`` False: not, the lever alone), its logits lowered by 8
  so that the map is as sparse as a trained detector's, plus 60 nodule-like blobs painted into it after the
  windows (not timed) so that the candidate rule and the second stage have the 50 candidates per scan that the
  rule keeps at most: the second stage timed at its cap.
- monai: ``monai.inferers.sliding_window_inference`` driving MONAI's AHNet (same configuration) on the same
  scan in MONAI's slice-last layout (converted outside the timing), same window, overlap, window batch,
  Gaussian blending, autocast dtype and memory layout; then the sigmoid. It has no candidates or second stage.

Threads: ``threads`` intra-op threads (2 = the two cores); ours with ``workers`` N > 1 runs N window threads of
one intra-op thread each instead. Peak memory: the process's peak RSS above its RSS after the imports: the
network, the scan (a 512 x 512 x 300 scan is 300 MiB in float32; MONAI's in its layout, made slice by slice) and
everything inference adds.
"""
from __future__ import annotations

import time

import numpy as np
import torch

from ahnet.bench.measure import amp_settings, rss_mb

N_BLOBS = 60


def scan_slices(shape, seed: int = 0):
    """The slices (y, x) float32 HU of a synthetic scan of ``shape`` (z, y, x), one at a time: air, an elliptic
    body of soft tissue (40 HU), two lungs (-850 HU), noise of 20 HU."""
    rng = np.random.default_rng(seed)
    _, h, w = shape
    yy, xx = np.ogrid[:h, :w]
    body = ((yy - h / 2) / (0.45 * h)) ** 2 + ((xx - w / 2) / (0.48 * w)) ** 2 <= 1
    lungs = [((yy - h / 2) / (0.3 * h)) ** 2 + ((xx - c * w) / (0.17 * w)) ** 2 <= 1 for c in (0.3, 0.7)]
    plane = np.where(body, 40.0, -1000.0)
    plane[lungs[0] | lungs[1]] = -850.0
    for _ in range(shape[0]):
        yield (plane + rng.normal(0, 20, (h, w))).astype(np.float32)


def synthetic_scan(shape, seed: int = 0) -> np.ndarray:
    """(z, y, x) float32 HU of ``scan_slices``."""
    scan = np.empty(tuple(shape), np.float32)
    for z, plane in enumerate(scan_slices(shape, seed)):
        scan[z] = plane
    return scan


def _paint_blobs(prob: np.ndarray, n: int, seed: int = 1) -> None:
    """n Gaussian blobs (sigma 1 slice x 3 pixels, peaks 0.3..1) into prob, in place (maximum)."""
    rng = np.random.default_rng(seed)
    d, h, w = prob.shape
    for _ in range(n):
        c = [rng.integers(2, d - 2), rng.integers(8, h - 8), rng.integers(8, w - 8)]
        z, y, x = np.ogrid[-2:3, -8:9, -8:9]
        blob = rng.uniform(0.3, 1.0) * np.exp(-0.5 * (z ** 2 + (y / 3.0) ** 2 + (x / 3.0) ** 2))
        box = (slice(c[0] - 2, c[0] + 3), slice(c[1] - 8, c[1] + 9), slice(c[2] - 8, c[2] + 9))
        np.maximum(prob[box], blob.astype(np.float32), out=prob[box])


class _Lowered(torch.nn.Module):
    """The network with its logits lowered by a constant (the map of a detector that is sure of the background),
    keeping its input multiple for the window rule."""

    def __init__(self, net, shift: float = 8.0):
        super().__init__()
        self.net, self.shift, self.input_multiple = net, shift, net.input_multiple

    def forward(self, x):
        return self.net(x) - self.shift


def _ours(spec, base: float) -> dict:
    from ahnet.data.io import Volume
    from ahnet.infer import Ensemble, Member, extract_candidates, predict_volume
    from ahnet.infer.scans import scale_in_place
    from ahnet.infer.second_stage import CROP, Rescorer, rescore_candidates
    from ahnet.nets import AHNet3d
    from ahnet.nets.candidate_net import CandidateNet
    from ahnet.nets.fold import fold_batchnorm

    torch.manual_seed(0)
    net = _Lowered(AHNet3d("resnet50", pfn_depth=4, upsample="trilinear")).eval()
    if spec.get("fold", True):
        fold_batchnorm(net)                                   # as load_member does for inference
    rescorer = Rescorer(CandidateNet().eval(), CROP, {}, amp=spec["amp"], channels_last=spec["channels_last"],
                        workers=spec["workers"])
    ens = Ensemble([Member(net, "ahnet", 3, {}, {"patch_size": spec["window"]}, None)])
    geometry = Volume(np.zeros((0, 0, 0), np.float32), (2.5, 0.7, 0.7))
    scan = synthetic_scan(spec["shape"])
    t = [time.perf_counter()]
    image = scale_in_place(scan)
    prob = predict_volume(ens, image, window=spec["window"], overlap=spec["overlap"], sw_batch=spec["sw_batch"],
                          amp=spec["amp"], channels_last=spec["channels_last"], workers=spec["workers"])
    t.append(time.perf_counter())
    _paint_blobs(prob, N_BLOBS)
    t.append(time.perf_counter())
    rows = extract_candidates(prob, geometry)
    t.append(time.perf_counter())
    rescore_candidates(rescorer, rows, image, prob, geometry)
    t.append(time.perf_counter())
    windows_s, candidates_s, second_s = t[1] - t[0], t[3] - t[2], t[4] - t[3]
    return {"windows_s": windows_s, "candidates_s": candidates_s, "first_stage_s": windows_s + candidates_s,
            "second_stage_s": second_s, "total_s": windows_s + candidates_s + second_s, "candidates": len(rows),
            "peak_mb": rss_mb() - base, "base_rss_mb": base}


def _monai(spec, base: float) -> dict:
    from monai.inferers import sliding_window_inference
    from monai.networks.nets import AHNet

    from ahnet.data.preprocess import clip_and_scale
    from ahnet.precision import to_channels_last

    torch.manual_seed(0)
    net = AHNet(spatial_dims=3, psp_block_num=4, upsample_mode="trilinear").eval()
    if spec["channels_last"]:
        net = to_channels_last(net)
    d, h, w = spec["shape"]
    vol = torch.empty(1, 1, w, h, d)                       # MONAI's layout, filled slice by slice: one copy
    for z, plane in enumerate(scan_slices(spec["shape"])):
        vol[0, 0, :, :, z] = torch.from_numpy(clip_and_scale(plane)).T
    t = time.perf_counter()
    with torch.no_grad(), amp_settings(torch.device("cpu"), spec["dtype"]).autocast(torch.device("cpu")):
        y = sliding_window_inference(vol, tuple(reversed(spec["window"])), spec["sw_batch"], net,
                                     overlap=spec["overlap"], mode="gaussian")
    torch.sigmoid(y.float())
    windows_s = time.perf_counter() - t
    return {"windows_s": windows_s, "first_stage_s": windows_s, "total_s": windows_s, "peak_mb": rss_mb() - base,
            "base_rss_mb": base}


def work_scan(spec: dict) -> dict:
    """One whole scan of spec["shape"] (z, y, x) through ours or MONAI's (module docstring)."""
    import monai.networks.nets  # noqa: F401  (same imports in every worker: same RSS baseline)

    torch.set_num_threads(int(spec.get("threads") or torch.get_num_threads()))
    spec = dict(spec, amp={"fp32": "off", "bf16": "bf16"}[spec["dtype"]])
    base = rss_mb()
    out = _ours(spec, base) if spec["impl"] == "ours" else _monai(spec, base)
    from ahnet.infer import window_starts

    out["windows"] = int(np.prod([len(window_starts(s, w, spec["overlap"]))
                                  for s, w in zip(spec["shape"], spec["window"])]))
    out.update(shape=spec["shape"], threads=torch.get_num_threads(), workers=spec.get("workers", 1),
               fold=spec.get("fold", True))
    return out
