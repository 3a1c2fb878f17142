"""What predict writes for a case beside the network's work, timed: candidates, findings (ranks and diameters),
the overview picture, the NIfTI files, and for a DICOM series the DICOM SEG and SR.

    python -m ahnet.bench --outputs [--volume 128 512 512] [--spacing 2.5 0.7 0.7] [--nodules 10] [--repeats 3]
                                    [--out bench_results/outputs.json]

(the outputs section of ``python -m ahnet.bench``.) A synthetic chest-size scan (noise, a body, two lungs and
``--nodules`` spheres of 4 to 12 mm) is written as a DICOM CT series (ahnet.data.dicom_source.write_ct_series) and
read back as predict reads it; its probability map holds the nodules at 0.3 to 0.95 over a faint noise floor
below the candidate threshold (no network: the other sections time that). Each step is the function predict calls
(ahnet.infer.outputs, ahnet.data.io), run once to warm up (imports, caches; not counted) and then ``--repeats``
times, each into a fresh folder; reported: the median wall and CPU seconds of each step (on a shared machine the
CPU time is the work's own) and the size of each file written.
"""
from __future__ import annotations

import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from ahnet import failures, paths
from ahnet.atomic import write_text_atomic
from ahnet.data import dicom_out, io
from ahnet.data.dicom_source import write_ct_series
from ahnet.infer import extract_candidates
from ahnet.infer.outputs import CaseOutputs, ranked_findings, write_overview_file
from ahnet.infer.scans import scale_in_place

STEPS = ("read DICOM series", "candidates", "findings", "overview", "NIfTI prob + mask", "DICOM headers",
         "DICOM SEG", "DICOM SR")


def add_options(ap) -> None:
    ap.add_argument("--volume", type=failures.number(int, 8, 2048), nargs=3, default=[128, 512, 512],
                    metavar=("D", "H", "W"), help="scan size (z, y, x) in voxels")
    ap.add_argument("--spacing", type=failures.number(float, 0.1, 10), nargs=3, default=[2.5, 0.7, 0.7],
                    metavar=("SZ", "SY", "SX"), help="voxel size in mm (thick slices)")
    ap.add_argument("--nodules", type=failures.number(int, 0, 200), default=10, help="spheres in the scan")
    ap.add_argument("--repeats", type=failures.number(int, 1, 50), default=3)
    ap.add_argument("--out", default="bench_results/outputs.json", help="JSON file of the rows")


def _scan(shape, spacing, n: int, seed: int = 0):
    """(HU (z, y, x) float32, probability map float32): a chest-like scan and its nodules."""
    rng = np.random.default_rng(seed)
    z, y, x = np.ogrid[:shape[0], :shape[1], :shape[2]]
    cy, cx = shape[1] / 2, shape[2] / 2
    body = ((y - cy) / (0.42 * shape[1])) ** 2 + ((x - cx) / (0.47 * shape[2])) ** 2 <= 1
    lungs = (((y - cy) / (0.28 * shape[1])) ** 2 + ((np.abs(x - cx) - 0.2 * shape[2]) / (0.15 * shape[2])) ** 2) <= 1
    hu = np.where(body, 40.0, -1000.0).astype(np.float32) + rng.normal(0, 20, shape).astype(np.float32)
    hu[np.broadcast_to(lungs, shape)] -= 880.0
    prob = rng.uniform(0.0, 0.01, shape).astype(np.float32)          # below the candidate threshold (0.02)
    sp = np.asarray(spacing, float)
    for k in range(n):
        c = rng.uniform([0.1, 0.3, 0.2], [0.9, 0.7, 0.8]) * np.asarray(shape)
        r = rng.uniform(2.0, 6.0)
        ball = ((z - c[0]) * sp[0]) ** 2 + ((y - c[1]) * sp[1]) ** 2 + ((x - c[2]) * sp[2]) ** 2 <= r * r
        hu[ball] = 30.0
        prob[ball] = 0.3 + 0.65 * k / max(1, n - 1)
    return hu, prob


def _timed(fn):
    """(fn(), (wall seconds, CPU seconds of this process)): on a shared machine the CPU time is the work's."""
    t, c = time.perf_counter(), time.process_time()
    value = fn()
    return value, (time.perf_counter() - t, time.process_time() - c)


def _one_case(series: Path, prob: np.ndarray, out: Path, outputs: CaseOutputs) -> dict:
    """Each step of one case as predict runs it: {step: (wall s, CPU s)}."""
    s = {}
    vol, s["read DICOM series"] = _timed(lambda: io.read_scan(series))
    scale_in_place(vol.array)
    rows, s["candidates"] = _timed(lambda: extract_candidates(prob, vol, seriesuid="bench"))
    findings, s["findings"] = _timed(lambda: ranked_findings(rows, prob, vol, outputs))
    files = paths.case_paths(out, "bench")
    _, s["overview"] = _timed(lambda: write_overview_file(files.overview, "bench", vol.array, prob, vol, findings,
                                                          outputs))
    mask = prob >= 0.5

    def nifti():
        io.write_image(files.prob, prob, like=vol)
        io.write_image(files.mask, mask.astype(np.uint8), like=vol)
    _, s["NIfTI prob + mask"] = _timed(nifti)
    sources, s["DICOM headers"] = _timed(lambda: dicom_out.source_datasets(vol.dicom))
    _, s["DICOM SEG"] = _timed(lambda: dicom_out.write_seg(files.seg, mask, vol.dicom, outputs.algorithm, 0.5,
                                                           sources))
    _, s["DICOM SR"] = _timed(lambda: dicom_out.write_sr(files.sr, findings, vol.dicom, outputs.algorithm,
                                                         outputs.sr_threshold, sources))
    return s


def run_outputs_bench(a) -> dict:
    """The rows of the module docstring, also written to ``a.out`` as JSON."""
    missing = dicom_out.highdicom_missing()
    if missing:
        raise ValueError(missing)
    failures.check_output_file(a.out, "--out")
    shape, spacing = tuple(a.volume), tuple(a.spacing)
    hu, prob = _scan(shape, spacing, a.nodules)
    outputs = CaseOutputs(dicom="on", algorithm=dicom_out.Algorithm("ahnet bench", "0"))
    times, sizes = {k: [] for k in STEPS}, {}
    with tempfile.TemporaryDirectory() as tmp:
        series = Path(tmp) / "series"
        write_ct_series(series, hu, spacing, (-170.0, -180.0, -300.0), np.eye(3))
        _one_case(series, prob, Path(tmp) / "warm-up", outputs)
        for r in range(a.repeats):
            out = Path(tmp) / f"out{r}"
            for k, v in _one_case(series, prob, out, outputs).items():
                times[k].append(v)
        sizes = {p.name.replace("bench", "<case>"): p.stat().st_size for p in sorted(out.iterdir())}
    rows = [{"step": k, "median_s": statistics.median(w for w, _ in v),
             "median_cpu_s": statistics.median(c for _, c in v), "runs_s": [w for w, _ in v],
             "runs_cpu_s": [c for _, c in v]} for k, v in times.items()]
    res = {"volume": list(shape), "spacing_mm": list(spacing), "nodules": a.nodules, "repeats": a.repeats,
           "rows": rows, "file_bytes": sizes}
    write_text_atomic(Path(a.out), json.dumps(res, indent=1))
    return res


def format_rows(res: dict) -> str:
    """A plain table of the steps and the files."""
    lines = [f"volume {res['volume']} at {res['spacing_mm']} mm, {res['nodules']} nodules, median of "
             f"{res['repeats']}:"]
    lines += [f"  {r['step']:<20} {r['median_s']:8.3f} s wall {r['median_cpu_s']:8.3f} s CPU" for r in res["rows"]]
    lines += [f"  {name:<20} {size / 1e6:8.2f} MB" for name, size in res["file_bytes"].items()]
    return "\n".join(lines)
