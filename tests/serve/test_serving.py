"""A real Triton server (python -m ahnet.serve) and a real client (python -m ahnet.client), end to end.

The client's files equal ahnet.commands.predict's for the same 5-fold ensemble; bad requests get clear error replies and
the server keeps serving; a client killed mid-request leaves it serving; SIGTERM stops it with nothing left.
"""
import csv
import os
import signal
import subprocess
import sys
import time
import urllib.request

import nibabel as nib
import numpy as np
import pytest
from ahnet.commands import predict
from ahnet.serve.client import ClientError, Connection, server_message
from ahnet.serve import backend
from ahnet.serve import server as srv
from ahnet.commands import serve as serve_cmd
from ahnet.serve import store

from ahnet.serve.process import free_ports, process_tree

from .conftest import ROOT, alive, needs_serving, start_server

needs_serving()
pytestmark = pytest.mark.serve

CLIENT_ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def _client(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "ahnet.client", *args], capture_output=True, text=True, cwd=ROOT,
                          env=CLIENT_ENV, timeout=timeout)


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _same_outputs(a, b, cases, mm=1e-3):
    """Same maps (<= 1e-4), masks and candidates; candidate centres within ``mm`` (sub-voxel centres are
    probability-weighted over a support region cut at half the peak, so a map 1e-5 off, as ONNX Runtime's
    float32 arithmetic is, may move a centre: by up to 1.4 mm on a barely trained model's nearly flat map)."""
    for c in cases:
        pa, pb = nib.load(a / f"{c}_prob.nii.gz"), nib.load(b / f"{c}_prob.nii.gz")
        assert np.allclose(pa.affine, pb.affine, atol=1e-6)
        assert np.abs(pa.get_fdata() - pb.get_fdata()).max() <= 1e-4, c
        ma, mb = nib.load(a / f"{c}_mask.nii.gz"), nib.load(b / f"{c}_mask.nii.gz")
        assert ma.get_data_dtype() == mb.get_data_dtype() == np.uint8
        assert np.array_equal(np.asarray(ma.dataobj), np.asarray(mb.dataobj)), c
    ra, rb = _rows(a / "candidates.csv"), _rows(b / "candidates.csv")
    assert len(ra) == len(rb) >= len(cases)          # a comparison that has candidates to compare
    for x, y in zip(ra, rb):
        assert x["seriesuid"] == y["seriesuid"]
        assert abs(float(x["probability"]) - float(y["probability"])) <= 1e-4
        for k in ("coordX", "coordY", "coordZ"):
            assert abs(float(x[k]) - float(y[k])) <= mm, (x, y)


def test_client_writes_what_predict_writes(server, cv, scans, tmp_path):
    ref = tmp_path / "predict"
    assert predict.main(["--runs", str(cv), "--input", str(scans), "--out", str(ref), "--amp", "off"]) == 0
    out = tmp_path / "client"
    p = _client("--url", server.url, "--input", str(scans), "--out", str(out), "--batch", "3")
    assert p.returncode == 0, p.stderr
    assert sorted(f.name for f in out.iterdir()) == sorted(f.name for f in ref.iterdir())
    _same_outputs(ref, out, ["scan0", "scan1"])


def test_client_writes_the_dicom_seg_and_sr_of_a_dicom_series_as_predict_does(server, cv, scans, tmp_path):
    hd = pytest.importorskip("highdicom", reason="the dicom extra (highdicom) is not installed")
    from ahnet import paths
    from ahnet.data.io import read_image
    from ahnet.data.dicom_source import write_ct_series
    from .conftest import SPACING
    uids = write_ct_series(tmp_path / "series7", read_image(scans / "scan1.nii.gz").array, SPACING,
                           (-100.0, 20.0, 300.0), np.eye(3), tag=7)
    ref, out = tmp_path / "predict", tmp_path / "client"
    assert predict.main(["--runs", str(cv), "--input", str(tmp_path / "series7"), "--out", str(ref), "--amp", "off",
                         "--sr-threshold", "0"]) == 0
    p = _client("--url", server.url, "--input", str(tmp_path / "series7"), "--out", str(out), "--sr-threshold", "0")
    assert p.returncode == 0, p.stderr
    assert "DICOM SEG and SR for 1 case(s)" in p.stdout
    assert sorted(f.name for f in out.iterdir()) == sorted(f.name for f in ref.iterdir())
    _same_outputs(ref, out, ["series7"])
    frames = {}
    for name, folder in (("predict", ref), ("client", out)):
        files = paths.case_paths(folder, "series7")
        seg = hd.seg.segread(files.seg)
        assert seg.SegmentSequence[0].SegmentAlgorithmName == "ahnet cv"         # the runs' name, the served name
        frames[name] = seg.get_pixels_by_source_instance(source_sop_instance_uids=uids["sop"],
                                                         segment_numbers=[1])[..., 0]
        np.testing.assert_array_equal(frames[name], np.asarray(nib.load(files.mask).dataobj).transpose(2, 1, 0))
        groups = hd.sr.srread(files.sr).content.get_planar_roi_measurement_groups()
        assert len(groups) == len([r for r in _rows(folder / "candidates.csv")]) >= 1   # threshold 0: every one


def test_one_fold_over_grpc_equals_that_fold(server, cv, scans, tmp_path):
    ref = tmp_path / "predict"
    assert predict.main(["--runs", str(cv.parent / "cv-fold2"), "--input", str(scans / "scan1.nii.gz"),
                         "--out", str(ref)]) == 0
    out = tmp_path / "client"
    p = _client("--url", f"127.0.0.1:{server.grpc}", "--protocol", "grpc", "--model", "cv-fold2",
                "--input", str(scans / "scan1.nii.gz"), "--out", str(out))
    assert p.returncode == 0, p.stderr
    _same_outputs(ref, out, ["scan1"])


def test_health_ready_and_metrics(server):
    base = f"http://{server.url}"
    for path in ("/v2/health/live", "/v2/health/ready", "/v2/models/cv/ready", "/v2/models/cv-fold4/ready"):
        with urllib.request.urlopen(base + path, timeout=10) as r:
            assert r.status == 200, path
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics}/metrics", timeout=10) as r:
        text = r.read().decode()
    assert 'nv_inference_request_success{model="cv",version="1"}' in text


def _infer(client, model, arr, dtype="FP32"):
    import tritonclient.http as tc
    i = tc.InferInput(store.INPUT, list(arr.shape), dtype)
    i.set_data_from_numpy(arr)
    return client.infer(model, [i]).as_numpy(store.OUTPUT)


def _error(client, model, arr, dtype="FP32"):
    from tritonclient.utils import InferenceServerException
    with pytest.raises(InferenceServerException) as e:
        _infer(client, model, arr, dtype)
    return e.value


def one_sentence(msg: str) -> bool:
    """A reply a client can show as it is: one line, no traceback, no file path."""
    return "\n" not in msg and "Traceback" not in msg and ".py" not in msg and "/" not in msg


# (what is wrong, the request, the words of the reply; None: Triton's own sentence, checked by words alone)
def bad_requests(good: np.ndarray) -> list:
    """The bad requests the serving tests send (and the load benchmark mixes in), with their replies' words."""
    nan = good.copy()
    nan[-1, 0, 3, 4, 5] = np.nan
    return [
        ("dtype", "cv", good.astype(np.float64), "FP64", "data-type is 'FP64', but model 'cv' expects 'FP32'"),
        ("rank", "cv", good[:, 0], "FP32", "Expected [-1,-1,-1,-1,-1], got [2,16,64,64]"),
        ("channels", "cv", np.concatenate([good, good], 1), "FP32",
         "input image has shape (2, 2, 16, 64, 64); expected (N, 1, D, H, W)"),
        ("multiple", "cv", np.zeros((1, 1, 4, 30, 32), np.float32), "FP32",
         "window size (4, 30, 32) is not a multiple of the model's input multiple (16, 32, 32); pad windows to "
         "multiples (ahnet.serve.client does)"),
        ("nan", "cv", nan, "FP32", "input image holds 1 NaN or infinite value(s); expected a [0, 1]-scaled CT window"),
        ("batch", "cv", np.zeros((9, 1, 16, 32, 32), np.float32), "FP32", "batch-size must be <= 8"),
        ("voxels", "cv", np.zeros((1, 1, 64, 128, 128), np.float32), "FP32",
         "window size (64, 128, 128) has 1048576 voxels, over this server's limit of 524288 per window; send "
         "smaller windows"),
        ("model", "no-such-model", good, "FP32", "Request for unknown model: 'no-such-model' is not found"),
    ]


def test_bad_requests_get_one_sentence_and_the_server_keeps_serving(server):
    """Every bad request's raw reply (what any Triton client gets, not only ahnet.serve.client) is one sentence
    without traceback or path; the model's own checks answer with their sentence alone, HTTP 400; the server's log
    has the sentence and the traceback; the server answers the same good request the same way throughout."""
    import tritonclient.http as tc
    client = tc.InferenceServerClient(server.url, network_timeout=120)
    good = np.random.default_rng(0).random((2, 1, 16, 64, 64), dtype=np.float32)
    want = _infer(client, "cv", good)          # its value: test_the_served_ensemble_is_the_mean_of_fold_sigmoids
    for what, model, arr, dtype, words in bad_requests(good):
        e = _error(client, model, arr, dtype)
        raw = e.message()
        assert words in raw and one_sentence(raw), (what, raw)
        if what in ("channels", "multiple", "nan", "voxels"):      # the model's own checks: the sentence alone
            assert raw == words and e.status() == "400", (what, raw, e.status())
        assert server_message(e) in raw                                   # the line ahnet.serve.client prints
        assert np.array_equal(_infer(client, "cv", good), want), what    # still serving, and the same answer
    log = server.log_text()
    assert "bad request (model cv): window size (4, 30, 32) is not a multiple" in log
    assert "Traceback (most recent call last)" in log and "in check_windows" in log   # the traceback: in the log


def test_a_bad_request_in_a_dynamic_batch_fails_alone(server):
    """Concurrent requests of one shape, one holding a NaN: Triton may merge them into one execution; the NaN
    request gets its sentence and every other request its probabilities."""
    import concurrent.futures
    import tritonclient.http as tc
    from tritonclient.utils import InferenceServerException
    rng = np.random.default_rng(5)
    xs = [rng.random((1, 1, 16, 32, 32), dtype=np.float32) for _ in range(6)]
    xs[2][0, 0, 1, 1, 1] = np.nan

    def send(x):
        c = tc.InferenceServerClient(server.url, network_timeout=120)
        try:
            return _infer(c, "cv-fold3", x)
        except InferenceServerException as e:
            return e.message()
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        replies = list(pool.map(send, xs))
    assert replies[2] == "input image holds 1 NaN or infinite value(s); expected a [0, 1]-scaled CT window"
    assert all(isinstance(r, np.ndarray) and r.shape == x.shape for i, (r, x) in enumerate(zip(replies, xs))
               if i != 2), replies


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_the_clients_error_line_is_the_servers_sentence(server, protocol):
    """The model's own checks reach ahnet.serve.client as their sentence alone, over either protocol."""
    conn = Connection(server.url if protocol == "http" else server.grpc_url, protocol, retries=0)
    nan = np.full((1, 1, 16, 32, 32), 0.5, np.float32)
    nan[0, 0, 1, 2, 3] = np.nan
    cases = [(nan, "input image holds 1 NaN or infinite value(s); expected a [0, 1]-scaled CT window"),
             (np.zeros((1, 1, 16, 32, 48), np.float32), "window size (16, 32, 48) is not a multiple of the model's "
                                                        "input multiple (16, 32, 32); pad windows to multiples "
                                                        "(ahnet.serve.client does)")]
    for arr, sentence in cases:
        with pytest.raises(ClientError) as e:
            conn.infer("cv-fold1", {store.INPUT: arr}, store.OUTPUT)
        assert str(e.value) == f"model cv-fold1: the server answered: {sentence}"


def test_the_served_ensemble_is_the_mean_of_fold_sigmoids(server, exported):
    """What the server answers for the ensemble against numpy's mean of sigmoid over each fold's file."""
    import tritonclient.http as tc
    runners = [r for _, r in store.load_runners(exported)]
    x = np.random.default_rng(3).random((2, 1, 16, 32, 64), dtype=np.float32)
    want = np.mean([1 / (1 + np.exp(-r(x).astype(np.float64))) for r in runners], axis=0)
    assert np.abs(backend.mean_probability(runners, x) - want).max() <= 1e-6
    got = _infer(tc.InferenceServerClient(server.url, network_timeout=120), "cv", x)
    # float32 convolutions in another process with another thread count: logits agree to ~1e-6, not bitwise
    assert got.dtype == np.float32 and np.abs(got - want).max() <= 1e-5


def test_a_client_killed_mid_request_leaves_the_server_serving(server, tmp_path):
    script = tmp_path / "slow_client.py"
    script.write_text(
        "import numpy as np, sys, tritonclient.http as tc\n"
        "c = tc.InferenceServerClient(sys.argv[1], network_timeout=300)\n"
        "x = np.random.default_rng(1).random((8, 1, 16, 128, 128), dtype=np.float32)\n"
        "i = tc.InferInput('image', list(x.shape), 'FP32'); i.set_data_from_numpy(x)\n"
        "print('sending', flush=True)\n"
        "c.infer('cv', [i])\n"
        "print('answered', flush=True)\n")
    before = _success_count(server)
    p = subprocess.Popen([sys.executable, str(script), server.url], stdout=subprocess.PIPE, text=True,
                         env=CLIENT_ENV)
    assert p.stdout.readline().strip() == "sending"
    time.sleep(1.0)                 # the request is in the server: 5 folds x 8 windows of 16 x 128 x 128 take seconds
    assert p.poll() is None, "the request finished before the client could be killed"
    p.kill()
    p.wait(timeout=10)
    import tritonclient.http as tc
    client = tc.InferenceServerClient(server.url, network_timeout=300)
    x = np.full((1, 1, 16, 32, 32), 0.25, np.float32)
    assert _infer(client, "cv-fold0", x).shape == x.shape
    assert client.is_server_live() and client.is_model_ready("cv")
    assert server.proc.poll() is None
    assert _success_count(server) >= before + 1


def _success_count(server) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics}/metrics", timeout=10) as r:
        for line in r.read().decode().splitlines():
            if line.startswith('nv_inference_request_success{model="cv-fold0"'):
                return int(float(line.rsplit(" ", 1)[1]))
    return 0


def test_client_retries_a_refused_connection_then_exits_2(scans, tmp_path):
    port = free_ports(1)[0]
    p = _client("--url", f"127.0.0.1:{port}", "--input", str(scans), "--out", str(tmp_path / "o"),
                "--retries", "2", "--retry-wait", "0.2", timeout=60)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 3 and all("refused; retry" in ln for ln in lines[:2])
    assert lines[-1].startswith(f"ahnet.client: error: no server answers at 127.0.0.1:{port}")
    assert not (tmp_path / "o").exists()


def test_client_bad_options_are_one_line(scans, tmp_path, capsys):
    from ahnet.commands import client
    out = ["--out", str(tmp_path / "o")]
    for args, words in [(["--url", "localhost", "--input", str(scans)], "must be HOST:PORT"),
                        (["--url", "h:1", "--input", str(scans), "--overlap", "1"], "argument --overlap"),
                        (["--url", "h:1", "--input", str(scans), "--batch", "0"], "argument --batch"),
                        (["--url", "h:1", "--input", str(scans), "--window", "0", "8", "8"], "argument --window"),
                        (["--url", "h:1", "--input", str(scans), "--threshold", "2"], "--threshold 2.0"),
                        (["--url", "h:1", "--input", str(tmp_path / "none.nii.gz")], "not found")]:
        try:
            rc = client.main([*args, *out])
        except SystemExit as e:                 # the window options are refused by the parser
            rc = e.code
        assert rc == 2
        err = capsys.readouterr().err
        assert err.startswith("ahnet.client: error: ") and words in err and err.count("\n") == 1, err
    assert not (tmp_path / "o").exists()


def test_server_bad_options_are_one_line(exported, tmp_path, capsys):
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        taken = s.getsockname()[1]
        h, g, m = free_ports(3)
        for args, words in [(["--models", str(tmp_path / "none")], "not found"),
                            (["--models", str(exported), "--http-port", str(taken), "--grpc-port", str(g),
                              "--metrics-port", str(m)], f"--http-port {taken} is in use"),
                            (["--models", str(exported), "--http-port", str(h), "--grpc-port", str(h)], "must differ")]:
            assert serve_cmd.main(args) == 2
            err = capsys.readouterr().err
            assert err.startswith("ahnet.serve: error: ") and words in err and err.count("\n") == 1, err
    # and through the module entry point, as bash run.sh serve runs it
    p = subprocess.run([sys.executable, "-m", "ahnet.serve", "--models", str(exported), "--http-port", str(h),
                        "--grpc-port", str(g), "--metrics-port", str(m), "--backend", "onnx"], capture_output=True,
                       text=True, cwd=ROOT, timeout=120)
    assert p.returncode == 2 and p.stderr.startswith("ahnet.serve: error: "), p.stderr
    assert "has no onnx file" in p.stderr and p.stderr.count("\n") == 1


def test_onnx_backend_serves_the_same_and_sigterm_stops_everything(cv, scans, tmp_path):
    from ahnet.serve.export import export_runs
    models = tmp_path / "onnx1"
    # fold0's untrained logits reach |68|: float32 rounding alone puts ONNX Runtime ~1e-4 from PyTorch there
    meta = export_runs([str(cv.parent / "cv-fold0")], models, formats=("onnx",), log=lambda m: None)
    assert meta["opset"] == 18 and meta["folds"][0]["max_abs_diff"]["onnx"] <= 1e-4
    import onnx
    dims = [d.dim_param or d.dim_value for d in onnx.load(str(models / "fold0" / "model.onnx")).graph.input[0]
            .type.tensor_type.shape.dim]
    assert dims[1] == 1 and all("*" in str(d) for d in dims[2:]), dims     # D = 16*d, H = 32*h, W = 32*w
    s = start_server(models, tmp_path / "serve.log", "--backend", "onnx")
    try:
        ref = tmp_path / "predict"
        assert predict.main(["--runs", str(cv.parent / "cv-fold0"), "--input", str(scans), "--out", str(ref)]) == 0
        p = _client("--url", s.url, "--input", str(scans), "--out", str(tmp_path / "client"))
        assert p.returncode == 0, p.stderr
        # maps within 1e-4 and the same masks, candidates and scores; centres within one 2.5 mm slice: this barely
        # trained fold's map is nearly flat, so the support region that refines a centre (p >= half the peak)
        # gains or loses voxels on a 1e-5 change of the map (measured: up to 1.4 mm); the PyTorch backend: 1e-3 mm
        _same_outputs(ref, tmp_path / "client", ["scan0", "scan1"], mm=2.5)
        tree = process_tree(s.proc.pid)
        assert tree, "tritonserver and its stubs run below the server"
        t0 = time.monotonic()
        s.proc.send_signal(signal.SIGTERM)
        assert s.proc.wait(timeout=30) == 0
        took = time.monotonic() - t0
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in tree if alive(pid)], "processes outlived the server"
        assert took < 20, took
        assert "[serve] stopped in" in (tmp_path / "serve.log").read_text()
    finally:
        s.stop()


def test_libpython_goes_first_on_the_library_path(monkeypatch):
    import sysconfig
    libdir = sysconfig.get_config_var("LIBDIR")
    monkeypatch.setenv("LD_LIBRARY_PATH", f"/opt/x:{libdir}:/opt/y")
    assert srv.libpython_first() == f"{libdir}:/opt/x:/opt/y" == os.environ["LD_LIBRARY_PATH"]


def test_client_shows_a_server_error_reply_in_one_line(server, scans, tmp_path):
    p = _client("--url", server.url, "--model", "no-such-model", "--input", str(scans / "scan1.nii.gz"),
                "--out", str(tmp_path / "o"), timeout=120)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith("ahnet.client: error: model no-such-model: the server answered: Request for "
                               "unknown model: 'no-such-model' is not found")
