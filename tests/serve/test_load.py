"""The server under load, short: the code of ``python -m ahnet.bench --serving --load`` (ahnet.bench.load) for a
few seconds against the tests' 5-fold ensemble, bad requests mixed in. What it asserts is behaviour, not speed:
no good request fails, every bad one is answered with its sentence, and the server's memory does not grow beyond
a bound. The measured run, with its numbers, is in paper_notes/serving.md."""
import numpy as np
import pytest

from ahnet.bench import load
from ahnet.commands import bench
from ahnet.serve import store
from ahnet.serve.process import tree_rss_mb

from .conftest import needs_serving

needs_serving()
pytestmark = pytest.mark.serve

# Allowed growth of the server's memory (RSS of its process tree) over the run, after a warm-up at the largest
# execution the dynamic batcher can form: what stays is Triton's and the stubs' request buffers for more clients at
# once (measured: tens of MB going from 1 to 4 clients, nothing after), not a per-request cost
GROWTH_MB = 100


def test_bad_requests_are_spread_evenly():
    assert [i for i in range(30) if load.is_bad(i, 0, 0.1)] == [4, 14, 24]
    assert sum(load.is_bad(i, k, 0.1) for k in range(16) for i in range(100)) == 160
    assert not any(load.is_bad(i, 3, 0.0) for i in range(50))


def test_every_bad_kind_is_built_for_any_multiple():
    good = np.zeros((2, 1, 2, 32, 32), np.float32)
    for kind in load.BAD_KINDS:
        model, arr, dtype, words = load.bad_request(kind, good, "m", (1, 32, 32), 8, 2 * 32 * 32 * 4)
        assert words and (model == "m" or kind == "model"), kind
    assert load.bad_request("multiple", good, "m", (1, 32, 32), 8, 1)[3] == \
        "window size (4, 30, 32) is not a multiple of the model's input multiple (1, 32, 32)"     # the issue's
    _, arr, _, words = load.bad_request("voxels", good, "m", (1, 32, 32), 8, 8192)
    assert arr.shape == (1, 1, 1, 96, 96) and words.startswith("window size (1, 96, 96) has 9216 voxels")


def test_concurrent_clients_with_bad_requests_mixed_in(server, exported):
    meta = dict(store.read_model_json(exported), name="cv")
    load.warm_up(server.url, meta, 1, 8)
    before = tree_rss_mb(server.proc.pid)
    tally, wall = load.run_clients(server.url, meta, clients=4, duration_s=10, bad_fraction=0.5, batch=1,
                                   max_batch=8, max_voxels=8 * int(np.prod(meta["window"])), seed=3)
    after = tree_rss_mb(server.proc.pid)
    assert not tally.good_failed, tally.good_failed
    assert not tally.bad_wrong, tally.bad_wrong
    assert len(tally.good_latency_s) >= 4 and sum(tally.bad_answered.values()) >= 4, (tally, wall)
    assert len(tally.bad_answered) >= 4, tally.bad_answered        # several kinds, each answered with its words
    assert after - before <= GROWTH_MB, (before, after)


@pytest.mark.parametrize("args, words", [
    (["--concurrency", "0"], "--concurrency [0] must list client counts >= 1"),
    (["--duration", "0"], "--duration 0.0 must lie in (0, 3600] seconds"),
    (["--bad-fraction", "1.5"], "--bad-fraction 1.5 must lie in [0, 1]"),
    (["--batch", "9"], "--batch 9 must lie in 1 .. --max-batch 8"),
    (["--backend", "onnx"], "has no onnx file"),
])
def test_load_options_are_checked_before_a_server_starts(exported, args, words, capsys, monkeypatch, tmp_path):
    def refuse(*a, **k):
        raise AssertionError("a server started although the options were bad")
    monkeypatch.setattr("ahnet.serve.process.ServerProcess", refuse)
    assert bench.main(["--serving", "--load", "--models", str(exported), "--out", str(tmp_path / "o"), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ahnet.bench: error: ") and words in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()
