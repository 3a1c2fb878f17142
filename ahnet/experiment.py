"""The paper's comparison as one command: data -> 2D stage -> transfer -> 3D variants -> per-type report.

    python -m ahnet.experiment --preset demo     # `bash run.sh demo`: 2D MC-GCN and AH-Net after transfer
    python -m ahnet.experiment --preset cpu      # the whole comparison at CPU size (under 2 hours, 2 cores)
    python -m ahnet.experiment --preset paper    # the same at the paper's size (ResNet50, GPU)

Models compared: the 2D MC-GCN applied slice by slice; the 3D AH-Net after transfer; the 3D AH-Net from scratch;
a 3D U-Net from scratch; AH-Net after transfer at other pyramid depths ("PFN depth"; cpu: 0). Each
variant is a TrainConfig given to ahnet.train.train (the equivalent ``python -m ahnet.train`` command is printed
for a reader who wants to rerun one); every transferred variant starts with the transfer's exactness check (the training
step that transfers prints the table and refuses an inexact transfer). With ``--rescore`` (the cpu and
paper presets' default) every variant then gets its own second stage, a candidate classifier trained on its
candidates on the training scans (``python -m ahnet.rescore``, printed too; side by side, it starts as soon as
that variant's training has ended), and is evaluated with it.
Evaluation and report: ahnet.evaluate.
Every stage resumes: run the command again after an interruption and finished runs are skipped. On a CPU the
cpu preset trains two variants at a time, each in its own process on one core (``--jobs``; two 1-thread
trainings moved about 11.4 patches/s on this 2-core CPU against 9 for one 2-thread training), a transferred variant
waiting for the 2D stage; lines of their output start with the variant's name.
Under ``torchrun`` (README "Scaling up") every variant trains on all ranks; rank 0 prepares the data first and
alone evaluates; the presets' batches must divide by the number of ranks (checked before any work).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

from ahnet import cli, paths
from ahnet.config import TrainConfig
from ahnet.data.cache import cache_dataset
from ahnet.data.io import load_dataset_json, read_scan
from ahnet.evaluate.cli import evaluate_and_report
from ahnet.evaluate.validation import make_validator
from ahnet.precision import cpu_native_bf16, resolve_device
from ahnet.report.claims import found_line
from ahnet.train import TrainingDiverged, train
from ahnet.train import dist
from ahnet.train.guard import preflight

PROG = "ahnet.experiment"


@dataclass
class Preset:
    """Sizes of one experiment. Patches are (D, H, W) voxels; epochs x steps x batch patches per run."""
    cases: int
    size: int
    encoder: str
    patch_2d: List[int]
    batch_2d: int
    epochs_2d: int
    steps_2d: int
    patch_3d: List[int]
    batch_3d: int
    epochs_3d: int
    steps_3d: int
    lr: float
    variants: List[str]
    z_pool: str = "spacing"
    test_cases: int = 0          # > 0: evaluate on an extra phantom of this many test-only cases (more nodules
                                 # per type than the training phantom's own test split); its shapes come from
                                 # the LIDC scans reserved for testing, as the test split's always do
    test_phantom: Optional[str] = None   # evaluate on this held-out test phantom (ahnet.data.phantom.TEST_PHANTOMS:
                                         # every type equally often); wins over test_cases
    unet_base: int = 16
    window: Optional[List[int]] = None   # evaluation window; None = each run's training patch (the adaptive
                                         # pyramid pools over the window, so it sees what it saw in training)
    jobs: int = 1                        # trainings side by side on a CPU (each on its share of the cores)
    phantom: Dict = field(default_factory=dict)  # options of the training phantom (PhantomOptions fields)
    recipe: Dict = field(default_factory=dict)   # TrainConfig settings of every variant (sampling, validation,
                                                 # early stopping); paper_notes/results.md measures them
    rescore: Optional[Dict] = None       # options of every variant's second stage (python -m ahnet.rescore,
                                         # e.g. {"epochs": 30}), evaluated with it; None = no second stage;
                                         # paper_notes/candidates.md measures it


# Variant names: "<model>-<init>[-pfn<K>]"; "mcgcn-2d" is the 2D stage itself.
ALL_VARIANTS = ["mcgcn-2d", "ahnet-transfer", "ahnet-scratch", "unet3d-scratch",
                "ahnet-transfer-pfn0", "ahnet-transfer-pfn1", "ahnet-transfer-pfn2", "ahnet-transfer-pfn3"]

# The cpu preset's comparison within its 2-hour budget (two trainings side by side, one core each, ~38 min a
# 3D run of 6,000 steps; the 2D stage's 2,400 steps run beside AH-Net from scratch, off the critical path;
# each second stage, at window overlap 0.25, as soon as its training has ended):
# the pyramid ablated (depth 0) against the paper's depth 4; depths 1-3 with --variants.
CPU_VARIANTS = ["mcgcn-2d", "ahnet-transfer", "ahnet-scratch", "unet3d-scratch", "ahnet-transfer-pfn0"]

PRESETS: Dict[str, Preset] = {
    "demo": Preset(cases=32, size=192, encoder="resnet18", patch_2d=[3, 128, 128], batch_2d=8, epochs_2d=4,
                   steps_2d=100, patch_3d=[16, 64, 64], batch_3d=2, epochs_3d=8, steps_3d=250, lr=1e-3,
                   variants=["mcgcn-2d", "ahnet-transfer"], test_phantom="demo",
                   phantom=dict(nodules_per_case=[4, 10], negatives=0.1),
                   recipe=dict(hard_fraction=0.3, val_cases=4, dice_per_patch=True,
                               pos_weighting="inverse-diameter")),
    "cpu": Preset(cases=96, test_phantom="cpu", size=192, encoder="resnet18", patch_2d=[3, 128, 128], batch_2d=8,
                  epochs_2d=10, steps_2d=240, patch_3d=[16, 64, 64], batch_3d=2, epochs_3d=6, steps_3d=1000, lr=1e-3,
                  variants=CPU_VARIANTS, jobs=2, phantom=dict(nodules_per_case=[4, 10], negatives=0.1),
                  recipe=dict(hard_fraction=0.3, val_cases=10, patience=3, dice_per_patch=True,
                              pos_weighting="inverse-diameter"), rescore=dict(overlap=0.25)),
    "paper": Preset(cases=120, test_cases=120, size=384, encoder="resnet50", patch_2d=[3, 256, 256], batch_2d=16, epochs_2d=20,
                    steps_2d=200, patch_3d=[32, 128, 128], batch_3d=4, epochs_3d=30, steps_3d=200, lr=3e-4,
                    variants=ALL_VARIANTS, z_pool="paper", unet_base=32, rescore={}),
}


def parse_variant(name: str):
    """'ahnet-transfer-pfn2' -> ('ahnet', 'transfer', 2); pyramid depth 4 (the paper's) when not named."""
    parts = name.split("-")
    if name == "mcgcn-2d":
        return "mcgcn", "2d", None
    if len(parts) not in (2, 3) or parts[0] not in ("ahnet", "unet3d") or parts[1] not in ("transfer", "scratch"):
        raise ValueError(f"unknown variant {name!r}; choose from {', '.join(ALL_VARIANTS)}")
    if parts[0] == "unet3d" and parts[1] == "transfer":
        raise ValueError("unet3d has no 2D counterpart to transfer from: use unet3d-scratch")
    pfn = 4
    if len(parts) == 3:
        if not parts[2].startswith("pfn") or not parts[2][3:].isdigit():
            raise ValueError(f"unknown variant {name!r}: the third part must be pfnK")
        pfn = int(parts[2][3:])
    return parts[0], parts[1], pfn


def data_spacing(dataset_json: Path) -> List[float]:
    """(sz, sy, sx) of the first case: the z-pooling schedule is chosen for it."""
    cases = load_dataset_json(dataset_json)
    if not cases:
        raise ValueError(f"{dataset_json} lists no cases under 'training'")
    return [round(float(s), 4) for s in read_scan(cases[0]["image"]).spacing]


def stored_phantom(dataset_json: Path) -> dict:
    """What a generated phantom's dataset.json says it is: its PhantomOptions, n_cases and seed."""
    meta = json.loads(dataset_json.read_text(encoding="utf-8"))
    return dict(meta.get("options") or {}, n_cases=meta.get("numTraining"), seed=meta.get("seed"))


def prepare_data(data_dir: Path, preset: Preset, seed: int) -> Path:
    """Generate the phantom into ``data_dir`` (unless its dataset.json exists) and build its cache; returns the
    dataset.json."""
    from ahnet.data.phantom import generate_dataset
    dataset_json = data_dir / paths.DATASET
    if not dataset_json.is_file():
        print(f"[experiment] generating {preset.cases} phantom cases in {data_dir}", flush=True)
        generate_dataset(data_dir, preset.cases, seed=seed, size=preset.size, **preset.phantom)
    have = stored_phantom(dataset_json)
    want = dict(preset.phantom, size=preset.size, n_cases=preset.cases, seed=seed)
    differ = {k: have.get(k) for k, v in want.items() if have.get(k) != (list(v) if isinstance(v, tuple) else v)}
    if differ:
        found = ", ".join(f"{k} {v}" for k, v in differ.items())
        wanted = ", ".join(f"{k} {want[k]}" for k in differ)
        cli.warn(PROG, f"{data_dir} holds another phantom than this preset's ({found} instead of {wanted}); using "
                       f"it as it is (move it away to generate the preset's phantom there)")
    cache_dataset(dataset_json)
    return dataset_json


def check_test_data(data_dir: Path, preset: Preset, seed: int) -> None:
    """Refuse (ValueError, before any training) a test folder that holds another phantom than the preset's
    held-out test phantom, e.g. one an earlier version generated with other sizes or seed."""
    from ahnet.data.phantom import held_out_seed
    from ahnet.data.phantom.heldout import test_phantom_options
    dataset_json = data_dir / paths.DATASET
    if not preset.test_phantom or not dataset_json.is_file():
        return
    want = test_phantom_options(preset.test_phantom)
    have = stored_phantom(dataset_json)
    keys = ("size", "slices", "thickness", "spacing", "negatives", "exact", "n_cases")
    npc = have.get("nodules_per_case")
    same = all(have.get(k) == want[k] for k in keys) and have["seed"] == held_out_seed(seed) and \
        list(npc if isinstance(npc, list) else [npc, npc]) == [want["nodules_per_case"]] * 2
    if not same:
        raise ValueError(f"{data_dir} holds another phantom than the {preset.test_phantom!r} test phantom of seed "
                         f"{seed}; move it away and run again to generate the test phantom there")


def ensure_test_data(data_dir: Path, preset: Preset, seed: int) -> Path:
    """The extra test-only phantom (seeded apart from the training phantom); returns its dataset.json."""
    from ahnet.data.phantom import generate_dataset, generate_test_phantom
    dataset_json = data_dir / paths.DATASET
    if preset.test_phantom and not dataset_json.is_file():
        print(f"[experiment] generating the {preset.test_phantom!r} test-only phantom in {data_dir}", flush=True)
        generate_test_phantom(data_dir, preset.test_phantom, seed=seed)
    elif not dataset_json.is_file():
        print(f"[experiment] generating {preset.test_cases} test-only phantom cases in {data_dir}", flush=True)
        generate_dataset(data_dir, preset.test_cases, seed=seed + 1_000_003, size=preset.size, split=(0, 0, 1))
    return dataset_json


def variant_config(variant: str, preset: Preset, dataset_json: Path, runs: Path, seed: int, device: str,
                   spacing: List[float], sync_bn: bool = False) -> TrainConfig:
    """The training configuration of one variant (resolved: every check done before any training starts)."""
    model, init, pfn = parse_variant(variant)
    d = dict(data=str(dataset_json), cache_dir=str(paths.cache_dir(dataset_json)), encoder=preset.encoder,
             seed=seed, device=device, lr=preset.lr, out=str(runs / variant), resume=True, sync_bn=sync_bn,
             amp=fast_amp(device), **preset.recipe)
    if model == "mcgcn":
        d.update(stage="2d", model="mcgcn", patch_size=list(preset.patch_2d), batch_size=preset.batch_2d,
                 epochs=preset.epochs_2d, steps_per_epoch=preset.steps_2d)
        return TrainConfig.from_dict(d, variant).resolved()
    kwargs: dict = {"z_pool": preset.z_pool}
    if preset.z_pool == "spacing":
        kwargs["spacing"] = spacing
    if model == "unet3d":
        kwargs["base_channels"] = preset.unet_base
    d.update(stage="3d", model=model, patch_size=list(preset.patch_3d), batch_size=preset.batch_3d,
             epochs=preset.epochs_3d, steps_per_epoch=preset.steps_3d, model_kwargs=kwargs,
             channels_last=d["amp"] != "off")
    if model == "ahnet":
        d.update(pfn_depth=pfn, init=init)
        if init == "transfer":
            d["init_from"] = str(runs / "mcgcn-2d")
    return TrainConfig.from_dict(d, variant).resolved()


def fast_amp(device: str) -> str:
    """The experiment's precision: fp16 + GradScaler on CUDA, bf16 on a CPU that computes bfloat16 natively
    (with channels-last 3D: 0.22 s instead of 0.54 s a step, paper_notes/performance.md), else float32."""
    dev = resolve_device(device)
    if dev.type == "cuda":
        return "fp16"
    return "bf16" if dev.type == "cpu" and cpu_native_bf16() else "off"


def command_line(cfg: TrainConfig) -> str:
    """The ``python -m ahnet.train`` command that trains ``cfg`` (the settings that differ from the defaults)."""
    default = TrainConfig().to_dict()
    if cfg.cache_dir == str(paths.cache_dir(cfg.data)):
        default["cache_dir"] = cfg.cache_dir
    flags = []
    for k, v in cfg.to_dict().items():
        if k == "model" or v == default[k]:
            continue
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            flags.append(flag if v else f"--no-{k.replace('_', '-')}")
        elif isinstance(v, list):
            flags += [flag, *map(str, v)]
        elif isinstance(v, dict):
            flags += [flag, json.dumps(v)]
        else:
            flags += [flag, str(v)]
    if cfg.model != {"2d": "mcgcn", "3d": "ahnet"}[cfg.stage]:
        flags += ["--model", cfg.model]
    return "python -m ahnet.train " + " ".join(shlex.quote(f) for f in flags)


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), default="demo", help="experiment size (default demo)")
    p.add_argument("--name", help="experiment name: runs/<name>, data/<name> (default: the preset's)")
    p.add_argument("--data", type=Path, help="an existing dataset.json to use instead of a generated phantom")
    p.add_argument("--variants", nargs="+", help=f"subset of variants to train (default: the preset's); "
                   f"any of {', '.join(ALL_VARIANTS)}")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu, cuda")
    p.add_argument("--seed", type=cli.number(int, 0, 2 ** 32 - 1), default=0)
    p.add_argument("--sync-bn", action="store_true",
                   help="under torchrun: BatchNorm over the global batch of all ranks (python -m ahnet.train --help)")
    p.add_argument("--jobs", type=cli.number(int, 1, 64),
                   help="trainings side by side on a CPU, each in its own process on its share of the cores "
                        "(default: the preset's, cpu: 2; 1 on CUDA and under torchrun); a transferred variant "
                        "waits for the 2D stage")
    p.add_argument("--rescore", action=argparse.BooleanOptionalAction, default=None,
                   help="give every variant its second stage (python -m ahnet.rescore with the preset's options) "
                        "and evaluate with it, or not (default: the preset's: cpu and paper yes, demo no)")
    p.add_argument("--bootstrap", type=cli.number(int, 0, 10 ** 6), default=1000,
                   help="bootstrap resamples of the report's intervals (0 = none)")
    return p


def training_jobs(asked: Optional[int], preset: Preset, device, world: int) -> int:
    """How many trainings run at once: --jobs, else the preset's on a CPU and 1 on CUDA or under torchrun."""
    if asked is not None and asked > 1 and (device.type != "cpu" or world > 1):
        raise ValueError(f"--jobs {asked} runs trainings side by side on a CPU's cores; on {device} "
                         f"{'under torchrun ' if world > 1 else ''}use --jobs 1")
    if asked is not None:
        return asked
    return preset.jobs if device.type == "cpu" and world == 1 else 1


def training_plan(variants: List[str]) -> Dict[str, Optional[str]]:
    """Each variant and the run it must wait for (transferred variants: the 2D stage), in the given order."""
    return {v: "mcgcn-2d" if parse_variant(v)[1] == "transfer" and "mcgcn-2d" in variants else None
            for v in variants}


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


def _train_in_child(variant: str, cfg: TrainConfig, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    sys.stdout = _LinePrefix(sys.stdout, f"[{variant}] ")

    def body() -> None:
        train(cfg, validator_for=make_validator)

    sys.exit(cli.run(f"{PROG} ({variant})", body, {TrainingDiverged: 3}))


def rescore_argv(run: Path, dataset_json: Path, device: str, amp: str, options: Dict) -> List[str]:
    """The ``python -m ahnet.rescore`` arguments of one variant's second stage: the preset's ``options``
    ({"max_cases": 24} -> --max-cases 24), its defaults otherwise."""
    flags = [f for k, v in options.items() for f in ("--" + k.replace("_", "-"), str(v))]
    return ["--run", str(run), "--data", str(dataset_json), "--device", device, "--amp", amp, *flags]


def rescore_command_line(argv: List[str]) -> str:
    """The shell command of one second stage (printed for a reader who wants to rerun it)."""
    return "python -m ahnet.rescore " + " ".join(shlex.quote(a) for a in argv)


def with_rescore(preset: Preset, rescore: Optional[bool]) -> Preset:
    """The preset as --rescore / --no-rescore asks (None: as it is; --rescore keeps a preset's own options)."""
    if rescore is None or rescore == (preset.rescore is not None):
        return preset
    return dataclasses.replace(preset, rescore={} if rescore else None)


def check_rescore_options(options: Dict) -> None:
    """ValueError (before any work) for a preset's second-stage option that ``python -m ahnet.rescore`` lacks or
    refuses; run, data, device and amp are the experiment's own."""
    from ahnet.rescore import build_parser
    actions = {a.dest: a for a in build_parser()._actions if a.option_strings}
    for k, v in options.items():
        if k in ("run", "data", "device", "amp", "help") or k not in actions:
            takes = sorted(set(actions) - {"run", "data", "device", "amp", "help"})
            raise ValueError(f"the preset's second-stage option {k!r} is not one python -m ahnet.rescore takes "
                             f"from a preset; it takes {', '.join(takes)}")
        try:
            if actions[k].type is not None:
                actions[k].type(str(v))
        except (argparse.ArgumentTypeError, ValueError) as e:
            raise ValueError(f"the preset's second-stage option {k} = {v!r}: {e}") from None


def _rescore_in_child(variant: str, argv: List[str], threads: int) -> None:
    import torch

    from ahnet.rescore import main as rescore_main
    torch.set_num_threads(threads)
    sys.stdout = _LinePrefix(sys.stdout, f"[{variant}] ")
    sys.stderr = _LinePrefix(sys.stderr, f"[{variant}] ")
    sys.exit(rescore_main(argv))


def rescore_one_by_one(argvs: Dict[str, List[str]]) -> int:
    """Train every variant's second stage in this process, one after another (side by side, ``--jobs`` > 1,
    they run inside ``train_side_by_side``); 0, or the exit code of the first that failed."""
    from ahnet.rescore import main as rescore_main
    for v, argv in argvs.items():
        print(f"[experiment] {v}: {rescore_command_line(argv)}", flush=True)
    return next((rc for rc in (rescore_main(argv) for argv in argvs.values()) if rc), 0)


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


def train_side_by_side(configs: Dict[str, TrainConfig], jobs: int,
                       rescore_argvs: Optional[Dict[str, List[str]]] = None) -> int:
    """Train the variants ``jobs`` at a time in spawned processes, the CPU's threads shared evenly; each variant's
    second stage (``rescore_argvs``: its ``python -m ahnet.rescore`` arguments) starts once its training has ended
    and a place is free, trainings first. Returns 0, or the exit code of the first process that failed (it printed
    the one error line; the others are stopped, resumable)."""
    import torch

    threads = max(1, torch.get_num_threads() // jobs)
    rescore_argvs = rescore_argvs or {}
    for v, cfg in configs.items():
        print(f"[experiment] {v}: {command_line(cfg)}", flush=True)
    for v, argv in rescore_argvs.items():
        print(f"[experiment] {v}, once trained: {rescore_command_line(argv)}", flush=True)
    print(f"[experiment] training {jobs} at a time, {threads} thread(s) each; lines start with the variant",
          flush=True)
    second = {f"{v} (second stage)": v for v in rescore_argvs}

    def start(name: str) -> _Job:
        if name in second:
            return _Job(second[name], rescore_argvs[second[name]], threads, _rescore_in_child,
                        "second stage trained")
        return _Job(name, configs[name], threads)
    return run_jobs({**training_plan(list(configs)), **second}, start, jobs, "training process", "resume it")


def run_jobs(plan: Dict[str, Optional[str]], start, jobs: int, what: str, again: str) -> int:
    """run_when_ready over spawned _Jobs: 0, or the exit code of the first that failed (its process printed its
    one error line); one killed by a signal gets a line "<variant>'s <what> was killed by signal N; run the
    experiment again to <again>" and exit code 1."""
    try:
        run_when_ready(plan, start, jobs)
    except TrainingFailed as e:
        if e.code > 0:
            return e.code
        return cli.fail(PROG, f"{e.variant}'s {what} was killed by signal {-e.code}; run the experiment again to "
                              f"{again}", 1)
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return dist.run_command(PROG, lambda: run_experiment(args), codes={TrainingDiverged: 3})


def run_experiment(args) -> int:
    """Data -> the variants' configs (all checked first) -> training (the 2D stage first) -> evaluation."""
    preset = with_rescore(PRESETS[args.preset], args.rescore)
    name = args.name or f"phantom-{args.preset}"
    runs = paths.RUNS_ROOT / name
    variants = list(args.variants or preset.variants)
    for v in variants:
        parse_variant(v)
    resolve_device(args.device)                       # the options and output places before any data work
    cli.check_output_dir(runs, "--name")
    if not args.data:
        cli.check_output_dir(paths.DATA_ROOT / name, "--name")
    if any(parse_variant(v)[1] == "transfer" for v in variants) and "mcgcn-2d" not in variants:
        variants = ["mcgcn-2d"] + variants
    if preset.rescore is not None:
        check_rescore_options(preset.rescore)
    for v in variants:
        dist.check_batch(preset.batch_2d if parse_variant(v)[0] == "mcgcn" else preset.batch_3d)
    t0 = time.time()
    ctx, device = dist.plan(args.device, resolve_device(args.device))
    dist.start(ctx, device)
    jobs = training_jobs(args.jobs, preset, device, ctx.world_size)
    if args.data:
        dataset_json = Path(args.data)
        ctx.main_first(lambda: cache_dataset(dataset_json))
    else:
        dataset_json = ctx.main_first(lambda: prepare_data(paths.DATA_ROOT / name, preset, args.seed))
    if not args.data:
        check_test_data(paths.DATA_ROOT / f"{name}-test", preset, args.seed)
    spacing = data_spacing(dataset_json)
    configs = {v: variant_config(v, preset, dataset_json, runs, args.seed, args.device, spacing, args.sync_bn)
               for v in variants}
    for v, cfg in configs.items():                   # every variant's network and places before the first trains
        preflight(cfg, sources=cfg.init != "transfer")
    print(f"[experiment] {args.preset}: data {dataset_json} (spacing {spacing} mm), runs in {runs}/, "
          f"variants {', '.join(variants)}", flush=True)
    amp = fast_amp(args.device)                        # second stage and evaluation in the runs' precision
    rescore_argvs = {} if preset.rescore is None else {
        v: rescore_argv(runs / v, dataset_json, args.device, amp, preset.rescore) for v in variants}
    if jobs == 1:
        for v, cfg in configs.items():
            print(f"\n[experiment] {v}: {command_line(cfg)}", flush=True)
            t = time.time()
            train(cfg, validator_for=make_validator)
            print(f"[experiment] {v} trained in {time.time() - t:.0f} s", flush=True)
    else:
        failed = train_side_by_side(configs, jobs, rescore_argvs)
        if failed:
            return failed
    if not ctx.is_main:
        return 0
    if jobs == 1 and rescore_argvs:
        t = time.time()
        failed = rescore_one_by_one(rescore_argvs)
        if failed:
            return failed
        print(f"[experiment] second stages trained in {time.time() - t:.0f} s", flush=True)
    report = paths.run_paths(runs).report
    eval_json = dataset_json
    if (preset.test_phantom or preset.test_cases > 0) and not args.data:
        eval_json = ensure_test_data(paths.DATA_ROOT / f"{name}-test", preset, args.seed)
    flags = ["--runs", *[str(runs / v) for v in variants], "--data", str(eval_json), "--out", str(report),
             "--device", args.device, "--bootstrap", str(args.bootstrap)] + (
        ["--window", *map(str, preset.window)] if preset.window else []) + (
        ["--amp", amp, "--channels-last"] if amp != "off" else []) + (
        ["--rescore"] if preset.rescore is not None else [])
    print(f"\n[experiment] evaluation: python -m ahnet.evaluate {' '.join(shlex.quote(f) for f in flags)}",
          flush=True)
    rep = evaluate_and_report([runs / v for v in variants], eval_json, report, device=args.device,
                              n_bootstrap=args.bootstrap, window=preset.window, amp=amp,
                              channels_last=amp != "off", rescore=preset.rescore is not None,
                              title=f"AH-Net per-type evaluation ({args.preset} preset, {name})")
    print(f"\n[experiment] done in {(time.time() - t0) / 60:.1f} min. Report: {report / 'report.html'} "
          f"(also report.md, report.json)")
    for m in rep["model_order"]:
        if rep["models"][m]["found"]:
            print("[experiment] " + found_line(m, rep["models"][m]["found"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
