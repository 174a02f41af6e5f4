"""Helpers of the checkpoint-format tests: tiny run settings, running the staged pipeline in-process on a
config (the same stage functions the Luigi tasks call), and stand-in folders shared by a test session."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import make_image, write_manifest

PROMPT = "a red circle moving left on a blue background"
# Small enough for 2 CPU cores, big enough to exercise both experts, CFG, the VAE's temporal path.
SMALL = {"target_video_length": 5, "target_height": 32, "target_width": 32, "device": "cpu", "dtype": "float32",
         "text_len": 512, "fps": 16}
CFG_RUN = {**SMALL, "infer_steps": 4, "enable_cfg": True, "sample_guide_scale": [4.0, 3.0], "sample_shift": 5.0}
DISTILL_RUN = {**SMALL, "infer_steps": 4, "denoising_step_list": [1000, 750, 500, 250], "boundary_step_index": 2,
               "enable_cfg": False, "sample_shift": 5.0, "sample_guide_scale": 1.0}


def staged_run(tmp: Path, config: dict, image: Path | None = None, seed: int = 7) -> dict:
    """Plan one job under `config` and run every stage with execute.run_spec; returns the final latents, the
    MP4 bytes and the image artifact's tensors (I2V)."""
    from pipeline.config import load_config
    from pipeline.execute import run_spec
    from pipeline.manifest import read_manifest
    from pipeline.plan import plan_jobs
    from pipeline.store import ArtifactStore

    tmp.mkdir(parents=True, exist_ok=True)
    cfg_path = tmp / "config.json"
    cfg_path.write_text(json.dumps(config))
    row = {"prompt": PROMPT, "seed": seed, "job_id": "job"}
    if image is not None:
        row["image"] = str(image)
    manifest = write_manifest(tmp / "jobs.parquet", [row])
    cfg = load_config(cfg_path)
    plan = plan_jobs(read_manifest(manifest, cfg), cfg)[0]
    assert plan.decode is not None, plan.error
    store = ArtifactStore(tmp / "store")
    for spec in plan.decode.chain():
        run_spec(spec, store)
    stages = plan.stages()
    out = {"latents": store.load_tensors(plan.decode.upstream["latents"].ref)["latents"],
           "video": store.payload_path(plan.decode.ref).read_bytes(), "plan": plan}
    if "image" in stages:
        out["image"] = store.load_tensors(stages["image"].ref)
    return out


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


@pytest.fixture(scope="session")
def first_frame(tmp_path_factory) -> Path:
    return make_image(tmp_path_factory.mktemp("img") / "first.png", size=(100, 70))


@pytest.fixture(scope="session")
def wan_t2v(tmp_path_factory, tiny_root) -> Path:
    """The tiny T2V model in Wan's original layout (fp32 files, so runs can match bit for bit)."""
    from pipeline.testing.standins import write_wan_layout

    return write_wan_layout(tiny_root / "t2v", tmp_path_factory.mktemp("wan") / "Wan2.2-T2V-A14B")


@pytest.fixture(scope="session")
def wan_i2v(tmp_path_factory, tiny_root) -> Path:
    from pipeline.testing.standins import write_wan_layout

    return write_wan_layout(tiny_root / "i2v", tmp_path_factory.mktemp("wan") / "Wan2.2-I2V-A14B")


@pytest.fixture(scope="session")
def baselines(tmp_path_factory, tiny_root, first_frame):
    """Runs from the diffusers layout, computed once per session and kind."""
    cache: dict[str, dict] = {}

    def get(kind: str) -> dict:
        if kind not in cache:
            task, schedule = kind.split("-")
            cfg = {**(CFG_RUN if schedule == "cfg" else DISTILL_RUN), "model_path": str(tiny_root / task)}
            cache[kind] = staged_run(tmp_path_factory.mktemp(f"base-{kind}"), cfg,
                                     first_frame if task == "i2v" else None)
        return cache[kind]

    return get
