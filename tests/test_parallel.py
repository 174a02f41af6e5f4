"""Multi-process runs on CPU (gloo): sequence-parallel (Ulysses) and CFG-parallel Denoise equal the single
process, through the staged pipeline too (a torchrun rank group started by the Denoise task); data-parallel
`wan-batch workers` (two Luigi workers on one luigid) computes each artifact once and gives the same videos
as one worker.

Tolerance: the parallel outputs are compared with the single-process ones at 1e-6 of the output's largest
magnitude (DiT) and 1e-5 absolute (latents after a whole expert); on CPU they have been bit-identical (max abs
diff 0.0), because every rank runs the same kernels on whole rows and whole heads."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from pipeline.tiny import DIT_CONFIG

from conftest import REPO, read_results, run_batch, write_config, write_manifest

PROMPT = "a red circle moving left on a blue background"
SMALL = {"num_frames": 5, "infer_steps": 2, "height": 32, "width": 32}  # 32 DiT tokens (2 latent frames of 4x4)
TEXT = {"text_len": 32}


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


def torchrun(nproc: int, module: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", "-m", module,
           *args]
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=timeout)


# -- config --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, message", [
    ({"seq_p_size": 0}, "parallel.seq_p_size': must be a positive integer"),
    ({"cfg_p_size": 3}, "must be 1 or 2"),
    ({"seq_p_size": 2, "seq_p_attn_type": "ring"}, "only 'ulysses' is implemented"),
    (True, "give the layout"),
])
def test_bad_parallel_config_is_refused(value, message):
    from pipeline.config import parse_config
    from pipeline.errors import ConfigError

    with pytest.raises(ConfigError, match=re.escape(message)):
        parse_config({"parallel": value})


def test_cfg_parallel_with_cfg_off_runs_the_single_prediction(caplog):
    """LightX2V: cfg_parallel = enable_cfg and cfg_p_size > 1, so its CFG-off distill configs with cfg_p_size 2
    run; here the Denoise runs on seq_p_size GPUs (issue 17)."""
    from pipeline.config import parse_config

    caplog.set_level("WARNING")
    cfg = parse_config({"parallel": {"seq_p_size": 2, "cfg_p_size": 2}, "enable_cfg": False})
    assert cfg["parallel"] == {"seq_p_size": 2, "cfg_p_size": 1}
    assert any("cfg_p_size 2 with CFG off" in r.getMessage() for r in caplog.records)
    assert parse_config({"parallel": {"seq_p_size": 2, "cfg_p_size": 2}, "enable_cfg": True})["parallel"]["cfg_p_size"] == 2
    assert parse_config({"parallel": {"seq_p_size": 2, "cfg_p_size": 2}})["parallel"]["seq_p_size"] == 2


def test_parallel_layout_reaches_the_denoise_runtime_only(tmp_path, tiny_root):
    """`parallel` travels in the Denoise spec's runtime, not its cache key: a parallel run reuses (and
    produces) the same artifacts as a single-process one."""
    from pipeline.config import load_config
    from pipeline.manifest import read_manifest
    from pipeline.plan import plan_jobs

    manifest = write_manifest(tmp_path / "m.parquet", [{"prompt": PROMPT, "seed": 1, **SMALL}])
    keys = {}
    for name, par in (("single", None), ("seq2", {"seq_p_size": 2})):
        cfg = load_config(write_config(tmp_path / f"{name}.json", parallel=par))
        plan = plan_jobs(read_manifest(manifest, cfg), cfg)[0]
        keys[name] = {n: s.key for n, s in plan.stages().items()}
        if par:
            assert plan.stages()["denoise-high"].runtime["parallel"] == par
    assert keys["single"] == keys["seq2"]


def test_worker_device_groups():
    from pipeline.workers import device_groups

    assert device_groups(["0", "1", "2", "3"], 1) == ["0", "1", "2", "3"]
    assert device_groups(["0", "1", "2", "3"], 2) == ["0,1", "2,3"]
    assert device_groups(["cpu", "cpu"], 1) == ["", ""]
    for gpus, per, msg in ((["0", "1", "2"], 2, "do not split"), (["0", "0"], 1, "twice"),
                           (["0", "cpu"], 1, "mix"), (["x"], 1, "not a GPU")):
        with pytest.raises(ValueError, match=msg):
            device_groups(gpus, per)


# -- the DiT on two ranks -------------------------------------------------------------------------------------

@pytest.mark.slow
def test_dit_sequence_and_cfg_parallel_equal_single_process(tmp_path):
    """Two gloo ranks: Ulysses (2x1) and CFG parallel (1x2) guided predictions vs one process, on the tiny
    architecture with random weights, 9 frames at 48x64: 3 latent frames of 6x8, one token per latent pixel per
    patch."""
    out = tmp_path / "check.json"
    proc = torchrun(2, "pipeline.parallel.check", "--layouts", "2x1,1x2", "--frames", "9", "--height", "48",
                    "--width", "64", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(out.read_text())["results"]
    assert [r["layout"] for r in results] == [{"seq_p_size": 2, "cfg_p_size": 1}, {"seq_p_size": 1, "cfg_p_size": 2}]
    for r in results:
        _, ph, pw = DIT_CONFIG["patch_size"]
        assert r["tokens"] == 3 * (6 // ph) * (8 // pw) and r["ref_abs_max"] > 0.1
        assert r["max_rel_diff"] <= 1e-6, r


# -- the staged pipeline with torchrun Denoise tasks ---------------------------------------------------------

def _sidecars(store: Path, stage: str) -> list[Path]:
    return [p for p in (store / stage).glob("*/*.json") if p.name.count(".") == 1]  # not <key>.failed.json


def _latents(store: Path, stage: str) -> torch.Tensor:
    from safetensors.torch import load_file

    (path,) = (store / stage).glob("*/*.safetensors")
    return load_file(path)["latents"]


@pytest.fixture(scope="module")
def single_run(tmp_path_factory, tiny_root):
    tmp = tmp_path_factory.mktemp("single")
    manifest = write_manifest(tmp / "m.parquet", [{"job_id": "v", "prompt": PROMPT, "seed": 5, **SMALL}])
    assert run_batch(manifest, tmp, config=write_config(tmp / "c.json", **TEXT))
    return manifest, tmp


@pytest.mark.slow
@pytest.mark.parametrize("layout", [{"seq_p_size": 2}, {"cfg_p_size": 2}], ids=["seq2", "cfg2"])
def test_torchrun_denoise_gives_the_same_video(single_run, tmp_path, layout):
    from pipeline.parallel import launch
    from pipeline.parallel.layout import ParallelLayout

    manifest, ref = single_run
    assert run_batch(manifest, tmp_path, config=write_config(tmp_path / "c.json", parallel=layout, **TEXT))
    # one rank group (one torchrun) served both experts' tasks and is kept for the next ones
    group = launch._GROUP
    assert group is not None and group.alive() and group.layout == ParallelLayout.from_value(layout)
    assert group.tasks == 2
    for stage in ("denoise-high", "denoise-low"):
        (side,) = _sidecars(tmp_path / "store", stage)
        assert json.loads(side.read_text())["parallel"]["layout"] == {"seq_p_size": 1, "cfg_p_size": 1, **layout}
        torch.testing.assert_close(_latents(tmp_path / "store", stage), _latents(ref / "store", stage),
                                   atol=1e-5, rtol=0)
    assert (tmp_path / "outputs" / "v.mp4").read_bytes() == (ref / "outputs" / "v.mp4").read_bytes()


@pytest.mark.slow
def test_a_failing_rank_fails_the_row_with_its_reason(tmp_path, tiny_root):
    """seq_p_size=3 divides neither the tiny model's 4 heads nor the 16 DiT tokens of 1 frame at 32x32 (4x4 latent
    pixels, one token each): the row fails, naming why; the batch still writes results.parquet. (Sizes are
    multiples of 16 and the patch is 1x1, so every video's token count is even: 2 ranks always divide it.)"""
    manifest = write_manifest(tmp_path / "m.parquet", [{"job_id": "odd", "prompt": PROMPT, "seed": 1,
                                                        "num_frames": 1, "height": 32, "width": 32,
                                                        "infer_steps": 2}])
    config = write_config(tmp_path / "c.json", parallel={"seq_p_size": 3}, **TEXT)
    assert not run_batch(manifest, tmp_path, config=config)
    row = read_results(tmp_path / "outputs")["odd"]
    assert row["status"] == "failed"
    assert "seq_p_size=3 must divide the model's 4 attention heads and the video's 16 DiT tokens" in row["error"]


# -- data parallel: wan-batch workers ------------------------------------------------------------------------

ROWS = [{"job_id": f"j{i}", "prompt": ["a red circle moving left", "a blue square moving up",
                                       "a green triangle moving right"][i % 3], "seed": 100 + i, **SMALL}
        for i in range(6)]
RUNNING = re.compile(r"running\s+(\w+)\((?:key=([0-9a-f]+))?")


@pytest.mark.slow
def test_two_cpu_workers_on_luigid(tmp_path, tiny_root):
    manifest = write_manifest(tmp_path / "m.parquet", ROWS)
    config = write_config(tmp_path / "c.json", **TEXT)
    ref = tmp_path / "one"
    assert run_batch(manifest, ref, config=config)
    two = tmp_path / "two"
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "workers", "--manifest", str(manifest),
                           "--config", str(config), "--gpus", "cpu,cpu", "--output-dir", str(two / "outputs"),
                           "--store", str(two / "store")],
                          env=_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "6 of 6 rows ok" in proc.stdout
    ran: Counter = Counter()
    per_worker = []
    for log in sorted((two / "outputs" / "worker-logs").glob("worker-*.log")):
        tasks = [m.groups() for m in RUNNING.finditer(log.read_text()) if m.group(1) != "tasks"]
        per_worker.append([t for t in tasks if t[0] != "RunManifest"])
        ran.update(tasks)
    assert len(per_worker) == 2 and all(per_worker), "both workers ran stage tasks"
    assert max(ran.values()) == 1, [t for t, n in ran.items() if n > 1]  # no task ran twice
    expected = {"EncodeText": 4, "Denoise": 12, "DecodeVideo": 6, "RunManifest": 1}  # 3 prompts + the negative
    assert Counter(t[0] for t in ran) == expected
    for stage, n in (("text", 4), ("denoise-high", 6), ("denoise-low", 6), ("decode", 6)):
        assert len(_sidecars(two / "store", stage)) == n
    for row in ROWS:
        assert (two / "outputs" / f"{row['job_id']}.mp4").read_bytes() == \
            (ref / "outputs" / f"{row['job_id']}.mp4").read_bytes()
