"""wan-batch workers: one Luigi worker per GPU (data parallel) against one luigid, sharing the store."""
from __future__ import annotations

import os
import time
import uuid
from pathlib import Path

from .run import absolute_model_path, add_batch_arguments


def register(sub) -> None:
    p = sub.add_parser("workers", help="run a manifest with one Luigi worker per GPU against one luigid")
    add_batch_arguments(p)
    where = p.add_mutually_exclusive_group()
    where.add_argument("--gpus", default=None,
                       help="comma-separated GPU ids (CUDA_VISIBLE_DEVICES values), one worker per GPU, or per "
                            "seq_p_size*cfg_p_size GPUs with a `parallel` config; 'cpu,cpu' = two CPU workers")
    where.add_argument("--workers", type=int, default=None,
                       help="N workers: on GPUs 0..N-1 when CUDA is present, else N CPU workers")
    p.add_argument("--scheduler-host", default=None, help="an existing luigid (default: start one on 127.0.0.1)")
    p.add_argument("--scheduler-port", type=int, default=8082, help="its port (with --scheduler-host)")
    p.add_argument("--luigid-state", default=None,
                   help="folder for the state of the luigid started here (default: a temp folder)")
    p.add_argument("--log-dir", default=None, help="worker logs (default: <output-dir>/worker-logs)")
    p.set_defaults(func=main)


def _gpu_list(args) -> list[str]:
    if args.gpus:
        return [g.strip() for g in args.gpus.split(",") if g.strip()]
    import torch

    n = args.workers or 1
    if torch.cuda.is_available():
        return [str(i) for i in range(n * _per_worker(args))]
    return ["cpu"] * n


def _per_worker(args) -> int:
    from ..config import load_config
    from ..parallel.layout import ParallelLayout

    return ParallelLayout.from_value(load_config(args.config or None, args.model_path).get("parallel")).world


def main(args) -> int:
    import pyarrow.parquet as pq

    from ..batch import load_batch
    from ..errors import WanBatchError
    from ..workers import (WORKER_OK, BatchSpec, Scheduler, device_groups, local_luigid, open_state_dir, start_workers,
                           wait_workers)

    try:  # refuse a bad manifest or config plainly, before any process starts
        load_batch(args.manifest, args.config, strict=args.strict, model_path=args.model_path)
        gpus = _gpu_list(args)
        cpu = gpus[0] == "cpu"
        per_worker = 1 if cpu else _per_worker(args)
        groups = device_groups(gpus, per_worker)
        if args.luigid_state and not args.scheduler_host:  # luigid unpickles its state: refuse a folder not ours
            os.close(open_state_dir(args.luigid_state))
    except (WanBatchError, ValueError) as e:  # StateDirError is a ValueError
        print(f"error: {e}")
        return 2
    batch = BatchSpec(manifest=args.manifest, config=args.config, model_path=absolute_model_path(args.model_path),
                      output_dir=args.output_dir, store=args.store,
                      strict=args.strict, run_id=uuid.uuid4().hex[:12])
    log_dir = Path(args.log_dir or Path(args.output_dir) / "worker-logs")
    results = Path(args.output_dir) / "results.parquet"
    threads = max(1, (os.cpu_count() or 1) // len(groups)) if cpu else None
    started = time.time()

    def run(scheduler: Scheduler):
        print(f"{len(groups)} workers ({'CPU' if cpu else 'GPUs ' + ' | '.join(groups)}) on luigid "
              f"{scheduler.host}:{scheduler.port}; logs in {log_dir}", flush=True)
        return wait_workers(start_workers(batch, scheduler, groups, log_dir, per_worker, threads))

    if args.scheduler_host:
        runs = run(Scheduler(args.scheduler_host, args.scheduler_port))
    else:
        with local_luigid(gpu_units=len(groups) * per_worker, state_dir=args.luigid_state) as scheduler:
            runs = run(scheduler)
    for r in runs:
        print(f"worker {r.index} ({r.devices or 'cpu'}): exit {r.returncode}, log {r.log}")
    if not results.is_file() or results.stat().st_mtime < started:
        print(f"error: the workers did not write {results}; see the worker logs")
        return 1
    rows = pq.read_table(results, columns=["status"]).column("status").to_pylist()
    failed = sum(s != "ok" for s in rows)
    print(f"{len(rows) - failed} of {len(rows)} rows ok; results: {results}")
    return 0 if failed == 0 and all(r.returncode in WORKER_OK for r in runs) else 1
