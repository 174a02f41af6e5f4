"""results.parquet's `video` works from any folder, and report.html links every video for each way README
runs a batch and its report (relative or absolute output folders, from the run's folder or another one, a
folder with a space, the output folder moved); a headless Chromium clicks one."""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote, urlparse

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import write_config, write_manifest
from pipeline.report import load_results, write_report

SMALL = dict(target_height=32, target_width=48, target_video_length=5, infer_steps=2, text_len=32)


@pytest.fixture(scope="module")
def batch(tmp_path_factory, tiny_root):
    """README's way: run from the project folder with the default, relative `outputs` and `wan-store`."""
    import os

    from tasks.build import run_batch

    project = tmp_path_factory.mktemp("report links") / "my project"  # a space in the path
    project.mkdir()
    config = write_config(project / "config.json", **SMALL)
    write_manifest(project / "manifests" / "jobs.parquet", [
        {"job_id": "cat", "prompt": "a red circle moving left on a blue background", "seed": 1},
        {"job_id": "dog", "prompt": "a green square moving right on a black background", "seed": 2},
    ])
    here = os.getcwd()
    os.chdir(project)
    try:
        assert run_batch("manifests/jobs.parquet", config=str(config), output_dir="outputs", store="wan-store")
    finally:
        os.chdir(here)
    return project


def links(html_path: Path) -> list[Path]:
    """Each <a href> of the page, resolved as a browser does against the page's own location."""
    base = html_path.parent
    out = []
    for href in re.findall(r'<a href="([^"]+)"', html_path.read_text()):
        url = urlparse(href)
        out.append(Path(unquote(url.path)) if url.scheme == "file" else base / unquote(href))
    return out


def test_results_video_is_absolute_and_readable_from_elsewhere(batch, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # not the folder the batch ran in
    rows = load_results(batch / "outputs")
    for r in rows:
        video = Path(r["video"])
        assert video.is_absolute() and video == batch / "outputs" / f"{r['job_id']}.mp4"
        assert video.read_bytes()[4:8] == b"ftyp"


@pytest.mark.parametrize("how", ["relative, from the run's folder", "absolute, from elsewhere",
                                 "'.', from inside the output folder"])
def test_report_links_every_video(batch, monkeypatch, tmp_path, how):
    from pipeline.cli import main

    cwd, arg = {"relative, from the run's folder": (batch, "outputs"),
                "absolute, from elsewhere": (tmp_path, str(batch / "outputs")),
                "'.', from inside the output folder": (batch / "outputs", ".")}[how]
    monkeypatch.chdir(cwd)
    assert main(["report", "--output-dir", arg]) == 0
    found = links(batch / "outputs" / "report.html")
    assert sorted(p.name for p in found) == ["cat.mp4", "dog.mp4"]
    assert all(p.is_file() for p in found)


def test_links_survive_moving_the_output_folder(batch, tmp_path):
    write_report(batch / "outputs")
    moved = tmp_path / "archive copy"
    shutil.copytree(batch / "outputs", moved)
    found = links(moved / "report.html")
    assert sorted(p.name for p in found) == ["cat.mp4", "dog.mp4"]
    assert all(p.parent == moved for p in found)  # relative links: the copy's own videos


def test_old_results_with_run_relative_paths_still_link(batch, tmp_path):
    out = tmp_path / "old"
    shutil.copytree(batch / "outputs", out)
    table = pq.read_table(out / "results.parquet")
    relative = pa.array([f"outputs/{Path(v).name}" for v in table["video"].to_pylist()], pa.string())
    pq.write_table(table.set_column(table.schema.get_field_index("video"), "video", relative),
                   out / "results.parquet")
    html_path, _, _ = write_report(out)
    assert sorted(p.name for p in links(html_path)) == ["cat.mp4", "dog.mp4"]


def test_video_elsewhere_is_linked_by_file_url(batch, tmp_path):
    out = tmp_path / "elsewhere"
    shutil.copytree(batch / "outputs", out)
    keep = tmp_path / "videos kept apart"
    keep.mkdir()
    table = pq.read_table(out / "results.parquet")
    moved = []
    for v in table["video"].to_pylist():
        dst = keep / Path(v).name
        shutil.move(str(out / Path(v).name), dst)
        moved.append(str(dst))
    pq.write_table(table.set_column(table.schema.get_field_index("video"), "video", pa.array(moved)),
                   out / "results.parquet")
    html_path, _, _ = write_report(out)
    assert 'href="file:///' in html_path.read_text()
    assert sorted(str(p) for p in links(html_path)) == sorted(moved)


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(_chromium() is None, reason="chromium is not installed (apt-get install chromium)")
def test_chromium_clicks_a_link_to_the_video(batch, tmp_path):
    out = tmp_path / "served as is"
    shutil.copytree(batch / "outputs", out)
    html_path, _, _ = write_report(out)
    probe = out / "probe.html"  # the report plus a script that clicks the first video link
    probe.write_text(html_path.read_text().replace(
        "</body>", "<script>document.querySelector('a[href]').click();</script></body>"))
    # --no-sandbox: Chromium refuses to start as root with its sandbox on (CI runs as root)
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
           "--dump-dom", probe.as_uri()]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    # after the click Chromium shows the video itself: its media document names the file it plays
    src = re.search(r'<(?:video|source)[^>]* src="([^"]+)"', dom.stdout)
    assert src, dom.stdout[-2000:] + dom.stderr[-2000:]
    played = Path(unquote(urlparse(src.group(1)).path))
    assert played == out / "cat.mp4" and played.is_file()
