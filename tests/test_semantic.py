"""The embedded tiny model makes videos that follow their prompts, through the real staged pipeline (Luigi
RunManifest -> MP4 files), and breaking the pipeline on purpose makes that check fail.

Prompts are captions the model never saw in training (pipeline.tiny.world.HELD_OUT). A video passes when the colour of
its moving shape and the direction its centroid moves (read back from the MP4) are the prompt's. The bar is
80% of the 20 seeds of each held-out T2V prompt (measured on the shipped model: red-left and white-down 20/20,
green-right and yellow-up 19/20).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.tiny import world as T

from conftest import read_results, run_batch, write_manifest

pytestmark = pytest.mark.slow  # ~one minute on 2 cores: every video of the module is made once

T2V_CAPTIONS = T.HELD_OUT[:4]  # one per direction
T2V_SEEDS = range(20)
I2V_CAPTIONS = T.HELD_OUT[4:8]
I2V_SEEDS = range(4)
BROKEN_CAPTIONS = T.HELD_OUT[:4]
BROKEN_SEEDS = range(3)
PASS_RATE = 0.8


def read_mp4(path: str) -> np.ndarray:
    import imageio_ffmpeg

    gen = imageio_ffmpeg.read_frames(path)
    meta = next(gen)
    w, h = meta["size"]
    return np.stack([np.frombuffer(f, np.uint8).reshape(h, w, 3) for f in gen])


def job_id(kind: str, combo: tuple[str, ...], seed: int) -> str:
    return f"{kind}-{'-'.join(combo)}-s{seed}"


def run_rows(tmp: Path, rows: list[dict]) -> dict[str, np.ndarray]:
    """Run the rows through RunManifest; job_id -> decoded frames."""
    manifest = write_manifest(tmp / "jobs.parquet", rows)
    run_batch(manifest, tmp)
    results = read_results(tmp / "outputs")
    bad = {k: r["error"] for k, r in results.items() if r["status"] != "ok"}
    assert not bad, bad
    return {k: read_mp4(r["video"]) for k, r in results.items()}


def t2v_rows(captions, seeds) -> list[dict]:
    return [{"job_id": job_id("t2v", c, s), "prompt": T.caption(*c), "seed": s} for c in captions for s in seeds]


def pass_rate(videos: dict[str, np.ndarray], kind: str, combo, seeds) -> float:
    ok = [T.matches(T.describe_video(videos[job_id(kind, combo, s)]), combo[0], combo[2]) for s in seeds]
    return sum(ok) / len(ok)


@pytest.fixture(scope="module")
def t2v_videos(tmp_path_factory) -> dict[str, np.ndarray]:
    return run_rows(tmp_path_factory.mktemp("t2v"), t2v_rows(T2V_CAPTIONS, T2V_SEEDS))


@pytest.fixture(scope="module")
def i2v_videos(tmp_path_factory) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """I2V rows whose images are first frames of held-out clips drawn at twice the model's size (the pipeline
    resizes them), and those images at the model's size."""
    tmp = tmp_path_factory.mktemp("i2v")
    from pipeline.config import load_config

    size = load_config(None)["target_height"]
    rows, images = [], {}
    for k, combo in enumerate(I2V_CAPTIONS):
        clip = T.dit_clip(*combo, rng=np.random.default_rng(1000 + k), size=2 * size)
        path = tmp / f"first-{k}.png"
        Image.fromarray(T.render(clip, 2 * size, 1)[0][0]).save(path)
        small = Image.open(path).resize((size, size), Image.Resampling.LANCZOS)
        for s in I2V_SEEDS:
            rows.append({"job_id": job_id("i2v", combo, s), "prompt": T.caption(*combo), "seed": s,
                         "image": str(path)})
            images[job_id("i2v", combo, s)] = np.asarray(small)
    return run_rows(tmp, rows), images


def test_reader_recognises_drawn_clips():
    """The checker itself: on the synthetic clips (which are what a good model imitates) it reads back the
    colour, the background and the direction; on a still frame it finds no direction."""
    for k, combo in enumerate(T.HELD_OUT):
        clip = T.dit_clip(*combo, rng=np.random.default_rng(k), size=32)
        video, _ = T.render(clip, 32, 17)
        desc = T.describe_video(video)
        assert (desc["colour"], desc["background"], desc["direction"]) == (combo[0], combo[3], combo[2]), desc
        assert T.describe_video(np.repeat(video[:1], 17, 0))["direction"] is None


def test_t2v_follows_held_out_prompts(t2v_videos):
    rates = {T.caption(*c): pass_rate(t2v_videos, "t2v", c, T2V_SEEDS) for c in T2V_CAPTIONS}
    assert min(rates.values()) >= PASS_RATE, rates  # each prompt on its own, not only on average


def test_t2v_background_follows_prompt(t2v_videos):
    got = [T.describe_video(t2v_videos[job_id("t2v", c, s)])["background"] == c[3]
           for c in T2V_CAPTIONS for s in T2V_SEEDS]
    assert sum(got) / len(got) >= PASS_RATE


def test_i2v_starts_from_the_image_and_follows_prompt(i2v_videos):
    videos, images = i2v_videos
    for key, frames in videos.items():
        err = np.abs(frames[0].astype(np.float32) - images[key].astype(np.float32)).mean()
        # mean abs error in 0..255: H.264 plus a VAE of 476k parameters (measured 4.1-6.7 on the shipped model)
        assert err < 12.0, (key, err)
        first, given = T.describe_video(frames[:1].repeat(2, 0)), T.describe_video(images[key][None].repeat(2, 0))
        assert first["background"] == given["background"], (key, first, given)
        assert first["colour"] == given["colour"], (key, first, given)
    # the direction comes from the prompt alone (the image shows where the shape is, not where it goes); each
    # caption on its own (measured: every seed of every caption)
    for c in I2V_CAPTIONS:
        moved = [T.describe_video(videos[job_id("i2v", c, s)])["direction"] == c[2] for s in I2V_SEEDS]
        assert np.mean(moved) >= PASS_RATE, (c, moved)


# ---- the check guards the pipeline: three bugs, each must make it fail ------------------------------------------

def _swap_experts(monkeypatch):
    """Wrong expert order: the high-noise steps run on the low-noise expert and the other way round."""
    import pipeline.stages.denoise as denoise

    original = denoise.get_model

    def swapped(spec, fingerprint, component=None, device=None):
        comp = component or spec.model.get("component")
        if comp in ("high", "low"):
            other = "low" if comp == "high" else "high"
            return original(spec, f"swapped:{fingerprint}", component=other, device=device)
        return original(spec, fingerprint, component, device)

    monkeypatch.setattr(denoise, "get_model", swapped)


def _drop_scheduler_state(monkeypatch):
    """The low-noise expert starts a fresh solver instead of continuing the high-noise one's."""
    import pipeline.stages.denoise as denoise

    monkeypatch.setattr(denoise, "import_state", lambda *args, **kwargs: None)


def _skip_latent_denormalisation(monkeypatch):
    """Decode forgets to undo the VAE's latents_mean/latents_std normalisation."""
    import torch

    import pipeline.stages.decode as decode

    def decode_raw(vae, latents, **_):  # the real one also takes bf16=
        with torch.no_grad():
            video = vae.decode(latents.to(next(vae.parameters()).device, vae.dtype), return_dict=False)[0]
        return (video.float() / 2 + 0.5).clamp(0, 1)[0].permute(1, 2, 3, 0).cpu()

    monkeypatch.setattr(decode, "decode_latents", decode_raw)


@pytest.mark.parametrize("breakage", [_swap_experts, _drop_scheduler_state, _skip_latent_denormalisation],
                         ids=["wrong-expert-order", "dropped-scheduler-state", "wrong-latent-normalisation"])
def test_semantic_check_catches_broken_pipeline(t2v_videos, tmp_path, monkeypatch, breakage):
    from pipeline.runtime import MODELS

    good = np.mean([pass_rate(t2v_videos, "t2v", c, BROKEN_SEEDS) for c in BROKEN_CAPTIONS])
    assert good >= 0.75  # the same prompts and seeds on the intact pipeline (9 or more of these 12 pass)
    breakage(monkeypatch)
    MODELS.clear()  # a fresh store and no resident models: every stage runs with the bug
    try:
        videos = run_rows(tmp_path, t2v_rows(BROKEN_CAPTIONS, BROKEN_SEEDS))
    finally:
        MODELS.clear()
    broken = np.mean([pass_rate(videos, "t2v", c, BROKEN_SEEDS) for c in BROKEN_CAPTIONS])
    assert broken <= good - 0.25, (breakage.__name__, good, broken)
