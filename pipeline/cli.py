"""The `wan-batch` command. Each subcommand lives in pipeline/commands/<name>.py."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .commands import COMMANDS

DESCRIPTION = ("Batch Wan2.1/Wan2.2 video generation from a Parquet manifest: one Luigi task per stage, "
               "cached and resumable. `wan-batch demo` runs a small example on the CPU.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="wan-batch", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"pipeline.commands.{name}").register(sub)
    return parser


def configure_logging(verbose: bool) -> None:
    """Our records through one root handler (a manifest warning once); Luigi's through the handler Luigi installs for its own
    `luigi-interface` logger (the lines `luigi --module pipeline ...` prints), and not also through ours:
    each event is one line. Luigi told not to configure logging keeps its records flowing to ours."""
    import luigi.configuration

    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    from . import ManifestWarningsOnce

    once = ManifestWarningsOnce()
    for handler in logging.getLogger().handlers:
        handler.addFilter(once)
    own = not luigi.configuration.get_config().getboolean("core", "no_configure_logging", False)
    logging.getLogger("luigi-interface").propagate = not own


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
