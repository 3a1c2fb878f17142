"""The client command's up-front checks (ahnet.commands.client) without a server: a fake Connection answers the
windows, so these tests run without the serve extra's Triton binary.

Each scan's header is read once (the up-front size check; the reading of its voxels uses that header) and the
output options are checked once, for a NIfTI file and a DICOM series alike; the files are written as always."""
import json
from collections import Counter

import numpy as np

from ahnet import paths
from ahnet.data import header, io
from ahnet.data.dicom_source import write_ct_series
from ahnet.infer import outputs as outputs_mod
from ahnet.infer import scans
from ahnet.serve import store

SP = (2.5, 0.8, 0.8)
SHAPE = (12, 32, 32)
ORIGIN = (-12.0, -12.0, 0.0)


class FakeConnection:
    """Connection's surface that the client command uses: model.json from INFO_MODEL, and each window batch
    answered by itself (the image scaled to [0, 1] as its probability)."""

    def __init__(self, url, protocol="http", retries=3, wait_s=1.0, timeout_s=600.0, log=None):
        self.url, self.protocol = url, protocol
        self.client = self

    def ready(self):
        pass

    def call(self, what, fn):
        return fn()

    def get_model_metadata(self, model):
        return {"name": model}

    def infer(self, model, inputs, output):
        if model == store.INFO_MODEL:
            meta = {"name": "fake", "input_multiple": [4, 16, 16], "window": [8, 16, 16]}
            return np.array([json.dumps(meta)], dtype=object)
        return np.array(inputs[store.INPUT], np.float32)


def _inputs(tmp_path):
    """A dataset.json naming a NIfTI scan and a DICOM series, each with one bright sphere."""
    z, y, x = np.indices(SHAPE, dtype=float)
    hu = np.full(SHAPE, -850.0, np.float32)
    hu[((z - 6) * SP[0]) ** 2 + ((y - 16) * SP[1]) ** 2 + ((x - 16) * SP[2]) ** 2 <= 25] = 40.0
    d = tmp_path / "in"
    io.write_image(d / "nifti.nii.gz", io.Volume(hu, SP, ORIGIN))
    write_ct_series(d / "series", hu, SP, ORIGIN, np.eye(3), tag=7)
    (d / "dataset.json").write_text('{"test": [{"image": "nifti.nii.gz", "case_id": "nifti"}, '
                                    '{"image": "series", "case_id": "series"}]}')
    return d / "dataset.json"


def test_client_reads_each_header_once_and_checks_outputs_once(tmp_path, monkeypatch, capsys):
    from ahnet.commands import client
    data = _inputs(tmp_path)
    reads, checks = Counter(), []

    def counted_read_header(path, series_uid=None):
        reads[str(path)] += 1
        return header.read_header(path, series_uid)

    def counted_check_outputs(cases, outputs):
        checks.append([c.case_id for c in cases])
        return outputs_mod.check_outputs(cases, outputs)
    for module in (scans, io):                           # every place the client's path reads a header through
        monkeypatch.setattr(module, "read_header", counted_read_header)
    for module in (client, scans):
        monkeypatch.setattr(module, "check_outputs", counted_check_outputs)
    monkeypatch.setattr(client, "Connection", FakeConnection)
    out = tmp_path / "out"
    assert client.main(["--url", "127.0.0.1:9", "--input", str(data), "--out", str(out), "--no-preview",
                        "--no-dicom-out"]) == 0, capsys.readouterr().err
    assert sorted(reads.values()) == [1, 1] and len(reads) == 2, reads
    assert checks == [["nifti", "series"]]
    assert "2 case(s) via 127.0.0.1:9 model fake" in capsys.readouterr().out
    for case in ("nifti", "series"):
        files = paths.case_paths(out, case)
        assert files.prob.is_file() and files.mask.is_file()
    assert (out / paths.CANDIDATES_CSV).is_file()


def test_client_scan_over_the_limit_is_refused_before_any_connection(tmp_path, monkeypatch, capsys):
    from ahnet.commands import client
    data = _inputs(tmp_path)

    def no_connection(*a, **k):
        raise AssertionError("connected before the scans were checked")
    monkeypatch.setattr(client, "Connection", no_connection)
    out = tmp_path / "out"
    assert client.main(["--url", "127.0.0.1:9", "--input", str(data), "--out", str(out),
                        "--max-scan-voxels", "1000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ahnet.client: error: case nifti: ") and err.count("\n") == 1, err
    assert not out.exists()
