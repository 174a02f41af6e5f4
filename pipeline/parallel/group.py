"""The rank group of one parallel Denoise task: process group, device and the (cfg, ring, ulysses) mesh.

Ranks are laid out as arange(world).reshape(cfg_p_size, 1, seq_p_size): the seq_p_size ranks of one
Ulysses group are neighbours (they exchange activations twice per attention layer, so on one NVLink host
they should be adjacent GPUs), and the two CFG groups only swap one noise prediction per step.
"""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .layout import ParallelLayout

MESH_DIMS = ("cfg", "ring", "ulysses")


@dataclass
class RankGroup:
    layout: ParallelLayout
    rank: int
    local_rank: int
    device: torch.device
    mesh: DeviceMesh

    @property
    def world(self) -> int:
        return self.layout.world

    @property
    def cfg_index(self) -> int:
        """0: this rank computes the conditional prediction, 1: the unconditional one."""
        return self.rank // self.layout.seq

    @property
    def cfg_group(self):
        return self.mesh["cfg"].get_group() if self.layout.cfg > 1 else None

    @property
    def writer(self) -> bool:
        """Rank 0 writes the artifact (every rank holds the same latents)."""
        return self.rank == 0


def init_group(layout: ParallelLayout, device_type: str, timeout_s: float = 1800.0) -> RankGroup:
    """Join the process group torchrun set up (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT in the
    environment), NCCL with one GPU per rank on CUDA, gloo on CPU, and build the layout's mesh. Called again
    with another layout of the same size, it reuses the process group and builds a new mesh."""
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    if world != layout.world:
        raise RuntimeError(f"started with {world} processes, the parallel layout {layout.as_dict()} needs "
                           f"{layout.world}")
    device = torch.device("cuda", local_rank) if device_type == "cuda" else torch.device("cpu")
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=timeout_s)
        if device_type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device, timeout=timeout)
        else:
            dist.init_process_group("gloo", timeout=timeout)
    mesh = init_device_mesh(device_type, (layout.cfg, 1, layout.seq), mesh_dim_names=MESH_DIMS)
    return RankGroup(layout=layout, rank=rank, local_rank=local_rank, device=device, mesh=mesh)


def close_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
