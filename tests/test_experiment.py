import dataclasses
import json
import re
from pathlib import Path

import pytest

from ahnet.train.config import TrainConfig

from ahnet.commands import experiment, jobs
from ahnet.train.config import load_config
from ahnet import paths
from ahnet.commands.presets import ALL_VARIANTS, PRESETS, Preset, command_line, parse_variant, variant_config


def test_parse_variant():
    assert parse_variant("mcgcn-2d") == ("mcgcn", "2d", None)
    assert parse_variant("ahnet-transfer") == ("ahnet", "transfer", 4)
    assert parse_variant("ahnet-transfer-pfn0") == ("ahnet", "transfer", 0)
    assert parse_variant("unet3d-scratch") == ("unet3d", "scratch", 4)
    with pytest.raises(ValueError, match="unknown variant"):
        parse_variant("vnet-scratch")
    with pytest.raises(ValueError, match="no 2D counterpart"):
        parse_variant("unet3d-transfer")


def test_every_preset_variant_is_valid_and_cpu_preset_runs_the_papers_comparisons():
    for preset in PRESETS.values():
        for v in preset.variants:
            parse_variant(v)
        TrainConfig(**preset.recipe).resolved()           # the recipe's settings are TrainConfig's, checked
    assert {"mcgcn-2d", "ahnet-transfer", "ahnet-scratch", "unet3d-scratch", "ahnet-transfer-pfn0"} <= set(
        PRESETS["cpu"].variants) and set(PRESETS["paper"].variants) == set(ALL_VARIANTS)


def test_variant_configs_and_their_printed_commands(tmp_path):
    p = PRESETS["demo"]
    js = tmp_path / "d" / "dataset.json"
    ep = paths.ExperimentPaths("x")
    cfg = variant_config("ahnet-transfer-pfn2", 0, p, js, ep, 3, "cpu", [2.5, 0.7, 0.7])
    assert (cfg.stage, cfg.model, cfg.init, cfg.pfn_depth, cfg.seed) == ("3d", "ahnet", "transfer", 2, 3)
    assert cfg.init_from == "runs/x/mcgcn-2d" and cfg.out == "runs/x/ahnet-transfer-pfn2"
    assert cfg.cache_dir == "data/cache/d" and cfg.model_kwargs == {"z_pool": "spacing", "spacing": [2.5, 0.7, 0.7]}
    again = variant_config("ahnet-transfer-pfn2", 2, p, js, ep, 3, "cpu", [2.5, 0.7, 0.7])   # its third training
    assert (again.seed, again.out, again.init_from) == (5, "runs/x/ahnet-transfer-pfn2-seed2", "runs/x/mcgcn-2d-seed2")
    assert again.to_dict() == {**cfg.to_dict(), "seed": 5, "out": again.out, "init_from": again.init_from}
    c2d = variant_config("mcgcn-2d", 0, p, js, ep, 3, "cpu", [2.5, .7, .7])
    assert (c2d.stage, c2d.model, c2d.patch_size) == ("2d", "mcgcn", p.patch_2d)
    cun = variant_config("unet3d-scratch", 1, p, js, ep, 3, "cpu", [2.5, .7, .7])
    for c in (cfg, again, c2d, cun):              # the printed command trains exactly this configuration
        cmd = command_line(c).split(" ", 3)
        assert cmd[:3] == ["python", "-m", "ahnet.train"]
        import shlex
        assert load_config(shlex.split(cmd[3]))[0].resolved() == c


def test_the_slice_spacing_study_keeps_the_patch_depth_in_mm_and_refuses_what_it_cannot_render():
    from ahnet.commands.presets import at_slice_spacing
    cpu = PRESETS["cpu"]
    assert at_slice_spacing(cpu, 2.5) is cpu
    thin, thick = at_slice_spacing(cpu, 1.25), at_slice_spacing(cpu, 5.0)
    assert thin.patch_3d == [32, 64, 64] and thick.patch_3d == [8, 64, 64] and thin.patch_2d == cpu.patch_2d
    assert (thin.phantom["thickness"], thin.phantom["slices"], thick.phantom["slices"]) == (1.25, 80, 20)
    assert thin.phantom["nodules_per_case"] == cpu.phantom["nodules_per_case"]
    with pytest.raises(ValueError, match="--slice-spacing 3 mm must lie in 0.5 .. 10 mm and divide 100 mm"):
        experiment.plan_experiment(experiment.build_parser().parse_args(["--preset", "cpu", "--slice-spacing", "3"]))
    with pytest.raises(ValueError, match="--slice-spacing 7.5: the 16-slice 3D patch"):
        at_slice_spacing(cpu, 7.5)


def test_final_and_shifts_are_checked_before_any_work(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    parse = experiment.build_parser().parse_args
    with pytest.raises(ValueError, match="--shifts renders a preset's generated dev or final phantom with shifts; "
                                         "it does not go with --data"):
        experiment.plan_experiment(parse(["--preset", "cpu", "--shifts", "noise2x", "--data", "x/dataset.json"]))
    with pytest.raises(ValueError, match="--shifts: the paper preset has no generated dev phantom"):
        experiment.plan_experiment(parse(["--preset", "paper", "--shifts", "noise2x"]))
    with pytest.raises(ValueError, match="the demo preset has no sealed final test set"):
        experiment.plan_experiment(parse(["--preset", "demo", "--final"]))
    plan = experiment.plan_experiment(parse(["--preset", "cpu", "--final", "--shifts", "all", "--seeds", "3",
                                             "--slice-spacing", "5"]))
    assert plan.name == "phantom-cpu-z5" and len(plan.shifts) == 9 and not any(Path("data").iterdir()
                                                                                if Path("data").exists() else [])
    assert list(plan.trainings)[:6] == ["mcgcn-2d", "ahnet-transfer", "ahnet-scratch", "unet3d-scratch",
                                        "ahnet-transfer-pfn0", "mcgcn-2d-seed1"]
    assert plan.trainings["unet3d-scratch-seed2"] == ("unet3d-scratch", 2) and len(plan.trainings) == 15



@pytest.mark.parametrize("final", [False, True])
def test_shifts_render_dev_or_the_final_set_and_report_beside_it(tmp_path, monkeypatch, final):
    """--shifts without --final renders dev with each shift (data/N-dev-<shift>, reports runs/N/report-<shift>),
    where a lever is chosen; with --final the final set (data/N-final-<shift>, runs/N/report-final-<shift>). Each
    rendering is the set's own test phantom with the shift's options on top."""
    monkeypatch.chdir(tmp_path)
    made = []
    monkeypatch.setattr(experiment.phantoms, "ensure_held_out",
                        lambda folder, name, seed, opts: made.append((Path(folder), name, opts)) or Path(folder))
    monkeypatch.setattr(experiment.phantoms, "check_sealed", lambda final_json, others: 0)
    args = experiment.build_parser().parse_args(["--preset", "cpu", "--shifts", "hu+30", "sharp"]
                                                + (["--final"] if final else []))
    looks = experiment.evaluation_sets(experiment.plan_experiment(args), args)
    where, test_phantom = ("-final", "cpu-final") if final else ("-dev", "cpu")
    assert [(str(d), str(r), s) for d, r, _, s in looks] == [
        (f"data/phantom-cpu{where}", "runs/phantom-cpu/report" + ("-final" if final else ""), None),
        (f"data/phantom-cpu{where}-hu+30", f"runs/phantom-cpu/report{where if final else ''}-hu+30", "hu+30"),
        (f"data/phantom-cpu{where}-sharp", f"runs/phantom-cpu/report{where if final else ''}-sharp", "sharp")]
    shifted = [(str(f), n, o) for f, n, o in made if "-hu+30" in str(f) or "-sharp" in str(f)]
    assert shifted == [(f"data/phantom-cpu{where}-hu+30", test_phantom, {"hu_offset": 30.0}),
                       (f"data/phantom-cpu{where}-sharp", test_phantom, {"psf_sigma": 0.25})]
    assert str(experiment.paths.ExperimentPaths("phantom-cpu").shift_report(final)) == (
        "runs/phantom-cpu/report" + ("-final" if final else "") + "-shifts")


@pytest.mark.parametrize("final", [False, True])
def test_data_only_renders_the_phantoms_and_stops(tmp_path, monkeypatch, capsys, final):
    """--data-only renders the training phantom, dev (or the final set) and each shift, as a full call would, and
    neither trains, evaluates nor logs a look; it does not go with --data or --evaluate-only."""
    monkeypatch.chdir(tmp_path)
    made = []
    monkeypatch.setattr(experiment.phantoms, "prepare_training",
                        lambda folder, *a: made.append(str(folder)) or Path(folder) / "dataset.json")
    monkeypatch.setattr(experiment.phantoms, "ensure_held_out",
                        lambda folder, name, seed, opts: made.append(str(folder)) or Path(folder) / "dataset.json")
    monkeypatch.setattr(experiment.phantoms, "check_sealed", lambda final_json, others: 0)
    for step in ("train_all", "evaluate_set", "summarize_shifts"):
        monkeypatch.setattr(experiment, step, lambda *a, **k: pytest.fail("--data-only went past the phantoms"))
    monkeypatch.setattr(experiment.phantoms, "log_look", lambda *a, **k: pytest.fail("--data-only logged a look"))
    argv = ["--preset", "cpu", "--shifts", "smooth", "--data-only", "--device", "cpu"] + (["--final"] if final else [])
    assert experiment.main(argv) == 0
    held = "data/phantom-cpu-final" if final else "data/phantom-cpu-dev"
    assert made[0] == "data/phantom-cpu" and made[-1] == f"{held}-smooth" and held in made
    assert "phantoms rendered" in capsys.readouterr().out
    parse = experiment.build_parser().parse_args
    for extra, says in ((["--data", "x/dataset.json"], "does not go with --data"),
                        (["--evaluate-only"], "does not go with --evaluate-only")):
        with pytest.raises(ValueError, match=re.escape(says)):
            experiment.plan_experiment(parse(["--preset", "cpu", "--data-only", *extra]))


def test_recipe_changes_every_run(tmp_path, monkeypatch):
    """--recipe KEY=VALUE changes the preset's recipe for every run's TrainConfig (values as JSON, else text), under
    its own --name."""
    monkeypatch.chdir(tmp_path)
    parse = experiment.build_parser().parse_args
    plan = experiment.plan_experiment(parse(["--preset", "cpu", "--name", "lever", "--recipe", "augment=standard-blur",
                                             "hard-fraction=0.1", "--variants", "ahnet-transfer"]))
    assert plan.preset.recipe == dict(PRESETS["cpu"].recipe, augment="standard-blur", hard_fraction=0.1)
    cfgs = [variant_config(v, 0, plan.preset, Path("d/dataset.json"), plan.ep, 0, "cpu", [2.5, 0.7, 0.7])
            for v in plan.variants]
    assert [(c.stage, c.augment, c.hard_fraction, c.pos_weighting) for c in cfgs] == [
        ("2d", "standard-blur", 0.1, "inverse-diameter"), ("3d", "standard-blur", 0.1, "inverse-diameter")]
    assert PRESETS["cpu"].recipe["hard_fraction"] == 0.3 and "augment" not in PRESETS["cpu"].recipe
    assert not Path("data").exists() and not Path("runs").exists()


@pytest.mark.parametrize("argv, says", [
    (["--recipe", "augment=standard-blur"], "--recipe changes how every run trains; give the experiment its own "
                                            "--name"),
    (["--name", "x", "--recipe", "augment"], "--recipe 'augment': expected KEY=VALUE"),
    (["--name", "x", "--recipe", "seed=3"], "--recipe seed: the experiment sets it for each run"),
    (["--name", "x", "--recipe", "augment=blurry"], "augment must be one of"),
    (["--name", "x", "--recipe", "bogus=1"], "--recipe: unknown setting(s) ['bogus']"),
    (["--phantom", "psf_sigma=[0.25,1.0]"], "--phantom changes the scans every run trains on; give the experiment its "
                                            "own --name"),
    (["--name", "x", "--phantom", "psf_sigma"], "--phantom 'psf_sigma': expected KEY=VALUE"),
    (["--name", "x", "--phantom", "size=64"], "--phantom size: not a phantom option a lever"),
    (["--name", "x", "--phantom", "psf_sigma=[1.0,0.2]"], "--phantom: psf_sigma must be a sigma"),
    (["--name", "x", "--phantom", "noise=loud"], "--phantom: noise must be (min, max) HU")])
def test_a_lever_is_refused_before_any_work(tmp_path, monkeypatch, argv, says):
    """--recipe and --phantom: a missing --name, an item that is not KEY=VALUE, a key the experiment owns or no
    lever may change, and a bad value are each one sentence before any data work."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=re.escape(says)):
        experiment.plan_experiment(experiment.build_parser().parse_args(["--preset", "cpu", *argv]))
    assert not Path("data").exists() and not Path("runs").exists()


def test_phantom_lever_changes_the_training_phantom_alone(tmp_path, monkeypatch):
    """--phantom KEY=VALUE changes the training phantom's options (under its own --name); the dev, final and
    shifted sets keep theirs."""
    monkeypatch.chdir(tmp_path)
    parse = experiment.build_parser().parse_args
    plan = experiment.plan_experiment(parse(["--preset", "cpu", "--name", "kernels", "--phantom",
                                             "psf_sigma=[0.25,1.0]", "--shifts", "smooth"]))
    assert plan.preset.phantom == dict(PRESETS["cpu"].phantom, psf_sigma=[0.25, 1.0])
    assert "psf_sigma" not in experiment._held_out_overrides(plan) and "psf_sigma" not in PRESETS["cpu"].phantom
    assert not Path("data").exists() and not Path("runs").exists()


def _files(folder):
    """{relative path: (sha256, mtime_ns)} of every file under a folder."""
    import hashlib
    return {p.relative_to(folder).as_posix(): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_end_to_end_tiny_interrupted_then_resumed_without_retraining(tmp_path, monkeypatch):
    """The demo's chain on a tiny phantom (data -> 2D -> transfer -> 3D -> report, what `run.sh demo` runs),
    stopped by Ctrl-C in the 3D run after the 2D run finished, then run again: the finished run is not retrained
    (no training step, its checkpoints untouched), the stopped one is trained, and the report is written; a
    third call retrains nothing at all."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CI", "true")
    tiny = Preset(cases=4, size=96, encoder="resnet18", patch_2d=[3, 64, 64], batch_2d=2, epochs_2d=1, steps_2d=2,
                  patch_3d=[16, 64, 64], batch_3d=1, epochs_3d=1, steps_3d=2, lr=1e-3,
                  variants=["ahnet-transfer"], window=[16, 96, 96])
    monkeypatch.setitem(PRESETS, "demo", tiny)
    real_train, steps = experiment.train, []

    def train(cfg, interrupt=None, validator_for=None):
        def on_step(step):
            steps.append((cfg.out, step))
            if interrupt and cfg.out.endswith(interrupt):
                raise KeyboardInterrupt
        return real_train(cfg, on_step=on_step, validator_for=validator_for)

    argv = ["--preset", "demo", "--bootstrap", "20", "--device", "cpu"]
    runs = Path("runs/phantom-demo")                          # relative: the experiment's own spelling
    monkeypatch.setattr(experiment, "train", lambda cfg, **kw: train(cfg, interrupt="ahnet-transfer", **kw))
    assert experiment.main(argv) == 130                       # Ctrl-C: one line "interrupted", exit 130
    assert [s for s in steps if s[0].endswith("mcgcn-2d")] == [(str(runs / "mcgcn-2d"), k) for k in (1, 2)]
    assert not (runs / "report/report.json").exists()
    done = _files(runs / "mcgcn-2d/checkpoints")
    assert {"best.pt", "last.pt"} <= set(done)

    steps.clear()
    monkeypatch.setattr(experiment, "train", train)
    assert experiment.main(argv) == 0
    assert steps == [(str(runs / "ahnet-transfer"), 1), (str(runs / "ahnet-transfer"), 2)]   # 2D run: no step
    assert _files(runs / "mcgcn-2d/checkpoints") == done
    report = json.loads((runs / "report/report.json").read_text(encoding="utf-8"))
    assert set(report["models"]) == {"mcgcn-2d", "ahnet-transfer"}
    assert (runs / "report/report.html").is_file()
    assert report["comparisons"]["claims"][0]["a"] == "ahnet-transfer"
    assert set(report["learning_curves"]) == {"mcgcn-2d", "ahnet-transfer"}
    assert report["learning_curves"]["ahnet-transfer"]["budget"]["cap"] == 2        # 1 epoch x 2 steps, stated
    assert "| ahnet-transfer | 2 | 2 |" in (runs / "report/report.md").read_text(encoding="utf-8")

    # a third call resumes both finished runs: nothing is retrained, the report is rebuilt
    steps.clear()
    both = {v: _files(runs / v / "checkpoints") for v in ("mcgcn-2d", "ahnet-transfer")}
    assert experiment.main(argv) == 0
    assert steps == [] and {v: _files(runs / v / "checkpoints") for v in both} == both


def test_demo_and_cpu_evaluate_on_their_held_out_test_phantoms_and_refuse_another(tmp_path):
    from ahnet.commands.phantoms import check_held_out
    from ahnet.data.phantom import TEST_PHANTOMS, held_out_seed
    assert PRESETS["demo"].test_phantom == "demo" and PRESETS["cpu"].test_phantom == "cpu"
    cpu, final = TEST_PHANTOMS["cpu"], TEST_PHANTOMS["cpu-final"]
    assert cpu["n_cases"] * cpu["nodules_per_case"] >= 240                  # >= 20 nodules of each of 12 types
    assert final["n_cases"] * final["nodules_per_case"] >= 480 and final["shape_pool"] == "final"
    assert held_out_seed(0, "cpu-final") not in (0, held_out_seed(0, "cpu"))
    o = TEST_PHANTOMS["demo"]

    def write(seed, per_case, n_cases=o["n_cases"], **extra):
        d = tmp_path / f"t{seed}-{per_case}-{n_cases}-{len(extra)}"
        d.mkdir(exist_ok=True)
        opts = {k: o[k] for k in ("size", "slices", "thickness", "spacing")}
        opts.update(nodules_per_case=[per_case, per_case], negatives=0.0, exact=True, balance=True,
                    shape_pool="split", **extra)
        (d / "dataset.json").write_text(json.dumps({"options": opts, "numTraining": n_cases, "seed": seed}))
        return d

    check_held_out(write(held_out_seed(0), o["nodules_per_case"]), "demo", 0)          # the right one
    check_held_out(tmp_path / "absent", "demo", 0)                                       # generated later
    for d, seed in [(write(held_out_seed(0), 3), 0), (write(held_out_seed(0), o["nodules_per_case"], 30), 0),
                    (write(held_out_seed(0), o["nodules_per_case"]), 1)]:
        with pytest.raises(ValueError, match="holds another phantom than the 'demo' test phantom"):
            check_held_out(d, "demo", seed)
    thick = write(held_out_seed(0), o["nodules_per_case"], thickness=5.0, slices=20)
    check_held_out(thick, "demo", 0, {"thickness": 5.0, "slices": 20})                  # the 5 mm rendering
    with pytest.raises(ValueError, match="thickness 5.0 instead of 2.5"):
        check_held_out(thick, "demo", 0)


class _FakeJob:
    """A training that ends after ``polls`` calls of done(); records what ran at once."""

    def __init__(self, name, log, running, polls=2, fail=False):
        self.name, self.log, self.running, self.polls, self.fail, self.stopped = name, log, running, polls, fail, False
        running.add(name)
        log.append(("start", name, frozenset(running)))

    def done(self):
        self.polls -= 1
        return self.polls <= 0

    def result(self):
        self.running.discard(self.name)
        self.log.append(("end", self.name, frozenset(self.running)))
        if self.fail:
            raise RuntimeError(f"{self.name} failed")

    def stop(self):
        self.stopped = True
        self.running.discard(self.name)


def test_side_by_side_trainings_wait_for_the_2d_stage_and_never_exceed_jobs(monkeypatch):
    from ahnet.commands.jobs import run_when_ready, training_plan
    monkeypatch.setattr(experiment.time, "sleep", lambda s: None)
    variants = ["mcgcn-2d", "ahnet-transfer", "ahnet-scratch", "unet3d-scratch", "ahnet-transfer-pfn0"]
    plan = training_plan({v: (v, 0) for v in variants})
    assert plan == {"mcgcn-2d": None, "ahnet-transfer": "mcgcn-2d", "ahnet-scratch": None,
                    "unet3d-scratch": None, "ahnet-transfer-pfn0": "mcgcn-2d"}
    seeds = training_plan({"mcgcn-2d": ("mcgcn-2d", 0), "ahnet-transfer": ("ahnet-transfer", 0),
                           "mcgcn-2d-seed1": ("mcgcn-2d", 1), "ahnet-transfer-seed1": ("ahnet-transfer", 1),
                           "unet3d-scratch-seed1": ("unet3d-scratch", 1)})
    assert seeds["ahnet-transfer-seed1"] == "mcgcn-2d-seed1" and seeds["unet3d-scratch-seed1"] is None
    log, running = [], set()
    run_when_ready(plan, lambda v: _FakeJob(v, log, running, polls=1 if v == "mcgcn-2d" else 3), jobs=2)
    starts = [e[1] for e in log if e[0] == "start"]
    assert sorted(starts) == sorted(variants) and max(len(e[2]) for e in log) == 2
    ended_before = {e[1]: {x[1] for x in log[:i] if x[0] == "end"} for i, e in enumerate(log) if e[0] == "start"}
    assert "mcgcn-2d" in ended_before["ahnet-transfer"] and "mcgcn-2d" in ended_before["ahnet-transfer-pfn0"]
    assert starts[:2] == ["mcgcn-2d", "ahnet-scratch"]          # the 2D stage's wait is filled by a scratch run

    jobs, log, running = {}, [], set()

    def start(v):
        jobs[v] = _FakeJob(v, log, running, polls=1 if v == "mcgcn-2d" else 5, fail=v == "mcgcn-2d")
        return jobs[v]
    with pytest.raises(RuntimeError, match="mcgcn-2d failed"):
        run_when_ready(plan, start, jobs=2)
    assert set(jobs) == {"mcgcn-2d", "ahnet-scratch"} and jobs["ahnet-scratch"].stopped   # nothing after it
    with pytest.raises(ValueError, match="ahnet-transfer wait for runs that are not planned"):
        run_when_ready({"ahnet-transfer": "mcgcn-2d"}, start, jobs=2)


def test_jobs_default_to_the_presets_on_a_cpu_and_refuse_cuda_and_torchrun():
    import torch
    from ahnet.commands.jobs import training_jobs
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert PRESETS["cpu"].jobs == 2 and training_jobs(None, PRESETS["cpu"], cpu, 1) == 2
    assert training_jobs(None, PRESETS["cpu"], cuda, 1) == 1 and training_jobs(None, PRESETS["cpu"], cpu, 2) == 1
    assert training_jobs(3, PRESETS["demo"], cpu, 1) == 3
    for device, world in [(cuda, 1), (cpu, 2)]:
        with pytest.raises(ValueError, match="--jobs 2 runs trainings side by side on a CPU"):
            training_jobs(2, PRESETS["cpu"], device, world)


@pytest.mark.slow
def test_two_trainings_side_by_side_in_their_own_processes(tmp_path, monkeypatch, capfd):
    """--jobs 2 on a tiny phantom: both scratch runs train in spawned processes (lines prefixed with their
    name), finish, then their second stages, and the report holds both, rescored; a second call retrains
    nothing (checkpoints and second stages untouched)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CI", "true")
    tiny = Preset(cases=4, size=96, encoder="resnet18", patch_2d=[3, 64, 64], batch_2d=2, epochs_2d=1, steps_2d=2,
                  patch_3d=[16, 64, 64], batch_3d=1, epochs_3d=1, steps_3d=2, lr=1e-3,
                  variants=["ahnet-scratch", "unet3d-scratch"], window=[16, 96, 96], jobs=2,
                  rescore={"epochs": 2, "max_cases": 2})
    monkeypatch.setitem(PRESETS, "demo", tiny)
    argv = ["--preset", "demo", "--bootstrap", "0", "--device", "cpu"]
    assert experiment.main(argv) == 0
    out = capfd.readouterr().out
    assert "[ahnet-scratch] [train]" in out and "[unet3d-scratch] [train]" in out
    assert "[unet3d-scratch] [rescore]" in out and "--rescore" in out
    runs = Path("runs/phantom-demo")
    report = json.loads((runs / "report/report.json").read_text(encoding="utf-8"))
    assert set(report["models"]) == {"ahnet-scratch", "unet3d-scratch"}
    assert "second stage" in (runs / "report/report.md").read_text(encoding="utf-8")
    with open(runs / "report/candidates/unet3d-scratch.csv", encoding="utf-8") as f:
        assert f.readline().strip().endswith("probability,probability_stage1")
    done = {v: (_files(runs / v / "checkpoints"), _files(runs / v)["rescorer.pt"])
            for v in ("ahnet-scratch", "unet3d-scratch")}
    assert experiment.main(argv) == 0
    assert {v: (_files(runs / v / "checkpoints"), _files(runs / v)["rescorer.pt"]) for v in done} == done

    # --evaluate-only: second stages this call would train again (other settings, as an earlier commit's) are
    # evaluated as they stand: nothing trains, the report is written again
    monkeypatch.setitem(PRESETS, "demo", dataclasses.replace(tiny, rescore={"epochs": 3, "max_cases": 2}))
    monkeypatch.setattr(experiment, "train_all", lambda *a, **k: pytest.fail("--evaluate-only trained"))
    (runs / "report/report.json").unlink()
    assert experiment.main(argv + ["--evaluate-only"]) == 0
    assert {v: (_files(runs / v / "checkpoints"), _files(runs / v)["rescorer.pt"]) for v in done} == done
    assert set(json.loads((runs / "report/report.json").read_text())["models"]) == {"ahnet-scratch", "unet3d-scratch"}
    (runs / "unet3d-scratch/rescorer.pt").unlink()
    with pytest.raises(ValueError, match=r"--evaluate-only: runs/phantom-demo/unet3d-scratch holds no second stage "
                                         r"\(rescorer.pt\)"):
        experiment.plan_experiment(experiment.build_parser().parse_args(argv + ["--evaluate-only"]))


def test_a_failed_side_by_side_training_passes_its_exit_code_through_without_a_traceback(monkeypatch, capsys):
    """The child printed its own error line: the experiment adds none and exits with the child's code; a child
    killed by a signal (nothing printed) gets one line naming the variant and the signal, exit 1."""
    from ahnet.commands.jobs import TrainingFailed, train_side_by_side
    monkeypatch.setattr(experiment.time, "sleep", lambda s: None)
    for code, want, line in [(2, 2, ""), (3, 3, ""), (-9, 1, "ahnet-scratch's training process was killed by "
                                                              "signal 9; run the experiment again to resume it")]:
        class Job:
            def __init__(self, v, cfg, threads):
                self.v = v

            def done(self):
                return True

            def result(self):
                raise TrainingFailed(self.v, code)
        monkeypatch.setattr(jobs, "_Job", Job)
        assert train_side_by_side({"ahnet-scratch": TrainConfig(out="x")}, {"ahnet-scratch": None}, 2) == want
        err = capsys.readouterr().err
        assert err == (f"ahnet.experiment: error: {line}\n" if line else "")


def test_each_second_stage_starts_once_its_own_training_ended_trainings_first(monkeypatch, capsys):
    """Side by side, a variant's second stage waits for its training only (not for every training), and a free
    place goes to a training before a second stage."""
    from ahnet.commands.jobs import train_side_by_side
    monkeypatch.setattr(experiment.time, "sleep", lambda s: None)
    started, ended = [], []

    class Job:
        def __init__(self, v, cfg, threads, target=None, what="trained"):
            self.name = f"{v} {what}"
            started.append(self.name)

        def done(self):
            return True

        def result(self):
            ended.append(self.name)
    monkeypatch.setattr(jobs, "_Job", Job)
    variants = ["mcgcn-2d", "ahnet-scratch", "ahnet-transfer", "ahnet-transfer-pfn0"]
    from ahnet.commands.jobs import SecondStageJob, training_plan
    from ahnet.commands.rescore import SecondStageConfig
    second = {v: SecondStageJob(Path(v), Path("d.json"), "cpu", SecondStageConfig()) for v in variants}
    order = training_plan({v: (v, 0) for v in variants})
    assert train_side_by_side({v: TrainConfig(out=v) for v in variants}, order, 2, second) == 0
    assert started == ["mcgcn-2d trained", "ahnet-scratch trained", "ahnet-transfer trained",
                       "ahnet-transfer-pfn0 trained"] + [f"{v} second stage trained" for v in variants]
    assert started == ended
    assert "ahnet-transfer, once trained: python -m ahnet.rescore --run ahnet-transfer" in capsys.readouterr().out


def test_second_stage_options_of_a_preset_are_checked_before_any_work():
    from ahnet.commands.presets import second_stage_config
    from ahnet.commands.rescore import SecondStageConfig
    assert SecondStageConfig.from_dict({"epochs": 30, "max_cases": 24}) == SecondStageConfig(max_cases=24)
    with pytest.raises(ValueError, match="option 'epoch' is not one of split, max_cases, jitter, crop"):
        SecondStageConfig.from_dict({"epoch": 30})
    with pytest.raises(ValueError, match="option 'run' is not one of"):
        SecondStageConfig.from_dict({"run": "x"})
    with pytest.raises(ValueError, match="epochs = 0 must be an integer in 1 .. 10000"):
        SecondStageConfig.from_dict({"epochs": 0})
    with pytest.raises(ValueError, match="second-stage overlap: .*1"):
        SecondStageConfig.from_dict({"overlap": 1})
    with pytest.raises(ValueError, match="crop 2 8 8: CandidateNet pools three times"):
        SecondStageConfig.from_dict({"crop": [2, 8, 8]})
    cfg = SecondStageConfig.from_dict({"max_cases": 24, "overlap": 0.25, "amp": "bf16"})
    assert cfg.command_line("r", "d.json", "cpu") == ("python -m ahnet.rescore --run r --data d.json --device cpu "
                                                      "--max-cases 24 --overlap 0.25 --amp bf16")
    for preset in PRESETS.values():
        if preset.rescore is not None:
            cfg = second_stage_config(preset, "bf16", 0, 2)
            assert cfg.seed == 2 and cfg.amp == cfg.fit_amp == "bf16"      # the k-th training's seed, its precision
    bad = Preset(**{**PRESETS["paper"].__dict__, "rescore": {"epoch": 5}})
    with pytest.raises(ValueError, match="the preset's second-stage option 'epoch'"):
        second_stage_config(bad, "off", 0, 0)
    from ahnet.commands.experiment import with_rescore
    own = Preset(**{**PRESETS["paper"].__dict__, "rescore": {"epochs": 5}})
    assert with_rescore(own, True).rescore == {"epochs": 5} and with_rescore(own, None) is own
    assert with_rescore(own, False).rescore is None and with_rescore(PRESETS["demo"], True).rescore == {}
    assert experiment.build_parser().parse_args(["--no-rescore"]).rescore is False


@pytest.mark.slow
def test_seeds_train_each_variant_n_times_and_the_report_compares_models_over_them(tmp_path, monkeypatch):
    """--seeds 2 on a tiny phantom: every variant's second training has its own folder and seed, and the report
    compares the two models over seeds and scans (each model's runs, mean and interval); --seeds 1 afterwards
    reuses the first trainings and compares runs as before."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CI", "true")
    tiny = Preset(cases=4, size=96, encoder="resnet18", patch_2d=[3, 64, 64], batch_2d=2, epochs_2d=1, steps_2d=2,
                  patch_3d=[16, 64, 64], batch_3d=1, epochs_3d=1, steps_3d=2, lr=1e-3,
                  variants=["ahnet-scratch", "unet3d-scratch"], window=[16, 96, 96])
    monkeypatch.setitem(PRESETS, "demo", tiny)
    assert experiment.main(["--preset", "demo", "--bootstrap", "20", "--device", "cpu", "--seeds", "2"]) == 0
    runs = Path("runs/phantom-demo")
    cfg = {r: json.loads((runs / r / "config.json").read_text())["config"]
           for r in ("ahnet-scratch", "ahnet-scratch-seed1", "unet3d-scratch-seed1")}
    assert (cfg["ahnet-scratch"]["seed"], cfg["ahnet-scratch-seed1"]["seed"]) == (0, 1)
    report = json.loads((runs / "report/report.json").read_text(encoding="utf-8"))
    assert set(report["models"]) == {"ahnet-scratch", "ahnet-scratch-seed1", "unet3d-scratch", "unet3d-scratch-seed1"}
    seeds = report["comparisons"]["seeds"]
    assert set(seeds) == {"ahnet-scratch", "unet3d-scratch"}
    assert set(seeds["ahnet-scratch"]["runs"]) == {"ahnet-scratch", "ahnet-scratch-seed1"}
    per_run = [report["models"][r]["cpm"] for r in ("ahnet-scratch", "ahnet-scratch-seed1")]
    if None not in per_run:
        assert seeds["ahnet-scratch"]["mean"] == pytest.approx(sum(per_run) / 2, abs=1e-9)
    assert "over seeds" in (runs / "report/report.md").read_text(encoding="utf-8")
    done = _files(runs / "ahnet-scratch" / "checkpoints")
    assert experiment.main(["--preset", "demo", "--bootstrap", "20", "--device", "cpu"]) == 0
    assert _files(runs / "ahnet-scratch" / "checkpoints") == done
    assert json.loads((runs / "report/report.json").read_text())["comparisons"]["seeds"] is None


def test_evaluate_only_refuses_a_run_that_has_not_finished_training(tmp_path):
    """A run still training has last.pt (and a best.pt) already: --evaluate-only must not evaluate it (on the final
    set it would spend a look on a half-trained model); finished by its step cap or by its patience, it may."""
    from ahnet.train.config import save_run_config
    run = tmp_path / "runs" / "ahnet-transfer-seed1"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.pt").write_bytes(b"a checkpoint")
    save_run_config(TrainConfig(out=str(run), epochs=6, steps_per_epoch=10, patience=3), run)

    def log(*vals):                                    # one validation score per epoch
        rows = [f"{e},{10 * e},0.5,{v}" for e, v in enumerate(vals, 1)]
        (run / "log.csv").write_text("epoch,step,loss,val_cpm\n" + "\n".join(rows) + "\n", encoding="utf-8")

    log(.3, .4)
    with pytest.raises(ValueError, match=r"--evaluate-only: .*ahnet-transfer-seed1 has not finished training \(20 of "
                                         r"60 steps, patience not spent\); let it finish first"):
        experiment.check_trained([run], second_stage=False)
    log(.3, .4, .5, .6, .7, .8)                        # the step cap
    experiment.check_trained([run], second_stage=False)
    log(.3, .6, .5, .4, .2)                            # three epochs without a better score: patience
    experiment.check_trained([run], second_stage=False)
    (run / "log.csv").unlink()                         # a run from elsewhere, no log: its checkpoint is taken
    experiment.check_trained([run], second_stage=False)
