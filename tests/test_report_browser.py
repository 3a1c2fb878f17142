"""report.html opened in a real browser (Debian's headless Chromium, over its DevTools protocol): every image
decodes at its figure's size, nothing is logged as an error, nothing is requested outside the file, and the
gallery names the type of each row. The screenshot is kept as an artifact of the run (printed path; folder
``artifacts/``, ignored by git, or $AHNET_ARTIFACTS)."""
import os
import struct
from pathlib import Path

import numpy as np
import pytest

from ahnet.evaluate.froc import evaluate_detection, paired_bootstrap
from ahnet.report import build_report
from tests._browser import Browser, chromium
from tests.test_report import _crop, _log, _three_models

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = Path(os.environ.get("AHNET_ARTIFACTS") or ROOT / "artifacts")

IMAGES_JS = """Promise.all(Array.from(document.images).map(img => img.decode().then(
    () => ({alt: img.alt, ok: true, w: img.naturalWidth, h: img.naturalHeight}),
    e => ({alt: img.alt, ok: false, error: String(e)}))))"""


def _png_size(data: bytes) -> tuple:
    """(width, height) from a PNG's IHDR chunk."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", data[16:24])


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    exe = chromium()
    if exe is None:
        pytest.skip("chromium is not installed (Debian's package; bash run.sh test installs it where apt is "
                    "available)")
    with Browser(exe, tmp_path_factory.mktemp("chromium")) as b:
        yield b


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """A demo-size report (8 scans, 24 nodules, three models, paired comparisons, learning curves, a gallery
    with a typed and an untyped row) built by ahnet.report.build_report from synthetic results."""
    d = tmp_path_factory.mktemp("browser_report")
    nod, cands, scans = _three_models(seed=5, n_scans=8)
    res = {m: {"detection": evaluate_detection(nod, c, scans, n_bootstrap=100, seed=0), "segmentation": None}
           for m, c in cands.items()}
    runs = {m: d / "runs" / m for m in cands}
    for m, run in runs.items():
        _log(run, [(1, 10, .9, .3), (2, 20, .7, .5), (3, 30, .6, .55)], ["epoch", "step", "loss", "val_dice"])
    untyped = dict(_crop("hit"), type=None)
    gallery = {"focus": "ahnet-transfer", "thresholds": {"ahnet-transfer": .9}, "half_mm": 5.0,
               "types": {"T01": [_crop("hit"), _crop("miss")], None: [untyped]},
               "false_positives": {"mcgcn-2d": [_crop("fp")], "unet3d-scratch": [_crop("fp")]}}
    build_report(res, d / "report", comparisons=paired_bootstrap(nod, cands, scans, n_bootstrap=100, seed=0),
                 runs=runs, gallery=gallery, candidates="local maxima, NMS at 5 mm")
    return d / "report" / "report.html"


def test_report_html_renders_in_chromium_with_every_image_and_no_error(browser, report):
    url = report.as_uri()
    seen = len(browser.events)
    session = browser.open(url)
    images = browser.evaluate(session, IMAGES_JS)
    text = browser.evaluate(session, "document.body.innerText")
    shot = browser.screenshot(session)
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    kept = ARTIFACTS / "report_browser.png"
    kept.write_bytes(shot)
    print(f"screenshot of report.html in chromium: {kept}")
    figures = sorted(p.name for p in report.parent.glob("*.png"))
    assert sorted(i["alt"] for i in images) == figures and len(figures) >= 8
    for img in images:                                   # decoded, at the size of the figure it embeds
        assert img["ok"], img
        assert (img["w"], img["h"]) == _png_size((report.parent / img["alt"]).read_bytes())
    assert browser.problems(since=seen) == []
    assert [u for u in browser.requests(since=seen) if u != url and not u.startswith("data:")] == []
    assert "Gallery rows, top to bottom: T01 solid < 6 mm; untyped (no type in the annotations)." in text
    width, height = _png_size(shot)
    assert width == 1280 and height > 3000                # the whole page, not the window
    import matplotlib.image as mpimg
    pixels = mpimg.imread(str(kept))
    assert float(np.std(pixels[..., :3])) > 0.05          # text and figures drawn, not a blank page


def test_the_checks_catch_a_broken_image_a_console_error_and_a_request_outside_the_file(browser, tmp_path):
    """The same checks on a page with each fault: they are not blind."""
    page = tmp_path / "bad.html"
    page.write_text("<!doctype html><html><body><img alt='broken' src='data:image/png;base64,iVBORw0KGgo='>"
                    "<img alt='outside' src='http://127.0.0.1:9/x.png'>"
                    "<script>console.error('a fault')</script></body></html>", encoding="utf-8")
    seen = len(browser.events)
    session = browser.open(page.as_uri())
    images = browser.evaluate(session, IMAGES_JS)
    assert [i["ok"] for i in images] == [False, False]
    assert ("console", ["a fault"]) in browser.problems(since=seen)
    assert "http://127.0.0.1:9/x.png" in browser.requests(since=seen)
