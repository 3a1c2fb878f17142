"""The exact schedule of a dataset: which type, location class and LIDC source each nodule gets.

Types: shuffled permutations of the 12 codes, cycled over the dataset's nodules in case order, so every type
occurs total // 12 or total // 12 + 1 times (exactly equally often when 12 divides the total) and a case of
<= 12 nodules that starts a permutation holds distinct types. Locations: each type's nodules are spread over
the classes it can take (LOCATIONS_OF_TYPE) as evenly as its count allows, ties broken towards the class
with the fewest nodules overall, then shuffled among the type's nodules.

Sources (LIDC shapes): per (split, type), the eligible annotations (no larger than what fits every case)
grouped into lesions; lesions are taken in a shuffled order, one of a lesion's annotations at random, each
lesion once as drawn; when a type needs more nodules than it has lesions, the order is shuffled again and
each further use is a reuse (rotated or mirrored at random and rescaled by 0.9-1.1 within the type).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from ahnet.data.nodule_types import TYPE_CODES
from ahnet.data.phantom.constants import LOCATIONS, PROC_D

Source = Optional[Tuple[int, bool]]          # (LIDC annotation id, reuse) or None (procedural shape)


def balanced_types(rng, total: int) -> List[str]:
    """`total` type codes: shuffled permutations of the 12 codes, cycled."""
    seq = np.concatenate([rng.permutation(12) for _ in range(total // 12 + 1)])[:total]
    return [TYPE_CODES[int(v)] for v in seq]


# Location classes a type can take. A nodule of >= 15 mm (T04) touching no vessel, fissure, airway or wall
# does not fit the phantom's lungs at CPU size (0 of 8 test-split T04 shapes in 60 tries each, in 3 cases at
# 192 x 0.7 mm), so T04 is never scheduled as isolated.
LOCATIONS_OF_TYPE = {t: LOCATIONS if t != "T04" else LOCATIONS[1:] for t in TYPE_CODES}


def balanced_locations(rng, types: Sequence[str]) -> List[str]:
    """A location class per nodule: within each type as even as its count and LOCATIONS_OF_TYPE allow, then
    over all nodules (module docstring); deterministic in rng."""
    count = {t: 0 for t in TYPE_CODES}
    for t in types:
        count[t] += 1
    cell = {(t, l): 0 for t in TYPE_CODES for l in LOCATIONS}
    total = {l: 0 for l in LOCATIONS}
    tie = {l: int(v) for l, v in zip(LOCATIONS, rng.permutation(4))}
    for r in range(max(count.values(), default=0)):
        for j in rng.permutation(12):
            t = TYPE_CODES[int(j)]
            if r < count[t]:
                loc = min(LOCATIONS_OF_TYPE[t], key=lambda l: (cell[t, l], total[l], tie[l]))
                cell[t, loc] += 1
                total[loc] += 1
    per_type = {t: [l for l in LOCATIONS for _ in range(cell[t, l])] for t in TYPE_CODES}
    for t in TYPE_CODES:
        per_type[t] = [per_type[t][int(i)] for i in rng.permutation(len(per_type[t]))]
    return [per_type[t].pop() for t in types]


def shape_sources(rng, pool, types: Sequence[str], splits: Sequence[str], d_max: float) -> List[Source]:
    """A source per nodule (types[i] drawn for the case split splits[i]); None everywhere without a pool.

    Raises ValueError naming the type when a split has no LIDC annotation of a type that fits (d_max mm).
    """
    if pool is None:
        for t in sorted(set(types)):
            if PROC_D[t][0] > d_max:
                raise ValueError(f"type {t} needs {PROC_D[t][0]:.1f} mm but lungs of this size hold at most "
                                 f"{d_max:.1f} mm: use a larger size or spacing")
        return [None] * len(types)
    lesions_of: Dict[Tuple[str, str], list] = {}         # (split, type) -> lesions, each a list of ann ids
    queue: Dict[Tuple[str, str], list] = {}
    passes: Dict[Tuple[str, str], int] = {}
    out: List[Source] = []
    for key in zip(splits, types):
        if key not in lesions_of:
            ids = pool.eligible(key[0], key[1], d_max)
            if not ids:
                raise ValueError(f"no LIDC annotation of type {key[1]} in the {key[0]} split fits lungs of this "
                                 f"size (largest nodule {d_max:.1f} mm): use a larger size or spacing")
            groups: Dict[tuple, list] = {}
            for i in ids:
                groups.setdefault(pool.lesion_of(i), []).append(i)
            lesions_of[key], queue[key], passes[key] = [groups[g] for g in sorted(groups)], [], 0
        if not queue[key]:                           # a new pass over the lesions, in a new random order
            for j in rng.permutation(len(lesions_of[key])):
                anns = lesions_of[key][int(j)]
                queue[key].append((anns[int(rng.integers(len(anns)))], passes[key] > 0))
            passes[key] += 1
        out.append(queue[key].pop(0))
    return out


def distinct_lesions(pool, split: str, d_max: float) -> Dict[str, Tuple[int, int]]:
    """Per type: (eligible annotations, distinct lesions) of a split, for shapes no larger than d_max (mm)."""
    out = {}
    for t in TYPE_CODES:
        ids = pool.eligible(split, t, d_max)
        out[t] = (len(ids), len({pool.lesion_of(i) for i in ids}))
    return out
