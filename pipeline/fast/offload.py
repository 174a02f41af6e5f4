"""Low-VRAM DiT: stream the transformer blocks' weights to the GPU while the previous block computes.

`cpu_offload` + `offload_granularity` (LightX2V's keys): the units are whole blocks (`block`) or the three
phases of a block, self-attention, cross-attention and feed-forward (`phase`, a third of the VRAM). Each
unit's tensors live in one flat pinned CPU buffer (one DMA per unit); the GPU holds `slots` (2) buffers of the
largest unit. A forward pre-hook on unit i binds its parameters to its slot and starts copying unit i+1 into
the other slot on a side CUDA stream, after the unit that last used that slot has finished; so the transfer
overlaps compute and the order is cyclic (the last unit prefetches the first, for the next forward).

Units that fit the VRAM budget stay resident (`resident_units`): with 24 GB a bf16 14B expert keeps most of its
blocks and streams the rest; with 8 GB it streams nearly all. Running several jobs of a stage as one batch
(block-major across jobs) makes each streamed unit serve every job before the next is fetched.

`lazy_load` keeps nothing on the CPU: each unit is read from the expert's checkpoint (models.lazy.ExpertSource:
whatever format the loader resolved) when it is needed, in a background thread one unit ahead, into a pinned
staging buffer (the RAM floor is two units, plus the non-block weights).
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from typing import Callable

import torch

log = logging.getLogger(__name__)

_ALIGN = 512  # bytes; keeps every tensor view aligned for vectorised kernels


@dataclass
class _Entry:
    module: torch.nn.Module
    name: str
    is_param: bool
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int
    nbytes: int
    key: str  # full name in the model's state dict (lazy_load reads it by this name)


@dataclass
class _Unit:
    index: int
    module: torch.nn.Module
    entries: list[_Entry] = field(default_factory=list)
    nbytes: int = 0
    host: torch.Tensor | None = None  # flat pinned buffer (None: resident, or lazy_load)
    resident: bool = False


def stream_units(model: torch.nn.Module, granularity: str = "block") -> list[tuple[str, torch.nn.Module]]:
    """(qualified name, module) of the units streamed for `granularity` ('block' or 'phase'), in forward order."""
    if granularity not in ("block", "phase"):
        raise ValueError(f"offload_granularity must be 'block' or 'phase' for streaming (got {granularity!r})")
    units = []
    for i, block in enumerate(model.blocks):
        if granularity == "block":
            units.append((f"blocks.{i}", block))
        else:
            units += [(f"blocks.{i}.{p}", getattr(block, p)) for p in ("attn1", "attn2", "ffn")]
    return units


def _layout(prefix: str, unit: torch.nn.Module, index: int) -> _Unit:
    u = _Unit(index, unit)
    offset = 0
    for mod_name, mod in unit.named_modules():
        for is_param, table in ((True, mod._parameters), (False, mod._buffers)):
            for name, t in table.items():
                if t is None:
                    continue
                nbytes = t.numel() * t.element_size()
                key = ".".join(x for x in (prefix, mod_name, name) if x)
                u.entries.append(_Entry(mod, name, is_param, t.dtype, tuple(t.shape), offset, nbytes, key))
                offset += -(-nbytes // _ALIGN) * _ALIGN
    u.nbytes = offset
    return u


def _views(flat: torch.Tensor, unit: _Unit) -> list[torch.Tensor]:
    return [flat[e.offset:e.offset + e.nbytes].view(e.dtype).view(e.shape) for e in unit.entries]


def _bind(unit: _Unit, tensors: list[torch.Tensor]) -> None:
    for e, t in zip(unit.entries, tensors):
        if e.is_param:
            p = e.module._parameters[e.name]
            if p.is_meta:  # lazy_load's skeleton: a meta parameter cannot take real data in place
                e.module._parameters[e.name] = torch.nn.Parameter(t, requires_grad=False)
            else:
                p.data = t
        else:
            e.module._buffers[e.name] = t


class BlockStreamer:
    """Streams a Wan transformer's blocks (or phases) from CPU memory (or disk) to `device` during forward.

    Build it on a model whose weights are anywhere (CPU or GPU): the non-streamed parts (embeddings, head)
    are moved to `device`; streamed units keep a pinned CPU copy and are bound to GPU slots on use."""

    def __init__(self, model: torch.nn.Module, device: torch.device | str, granularity: str = "block",
                 resident_units: int = 0,
                 lazy_source: Callable[[list[str]], dict[str, torch.Tensor]] | None = None):
        self.model, self.device = model, torch.device(device)
        self.granularity = granularity
        self.lazy_source = lazy_source
        named = stream_units(model, granularity)
        self.units = [_layout(name, mod, i) for i, (name, mod) in enumerate(named)]
        cuda = self.device.type == "cuda"
        inside = {id(m) for u in self.units for m in u.module.modules()}
        # Everything outside the streamed units goes to the device now (small: embeddings, modulation, head).
        for mod in model.modules():
            if id(mod) in inside:
                continue
            for name, t in list(mod._parameters.items()):
                if t is not None and t.device != self.device:
                    t.data = t.data.to(self.device)
            for name, t in list(mod._buffers.items()):
                if t is not None and t.device != self.device:
                    mod._buffers[name] = t.to(self.device)
        resident_units = max(0, min(resident_units, len(self.units)))
        for u in self.units[:resident_units]:
            u.resident = True
            tensors = self._read_unit(u) if lazy_source is not None else self._current(u)
            _bind(u, [t.to(self.device) for t in tensors])
        streamed = [u for u in self.units if not u.resident]
        self.streamed = streamed
        if lazy_source is None:
            for u in streamed:  # one flat pinned buffer per unit; the module's tensors become views of it
                u.host = torch.empty(u.nbytes, dtype=torch.uint8, pin_memory=cuda)
                views = _views(u.host, u)
                for v, t in zip(views, self._current(u)):
                    v.copy_(t)
                _bind(u, views)
        else:
            for u in streamed:  # drop the weights: they are read from disk on use
                _bind(u, [torch.empty(0, dtype=e.dtype) for e in u.entries])
        max_bytes = max((u.nbytes for u in streamed), default=0)
        self.slots = [torch.empty(max_bytes, dtype=torch.uint8, device=self.device) for _ in range(2)]
        self._slot_user: list[_Unit | None] = [None, None]
        self._slot_of: dict[int, int] = {}  # streamed position -> slot it was (pre)fetched into
        self._active_slot = 1  # slot of the unit computing now; the next fetch takes the other one
        self._copy_stream = torch.cuda.Stream(self.device) if cuda else None
        self._ready: dict[int, torch.cuda.Event] = {}
        self._done: dict[int, torch.cuda.Event] = {}
        self._pending: dict[int, bool] = {}
        self._staging = _LazyStaging(self, cuda) if lazy_source is not None else None
        self.bytes_streamed = 0
        self._handles = []
        for pos, u in enumerate(streamed):
            self._handles.append(u.module.register_forward_pre_hook(self._pre_hook(pos)))
            self._handles.append(u.module.register_forward_hook(self._post_hook(pos)))

    def _read_unit(self, u: _Unit) -> list[torch.Tensor]:
        """A unit's tensors from the lazy source, one at a time (lazy_load: resident units are read once)."""
        return [self.lazy_source([e.key])[e.key].to(e.dtype).reshape(e.shape) for e in u.entries]

    @property
    def host_bytes(self) -> int:
        """Bytes of CPU memory the streamer holds for the streamed units (pinned copies, or lazy_load's staging)."""
        staged = sum(b.numel() for b in self._staging.buffers) if self._staging else 0
        return staged + sum(u.host.numel() for u in self.streamed if u.host is not None)

    @staticmethod
    def _current(u: _Unit) -> list[torch.Tensor]:
        return [(e.module._parameters[e.name].data if e.is_param else e.module._buffers[e.name]) for e in u.entries]

    @property
    def resident_bytes(self) -> int:
        return sum(u.nbytes for u in self.units if u.resident) + sum(s.numel() for s in self.slots)

    def _prefetch(self, pos: int) -> None:
        """Start copying streamed unit `pos` into the slot not in use (side stream on CUDA; at once on CPU),
        after the unit that last used that slot has finished computing."""
        if pos in self._slot_of:
            return  # already fetched and not yet consumed
        u = self.streamed[pos]
        slot_i = 1 - self._active_slot
        previous = self._slot_user[slot_i]
        host = self._staging.get(pos) if self._staging else u.host
        dst = self.slots[slot_i][:u.nbytes]
        if self._copy_stream is not None:
            with torch.cuda.stream(self._copy_stream):
                if previous is not None and previous.index in self._done:
                    self._copy_stream.wait_event(self._done[previous.index])
                dst.copy_(host, non_blocking=True)
                ev = torch.cuda.Event()
                ev.record(self._copy_stream)
                self._ready[u.index] = ev
            if self._staging:
                self._staging.release_after(pos, ev)
        else:
            dst.copy_(host)
            if self._staging:
                self._staging.release_after(pos, None)
        self._slot_user[slot_i] = u
        self._slot_of[pos] = slot_i
        self.bytes_streamed += u.nbytes

    def _pre_hook(self, pos: int):
        def hook(module, args):
            u = self.streamed[pos]
            self._prefetch(pos)  # no-op when it was prefetched (the usual case)
            slot_i = self._slot_of.pop(pos)
            self._active_slot = slot_i
            if self._copy_stream is not None:
                torch.cuda.current_stream(self.device).wait_event(self._ready[u.index])
            _bind(u, _views(self.slots[slot_i], u))
            if len(self.streamed) > 1:
                self._prefetch((pos + 1) % len(self.streamed))  # overlaps this unit's compute
            return None
        return hook

    def _post_hook(self, pos: int):
        def hook(module, args, output):
            if self._copy_stream is not None:
                ev = torch.cuda.Event()
                ev.record(torch.cuda.current_stream(self.device))
                self._done[self.streamed[pos].index] = ev
            return None
        return hook

    def remove(self) -> None:
        """Stop streaming. Streamed units point at their pinned host copy again (the slots are reused by every
        unit, so after a forward they hold only the last ones); with lazy_load they are left empty."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        if self._copy_stream is not None:
            self._copy_stream.synchronize()
        for u in self.streamed:
            _bind(u, _views(u.host, u) if u.host is not None else [torch.empty(0, dtype=e.dtype) for e in u.entries])
        if self._staging:
            self._staging.close()


class _LazyStaging:
    """lazy_load: read unit tensors from disk in a background thread into pinned staging buffers (one per
    slot), one unit ahead of use."""

    def __init__(self, streamer: BlockStreamer, pinned: bool):
        self.s = streamer
        n = len(streamer.slots)
        size = max((u.nbytes for u in streamer.streamed), default=0)
        self.buffers = [torch.empty(size, dtype=torch.uint8, pin_memory=pinned) for _ in range(n)]
        self.free_events: list[torch.cuda.Event | None] = [None] * n  # DMA out of each buffer
        self.threads: dict[int, threading.Thread] = {}
        self.errors: dict[int, BaseException] = {}

    def _read(self, pos: int, buf: torch.Tensor) -> None:
        u = self.s.streamed[pos]
        try:  # one tensor at a time: RAM holds the staging buffers and one tensor in reading, not a second unit
            for v, e in zip(_views(buf, u), u.entries):
                v.copy_(self.s.lazy_source([e.key])[e.key].to(e.dtype).reshape(e.shape))
        except BaseException as e:  # noqa: BLE001 - re-raised in the forward that needs it
            self.errors[pos] = e

    def start(self, pos: int) -> None:
        if pos in self.threads:
            return
        b = pos % len(self.buffers)
        if self.free_events[b] is not None:
            self.free_events[b].synchronize()  # the DMA out of this buffer is done
            self.free_events[b] = None
        t = threading.Thread(target=self._read, args=(pos, self.buffers[b]), daemon=True)
        t.start()
        self.threads[pos] = t

    def get(self, pos: int) -> torch.Tensor:
        self.start(pos)
        self.threads.pop(pos).join()
        if pos in self.errors:
            raise RuntimeError(f"lazy_load could not read {self.s.streamed[pos].entries[0].key}: "
                               f"{self.errors.pop(pos)}")
        buf = self.buffers[pos % len(self.buffers)][:self.s.streamed[pos].nbytes]
        return buf

    def release_after(self, pos: int, event: torch.cuda.Event | None) -> None:
        self.free_events[pos % len(self.buffers)] = event
        # read the next unit from disk while this one is copied and computed
        self.start((pos + 1) % len(self.s.streamed))

    def close(self) -> None:
        for t in self.threads.values():
            t.join()
        self.threads.clear()


def safetensors_source(files: list[str], prefix: str = "") -> Callable[[list[str]], dict[str, torch.Tensor]]:
    """A lazy_load source over safetensors file(s): keys are looked up in whichever file holds them."""
    from safetensors import safe_open

    index: dict[str, str] = {}
    for f in files:
        with safe_open(f, framework="pt") as fh:
            for k in fh.keys():
                index[k] = f

    def read(keys: list[str]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        by_file: dict[str, list[str]] = {}
        for k in keys:
            full = prefix + k
            if full not in index:
                raise KeyError(f"tensor {full!r} is in none of {files}")
            by_file.setdefault(index[full], []).append(k)
        for f, ks in by_file.items():
            with safe_open(f, framework="pt") as fh:
                for k in ks:
                    out[k] = fh.get_tensor(prefix + k)
        return out

    return read


def plan_resident_units(model: torch.nn.Module, granularity: str, budget_bytes: int, reserve_bytes: int,
                        slots: int = 2) -> int:
    """How many leading units can stay on the GPU within `budget_bytes`, leaving `reserve_bytes` for
    activations and the non-streamed weights."""
    units = [_layout(n, m, i) for i, (n, m) in enumerate(stream_units(model, granularity))]
    unit_ids = {id(m) for u in units for m in u.module.modules()}
    other = sum(t.numel() * t.element_size() for m in model.modules() if id(m) not in unit_ids
                for t in list(m._parameters.values()) + list(m._buffers.values()) if t is not None)
    free = budget_bytes - reserve_bytes - other - slots * max(u.nbytes for u in units)
    n = 0
    for u in units:
        if free < u.nbytes:
            break
        free -= u.nbytes
        n += 1
    return n
