"""Atomic save, weights_only load, refusal of files that are not checkpoints, RNG round trip."""
import os
import pickle
import random

import numpy as np
import pytest
import torch

from ahnet.checkpoint import (CheckpointError, capture_rng_state, load_checkpoint, restore_rng_state,
                              save_checkpoint)


def _ckpt():
    m = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(m.parameters(), lr=1e-3)
    m(torch.randn(4, 3)).sum().backward()
    opt.step()
    return {"model": m.state_dict(), "model_name": "tiny", "model_kwargs": {"a": 1, "t": [1, 2]},
            "optimizer": opt.state_dict(), "scaler": None, "scheduler": {"last_epoch": 3}, "epoch": 1,
            "step": 7, "rng": capture_rng_state(), "config": {"lr": 1e-3, "patch_size": [3, 32, 32]},
            "metrics": {"val_dice": 0.5, "best": None}}


def test_round_trip_weights_only(tmp_path):
    ck = _ckpt()
    p = save_checkpoint(ck, tmp_path / "sub" / "last.pt")
    assert p.is_file() and [f.name for f in p.parent.iterdir()] == ["last.pt"]   # no temp file left
    back = load_checkpoint(p)
    for k, v in ck["model"].items():
        assert torch.equal(back["model"][k], v)
    assert back["model_kwargs"] == {"a": 1, "t": [1, 2]}
    assert back["step"] == 7 and back["metrics"]["best"] is None
    # the same file also loads with plain torch.load(weights_only=True)
    torch.load(p, weights_only=True)


def test_atomic_replace_keeps_old_file_when_save_fails(tmp_path):
    p = save_checkpoint({"model": {}, "model_name": "a", "model_kwargs": {}}, tmp_path / "last.pt")
    before = p.read_bytes()

    class Unsaveable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        save_checkpoint({"model": Unsaveable()}, p)
    assert p.read_bytes() == before
    assert [f.name for f in tmp_path.iterdir()] == ["last.pt"]


class _Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_pickle_with_code_is_refused(tmp_path):
    p = tmp_path / "evil.pt"
    torch.save({"model": _Evil(), "model_name": "x", "model_kwargs": {}}, p)
    with pytest.raises(CheckpointError, match="not a safe checkpoint"):
        load_checkpoint(p)
    q = tmp_path / "evil.pkl"
    q.write_bytes(pickle.dumps(_Evil()))
    with pytest.raises(CheckpointError, match=str(q.name)):
        load_checkpoint(q)


def test_truncated_random_and_missing_files_are_refused(tmp_path):
    good = save_checkpoint(_ckpt(), tmp_path / "good.pt")
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="not a readable torch checkpoint"):
        load_checkpoint(trunc)
    rnd = tmp_path / "random.pt"
    rnd.write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(CheckpointError, match="random.pt"):
        load_checkpoint(rnd)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")
    assert issubclass(CheckpointError, ValueError)


def test_non_checkpoint_torch_files_are_refused(tmp_path):
    t = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), t)
    with pytest.raises(CheckpointError, match="holds a Tensor"):
        load_checkpoint(t)
    sd = tmp_path / "state_dict.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), sd)
    with pytest.raises(CheckpointError, match="lacks the keys"):
        load_checkpoint(sd)
    # a caller that only needs the weights may relax the keys
    assert "weight" in load_checkpoint(sd, required_keys=())


def test_rng_round_trip_through_a_file(tmp_path):
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0, 1)       # leaves a cached gauss_next in python's state
    state = capture_rng_state()
    p = save_checkpoint({"model": {}, "model_name": "x", "model_kwargs": {}, "rng": state}, tmp_path / "r.pt")
    want = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3))
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng_state(load_checkpoint(p)["rng"])
    got = (random.random(), random.gauss(0, 1), np.random.rand(3).tolist(), np.random.randn(), torch.rand(3))
    assert got[:4] == want[:4]
    assert torch.equal(got[4], want[4])


def test_bad_rng_entry_is_refused():
    with pytest.raises(CheckpointError, match="rng entry"):
        restore_rng_state({"torch": torch.get_rng_state()})
