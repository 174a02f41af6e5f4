"""Service settings: where things live and the request/queue limits.

Defaults can come from the seed service's environment variables (MAX_CONCURRENT_TASKS, TASK_TIMEOUT,
SERVER_PORT); command-line flags win. The resolved settings are written to <service_dir>/settings.json so the
worker process runs with exactly what the server was started with (the bearer token is never written).
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from ..store import atomic_write_text

SETTINGS_FILE = "settings.json"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return default
    try:
        return int(value)
    except ValueError:
        raise SystemExit(f"environment variable {name} must be an integer, got {value!r}") from None


@dataclass
class ServiceSettings:
    service_dir: str = "wan-service"
    store: str = "wan-store"
    config: str = ""  # LightX2V-style JSON; "" = the embedded tiny model
    model_path: str = ""  # --model-path (LightX2V's --model_path): wins over the config's model_path
    host: str = "127.0.0.1"
    port: int = 8088
    # queue
    max_queue: int = 100  # MAX_CONCURRENT_TASKS: accepted but unfinished tasks (queued + running)
    task_timeout: float = 1800.0  # TASK_TIMEOUT: seconds a task may stay running
    batch_max: int = 16  # tasks taken into one drain (one manifest, stage-major)
    drain_steps: int = 80  # denoise steps one drain may hold (its oldest task always runs, however long)
    max_attempts: int = 3  # a task whose worker died this many times while running it fails
    poll_interval: float = 0.2
    # requests
    max_body_bytes: int = 32 << 20
    max_image_bytes: int = 20 << 20
    max_image_pixels: int = 40_000_000
    url_timeout: float = 20.0
    allowed_image_dirs: list[str] = field(default_factory=list)  # local image paths must resolve under one
    output_roots: list[str] = field(default_factory=list)  # absolute save_result_paths must resolve under one
    lora_dir: str = ""  # LightX2V's --lora_dir: the folder a request's lora_name is a file of (none: refused)
    allow_private_urls: bool = False  # image URLs may name loopback/private/link-local addresses
    max_fetches: int = 8  # image URL fetches in flight at once; more wait (within their deadline)
    public_metrics: bool = False  # /metrics without the token
    public_url: str = ""  # the base URL printed in status_url (from the bound address, never the Host header)
    max_side: int = 2048  # largest width/height a request may ask for
    max_frames: int = 257
    max_infer_steps: int = 200
    token: str | None = None  # bearer token; never persisted

    @classmethod
    def from_env(cls, **overrides: Any) -> "ServiceSettings":
        base = cls(max_queue=_env_int("MAX_CONCURRENT_TASKS", cls.max_queue),
                   task_timeout=float(_env_int("TASK_TIMEOUT", int(cls.task_timeout))),
                   port=_env_int("SERVER_PORT", cls.port),
                   token=(os.environ.get("WAN_BATCH_TOKEN") or "").strip() or None)
        for key, value in overrides.items():
            if value is not None:
                setattr(base, key, value)
        return base

    def resolved(self) -> "ServiceSettings":
        """Absolute paths, so the worker (and a restart from another folder) sees the same files."""
        out = ServiceSettings(**asdict(self))
        out.service_dir = str(Path(self.service_dir).resolve())
        out.store = str(Path(self.store).resolve())
        out.config = str(Path(self.config).resolve()) if self.config else ""
        if self.model_path and not self.model_path.startswith("builtin:"):
            out.model_path = str(Path(self.model_path).expanduser().resolve())
        out.allowed_image_dirs = [str(Path(d).resolve()) for d in self.allowed_image_dirs]
        out.output_roots = [str(Path(d).resolve()) for d in self.output_roots]
        out.lora_dir = str(Path(self.lora_dir).resolve()) if self.lora_dir else ""
        return out

    def problems(self) -> list[str]:
        out = []
        for name in ("max_queue", "batch_max", "drain_steps", "max_fetches", "max_attempts", "max_body_bytes",
                     "max_image_bytes",
                     "max_image_pixels", "max_side", "max_frames", "max_infer_steps"):
            if getattr(self, name) <= 0:
                out.append(f"{name} must be positive (got {getattr(self, name)})")
        for name in ("task_timeout", "url_timeout", "poll_interval"):
            if not getattr(self, name) > 0:
                out.append(f"{name} must be positive (got {getattr(self, name)})")
        for d in self.allowed_image_dirs:
            if not Path(d).is_dir():
                out.append(f"allowed image folder {d} does not exist")
        for d in self.output_roots:
            if not Path(d).is_dir():
                out.append(f"output root {d} does not exist")
        if self.lora_dir and not Path(self.lora_dir).is_dir():
            out.append(f"LoRA folder {self.lora_dir} does not exist")
        if self.config and not Path(self.config).is_file():
            out.append(f"config file {self.config} does not exist")
        return out

    # -- folders -----------------------------------------------------------------------------------------
    @property
    def root(self) -> Path:
        return Path(self.service_dir)

    @property
    def db_path(self) -> Path:
        return self.root / "queue.sqlite"

    @property
    def inbox(self) -> Path:
        return self.root / "inbox"

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def videos(self) -> Path:
        return self.root / "videos"

    @property
    def inputs(self) -> Path:
        return self.root / "inputs"

    @property
    def outputs(self) -> Path:
        """LightX2V's save_result_path is relative to this folder."""
        return self.root / "outputs"

    def result_roots(self) -> list[Path]:
        """Folders an absolute save_result_path may be in: the outputs folder and --output-root ones."""
        return [self.outputs.resolve(), *(Path(d) for d in self.output_roots)]

    def own_origins(self) -> list[str]:
        """Origins of this server's own pages (its /docs): the public URL and, bound to loopback, its names."""
        out = [self.public_url.rstrip("/")] if self.public_url else []
        if self.host in LOOPBACK:
            out += [f"http://{name}:{self.port}" for name in ("127.0.0.1", "localhost", "[::1]")]
        return out

    def make_dirs(self) -> None:
        for d in (self.root, self.inbox, self.runs, self.videos, self.inputs, self.outputs):
            d.mkdir(parents=True, exist_ok=True)

    def save(self) -> None:
        doc = {k: v for k, v in asdict(self).items() if k != "token"}
        atomic_write_text(self.root / SETTINGS_FILE, json.dumps(doc, indent=1, sort_keys=True))

    @classmethod
    def load(cls, service_dir: str | Path) -> "ServiceSettings":
        doc = json.loads((Path(service_dir) / SETTINGS_FILE).read_text(encoding="utf-8"))
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in doc.items() if k in known})
