"""Step caching (LightX2V's `feature_caching`): skip the DiT's transformer blocks on steps where their output
would barely change, adding the residual (blocks' output minus input) saved at the last computed step instead.

The patch embedding, time/text embedders, output norm and projection always run; only the block stack is
skipped, exactly as LightX2V's Wan `WanTransformerInferTeaCaching` / `WanTransformerInferMagCaching` do. Each
branch of a CFG step (conditional, unconditional) keeps its own state, as LightX2V's even/odd (Tea) and
{True, False} (Mag) state does, with LightX2V's decision rules and key names:

- `Tea` (TeaCache): the relative L1 change of the timestep modulation (`embed0`, the blocks' 6-way projection,
  with `use_ret_steps`; else `embed`, the time embedding) since the previous step, rescaled by the polynomial
  `coefficients[0]` (`use_ret_steps`) or `coefficients[1]`, is accumulated; while the sum stays below
  `teacache_thresh` the blocks are skipped, else they run and the sum restarts. The first 5 steps (1 without
  `use_ret_steps`) and, without `use_ret_steps`, the last step always run.
- `Mag` (MagCache): from step int(infer_steps * `magcache_retention_ratio`) on, the calibrated residual
  magnitude ratios `magcache_ratios[0]` (conditional) / `[1]` (unconditional) are multiplied up since the last
  computed step; the error |1 - product| is accumulated and the blocks are skipped while it stays below
  `magcache_thresh` and at most `magcache_K` steps in a row were skipped. `magcache_calibration` runs every
  step and reports the measured ratios (in the artifact's sidecar; LightX2V prints them and writes JSON files
  into its working directory).

Step indices are the schedule's global ones (LightX2V's `scheduler.step_index`), so a Wan2.2 expert pair uses
the same thresholds and ratio tables as one model would. The state belongs to one expert's denoise stage and
nothing crosses from the high-noise to the low-noise expert: in LightX2V each expert is its own WanModel with
its own caching state too. The first step an expert runs therefore always computes its blocks (it has no
residual yet; LightX2V would index a missing residual there). Because the state never outlives the stage and a
denoise artifact is written whole at its end, a stage killed midway re-runs from its first step and gives the
same bytes as an uninterrupted run.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import numpy as np
import torch

from ..config import CACHING_OFF as OFF

TEA_RET_STEPS = 5  # LightX2V's `ret_steps` with use_ret_steps (1 without)


def cache_params(values: dict[str, Any], n_steps: int) -> dict[str, Any] | None:
    """The caching settings that change a denoise artifact (part of its cache key), or None when caching is
    off. `n_steps` is the schedule's step count (LightX2V's `infer_steps`). Raises ValueError when the
    MagCache ratio tables do not cover every step."""
    mode = values.get("feature_caching") or OFF
    if mode == OFF:
        return None
    if mode == "Tea":
        ret = bool(values["use_ret_steps"])
        return {"mode": "Tea", "teacache_thresh": float(values["teacache_thresh"]), "use_ret_steps": ret,
                "coefficients": [float(x) for x in values["coefficients"][0 if ret else 1]], "infer_steps": n_steps}
    ratios = [[float(x) for x in r] for r in values["magcache_ratios"]]
    calibration = bool(values["magcache_calibration"])
    if not calibration and min(len(r) for r in ratios) < n_steps:
        raise ValueError(f"magcache_ratios has {min(len(r) for r in ratios)} ratios per branch but the schedule "
                         f"has {n_steps} steps (calibrate with magcache_calibration for this step count)")
    return {"mode": "Mag", "magcache_thresh": float(values["magcache_thresh"]), "magcache_K": int(values["magcache_K"]),
            "magcache_retention_ratio": float(values["magcache_retention_ratio"]),
            "magcache_ratios": [r[:n_steps] for r in ratios], "magcache_calibration": calibration,
            "infer_steps": n_steps}


class _Branch:
    """One CFG branch's caching state (LightX2V's *_even / *_odd attributes)."""

    def __init__(self):
        self.residual: torch.Tensor | None = None
        self.previous_mod: torch.Tensor | None = None  # Tea: the previous step's modulation input
        self.accumulated = 0.0  # Tea: rescaled rel-L1 sum; Mag: error sum
        self.mag_ratio, self.mag_steps = 1.0, 0
        self.calibration: dict[str, list[float]] = {"norm_ratio": [1.0], "norm_std": [0.0], "cos_dis": [0.0]}


class StepCache:
    """Caching state of one denoise stage (one expert's steps). `install(transformer)` routes the DiT's block
    stack through it; `predict(base)` wraps a predict function so that each step's forwards are labelled with
    their step and branch."""

    def __init__(self, params: dict[str, Any], first_step: int):
        self.params = params
        self.mode = params["mode"]
        self.branches = {True: _Branch(), False: _Branch()}
        self.step = first_step - 1  # the schedule's index of the step before this stage's first
        self.pending: list[list[bool]] = []  # per forward still to come this step: the branch of each batch row
        self.temb: torch.Tensor | None = None
        self.skipped: dict[bool, list[int]] = {True: [], False: []}
        self.forwards = 0
        self.block_runs = 0  # forwards of the block stack actually run (a batched CFG forward counts once)
        if self.mode == "Tea":
            self.rescale = np.poly1d(params["coefficients"])
            self.ret_steps = TEA_RET_STEPS if params["use_ret_steps"] else 1
            self.cutoff = params["infer_steps"] if params["use_ret_steps"] else params["infer_steps"] - 1

    # ---- decisions (LightX2V's calculate_should_calc / infer_main_blocks) ------------------------------------

    def _tea_skip(self, b: _Branch, mod: torch.Tensor) -> bool:
        step, prev = self.step, b.previous_mod
        b.previous_mod = mod.clone()
        if step < self.ret_steps or step >= self.cutoff or prev is None or b.residual is None:
            b.accumulated = 0.0
            return False
        rel = ((mod.float() - prev.float()).abs().mean() / prev.float().abs().mean()).item()
        b.accumulated += float(self.rescale(rel))
        if b.accumulated < self.params["teacache_thresh"]:
            return True
        b.accumulated = 0.0
        return False

    def _mag_skip(self, b: _Branch, cond: bool) -> bool:
        p = self.params
        if p["magcache_calibration"] or self.step < int(p["infer_steps"] * p["magcache_retention_ratio"]):
            return False
        b.mag_ratio *= p["magcache_ratios"][0 if cond else 1][self.step]
        b.mag_steps += 1
        b.accumulated += abs(1 - b.mag_ratio)
        if b.residual is not None and b.accumulated < p["magcache_thresh"] and b.mag_steps <= p["magcache_K"]:
            return True
        b.accumulated, b.mag_steps, b.mag_ratio = 0.0, 0, 1.0
        return False

    def _skip(self, cond: bool, row: int, timestep_proj: torch.Tensor) -> bool:
        b = self.branches[cond]
        if self.mode == "Tea":
            mod = timestep_proj[row] if self.params["use_ret_steps"] else self.temb[row]
            return self._tea_skip(b, mod)
        return self._mag_skip(b, cond)

    def _calibrate(self, b: _Branch, residual: torch.Tensor) -> None:
        if b.residual is None:
            return
        ratio = residual.float().norm(dim=-1) / b.residual.float().norm(dim=-1)
        cos = torch.nn.functional.cosine_similarity(residual.float(), b.residual.float(), dim=-1, eps=1e-8)
        b.calibration["norm_ratio"].append(round(ratio.mean().item(), 5))
        b.calibration["norm_std"].append(round(ratio.std().item(), 5))
        b.calibration["cos_dis"].append(round((1 - cos).mean().item(), 5))

    # ---- the block stack --------------------------------------------------------------------------------------

    def run_blocks(self, blocks, hidden_states, encoder_hidden_states, timestep_proj, rotary_emb):
        if not self.pending:
            raise RuntimeError("step cache: a DiT forward outside a labelled prediction")
        rows = self.pending.pop(0)
        if len(rows) != hidden_states.shape[0]:
            raise RuntimeError(f"step cache: a forward of batch {hidden_states.shape[0]} labelled {rows}")
        skip = [self._skip(cond, i, timestep_proj) for i, cond in enumerate(rows)]
        self.forwards += len(rows)
        for cond, s in zip(rows, skip):
            if s:
                self.skipped[cond].append(self.step)
        if all(skip):
            return hidden_states + torch.cat([self.branches[c].residual for c in rows])
        self.block_runs += 1
        x = hidden_states
        for block in blocks:
            x = block(x, encoder_hidden_states, timestep_proj, rotary_emb)
        out = []
        for i, (cond, s) in enumerate(zip(rows, skip)):
            b = self.branches[cond]
            if s:  # this branch skips while the other computes (batched CFG): LightX2V's output for it
                out.append(hidden_states[i:i + 1] + b.residual)
                continue
            residual = x[i:i + 1] - hidden_states[i:i + 1]
            if self.params.get("magcache_calibration"):
                self._calibrate(b, residual)
            b.residual = residual
            out.append(x[i:i + 1])
        return out[0] if len(out) == 1 else torch.cat(out)

    @contextlib.contextmanager
    def install(self, transformer):
        """Route `transformer`'s blocks through this cache while the context is open (the model is restored
        after, so a resident model serves uncached stages unchanged)."""
        dit = transformer
        while not hasattr(dit, "blocks") and hasattr(dit, "transformer"):
            dit = dit.transformer  # e.g. the Wan2.1 I2V wrapper that adds CLIP features
        if not (hasattr(dit, "blocks") and hasattr(dit, "condition_embedder")):
            raise TypeError(f"step caching needs a Wan DiT (blocks, condition_embedder); got {type(dit).__name__}")
        original = dit.blocks
        hook = dit.condition_embedder.register_forward_hook(self._keep_temb)
        dit.blocks = torch.nn.ModuleList([_CachedBlocks(original, self)])
        try:
            yield
        finally:
            dit.blocks = original
            hook.remove()

    def _keep_temb(self, module, args, output):
        self.temb = output[0]  # LightX2V's `embed`; the block modulation `embed0` reaches the blocks directly

    def predict(self, base: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        """`base` (stages.denoise.predict_noise's signature) with each call counted as the next step and its
        forwards labelled: conditional first, then unconditional, or one batch of both with batched CFG."""

        def predict(transformer, model_input, timestep, context, context_null, guide_scale, batched_cfg=False):
            self.step += 1
            if context_null is None:
                self.pending = [[True]]
            elif batched_cfg:
                self.pending = [[True, False]]
            else:
                self.pending = [[True], [False]]
            out = base(transformer, model_input, timestep, context, context_null, guide_scale, batched_cfg)
            if self.pending:
                raise RuntimeError(f"step cache: {len(self.pending)} labelled forwards were not run")
            return out

        return predict

    def report(self) -> dict[str, Any]:
        """For the sidecar: forwards skipped (per branch, with their step indices)."""
        out = {"mode": self.mode, "forwards": self.forwards,
               "forwards_skipped": len(self.skipped[True]) + len(self.skipped[False]),
               "block_stack_runs": self.block_runs,
               "skipped_steps": {"cond": self.skipped[True], "uncond": self.skipped[False]}}
        if self.params.get("magcache_calibration"):
            out["calibration"] = {"cond": self.branches[True].calibration, "uncond": self.branches[False].calibration}
        return out


class _CachedBlocks(torch.nn.Module):
    """Stands in for the DiT's block list during a cached stage: one 'block' that runs the real ones or not."""

    def __init__(self, blocks: torch.nn.ModuleList, cache: StepCache):
        super().__init__()
        self.inner = blocks
        self.cache = cache

    def forward(self, hidden_states, encoder_hidden_states, timestep_proj, rotary_emb):
        return self.cache.run_blocks(self.inner, hidden_states, encoder_hidden_states, timestep_proj, rotary_emb)
