"""wan-batch serve: the HTTP service (seed-service and LightX2V-compatible routes) over the batch engine."""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import sys
from pathlib import Path

log = logging.getLogger("wan_batch.service")


def register(sub) -> None:
    p = sub.add_parser("serve", help="HTTP service: /submit, /status, /v1/tasks/video/ (LightX2V), /health, /metrics")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; anything else: set a token)")
    p.add_argument("--port", type=int, default=None, help="port (default $SERVER_PORT or 8088; 0 picks a free one)")
    p.add_argument("--config", default="", help="LightX2V-style JSON config (default: the embedded tiny model)")
    p.add_argument("--model-path", default=None, help="the model folder (LightX2V's --model_path); wins over the "
                   "config's model_path. A config with neither is refused")
    p.add_argument("--store", default="wan-store", help="artifact store, shareable with `wan-batch run` (default wan-store)")
    p.add_argument("--service-dir", default="wan-service", help="queue database, inputs, videos, run folders, logs (default wan-service)")
    p.add_argument("--max-queue", type=int, default=None,
                   help="accepted but unfinished tasks (default $MAX_CONCURRENT_TASKS or 100); more get 503")
    p.add_argument("--task-timeout", type=float, default=None,
                   help="seconds a task may stay running (default $TASK_TIMEOUT or 1800)")
    p.add_argument("--batch-max", type=int, default=16, help="most tasks grouped into one stage-major drain (default 16)")
    p.add_argument("--drain-steps", type=int, default=80,
                   help="denoise steps one drain may hold: the oldest waiting task, then the cheapest others that "
                        "fit (default 80); a short task waits for at most one drain")
    p.add_argument("--max-body-mb", type=float, default=32.0, help="largest request body (default 32)")
    p.add_argument("--max-image-mb", type=float, default=20.0, help="largest input image: upload, URL or base64 (default 20)")
    p.add_argument("--url-timeout", type=float, default=20.0, help="seconds to fetch an image URL, in all (default 20)")
    p.add_argument("--allow-image-dir", action="append", default=[], metavar="DIR",
                   help="folder whose images requests may name by path (repeatable; none: paths refused)")
    p.add_argument("--lora-dir", default="", metavar="DIR",
                   help="LightX2V's --lora_dir: a request's lora_name names a .safetensors file in it (none: refused)")
    p.add_argument("--output-root", action="append", default=[], metavar="DIR",
                   help="folder an absolute save_result_path may name (repeatable; the outputs folder always)")
    p.add_argument("--allow-private-urls", action="store_true",
                   help="let image URLs name loopback, private and link-local addresses (default: refused)")
    p.add_argument("--max-fetches", type=int, default=8, help="image URL fetches at once; more wait (default 8)")
    p.add_argument("--token-file", default=None,
                   help="file holding the bearer token clients must send (or set $WAN_BATCH_TOKEN); every route "
                        "but /health then needs it")
    p.add_argument("--public-metrics", action="store_true", help="serve /metrics without the token")
    p.add_argument("--public-url", default="",
                   help="base URL printed in status_url/video_url (default: the bound address; never the Host header)")
    p.set_defaults(func=main)


def _bind(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    return sock


def main(args) -> int:
    import uvicorn

    from ..service.app import create_app
    from ..service.settings import ServiceSettings
    from ..store import atomic_write_text

    token = None
    if args.token_file:
        try:
            token = Path(args.token_file).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            print(f"error: cannot read --token-file {args.token_file}: {e}", file=sys.stderr)
            return 2
        if not token:  # failing open (no authentication) would be the wrong way to read a mistake
            print(f"error: --token-file {args.token_file} is empty; put the token in it (the server would "
                  "otherwise run without authentication)", file=sys.stderr)
            return 2
    elif "WAN_BATCH_TOKEN" in os.environ and not os.environ["WAN_BATCH_TOKEN"].strip():
        print("error: $WAN_BATCH_TOKEN is set but empty; set a token or unset it", file=sys.stderr)
        return 2
    settings = ServiceSettings.from_env(
        service_dir=args.service_dir, store=args.store, config=args.config, model_path=args.model_path,
        host=args.host, port=args.port,
        max_queue=args.max_queue, task_timeout=args.task_timeout, batch_max=args.batch_max,
        max_body_bytes=int(args.max_body_mb * 2**20), max_image_bytes=int(args.max_image_mb * 2**20),
        url_timeout=args.url_timeout, allowed_image_dirs=args.allow_image_dir, token=token,
        drain_steps=args.drain_steps, output_roots=args.output_root, lora_dir=args.lora_dir, allow_private_urls=args.allow_private_urls,
        max_fetches=args.max_fetches, public_metrics=args.public_metrics, public_url=args.public_url).resolved()
    problems = settings.problems()
    if problems:
        for p in problems:
            print(f"error: {p}", file=sys.stderr)
        return 2
    if settings.host not in ("127.0.0.1", "localhost", "::1") and not settings.token:
        print(f"warning: binding {settings.host} without a bearer token: anyone who can reach this port can "
              "submit jobs (use --token-file or $WAN_BATCH_TOKEN)", file=sys.stderr)
    settings.make_dirs()
    lock = open(settings.root / "server.lock", "a+")
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the kernel even on kill -9
    except BlockingIOError:
        print(f"error: another `wan-batch serve` is using {settings.root}", file=sys.stderr)
        return 2
    sock = _bind(settings.host, settings.port)
    host, port = sock.getsockname()[:2]
    url = f"http://{'[' + host + ']' if ':' in host else host}:{port}"
    settings.port = port
    settings.public_url = settings.public_url or url
    settings.save()
    atomic_write_text(settings.root / "server.json",
                      json.dumps({"url": url, "host": host, "port": port, "pid": os.getpid()}))
    print(f"wan-batch service on {url} (docs: {url}/docs); queue and videos in {settings.root}", flush=True)
    logging.getLogger("wan_batch").setLevel(logging.INFO)
    app = create_app(settings)
    server = uvicorn.Server(uvicorn.Config(app, log_level="info", timeout_graceful_shutdown=10))
    server.run(sockets=[sock])
    return 0
