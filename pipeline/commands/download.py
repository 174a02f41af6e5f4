"""wan-batch download: fetch a model from the Hugging Face Hub (resumable), optionally with a distilled,
scaled-fp8/int8 or GGUF DiT in place of the bf16 shards, and the LightX2V distill LoRAs."""
from __future__ import annotations


def register(sub) -> None:
    from ..hub import ALIASES, DIT_CHOICES

    p = sub.add_parser("download", help="download a model from the Hugging Face Hub (resumable)")
    p.add_argument("model", help=f"a repo id (Wan-AI/Wan2.2-I2V-A14B) or an alias: {', '.join(sorted(ALIASES))}")
    p.add_argument("--dir", default="models", help="models root; each repo goes to <dir>/<owner>/<name>")
    p.add_argument("--dit", default="bf16", help=f"which DiT weights: {DIT_CHOICES}")
    p.add_argument("--lora", default=None, help="'distill': also fetch LightX2V's 4-step distill LoRAs")
    p.add_argument("--revision", default=None, help="a branch, tag or commit of the model repo")
    p.add_argument("--dry-run", action="store_true", help="print what would be fetched, fetch nothing")
    p.set_defaults(func=main)


def main(args) -> int:
    from pathlib import Path

    from ..errors import WanBatchError
    from ..hub import download, plan_download

    try:
        fetches = plan_download(args.model, args.dit, args.lora)
    except WanBatchError as e:
        print(f"error: {e}")
        return 2
    root = Path(args.dir)
    for f in fetches:
        print(f"{'would fetch' if args.dry_run else 'fetching'} {root / f.repo}: {f.describe()}")
    if args.dry_run:
        return 0
    from huggingface_hub.utils import enable_progress_bars

    enable_progress_bars()  # the download's own bars (the pipeline turns library bars off when imported)
    try:
        for target, how in download(fetches, root, args.revision):
            print(f"done: {target}: {how}")
    except WanBatchError as e:
        print(f"error: {e}")
        return 3
    return 0
