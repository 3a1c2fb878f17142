"""Test-only phantoms that can tell models apart: many nodules per scan, every type equally often.

A held-out test phantom is all test split, has no nodule-free scans, uses the exact schedule (every type
equally often, per-type balanced location classes, each nodule exactly its scheduled type and location,
distinct LIDC lesions before any reuse) and is seeded apart from the training phantom. Two kinds:

- development sets ("cpu", "demo"): shapes from the LIDC scans kept for testing (scan id % 10 == 4, never
  drawn by a training or validation case); cases seeded [seed + HELD_OUT_SEED_OFFSET, i]. Every choice of the
  project (levers, candidate rule, second stage, step caps) is made on them.
- the sealed final test set ("cpu-final"): shapes from the sealed final pool only (reserved LIDC scans of
  patients with no other scan: no patient in common with training, validation or dev), a seed base of its own
  ([seed + FINAL_SEED_OFFSET, i]), twice the dev set's nodules; evaluated only by a preset's final models.

    from ahnet.data.phantom import TEST_PHANTOMS, generate_test_phantom
    generate_test_phantom("data/phantom-cpu-dev", "cpu", seed=0)        # 40 scans x 6 nodules = 20 per type
    generate_test_phantom("data/phantom-cpu-final", "cpu-final", seed=0)  # 80 scans x 6 nodules = 40 per type
    generate_test_phantom("data/phantom-demo-dev", "demo", seed=0)      # 8 scans x 6 nodules = 4 per type
"""
from __future__ import annotations

from pathlib import Path

from ahnet.data.phantom.dataset import generate_dataset

HELD_OUT_SEED_OFFSET = 1_000_003          # the development sets' (the experiment's test phantom until 2026-12)
FINAL_SEED_OFFSET = 7_000_001             # the sealed final test sets' own seed base
# what makes a phantom a held-out test phantom (not overridable)
HELD_OUT = dict(split=(0.0, 0.0, 1.0), negatives=0.0, balance=True, exact=True)
# the sizes the experiment calls: the CPU preset's scans (192 x 192 at 0.7 mm, 40 slices of 2.5 mm)
TEST_PHANTOMS = {
    "cpu": dict(n_cases=40, nodules_per_case=6, size=192, slices=40, thickness=2.5, spacing=0.7),
    "demo": dict(n_cases=8, nodules_per_case=6, size=192, slices=40, thickness=2.5, spacing=0.7),
    "cpu-final": dict(n_cases=80, nodules_per_case=6, size=192, slices=40, thickness=2.5, spacing=0.7,
                      shape_pool="final"),
}


def is_final(name: str) -> bool:
    """True for a sealed final test set's name (its shapes from the final pool, its own seed base)."""
    return TEST_PHANTOMS.get(name, {}).get("shape_pool") == "final"


def held_out_seed(seed: int, name: str = "cpu") -> int:
    """The seed the named test phantom's cases use for an experiment seed (apart from the training phantom's;
    the sealed final sets apart from the development sets too)."""
    return int(seed) + (FINAL_SEED_OFFSET if is_final(name) else HELD_OUT_SEED_OFFSET)


def test_phantom_options(name: str, **overrides) -> dict:
    """generate_dataset keywords (n_cases included) of the named test phantom; overrides: sizes, counts,
    noise, shapes... but not split, negatives, balance or exact (ValueError)."""
    if name not in TEST_PHANTOMS:
        raise ValueError(f"unknown test phantom {name!r}; choose from {', '.join(TEST_PHANTOMS)}")
    fixed = sorted(set(overrides) & (set(HELD_OUT) | {"shape_pool"}))
    if fixed:
        raise ValueError(f"a test phantom fixes {', '.join(fixed)}; use generate_dataset for other values")
    return {**TEST_PHANTOMS[name], **overrides, **HELD_OUT}


def generate_test_phantom(out_dir, name: str = "cpu", seed: int = 0, previews: int = 0, **overrides) -> Path:
    """Generate the named test-only phantom into out_dir; returns its dataset.json.

    seed: the experiment's seed (the training phantom's); the cases use held_out_seed(seed, name).
    """
    kw = test_phantom_options(name, **overrides)
    n_cases = kw.pop("n_cases")
    return generate_dataset(out_dir, n_cases, seed=held_out_seed(seed, name), previews=previews, **kw)


test_phantom_options.__test__ = False     # not a pytest test, whatever its name
