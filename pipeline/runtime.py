"""Resident models: a process-wide cache bounded by a memory budget, and the device/dtype policy.

Luigi runs tasks in the worker process (one worker per GPU), and priorities make it run a whole stage before
the next, so a model loaded for the first task of a stage serves every task of that stage. When the next
stage's model does not fit the budget, the least recently used model is evicted first.
"""
from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections import Counter, OrderedDict
from typing import Any, Callable

import torch

from . import threads

log = logging.getLogger(__name__)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def module_bytes(obj: Any, device_type: str | None = None) -> int:
    """Parameter + buffer bytes of a module (or of the modules in a tuple); with `device_type`, only those on
    that kind of device (a block-streamed DiT holds most of its weights in pinned CPU memory)."""
    if isinstance(obj, (tuple, list)):
        return sum(module_bytes(o, device_type) for o in obj)
    if isinstance(obj, torch.nn.Module):
        extra = getattr(getattr(obj, "wan_batch_streamer", None), "slots", [])
        tensors = list(obj.parameters()) + list(obj.buffers()) + list(extra)
        return sum(t.numel() * t.element_size() for t in tensors
                   if device_type is None or t.device.type == device_type)
    return 0


def default_budget(device: torch.device) -> int:
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return int(total * 0.9)
    try:
        pages = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError):
        pages = 16 << 30
    return int(pages * 0.6)


def _device_type(key: tuple) -> str | None:
    """'cuda' / 'cpu' from a cache key (component, fingerprint, device, dtype), else None (count everything)."""
    try:
        return torch.device(key[2]).type
    except (IndexError, TypeError, RuntimeError):
        return None


class ModelCache:
    def __init__(self) -> None:
        self._models: OrderedDict[tuple, tuple[Any, int]] = OrderedDict()
        self._tags: dict[tuple, str | None] = {}
        self._lock = threading.RLock()
        self.loads: Counter = Counter()  # (component, fingerprint) -> times loaded in this process
        self.load_seconds: Counter = Counter()

    def get(self, key: tuple, load: Callable[[], Any], budget: int, estimate: int,
            exclusive: str | None = None) -> Any:
        """The cached model for `key`, else `load()` it after evicting enough to fit `estimate` bytes.

        Models loaded with the same `exclusive` tag never stay resident together: loading one evicts the
        others first (the GPU residency policy for 14B experts: in stage-major order, one expert at a time,
        so its activations get the memory the other expert would hold)."""
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key][0]
            if exclusive is not None:
                for other in [k for k in self._models if self._tags.get(k) == exclusive]:
                    self._drop(other, f"only one '{exclusive}' model is kept resident")
            self._evict_until(budget - estimate, keep=None)  # free room before the load, not after
            t0 = time.perf_counter()
            model = load()
            device_type = _device_type(key)
            size = module_bytes(model, device_type)
            if device_type in (None, "cpu"):
                threads.fit_to_model(size)  # the CPU thread count follows the size of the work
            self._tags[key] = exclusive
            self._models[key] = (model, size)
            self.loads[key] += 1
            self.load_seconds[key] += time.perf_counter() - t0
            log.info("loaded %s (%.1f MB) in %.1fs", key[0], size / 2**20, time.perf_counter() - t0)
            return model

    def _evict_until(self, limit: int, keep: tuple | None) -> None:
        while self._models and sum(s for _, s in self._models.values()) > max(limit, 0):
            key = next(iter(self._models))
            if key == keep:
                break
            self._drop(key, "to stay within the memory budget")

    def _drop(self, key: tuple, why: str) -> None:
        model = self._models.pop(key)[0]
        self._tags.pop(key, None)
        streamer = getattr(model, "wan_batch_streamer", None)
        if streamer is not None:
            streamer.remove()
        del model
        log.info("evicted %s %s", key[0], why)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def clear(self) -> None:
        with self._lock:
            self._models.clear()
            self._tags.clear()
            self.loads.clear()
            self.load_seconds.clear()
            gc.collect()


MODELS = ModelCache()
