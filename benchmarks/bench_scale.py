"""Scale benchmark: how scheduling cost grows with the manifest (issue 21). CPU only.

    python -m benchmarks.bench_scale --rows 1000,5000,20000,50000            # stubbed stages, waves
    python -m benchmarks.bench_scale --rows 1000 --wave-tasks 0              # everything up front (before)
    python -m benchmarks.bench_scale --rows 500 --real --compare-stub        # the stubs against the tiny model
    python -m benchmarks.bench_scale --rows 500,10000 --real --first 200     # the product command, 1st 200 tasks
    python -m benchmarks.bench_scale --rows 16,64 --real --modes local       # per-task costs of a small batch
    python -m benchmarks.bench_scale --rows 16 --real --modes local --video 96x160x33 --steps 2 \
        --writer sync,background                                            # decode's encode: in or off the task

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
  publish s      from the last stage's end to the process's exit (results.parquet, videos, summary; with the
                 background writer also the encodes still running then)
  batch s        from the first stage's start to the process's exit: the batch's wall time without start-up
  store ms       per stage task: time inside the stages spent in the store (writes with their sha256 and
                 fsyncs, the integrity checks of loads; not the encode), a part of work ms
  fsyncs, sha256 per stage task, counted over the whole process (the stages, Luigi's complete(), publishing)
  encode ms      per video: ffmpeg's H.264 encode (on the task's thread, or on the background writer's)
  worker MB      peak RSS of the (largest) worker process; luigid MB its peak RSS
`--decode-only` measures a run in which decode is the only stage left (the store filled first at another
video_crf): the stage the background writer changes, without the denoise work around it.
`--writer sync` sets WAN_BATCH_BACKGROUND_WRITES=0 (decode encodes inside its task, as before the background
writer); `--video HxWxF` and `--steps N` size the tiny model's videos (default 16x16x1, 2 steps).
"""
from __future__ import annotations

import argparse
import atexit
import json
import os
import resource
import shutil
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
WRITER_ENV = "WAN_BATCH_BACKGROUND_WRITES"  # pipeline/writer.py's switch


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
        self.local = threading.local()  # .in_stage: this thread is inside a stage's run
        self.store_s = 0.0  # store time inside the stages
        self.fsyncs = 0
        self.sha256 = 0
        self.sha256_s = 0.0
        self.encodes = 0
        self.encode_s = 0.0

    def summary(self) -> dict:
        return {"pid": os.getpid(), "launched": float(os.environ.get(START_ENV, "0") or 0), "plan_s": self.plan_s,
                "tasks": len(self.ends), "first_start": min(self.starts, default=None),
                "last_end": max(self.ends, default=None), "work_s": self.work, "exit": time.time(),
                "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "store_s": self.store_s, "fsyncs": self.fsyncs, "sha256": self.sha256, "sha256_s": self.sha256_s,
                "encodes": self.encodes, "encode_s": self.encode_s,
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


def _count_store(rec: Recorder) -> None:
    """Count the store's fsyncs and sha256s, time its writes and checks inside the stages, and time encodes."""
    from pipeline import store
    from pipeline.stages import decode

    def adding(fn, seconds: str | None = None, count: str | None = None, in_stage_only: bool = False):
        def wrapper(*args, **kwargs):
            if in_stage_only and not getattr(rec.local, "in_stage", False):
                return fn(*args, **kwargs)
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                with rec.lock:
                    if seconds:
                        setattr(rec, seconds, getattr(rec, seconds) + time.perf_counter() - t0)
                    if count:
                        setattr(rec, count, getattr(rec, count) + 1)
        return wrapper

    os.fsync = adding(os.fsync, count="fsyncs")  # this worker process's, the store's included
    store.sha256_file = adding(store.sha256_file, "sha256_s", "sha256")
    for name in ("write_tensors", "write_file", "check"):  # write_file: what the task's thread spends in it
        setattr(store.ArtifactStore, name, adding(getattr(store.ArtifactStore, name), "store_s", in_stage_only=True))
    timed_mp4 = adding(decode.write_mp4, "encode_s", "encodes")

    def write_mp4(*args, **kwargs):  # an encode on the task's thread is not the store's time
        t0 = time.perf_counter()
        try:
            return timed_mp4(*args, **kwargs)
        finally:
            if getattr(rec.local, "in_stage", False):
                with rec.lock:
                    rec.store_s -= time.perf_counter() - t0

    decode.write_mp4 = write_mp4


def install(log_path: Path, stub: bool, first: int = 0) -> Recorder:
    """Time every stage task (and the planning) of this process; with `stub`, replace the stage work."""
    import pipeline.batch
    import tasks.run_manifest  # noqa: F401
    import tasks.stages
    import tasks.waves

    rec = Recorder(log_path, first)
    work = _stub_run if stub else tasks.stages.run_spec
    _count_store(rec)

    def timed_run_spec(spec, store, run_id="", on_step=None):
        t0 = time.time()
        with rec.lock:
            rec.starts.append(t0)
        rec.local.in_stage = True
        try:
            return work(spec, store, run_id, on_step=on_step)
        finally:
            rec.local.in_stage = False
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
def make_batch(work: Path, rows: int, i2v_share: float, video: dict | None = None) -> tuple[Path, Path]:
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    from pipeline.config import default_config_path

    work.mkdir(parents=True, exist_ok=True)
    cfg = json.loads(default_config_path().read_text())
    cfg.update(SMALL, **(video or {}))
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


def _env(log: Path, stub: bool, first: int, writer: str = "background") -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            LOG_ENV: str(log), STUB_ENV: "1" if stub else "0", FIRST_ENV: str(first), START_ENV: repr(time.time()),
            "TQDM_DISABLE": "1", WRITER_ENV: "0" if writer == "sync" else "1"}


def _vmhwm_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def run_local(work: Path, manifest: Path, config: Path, stub: bool, wave_tasks: int, first: int,
              writer: str = "background") -> list[dict]:
    """`wan-batch run` (local scheduler) in a fresh process, instrumented."""
    log = work / "worker-0.json"
    code = ("import sys, benchmarks.bench_scale as b; from pathlib import Path; "
            "b.install(Path(sys.argv[1]), sys.argv[2] == '1', int(sys.argv[3])); "
            "from tasks.build import run_batch; "
            "ok = run_batch(sys.argv[4], sys.argv[5], sys.argv[6], sys.argv[7], wave_tasks=int(sys.argv[8])); "
            "sys.exit(0 if ok else 1)")
    env = _env(log, stub, first, writer)
    env.pop(LOG_ENV)  # installed by the code above, not at import
    with open(work / "worker-0.log", "wb") as out:
        proc = subprocess.run([sys.executable, "-c", code, str(log), "1" if stub else "0", str(first), str(manifest),
                               str(config), str(work / "outputs"), str(work / "store"), str(wave_tasks)],
                              cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"the run failed ({proc.returncode}): see {work / 'worker-0.log'}")
    return [json.loads(log.read_text())]


def run_luigid(work: Path, manifest: Path, config: Path, stub: bool, wave_tasks: int, workers: int,
               first: int, writer: str = "background") -> tuple[list[dict], float | None]:
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
                                              env=_env(log, stub, first, writer), stdout=out,
                                              stderr=subprocess.STDOUT))
        codes = [p.wait() for p in procs]
        peak.append(_vmhwm_mb(scheduler.process.pid) or 0.0)
    bad = [c for c in codes if c not in WORKER_OK]
    if bad and not first:
        raise SystemExit(f"a worker failed ({codes}): see {work}/worker-*.log")
    return [json.loads((work / f"worker-{i}.json").read_text()) for i in range(workers)], peak[0]


def measure(rows: int, mode: str, stub: bool, wave_tasks: int, first: int, i2v_share: float, root: Path,
            writer: str = "background", video: dict | None = None, decode_only: bool = False) -> dict:
    work = root / f"{mode}-{'stub' if stub else 'real'}-{rows}-w{wave_tasks}-{writer}"
    shutil.rmtree(work, ignore_errors=True)  # from an empty store, every time
    manifest, config = make_batch(work, rows, i2v_share, {**(video or {}), **({"video_crf": 17} if decode_only else {})})
    if decode_only:  # every stage in the store first, at another crf: the measured run re-runs decode alone
        run_local(work, manifest, config, stub, wave_tasks, 0, writer)
        config.write_text(json.dumps({**json.loads(config.read_text()), "video_crf": 18}))
    t0 = time.time()
    luigid_mb = None
    if mode == "local":
        logs = run_local(work, manifest, config, stub, wave_tasks, first, writer)
    else:
        logs, luigid_mb = run_luigid(work, manifest, config, stub, wave_tasks, 2 if mode == "2w" else 1, first,
                                     writer)
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
    encodes = sum(w["encodes"] for w in logs)
    per = max(1, tasks)
    return {"rows": rows, "mode": mode, "stages": "stub" if stub else "tiny", "writer": writer,
            "video": "x".join(str((video or SMALL)[k]) for k in ("target_height", "target_width", "target_video_length")),
            "wave_tasks": wave_tasks,
            "tasks": tasks, "plan_s": round(max(w["plan_s"] for w in logs), 2),
            "first_stage_s": round(first_start - launched, 2), "overhead_ms": round(1000 * overhead, 2),
            "first_tasks_ms": round(1000 * per_task, 2) if per_task else None, "work_ms": round(1000 * work_s / max(1, tasks), 2),
            "publish_s": round(max(w["exit"] for w in logs) - last_end, 2),
            "batch_s": round(max(w["exit"] for w in logs) - first_start, 2), "wall_s": round(wall, 1),
            "store_ms": round(1000 * sum(w["store_s"] for w in logs) / per, 2),
            "fsyncs": round(sum(w["fsyncs"] for w in logs) / per, 2),
            "sha256": round(sum(w["sha256"] for w in logs) / per, 2),
            "encode_ms": round(1000 * sum(w["encode_s"] for w in logs) / encodes, 1) if encodes else None,
            "worker_mb": round(max(w["maxrss_mb"] for w in logs)), "luigid_mb": round(luigid_mb) if luigid_mb else None}


COLUMNS = ["rows", "mode", "stages", "writer", "video", "wave_tasks", "tasks", "plan_s", "first_stage_s",
           "overhead_ms", "first_tasks_ms", "work_ms", "store_ms", "fsyncs", "sha256", "encode_ms", "publish_s",
           "batch_s", "wall_s", "worker_mb", "luigid_mb"]


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
    p.add_argument("--writer", default="background", help="comma-separated: background, sync (decode's encode)")
    p.add_argument("--video", default="", help="HxWxF of the videos (default 16x16x1)")
    p.add_argument("--steps", type=int, default=0, help="denoise steps (default 2)")
    p.add_argument("--repeat", type=int, default=1, help="run each variant this many times")
    p.add_argument("--decode-only", action="store_true", help="measure a run in which only decode runs (the "
                   "other stages are put in the store first, and the video's crf changed)")
    args = p.parse_args(argv)
    video = {}
    if args.video:
        h, w, f = (int(x) for x in args.video.split("x"))
        video.update(target_height=h, target_width=w, target_video_length=f)
    if args.steps:
        video["infer_steps"] = args.steps
    from tasks.waves import DEFAULT_WAVE_TASKS

    wave_tasks = DEFAULT_WAVE_TASKS if args.wave_tasks is None else args.wave_tasks
    variants = [args.real] + ([False] if args.real and args.compare_stub else [])
    tmp = tempfile.TemporaryDirectory(prefix="bench-scale-") if not args.keep else None
    root = Path(args.keep or tmp.name)
    print(" | ".join(COLUMNS))
    for rows in (int(r) for r in args.rows.split(",")):
        for mode in args.modes.split(","):
            for real in variants:
                for _ in range(args.repeat):  # interleaved, so a change in the machine's load hits every variant
                    for writer in args.writer.split(","):
                        row = measure(rows, mode, not real, wave_tasks, args.first, args.i2v_share, root, writer,
                                      {**SMALL, **video}, args.decode_only)
                        row["decode_only"] = args.decode_only
                        print(" | ".join(str(row[c]) for c in COLUMNS), flush=True)
                        if args.out:
                            with open(args.out, "a") as f:
                                f.write(json.dumps(row) + "\n")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
