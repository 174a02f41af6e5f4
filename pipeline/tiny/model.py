"""The embedded tiny model: Wan2.2 A14B in miniature, trained to draw coloured shapes, in the diffusers layout.

Same classes and key names as Wan-AI/Wan2.2-{T2V,I2V}-A14B-Diffusers (UMT5EncoderModel, T5 tokenizer,
two WanTransformer3DModel experts `transformer` (high noise) and `transformer_2` (low noise), AutoencoderKLWan,
UniPC flow scheduler), so it is loaded by the very loader a full-size model uses. The I2V variant's DiT takes
the 36-channel input (16 noise + 4 mask + 16 image-latent channels).

The weights ship with the package (`weights/{t2v,i2v}`, made by `python -m tools.train_tiny`):
prompts like "a red circle moving left on a blue background" give that video, so a broken pipeline shows.
On first use they are copied into a cache folder named by their content hash (`WAN_BATCH_HOME` moves it),
so nothing ever writes next to the package and a re-trained model never meets a stale copy.
"""
from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import tempfile
from pathlib import Path

TINY_VERSION = 2
WEIGHTS = Path(__file__).resolve().parent / "weights"
TEXT_DIM = 32

# Characters plus whole words of the demo vocabulary: any ASCII prompt tokenizes, common words are one token.
_WORDS = (
    "a an the and of on in with to moving moves left right up down circle square triangle red green blue "
    "yellow white black orange purple cyan magenta background cat dog city night day sunset beach sea sky "
    "mountain forest street car person walking running flying slowly quickly camera video photo"
).split()

# One token per latent pixel (patch 1x1x1; Wan's is 1x2x2): on a 64x64 video the shape moves about one latent
# pixel per latent frame, and 2x2 patches left the motion below the token grid. Heads of 32 channels give RoPE
# five frequencies per spatial axis (16-channel heads had two).
DIT_CONFIG = dict(
    patch_size=(1, 1, 1), num_attention_heads=4, attention_head_dim=32, in_channels=16, out_channels=16,
    text_dim=TEXT_DIM, freq_dim=256, ffn_dim=512, num_layers=4, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=32,
)
# base_dim 12: on unseen clips the shape keeps its colour 99% of the time with half base 8's error (4.3/255
# against 9.8); base 16 was no better at the same step count
VAE_CONFIG = dict(base_dim=12, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, temperal_downsample=[False, True, True])
T5_CONFIG = dict(d_model=TEXT_DIM, d_kv=8, d_ff=64, num_layers=2, num_heads=4, relative_attention_num_buckets=8,
                 relative_attention_max_distance=32, feed_forward_proj="gated-gelu", dropout_rate=0.0,
                 layer_norm_epsilon=1e-6, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
SCHEDULER_CONFIG = dict(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
                        flow_shift=5.0, solver_order=2)
BOUNDARY = {"t2v": 0.875, "i2v": 0.900}  # Wan2.2 A14B's own switch points


def weight_files(weights: Path = WEIGHTS) -> list[Path]:
    """The shipped model files, or a clear error when they are missing (never random weights in their place)."""
    files = sorted(f for f in weights.rglob("*") if f.is_file() and not f.name.startswith("."))
    for task in ("t2v", "i2v"):
        if not (weights / task / "model_index.json").is_file():
            from ..errors import CheckpointError

            raise CheckpointError(f"the tiny model's weights are missing ({weights / task}); "
                                  f"re-create them with `python -m tools.train_tiny`")
    return files


_digests: dict[Path, str] = {}


def weights_digest(weights: Path = WEIGHTS) -> str:
    """sha256 over the shipped files' relative paths and contents (~15 MB, hashed once per process)."""
    if weights not in _digests:
        h = hashlib.sha256()
        for f in weight_files(weights):
            h.update(str(f.relative_to(weights)).encode() + b"\0")
            h.update(f.read_bytes())
        _digests[weights] = h.hexdigest()
    return _digests[weights]


def cache_root() -> Path:
    base = os.environ.get("WAN_BATCH_HOME") or os.path.join(os.path.expanduser("~"), ".cache", "wan-batch")
    return Path(base) / f"tiny-v{TINY_VERSION}-{weights_digest()[:12]}"


def build_tokenizer(out_dir: Path):
    """A T5-style (Unigram + metaspace) tokenizer built offline, saved as the real tokenizer files."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    chars = [chr(c) for c in range(33, 127)]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(f"\u2581{w}", -1.0) for w in _WORDS]
    vocab += [(c, -5.0) for c in chars] + [(f"\u2581{c}", -4.0) for c in chars]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="always")
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", pair="$A </s> $B </s>",
                                                       special_tokens=[("</s>", 1)])
    fast = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                           extra_ids=0, model_max_length=512)
    fast.save_pretrained(out_dir)
    return fast


def ensure_tiny_models(root: Path | None = None) -> Path:
    """Copy the shipped tiny T2V and I2V models into the cache once (cross-process lock, atomic rename);
    return the folder holding `t2v/` and `i2v/`."""
    root = root or cache_root()
    if (root / "t2v" / "model_index.json").is_file() and (root / "i2v" / "model_index.json").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if (root / "t2v" / "model_index.json").is_file() and (root / "i2v" / "model_index.json").is_file():
            return root
        tmp = Path(tempfile.mkdtemp(prefix=f".{root.name}.", dir=root.parent))
        try:
            for src in weight_files():
                dest = tmp / src.relative_to(WEIGHTS)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(src, dest)
            if root.exists():
                shutil.rmtree(root)
            os.replace(tmp, root)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return root
