"""Staged == monolithic: the staged pipeline's latents and frames equal diffusers' end-to-end pipelines run
on the same tiny weights (T2V and I2V with the CFG schedule), and for the distilled schedule a one-process
reference loop over the same diffusers components. Also shows the MoE split must carry the solver state."""
from __future__ import annotations

import pytest
import torch
from diffusers import (FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler, WanImageToVideoPipeline,
                       WanPipeline)

from conftest import make_image, run_batch, write_config, write_manifest
from pipeline.config import guide_scales, load_config
from pipeline.manifest import read_manifest
from pipeline.plan import plan_jobs
from pipeline.stages.decode import decode_latents
from pipeline.stages.image import load_image_rgb, resize_center_crop
from pipeline.store import ArtifactStore

PROMPT = "a red circle moving left on a blue background"
NEGATIVE = "blurry"
SEED = 1234
# Same ops on the same CPU: the two paths agree to float32 rounding (observed max abs diff ~1e-6).
ATOL = 1e-4


def staged_run(tmp_path, rows, **config_overrides):
    cfg_path = write_config(tmp_path / "config.json", **config_overrides)
    manifest = write_manifest(tmp_path / "jobs.parquet", rows)
    assert run_batch(manifest, tmp_path, config=cfg_path)
    config = load_config(cfg_path)
    plans = plan_jobs(read_manifest(manifest, config), config)
    store = ArtifactStore(tmp_path / "store")
    return config, plans, store


def final_latents(plan, store):
    return store.load_tensors(plan.decode.upstream["latents"].ref)["latents"]


@pytest.fixture(scope="module")
def t2v_run(tmp_path_factory, tiny_root):
    tmp = tmp_path_factory.mktemp("t2v")
    return staged_run(tmp, [{"prompt": PROMPT, "negative_prompt": NEGATIVE, "seed": SEED}])


def test_t2v_cfg_matches_wan_pipeline(t2v_run, tiny_root):
    config, plans, store = t2v_run
    v = config.values
    pipe = WanPipeline.from_pretrained(tiny_root / "t2v", torch_dtype=torch.float32)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=v["sample_shift"])
    pipe.register_to_config(boundary_ratio=v.get("boundary") or pipe.config.boundary_ratio)
    g_high, g_low = guide_scales(v)
    kwargs = dict(prompt=PROMPT, negative_prompt=NEGATIVE, height=v["target_height"], width=v["target_width"],
                  num_frames=v["target_video_length"], num_inference_steps=v["infer_steps"],
                  guidance_scale=g_high, guidance_scale_2=g_low, max_sequence_length=v["text_len"])
    ref = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(SEED), output_type="latent").frames
    ours = final_latents(plans[0], store)
    assert ours.shape == ref.shape
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)

    ref_frames = pipe(**kwargs, generator=torch.Generator("cpu").manual_seed(SEED), output_type="np").frames[0]
    ours_frames = decode_latents(pipe.vae, ours).numpy()
    assert abs(ours_frames - ref_frames).max() < 1e-3


def test_i2v_cfg_matches_wan_i2v_pipeline(tmp_path, tiny_root):
    image = make_image(tmp_path / "first.png", size=(100, 70))
    config, plans, store = staged_run(tmp_path, [{"prompt": PROMPT, "seed": SEED, "image": str(image)}])
    v = config.values
    pipe = WanImageToVideoPipeline.from_pretrained(tiny_root / "i2v", torch_dtype=torch.float32)
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config, flow_shift=v["sample_shift"])
    if v.get("boundary"):
        pipe.register_to_config(boundary_ratio=v["boundary"])
    g_high, g_low = guide_scales(v)
    h, w = v["target_height"], v["target_width"]
    prepared = resize_center_crop(load_image_rgb(str(image)), w, h)  # the pipeline itself only stretches
    ref = pipe(image=prepared, prompt=PROMPT, negative_prompt=v["sample_neg_prompt"], height=h, width=w,
               num_frames=v["target_video_length"], num_inference_steps=v["infer_steps"], guidance_scale=g_high,
               guidance_scale_2=g_low, max_sequence_length=v["text_len"],
               generator=torch.Generator("cpu").manual_seed(SEED), output_type="latent").frames
    ours = final_latents(plans[0], store)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


def distill_reference(tiny_root, v, prompt, seed):
    """LightX2V's 4-step schedule as one loop over diffusers components: Euler over the shifted step list,
    high-noise expert before boundary_step_index, low-noise after, no CFG."""
    pipe = WanPipeline.from_pretrained(tiny_root / "t2v", torch_dtype=torch.float32)
    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=v["sample_shift"])
    sched.set_timesteps(sigmas=[t / 1000 for t in v["denoising_step_list"]])
    context, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, max_sequence_length=v["text_len"])
    f, h, w = v["target_video_length"], v["target_height"], v["target_width"]
    latents = torch.randn((1, 16, (f - 1) // 4 + 1, h // 8, w // 8),
                          generator=torch.Generator("cpu").manual_seed(seed))
    for i, t in enumerate(sched.timesteps):
        model = pipe.transformer if i < v["boundary_step_index"] else pipe.transformer_2
        with torch.no_grad():
            pred = model(hidden_states=latents, timestep=t.expand(1), encoder_hidden_states=context,
                         return_dict=False)[0]
        latents = sched.step(pred, t, latents, return_dict=False)[0]
    return latents


def test_distilled_schedule_matches_reference_loop(tmp_path, tiny_root):
    config, plans, store = staged_run(
        tmp_path, [{"prompt": PROMPT, "seed": SEED}], infer_steps=4, enable_cfg=False,
        denoising_step_list=[1000, 750, 500, 250], boundary_step_index=2)
    high = store.sidecar(plans[0].stages()["denoise-high"].ref)
    assert high["params"]["steps"] == [0, 2] and high["params"]["cfg"] is False
    ref = distill_reference(tiny_root, config.values, PROMPT, SEED)
    torch.testing.assert_close(final_latents(plans[0], store), ref, atol=ATOL, rtol=0)


def test_moe_split_carries_the_multistep_state(tmp_path, t2v_run, monkeypatch):
    """Restarting UniPC at the expert switch changes the result: the carried state is what makes it match."""
    rows = [{"prompt": PROMPT, "negative_prompt": NEGATIVE, "seed": SEED}]
    _, plans, store = t2v_run
    carried = final_latents(plans[0], store)
    split = plans[0].stages()["denoise-high"].params["steps"][1]
    assert 0 < split < plans[0].stages()["denoise-low"].params["steps"][1], "the tiny config must switch experts"

    import pipeline.stages.denoise as denoise

    monkeypatch.setattr(denoise, "import_state", lambda *a, **k: setattr(a[0], "_step_index", split))
    _, plans2, store2 = staged_run(tmp_path / "restarted", rows)
    restarted = final_latents(plans2[0], store2)
    assert (restarted - carried).abs().max() > 1e-3


@pytest.mark.parametrize("stage", ["text", "denoise-high", "denoise-low", "decode"])
def test_sidecars_describe_their_artifacts(t2v_run, stage):
    _, plans, store = t2v_run
    spec = plans[0].stages()[stage]
    side = store.sidecar(spec.ref)
    assert side["stage"] == stage and side["key"] == spec.key
    assert side["upstream"] == {name: up.key for name, up in spec.upstream.items()}
    assert side["size"] == store.payload_path(spec.ref).stat().st_size
    ok, _ = store.check(spec.ref)
    assert ok
