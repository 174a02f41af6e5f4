"""Where a model lives, what its fingerprint is, and how each component is loaded.

One interface for every checkpoint format: `resolve_model` turns a config into a ModelRef, `fingerprint`
identifies a component's files (it feeds the cache keys), `load_component` returns the torch module.
The diffusers layout (Wan-AI/*-Diffusers, and the embedded tiny model) loads with from_pretrained.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..config import BUILTIN_TINY, GenerationConfig
from ..errors import CheckpointError
from .tiny import ensure_tiny_models

log = logging.getLogger(__name__)

# Files up to this size are fingerprinted by content (stable across copies and machines); larger ones by
# identity (path, size, mtime), because hashing 28 GB per run is not an option.
HASH_LIMIT = 64 << 20

# component name -> sub-folders it is made of (diffusers layout)
COMPONENTS = {
    "text": ("text_encoder", "tokenizer"),
    "vae": ("vae",),
    "high": ("transformer",),
    "low": ("transformer_2",),
    "single": ("transformer",),
}


@dataclass(frozen=True)
class ModelRef:
    path: str  # model folder (resolved)
    task: str  # t2v | i2v
    format: str  # diffusers

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "task": self.task, "format": self.format}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelRef":
        return cls(path=d["path"], task=d["task"], format=d["format"])

    @property
    def index(self) -> dict[str, Any]:
        return _read_json(Path(self.path) / "model_index.json")

    @property
    def experts(self) -> tuple[str, ...]:
        """('high', 'low') for a Wan2.2 MoE pair, ('single',) for one DiT (Wan2.1)."""
        idx = self.index
        if idx.get("transformer_2") and idx["transformer_2"][0] is not None and idx.get("boundary_ratio"):
            return ("high", "low")
        return ("single",)

    @property
    def boundary_ratio(self) -> float | None:
        return self.index.get("boundary_ratio")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise CheckpointError(f"missing file {path}") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from None


def resolve_model(config: GenerationConfig, task: str) -> ModelRef:
    """The model folder a job of `task` (t2v/i2v) uses under this config."""
    path = config.get("model_path")
    if task == "i2v" and config.get("i2v_model_path"):
        path = config["i2v_model_path"]
    elif task != config.get("task", "t2v") and path != BUILTIN_TINY:
        raise CheckpointError(f"this config's model ({path}) is a {config.get('task', 't2v')} model; "
                              f"set i2v_model_path in the config to run {task} rows")
    if path == BUILTIN_TINY:
        path = str(ensure_tiny_models() / task)
    else:
        path = config.resolve_path(path)
    folder = Path(path)
    if not (folder / "model_index.json").is_file():
        raise CheckpointError(f"model folder {folder} has no model_index.json (expected the diffusers layout)")
    return ModelRef(path=str(folder), task=task, format="diffusers")


_fingerprints: dict[tuple[str, str], str] = {}


def _file_identity(path: Path) -> list[Any]:
    st = path.stat()
    if st.st_size <= HASH_LIMIT:
        h = hashlib.sha256(path.read_bytes()).hexdigest()
        return [path.name, st.st_size, h]
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def fingerprint(ref: ModelRef, component: str) -> str:
    """Short stable id of the files a component is loaded from (feeds the cache keys)."""
    memo = (ref.path, component)
    if memo not in _fingerprints:
        items = []
        for sub in COMPONENTS[component]:
            folder = Path(ref.path) / sub
            if not folder.is_dir():
                raise CheckpointError(f"model {ref.path} has no '{sub}' folder (needed for the {component} stage)")
            for f in sorted(p for p in folder.rglob("*") if p.is_file()):
                items.append([sub, str(f.relative_to(folder)), *_file_identity(f)[1:]])
        doc = json.dumps({"format": ref.format, "files": items}, sort_keys=True)
        _fingerprints[memo] = hashlib.sha256(doc.encode()).hexdigest()[:16]
    return _fingerprints[memo]


def load_component(ref: ModelRef, component: str, device: torch.device, dtype: torch.dtype) -> Any:
    """Load a component ready for inference. Returns the module (text: a (tokenizer, encoder) pair)."""
    folder = Path(ref.path)
    try:
        if component == "text":
            from transformers import AutoTokenizer, UMT5EncoderModel

            tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
            encoder = UMT5EncoderModel.from_pretrained(folder / "text_encoder", torch_dtype=dtype)
            return tokenizer, encoder.to(device).eval()
        if component == "vae":
            from diffusers import AutoencoderKLWan

            # The Wan VAE runs in float32 in every reference pipeline: its decode is sensitive to bf16.
            return AutoencoderKLWan.from_pretrained(folder / "vae", torch_dtype=torch.float32).to(device).eval()
        if component in ("high", "low", "single"):
            from diffusers import WanTransformer3DModel

            sub = COMPONENTS[component][0]
            return WanTransformer3DModel.from_pretrained(folder / sub, torch_dtype=dtype).to(device).eval()
    except CheckpointError:
        raise
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot load the {component} model from {folder}: {e}") from e
    raise ValueError(f"unknown component {component!r}")


def scheduler_config(ref: ModelRef) -> dict[str, Any]:
    return _read_json(Path(ref.path) / "scheduler" / "scheduler_config.json")
