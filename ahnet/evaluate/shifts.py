"""The final models on shifted renderings of the final test set (noise, reconstruction kernel, in-plane spacing,
vessels, HU offset; the same cases, schedule and shapes): each model's CPM on every shifted set beside the
unshifted one, and the paired difference (shifted - unshifted; scans and a model's runs drawn once for both,
ahnet.evaluate.froc.paired_across_sets). A shift whose point estimate costs more than COSTLY CPM is flagged: a
training lever chosen on dev should recover it.
"""
from __future__ import annotations

from pathlib import Path

from ahnet import paths
from ahnet.data.io import load_dataset_json, read_annotations_csv, read_candidates_csv
from ahnet.evaluate.froc import paired_across_sets

COSTLY = 0.05          # CPM a shift may cost before a lever is owed


def read_evaluated_set(dataset_json, report_dir, run_names) -> tuple:
    """(annotations, {run: candidate rows}, scan ids) of one evaluated set: its test cases, its annotations and
    the candidates the evaluation wrote into ``report_dir`` for each run."""
    dataset_json = Path(dataset_json)
    cases = [e["case_id"] for e in load_dataset_json(dataset_json) if e.get("split") == "test"]
    ann = read_annotations_csv(paths.annotations_csv(dataset_json), [e["case_id"] for e in
                                                                      load_dataset_json(dataset_json)], dataset_json)
    cands = {r: read_candidates_csv(paths.report_candidates(report_dir, r)) for r in run_names}
    return ann, cands, cases


def shift_summary(base: tuple, shifted: dict, groups: dict, n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """``base`` and each ``shifted[name]``: read_evaluated_set's (annotations, {run: rows}, scan ids) on the same
    scan ids; ``groups`` {model: [run names]}. Returns {"models", "n_bootstrap", "costly", "shifts": {shift:
    {model: {"cpm_a" (unshifted), "cpm_b" (shifted), "diff", "ci", "costly"}}}}."""
    ann0, cands0, scans = base
    out = {}
    for name, (ann, cands, scans_b) in shifted.items():
        if list(scans_b) != list(scans):
            raise ValueError(f"the {name} set holds other scans than the unshifted final set")
        out[name] = {}
        for model, runs in groups.items():
            d = paired_across_sets(ann0, {r: cands0[r] for r in runs}, ann, {r: cands[r] for r in runs}, scans,
                                   n_bootstrap=n_bootstrap, seed=seed)
            out[name][model] = dict(d, costly=d["diff"] < -COSTLY)
    return {"models": list(groups), "n_bootstrap": int(n_bootstrap), "costly": COSTLY, "shifts": out}
