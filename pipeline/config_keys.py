"""Every config key we know, in one table: what it does here, decided when the config is read.

Each key of LightX2V's published Wan configs (ModelTC/LightX2V, configs/) is in exactly one class:
  implemented  - does what LightX2V does with it
  kernel       - picks a kernel or a memory/speed trade-off; the result is the same (within floating-point
                 tolerance), so it is accepted and documented as such
  refused      - not implemented here: the config is refused with the reason (never accepted and ignored)
  model class  - the key belongs to a LightX2V model class we do not run (Animate, S2V, Self-Forcing, ...):
                 the config is refused naming the class
  ours         - wan-batch's own keys (model location, device, budgets)
A key's value can move it: an attention type is a kernel choice for dense attention and refused for the
sparse kinds (they change the result); `feature_caching: "NoCaching"` is implemented, any cache is refused.
`markdown_table()` renders the table for the docs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable

IMPLEMENTED, KERNEL, REFUSED, MODEL_CLASS, OURS = "implemented", "kernel", "refused", "model class", "ours"

_NUM = (int, float)
_ANY = (object,)


@dataclass(frozen=True)
class Key:
    kind: str
    types: tuple[type, ...]
    desc: str  # what it does (implemented/kernel/ours) or the reason (refused) or the class (model class)
    # a value check: returns a refusal reason for values we do not run (None: fine)
    refuse_value: Callable[[Any], str | None] | None = None


def _impl(types, desc, refuse_value=None) -> Key:
    return Key(IMPLEMENTED, types, desc, refuse_value)


def _kernel(desc: str, types=_ANY) -> Key:
    return Key(KERNEL, types, desc)


def _refused(reason: str) -> Key:
    return Key(REFUSED, _ANY, reason)


def _cls(name: str) -> Key:
    return Key(MODEL_CLASS, _ANY, name)


def _ours(types, desc) -> Key:
    return Key(OURS, types, desc)


# Dense attention kernels (exact softmax attention, or SageAttention's quantized kernel that LightX2V ships as
# its default): the same result within tolerance. Names we have no kernel for run on PyTorch SDPA.
DENSE_ATTENTION = {
    "flash_attn2", "flash_attn3", "sage_attn", "sage_attn2", "sage_attn3", "torch_sdpa", "sdpa", "cudnn",
    "sdpa_flash", "sdpa_efficient", "npu_flash_attn", "mlu_flash_attn", "mlu_sage_attn", "aiter_attn",
    "flash_attn_enflame_gcu", "flash_attn_hygon_dcu", "intel_xpu_flash_attn",
}
# Sparse / approximate attention: they skip parts of the attention matrix, so the video differs.
SPARSE_ATTENTION = {
    "draft_attn", "nbhd_attn", "general_sparse_attn", "radial_attn", "dynamic_sparse_attn", "sol_attn",
    "sparge_attn", "spas_flash_attn4", "spas_sage_attn", "spas_sage_attn2", "spas_sage_attn3", "svg_attn",
    "svg2_attn", "rainfusion_attn", "sla_attn",
}


def _attention(value: Any) -> str | None:
    if isinstance(value, str) and value in SPARSE_ATTENTION:
        return (f"{value} is a sparse attention kernel: it skips parts of the attention and changes the video; "
                f"only dense attention is implemented (e.g. flash_attn3, sage_attn2, torch_sdpa)")
    return None


def _scheme(value: Any) -> str | None:
    if isinstance(value, str) and not value.startswith(("fp8", "int8", "gguf")):
        return (f"dit_quant_scheme {value!r}: only fp8-*, int8-* and gguf-* weights are implemented "
                f"(nvfp4 / mxfp kernels are not)")
    return None


# LightX2V's quantized T5 / CLIP linears by t5_quant_scheme / clip_quant_scheme (models/input_encoders/hf/wan/
# t5/model.py, xlm_roberta/model.py): every CUDA kernel below computes the same W8A8 product (per-channel weight
# scale, per-token dynamic activation quantization), so each name is the weight format it reads.
ENCODER_SCHEMES = {
    **{s: "fp8" for s in ("fp8", "fp8-sgl", "fp8-vllm", "fp8-torchao", "fp8-q8f", "fp8-triton")},
    **{s: "int8" for s in ("int8", "int8-vllm", "int8-torchao", "int8-q8f", "int8-triton")},
}
# Schemes LightX2V has only for other hardware (or none of its Wan encoders takes).
ENCODER_HARDWARE = {
    "int8-tmo": "Cambricon MLU's int8 kernel (torch_mlu_ops)",
    "int8-npu": "Ascend NPU's int8 kernel (LightX2V's T5 only)",
    "int8-iluvatar": "Iluvatar GPUs' int8 kernel (ixformer)",
    "fp8-intel-xpu": "Intel XPU's weight-only fp8 kernel (w8a16: no activation quantization, another result)",
    "int8-intel-xpu": "Intel XPU's weight-only int8 kernel (w8a16: no activation quantization, another result)",
}


def encoder_scheme_problem(key: str, scheme: Any) -> str | None:
    """Why a t5_quant_scheme / clip_quant_scheme value is not run (None: it is)."""
    if scheme in ENCODER_SCHEMES:
        return None
    if scheme is None:
        flag = key.replace("_quant_scheme", "_quantized")
        return f"{flag} is true but no {key} is given (LightX2V requires it: fp8-* or int8-*)"
    if scheme in ENCODER_HARDWARE:
        return f"{scheme} is {ENCODER_HARDWARE[scheme]}, not implemented here; use fp8-* or int8-* (same weights)"
    return (f"{scheme!r} is not a scheme LightX2V's Wan encoders take (they raise NotImplementedError); "
            f"implemented: {', '.join(sorted(ENCODER_SCHEMES))}")


def _true_only(reason: str) -> Callable[[Any], str | None]:
    return lambda value: None if value in (None, True) else reason


def _equals(expected: Any, reason: str) -> Callable[[Any], str | None]:
    return lambda value: None if value is None or list(value) == list(expected) else reason


_TI2V = "(48 latent channels, 16x VAE stride) is LightX2V's Wan2.2 TI2V-5B (model_cls wan2.2), which wan-batch does not run"
_COMPONENT_PATH = ("a separate checkpoint for this component is not implemented: put it in the model folder "
                   "(--model-path) under its standard name")
_CACHE_PARAM = "a parameter of a feature_caching method not implemented here (only Tea and Mag are)"
_ARCH = ("architecture keys come from the model folder's config.json here (LightX2V's model classes that set "
         "them in the run config are not run)")

KEYS: dict[str, Key] = {
    # ---- generation (implemented)
    "infer_steps": _impl((int,), "number of denoising steps"),
    "target_video_length": _impl((int,), "frames; not 4k+1: adjusted as LightX2V does, with a warning"),
    "text_len": _impl((int,), "T5 token length the prompt is padded to (at most 4096)"),
    "target_height": _impl((int,), "height in pixels, a multiple of 16"),
    "target_width": _impl((int,), "width in pixels, a multiple of 16"),
    "sample_guide_scale": _impl((int, float, list), "CFG scale, or a [high_noise, low_noise] pair"),
    "sample_shift": _impl(_NUM, "flow-matching shift of the timestep schedule"),
    "enable_cfg": _impl((bool,), "classifier-free guidance (default false, as LightX2V)"),
    "boundary": _impl(_NUM, "Wan2.2 A14B expert switch, as a fraction of the timesteps"),
    "boundary_step_index": _impl((int,), "distilled Wan2.2: the step the low-noise expert takes over"),
    "denoising_step_list": _impl((list,), "distilled models: the timesteps to run"),
    "fps": _impl((int,), "frames per second of the MP4"),
    "sample_neg_prompt": _impl((str,), "negative prompt (rows may set their own)"),
    "seed": _impl((int,), "default seed (rows may set their own)"),
    "model_cls": _impl((str,), "LightX2V's --model_cls: wan2.1, wan2.1_distill, wan2.2_moe or "
                               "wan2.2_moe_distill run; any other class is refused naming it"),
    "task": _impl((str,), "t2v or i2v (rows with an image run i2v)"),
    "feature_caching": _impl((str,), "step caching: NoCaching (off, LightX2V's default), Tea (TeaCache) or Mag "
                                     "(MagCache), with LightX2V's keys (pipeline/fast/step_cache.py)"),
    "use_image_encoder": _impl((bool,), "Wan2.1 I2V's CLIP image features (Wan2.2 A14B has no image encoder); "
                                        "false with a model that takes them is refused"),
    # ---- checkpoints (implemented)
    "lora_configs": _impl((list,), "LoRAs: a list of {name, path, strength[, alpha]}"),
    "dit_original_ckpt": _impl((str,), "Wan2.1: the DiT from this file instead of the model folder"),
    "high_noise_original_ckpt": _impl((str,), "Wan2.2: the high-noise expert from this file"),
    "low_noise_original_ckpt": _impl((str,), "Wan2.2: the low-noise expert from this file"),
    "dit_quantized": _impl((bool,), "load quantized DiT weights (*_quantized_ckpt, or found under the model "
                                    "folder as LightX2V finds them)"),
    "dit_quant_scheme": _impl((str,), "fp8-*, int8-*, gguf-*: the format of the quantized weights (the "
                                      "suffix names LightX2V's matmul kernel: same weights)", _scheme),
    "dit_quantized_ckpt": _impl((str,), "Wan2.1: quantized DiT file (or a folder holding one)"),
    "high_noise_quantized_ckpt": _impl((str,), "Wan2.2: quantized high-noise expert file (or folder)"),
    "low_noise_quantized_ckpt": _impl((str,), "Wan2.2: quantized low-noise expert file (or folder)"),
    "t5_quantized": _impl((bool,), "the T5 encoder's fp8/int8 weights (t5_quantized_ckpt, or "
                                   "models_t5_umt5-xxl-enc-{fp8,int8}.pth found under the model folder as LightX2V "
                                   "finds it); its linears compute W8A8 like LightX2V's (per-token activation "
                                   "quantization); part of the text key"),
    "t5_quant_scheme": _impl((str,), "with t5_quantized: fp8, int8 or their kernel suffixes (-sgl, -vllm, -q8f, "
                                     "-torchao, -triton: the same math); other hardware's kernels (int8-tmo, "
                                     "int8-npu, int8-iluvatar, *-intel-xpu) are refused"),
    "t5_quantized_ckpt": _impl((str,), "with t5_quantized: the quantized T5 file (LightX2V converter's .pth or "
                                       ".safetensors)"),
    "clip_quantized": _impl((bool,), "the CLIP image encoder's fp8/int8 weights (clip_quantized_ckpt, or "
                                     "models_clip_open-clip-xlm-roberta-large-vit-huge-14-{fp8,int8}.pth under the "
                                     "model folder); W8A8 linears like LightX2V's; part of the image key"),
    "clip_quant_scheme": _impl((str,), "with clip_quantized: as t5_quant_scheme"),
    "clip_quantized_ckpt": _impl((str,), "with clip_quantized: the quantized CLIP file (.pth or .safetensors)"),
    "num_channels_latents": _impl((int,), "16 (the Wan2.1 / Wan2.2 A14B VAE)",
                                  lambda v: None if v in (None, 16) else f"num_channels_latents {v} {_TI2V}"),
    "vae_stride": _impl((list,), "[4, 8, 8] (the Wan2.1 / Wan2.2 A14B VAE)",
                        _equals([4, 8, 8], f"vae_stride {_TI2V}")),
    "patch_size": _impl((list,), "[1, 2, 2] (Wan's DiT)", _equals([1, 2, 2], "only Wan's [1, 2, 2] patches exist")),
    # ---- memory placement (implemented: same numbers, less memory)
    "cpu_offload": _impl((bool,), "DiT blocks stream from CPU RAM to the GPU (with offload_granularity "
                                  "block/phase)"),
    "offload_granularity": _impl((str,), "block or phase: the unit streamed; model: whole components"),
    "lazy_load": _impl((bool,), "stream DiT blocks from the checkpoint on disk"),
    "t5_cpu_offload": _impl((bool,), "true: the T5 text encoder lives and runs on the CPU (no VRAM)"),
    "vae_cpu_offload": _impl((bool,), "true: the VAE lives and runs on the CPU (no VRAM)"),
    "clip_cpu_offload": _impl((bool,), "true: the CLIP image encoder lives and runs on the CPU (no VRAM)"),
    "use_compile": _impl((bool,), "LightX2V's compile key: regional torch.compile of the DiT blocks "
                                  "(our runtime setting torch_compile)"),
    "torch_compile": _impl((bool,), "the same as use_compile"),
    "parallel": _impl((dict, bool), "{seq_p_size, cfg_p_size}: Denoise on several GPUs; cfg_p_size with "
                                    "CFG off runs the single prediction (as LightX2V)"),
    # ---- kernel choice, same result
    "self_attn_1_type": Key(KERNEL, (str,), "self-attention kernel (dense kinds; sparse kinds are refused)",
                            _attention),
    "cross_attn_1_type": Key(KERNEL, (str,), "cross-attention kernel (text)", _attention),
    "cross_attn_2_type": Key(KERNEL, (str,), "cross-attention kernel (image)", _attention),
    "rms_norm_type": _kernel("RMSNorm kernel (torch, sgl-kernel, npu, mlu): same formula"),
    "layer_norm_type": _kernel("LayerNorm kernel: same formula"),
    "modulate_type": _kernel("adaLN modulation kernel (torch, triton): same formula"),
    "rope_type": _kernel("RoPE kernel (torch_real_rope, flashinfer_rope, npu/gcu): same rotation"),
    "tp_rms_norm_type": _kernel("tensor-parallel RMSNorm kernel (tensor parallelism is not used here)"),
    "tp_mm_type": _kernel("tensor-parallel matmul kernel (tensor parallelism is not used here)"),
    "clean_cuda_cache": _kernel("empties the CUDA cache between steps: memory only"),
    "rotary_chunk": _kernel("computes RoPE in chunks: memory only"),
    "unload_modules": _kernel("frees modules after use: memory only (here the resident cache's budget decides)"),
    "offload_ratio": _kernel("share of blocks streamed under cpu_offload: here the VRAM budget decides; memory only"),
    "num_disk_workers": _kernel("reader threads for lazy_load: speed only"),
    "lora_dynamic_apply": _kernel("LoRA computed in the forward instead of merged (LightX2V's memory-saving path): "
                                  "the same function; here LoRAs are merged into plain weights and run as side "
                                  "branches of quantized ones", (bool,)),
    "vae_offload_cache": _kernel("keeps the VAE's temporal cache on the CPU: memory only"),
    "use_31_block": Key(KERNEL, (bool,), "CLIP features from block 31 (Wan's I2V does this; true only)",
                        _true_only("use_31_block false (CLIP features from the last block) is not implemented")),
    "enable_reuse": _kernel("LightX2V's server reuses encoder outputs for repeated inputs; the artifact store "
                            "does this here for every stage"),
    "compile_shapes": _kernel("shapes to pre-compile: speed only"),
    "mm_config": _kernel("matmul kernel of quantized weights: same weights"),
    "quant_op": _kernel("quantized matmul kernel: same weights"),
    "do_mm_calib": _kernel("calibration pass for quantized kernels: speed only"),
    "seq_p_fp8_comm": _kernel("fp8 sequence-parallel communication (inside parallel)"),
    # ---- refused: features not implemented here
    "teacache_thresh": _impl(_NUM, "Tea: the accumulated rescaled change that forces a full forward (>= 0)"),
    "use_ret_steps": _impl((bool,), "Tea: LightX2V's ret-steps mode (first 5 steps always computed; the first "
                                    "coefficients row)"),
    "coefficients": _impl((list,), "Tea: the two rescaling polynomials [[use_ret_steps], [without]]"),
    "magcache_K": _impl((int,), "Mag: at most this many consecutive skipped steps"),
    "magcache_calibration": _impl((bool,), "Mag: record the per-step magnitude ratios in the sidecar"),
    "magcache_ratios": _impl((list,), "Mag: per-step ratios [[conditional], [unconditional]]"),
    "magcache_retention_ratio": _impl(_NUM, "Mag: the share of first steps always computed (0..1)"),
    "magcache_thresh": _impl(_NUM, "Mag: the accumulated error that forces a full forward (>= 0)"),
    "residual_diff_threshold": _refused(_CACHE_PARAM), "downsample_factor": _refused(_CACHE_PARAM),
    "changing_resolution": _refused("changing resolution (low-resolution first steps, then upscaled) is not "
                                    "implemented"),
    "changing_resolution_steps": _refused("a parameter of changing_resolution, which is not implemented"),
    "resolution_rate": _refused("a parameter of changing_resolution, which is not implemented"),
    "use_tiling_vae": _impl((bool,), "tiled VAE encode and decode (diffusers' AutoencoderKLWan tiling: 256-px "
                                     "tiles, 192-px stride; frames above 256 px differ slightly at the seams)"),
    "use_tae": _impl((bool,), "decode with LightX2V's tiny VAE (TAEHV: taew2_1.pth, lighttaew2_1.safetensors) "
                              "instead of the Wan VAE's decoder; the I2V image encode keeps the full VAE (as "
                              "LightX2V); it runs in the run's dtype on the run's device, untiled "
                              "(pipeline/models/tae.py); part of the decode key"),
    "tae_path": _impl((str,), "the tiny VAE file (.pth, weights only, or .safetensors); unset: taew2_1.pth under "
                              "the model folder, looked for as LightX2V does (distill_int8/, distill_fp8/, "
                              "distill_models/, int8/, fp8/, original/, then the folder); read only with use_tae"),
    "need_scaled": _impl((bool,), "with use_tae: un-normalize the latents with the Wan2.1 VAE's mean and std "
                                  "before the tiny VAE (LightX2V's lighttaew2_1 expects that, madebyollin's "
                                  "taew2_1 does not; LightX2V's enable_lightvae sets it for a lighttae file)"),
    "use_lightvae": _impl((bool,), "false only", lambda v: (
        "LightX2V's LightVAE (the Wan VAE with 75% of its channels pruned, lightvaew2_1) is not implemented: the "
        "full Wan VAE encodes and decodes (use_tae true swaps in the tiny decoder)") if v else None),
    "use_tiny_vae": _refused("LightX2V's former name of use_tae (its old runner read use_tiny_vae and "
                             "tiny_vae_path); LightX2V no longer reads it: set use_tae and tae_path"),
    "tiny_vae_path": _refused("LightX2V's former name of tae_path, no longer read by LightX2V: set use_tae and "
                              "tae_path"),
    "t5_original_ckpt": _refused(_COMPONENT_PATH), "t5_tokenizer_path": _refused(_COMPONENT_PATH),
    "clip_original_ckpt": _refused(_COMPONENT_PATH), "vae_path": _refused(_COMPONENT_PATH),
    "general_sparse_attn_setting": _refused("settings of a sparse attention kernel, which is not implemented"),
    "dynamic_sparse_attn_setting": _refused("settings of a sparse attention kernel, which is not implemented"),
    "nbhd_attn_setting": _refused("settings of a sparse attention kernel, which is not implemented"),
    "rainfusion_attn_setting": _refused("settings of a sparse attention kernel, which is not implemented"),
    "sol_attn_setting": _refused("settings of a sparse attention kernel, which is not implemented"),
    "sparge_attn_setting": _refused("settings of a sparse attention kernel, which is not implemented"),
    "spas_flash_attn4_setting": _refused("settings of a sparse attention kernel, which is not implemented"),
    "spas_sage_attn2_setting": _refused("settings of a sparse attention kernel, which is not implemented"),
    "spas_sage_attn3_setting": _refused("settings of a sparse attention kernel, which is not implemented"),
    "draft_attn_sparsity_ratio": _refused("settings of a sparse attention kernel, which is not implemented"),
    "sparge": _refused("SpargeAttention (a tuned sparse attention) is not implemented"),
    "sparge_ckpt": _refused("SpargeAttention (a tuned sparse attention) is not implemented"),
    "enable_dynamic_cfg": _refused("dynamic CFG (a guidance embedding of LightX2V's CFG-distilled Wan2.1) is "
                                   "not implemented"),
    "cfg_scale": _refused("the scale of enable_dynamic_cfg, which is not implemented (the CFG scale is "
                          "sample_guide_scale)"),
    "disagg_mode": _refused("disaggregated serving (encoder / transformer / decoder on separate servers) is not "
                            "implemented: the store shares stages between workers instead"),
    "disagg_config": _refused("disaggregated serving is not implemented"),
    "sub_servers": _refused("LightX2V's multi-server deployment (prompt enhancer, sub-servers) is not implemented"),
    "video_frame_interpolation": _refused("frame interpolation (RIFE) after decoding is not implemented"),
    "enable_cfg_truncation": _refused("CFG truncation (CFG off for the last steps) is not implemented"),
    "seq_parallel": _refused("LightX2V derives it from `parallel`: set parallel.seq_p_size instead"),
    "cfg_parallel": _refused("LightX2V derives it from `parallel`: set parallel.cfg_p_size instead"),
    "vae_dtype": _impl((str,), "VAE decode precision: bf16 (autocast, weights stay fp32) or fp32; LightX2V's "
                               "spellings (bf16, BF16, torch.bfloat16, fp32, ...); part of the decode key; not "
                               "read by the tiny VAE (use_tae), as in LightX2V"),
    "infer_dtype": _refused("the run's dtype is our key `dtype`"),
    "clip_embed_dim": _refused(_ARCH),
    "dim": _refused(_ARCH), "eps": _refused(_ARCH), "ffn_dim": _refused(_ARCH), "freq_dim": _refused(_ARCH),
    "in_dim": _refused(_ARCH), "out_dim": _refused(_ARCH), "num_heads": _refused(_ARCH),
    "num_layers": _refused(_ARCH), "text_dim": _refused(_ARCH), "qk_norm": _refused(_ARCH),
    "cross_attn_norm": _refused(_ARCH), "window_size": _refused(_ARCH), "model_type": _refused(_ARCH),
    "attention_type": _refused("LightX2V's attention key is self_attn_1_type / cross_attn_*_type"),
    # ---- keys of model classes we do not run
    "refert_num": _cls("Wan2.2 Animate"), "replace_flag": _cls("Wan2.2 Animate"),
    "adapter_attn_type": _cls("Wan2.2 Animate"), "auto_target_shape": _cls("Wan2.2 Animate"),
    "refer_offset_h": _cls("Wan2.2 Animate"), "refer_offset_t": _cls("Wan2.2 Animate"),
    "refer_offset_w": _cls("Wan2.2 Animate"), "refer_stride": _cls("Wan2.2 Animate"),
    "log_scale": _cls("Wan2.2 Animate"), "sparse_type": _cls("Wan2.2 Animate"),
    "use_img_emb": _cls("Wan2.2 Animate"), "audio_mux_prefer_copy": _cls("Wan2.2 Animate"),
    "convert_model_dtype": _cls("Wan2.2 S2V"), "drop_first_motion": _cls("Wan2.2 S2V"),
    "infer_frames": _cls("Wan2.2 S2V"), "max_area": _cls("Wan2.2 S2V"), "motion_frames": _cls("Wan2.2 S2V"),
    "num_repeat": _cls("Wan2.2 S2V"), "num_train_timesteps": _cls("Wan2.2 S2V"),
    "target_fps": _cls("Wan2.2 S2V / audio-driven Wan"), "audio_sr": _cls("Wan2.2 S2V / audio-driven Wan"),
    "video_duration": _cls("Wan2.2 S2V / audio-driven Wan"),
    "ar_config": _cls("Wan2.1 Self-Forcing (autoregressive)"),
    "causal_rope_type": _cls("Wan2.1 Self-Forcing (autoregressive)"),
    "action_config": _cls("Matrix-Game 2 (Wan2.1 Self-Forcing)"), "mode": _cls("Matrix-Game 2 (Wan2.1 Self-Forcing)"),
    "streaming": _cls("Matrix-Game 2 (Wan2.1 Self-Forcing)"),
    "inject_sample_info": _cls("Matrix-Game 2 (Wan2.1 Self-Forcing)"),
    "num_output_frames": _cls("Matrix-Game 2 (Wan2.1 Self-Forcing)"),
    "sub_model_folder": _cls("Matrix-Game 2 (Wan2.1 Self-Forcing)"),
    "sub_model_name": _cls("Matrix-Game 2 (Wan2.1 Self-Forcing)"),
    "num_frame_per_block": _cls("Wan2.1 CausVid"), "num_blocks": _cls("Wan2.1 CausVid"),
    "num_fragments": _cls("Wan2.1 CausVid"), "frame_seq_length": _cls("Wan2.1 CausVid"),
    "num_frames": _cls("Wan2.1 CausVid"),
    "dancer_stage": _cls("WanDancer"), "music_inject_layers": _cls("WanDancer"),
    # ---- ours
    "model_path": _ours((str,), "the model folder (LightX2V's --model_path; the --model-path option wins)"),
    "i2v_model_path": _ours((str,), "an image-to-video model folder for rows with an image"),
    "model_format": _ours((str,), "auto, diffusers or wan (Wan's original layout)"),
    "device": _ours((str,), "auto, cpu, cuda or cuda:N"),
    "dtype": _ours((str,), "auto, float32, bfloat16 or float16"),
    "ram_budget_gb": _ours(_NUM, "RAM for resident models on CPU runs (GB, > 0)"),
    "vram_budget_gb": _ours(_NUM, "VRAM for resident models (GB, > 0)"),
    "video_crf": _ours((int,), "x264 quality 0..51"),
    "batched_cfg": _ours((bool,), "cond + uncond in one forward (default: on for CUDA)"),
    "activation_reserve_gb": _ours(_NUM, "VRAM kept for activations under cpu_offload (GB, > 0)"),
}

# LightX2V's --model_cls values: the ones we run, and the classes we refuse by name.
RUN_CLASSES = {"wan2.1", "wan2.1_distill", "wan2.2_moe", "wan2.2_moe_distill"}
OTHER_CLASSES = {
    "wan2.2": "Wan2.2 TI2V-5B", "wan2.2_animate": "Wan2.2 Animate", "wan22_animate2_distilled": "Wan2.2 Animate",
    "wan2.2_s2v": "Wan2.2 S2V", "wan2.1_vace": "Wan2.1 VACE", "wan2.2_moe_vace": "Wan2.2 VACE",
    "wan2.1_sf": "Wan2.1 Self-Forcing", "wan2.1_sf_mtxg2": "Matrix-Game 2 (Wan2.1 Self-Forcing)",
    "wan2.1_causvid": "Wan2.1 CausVid", "wan2.1_mean_flow_distill": "Wan2.1 MeanFlow",
    "wan2.2_matrix_game3": "Matrix-Game 3", "wan_dancer": "WanDancer", "wan2.2_audio": "Wan2.2 audio-driven",
}


def classify(key: str, value: Any) -> tuple[str, str]:
    """(class, description or reason) of one key with its value; unknown keys are ('unknown', '')."""
    entry = KEYS.get(key)
    if entry is None:
        return ("comment", "") if key.startswith(("_", "comment")) else ("unknown", "")
    if entry.refuse_value is not None and value is not None:
        reason = entry.refuse_value(value)
        if reason:
            return REFUSED, reason
    return entry.kind, entry.desc


def key_problems(raw: dict[str, Any]) -> list[str]:
    """Refusals of a raw config (LightX2V keys we do not implement, model classes we do not run)."""
    problems: list[str] = []
    cls = raw.get("model_cls")
    if isinstance(cls, str) and cls not in RUN_CLASSES:
        name = OTHER_CLASSES.get(cls, cls)
        problems.append(f"config key 'model_cls': {cls!r} is LightX2V's {name} model class, which wan-batch does "
                        f"not run (it runs {', '.join(sorted(RUN_CLASSES))})")
    classes: dict[str, list[str]] = {}
    for key, value in raw.items():
        kind, why = classify(key, value)
        if kind == REFUSED:
            problems.append(f"config key '{key}': not supported: {why}")
        elif kind == MODEL_CLASS:
            classes.setdefault(why, []).append(key)
    for name, keys in classes.items():
        problems.append(f"config key(s) {', '.join(repr(k) for k in keys)} belong to LightX2V's {name} model "
                        f"class, which wan-batch does not run")
    return problems


def is_finite_number(v: Any) -> bool:
    return isinstance(v, _NUM) and not isinstance(v, bool) and math.isfinite(v)


def markdown_table() -> str:
    """The docs' key table, generated from KEYS (python -m pipeline.config_keys)."""
    order = [OURS, IMPLEMENTED, KERNEL, REFUSED, MODEL_CLASS]
    title = {OURS: "ours", IMPLEMENTED: "implemented", KERNEL: "kernel choice, same result",
             REFUSED: "refused", MODEL_CLASS: "refused: model class not run"}
    rows = ["| key | class | what it does here / why refused |", "|---|---|---|"]
    for kind in order:
        for key in sorted(k for k, e in KEYS.items() if e.kind == kind):
            desc = KEYS[key].desc
            if kind == MODEL_CLASS:
                desc = f"a key of LightX2V's {desc} model"
            rows.append(f"| `{key}` | {title[kind]} | {desc.replace('|', '/')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(markdown_table())
