"""Two Luigi workers (two processes, --workers 1 each) on one luigid, the same manifest and one shared store:
every stage task runs exactly once (in one of the two), no artifact is corrupted, the batch completes, both
processes exit 0, and luigid holds each task's progress (status message, percentage) as its web UI shows it."""
from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time

import pytest

from conftest import REPO, read_results, write_config, write_manifest

SMALL = dict(target_height=32, target_width=32, target_video_length=5, infer_steps=4, text_len=32)
RUNNING = re.compile(r"Worker\(.*pid=(\d+)\) running\s+((\w+)\(.*\))\s*$")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout: float, what: str, interval: float = 0.5):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def test_stage_tasks_claim_the_configured_gpu_resource():
    import luigi.configuration

    from pipeline.plan import StageSpec
    from tasks.stages import task_for

    spec = StageSpec("text", {"prompt": "x"}, model={"task": "t2v"}, runtime={})
    task = task_for(spec, "store")
    assert task.resources == {"gpu": 1}
    cfg = luigi.configuration.get_config()
    assert not cfg.has_section("wan_batch")
    cfg.add_section("wan_batch")
    cfg.set("wan_batch", "gpu_resource", "gpu_a100")
    cfg.set("wan_batch", "gpu_per_task", "0")
    try:
        assert task.resources == {}
        cfg.set("wan_batch", "gpu_per_task", "2")
        assert task.resources == {"gpu_a100": 2}
    finally:
        cfg.remove_section("wan_batch")
    assert task.resources == {"gpu": 1}


@pytest.mark.slow
def test_two_workers_on_luigid_share_one_batch(tmp_path, tiny_root):
    from luigi.rpc import RemoteScheduler

    from pipeline.config import load_config
    from pipeline.inspect import read_video
    from pipeline.manifest import read_manifest
    from pipeline.plan import plan_jobs
    from pipeline.store import ArtifactStore
    from tasks.stages import task_for

    config = write_config(tmp_path / "config.json", **SMALL)
    manifest = write_manifest(tmp_path / "jobs.parquet", [
        {"job_id": f"job{i}", "prompt": p, "seed": i}
        for i, p in enumerate(["a red circle moving left", "a blue square moving right", "a green dog running"])])
    store, out = tmp_path / "store", tmp_path / "outputs"
    plans = plan_jobs(read_manifest(manifest, load_config(config)), load_config(config))
    specs = {s.key: s for p in plans for s in p.decode.chain()}

    # luigid starts with no 'gpu' available: both workers schedule the whole batch first, then the gate opens
    # (gpu=2: two stage tasks at once, one per worker) and they compete for the same tasks.
    port = free_port()
    (tmp_path / "luigid.cfg").write_text("[resources]\ngpu=0\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    luigid_log = open(tmp_path / "luigid.log", "w")
    luigid = subprocess.Popen(
        [sys.executable, "-c", "from luigi.cmdline import luigid; luigid()", "--address", "127.0.0.1",
         "--port", str(port), "--state-path", str(tmp_path / "luigid-state.pickle")],
        env=dict(env, LUIGI_CONFIG_PATH=str(tmp_path / "luigid.cfg")), stdout=luigid_log, stderr=subprocess.STDOUT)
    workers, logs = [], []
    try:
        sched = RemoteScheduler(f"http://127.0.0.1:{port}", connect_timeout=5)

        def up():
            try:
                sched.ping(worker="test")
                return True
            except Exception:
                return False

        wait_for(up, 60, "luigid to accept connections")
        cmd = [sys.executable, "-m", "luigi", "--module", "pipeline", "RunManifest", "--manifest", str(manifest),
               "--config", str(config), "--store", str(store), "--output-dir", str(out), "--run-id", "shared-run",
               "--workers", "1", "--worker-keep-alive", "--no-lock", "--scheduler-host", "127.0.0.1",
               "--scheduler-port", str(port), "--retcode-not-run", "0", "--retcode-already-running", "0"]
        for name in ("a", "b"):
            logs.append(tmp_path / f"worker-{name}.log")
            workers.append(subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=open(logs[-1], "w"),
                                            stderr=subprocess.STDOUT))

        def both_scheduled():
            ws = [w for w in sched.worker_list() if w["name"] != "test"]
            return len(ws) == 2 and all(w["num_pending"] >= len(specs) for w in ws)

        wait_for(both_scheduled, 300, "both workers to schedule the batch", interval=1)
        sched.update_resource("gpu", 2)
        for w in workers:
            w.wait(timeout=600)
        codes = [w.returncode for w in workers]
        texts = [p.read_text() for p in logs]
        assert codes == [0, 0], "\n\n".join(t[-3000:] for t in texts)

        ran: dict[str, list[int]] = {}
        for text in texts:
            for line in text.splitlines():
                m = RUNNING.search(line)
                if m:
                    ran.setdefault(m.group(2), []).append(int(m.group(1)))
        twice = {t: pids for t, pids in ran.items() if len(pids) > 1}
        assert not twice, f"tasks run more than once: {twice}"
        pids = {p for v in ran.values() for p in v}
        assert len(pids) == 2, f"both workers should have run tasks: {ran}"
        stage_runs = {re.search(r"key=([0-9a-f]{64})", t).group(1): v[0] for t, v in ran.items()
                      if not t.startswith("RunManifest")}
        assert set(stage_runs) == set(specs)  # every stage task ran, once, in one of the two workers
        assert sum(t.startswith("RunManifest") for t in ran) == 1

        artifacts = ArtifactStore(store)
        for key, spec in specs.items():
            ok, reason = artifacts.check(spec.ref)  # size and sha256 against the sidecar
            assert ok, f"{spec.stage} {key[:12]}: {reason}"
            side = artifacts.sidecar(spec.ref)
            assert side["run_id"] == "shared-run" and side["pid"] == stage_runs[key]  # computed where Luigi ran it
            msg = sched.get_task_status_message(task_for(spec, str(store)).task_id)["statusMessage"]
            assert msg.startswith(f"{spec.stage} {key[:12]}: done"), msg
            pct = sched.get_task_progress_percentage(task_for(spec, str(store)).task_id)["progressPercentage"]
            assert pct == 100
        results = read_results(out)
        assert {r["status"] for r in results.values()} == {"ok"} and len(results) == 3
        for r in results.values():
            assert read_video(out / f"{r['job_id']}.mp4").shape[0] == SMALL["target_video_length"]
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
                w.wait()
        luigid.terminate()
        try:
            luigid.wait(timeout=30)
        except subprocess.TimeoutExpired:
            luigid.kill()
            luigid.wait()
        luigid_log.close()
