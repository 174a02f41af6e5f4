"""Small things a newcomer runs into: `inspect <job>` without --manifest says so; the folders README's
commands create in a checkout are git-ignored."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from conftest import REPO


def test_inspect_job_id_without_manifest_names_the_missing_option(tmp_path, capsys):
    from pipeline.cli import main

    (tmp_path / "wan-store").mkdir()
    assert main(["inspect", "red-circle-left", "--store", str(tmp_path / "wan-store")]) == 2
    out = capsys.readouterr().out
    assert "'red-circle-left' is not a cache key, so it is a job id: --manifest is missing" in out
    # a hex target is still looked up as a cache key
    assert main(["inspect", "abcd1234", "--store", str(tmp_path / "wan-store")]) == 2
    assert "--manifest is missing" not in capsys.readouterr().out


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="not a git checkout")
@pytest.mark.parametrize("path", ["models/Wan-AI/Wan2.2-I2V-A14B/config.json", "preview/image_input.png",
                                  "demo/outputs/red-circle-left.mp4", "outputs/x.mp4", "wan-store/x"])
def test_folders_readme_commands_create_are_ignored(path):
    out = subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO)
    assert out.returncode == 0, f"{path} is not git-ignored"
