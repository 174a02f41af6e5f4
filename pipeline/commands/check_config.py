"""wan-batch check-config FILE: resolve a config (model folder, formats, loaders, key origins) and check every
checkpoint file exists and fits its architecture, without loading the weights; exit 1 listing every problem."""
from __future__ import annotations

from .run import add_model_path


def register(sub) -> None:
    p = sub.add_parser("check-config", help="check a config's model files without loading them")
    p.add_argument("config", help="a LightX2V-style JSON config")
    add_model_path(p)
    p.set_defaults(func=main)


def main(args) -> int:
    from ..check_config import check_config

    report = check_config(args.config, args.model_path)
    print(report.text())
    return 1 if report.problems else 0
