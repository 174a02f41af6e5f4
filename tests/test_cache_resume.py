"""Cache, resume and residency: one text artifact per distinct prompt, a seed change re-runs only denoise and
decode, a SIGKILLed run resumes to byte-identical MP4s, a truncated artifact is recomputed, and each model is
loaded once for a whole multi-row batch."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO, read_results, run_batch, write_manifest
from pipeline.runtime import MODELS
from pipeline.store import ArtifactStore


def artifacts(store: Path, stage: str) -> list[Path]:
    return sorted((store / stage).glob("*/*.json")) if (store / stage).exists() else []


def test_identical_prompts_are_encoded_once(tmp_path, tiny_root):
    rows = [{"job_id": f"j{i}", "prompt": "a red circle moving left", "seed": i} for i in range(3)]
    rows.append({"job_id": "other", "prompt": "a blue square moving up", "seed": 0})
    assert run_batch(write_manifest(tmp_path / "m.parquet", rows), tmp_path)
    texts = [p for p in artifacts(tmp_path / "store", "text") if not p.name.endswith(".failed.json")]
    assert len(texts) == 3  # two distinct prompts + the shared (empty) negative prompt
    assert len(artifacts(tmp_path / "store", "decode")) == 4
    results = read_results(tmp_path / "outputs")
    assert all(r["status"] == "ok" and Path(r["video"]).is_file() for r in results.values())


def test_seed_change_reruns_only_denoise_and_decode(tmp_path, tiny_root):
    store = tmp_path / "store"
    first = write_manifest(tmp_path / "a.parquet", [{"job_id": "a", "prompt": "a green triangle", "seed": 1}])
    assert run_batch(first, tmp_path, output_dir=tmp_path / "out_a", store=store)
    second = write_manifest(tmp_path / "b.parquet", [{"job_id": "b", "prompt": "a green triangle", "seed": 2}])
    assert run_batch(second, tmp_path, output_dir=tmp_path / "out_b", store=store)
    row = read_results(tmp_path / "out_b")["b"]
    assert sorted(row["cached_stages"]) == ["text", "text-negative"]
    assert len(artifacts(store, "denoise-high")) == 2 and len(artifacts(store, "decode")) == 2

    # Same manifest again: everything is a cache hit and the video is the same file content.
    assert run_batch(second, tmp_path, output_dir=tmp_path / "out_b2", store=store)
    again = read_results(tmp_path / "out_b2")["b"]
    assert set(again["cached_stages"]) == {"text", "text-negative", "denoise-high", "denoise-low", "decode"}
    assert Path(again["video"]).read_bytes() == Path(row["video"]).read_bytes()


def _luigi(manifest: Path, out: Path, store: Path, env: dict) -> subprocess.Popen:
    # Exactly the product's command: no --local-scheduler, no luigid running.
    cmd = [sys.executable, "-m", "luigi", "--module", "pipeline", "RunManifest", "--manifest", str(manifest),
           "--output-dir", str(out), "--store", str(store)]
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_sigkill_mid_stage_then_resume_gives_identical_videos(tmp_path, tiny_root):
    rows = [{"job_id": f"v{i}", "prompt": f"a red circle moving left number {i % 2}", "seed": i} for i in range(4)]
    manifest = write_manifest(tmp_path / "m.parquet", rows)
    env = dict(os.environ)

    ref = _luigi(manifest, tmp_path / "ref_out", tmp_path / "ref_store", env)
    assert ref.wait(timeout=600) == 0, ref.stdout.read()

    store = tmp_path / "store"
    victim = _luigi(manifest, tmp_path / "out", store, env)
    deadline = time.time() + 300
    while time.time() < deadline and len(artifacts(store, "denoise-high")) < 2:
        time.sleep(0.05)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "out" / "results.parquet").exists(), "killed before the end: nothing published"
    assert len(artifacts(store, "decode")) < len(rows)

    resumed = _luigi(manifest, tmp_path / "out", store, env)
    output = resumed.communicate(timeout=600)[0]
    assert resumed.returncode == 0, output
    results = read_results(tmp_path / "out")
    for job in rows:
        ours = Path(results[job["job_id"]]["video"]).read_bytes()
        assert ours == (tmp_path / "ref_out" / f"{job['job_id']}.mp4").read_bytes()
    assert any("text" in r["cached_stages"] for r in results.values()), "work done before the kill was reused"
    assert not list(store.rglob("*.tmp*")), "no temp file is left after a clean finish"


def test_truncated_artifact_is_detected_and_recomputed(tmp_path, tiny_root, caplog):
    manifest = write_manifest(tmp_path / "m.parquet", [{"job_id": "t", "prompt": "a white square", "seed": 5}])
    assert run_batch(manifest, tmp_path)
    video = (tmp_path / "outputs" / "t.mp4").read_bytes()
    # A half-written latents file and video must never be trusted. (An intermediate whose downstream artifact
    # is intact is never read, so it is only checked when needed: here the video is damaged too.)
    latents = next((tmp_path / "store" / "denoise-low").glob("*/*.safetensors"))
    mp4 = next((tmp_path / "store" / "decode").glob("*/*.mp4"))
    for payload in (latents, mp4):
        payload.write_bytes(payload.read_bytes()[:100])

    from tasks.stages import _STORES

    _STORES.clear()  # a new process would not have the integrity check memoised
    caplog.set_level("WARNING")
    assert run_batch(manifest, tmp_path, output_dir=tmp_path / "out2")
    for payload in (latents, mp4):
        assert any(payload.stem[:12] in r.getMessage() and "corrupt" in r.getMessage() for r in caplog.records)
        assert ArtifactStore(tmp_path / "store").check(_ref_of(payload))[0]
    row = read_results(tmp_path / "out2")["t"]
    assert "denoise-low" not in row["cached_stages"] and "denoise-high" in row["cached_stages"]
    assert (tmp_path / "out2" / "t.mp4").read_bytes() == video


def _ref_of(payload: Path):
    from pipeline.store import ArtifactRef

    return ArtifactRef(payload.parent.parent.name, payload.stem, payload.suffix[1:])


def test_twenty_rows_load_each_model_once(tmp_path, tiny_root):
    rows = [{"job_id": f"r{i:02d}", "prompt": f"shape number {i % 5}", "seed": i, "infer_steps": 2, "num_frames": 5}
            for i in range(20)]
    rows[3]["image"] = None
    MODELS.clear()
    assert run_batch(write_manifest(tmp_path / "m.parquet", rows), tmp_path)
    assert len(read_results(tmp_path / "outputs")) == 20
    components = sorted(key[0] for key in MODELS.loads)
    assert components == ["high", "low", "text", "vae"]
    assert all(count == 1 for count in MODELS.loads.values()), MODELS.loads
