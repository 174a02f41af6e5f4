"""`wan-batch` subcommands, one module each. A module exposes `register(subparsers)`, which adds its parser
and sets `func=main` on it; `main(args) -> int` returns the exit code. Add new modules to COMMANDS."""
COMMANDS = ["run", "demo", "validate", "inspect", "rerun", "report", "diagnose", "download", "check_config",
            "serve", "workers", "bench_service"]
