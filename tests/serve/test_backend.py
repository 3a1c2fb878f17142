"""The served models' code (ahnet.serve.backend) and the model repository the server writes, without a server: each
request of a batch answered on its own, replies without paths, and no reference kept to a rejected request."""
import gc
import json
import weakref

import numpy as np
import pytest

from ahnet.serve import backend, server, store

pytestmark = pytest.mark.serve

MULTIPLE = (1, 32, 32)


def _check(a):
    backend.check_windows(a, MULTIPLE, 10 ** 6)


def test_each_request_of_a_batch_is_answered_on_its_own():
    good = [np.full((n, 1, 2, 32, 32), 0.25, np.float32) for n in (1, 2)]
    nan = good[0].copy()
    nan[0, 0, 0, 0, 0] = np.nan
    other = np.zeros((1, 1, 3, 32, 64), np.float32)
    calls = []

    def compute(x):                                     # one call per shape, the valid requests concatenated
        calls.append(x.shape)
        return x + 1
    out = backend.answer_windows([good[0], nan, good[1], np.zeros((1, 1, 4, 30, 32), np.float32), other],
                                 compute, _check)
    assert sorted(calls) == [(1, 1, 3, 32, 64), (3, 1, 2, 32, 32)]
    assert np.array_equal(out[0], good[0] + 1) and np.array_equal(out[2], good[1] + 1)
    assert np.array_equal(out[4], other + 1)
    assert out[1] == backend.Failure("input image holds 1 NaN or infinite value(s); expected a [0, 1]-scaled CT "
                                     "window", True, out[1].trace)
    assert out[3].message == "window size (4, 30, 32) is not a multiple of the model's input multiple (1, 32, 32); " \
                             "pad windows to multiples (ahnet.serve.client does)" and out[3].bad_request
    assert "in check_windows" in out[3].trace and out[3].trace.startswith("Traceback (most recent call last)")


def test_a_failure_that_is_not_the_requests_fault_names_no_path():
    def broken(x):
        raise RuntimeError("/opt/env/lib/python3.11/site-packages/torch/jit: kernel failed")
    out = backend.answer_windows([np.zeros((1, 1, 2, 32, 32), np.float32)] * 2, broken, _check)
    assert out[0] is out[1] and not out[0].bad_request and "/opt/env" in out[0].trace      # the log has it all
    assert backend.error_sentence(out[0], "cv") == "model cv failed on this request (RuntimeError); the server's " \
                                                   "log has the details"


def test_a_rejected_request_keeps_no_reference_to_its_array():
    """An exception kept past its handler holds the request arrays (views of Triton's shared memory) through its
    traceback in a reference cycle: the shared memory grew by every rejected request until a garbage collection."""
    gc.disable()
    try:
        bad = np.zeros((1, 1, 4, 30, 32), np.float32)
        ref = weakref.ref(bad)
        out = backend.answer_windows([bad], lambda x: x, _check)
        del bad
        assert ref() is None and isinstance(out[0], backend.Failure)
    finally:
        gc.enable()


def test_the_repository_holds_every_model_and_its_spec(exported, tmp_path):
    meta = store.read_model_json(exported)
    how = {"backend": "pytorch", "threads": 1, "max_batch": 8, "queue_delay_us": 2000, "max_voxels": 524288}
    names = server.write_repository(tmp_path, meta, exported, how)
    assert names == ["cv"] + [f"cv-fold{k}" for k in range(5)] + [store.INFO_MODEL]
    for n in names:
        assert (tmp_path / n / "1" / "model.py").read_text() == server.MODEL_PY
        assert f'name: "{n}"' in (tmp_path / n / "config.pbtxt").read_text()
    spec = json.loads((tmp_path / "cv" / "1" / backend.SPEC).read_text())
    assert spec == {"kind": "windows", "models": str(exported.resolve()), "backend": "pytorch", "threads": 1,
                    "max_voxels": 524288, "folds": [f"fold{k}" for k in range(5)], "lazy": False}
    assert json.loads((tmp_path / "cv-fold2" / "1" / backend.SPEC).read_text())["folds"] == ["fold2"]
    assert "max_batch_size: 8" in (tmp_path / "cv" / "config.pbtxt").read_text()
    info = json.loads((tmp_path / store.INFO_MODEL / "1" / backend.SPEC).read_text())
    assert json.loads((tmp_path / store.INFO_MODEL / "1" / store.MODEL_JSON).read_text()) == meta
    assert info == {"kind": "info", "model_json": str(tmp_path / store.INFO_MODEL / "1" / store.MODEL_JSON)}


def test_the_package_goes_first_on_pythonpath(monkeypatch):
    monkeypatch.setenv("PYTHONPATH", "/opt/x")
    root = str(server.Path(backend.__file__).resolve().parents[2])
    assert server.package_first() == f"{root}:/opt/x"
