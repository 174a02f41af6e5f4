"""The `parallel` config key (LightX2V's layout) and what it means for one Denoise task.

    "parallel": {"seq_p_size": 2, "seq_p_attn_type": "ulysses", "cfg_p_size": 2}

seq_p_size ranks split the DiT's token sequence (Ulysses), cfg_p_size (1 or 2) rank groups split the
conditional and unconditional predictions of classifier-free guidance; the task runs on
seq_p_size * cfg_p_size processes, one GPU each. Absent, `false`, or sizes of 1: one process, as always.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

log = logging.getLogger(__name__)

KNOWN = ("seq_p_size", "cfg_p_size", "seq_p_attn_type")
# LightX2V keys inside `parallel` that only tune its own kernels: accepted without effect here.
IGNORED = ("seq_p_fp8_comm", "seq_p_head_parallel", "seq_p_tensor_fusion", "vae_p_size")


@dataclass(frozen=True)
class ParallelLayout:
    seq: int = 1
    cfg: int = 1

    @property
    def world(self) -> int:
        return self.seq * self.cfg

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def as_dict(self) -> dict[str, int]:
        return {"seq_p_size": self.seq, "cfg_p_size": self.cfg}

    @classmethod
    def from_value(cls, value: Any) -> "ParallelLayout":
        """The layout of a validated `parallel` value (see `problems`)."""
        if not isinstance(value, dict):
            return cls()
        return cls(seq=int(value.get("seq_p_size", 1) or 1), cfg=int(value.get("cfg_p_size", 1) or 1))

    @classmethod
    def from_runtime(cls, runtime: dict[str, Any]) -> "ParallelLayout":
        return cls.from_value(runtime.get("parallel"))


def problems(value: Any, enable_cfg: bool) -> list[str]:
    """Sentences naming what is wrong with a config's `parallel` value (empty when it is usable)."""
    if value is None or value is False:
        return []
    if value is True:
        return ["config key 'parallel': give the layout, e.g. {\"seq_p_size\": 2, \"cfg_p_size\": 1} "
                "(true alone does not say how many GPUs)"]
    if not isinstance(value, dict):
        return []  # a wrong type is reported by the config's type check
    out: list[str] = []
    for key in value:
        if key not in KNOWN and key not in IGNORED:
            log.warning("config key 'parallel.%s' is unknown and ignored (known: %s)", key, ", ".join(KNOWN))
    for key in ("seq_p_size", "cfg_p_size"):
        v = value.get(key, 1)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            out.append(f"config key 'parallel.{key}': must be a positive integer (got {v!r})")
    cfg = value.get("cfg_p_size", 1)
    if isinstance(cfg, int) and not isinstance(cfg, bool) and cfg > 2:
        out.append(f"config key 'parallel.cfg_p_size': must be 1 or 2 (the conditional and unconditional "
                   f"predictions; got {cfg})")
    if cfg == 2 and not enable_cfg:
        out.append("config key 'parallel.cfg_p_size': 2 needs enable_cfg true (with CFG off there is no "
                   "unconditional prediction to run on the second rank group)")
    attn = value.get("seq_p_attn_type", "ulysses")
    if attn != "ulysses":
        out.append(f"config key 'parallel.seq_p_attn_type': only 'ulysses' is implemented (got {attn!r}; "
                   "ring attention needs an attention kernel that returns log-sum-exp)")
    return out
