"""The slice-thickness study's numbers: the same final test set rendered at several slice spacings (the same scans,
nodules and schedule; thickness = spacing), each model trained and evaluated at every spacing: ahnet.evaluate.across
with the spacings as its sets, the thinnest the reference (each model's CPM overall and per composition group, the
paired differences between models at each spacing, and how a difference moves from the thinnest spacing, paired by
scan; one bootstrap of scans and seeds for everything).
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

from ahnet.evaluate.across import GROUP_KEY, OVERALL, TYPE_GROUPS, across_sets, composition, with_composition
from ahnet.evaluate.froc import FP_RATES, FROCInputError

__all__ = ["GROUP_KEY", "OVERALL", "TYPE_GROUPS", "composition", "with_composition", "thickness_summary"]


def thickness_summary(sets: Dict[float, tuple], models: Dict[str, List[str]], pairs: Sequence[Tuple[str, str]],
                      n_bootstrap: int = 1000, seed: int = 0, confidence: float = 0.95, fp_rates=FP_RATES,
                      chunk: int = 200) -> dict:
    """sets: {spacing mm: (annotations, {run name: candidate rows}, scan ids)}, the same scan ids at every spacing;
    models: {model: [its run names]} (the same names at every spacing); pairs: [(a, b)] the differences a - b.

    Returns across_sets' summary over the spacings in increasing order (set labels '2.5'), plus "spacings" (the
    floats): "cpm", "change" (from the thinnest spacing) and "pairs" ("by_set", "interaction").
    """
    spacings = sorted(float(s) for s in sets)
    if len(spacings) < 2:
        raise FROCInputError(f"the thickness study needs two or more slice spacings; got {spacings}")
    by_label = {f"{s:g}": sets[s] for s in spacings}
    summary = across_sets(by_label, models, pairs, n_bootstrap=n_bootstrap, seed=seed, confidence=confidence,
                          fp_rates=fp_rates, chunk=chunk, what="slice spacing")
    return dict(summary, spacings=spacings)
