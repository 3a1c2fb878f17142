"""bash run.sh gpu-check: the whole check at toy sizes on a CPU (--tiny: every part, the CUDA tests rehearsed), its
option errors, the synthetic cases in the cache format, and optional modules installed from carried wheels."""
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from ahnet.data.sampling import PatchDataset
from ahnet.gpucheck import env, report
from ahnet.gpucheck.report import OUTPUTS
from ahnet.gpucheck.synth import synthetic_case, write_cases

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_check_runs_every_part_on_a_cpu(tmp_path):
    out = tmp_path / "gc"
    p = subprocess.run([sys.executable, "-m", "ahnet.gpucheck", "--tiny", "--out", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]       # with or without MONAI
    assert sorted(f.name for f in out.iterdir()) == sorted(OUTPUTS)
    doc = json.loads((out / "gpu_check.json").read_text())
    tests, bench, train = (doc["parts"][k] for k in ("tests", "bench", "train"))
    assert tests["ok"] and tests["rehearsal_on_cpu"] and tests["passed"] >= 6 and tests["failed"] == 0
    names = {c["name"] for c in tests["cases"]}
    assert {"test_fp16_steps_skip_a_nan_loss_in_the_loop_and_an_inf_gradient_in_the_scaler",
            "test_resume_is_bitwise_exact_where_every_kernel_is_deterministic"} <= names
    assert bench["ok"]
    if doc["modules"]["monai"]["version"] is not None:
        assert [g["goal"] for g in bench["goals"]] == ["train_time_ratio", "train_memory_ratio", "infer_seconds"]
        time, _, infer = bench["goals"]           # (the memory row means nothing in one process: not checked)
        assert time["value"] > 0 and time["met"] == (time["value"] <= 0.8) and infer["value"] > 0
        assert bench["peer_skipped"] is None
    else:
        assert "MONAI's rows skipped" in bench["peer_skipped"]
    assert train["ok"] and train["epochs"] >= 1 and train["curve"][0]["loss"] > 0
    md = (out / "gpu_check.md").read_text()
    for section in ("## Machine", "## (a) CUDA tests", "## (b) Against MONAI's AHNet", "## (c) Training",
                    "every part passed."):
        assert section in md
    assert "[gpu-check] every part passed; " in p.stdout
    assert (out / "learning_curve.png").stat().st_size > 1000


def test_tiny_check_without_monai_passes_with_our_bench_rows_alone(tmp_path):
    """A default setup (bash run.sh setup: no MONAI, no .whl/): the bench part runs ours and says MONAI's rows
    were skipped; MONAI is hidden here by a package of that name that fails to import."""
    if list((ROOT / env.WHEEL_DIR).glob("monai-*.whl")):
        pytest.skip(f"{env.WHEEL_DIR}/ carries a MONAI wheel, which the check installs")
    fake = tmp_path / "hide" / "monai"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('hidden by the test')\n")
    out = tmp_path / "gc"
    run_env = dict(os.environ, PYTHONPATH=str(tmp_path / "hide"), TMPDIR=str(tmp_path))    # TMPDIR: a fresh site
    p = subprocess.run(["bash", "run.sh", "gpu-check", "--tiny", "--skip", "tests", "train", "--out", str(out)],
                       cwd=ROOT, env=run_env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    doc = json.loads((out / "gpu_check.json").read_text())
    bench = doc["parts"]["bench"]
    assert doc["modules"]["monai"]["version"] is None and bench["ok"] and list(doc["parts"]) == ["bench"]
    assert {r["spec"]["impl"] for r in bench["results"]} == {"ours"}
    assert [g["goal"] for g in bench["goals"]] == ["infer_seconds"]
    md = (out / "gpu_check.md").read_text()
    assert "**MONAI's rows skipped: MONAI is missing (no .whl/monai-*.whl" in md and "every part passed." in md
    assert "[gpu-check] every part passed; " in p.stdout


def test_the_summary_names_the_parts_that_did_not_pass():
    ok, bad = {"ok": True}, {"ok": False}
    assert report.summary({"parts": {"tests": ok, "bench": bad, "train": ok}}) == \
        "bench did NOT pass (tests and train passed)"
    assert report.summary({"parts": {"tests": bad, "bench": ok, "train": bad}}) == \
        "tests and train did NOT pass (bench passed)"
    assert report.summary({"parts": {"bench": bad}}) == "bench did NOT pass"
    assert report.summary({"parts": {"tests": ok, "train": ok}}) == "every part passed"
    doc = {"created": "now", "tiny": True, "command": "c", "wall_seconds": 1.0, "ok": False,
           "machine": {}, "modules": {}, "parts": {"bench": dict(bad, error="ValueError: x")}}
    assert "`c`: 1.0 s in all; bench did NOT pass." in report.markdown(doc)


@pytest.mark.parametrize("argv, says", [
    (["--tiny", "--train-minutes", "0"], "--train-minutes must be positive"),
    (["--tiny", "--skip", "tests", "bench", "train"], "--skip leaves no part to run"),
    ([], "no CUDA GPU"),
])
def test_bad_options_end_with_one_line_before_any_work(tmp_path, argv, says):
    if not argv and __import__("torch").cuda.is_available():
        pytest.skip("this machine has a GPU")
    p = subprocess.run(["bash", "run.sh", "gpu-check", "--out", str(tmp_path / "gc"), *argv], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("ahnet.gpucheck: error: ")
    assert says in lines[0]
    assert not (tmp_path / "gc").exists()


def test_synthetic_cases_are_cache_files_with_nodules_in_the_lungs(tmp_path):
    img, lab = synthetic_case((16, 96, 96), (2.5, 0.7, 0.7), seed=3, n_nodules=3)
    again, lab2 = synthetic_case((16, 96, 96), (2.5, 0.7, 0.7), seed=3, n_nodules=3)
    assert np.array_equal(img, again) and np.array_equal(lab, lab2)
    assert img.dtype == np.float32 and 0 <= img.min() and img.max() <= 1 and lab.dtype == np.int16
    assert set(np.unique(lab)) == {0, 1, 2, 3}
    assert img[lab > 0].mean() > 0.3 > img[(lab == 0) & (img < 0.2)].mean()   # nodules brighter than the lung
    paths = write_cases(tmp_path, 2, (16, 96, 96), (2.5, 0.7, 0.7), seed=0, split="train")
    assert not list(tmp_path.glob(".*"))                                     # atomic: no temporary file left
    ds = PatchDataset(paths, (4, 32, 32), samples_per_epoch=4, pos_fraction=1.0, seed=0)
    assert len(ds.nodules[0]) == 2 and ds.spacings[0] == (2.5, 0.7, 0.7)
    assert all(float(ds[i]["label"].sum()) > 0 for i in range(4))           # positive patches hold a nodule


def _fake_wheel(folder: Path, name: str) -> Path:
    """A pure-Python wheel of a module that exists nowhere else."""
    folder.mkdir(parents=True, exist_ok=True)
    whl = folder / f"{name}-1.0-py3-none-any.whl"
    dist = f"{name}-1.0.dist-info"
    with zipfile.ZipFile(whl, "w") as z:
        z.writestr(f"{name}/__init__.py", "__version__ = '1.0'\n")
        z.writestr(f"{dist}/METADATA", f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n")
        z.writestr(f"{dist}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{dist}/RECORD", "")
    return whl


def test_a_missing_optional_module_comes_from_the_carried_wheels(tmp_path, monkeypatch):
    name = "ahnet_fake_peer_module"
    _fake_wheel(tmp_path / "root" / env.WHEEL_DIR, name)
    monkeypatch.setattr(env, "OPTIONAL", {name: "a test"})
    monkeypatch.setattr(env, "WHEEL_NAMES", {name: f"{name}-"})
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.setenv("PYTHONPATH", "")
    mods = env.prepare_modules(tmp_path / "root", tmp_path / "site")
    assert mods[name]["version"] == "1.0" and mods[name]["source"].startswith(f"installed from {env.WHEEL_DIR}/")
    assert str(tmp_path / "site") in __import__("os").environ["PYTHONPATH"]     # the bench's processes see it too
    monkeypatch.setattr(env, "OPTIONAL", {"ahnet_no_such_module": "a test"})
    monkeypatch.setattr(env, "WHEEL_NAMES", {"ahnet_no_such_module": "ahnet_no_such_module-"})
    mods = env.prepare_modules(tmp_path / "root", tmp_path / "site")
    assert mods["ahnet_no_such_module"]["version"] is None and "gpu-wheels" in mods["ahnet_no_such_module"]["source"]
