"""Train a run's second stage, the candidate classifier that rescores its candidates (false-positive reduction).

    python -m ahnet.rescore --run runs/phantom-cpu/ahnet-transfer --data data/phantom-cpu/dataset.json

1. The run's trained model predicts every case of ``--split`` (default train: the scans it was trained on), and
   its candidates come by ahnet.infer.DEFAULT_RULE, as at evaluation.
2. Each candidate is labelled as the FROC counts it: a nodule when it lies within a reference nodule's radius
   (the dataset's annotations.csv), else a false positive. Every reference nodule adds ``--jitter`` crops more,
   centred at a random point within half its radius, so that the classifier also sees the nodules the first
   stage missed.
3. ahnet.nets.CandidateNet learns them from crops of the scan and of the probability map (ahnet.infer.second_stage):
   binary cross-entropy with the classes weighted to balance, AdamW with a one-cycle learning rate, each batch
   turned by a random quarter turn and mirrored at random in W, H and D; seeded, so one thread count repeats it.
   It trains on ``--device`` in channels-last 3D, in the precision ``--fit-amp`` names (bf16 on this CPU: ~0.4x
   the CPU time of float32, behind the depth guard of ahnet.precision).
4. ``RUN/rescorer.pt`` (weights and settings) and ``RUN/rescorer.json`` (settings, counts, the loss per epoch,
   the time), each written atomically.

Nothing is lost on a kill: the collected crops are kept in ``RUN/rescorer-crops.pt`` and the training after each
epoch in ``RUN/rescorer-fit.pt`` (model, optimiser, schedule, scaler and random states), both under a key naming
everything they depend on (the run's checkpoint and the scans byte for byte, the settings, device type, torch and
the package's source); the same command resumes from them, and the resumed second stage equals an uninterrupted one
to the bit. They are removed once rescorer.pt is written; a partial file under another key is not used.

A run that already holds rescorer.pt trained with the same settings is left as it is (``--force`` trains it
again). Evaluation uses it with ``python -m ahnet.evaluate --rescore``; paper_notes/candidates.md measures it.
The crops are held in memory: 66 kB a candidate at the default crop (about 0.15 GB for the cpu preset).
"""
from __future__ import annotations

import json
import shlex
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Callable, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from ahnet import failures, paths
from ahnet.atomic import write_text_atomic
from ahnet.data.io import load_dataset_json, read_annotations_csv
from ahnet.checkpoint import (CheckpointError, capture_rng_state, load_checkpoint, restore_rng_state,
                              save_checkpoint)
from ahnet.evaluate import load_cases
from ahnet.evaluate.store import code_digest, data_digest, run_fingerprint
from ahnet.infer import DEFAULT_RULE, add_window_arguments, extract_candidates, load_ensemble, predict_volume
from ahnet.infer.spacing import PredictionGrid, resolve_inplane
from ahnet.infer.second_stage import CROP, RESCORER_FORMAT, candidate_crops, load_rescorer
from ahnet.infer.windows import check_overlap
from ahnet.nets.candidate_net import CandidateNet
from ahnet.precision import AMP_MODES, guard_training, resolve_amp, resolve_device, to_channels_last

PROG = "ahnet.rescore"
BATCH = 32


def labelled_crops(image01, prob, geometry, nodules, rows, jitter: int, rng, crop=CROP):
    """(crops (n, 2, D, H, W), labels (n,) 1.0 = nodule) for one scan: its candidate ``rows`` (labelled by
    distance <= the nodule's radius) and ``jitter`` crops per reference nodule (centre + uniform offset within
    half its radius, per axis, in mm)."""
    centres = np.array([[a["coordX"], a["coordY"], a["coordZ"]] for a in nodules], float).reshape(-1, 3)
    radii = np.array([float(a["diameter_mm"]) / 2 for a in nodules])
    x = candidate_crops(image01, prob, geometry, rows, crop)
    xyz = np.array([[r["coordX"], r["coordY"], r["coordZ"]] for r in rows], float).reshape(-1, 3)
    dist = np.linalg.norm(xyz[:, None, :] - centres[None, :, :], axis=2)
    y = (dist <= radii[None, :]).any(axis=1).astype(np.float32)
    extra = [dict(zip(("coordX", "coordY", "coordZ"), c + rng.uniform(-0.5, 0.5, 3) * r))
             for c, r in zip(centres, radii) for _ in range(jitter)]
    xj = candidate_crops(image01, prob, geometry, extra, crop)
    return np.concatenate([x, xj]), np.concatenate([y, np.ones(len(xj), np.float32)])


def training_cases(data, split: str, max_cases: int = 0) -> tuple:
    """(cases, images, annotations) of the ``split`` cases of ``data`` that the second stage learns from (the first
    ``max_cases`` when > 0; ahnet.evaluate.load_cases)."""
    ann_csv = paths.annotations_csv(data)
    ann = read_annotations_csv(ann_csv, [e["case_id"] for e in load_dataset_json(data)], data)
    cases, images = load_cases(data, split, ann, ann_csv)
    cases = cases[:max_cases] if max_cases else cases
    return cases, images, ann


def collect(run, cases: list, images: dict, ann: list, jitter: int, seed: int, device, amp: str, crop=CROP,
            overlap: float = 0.5):
    """Predict ``cases`` with ``run`` (sliding windows at ``overlap``; each scan at the run's recorded training
    spacing, as predict and evaluate do: ahnet.infer.spacing) and gather labelled crops on that grid: (crops,
    labels, counts)."""
    ens = load_ensemble([run], device)
    ens.check(None, amp)
    inplane = resolve_inplane("auto", ens)
    rng = np.random.default_rng(seed)
    xs, ys, n_cand = [], [], 0
    for i, c in enumerate(cases, 1):
        cid = c["case_id"]
        work = PredictionGrid.for_scan(c["geometry"], inplane).working(images[cid])
        prob = predict_volume(ens, work.array, overlap=overlap, amp=amp, channels_last=amp != "off")
        rows = extract_candidates(prob, work, seriesuid=cid, rule=DEFAULT_RULE)
        x, y = labelled_crops(work.array, prob, work, [a for a in ann if str(a["seriesuid"]) == cid], rows,
                              jitter, rng, crop)
        xs.append(x), ys.append(y)
        n_cand += len(rows)
        if i % 10 == 0 or i == len(cases):
            print(f"[rescore] {i}/{len(cases)} cases predicted, {n_cand} candidates", file=sys.stderr, flush=True)
    x, y = np.concatenate(xs), np.concatenate(ys)
    return x, y, {"cases": len(cases), "candidates": n_cand, "crops": len(y), "positives": int(y.sum())}


def fit(x: np.ndarray, y: np.ndarray, epochs: int, seed: int, width: int = 16, lr: float = 2e-3,
        device: torch.device = torch.device("cpu"), amp: str = "off", resume: dict | None = None,
        on_epoch: Callable[[dict], None] | None = None) -> tuple:
    """Train a CandidateNet on crops ``x`` (n, 2, D, H, W) with labels ``y`` (n,) on ``device`` in channels-last 3D,
    under ``amp`` (precision.AMP_MODES: bf16 autocast on this CPU takes ~0.4x the CPU time of float32, with the
    depth guard; fp16 with a GradScaler on CUDA); returns (net in eval mode on ``device``, mean loss per epoch).
    Needs both classes; deterministic for a seed, precision, device and thread count. ``on_epoch(state)`` gets the
    training's state after each epoch; ``resume`` (such a state) continues from it, to the same bits."""
    if len(np.unique(y)) < 2:
        raise ValueError(f"the second stage needs nodules and false positives to learn from; got {len(y)} crops "
                         f"all {'nodules' if len(y) and y[0] else 'false positives'}")
    precision = resolve_amp(amp, device)
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed + 1)
    net = to_channels_last(CandidateNet(width=width).to(device))
    guard_training(net, precision, device)
    steps_per_epoch = max(1, len(y) // BATCH)
    opt = torch.optim.AdamW(net.parameters(), lr=lr / 2, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=epochs * steps_per_epoch)
    scaler = torch.amp.GradScaler(device.type, enabled=precision.scaler)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    pos_weight = torch.tensor(float((1 - y.mean()) / y.mean()), device=device)
    losses, t0, first = [], time.time(), 0
    if resume is not None:
        first, losses = restore_fit(resume, net, opt, sched, scaler, rng)
    for epoch in range(first, epochs):
        net.train()
        order, total = rng.permutation(len(y)), 0.0
        for i in range(steps_per_epoch):
            b = torch.from_numpy(order[i * BATCH:(i + 1) * BATCH])
            xb = torch.rot90(xt[b], int(rng.integers(4)), (-2, -1))
            for axis in (-1, -2, -3):
                if rng.random() < 0.5:
                    xb = xb.flip(axis)
            with precision.autocast(device):
                logits = net(to_channels_last(xb.to(device)))
            loss = F.binary_cross_entropy_with_logits(logits.float(), yt[b].to(device), pos_weight=pos_weight)
            opt.zero_grad()
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            sched.step()
            total += loss.item()
        losses.append(total / steps_per_epoch)
        print(f"[rescore] epoch {epoch + 1}/{epochs}: loss {losses[-1]:.4f} ({time.time() - t0:.0f} s)",
              file=sys.stderr, flush=True)
        if on_epoch is not None:
            on_epoch(fit_state(epoch + 1, losses, net, opt, sched, scaler, rng))
    return net.eval(), losses


def fit_state(epoch: int, losses: list, net, opt, sched, scaler, rng) -> dict:
    """What fit() needs to continue after ``epoch`` finished epochs: weights, optimiser, schedule, scaler, the
    losses so far, its own generator's state and the process's (ahnet.checkpoint.capture_rng_state); plain values
    and CPU tensors, for a weights_only file."""
    return {"epoch": epoch, "losses": list(losses), "net": {k: v.detach().cpu().contiguous()
                                                          for k, v in net.state_dict().items()},
            "opt": opt.state_dict(), "sched": sched.state_dict(), "scaler": scaler.state_dict(),
            "rng": rng.bit_generator.state, "process_rng": capture_rng_state()}


def restore_fit(state: dict, net, opt, sched, scaler, rng) -> tuple:
    """Put fit_state's ``state`` back into a freshly built training; returns (epochs done, losses so far)."""
    net.load_state_dict(state["net"])
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    scaler.load_state_dict(state["scaler"])
    rng.bit_generator.state = state["rng"]
    restore_rng_state(state["process_rng"])
    print(f"[rescore] resuming the classifier's training after epoch {state['epoch']}", file=sys.stderr, flush=True)
    return int(state["epoch"]), list(state["losses"])


def partial_key(run, cases: list, images: dict, ann: list, settings: dict, device: torch.device) -> str:
    """sha256 naming a second stage's work in progress: the run's checkpoint and the scans as read, byte for byte,
    the annotations, the settings, the device type, torch and the package's source (ahnet.evaluate.store's
    run_fingerprint)."""
    common = {"settings": settings, "device": device.type, "torch": torch.__version__, "code": code_digest(),
              "data": data_digest(cases, images, ann)}
    return run_fingerprint(run, common)


def load_partial(path: Path, key: str) -> dict | None:
    """The partial file at ``path`` when it was written under ``key``; None (and a line saying why) when it is
    missing, unreadable or another second stage's."""
    if not path.is_file():
        return None
    try:
        state = load_checkpoint(path, required_keys=("key",))
    except CheckpointError as e:
        print(f"[rescore] not resuming from {path}: {e}", file=sys.stderr, flush=True)
        return None
    if state["key"] != key:
        print(f"[rescore] not resuming from {path}: it holds the work of other settings, another model or other "
              f"scans", file=sys.stderr, flush=True)
        return None
    return state


@dataclass(frozen=True)
class SecondStageConfig:
    """How a run's second stage is trained: ``python -m ahnet.rescore``'s options but the run, data, device and
    --force (the experiment builds one from a preset's ``rescore`` dict). Ranges as the command's flags."""
    split: str = "train"
    max_cases: int = 0
    jitter: int = 2
    crop: Tuple[int, int, int] = CROP
    overlap: float = 0.5
    epochs: int = 30
    width: int = 16
    seed: int = 0
    amp: str = "auto"
    fit_amp: str = "auto"

    @classmethod
    def from_dict(cls, d: dict) -> "SecondStageConfig":
        """A checked config from plain values (ValueError naming an unknown key or a value out of range)."""
        known = [f.name for f in fields(cls)]
        unknown = sorted(set(d) - set(known))
        if unknown:
            raise ValueError(f"second-stage option {unknown[0]!r} is not one of {', '.join(known)}")
        d = dict(d)
        if "crop" in d:
            d["crop"] = tuple(int(v) for v in d["crop"])
        return cls(**d).checked()

    def checked(self) -> "SecondStageConfig":
        ranges = {"max_cases": (0, 10 ** 9), "jitter": (0, 100), "epochs": (1, 10000), "width": (1, 256),
                  "seed": (0, 2 ** 32 - 1)}
        for k, (lo, hi) in ranges.items():
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
                raise ValueError(f"second-stage {k} = {v!r} must be an integer in {lo} .. {hi}")
        try:
            check_overlap(self.overlap)
        except ValueError as e:
            raise ValueError(f"second-stage overlap: {e}") from None
        if len(self.crop) != 3 or self.crop[0] < 4 or min(self.crop[1:]) < 8 or max(self.crop) > 512:
            raise ValueError(f"second-stage crop {' '.join(map(str, self.crop))}: CandidateNet pools three times; "
                             f"use 4 8 8 .. 512 512 512")
        for k in ("amp", "fit_amp"):
            if getattr(self, k) not in AMP_MODES:
                raise ValueError(f"second-stage {k} {getattr(self, k)!r} must be one of {', '.join(AMP_MODES)}")
        return self

    def settings(self) -> dict:
        """What a rescorer.pt was trained with (a later call with the same settings leaves it as it is), the
        candidate rule it learnt on included."""
        return {"split": self.split, "max_cases": self.max_cases, "jitter": self.jitter, "epochs": self.epochs,
                "width": self.width, "crop": list(self.crop), "overlap": self.overlap, "seed": self.seed,
                "amp": self.amp, "fit_amp": self.fit_amp, "fit_layout": "channels_last",
                "rule": DEFAULT_RULE.describe()}

    def command_line(self, run, data, device: str) -> str:
        """The ``python -m ahnet.rescore`` command that trains this second stage (the non-default options)."""
        default = SecondStageConfig()
        flags = ["--run", str(run), "--data", str(data), "--device", str(device)]
        for f in fields(self):
            v = getattr(self, f.name)
            if v != getattr(default, f.name):
                flags += ["--" + f.name.replace("_", "-"), *(map(str, v) if isinstance(v, tuple) else [str(v)])]
        return "python -m ahnet.rescore " + " ".join(shlex.quote(x) for x in flags)


def train_rescorer(run, data, device="auto", cfg: SecondStageConfig = SecondStageConfig(), force: bool = False
                   ) -> Path:
    """RUN/rescorer.pt trained by ``cfg``; the run, the data and the config checked first."""
    run, data, cfg = Path(run), Path(data), cfg.checked()
    if not run.is_dir():
        raise ValueError(f"--run {run} is not a run folder")
    if not data.is_file():
        raise ValueError(f"--data {data} does not exist (expected a dataset.json)")
    device = resolve_device(device)
    resolve_amp(cfg.fit_amp, device, "--fit-amp")         # before the training scans are predicted
    rp, settings = paths.run_paths(run), cfg.settings()
    out, partials = rp.rescorer, (rp.rescorer_crops, rp.rescorer_fit)
    failures.check_output_file(out, "--run")
    if out.is_file() and not force:
        have = load_rescorer(out).settings
        if {k: have.get(k) for k in settings} == settings:
            print(f"[rescore] {out} already holds this second stage; --force trains it again")
            return out
    t0 = time.time()
    if force:
        for p in partials:
            p.unlink(missing_ok=True)
    cases, images, ann = training_cases(data, cfg.split, cfg.max_cases)
    key = partial_key(run, cases, images, ann, settings, device)
    x, y, counts = collected_crops(run, cases, images, ann, cfg, device, key)
    net, losses = fit(x, y, cfg.epochs, cfg.seed, cfg.width, device=device, amp=cfg.fit_amp,
                      resume=load_partial(rp.rescorer_fit, key),
                      on_epoch=lambda state: save_checkpoint({"key": key, **state}, rp.rescorer_fit))
    state = {k: v.cpu().contiguous() for k, v in net.state_dict().items()}
    save_checkpoint({"format": RESCORER_FORMAT, "state_dict": state, "settings": settings}, out)
    info = dict(settings, **counts, loss_per_epoch=[round(v, 5) for v in losses], seconds=round(time.time() - t0, 1))
    write_text_atomic(rp.rescorer_json, json.dumps(info, indent=2) + "\n")
    for p in partials:
        p.unlink(missing_ok=True)
    print(f"[rescore] {out}: {counts['candidates']} candidates of {counts['cases']} cases, {counts['positives']} "
          f"nodule crops of {counts['crops']}, {cfg.epochs} epochs in {time.time() - t0:.0f} s")
    return out


def collected_crops(run, cases: list, images: dict, ann: list, cfg: SecondStageConfig, device, key: str) -> tuple:
    """(crops, labels, counts): those a killed call kept under ``key`` (RUN/rescorer-crops.pt), else collected
    now and kept there."""
    path = paths.run_paths(run).rescorer_crops
    kept = load_partial(path, key)
    if kept is not None:
        print(f"[rescore] the crops collected before ({path}) hold for this call; not predicting again",
              file=sys.stderr, flush=True)
        return kept["x"].numpy(), kept["y"].numpy(), dict(kept["counts"])
    x, y, counts = collect(run, cases, images, ann, cfg.jitter, cfg.seed, device, cfg.amp, tuple(cfg.crop),
                           cfg.overlap)
    save_checkpoint({"key": key, "x": torch.from_numpy(x), "y": torch.from_numpy(y), "counts": counts}, path)
    return x, y, counts


def build_parser() -> failures.Parser:
    ap = failures.Parser(PROG, description=__doc__.split("\n\n")[0])
    ap.add_argument("--run", required=True, help="a trained run folder (its trained checkpoint predicts)")
    ap.add_argument("--data", required=True, help="dataset.json whose cases of --split it learns from")
    ap.add_argument("--split", default="train", help="the cases to learn from (default train)")
    ap.add_argument("--max-cases", type=failures.number(int, 0), default=0, help="use the first N cases (0 = all)")
    ap.add_argument("--jitter", type=failures.number(int, 0, 100), default=2,
                    help="extra crops per reference nodule, off its centre by up to half its radius")
    ap.add_argument("--crop", type=failures.number(int, 1, 512), nargs=3, default=list(CROP), metavar=("D", "H", "W"),
                    help="crop around each candidate in voxels (default %s; at least 4 8 8)" % " ".join(map(str, CROP)))
    add_window_arguments(ap, window=False, batch_flag=None,
                         overlap_help="window overlap of the training scans' predictions, in [0, 1) (0.25: 2.8x "
                                      "faster, the same second stage within -0.008 [-0.020, +0.006] CPM; candidates.md)")
    ap.add_argument("--epochs", type=failures.number(int, 1, 10000), default=30, help="passes over the crops")
    ap.add_argument("--width", type=failures.number(int, 1, 256), default=16, help="CandidateNet's first channel count")
    ap.add_argument("--seed", type=failures.number(int, 0, 2 ** 32 - 1), default=0)
    ap.add_argument("--amp", choices=AMP_MODES, default="auto", help="precision of the first stage's maps")
    ap.add_argument("--fit-amp", choices=AMP_MODES, default="auto",
                    help="precision of the classifier's training (bf16: ~0.4x the CPU time of float32 here)")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda[:i] (the first stage's)")
    ap.add_argument("--force", action="store_true", help=f"train again when {paths.RESCORER} exists")
    return ap


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)

    def body() -> int:
        cfg = SecondStageConfig.from_dict({f.name: getattr(a, f.name) for f in fields(SecondStageConfig)})
        train_rescorer(a.run, a.data, a.device, cfg, a.force)
        return 0
    return failures.run(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
