"""Model parallelism for one video: the Denoise stage on several GPUs (config key `parallel`).

layout.py      the `parallel` config value: seq_p_size x cfg_p_size ranks, validation
launch.py      the Denoise task's side: a torchrun rank group kept per worker, fed specs, progress relayed
run_denoise.py the ranks: load the expert (kept resident), run the loop, rank 0 writes the artifact
group.py       process group and the (cfg, ring, ulysses) device mesh
ulysses.py     sequence parallelism of the DiT (diffusers' context-parallel hooks; why: see there)
denoise.py     the loop with CFG parallel (cond / uncond on two rank groups)
check.py       same-output check of a parallel forward against a single-process one (tests, benchmark)

VAE decode is not split across ranks: neither split is exact. The Wan VAE decoder is causal in time with a
feature cache that carries every earlier frame's activations into the next (its temporal receptive field spans
the whole clip at 81 frames), so a rank cannot start mid-clip without decoding everything before it; and its
middle block attends over the whole frame, so spatial tiles change the result (diffusers' tiled decode blends
overlapping tiles: close, not equal). DecodeVideo therefore stays one process on one GPU (about 2 s of a
480p video's minutes of denoising; design section 7).
"""
