"""Cross-validation folds by case: cases sharing an LIDC scan never straddle a split."""
import pytest

from ahnet.data.folds import case_groups, groups_from_annotations, make_folds


def test_groups_from_annotations_and_components(tmp_path):
    p = tmp_path / "annotations.csv"
    p.write_text("seriesuid,coordX,coordY,coordZ,diameter_mm,lidc_scan_id\n"
                 "a,0,0,0,5,S1\nb,0,0,0,5,S2\nc,0,0,0,5,S1\nc,0,0,0,5,S3\nd,0,0,0,5,S3\ne,0,0,0,5,\n")
    shared = groups_from_annotations(p)
    assert shared == {"a": {"S1"}, "b": {"S2"}, "c": {"S1", "S3"}, "d": {"S3"}}
    assert case_groups(list("abcdef"), shared) == [["a", "c", "d"], ["b"], ["e"], ["f"]]
    assert groups_from_annotations(tmp_path / "missing.csv") == {}
    q = tmp_path / "no_col.csv"
    q.write_text("seriesuid,coordX\na,1\n")
    assert groups_from_annotations(q) == {}


@pytest.mark.parametrize("k", [2, 3, 5])
def test_folds_partition_cases_and_keep_groups_together(k):
    ids = [f"c{i:02d}" for i in range(17)]
    shared = {"c00": {"S"}, "c05": {"S"}, "c09": {"S", "T"}, "c16": {"T"}, "c03": {"U"}, "c04": {"U"}}
    folds = make_folds(ids, k, seed=1, shared=shared)
    assert len(folds) == k
    vals = [set(v) for _, v in folds]
    assert set().union(*vals) == set(ids) and sum(len(v) for v in vals) == len(ids)
    for train, val in folds:
        assert not set(train) & set(val) and set(train) | set(val) == set(ids)
        for grp in (["c00", "c05", "c09", "c16"], ["c03", "c04"]):
            assert len({c in val for c in grp}) == 1       # all in or all out
    sizes = sorted(len(v) for v in vals)
    assert sizes[-1] - sizes[0] <= 4                       # the 4-case group bounds the imbalance
    assert make_folds(ids, k, seed=1, shared=shared) == folds
    assert make_folds(ids, k, seed=2, shared=shared) != folds


def test_too_few_groups_is_an_error():
    with pytest.raises(ValueError, match="form 1 independent group"):
        make_folds(["a", "b"], 2, shared={"a": {"S"}, "b": {"S"}})
    with pytest.raises(ValueError, match="k >= 2"):
        make_folds(["a", "b"], 1)
