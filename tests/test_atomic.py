import pytest

from ahnet.atomic import atomic_path, write_text_atomic


def test_success_replaces_and_keeps_the_suffix(tmp_path):
    target = tmp_path / "sub" / "image.nii.gz"
    with atomic_path(target) as tmp:
        assert tmp.parent == target.parent and tmp.name.endswith(".nii.gz") and tmp != target
        tmp.write_bytes(b"new")
    assert target.read_bytes() == b"new"
    assert [p.name for p in target.parent.iterdir()] == ["image.nii.gz"]


@pytest.mark.parametrize("durable", [False, True])
def test_failure_keeps_the_old_file_and_leaves_no_temporary(tmp_path, durable):
    target = tmp_path / "log.csv"
    write_text_atomic(target, "old\n")
    with pytest.raises(RuntimeError):
        with atomic_path(target, durable=durable) as tmp:
            tmp.write_text("half a fi", encoding="utf-8")
            raise RuntimeError("killed")
    assert target.read_text(encoding="utf-8") == "old\n"
    assert [p.name for p in tmp_path.iterdir()] == ["log.csv"]
