"""Scale benchmark: how scheduling cost grows with the manifest (issue 21). CPU only.

    python -m benchmarks.bench_scale --rows 1000,5000,20000,50000            # stubbed stages, waves
    python -m benchmarks.bench_scale --rows 1000 --wave-tasks 0              # everything up front (before)
    python -m benchmarks.bench_scale --rows 500 --real --compare-stub        # the stubs against the tiny model
    python -m benchmarks.bench_scale --rows 500,10000 --real --first 200     # the product command, 1st 200 tasks

Each run makes a manifest of distinct prompts and seeds (a share of them image-to-video, each with its own
image file, so validation and planning open and hash real images) for the embedded tiny model (1 frame of
16x16, 2 steps), from an empty store, and runs it through the real planner and Luigi:
  local   `wan-batch run`'s path: RunManifest in one process, Luigi's local scheduler;
  luigid  the same command as one worker against a luigid;
  2w      two workers on one luigid, the `wan-batch workers` path (pipeline/workers.py).
With stubbed stages (the default) a stage task writes a small artifact through the store (payload, sidecar,
sha256) instead of running a model; `--real` runs the tiny model. Reported per run:
  plan s         reading, validating and planning the manifest (in the worker, timed around load_batch)
  first stage s  from the worker's start to its first stage task's start
  overhead ms    per stage task: (last stage end - first stage start - time inside the stages) / tasks,
                 i.e. what Luigi, the task wrappers and the store checks cost around the work
  publish s      from the last stage's end to the process's exit (results.parquet, videos, summary)
  worker MB      peak RSS of the (largest) worker process; luigid MB its peak RSS
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LOG_ENV = "WAN_BATCH_BENCH_SCALE_LOG"  # set in the worker processes: where to write their timings
STUB_ENV = "WAN_BATCH_BENCH_SCALE_STUB"  # "1": stub the stage work
FIRST_ENV = "WAN_BATCH_BENCH_SCALE_FIRST"  # stop the process after this many stage tasks (0: run to the end)
START_ENV = "WAN_BATCH_BENCH_SCALE_START"  # wall time the process was launched at
SMALL = dict(target_height=16, target_width=16, target_video_length=1, infer_steps=2, text_len=16)


# -- instrumentation, installed in each worker process ------------------------------------------------------
class Recorder:
    def __init__(self, path: Path, first: int):
        self.path, self.first = path, first
        self.lock = threading.Lock()
        self.starts: list[float] = []
        self.ends: list[float] = []
        self.work = 0.0
        self.plan_s = 0.0
        self.stopped = False

    def summary(self) -> dict:
        return {"pid": os.getpid(), "launched": float(os.environ.get(START_ENV, "0") or 0), "plan_s": self.plan_s,
                "tasks": len(self.ends), "first_start": min(self.starts, default=None),
                "last_end": max(self.ends, default=None), "work_s": self.work, "exit": time.time(),
                "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "starts": self.starts[: self.first or 400]}

    def write(self) -> None:
        self.path.write_text(json.dumps(self.summary()))


def _stub_run(spec, store, run_id="", on_step=None):
    """Stands in for a stage's run: writes a small payload and the stage's sidecar through the store."""
    from pipeline.stages.common import sidecar
    from pipeline.stages.registry import stage_of

    t0 = time.perf_counter()
    if on_step is not None:
        on_step(0)
    payload = f"{spec.stage} {spec.key}\n".encode() * 8
    side = sidecar(spec, stage_of(spec.stage).version, run_id, time.perf_counter() - t0)
    return store.write_file(spec.ref, lambda tmp: Path(tmp).write_bytes(payload), side)


def install(log_path: Path, stub: bool, first: int = 0) -> Recorder:
    """Time every stage task (and the planning) of this process; with `stub`, replace the stage work."""
    import pipeline.batch
    import tasks.run_manifest  # noqa: F401
    import tasks.stages
    import tasks.waves

    rec = Recorder(log_path, first)
    work = _stub_run if stub else tasks.stages.run_spec

    def timed_run_spec(spec, store, run_id="", on_step=None):
        t0 = time.time()
        with rec.lock:
            rec.starts.append(t0)
        try:
            return work(spec, store, run_id, on_step=on_step)
        finally:
            t1 = time.time()
            with rec.lock:
                rec.ends.append(t1)
                rec.work += t1 - t0
                done = len(rec.ends)
            if first and done >= first and not rec.stopped:
                rec.stopped = True
                rec.write()
                os._exit(0)  # enough tasks measured: the rest of the batch is not part of this benchmark

    tasks.stages.run_spec = timed_run_spec
    original = pipeline.batch.load_batch

    def timed_load_batch(*args, **kwargs):
        t0 = time.time()
        try:
            batch = original(*args, **kwargs)
            batch.plans  # planning is lazy: part of what is timed here
            return batch
        finally:
            rec.plan_s += time.time() - t0

    tasks.waves.load_batch = timed_load_batch
    atexit.register(rec.write)
    return rec


if os.environ.get(LOG_ENV):  # imported by a Luigi worker (`luigi --module benchmarks.bench_scale`)
    import pipeline  # noqa: F401  (registers the tasks)

    install(Path(os.environ[LOG_ENV]), os.environ.get(STUB_ENV) == "1", int(os.environ.get(FIRST_ENV, "0")))


# -- the batches ----------------------------------------------------------------------------------------------
def make_batch(work: Path, rows: int, i2v_share: float) -> tuple[Path, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from pipeline.config import default_config_path

    work.mkdir(parents=True, exist_ok=True)
    cfg = json.loads(default_config_path().read_text())
    cfg.update(SMALL)
    config = work / "config.json"
    config.write_text(json.dumps(cfg))
    images = work / "images"
    images.mkdir(exist_ok=True)
    every = int(round(1 / i2v_share)) if i2v_share > 0 else 0
    colours = ("red", "blue", "green", "yellow", "white")
    shapes = ("circle", "square", "triangle", "dog", "car")
    out = []
    for i in range(rows):
        row = {"job_id": f"job{i:06d}", "prompt": f"a {colours[i % 5]} {shapes[i // 5 % 5]} number {i} moving",
               "seed": i, "image": None}
        if every and i % every == 0:
            path = images / f"{i:06d}.png"
            Image.new("RGB", (32, 32), (i % 256, i // 256 % 256, 90)).save(path)
            row["image"] = str(path)
        out.append(row)
    manifest = work / "manifest.parquet"
    pq.write_table(pa.Table.from_pylist(out), manifest)
    return manifest, config


def _env(log: Path, stub: bool, first: int) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            LOG_ENV: str(log), STUB_ENV: "1" if stub else "0", FIRST_ENV: str(first), START_ENV: repr(time.time()),
            "TQDM_DISABLE": "1"}


def _vmhwm_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_local(work: Path, manifest: Path, config: Path, stub: bool, wave_tasks: int, first: int) -> list[dict]:
    """`wan-batch run` (local scheduler) in a fresh process, instrumented."""
    log = work / "worker-0.json"
    code = ("import sys, benchmarks.bench_scale as b; from pathlib import Path; "
            "b.install(Path(sys.argv[1]), sys.argv[2] == '1', int(sys.argv[3])); "
            "from tasks.build import run_batch; "
            "ok = run_batch(sys.argv[4], sys.argv[5], sys.argv[6], sys.argv[7], wave_tasks=int(sys.argv[8])); "
            "sys.exit(0 if ok else 1)")
    env = _env(log, stub, first)
    env.pop(LOG_ENV)  # installed by the code above, not at import
    with open(work / "worker-0.log", "wb") as out:
        proc = subprocess.run([sys.executable, "-c", code, str(log), "1" if stub else "0", str(first), str(manifest),
                               str(config), str(work / "outputs"), str(work / "store"), str(wave_tasks)],
                              cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"the run failed ({proc.returncode}): see {work / 'worker-0.log'}")
    return [json.loads(log.read_text())]


def run_luigid(work: Path, manifest: Path, config: Path, stub: bool, wave_tasks: int, workers: int,
               first: int) -> tuple[list[dict], float | None]:
    """N workers (the product's Luigi command, as `wan-batch workers` starts them) on one luigid."""
    from pipeline.workers import WORKER_OK, BatchSpec, local_luigid, worker_command

    batch = BatchSpec(manifest=str(manifest), config=str(config), output_dir=str(work / "outputs"),
                      store=str(work / "store"), run_id=uuid.uuid4().hex[:12], module="benchmarks.bench_scale",
                      extra=["--wave-tasks", str(wave_tasks)])
    peak: list[float] = []
    with local_luigid(workers, state_dir=work / "luigid") as scheduler:
        procs = []
        for i in range(workers):
            log = work / f"worker-{i}.json"
            with open(work / f"worker-{i}.log", "wb") as out:
                procs.append(subprocess.Popen(worker_command(batch, scheduler, 1, slot=i), cwd=REPO,
                                              env=_env(log, stub, first), stdout=out, stderr=subprocess.STDOUT))
        codes = [p.wait() for p in procs]
        peak.append(_vmhwm_mb(scheduler.process.pid) or 0.0)
    bad = [c for c in codes if c not in WORKER_OK]
    if bad and not first:
        raise SystemExit(f"a worker failed ({codes}): see {work}/worker-*.log")
    return [json.loads((work / f"worker-{i}.json").read_text()) for i in range(workers)], peak[0]


def measure(rows: int, mode: str, stub: bool, wave_tasks: int, first: int, i2v_share: float, root: Path) -> dict:
    work = root / f"{mode}-{'stub' if stub else 'real'}-{rows}-w{wave_tasks}"
    manifest, config = make_batch(work, rows, i2v_share)
    t0 = time.time()
    luigid_mb = None
    if mode == "local":
        logs = run_local(work, manifest, config, stub, wave_tasks, first)
    else:
        logs, luigid_mb = run_luigid(work, manifest, config, stub, wave_tasks, 2 if mode == "2w" else 1, first)
    wall = time.time() - t0
    tasks = sum(w["tasks"] for w in logs)
    first_start = min(w["first_start"] for w in logs if w["first_start"])
    last_end = max(w["last_end"] for w in logs if w["last_end"])
    work_s = sum(w["work_s"] for w in logs)
    n_workers = len(logs)
    # wall time of the stage phase, summed over the workers, less the time they spent inside stages
    overhead = (n_workers * (last_end - first_start) - work_s) / max(1, tasks)
    starts = sorted(s for w in logs for s in w["starts"])[: first or None]
    per_task = (starts[-1] - starts[0]) / max(1, len(starts) - 1) * n_workers if len(starts) > 1 else None
    launched = min(w["launched"] for w in logs)
    return {"rows": rows, "mode": mode, "stages": "stub" if stub else "tiny", "wave_tasks": wave_tasks,
            "tasks": tasks, "plan_s": round(max(w["plan_s"] for w in logs), 2),
            "first_stage_s": round(first_start - launched, 2), "overhead_ms": round(1000 * overhead, 2),
            "first_tasks_ms": round(1000 * per_task, 2) if per_task else None, "work_ms": round(1000 * work_s / max(1, tasks), 2),
            "publish_s": round(max(w["exit"] for w in logs) - last_end, 2), "wall_s": round(wall, 1),
            "worker_mb": round(max(w["maxrss_mb"] for w in logs)), "luigid_mb": round(luigid_mb) if luigid_mb else None}


COLUMNS = ["rows", "mode", "stages", "wave_tasks", "tasks", "plan_s", "first_stage_s", "overhead_ms",
           "first_tasks_ms", "work_ms", "publish_s", "wall_s", "worker_mb", "luigid_mb"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", default="1000,5000", help="comma-separated manifest sizes")
    p.add_argument("--modes", default="local,luigid,2w", help="local, luigid (1 worker), 2w (2 workers)")
    p.add_argument("--wave-tasks", type=int, default=None, help="RunManifest's wave_tasks (0: all up front)")
    p.add_argument("--real", action="store_true", help="run the tiny model instead of stubs")
    p.add_argument("--compare-stub", action="store_true", help="with --real: the same runs stubbed too")
    p.add_argument("--first", type=int, default=0, help="stop each run after this many stage tasks")
    p.add_argument("--i2v-share", type=float, default=0.2, help="share of rows with an image (I2V)")
    p.add_argument("--out", default="", help="append the rows as JSON lines to this file")
    p.add_argument("--keep", default="", help="work in this folder (default: a temp folder, removed)")
    args = p.parse_args(argv)
    from tasks.waves import DEFAULT_WAVE_TASKS

    wave_tasks = DEFAULT_WAVE_TASKS if args.wave_tasks is None else args.wave_tasks
    variants = [args.real] + ([False] if args.real and args.compare_stub else [])
    tmp = tempfile.TemporaryDirectory(prefix="bench-scale-") if not args.keep else None
    root = Path(args.keep or tmp.name)
    print(" | ".join(COLUMNS))
    for rows in (int(r) for r in args.rows.split(",")):
        for mode in args.modes.split(","):
            for real in variants:
                row = measure(rows, mode, not real, wave_tasks, args.first, args.i2v_share, root)
                print(" | ".join(str(row[c]) for c in COLUMNS), flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(row) + "\n")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
