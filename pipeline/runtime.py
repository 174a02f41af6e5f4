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

log = logging.getLogger(__name__)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def module_bytes(obj: Any) -> int:
    """Parameter + buffer bytes of a module (or of the modules in a tuple)."""
    if isinstance(obj, (tuple, list)):
        return sum(module_bytes(o) for o in obj)
    if isinstance(obj, torch.nn.Module):
        return sum(t.numel() * t.element_size() for t in list(obj.parameters()) + list(obj.buffers()))
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


class ModelCache:
    def __init__(self) -> None:
        self._models: OrderedDict[tuple, tuple[Any, int]] = OrderedDict()
        self._lock = threading.RLock()
        self.loads: Counter = Counter()  # (component, fingerprint) -> times loaded in this process
        self.load_seconds: Counter = Counter()

    def get(self, key: tuple, load: Callable[[], Any], budget: int, estimate: int) -> Any:
        """The cached model for `key`, else `load()` it after evicting enough to fit `estimate` bytes."""
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key][0]
            self._evict_until(budget - estimate, keep=None)  # free room before the load, not after
            t0 = time.perf_counter()
            model = load()
            size = module_bytes(model)
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
            del self._models[key]
            log.info("evicted %s to stay within the memory budget", key[0])
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def clear(self) -> None:
        with self._lock:
            self._models.clear()
            self.loads.clear()
            self.load_seconds.clear()
            gc.collect()


MODELS = ModelCache()
