"""One log line per event: `wan-batch` prints Luigi's lines once (as `luigi --module pipeline` does), a
manifest's row problem once however often the manifest is read, no third-party progress bars, and a
`--help` meant for users."""
from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

from conftest import REPO, write_manifest

ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def wan_batch(*args: str, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=ENV, timeout=600)


def bad_row_manifest(tmp_path):
    rows = [{"job_id": "ok", "prompt": "a red circle moving left on a blue background", "num_frames": 5,
             "infer_steps": 2, "extra": 1},
            {"job_id": "bad", "prompt": "b", "image": "missing.png", "extra": 2}]
    return write_manifest(tmp_path / "m.parquet", rows)


def test_run_prints_each_event_once(tmp_path, tiny_root):
    manifest = bad_row_manifest(tmp_path)
    proc = wan_batch("run", "--manifest", str(manifest), "--output-dir", "o", "--store", "s", cwd=tmp_path)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    lines = (proc.stdout + proc.stderr).splitlines()
    # Luigi's records come through Luigi's own handler only ("LEVEL: message"), not also through ours
    assert not [line for line in lines if " luigi-interface: " in line]
    informed = Counter(line for line in lines if line.startswith("INFO: Informed scheduler that task"))
    assert len(informed) >= 6  # RunManifest and its 5 stage tasks, each PENDING and then DONE/FAILED
    assert max(informed.values()) == 1, informed.most_common(3)
    # the manifest is read up front and by RunManifest several times; its warnings are one event each
    row_problem = [line for line in lines if "missing.png (this row is skipped and reported failed)" in line]
    unused = [line for line in lines if "manifest columns ['extra'] are not used" in line]
    assert len(row_problem) == 1 and len(unused) == 1, lines
    assert not [line for line in lines if "Loading weights" in line]
    assert (tmp_path / "o" / "ok.mp4").stat().st_size > 0


def test_validate_prints_each_row_problem_once(tmp_path):
    manifest = bad_row_manifest(tmp_path)
    proc = wan_batch("validate", "--manifest", str(manifest), cwd=tmp_path)
    assert proc.returncode == 1
    out = proc.stdout + proc.stderr
    assert out.count("image file not found") == 1, out
    assert "row problem: row 1: column 'image': image file not found" in proc.stdout
    assert out.count("manifest columns ['extra'] are not used") == 1  # the other warning still shows
    assert "2 rows, 1 runnable, 1 with problems" in proc.stdout


def test_help_describes_the_product_not_the_code():
    proc = wan_batch("--help", cwd=REPO)
    assert proc.returncode == 0
    assert "Parquet manifest" in proc.stdout and "wan-batch demo" in proc.stdout
    assert "pipeline/commands" not in proc.stdout and "Each subcommand lives" not in proc.stdout


def test_luigi_command_prints_a_row_problem_once(tmp_path, tiny_root):
    """README's `luigi --module pipeline RunManifest ...`: Luigi reads the manifest several times."""
    manifest = bad_row_manifest(tmp_path)
    proc = subprocess.run([sys.executable, "-m", "luigi", "--module", "pipeline", "RunManifest", "--manifest",
                           str(manifest), "--output-dir", "o", "--store", "s"], capture_output=True, text=True,
                          cwd=tmp_path, env=ENV, timeout=600)
    assert proc.returncode == 30, proc.stdout + proc.stderr
    out = proc.stdout + proc.stderr
    assert out.count("missing.png (this row is skipped and reported failed)") == 1, out[-3000:]
    assert out.count("manifest columns ['extra'] are not used") == 1
    assert "Loading weights" not in out
