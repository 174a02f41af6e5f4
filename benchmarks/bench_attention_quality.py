"""Semantic score of the embedded tiny model with each attention kernel (the quality guard of a lossy kernel).

    python -m benchmarks.bench_attention_quality            # on the GPU: exact SDPA, fa3 (bf16), fa3_fp8

For every held-out T2V prompt (pipeline.tiny.world.HELD_OUT) and 20 seeds, a video is made the way the staged
pipeline makes it (tools.train_tiny.generate) and passes when its shape has the prompt's colour and direction
(tests/test_semantic.py's criteria: each of the first four prompts >= 80% of its 20 seeds; all eight prompts
together are the score). Only the self- and cross-attention kernels change between the variants. Prints one JSON
line per variant and a table; also writes $OUT/attention_quality.json.
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

VARIANTS = ("native", "fa3", "fa3_fp8")
PASS_RATE = 0.8


def score(parts: dict, seeds: int, size: int, frames: int) -> dict:
    from pipeline.tiny.world import HELD_OUT, caption, describe_video, matches
    from tools.train_tiny import generate

    per_prompt = {}
    for combo in HELD_OUT:
        videos = generate(parts, "t2v", caption(*combo), list(range(seeds)), size, frames)
        per_prompt[caption(*combo)] = int(sum(matches(describe_video(v), combo[0], combo[2]) for v in videos))
    first4 = list(per_prompt.values())[:4]
    return {"per_prompt": per_prompt, "total": sum(per_prompt.values()), "of": seeds * len(HELD_OUT),
            "semantic_test_passes": all(n >= PASS_RATE * seeds for n in first4)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=20)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    from pipeline.config import load_config
    from pipeline.fast.attention import apply_attention
    from pipeline.tiny import ensure_tiny_models
    from tools.train_tiny import load_parts, parts_to

    config = load_config(None)
    size, frames = config["target_height"], config["target_video_length"]
    device = torch.device(args.device)
    parts = parts_to(load_parts(ensure_tiny_models()), args.device)
    results = {}
    for variant in args.variants.split(","):
        reports = [apply_attention(parts["t2v"][e], variant, variant, device) for e in ("high", "low")]
        if reports[0]["self"]["reason"]:
            results[variant] = {"skipped": reports[0]["self"]["reason"]}
            print(json.dumps({"variant": variant, **results[variant]}), flush=True)
            continue
        try:
            with torch.no_grad():
                results[variant] = score(parts, args.seeds, size, frames)
        except RuntimeError as e:  # a kernel that cannot take the tiny model's shapes: say so, go on
            results[variant] = {"skipped": f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"}
        print(json.dumps({"variant": variant, "backend": reports[0]["self"]["backend"], **results[variant]}),
              flush=True)
    out = Path(os.environ.get("OUT") or ".")
    (out / "attention_quality.json").write_text(json.dumps(results, indent=1))
    print("| attention | held-out T2V prompts following the prompt | first four >= 80% each |\n|---|---|---|")
    for variant, r in results.items():
        if "total" in r:
            print(f"| {variant} | {r['total']}/{r['of']} ({100 * r['total'] / r['of']:.1f}%) | "
                  f"{'yes' if r['semantic_test_passes'] else 'no'} ({', '.join(map(str, r['per_prompt'].values()))}) |")
        else:
            print(f"| {variant} | skipped: {r['skipped']} | - |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
