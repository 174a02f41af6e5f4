"""Resident models: a process-wide cache bounded by a memory budget, the device/dtype policy, and `get_model`,
how a stage gets the model its spec names.

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
from .fast import perf

log = logging.getLogger(__name__)


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DIT_COMPONENTS = ("high", "low", "single")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return DTYPES[name]


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

    def keys(self) -> list[tuple]:
        """(component, fingerprint, device, dtype) of each resident model, least recently used first."""
        with self._lock:
            return list(self._models)

    def evict(self, where: Callable[[tuple], bool], why: str) -> int:
        """Drop the resident models whose key satisfies `where`; returns how many."""
        with self._lock:
            keys = [k for k in self._models if where(k)]
            for key in keys:
                self._drop(key, why)
            return len(keys)

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


def get_model(spec, fingerprint: str, component: str | None = None, device: torch.device | None = None) -> Any:
    """The model a stage spec needs, from the process-wide cache (loaded at most once while it fits the
    budget). `component` picks another component of the spec's model (the image stage's CLIP encoder, with
    its own fingerprint); `device` overrides the spec's (a parallel rank's own GPU)."""
    from .config import component_device
    from .models.loader import ModelRef, estimate_bytes, load_component, vae_tiling, with_tiling

    ref = ModelRef.from_dict(spec.model)
    component = component or spec.model["component"]
    device = device or torch.device(spec.runtime["device"])
    device = component_device(component, spec.runtime, device)  # t5/vae/clip_cpu_offload
    dtype = DTYPES[spec.runtime["dtype"]]
    gb = spec.runtime.get("vram_budget_gb" if device.type == "cuda" else "ram_budget_gb")
    budget = int(gb * 2**30) if gb else default_budget(device)
    key = (component, fingerprint, str(device), str(dtype))
    estimate = estimate_bytes(ref, component)
    if component in DIT_COMPONENTS:
        # fast paths (attention backend, compile, block streaming) from the run's settings; on a GPU only one
        # expert is resident at a time (stage-major order needs just one; its activations get the room)
        return MODELS.get(key, lambda: load_fast_dit(load_component, ref, component, device, dtype, spec.runtime, budget),
                          budget, estimate, exclusive="dit" if device.type == "cuda" else None)
    tiling = vae_tiling(component, spec.runtime)  # use_tiling_vae: a tiled VAE is its own cache entry
    return MODELS.get(key + (("tiled",) if tiling else ()),
                      lambda: with_tiling(load_component(ref, component, device, dtype), tiling), budget, estimate)


def load_fast_dit(load, ref, component: str, device: torch.device, dtype: torch.dtype, runtime: dict[str, Any],
                  budget: int) -> torch.nn.Module:
    """Load a DiT expert with `load(ref, component, device, dtype)` and apply the run's fast paths.
    The choices made (and why a path was not taken) are kept on the model as `wan_batch_perf`."""
    from .fast.attention import apply_attention

    report: dict[str, Any] = {}
    if device.type == "cuda":
        from .fast.accel import use_compile_cache

        use_compile_cache()  # before anything of this process compiles (Inductor reads its directory once)
    offload = bool(runtime.get("cpu_offload")) and runtime.get("offload_granularity", "block") in ("block", "phase")
    if offload and device.type != "cuda":
        report["offload"] = "not used: cpu_offload streams to a GPU and the device is " + device.type
        offload = False
    source = None
    if offload and runtime.get("lazy_load") and getattr(ref, "dits", None):
        from safetensors import SafetensorError

        from .errors import CheckpointError
        from .models.lazy import ExpertSource

        # the streamed blocks are never loaded here: a skeleton with them on the meta device, read on use
        try:
            source = ExpertSource(ref, component, dtype)
            model = source.skeleton(runtime.get("offload_granularity", "block"))
        except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
            raise CheckpointError(f"cannot load the {component} model from {ref.path}: {e}") from e
    else:
        model = load(ref, component, torch.device("cpu") if offload else device, dtype)
    if runtime.get("lazy_load") and not offload:
        report["lazy_load"] = "not used: lazy_load streams blocks under cpu_offload (block or phase) on a GPU"
    report["attention"] = apply_attention(model, runtime.get("self_attn_1_type"),
                                          runtime.get("cross_attn_1_type") or runtime.get("cross_attn_2_type"),
                                          device)
    if offload:
        report["offload"] = _stream(model, component, device, runtime, budget, source)
    if runtime.get("torch_compile"):
        if offload:
            report["compile"] = "not used: the streaming hooks cannot run inside a compiled block"
        elif device.type != "cuda":
            report["compile"] = "not used: compile is for CUDA runs"
        else:
            from .fast.accel import compile_blocks

            report["compile"] = compile_blocks(model)
    model.wan_batch_perf = report
    log.info("%s perf settings: %s", component, report)
    return model


def _stream(model, component: str, device: torch.device, runtime: dict[str, Any], budget: int, source) -> dict:
    from .fast.offload import BlockStreamer, plan_resident_units

    granularity = runtime.get("offload_granularity", "block")
    reserve = int(float(runtime.get("activation_reserve_gb") or perf.DEFAULT_ACTIVATION_RESERVE_GB) * 2**30)
    resident = plan_resident_units(model, granularity, budget, reserve)
    streamer = BlockStreamer(model, device, granularity, resident_units=resident, lazy_source=source)
    model.wan_batch_streamer = streamer  # keeps the hooks, buffers and the open checkpoint alive with the model
    return {"granularity": granularity, "resident_units": resident, "streamed_units": len(streamer.streamed),
            "lazy_load": source is not None,
            "lazy_source": str(source.weights.path) if source is not None else None}
