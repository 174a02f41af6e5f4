"""The tiny model's trainer (tools.train_tiny) on a miniature recipe: every phase runs, the result is
a model the pipeline loads and samples, a second run gives the same bytes, and a run with a work folder resumes
every finished phase instead of training again."""
from __future__ import annotations

import hashlib
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from tools import train_tiny as T

pytestmark = pytest.mark.slow  # ~1 minute on 2 cores: three miniature trainings

MINI = replace(T.QUICK, clips=8, dit_clips=12, i2v_clips=6, vae_image_steps=2, vae_steps=1, dit_steps=2,
               i2v_steps=2, dit_batch=2, vae_image_batch=2, vae_batch=1, check_clips=2, report_seeds=0)


def digests(folder: Path) -> dict[str, str]:
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file()}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two runs from scratch, and one more into the first run's work folder (which must only resume)."""
    tmp = tmp_path_factory.mktemp("train")
    threads = torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_num_threads(1)  # as the trainer's CLI does: float sums then do not depend on the core count
    try:
        T.train(MINI, tmp / "a", work=tmp / "work-a")
        T.train(MINI, tmp / "b", work=tmp / "work-b")
        yield tmp
    finally:  # train() switches deterministic kernels on for the process: the other tests get theirs back
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])


def test_training_is_deterministic(runs):
    a, b = digests(runs / "a"), digests(runs / "b")
    assert a == b
    weights = [k for k in a if k.endswith(".safetensors")]
    assert len(weights) == 2 * 4  # t2v and i2v: text encoder, VAE, two experts


def test_rerun_with_work_folder_resumes_every_phase(runs, capsys):
    capsys.readouterr()
    T.train(MINI, runs / "c", work=runs / "work-a")
    log = capsys.readouterr().out
    for phase in ("vae", "latents", "t2v", "i2v"):
        assert f"{phase}: resumed from" in log, log
    assert "step 0:" not in log  # nothing trained again
    assert digests(runs / "c") == digests(runs / "a")


def test_result_is_a_wan22_model_the_pipeline_samples(runs):
    parts = T.load_parts(runs / "a")
    assert parts["i2v"]["high"].config.in_channels == 36 and parts["t2v"]["high"].config.in_channels == 16
    video = T.generate(parts, "t2v", "a red circle moving left on a blue background", seed=0, size=64, frames=17,
                       steps=2)
    assert video.shape == (17, 64, 64, 3) and video.dtype == np.uint8
    # experts ship in bf16 except the modules diffusers keeps in fp32; the VAE stays fp32
    keep = set(parts["t2v"]["high"]._keep_in_fp32_modules)
    with safe_open(runs / "a" / "t2v" / "transformer" / "diffusion_pytorch_model.safetensors", "pt") as f:
        dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    assert {d for k, d in dtypes.items() if not keep & set(k.split("."))} == {"BF16"}
    assert {d for k, d in dtypes.items() if keep & set(k.split("."))} == {"F32"}
    with safe_open(runs / "a" / "t2v" / "vae" / "diffusion_pytorch_model.safetensors", "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}
