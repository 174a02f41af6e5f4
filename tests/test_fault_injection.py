"""SIGKILL a 6-row batch at 21 points spread over every stage (mid-write of payloads and sidecars, while
ffmpeg muxes, while publishing), re-run it, and require: the batch completes, every MP4 is byte-identical to
an uninterrupted run, every artifact verifies, and no temp file is left.

Each run is a forked child of one helper process that imported torch/diffusers/Luigi once (an import costs
~10 s of CPU here, a fork nothing); the child arms pipeline.faults with WAN_BATCH_FAULT and SIGKILLs itself at
the named point, exactly as `kill -9` would. The helper runs no torch op before forking, and every run uses
one intra-op thread (the tiny model's ops are too small to gain from more; on a busy 2-core machine two
threads spin against each other and a batch takes twice as long).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import make_image, read_results, write_config, write_manifest

pytestmark = pytest.mark.slow

TESTS = Path(__file__).resolve().parent

# (stage, n-th hit in the killed process, where). Luigi runs stages in order (text, image, denoise-high,
# denoise-low, decode, publish), so every point below is reached in a fresh store; n spreads them over jobs.
KILL_POINTS = [
    ("text", 1, "start"),
    ("text", 2, "before-write"),
    ("text", 3, "payload-partial"),
    ("text", 4, "payload-written"),
    ("text", 5, "sidecar-partial"),
    ("text", 6, "committed"),
    ("image", 1, "payload-partial"),
    ("image", 2, "committed"),
    ("denoise-high", 1, "step"),
    ("denoise-high", 3, "payload-partial"),
    ("denoise-high", 4, "sidecar-partial"),
    ("denoise-high", 6, "committed"),
    ("denoise-low", 2, "start"),
    ("denoise-low", 4, "step"),
    ("denoise-low", 5, "payload-written"),
    ("decode", 1, "mux"),
    ("decode", 3, "queued"),  # the 3rd video handed to the background writer, earlier ones maybe still encoding
    ("decode", 3, "payload-partial"),
    ("decode", 6, "committed"),
    ("publish", 3, "payload-partial"),
    ("results", 1, "payload-partial"),
]

# The helper process: reads one JSON job per line, forks a child per job, answers how the child ended.
SERVER = r"""
import json, os, sys, traceback
proto = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)  # whatever the batch prints goes to the log, not into the protocol
sys.path.insert(0, sys.argv[1])
import pipeline, tasks
from pipeline import faults
from tasks.build import run_batch
from pipeline.tiny import ensure_tiny_models
ensure_tiny_models()
# Warm a pure-Python cache transformers builds on every first model load (~1 s of regexes): not a torch op.
from transformers.conversion_mapping import get_checkpoint_conversion_mapping
get_checkpoint_conversion_mapping("umt5")
proto.write("ready\n"); proto.flush()
for line in sys.stdin:
    job = json.loads(line)
    pid = os.fork()
    if pid == 0:
        code = 3
        try:
            faults.configure(job["fault"])
            code = 0 if run_batch(job["manifest"], job["config"], job["out"], job["store"]) else 1
        except BaseException:
            traceback.print_exc()
        finally:
            sys.stdout.flush(); sys.stderr.flush()
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else None
    proto.write(json.dumps({"signal": sig, "code": code}) + "\n"); proto.flush()
"""


class BatchRunner:
    def __init__(self, log: Path):
        self.log = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-c", SERVER, str(TESTS)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=self.log, text=True,
                                     env={**os.environ, "WAN_BATCH_FAULT": "", "OMP_NUM_THREADS": "1"})
        assert self.proc.stdout.readline().strip() == "ready", f"helper failed, see {log}"

    def run(self, manifest: Path, config: Path, out: Path, store: Path, fault: str = "") -> dict:
        job = {"manifest": str(manifest), "config": str(config), "out": str(out), "store": str(store),
               "fault": fault}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)
        self.log.close()


@pytest.fixture(scope="module")
def batch(tmp_path_factory, tiny_root):
    tmp = tmp_path_factory.mktemp("faults")
    images = [make_image(tmp / f"first{i}.png", size=(48, 40), color=c)
              for i, c in enumerate([(250, 0, 0), (0, 250, 0)])]
    rows = [
        {"job_id": "t0", "prompt": "a red circle moving left", "seed": 1},
        {"job_id": "t1", "prompt": "a blue square", "seed": 2},
        {"job_id": "t2", "prompt": "a red circle moving left", "seed": 3},  # shares t0's text artifact
        {"job_id": "t3", "prompt": "a cat on the beach", "seed": 4},
        {"job_id": "i4", "prompt": "a dog", "seed": 5, "image": str(images[0])},
        {"job_id": "i5", "prompt": "a car moving right", "seed": 6, "image": str(images[1])},
    ]
    manifest = write_manifest(tmp / "jobs.parquet", rows)
    # Explicit: 4 steps split 2 + 2 between the experts; CFG on, so the empty negative prompt is a 6th text.
    config = write_config(tmp / "config.json", infer_steps=4, target_video_length=5, target_height=32,
                          target_width=32, text_len=64, enable_cfg=True, boundary=0.875, sample_shift=5.0)
    runner = BatchRunner(tmp / "batches.log")
    ref = runner.run(manifest, config, tmp / "ref" / "out", tmp / "ref" / "store")
    assert ref == {"signal": None, "code": 0}, f"reference run failed, see {tmp / 'batches.log'}"
    yield {"tmp": tmp, "manifest": manifest, "config": config, "runner": runner, "ref": tmp / "ref"}
    runner.close()


def temp_files(*folders: Path) -> list[Path]:
    return [p for folder in folders for p in folder.rglob("*") if ".tmp" in p.name]


def artifacts(store: Path) -> dict[str, bytes]:
    """relative path -> bytes of every payload and the list of sidecars (their bytes hold times)."""
    out = {}
    for p in store.rglob("*"):
        if p.suffix in (".safetensors", ".mp4") and not p.name.startswith("."):
            out[str(p.relative_to(store))] = p.read_bytes()
    return out


def wait_for_orphans(marker: str, timeout: float = 30) -> None:
    """A kill during muxing orphans the ffmpeg child, which finishes on its own; wait for it to exit."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        alive = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    if marker.encode() in (proc / "cmdline").read_bytes():
                        alive.append(proc.name)
                except OSError:
                    pass
        if not alive:
            return
        time.sleep(0.05)
    raise AssertionError(f"processes writing into {marker} still run after {timeout}s")


def state_after_kill(store: Path, out: Path, stage: str, where: str) -> None:
    """What the kill must have left behind: proof that it hit where it was meant to."""
    if where in ("payload-partial", "sidecar-partial", "mux"):
        folder = out if stage in ("publish", "results") else store / stage
        left = temp_files(folder)
        assert left, f"a kill at {stage}:{where} should leave a temp file in {folder}"
    if where == "payload-partial" and stage not in ("publish", "results"):
        # the half-written temp file is there, and nothing vouches for it
        assert all(p.stat().st_size > 0 for p in temp_files(store / stage))
    if where == "payload-written":
        payloads = {p.stem for p in (store / stage).rglob("*.safetensors") if not p.name.startswith(".")}
        sidecars = {p.stem for p in (store / stage).rglob("*.json") if not p.name.startswith(".")}
        assert payloads - sidecars, "a payload without its sidecar should be left"


@pytest.mark.parametrize("stage,n,where", KILL_POINTS, ids=[f"{s}:{n}:{w}" for s, n, w in KILL_POINTS])
def test_kill_and_resume_gives_identical_videos(batch, stage, n, where):
    work = batch["tmp"] / f"{stage}-{n}-{where}"
    store, out = work / "store", work / "out"
    runner = batch["runner"]

    killed = runner.run(batch["manifest"], batch["config"], out, store, fault=f"{stage}:{n}:{where}")
    assert killed["signal"] == signal.SIGKILL, f"the batch was not killed at {stage}:{n}:{where}: {killed}"
    if where == "mux":
        wait_for_orphans(str(store))
    state_after_kill(store, out, stage, where)

    resumed = runner.run(batch["manifest"], batch["config"], out, store)
    assert resumed == {"signal": None, "code": 0}

    results = read_results(out)
    assert len(results) == 6 and all(r["status"] == "ok" for r in results.values()), results
    ref_out = batch["ref"] / "out"
    for job_id in results:
        assert (out / f"{job_id}.mp4").read_bytes() == (ref_out / f"{job_id}.mp4").read_bytes(), job_id
    # the store holds exactly the reference's artifacts, byte for byte, each vouched for by its sidecar
    assert artifacts(store) == artifacts(batch["ref"] / "store")
    from pipeline.store import ArtifactRef, ArtifactStore

    checker = ArtifactStore(store)
    for rel in artifacts(store):
        path = Path(rel)
        ok, reason = checker.check(ArtifactRef(path.parts[0], path.stem, path.suffix[1:]))
        assert ok, reason
    assert temp_files(store, out) == []
    # a video killed mid-encode or mid-publish never shows up half-written under its final name
    assert not [p for p in out.iterdir() if p.suffix == ".mp4" and p.stem not in results]


def test_kill_with_encodes_pending_redecodes_only_those(batch):
    """Killed right after the third video was handed to the background writer: the videos whose encode had
    not ended are not in the store (no sidecar; at most a temp file), nothing is published, and the resumed
    run decodes exactly those again and reuses the others, to the uninterrupted run's bytes."""
    work = batch["tmp"] / "decode-queued-resume"
    store, out = work / "store", work / "out"
    runner = batch["runner"]
    killed = runner.run(batch["manifest"], batch["config"], out, store, fault="decode:3:queued")
    assert killed["signal"] == signal.SIGKILL, killed
    wait_for_orphans(str(store))
    from pipeline.store import ArtifactRef, ArtifactStore

    checker = ArtifactStore(store)
    sidecars = {p.stem: p.read_bytes() for p in (store / "decode").rglob("*.json")
                if not p.name.startswith(".") and not p.name.endswith(".failed.json")}
    assert all(checker.check(ArtifactRef("decode", key, "mp4"))[0] for key in sidecars)  # whole or absent
    videos = {p.stem for p in (store / "decode").rglob("*.mp4") if not p.name.startswith(".")}
    assert videos == set(sidecars)  # no payload without its sidecar
    assert len(sidecars) <= 2  # the third (and maybe the first two) were still pending
    assert not out.exists() or not [p for p in out.iterdir() if p.suffix == ".mp4"]

    resumed = runner.run(batch["manifest"], batch["config"], out, store)
    assert resumed == {"signal": None, "code": 0}
    results = read_results(out)
    assert all(r["status"] == "ok" for r in results.values()), results
    for job_id in results:
        assert (out / f"{job_id}.mp4").read_bytes() == (batch["ref"] / "out" / f"{job_id}.mp4").read_bytes()
    assert sum("decode" in r["cached_stages"] for r in results.values()) == len(sidecars)
    for key, side in sidecars.items():  # the finished ones were reused, not written again
        assert next((store / "decode").rglob(f"{key}.json")).read_bytes() == side
    assert sum("denoise-low" in r["cached_stages"] for r in results.values()) == 6  # only decode re-ran
    assert temp_files(store, out) == []


def test_fault_spec_is_validated():
    from pipeline import faults

    for bad in ("text", "text:0:start", "text:x:start", "text:1:nowhere", "text:1:start:explode"):
        with pytest.raises(ValueError, match="WAN_BATCH_FAULT"):
            faults.configure(bad)
    faults.configure("")
    assert faults._armed is None
