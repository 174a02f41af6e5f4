"""The product's command needs no --local-scheduler; a scheduler host in the user's Luigi config still wins."""
from __future__ import annotations

import os
import socket
import subprocess
import sys

from conftest import REPO, write_manifest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _luigi_run(tmp_path, env_extra):
    manifest = write_manifest(tmp_path / "m.parquet", [{"prompt": "x", "num_frames": 5, "infer_steps": 2}])
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "-m", "luigi", "--module", "pipeline", "RunManifest", "--manifest",
                           str(manifest), "--output-dir", str(tmp_path / "o"), "--store", str(tmp_path / "s")],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=600)


def test_configured_scheduler_host_is_used(tmp_path):
    """With a host configured (and nothing listening there), Luigi must try that luigid, not run locally."""
    port = _free_port()
    cfg = tmp_path / "luigi.cfg"
    cfg.write_text(f"[core]\ndefault_scheduler_host=127.0.0.1\ndefault_scheduler_port={port}\n"
                   "rpc_retry_attempts=1\nrpc_retry_wait=1\n")
    proc = _luigi_run(tmp_path, {"LUIGI_CONFIG_PATH": str(cfg)})
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert f"127.0.0.1:{port}" in log or "Connection refused" in log or "Failed connecting" in log, log[-2000:]
    assert not (tmp_path / "o" / "results.parquet").exists()


def test_import_sets_local_scheduler_and_retcodes():
    code = ("import luigi.configuration as c, pipeline; cfg = c.get_config(); "
            "print(cfg.getboolean('core', 'local_scheduler'), cfg.getint('retcode', 'task_failed'))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env={**os.environ, "LUIGI_CONFIG_PATH": os.devnull})
    assert out.stdout.split() == ["True", "30"], out.stderr


def test_import_makes_idle_workers_poll_every_fifth_of_a_second_unless_configured(tmp_path):
    code = "import pipeline, luigi.worker as w; c = w.worker(); print(c.wait_interval, c.wait_jitter)"

    def polling(config: str) -> list[str]:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                             env={**os.environ, "LUIGI_CONFIG_PATH": config})
        return out.stdout.split() or [out.stderr]

    assert polling(os.devnull) == ["0.2", "0.0"]
    cfg = tmp_path / "luigi.cfg"
    cfg.write_text("[worker]\nwait_interval=3\nwait_jitter=1\n")
    assert polling(str(cfg)) == ["3.0", "1.0"]  # the user's config wins


def test_module_tasks_works_as_well_as_module_pipeline():
    for module in ("tasks", "pipeline"):
        code = f"import {module}, luigi.task_register as r; print(r.Register.get_task_cls('RunManifest').__module__)"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
        assert out.stdout.strip() == "tasks.run_manifest", out.stderr
