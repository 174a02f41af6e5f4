"""wan-batch report: a self-contained HTML page (checked in real headless Chromium) and a PNG contact sheet."""
from __future__ import annotations

import base64
import html
import io
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from conftest import run_batch, write_config, write_manifest
from pipeline.report import STAGE_COLORS, THUMB, contact_sheet, load_results, timing_svg, write_report

SMALL = dict(target_height=32, target_width=48, target_video_length=5, infer_steps=4, text_len=32)
TRICKY = 'a <b>bold</b> cat & "quotes" <script>alert(1)</script>'


@pytest.fixture(scope="module")
def batch(tmp_path_factory, tiny_root):
    tmp = tmp_path_factory.mktemp("report")
    config = write_config(tmp / "config.json", **SMALL)
    manifest = write_manifest(tmp / "jobs.parquet", [
        {"job_id": "cat", "prompt": TRICKY, "seed": 1, "image": None},
        {"job_id": "cat-again", "prompt": TRICKY, "seed": 2, "image": None},
        {"job_id": "no-image", "prompt": "a dog", "seed": 3, "image": str(tmp / "missing.png")},
    ])
    assert not run_batch(manifest, tmp, config=config)  # the row without its image fails, the others finish
    # a second batch in another output folder reuses every artifact: its report shows cache hits
    assert not run_batch(manifest, tmp, config=config, output_dir=tmp / "again")
    return tmp


def test_report_html_is_self_contained_and_complete(batch):
    out = batch / "outputs"
    html_path, sheet_path, rows = write_report(out)
    page = html_path.read_text()
    assert [r["job_id"] for r in rows] == ["cat", "cat-again", "no-image"]
    # nothing loaded from elsewhere: every image is an embedded PNG, no scripts, styles or links outside
    assert not re.search(r'(src|href)="(https?:|//)', page) and "<script" not in page and "<link" not in page
    srcs = re.findall(r'<img [^>]*src="([^"]+)"', page)
    assert len(srcs) == 3 and all(s.startswith("data:image/png;base64,") for s in srcs)
    for s in srcs:
        with Image.open(io.BytesIO(base64.b64decode(s.split(",", 1)[1]))) as img:
            assert max(img.size) == THUMB
    # prompts are escaped text, errors shown, statuses right
    assert html.escape(TRICKY) in page and TRICKY not in page
    assert "no-image" in page and "image file not found" in page
    assert page.count('class="failed">failed</span>') == 1 and page.count('class="ok">ok</span>') == 2
    # seconds per stage as in results.parquet
    for r in rows:
        if r["seconds_decode"] is not None:
            assert f"{r['seconds_decode']:.2f}" in page
    assert '<svg xmlns="http://www.w3.org/2000/svg"' in page


def test_thumbnails_are_the_videos_middle_frames(batch):
    from pipeline.inspect import read_video
    from pipeline.report import middle_frame

    video = batch / "outputs" / "cat.mp4"
    frames = read_video(video)
    mid = middle_frame(video)
    assert mid.shape == frames[0].shape
    assert any((mid == f).all() for f in frames[1:-1])  # a frame from the middle, not the first or last


def test_timing_chart_bars_are_proportional_and_cached_stages_pale(batch):
    rows = load_results(batch / "again")
    assert all(set(r["cached_stages"]) >= {"text", "denoise-high", "denoise-low", "decode"}
               for r in rows if r["status"] == "ok")
    svg = timing_svg(rows)
    bars = re.findall(r'<rect x="([\d.]+)" y="(\d+)" width="([\d.]+)" height="16" fill="(#[0-9a-f]+)" '
                      r'fill-opacity="([\d.]+)" data-stage="([\w-]+)"', svg)
    ok_rows = [r for r in rows if r["status"] == "ok"]
    stages = [s for s in ("text", "denoise-high", "denoise-low", "decode")]
    assert len(bars) == sum(1 for r in ok_rows for s in stages if r[f"seconds_{s}"])
    first = {b[5]: b for b in bars if b[1] == bars[0][1]}  # the bars of the first row
    ratio_px = float(first["decode"][2]) / float(first["text"][2])
    ratio_s = ok_rows[0]["seconds_decode"] / ok_rows[0]["seconds_text"]
    assert ratio_px == pytest.approx(ratio_s, rel=0.02)
    assert all(b[4] == "0.3" for b in bars)  # every stage came from the cache in the second batch
    assert all(b[3] == STAGE_COLORS[b[5]] for b in bars)


def test_contact_sheet_grid(batch):
    rows = load_results(batch / "outputs")
    from pipeline.report import thumbnail

    thumbs = [thumbnail(r, batch / "outputs") for r in rows]
    sheet = contact_sheet(rows, thumbs, columns=2)
    assert sheet.size == (2 * (THUMB + 16) + 8, 2 * (THUMB + 44) + 8)
    arr = np.asarray(sheet)
    red = (arr[..., 0] > 180) & (arr[..., 1] < 40) & (arr[..., 2] < 40)
    assert red.any()  # the FAILED caption of the row without its image
    _, sheet_path, _ = write_report(batch / "outputs")
    with Image.open(sheet_path) as img:
        assert img.size == (3 * (THUMB + 16) + 8, THUMB + 44 + 8)


def test_cli_report_exit_codes(batch, tmp_path, capsys):
    from pipeline.cli import main

    assert main(["report", "--output-dir", str(batch / "outputs")]) == 1  # a row failed
    out = capsys.readouterr().out
    assert "3 rows: 2 ok, 1 failed" in out and "failed no-image" in out
    assert main(["report", "--output-dir", str(tmp_path)]) == 2
    assert "results.parquet not found" in capsys.readouterr().out


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(batch, tmp_path):
    html_path, _, rows = write_report(batch / "outputs")
    # a copy with a probe script: Chromium reports how many images decoded and the chart's drawn size
    probe = tmp_path / "probe.html"
    probe.write_text(html_path.read_text().replace(
        "</body>", "<script>const ok=[...document.images].filter(i=>i.complete&&i.naturalWidth>0).length;"
                   "const box=document.querySelector('svg').getBoundingClientRect();"
                   "document.title=`probe ${ok}/${document.images.length} ${Math.round(box.width)}x"
                   "${Math.round(box.height)}`;</script></body>"))
    base = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
            "--virtual-time-budget=5000"]
    dom = subprocess.run(base + ["--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=120)
    title = re.search(r"<title>probe (\d+)/(\d+) (\d+)x(\d+)</title>", dom.stdout)
    assert title, dom.stdout[-2000:] + dom.stderr[-2000:]
    decoded, total, svg_w, svg_h = map(int, title.groups())
    assert decoded == total == len(rows) and svg_w == 900 and svg_h > 100
    shot = tmp_path / "shot.png"
    subprocess.run(base + ["--window-size=1200,1000", f"--screenshot={shot}", html_path.as_uri()],
                   capture_output=True, text=True, timeout=120)
    with Image.open(shot) as img:
        assert img.size == (1200, 1000)
        arr = np.asarray(img.convert("RGB")).astype(int)
    # the chart's bars are drawn: pixels of the decode and text colours are on the screen
    for stage in ("text", "decode"):
        rgb = np.array([int(STAGE_COLORS[stage][i:i + 2], 16) for i in (1, 3, 5)])
        assert (np.abs(arr - rgb).sum(-1) < 12).sum() > 200, stage
