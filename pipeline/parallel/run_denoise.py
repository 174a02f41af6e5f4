"""The ranks of a parallel Denoise: `torchrun --nproc_per_node=N -m pipeline.parallel.run_denoise ...`.

Two modes. `--serve DIR` (what pipeline.parallel.launch starts from inside a Denoise task): a persistent rank
group that runs one Denoise spec after another, read by rank 0 from the FIFO DIR/commands and broadcast to
all ranks; each rank keeps its expert resident between tasks (the process-wide model cache, as a worker
does), so a stage's tasks load the expert once, not once per task. The group ends when the FIFO closes (the
task's process went away). `--spec FILE` runs one spec and exits (debugging, or a hand-made launch).

Every rank loads the expert onto its own device, reads the same inputs from the store and runs the loop;
rank 0 checks the result is finite, writes the artifact (atomically, like every stage) and reports each
finished step and each finished task on stdout. A rank that fails writes its error to error-<rank>.json in
the error folder and exits, which ends the group (torchrun stops the other ranks); the task reports the error.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from ..errors import StageFailed
from ..spec import StageSpec
from ..store import ArtifactStore, atomic_write_text
from .layout import ParallelLayout

log = logging.getLogger("wan_batch.parallel")
STEP_MARK = "wan-batch-parallel-step"
DONE_MARK = "wan-batch-parallel-done"
COMMANDS = "commands"  # the FIFO a serving group reads specs from


def run(spec: StageSpec, store: ArtifactStore, run_id: str, group) -> dict | None:
    """The denoise stage's own run on this rank: its device, the CFG split as the predict function, the
    Ulysses hooks on the resident expert; only the writer rank writes the artifact."""
    from ..stages import denoise
    from .denoise import predict_noise_parallel
    from .ulysses import check_divisible, enable_ulysses

    def prepare(transformer) -> dict:
        report = {"layout": group.layout.as_dict(), "world_size": group.world}
        if group.layout.seq > 1:
            check_divisible(transformer, spec.params["latent_shape"], group.layout.seq)
            if getattr(transformer, "wan_batch_ulysses", None) is None:  # a resident model keeps its hooks
                transformer.wan_batch_ulysses = enable_ulysses(transformer, group)
            report["ulysses"] = transformer.wan_batch_ulysses
        return {"parallel": report}

    def predict(model, model_input, timestep, ctx, ctx_null, scale, batched) -> torch.Tensor:
        return predict_noise_parallel(model, model_input, timestep, ctx, ctx_null, scale, group, batched)

    def on_step(i: int) -> None:
        if group.writer:
            print(f"{STEP_MARK} {i}", flush=True)

    return denoise.run(spec, store, run_id, on_step, device=group.device, predict=predict, prepare=prepare,
                       write=group.writer)


def serve(folder: Path, group) -> None:
    """Run the specs rank 0 reads from folder/commands until it closes; report each on stdout."""
    stores: dict[str, ArtifactStore] = {}
    commands = open(folder / COMMANDS, encoding="utf-8") if group.writer else None
    while True:
        box = [None]
        if commands is not None:
            line = commands.readline()  # "" at EOF: the task's process closed the FIFO (or died)
            box[0] = json.loads(line) if line.strip() else None
        dist.broadcast_object_list(box, src=0)
        cmd = box[0]
        if cmd is None:
            return
        spec = StageSpec.from_json(Path(cmd["spec"]).read_text(encoding="utf-8"))
        store = stores.setdefault(cmd["store"], ArtifactStore(cmd["store"]))
        run(spec, store, cmd["run_id"], group)
        dist.barrier()  # rank 0 has written the artifact before the task hears it is done
        if group.writer:
            print(f"{DONE_MARK} {cmd['id']}", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.parallel.run_denoise")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--serve", metavar="DIR", help="serve specs from the FIFO DIR/commands (errors go to DIR)")
    mode.add_argument("--spec", help="run this one Denoise spec (JSON file) and exit")
    parser.add_argument("--layout", help="SEQxCFG (with --serve)")
    parser.add_argument("--device-type", default="cuda", choices=("cuda", "cpu"), help="with --serve")
    parser.add_argument("--store", help="with --spec")
    parser.add_argument("--run-id", default="", help="with --spec")
    parser.add_argument("--error-dir", help="with --spec: where a failing rank writes error-<rank>.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s rank %(process)d %(name)s: %(message)s")
    from .group import close_group, init_group

    rank = int(os.environ.get("RANK", "0"))
    error_dir = Path(args.serve or args.error_dir or ".")
    try:
        if args.serve:
            seq, cfg = (int(x) for x in args.layout.lower().split("x"))
            serve(Path(args.serve), init_group(ParallelLayout(seq=seq, cfg=cfg), args.device_type))
        else:
            spec = StageSpec.from_json(Path(args.spec).read_text(encoding="utf-8"))
            group = init_group(ParallelLayout.from_runtime(spec.runtime), torch.device(spec.runtime["device"]).type)
            run(spec, ArtifactStore(args.store), args.run_id, group)
            dist.barrier()
        return 0
    except BaseException as e:  # noqa: BLE001 - reported to the task, which records it for the row
        message = str(e) if isinstance(e, StageFailed) else f"{type(e).__name__}: {e}"
        doc = {"rank": rank, "error": message, "stage_failed": isinstance(e, StageFailed),
               "traceback": traceback.format_exc()}
        atomic_write_text(error_dir / f"error-{rank}.json", json.dumps(doc))
        print(traceback.format_exc(), file=sys.stderr, flush=True)
        return 1
    finally:
        close_group()


if __name__ == "__main__":
    sys.exit(main())
