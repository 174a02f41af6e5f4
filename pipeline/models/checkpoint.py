"""Lazy access to the tensors of a checkpoint: one .safetensors file, a folder of shards (with or without an
index json), or a .pth file. Keys, shapes and dtypes come from the headers (or a memory map), so a 28 GB
checkpoint can be checked without reading it, and tensors are read one at a time when a model is built.

`.pth` files are only ever opened with `torch.load(weights_only=True)`: never unpickle arbitrary objects.
"""
from __future__ import annotations

import json
from contextlib import ExitStack
from pathlib import Path
from typing import Iterable

import torch

from ..errors import CheckpointError

_ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}


def safetensors_files(path: Path) -> list[Path]:
    """The weight files a path stands for: the file itself, the shards an index json names, or every
    .safetensors file of a folder."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}")
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if indexes:
        try:
            weight_map = json.loads(indexes[0].read_text(encoding="utf-8"))["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"cannot read the shard index {indexes[0]}: {e}") from None
        files = [path / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise CheckpointError(f"{indexes[0]} names shard(s) that are missing: {', '.join(missing)}")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"no .safetensors file in {path}")
    return files


def _tensor_info(f: Path, key: str, info) -> tuple[tuple[int, ...], torch.dtype, int, int]:
    """(shape, dtype, start, end) of one header entry, refusing entries that are not what safetensors writes."""
    if not isinstance(info, dict):
        raise CheckpointError(f"{f}: header entry '{key}' is a JSON {type(info).__name__}, not an object with "
                              f"dtype, shape and data_offsets")
    dtype = _ST_DTYPES.get(info.get("dtype")) if isinstance(info.get("dtype"), str) else None
    if dtype is None:
        raise CheckpointError(f"{f}: tensor '{key}' has dtype {info.get('dtype')!r} that torch cannot hold")
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
        raise CheckpointError(f"{f}: tensor '{key}' has shape {shape!r} (expected a list of sizes)")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(f"{f}: tensor '{key}' has data_offsets {offsets!r} (expected [start, end])")
    numel = 1
    for d in shape:
        numel *= d
    need = numel * dtype.itemsize
    if offsets[1] - offsets[0] != need:
        raise CheckpointError(f"{f}: tensor '{key}' ({info['dtype']} {shape}) needs {need} bytes but its "
                              f"data_offsets span {offsets[1] - offsets[0]}")
    return tuple(shape), dtype, offsets[0], offsets[1]


class TensorFiles:
    """Keys -> (file, shape, dtype) of a set of safetensors files; tensors read on demand with safe_open."""

    def __init__(self, files: Iterable[Path]):
        self.files = [Path(f) for f in files]
        self._where: dict[str, Path] = {}
        self._meta: dict[str, tuple[tuple[int, ...], torch.dtype]] = {}
        self.metadata: dict[Path, dict[str, str]] = {}  # each file's __metadata__ (str -> str)
        for f in self.files:
            self._read_header(f)
        self._stack: ExitStack | None = None
        self._handles: dict[Path, object] = {}

    def _read_header(self, f: Path) -> None:
        """Keys, shapes and dtypes from the header, checked as strictly as safetensors itself checks them when
        a tensor is read, so a file whose header lies is named here (when it is checked), not later."""
        try:
            with open(f, "rb") as fh:
                n = int.from_bytes(fh.read(8), "little")
                if n <= 0 or n > 100 << 20:
                    raise ValueError("bad header length")
                header = json.loads(fh.read(n))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{f} is not a readable safetensors file ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{f}: the safetensors header is a JSON {type(header).__name__}, not an object")
        meta = header.get("__metadata__") or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise CheckpointError(f"{f}: the header's __metadata__ must map names to strings")
        self.metadata[f] = dict(meta)
        spans = []
        for key, info in header.items():
            if key == "__metadata__":
                continue
            shape, dtype, start, end = _tensor_info(f, key, info)
            if key in self._where:
                raise CheckpointError(f"tensor '{key}' is in both {self._where[key].name} and {f.name}")
            self._where[key] = f
            self._meta[key] = (shape, dtype)
            spans.append((start, end, key))
        spans.sort()
        pos = 0
        for start, end, key in spans:  # safetensors wants the tensors back to back, in offset order
            if start != pos:
                raise CheckpointError(f"{f}: tensor '{key}' starts at byte {start} of the data, expected {pos} "
                                      f"(tensors overlap or leave a gap: the header does not describe the file)")
            pos = end
        size = f.stat().st_size
        if 8 + n + pos > size:
            raise CheckpointError(f"{f} is truncated ({size} bytes, its header describes {8 + n + pos})")
        if 8 + n + pos < size:
            raise CheckpointError(f"{f} has {size - 8 - n - pos} byte(s) after the tensors its header describes")

    @classmethod
    def open(cls, path: Path) -> "TensorFiles":
        return cls(safetensors_files(Path(path)))

    def keys(self) -> list[str]:
        return list(self._where)

    def __contains__(self, key: str) -> bool:
        return key in self._where

    def shape(self, key: str) -> tuple[int, ...]:
        return self._meta[key][0]

    def dtype(self, key: str) -> torch.dtype:
        return self._meta[key][1]

    def get(self, key: str) -> torch.Tensor:
        from safetensors import safe_open

        f = self._where[key]
        if f not in self._handles:
            if self._stack is None:
                self._stack = ExitStack()
            self._handles[f] = self._stack.enter_context(safe_open(str(f), framework="pt", device="cpu"))
        return self._handles[f].get_tensor(key)

    def close(self) -> None:
        if self._stack is not None:
            self._stack.close()
        self._stack, self._handles = None, {}

    def __enter__(self) -> "TensorFiles":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def load_pth(path: Path) -> dict[str, torch.Tensor]:
    """A .pth state dict, memory-mapped (tensors are read when touched), with weights_only=True."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing file {path}")
    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            obj = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) file: no mmap
    except Exception as e:  # noqa: BLE001 - the unpickler raises many types; all mean "not a state dict"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"cannot read {path} as a weights-only state dict ({first})") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a flat state dict of tensors")
    return obj
