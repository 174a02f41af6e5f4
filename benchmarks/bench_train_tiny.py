"""GPU benchmark: one training step of the tiny model's T2V experts (tools.train_tiny), eager against
the faster settings, in one process on the same data.

    python -m benchmarks.bench_train_tiny                  # on a GPU (prints a table; $OUT/train_tiny.jsonl)
    python -m benchmarks.bench_train_tiny --steps 12 --batches 8 --device cpu   # the same code, smoke-sized

A step is what the trainer runs: both experts forward and backward at `dit_batch`, the UMT5 encoder with them,
AdamW and the EMA. The baseline is the recipe the first shipped weights were trained with (eager, TF32
matmuls, flash attention); the ratio is its time per sample over the variant's. Latents are random (the step's cost does not
depend on them), so no VAE is needed.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from dataclasses import replace
from pathlib import Path

import torch

from tools import train_tiny as T

VARIANTS = (  # (name, dit_bf16, dit_compile, dit_math_attention); attention is PyTorch's pick (flash) unless "math"
    ("eager tf32", 0, 0, 0),
    ("eager bf16", 1, 0, 0),
    ("compiled tf32", 0, 1, 0),
    ("compiled bf16", 1, 1, 0),
    ("compiled bf16 math", 1, 1, 1),  # the recipe's default
)


def measure(recipe: T.Recipe, device: str, steps: int, log: T.Log) -> float:
    """ms per step after the first 10 (which hold any compile), on fresh experts."""
    from diffusers import WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    from pipeline.tiny import T5_CONFIG, build_tokenizer

    tokenizer = build_tokenizer(Path(tempfile.mkdtemp()))
    torch.manual_seed(0)
    encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), **T5_CONFIG)).to(device)
    captions = sorted({T.caption(*c) for c in T.all_combos()})
    bank = T.TextBank(tokenizer, captions, negative="", text_len=512)
    gen = torch.Generator().manual_seed(1)
    n = 4096
    latents = torch.randn(n, 16, (recipe.frames - 1) // 4 + 1, recipe.video_size // 8, recipe.video_size // 8,
                          generator=gen).to(device)
    rows = torch.randint(0, len(captions), (n,), generator=gen)
    experts = {name: WanTransformer3DModel(**T.dit_config(recipe)).to(device) for name in ("high", "low")}
    stats = T.train_experts(recipe, experts, 0.875, bank, encoder, rows, latents, None, steps, 2, log,
                            train_text=True)
    return stats["ms_per_step"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=40, help="steps per variant (the first 10 are not timed)")
    p.add_argument("--batches", default="512,1024", help="dit_batch values to time each variant at")
    p.add_argument("--variants", default=",".join(v[0] for v in VARIANTS))
    args = p.parse_args(argv)
    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    out = Path(os.environ.get("OUT") or "bench-out")
    out.mkdir(parents=True, exist_ok=True)
    log = T.Log()
    chosen = [v for v in VARIANTS if v[0] in args.variants.split(",")]
    base = T.Recipe()
    rows, baseline = [], None
    for batch in (int(b) for b in args.batches.split(",")):
        for name, bf16, compiled, math_attention in chosen:
            recipe = replace(base, dit_batch=batch, dit_bf16=bf16, dit_compile=compiled,
                             dit_math_attention=math_attention)
            try:
                ms = measure(recipe, args.device, args.steps, log)
            except Exception as exc:  # a variant that cannot run here is reported, the others still run
                log(f"{name} at batch {batch} failed: {type(exc).__name__}: {exc}")
                continue
            per_sample = ms / batch
            if baseline is None and (name, batch) == (VARIANTS[0][0], 512):
                baseline = per_sample
            ratio = baseline / per_sample if baseline else float("nan")
            rec = {"variant": name, "batch": batch, "ms_per_step": round(ms, 2),
                   "us_per_sample": round(per_sample * 1000, 2), "speedup": round(ratio, 2),
                   "device": torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"}
            print("BENCH " + json.dumps(rec), flush=True)
            with open(out / "train_tiny.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            rows.append(rec)
    print("\n| variant | batch | ms/step | speed-up per sample vs eager tf32 @512 |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {r['batch']} | {r['ms_per_step']} | {r['speedup']}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
