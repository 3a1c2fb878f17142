"""ahnet.paths: the layout every module asks about (run folders, folds, cache folder, annotations)."""
from pathlib import Path

import pytest

from ahnet import paths


def _run(folder: Path, *names: str) -> Path:
    (folder / "checkpoints").mkdir(parents=True)
    for n in names:
        (folder / "checkpoints" / n).write_bytes(b"")
    return folder


def test_run_folder_files(tmp_path):
    rp = paths.run_paths(tmp_path / "r")
    assert rp.best == tmp_path / "r" / "checkpoints" / "best.pt" and rp.last.name == "last.pt"
    assert (rp.config.name, rp.log.name, rp.progress.name, rp.report.name) == ("config.json", "log.csv",
                                                                             "progress.png", "report")


def test_trained_checkpoint_prefers_best_then_last(tmp_path):
    assert paths.trained_checkpoint(_run(tmp_path / "a", "last.pt", "best.pt")).name == "best.pt"
    assert paths.trained_checkpoint(_run(tmp_path / "b", "last.pt")).name == "last.pt"
    assert paths.trained_checkpoint(_run(tmp_path / "c")) is None


def test_folds_are_siblings_or_subfolders_sorted_by_number(tmp_path):
    for k in (10, 2, 0):
        _run(tmp_path / f"m-fold{k}", "best.pt")
        _run(tmp_path / "cv" / f"fold{k}", "last.pt")
    _run(tmp_path / "m-foldx", "best.pt")                        # not a fold number: ignored
    _run(tmp_path / "mm-fold1", "best.pt")                       # another run's fold: ignored
    assert [p.name for p in paths.fold_runs(tmp_path / "m")] == ["m-fold0", "m-fold2", "m-fold10"]
    assert paths.fold_run(tmp_path / "m", 3) == tmp_path / "m-fold3"
    got = paths.resolve_checkpoints(tmp_path / "cv")
    assert [p.parents[1].name for p in got] == ["fold0", "fold2", "fold10"] and got[0].name == "last.pt"


def test_resolve_checkpoints_errors_name_the_argument(tmp_path):
    f = tmp_path / "x.pt"
    f.write_bytes(b"")
    assert paths.resolve_checkpoints(f) == [f] and paths.resolve_checkpoint(f) == f
    _run(tmp_path / "empty")
    with pytest.raises(paths.LayoutError, match=r"run folder .*empty has neither checkpoints/best.pt"):
        paths.resolve_checkpoints(tmp_path / "empty")
    with pytest.raises(paths.LayoutError, match="nowhere not found"):
        paths.resolve_checkpoints(tmp_path / "nowhere")
    (tmp_path / "plain").mkdir()
    with pytest.raises(paths.LayoutError, match="neither a run folder"):
        paths.resolve_checkpoints(tmp_path / "plain")
    for k in (0, 1):
        _run(tmp_path / f"cv-fold{k}", "best.pt")
    with pytest.raises(paths.LayoutError, match="names 2 fold checkpoints"):
        paths.resolve_checkpoint(tmp_path / "cv")


def test_dataset_neighbours(tmp_path):
    js = tmp_path / "phantom" / "dataset.json"
    assert paths.cache_dir(js) == Path("data/cache/phantom")
    assert paths.cache_dir("dataset.json") == Path("data/cache/dataset")
    assert paths.annotations_csv(js) == tmp_path / "phantom" / "annotations.csv"
    assert paths.dataset_annotations(js) is None
    js.parent.mkdir()
    (js.parent / "annotations.csv").write_text("seriesuid\n")
    assert paths.dataset_annotations(js) == tmp_path / "phantom" / "annotations.csv"


def test_experiment_held_out_sets_and_their_reports_share_one_naming():
    """An experiment's dev and final data folders and their shifted renderings come from one rule, and each
    evaluation's report folder is named the same way beside the runs."""
    ep = paths.ExperimentPaths("phantom-cpu")
    d = paths.DATA_ROOT
    assert (ep.dev, ep.final) == (d / "phantom-cpu-dev", d / "phantom-cpu-final")
    assert ep.held_out() == ep.dev and ep.held_out(final=True) == ep.final
    assert ep.held_out(False, "smooth") == d / "phantom-cpu-dev-smooth"
    assert ep.held_out(True, "hu+30") == d / "phantom-cpu-final-hu+30"
    assert [ep.report(f, s).name for f, s in ((False, None), (True, None), (True, "smooth"))] == [
        "report", "report-final", "report-final-smooth"]


def test_a_run_name_gives_back_its_variant():
    ep = paths.ExperimentPaths("phantom-cpu")
    for v in ("mcgcn-2d", "ahnet-transfer", "ahnet-transfer-pfn0", "unet3d-scratch"):
        assert [paths.ExperimentPaths.run_seed(n) for n in ep.run_names(v, 4)] == [(v, k) for k in range(4)]
    for odd in ("a-seed0", "a-seedx", "-seed2", "seed3"):        # not a retraining's name: the name itself
        assert paths.ExperimentPaths.run_seed(odd) == (odd, 0)
