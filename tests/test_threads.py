"""The CPU thread policy (pipeline/threads.py): cores from affinity and cgroup quotas, the user's choice
first, one thread for small models, and OpenMP told not to spin before torch loads it."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import threads

REPO = Path(__file__).resolve().parents[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY", threads.ENV)}
    env.update(extra)
    return env


def _python(code: str, **extra) -> str:
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO,
                         env=_env(**extra), timeout=300)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_cgroup_v2_quota_is_the_tightest_on_the_path(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("0::/outer/inner\n")
    root = tmp_path / "fs"
    (root / "outer" / "inner").mkdir(parents=True)
    (root / "cpu.max").write_text("max 100000\n")
    (root / "outer" / "cpu.max").write_text("150000 100000\n")  # 1.5 cores
    (root / "outer" / "inner" / "cpu.max").write_text("max 100000\n")
    assert threads.cgroup_cpu_limit(proc, root) == pytest.approx(1.5)
    (root / "outer" / "inner" / "cpu.max").write_text("50000 100000\n")
    assert threads.cgroup_cpu_limit(proc, root) == pytest.approx(0.5)


def test_cgroup_v2_unlimited_is_none(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("0::/\n")
    root = tmp_path / "fs"
    root.mkdir()
    (root / "cpu.max").write_text("max 100000\n")
    assert threads.cgroup_cpu_limit(proc, root) is None


def test_cgroup_v1_cfs_quota(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("4:memory:/x\n2:cpu,cpuacct:/docker/abc\n0::/\n")
    folder = tmp_path / "fs" / "cpu,cpuacct" / "docker" / "abc"
    folder.mkdir(parents=True)
    (folder / "cpu.cfs_quota_us").write_text("300000\n")
    (folder / "cpu.cfs_period_us").write_text("100000\n")
    assert threads.cgroup_cpu_limit(proc, tmp_path / "fs") == pytest.approx(3.0)
    (folder / "cpu.cfs_quota_us").write_text("-1\n")
    assert threads.cgroup_cpu_limit(proc, tmp_path / "fs") is None


def test_cgroup_v1_container_sees_its_cgroup_at_the_mount_root(tmp_path):
    proc = tmp_path / "cgroup"
    proc.write_text("3:cpu:/kubepods/pod1/c1\n")
    mount = tmp_path / "fs" / "cpu"
    mount.mkdir(parents=True)
    (mount / "cpu.cfs_quota_us").write_text("200000\n")
    (mount / "cpu.cfs_period_us").write_text("100000\n")
    assert threads.cgroup_cpu_limit(proc, tmp_path / "fs") == pytest.approx(2.0)


def test_usable_cores_follow_affinity_and_quota(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5})
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: None)
    assert threads.usable_cores() == 6
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 2.5)
    assert threads.usable_cores() == 2  # a third thread would be throttled half the time
    monkeypatch.setattr(threads, "cgroup_cpu_limit", lambda: 0.2)
    assert threads.usable_cores() == 1


def test_policy_one_thread_for_small_models_all_cores_for_large():
    assert threads.choose_threads(8, None) == 8
    assert threads.choose_threads(8, 5 * 2**20) == 1
    assert threads.choose_threads(8, 250 * 2**20) == 8


def test_user_choice_wins_and_bad_values_are_named():
    assert threads.user_threads({threads.ENV: "3"}) == 3
    assert threads.user_threads({}) is None
    with pytest.raises(ValueError, match="WAN_BATCH_THREADS='zero'"):
        threads.user_threads({threads.ENV: "zero"})
    with pytest.raises(ValueError, match="WAN_BATCH_THREADS='0'"):
        threads.user_threads({threads.ENV: "0"})
    assert threads.user_chose({"OMP_NUM_THREADS": "1"})
    assert threads.user_chose({"MKL_NUM_THREADS": "2"})
    assert not threads.user_chose({})


def test_wait_policy_is_set_before_torch_loads_openmp():
    """libgomp reads OMP_WAIT_POLICY when torch loads it: record the environment at that moment."""
    code = """
import os, sys
seen = {}
class Spy:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" and "policy" not in seen:
            seen["policy"] = os.environ.get("OMP_WAIT_POLICY")
        return None
sys.meta_path.insert(0, Spy())
import pipeline, torch
print(seen["policy"], torch.get_num_threads())
"""
    policy, n = _python(code).split()
    assert policy == "PASSIVE"
    assert int(n) == threads.usable_cores()
    assert _python(code, OMP_WAIT_POLICY="ACTIVE").split()[0] == "ACTIVE"  # the user's own setting stays


def test_thread_count_follows_the_models_and_the_user():
    code = """
import pipeline, torch
from pipeline import threads
threads.fit_to_model(5 * 2**20)      # the tiny model's size
small = torch.get_num_threads()
threads.fit_to_model(300 * 2**20)    # a real Wan component
print(small, torch.get_num_threads())
"""
    small, large = map(int, _python(code).split())
    assert small == 1
    assert large == threads.usable_cores()
    assert _python(code, WAN_BATCH_THREADS="3").split() == ["3", "3"]
    assert _python(code, OMP_NUM_THREADS="2").split() == ["2", "2"]  # torch's own reading of it stays


def test_tiny_model_run_uses_one_thread():
    """A model of the tiny model's size loaded through the model cache drops torch to one thread."""
    code = """
import pipeline, torch
from pipeline.runtime import MODELS
MODELS.get(("text", "f", "cpu"), lambda: torch.nn.Linear(256, 256), budget=2**30, estimate=0)
print(torch.get_num_threads())
"""
    assert _python(code) == "1"
