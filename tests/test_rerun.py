"""Re-running one stage of one job: that artifact and its downstream are recomputed (to the same bytes), nothing
else is touched, other jobs sharing an upstream artifact keep theirs; RunStage runs a single stage with Luigi."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, run_batch, write_config, write_manifest
from pipeline.inspect import chain_from_plan, find_job, inspect_chain
from pipeline.store import ArtifactStore

SMALL = dict(target_height=32, target_width=32, target_video_length=5, infer_steps=4, text_len=32)
PROMPT = "a red circle moving left"


@pytest.fixture(scope="module")
def ran(tmp_path_factory, tiny_root):
    tmp = tmp_path_factory.mktemp("rerun")
    config = write_config(tmp / "config.json", **SMALL)
    manifest = write_manifest(tmp / "jobs.parquet", [
        {"job_id": "a", "prompt": PROMPT, "seed": 1},
        {"job_id": "b", "prompt": PROMPT, "seed": 2},  # shares both text artifacts with a
    ])
    assert run_batch(manifest, tmp, config=config)
    return tmp


@pytest.fixture()
def batch(ran, tmp_path):
    """A fresh copy of the finished batch for each test (the tests change the store)."""
    shutil.copytree(ran, tmp_path / "b")
    tmp = tmp_path / "b"
    return tmp, str(tmp / "jobs.parquet"), str(tmp / "config.json"), ArtifactStore(tmp / "store")


def sidecars(store, manifest, config, job):
    return {name: json.loads(store.sidecar_path(ref).read_text())
            for name, ref in chain_from_plan(find_job(manifest, config, job))}


def test_rerun_recomputes_the_stage_and_downstream_of_that_job_only(batch, capsys):
    from pipeline.cli import main

    tmp, manifest, config, store = batch
    before_a, before_b = sidecars(store, manifest, config, "a"), sidecars(store, manifest, config, "b")
    assert before_a["text"]["key"] == before_b["text"]["key"]  # shared upstream
    rc = main(["rerun", "--job", "a", "--stage", "denoise-low", "--manifest", manifest, "--config", config,
               "--store", str(store.root), "--output-dir", str(tmp / "outputs")])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "invalidated 2 of 2 artifact(s) of job a: denoise-low" in out
    after_a, after_b = sidecars(store, manifest, config, "a"), sidecars(store, manifest, config, "b")
    assert after_b == before_b  # the other job: untouched
    for name in ("text", "text-negative", "denoise-high"):
        assert after_a[name] == before_a[name], name  # upstream: reused, not rewritten
    for name in ("denoise-low", "decode"):
        assert after_a[name]["run_id"] != before_a[name]["run_id"], name  # recomputed by the rerun
        assert after_a[name]["written_at"] > before_a[name]["written_at"]
        assert after_a[name]["sha256"] == before_a[name]["sha256"], name  # deterministic: same bytes again
    # inspect now sees the upstream as reused from an earlier run, the recomputed ones as this run's
    infos, latest = inspect_chain(store, chain_from_plan(find_job(manifest, config, "a")))
    assert latest == after_a["decode"]["run_id"]
    assert {i.name: i.cache for i in infos} == {"text": "hit", "text-negative": "hit", "denoise-high": "hit",
                                               "denoise-low": "miss", "decode": "miss"}
    assert "recomputed" in out and (tmp / "outputs" / "a.mp4").is_file()


def test_rerun_of_a_shared_text_stage_keeps_the_other_jobs_artifacts(batch, capsys):
    from pipeline.cli import main

    tmp, manifest, config, store = batch
    before_b = sidecars(store, manifest, config, "b")
    assert main(["rerun", "--job", "a", "--stage", "text", "--manifest", manifest, "--config", config,
                 "--store", str(store.root)]) == 0
    assert "invalidated 4 of 4" in capsys.readouterr().out  # text, denoise-high, denoise-low, decode of a
    after_b = sidecars(store, manifest, config, "b")
    assert {k: v for k, v in after_b.items() if k != "text"} == {k: v for k, v in before_b.items() if k != "text"}
    assert after_b["text"]["sha256"] == before_b["text"]["sha256"]  # recomputed once, for a, same bytes


def test_dry_run_and_bad_stage(batch, capsys):
    from pipeline.cli import main

    tmp, manifest, config, store = batch
    before = sidecars(store, manifest, config, "a")
    assert main(["rerun", "--job", "a", "--stage", "denoise-high", "--manifest", manifest, "--config", config,
                 "--store", str(store.root), "--dry-run"]) == 0
    assert "would invalidate 3 artifact(s)" in capsys.readouterr().out
    assert sidecars(store, manifest, config, "a") == before
    assert main(["rerun", "--job", "a", "--stage", "image", "--manifest", manifest, "--config", config,
                 "--store", str(store.root)]) == 2
    assert "has no stage 'image' (its stages: text, text-negative, denoise-high" in capsys.readouterr().out
    assert main(["rerun", "--job", "zz", "--stage", "text", "--manifest", manifest, "--config", config,
                 "--store", str(store.root)]) == 2


def test_run_one_stage_directly_with_luigi(batch, capsys):
    from pipeline.cli import main

    tmp, manifest, config, store = batch
    refs = dict(chain_from_plan(find_job(manifest, config, "a")))
    before = json.loads(store.sidecar_path(refs["denoise-high"]).read_text())
    assert main(["rerun", "--job", "a", "--stage", "denoise-high", "--manifest", manifest, "--config", config,
                 "--store", str(store.root), "--no-run"]) == 0
    assert not any(store.is_complete(refs[n]) for n in ("denoise-high", "denoise-low", "decode"))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "luigi", "--module", "pipeline", "RunStage", "--manifest", manifest,
           "--config", config, "--job-id", "a", "--stage", "denoise-high", "--store", str(store.root)]
    proc = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    after = json.loads(store.sidecar_path(refs["denoise-high"]).read_text())
    assert after["sha256"] == before["sha256"] and after["run_id"] == ""  # run directly: no run id
    assert not store.is_complete(refs["denoise-low"]) and not store.is_complete(refs["decode"])  # just that stage
    # an unknown stage is refused by Luigi with a non-zero exit
    bad = subprocess.run(cmd[:-4] + ["--stage", "denoise-middle", "--store", str(store.root)], cwd=tmp, env=env,
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode != 0 and "has no stage 'denoise-middle'" in bad.stdout + bad.stderr
