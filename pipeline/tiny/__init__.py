"""The embedded tiny model (model.py: its configs, shipped weights and cache) and its synthetic world
(world.py: the clips it was trained on, and how a video is read back against its prompt)."""
from .model import (BOUNDARY, DIT_CONFIG, SCHEDULER_CONFIG, T5_CONFIG, TINY_VERSION, VAE_CONFIG, WEIGHTS,
                    build_tokenizer, ensure_tiny_models, weight_files, weights_digest)

__all__ = ["BOUNDARY", "DIT_CONFIG", "SCHEDULER_CONFIG", "T5_CONFIG", "TINY_VERSION", "VAE_CONFIG", "WEIGHTS",
           "build_tokenizer", "ensure_tiny_models", "weight_files", "weights_digest"]
