"""The solver schedule of one job, and how it is handed from the high-noise to the low-noise expert.

Normal schedule: diffusers' UniPC flow solver (the one Wan's pipelines use), `infer_steps` with `sample_shift`,
CFG, and the expert switch at the first timestep below `boundary * 1000`. Distilled schedule (LightX2V 4-step):
flow-matching Euler over `denoising_step_list` (shifted by `sample_shift`, as LightX2V does), switch at
`boundary_step_index`, no CFG. UniPC is multistep: the low-noise expert must continue with the solver history
of the high-noise steps, so the scheduler state travels with the latents in the artifact.
"""
from __future__ import annotations

import copy
import json
from functools import lru_cache
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

# Mutable solver state, per scheduler class; everything else is rebuilt by set_timesteps.
_STATE_ATTRS = {
    "UniPCMultistepScheduler": ("model_outputs", "timestep_list", "lower_order_nums", "last_sample",
                                "this_order", "_step_index", "_begin_index"),
    "FlowMatchEulerDiscreteScheduler": ("_step_index", "_begin_index"),
}


def make_scheduler(schedule: dict[str, Any]):
    """A fresh scheduler with its timesteps set, from the `schedule` part of a denoise spec: a copy of the one
    built for the same schedule before (diffusers' from_config inspects signatures: 4x the time of a copy, paid
    by every denoise task of a batch)."""
    return copy.deepcopy(_template(json.dumps(schedule, sort_keys=True)))


@lru_cache(maxsize=16)
def _template(schedule_json: str):
    """Built once per schedule and never used itself: make_scheduler hands out copies."""
    return _build(json.loads(schedule_json))


def _build(schedule: dict[str, Any]):
    if schedule["kind"] == "distill":
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=schedule["shift"])
        sched.set_timesteps(sigmas=[t / 1000.0 for t in schedule["denoising_step_list"]])
    else:
        sched = UniPCMultistepScheduler.from_config({**schedule["scheduler_config"], "flow_shift": schedule["shift"]})
        sched.set_timesteps(schedule["infer_steps"])
    sched.set_begin_index(0)
    return sched


def split_index(schedule: dict[str, Any], timesteps: torch.Tensor) -> int:
    """Index of the first step the low-noise expert takes."""
    if schedule["kind"] == "distill":
        return int(schedule["boundary_step_index"])
    boundary_t = schedule["boundary"] * 1000
    for i, t in enumerate(timesteps.tolist()):
        if t < boundary_t:
            return i
    return len(timesteps)


def export_state(sched) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, json-able description) of the scheduler's mutable state."""
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {"class": type(sched).__name__}

    def put(name: str, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[f"sched.{name}"] = value
            return {"tensor": f"sched.{name}"}
        if isinstance(value, (list, tuple)):
            return {"list": [put(f"{name}.{i}", v) for i, v in enumerate(value)]}
        return {"value": value}

    for attr in _STATE_ATTRS[type(sched).__name__]:
        meta[attr] = put(attr, getattr(sched, attr, None))
    return tensors, meta


def import_state(sched, tensors: dict[str, torch.Tensor], meta: dict[str, Any], device) -> None:
    if meta["class"] != type(sched).__name__:
        raise ValueError(f"scheduler state is for {meta['class']}, not {type(sched).__name__}")

    def get(node: dict[str, Any]) -> Any:
        if "tensor" in node:
            return tensors[node["tensor"]].to(device)
        if "list" in node:
            return [get(v) for v in node["list"]]
        return node["value"]

    for attr in _STATE_ATTRS[meta["class"]]:
        setattr(sched, attr, get(meta[attr]))
