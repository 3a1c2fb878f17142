"""K-fold cross-validation split by case, keeping cases that share an LIDC scan on one side.

Phantom cases borrow nodule shapes from LIDC scans; two cases whose nodules come from the same LIDC scan
(the ``lidc_scan_id`` column of annotations.csv) are one group and always land in the same fold, so a
nodule shape is never seen in training and validated on. Groups are shuffled with the seed and dealt to
the fold with the fewest cases so far (largest groups first), which balances fold sizes.
"""
from __future__ import annotations

import csv
import os
import random
from pathlib import Path
from typing import Iterable, Mapping, Sequence

__all__ = ["case_groups", "groups_from_annotations", "make_folds"]


def groups_from_annotations(annotations_csv: str | os.PathLike,
                            column: str = "lidc_scan_id") -> dict[str, set[str]]:
    """{case_id (seriesuid): set of values of ``column``} from annotations.csv; empty when the column is
    absent or the file does not exist. Empty cells are ignored."""
    p = Path(annotations_csv)
    if not p.is_file():
        return {}
    out: dict[str, set[str]] = {}
    with open(p, newline="", encoding="utf-8-sig") as f:     # a byte-order mark is not part of a column name
        reader = csv.DictReader(f)
        if reader.fieldnames is None or column not in reader.fieldnames or "seriesuid" not in reader.fieldnames:
            return {}
        for row in reader:
            v = (row.get(column) or "").strip()
            if v:
                out.setdefault(row["seriesuid"], set()).add(v)
    return out


def case_groups(case_ids: Sequence[str], shared: Mapping[str, Iterable[str]] | None = None) -> list[list[str]]:
    """Connected components of cases linked by a shared key (e.g. an LIDC scan id); sorted, deterministic."""
    parent = {c: c for c in case_ids}

    def find(c: str) -> str:
        while parent[c] != c:
            parent[c] = parent[parent[c]]
            c = parent[c]
        return c

    owner: dict[str, str] = {}
    for c in case_ids:
        for key in sorted((shared or {}).get(c, ())):
            if key in owner:
                ra, rb = find(owner[key]), find(c)
                if ra != rb:
                    parent[max(ra, rb)] = min(ra, rb)
            else:
                owner[key] = c
    comps: dict[str, list[str]] = {}
    for c in case_ids:
        comps.setdefault(find(c), []).append(c)
    return sorted((sorted(v) for v in comps.values()), key=lambda g: g[0])


def make_folds(case_ids: Sequence[str], k: int, seed: int = 0,
               shared: Mapping[str, Iterable[str]] | None = None) -> list[tuple[list[str], list[str]]]:
    """K (train_ids, val_ids) pairs; each case is validated exactly once; groups never straddle a split.

    ValueError when there are fewer groups than folds.
    """
    ids = list(dict.fromkeys(case_ids))
    if k < 2:
        raise ValueError(f"cross-validation needs k >= 2 folds, got {k}.")
    groups = case_groups(ids, shared)
    if len(groups) < k:
        raise ValueError(f"{len(ids)} cases form {len(groups)} independent group(s) (cases sharing an LIDC "
                         f"scan are one group); {k} folds need at least {k}.")
    rng = random.Random(seed)
    rng.shuffle(groups)
    groups.sort(key=len, reverse=True)          # stable: equal sizes keep the shuffled order
    folds: list[list[str]] = [[] for _ in range(k)]
    for g in groups:
        i = min(range(k), key=lambda j: (len(folds[j]), j))
        folds[i].extend(g)
    out = []
    for i in range(k):
        val = sorted(folds[i])
        train = sorted(c for j in range(k) if j != i for c in folds[j])
        out.append((train, val))
    return out
