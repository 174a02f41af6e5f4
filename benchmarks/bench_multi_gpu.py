"""Multi-GPU benchmark: data-parallel videos/hour (1 vs N GPUs) and model-parallel step time for one video.

    python -m benchmarks.bench_multi_gpu --part dp --gpus 0,1            # ~5 min on 2 H200s
    python -m benchmarks.bench_multi_gpu --part mp --res 480p            # ~3 min
    python -m benchmarks.bench_multi_gpu --part mp --res 720p            # ~5 min
    python -m benchmarks.bench_multi_gpu --size smoke --part dp,mp       # the benchmark itself, on CPU

dp: the same manifest (distinct prompts and seeds, the 4-step distilled schedule at 480x832x81, random
    full-size Wan2.2 A14B weights) through `wan-batch workers` machinery with one GPU, then with one worker per
    GPU, each from an empty store; reports videos/hour of each and the ratio (target >= 1.9x on 2 GPUs). Wall
    time includes each worker's start and model builds, as a real batch does.
mp: pipeline.parallel.check on as many ranks as GPUs: one CFG step of the full-size DiT in one process, then
    with seq_p_size=N (Ulysses) and with cfg_p_size=2; reports the per-step speedup (target >= 1.8x at 720p on
    2 GPUs) and the largest difference from the one-process output at full size (bf16: small, not zero,
    since the matmuls see other shapes).
Ratios only; absolute times depend on the machine. Keep NVLink multicast off (the device README says why).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RANDOM_ENV = "WAN_BATCH_BENCH_RANDOM"  # set in the workers: build random weights instead of reading files
RES = {"480p": (480, 832), "720p": (720, 1280)}

if os.environ.get(RANDOM_ENV):  # imported by a Luigi worker (`luigi --module benchmarks.bench_multi_gpu`)
    import pipeline  # noqa: F401  (registers the tasks)
    from benchmarks.models import install_random_loader

    install_random_loader(os.environ[RANDOM_ENV], None)


def _env(extra: dict[str, str] | None = None) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            **(extra or {})}


def _dp_batch(work: Path, size: str, rows: int) -> tuple[Path, Path]:
    """A manifest of `rows` T2V jobs and a distilled 4-step config on a skeleton model folder."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from benchmarks.models import skeleton_models

    folder = skeleton_models(work / "models", size)["t2v"]
    h, w, f = (480, 832, 81) if size == "full" else (64, 64, 5)
    config = {"model_path": str(folder), "task": "t2v", "target_height": h, "target_width": w,
              "target_video_length": f, "denoising_step_list": [1000, 750, 500, 250], "boundary_step_index": 2,
              "sample_shift": 5.0, "enable_cfg": False, "text_len": 512, "fps": 16}
    cfg_path = work / "config.json"
    cfg_path.write_text(json.dumps(config, indent=1))
    colours = ["red", "green", "blue", "yellow", "white", "orange", "purple", "cyan"]
    shapes = ["circle", "square", "triangle"]
    table = pa.Table.from_pylist([{"job_id": f"v{i:03d}", "seed": 1000 + i,
                                   "prompt": f"a {colours[i % 8]} {shapes[i % 3]} moving left, take {i}"}
                                  for i in range(rows)])
    manifest = work / "jobs.parquet"
    pq.write_table(table, manifest)
    return manifest, cfg_path


def _dp_run(manifest: Path, config: Path, work: Path, name: str, groups: list[str], size: str) -> dict[str, Any]:
    import pyarrow.parquet as pq

    from pipeline.workers import BatchSpec, local_luigid, start_workers, wait_workers

    out = work / name
    batch = BatchSpec(manifest=str(manifest), config=str(config), output_dir=str(out / "outputs"),
                      store=str(out / "store"), run_id=uuid.uuid4().hex[:12], module="benchmarks.bench_multi_gpu")
    os.environ[RANDOM_ENV] = size  # inherited by the workers (this process has no use for it)
    os.environ["PYTHONPATH"] = _env()["PYTHONPATH"]
    threads = max(1, (os.cpu_count() or 1) // len(groups)) if not groups[0] else None
    t0 = time.perf_counter()
    with local_luigid(gpu_units=len(groups)) as scheduler:
        runs = wait_workers(start_workers(batch, scheduler, groups, out / "logs", 1, threads))
    seconds = time.perf_counter() - t0
    status = pq.read_table(out / "outputs" / "results.parquet").column("status").to_pylist()
    return {"workers": len(groups), "devices": groups, "rows": len(status), "ok": status.count("ok"),
            "seconds": round(seconds, 2), "videos_per_hour": round(3600 * status.count("ok") / seconds, 1),
            "worker_exit_codes": [r.returncode for r in runs]}


def part_dp(args, work: Path) -> dict[str, Any]:
    gpus = ["cpu", "cpu"] if args.size == "smoke" else args.gpus.split(",")
    groups = [""] * len(gpus) if gpus[0] == "cpu" else gpus
    manifest, config = _dp_batch(work, args.size, args.rows)
    one = _dp_run(manifest, config, work, "dp-1", groups[:1], args.size)
    many = _dp_run(manifest, config, work, f"dp-{len(groups)}", groups, args.size)
    ratio = many["videos_per_hour"] / one["videos_per_hour"] if one["videos_per_hour"] else None
    return {"one_worker": one, "all_workers": many, "throughput_ratio": round(ratio, 3) if ratio else None,
            "target": f">= {0.95 * len(groups):.2f}x on {len(groups)} GPUs"}


def part_mp(args, work: Path) -> list[dict[str, Any]]:
    n = 2 if args.size == "smoke" else len(args.gpus.split(","))
    layouts = [f"{n}x1"] + (["1x2"] if n == 2 else [f"{n // 2}x2"])
    out = []
    for res in args.res.split(","):
        h, w = RES[res] if args.size == "full" else (48, 64)
        frames = 81 if args.size == "full" else 9
        result = work / f"mp-{res}.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}", "-m",
               "pipeline.parallel.check", "--arch", "full" if args.size == "full" else "tiny", "--layouts",
               ",".join(layouts), "--frames", str(frames), "--height", str(h), "--width", str(w),
               "--reps", str(args.reps if args.size == "full" else 1), "--out", str(result)]
        if args.layers:
            cmd += ["--layers", str(args.layers)]
        env = _env({"CUDA_VISIBLE_DEVICES": args.gpus} if args.size == "full" else None)
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            out.append({"res": res, "error": proc.stderr[-3000:]})
            continue
        doc = json.loads(result.read_text())
        for r in doc["results"]:
            out.append({"res": res, **r})
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--part", default="dp,mp", help="dp (data parallel), mp (model parallel), or both")
    p.add_argument("--size", choices=("full", "smoke"), default="full", help="smoke: tiny architecture on CPU")
    p.add_argument("--gpus", default="0,1", help="GPU ids to use (dp: one worker each; mp: one rank each)")
    p.add_argument("--rows", type=int, default=8, help="videos in the dp batch")
    p.add_argument("--res", default="480p,720p", help="mp resolutions")
    p.add_argument("--layers", type=int, default=None, help="mp: DiT layers (default: all 40)")
    p.add_argument("--reps", type=int, default=2, help="mp: timed steps per measurement (after one warm-up)")
    p.add_argument("--work", default=None, help="scratch folder (default: a temp folder)")
    p.add_argument("--out", default=None, help="also write the results here (JSON)")
    args = p.parse_args(argv)
    work = Path(args.work or tempfile.mkdtemp(prefix="wan-batch-bench-mgpu-"))
    work.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {"size": args.size, "gpus": args.gpus}
    parts = args.part.split(",")
    if "dp" in parts:
        report["data_parallel"] = part_dp(args, work)
    if "mp" in parts:
        report["model_parallel"] = part_mp(args, work)
    text = json.dumps(report, indent=1)
    print(text)
    if "data_parallel" in report:
        d = report["data_parallel"]
        print(f"\ndata parallel: {d['one_worker']['videos_per_hour']} videos/h on 1, "
              f"{d['all_workers']['videos_per_hour']} on {d['all_workers']['workers']}: {d['throughput_ratio']}x")
    for r in report.get("model_parallel", []):
        if "error" in r:
            print(f"model parallel {r['res']}: FAILED\n{r['error']}")
            continue
        print(f"model parallel {r['res']} {r['layout']}: {r['tokens']} tokens, speedup per step "
              f"{r['speedup'] and round(r['speedup'], 3)}x, max abs diff {r['max_abs_diff']:.3g} "
              f"(rel {r['max_rel_diff']:.3g}), peak {r['peak_gib_per_rank']} GiB/rank")
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
