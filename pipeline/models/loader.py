"""Where a model lives, what its fingerprint is, and how each component is loaded.

One interface for every checkpoint format: `resolve_model` turns a config into a ModelRef (JSON-able: it
travels inside the stage specs), `fingerprint` identifies a component's files + LoRAs + quantization (it feeds
the cache keys), `load_component` returns the torch module.

Base layouts: diffusers (Wan-AI/*-Diffusers and the embedded tiny model; from_pretrained) and Wan's original
layout (wan_layout.py). A DiT expert's weights can instead come from a LightX2V single file
(`*_original_ckpt`: bf16 distilled; `*_quantized_ckpt` with `dit_quantized`: scaled fp8 / int8 safetensors, or a
GGUF file for `dit_quant_scheme` gguf-*); its architecture is always the base model's config.
Components: text, vae, high, low (Wan2.2 A14B experts), single (Wan2.1's DiT), clip (Wan2.1 I2V image encoder),
tae (LightX2V's tiny VAE decoder, config use_tae: its file is found by models/tae.py, not in the model layout).
The text and clip encoders can instead load LightX2V's quantized files (t5_quantized / clip_quantized:
encoder_quant.py); their fingerprint then names that file and its weight format.
"""
from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError

from ..config import BUILTIN_TINY, GenerationConfig
from ..errors import CheckpointError
from . import wan_layout as wl
from ..tiny import ensure_tiny_models

log = logging.getLogger(__name__)

# Files up to this size are fingerprinted by content (stable across copies and machines); larger ones by
# identity (path, size, mtime), because hashing 28 GB per run is not an option.
HASH_LIMIT = 64 << 20

# component name -> sub-folders it is made of (diffusers layout)
COMPONENTS = {
    "text": ("text_encoder", "tokenizer"),
    "vae": ("vae",),
    "high": ("transformer",),
    "low": ("transformer_2",),
    "single": ("transformer",),
    "clip": ("image_encoder", "image_processor"),
}
EXPERTS = ("high", "low", "single")
# LightX2V's keys for an expert's own checkpoint: (quantized, original)
CKPT_KEYS = {"high": ("high_noise_quantized_ckpt", "high_noise_original_ckpt"),
             "low": ("low_noise_quantized_ckpt", "low_noise_original_ckpt"),
             "single": ("dit_quantized_ckpt", "dit_original_ckpt")}
FORMATS = ("auto", "diffusers", "wan")
QUANT_PREFIXES = ("fp8", "int8", "gguf")
# The flow-matching UniPC solver of Wan's pipelines (Wan-AI/*-Diffusers scheduler_config.json).
WAN_SCHEDULER = dict(prediction_type="flow_prediction", use_flow_sigmas=True, num_train_timesteps=1000,
                     flow_shift=5.0, solver_order=2)


@dataclass(frozen=True)
class ModelRef:
    path: str  # model folder (resolved)
    task: str  # t2v | i2v
    format: str  # diffusers | wan
    family: str = "wan2.2"  # wan2.2 (two experts) | wan2.1 (one DiT)
    experts: tuple[str, ...] = ("high", "low")
    boundary_ratio: float | None = None
    # expert -> {"weights": file or folder, "config": arch config file, "config_format": diffusers|wan}
    dits: dict[str, dict[str, str]] = field(default_factory=dict, hash=False)
    # expert -> [{"path", "strength", "alpha"}]
    loras: dict[str, list[dict[str, Any]]] = field(default_factory=dict, hash=False)
    quant_scheme: str | None = None
    image_encoder: bool = False  # the DiT takes CLIP image features (Wan2.1 I2V)
    # text / clip -> their quantized file (t5_quantized, clip_quantized): encoder_quant.quant_source's dict
    encoders: dict[str, dict[str, str]] = field(default_factory=dict, hash=False)
    tae: str | None = None  # use_tae: the tiny VAE file that decodes instead of the VAE

    def to_dict(self) -> dict[str, Any]:
        return {"path": self.path, "task": self.task, "format": self.format, "family": self.family,
                "experts": list(self.experts), "boundary_ratio": self.boundary_ratio, "dits": self.dits,
                "loras": self.loras, "quant_scheme": self.quant_scheme, "image_encoder": self.image_encoder,
                "encoders": self.encoders, "tae": self.tae}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelRef":
        return cls(path=d["path"], task=d["task"], format=d["format"], family=d.get("family", "wan2.2"),
                   experts=tuple(d.get("experts", ("high", "low"))), boundary_ratio=d.get("boundary_ratio"),
                   dits=d.get("dits", {}), loras=d.get("loras", {}), quant_scheme=d.get("quant_scheme"),
                   image_encoder=bool(d.get("image_encoder", False)), encoders=d.get("encoders", {}),
                   tae=d.get("tae"))

    @property
    def index(self) -> dict[str, Any]:
        return _read_json(Path(self.path) / "model_index.json")


def _read_json(path: Path) -> dict[str, Any]:
    return wl.read_json(path)


# ------------------------------------------------------------------------------------------------ resolve
def detect_format(folder: Path) -> str:
    if (folder / "model_index.json").is_file():
        return "diffusers"
    if wl.is_wan_layout(folder):
        return "wan"
    raise CheckpointError(f"model folder {folder} is neither the diffusers layout (model_index.json) nor Wan's "
                          f"original layout ({wl.T5_FILE}, high_noise_model/ or a WanModel config.json)")


def model_folder(config: GenerationConfig, task: str) -> Path:
    path = config.get("model_path")
    key = "model_path"
    if task == "i2v" and config.get("i2v_model_path"):
        path, key = config["i2v_model_path"], "i2v_model_path"
    if not path:
        from ..config import MODEL_PATH_HINT

        raise CheckpointError(f"no model: {MODEL_PATH_HINT}")
    if path == BUILTIN_TINY:
        return ensure_tiny_models() / task
    folder = Path(config.resolve_path(path))
    if not folder.is_dir():
        raise CheckpointError(f"model folder not found: {folder} ({key}: --model-path or the config's {key})")
    return folder


def _diffusers_facts(folder: Path) -> tuple[str, str, tuple[str, ...], float | None, bool]:
    """(task, family, experts, boundary_ratio, image_encoder) of a diffusers-layout model."""
    idx = _read_json(folder / "model_index.json")
    two = bool(idx.get("transformer_2") and idx["transformer_2"][0] is not None and idx.get("boundary_ratio"))
    experts = ("high", "low") if two else ("single",)
    task = "i2v" if "ImageToVideo" in str(idx.get("_class_name", "")) else "t2v"
    image_encoder = bool(idx.get("image_encoder") and idx["image_encoder"][0] is not None)
    return task, "wan2.2" if two else "wan2.1", experts, idx.get("boundary_ratio"), image_encoder


def _wan_facts(folder: Path) -> tuple[str, str, tuple[str, ...], float | None, bool]:
    family = wl.wan_family(folder)
    experts = ("high", "low") if family == "wan2.2" else ("single",)
    _, cfg = wl.wan_dit_wan_config(folder, experts[0])
    task = "i2v" if cfg.get("model_type") == "i2v" else "t2v"
    boundary = wl.WAN_BOUNDARY[task] if family == "wan2.2" else None
    return task, family, experts, boundary, family == "wan2.1" and task == "i2v"


def model_facts(folder: Path, fmt: str) -> tuple[str, str, tuple[str, ...], float | None, bool]:
    """(task, family, experts, boundary_ratio, image_encoder) of a model folder in format `fmt`."""
    return (_diffusers_facts if fmt == "diffusers" else _wan_facts)(folder)


def dit_source(config: GenerationConfig, folder: Path, fmt: str, expert: str) -> dict[str, str]:
    """Where an expert's weights and architecture config are. With dit_quantized and no *_quantized_ckpt the
    quantized weights are the model folder's DiT files, as LightX2V loads them from model_path (Wan2.1: the
    folder itself; Wan2.2: high_noise_model/ and low_noise_model/). A folder as the checkpoint: its
    .safetensors files (block-split folders), or for gguf-* the .gguf file named after the quant type."""
    qkey, okey = CKPT_KEYS[expert]
    if config.get("dit_quantized") and config.get(qkey):
        weights, key = config.resolve_path(config[qkey]), qkey
    elif config.get(okey) and not (config.get("dit_quantized") and expert == "low"):
        # LightX2V's Wan2.2 runner takes low_noise_original_ckpt only when dit_quantized is false
        weights, key = config.resolve_path(config[okey]), okey
    elif fmt == "diffusers":
        weights, key = str(folder / COMPONENTS[expert][0]), "model_path"
    else:
        weights, key = str(wl.wan_dit_dir(folder, expert)), "model_path"
    if not Path(weights).exists():
        raise CheckpointError(f"{expert} expert checkpoint not found: {weights} (from {key})")
    scheme = str(config.get("dit_quant_scheme") or "") if config.get("dit_quantized") else ""
    if Path(weights).is_dir() and scheme.startswith("gguf"):
        weights = str(_gguf_in(Path(weights), scheme, key))
    if fmt == "diffusers":
        arch, arch_fmt = folder / COMPONENTS[expert][0] / "config.json", "diffusers"
    else:
        arch, arch_fmt = wl.wan_dit_dir(folder, expert) / "config.json", "wan"
    if not arch.is_file():
        raise CheckpointError(f"missing architecture config {arch} for the {expert} expert")
    return {"weights": str(Path(weights)), "config": str(arch), "config_format": arch_fmt}


def quant_mismatch(scheme: str | None, found: str | None, weights: Path | str) -> str | None:
    """Why the weights do not fit dit_quantized / dit_quant_scheme (None: they fit)."""
    if scheme and found and not scheme.startswith(found):
        return f"dit_quant_scheme is {scheme} but {weights} holds {found} weights"
    if scheme and not found:
        return (f"dit_quantized is true (dit_quant_scheme {scheme}) but {weights} holds no quantized weights: "
                f"set *_quantized_ckpt to the quantized file, or dit_quantized false")
    return None


def _gguf_in(folder: Path, scheme: str, key: str) -> Path:
    """LightX2V's pick of a GGUF file in a folder: the one whose name holds the quant type (Q4_K_M, ...)."""
    kind = scheme[len("gguf-"):]
    found = sorted(p for p in folder.glob("*.gguf") if kind in p.name)
    if len(found) != 1:
        names = ", ".join(p.name for p in sorted(folder.glob("*.gguf"))) or "none"
        raise CheckpointError(f"{key}: folder {folder} must hold one .gguf file named with {kind} for "
                              f"dit_quant_scheme {scheme} (.gguf files there: {names})")
    return found[0]


def quant_scheme(config: GenerationConfig) -> str | None:
    if not config.get("dit_quantized"):
        return None
    scheme = config.get("dit_quant_scheme")
    if not scheme or not str(scheme).startswith(QUANT_PREFIXES):
        raise CheckpointError(f"config key dit_quant_scheme must be fp8-*, int8-* or gguf-* when dit_quantized "
                              f"is true (got {scheme!r})")
    return str(scheme)


def model_format(config: GenerationConfig, folder: Path) -> str:
    fmt = config.get("model_format", "auto")
    if fmt not in FORMATS:
        raise CheckpointError(f"model_format must be one of {', '.join(FORMATS)} (got {fmt!r})")
    if fmt == "auto":
        return detect_format(folder)
    if fmt == "diffusers" and not (folder / "model_index.json").is_file():
        raise CheckpointError(f"model folder {folder} has no model_index.json (expected the diffusers layout)")
    if fmt == "wan" and not wl.is_wan_layout(folder):
        raise CheckpointError(f"model folder {folder} is not Wan's original layout (model_format wan)")
    return fmt


def resolve_model(config: GenerationConfig, task: str) -> ModelRef:
    """The model a job of `task` (t2v/i2v) uses under this config."""
    folder = model_folder(config, task)
    fmt = model_format(config, folder)
    model_task, family, experts, boundary, image_encoder = model_facts(folder, fmt)
    if model_task != task:
        if task == "i2v":
            raise CheckpointError(f"model {folder} is a text-to-video model: set i2v_model_path in the config "
                                  f"to run rows with an image")
        raise CheckpointError(f"model {folder} is an image-to-video model: every row needs an image "
                              f"(or set model_path to a text-to-video model)")
    scheme = quant_scheme(config)
    dits = {e: dit_source(config, folder, fmt, e) for e in experts}
    if scheme:
        for e, d in dits.items():
            is_gguf = d["weights"].endswith(".gguf")
            if scheme.startswith("gguf") != is_gguf:
                raise CheckpointError(f"dit_quant_scheme {scheme} does not fit the {e} expert's file "
                                      f"{d['weights']} ({'a GGUF file' if is_gguf else 'not a .gguf file'})")
    from .lora import parse_lora_configs

    loras = parse_lora_configs(config.get("lora_configs"), experts, config.resolve_path)
    if image_encoder and config.get("use_image_encoder") is False:
        raise CheckpointError(image_encoder_refusal(folder))
    mismatch = model_cls_mismatch(config.get("model_cls"), family, folder)
    if mismatch:
        raise CheckpointError(mismatch)
    tae = None
    if config.get("use_tae"):
        from .tae import find_tae

        tae = find_tae(config, folder)[0]
    ref = ModelRef(path=str(folder), task=task, format=fmt, family=family, experts=experts,
                   boundary_ratio=boundary, dits=dits,
                   loras={e: [s.to_dict() for s in specs] for e, specs in loras.items()},
                   quant_scheme=scheme, image_encoder=image_encoder, tae=tae,
                   encoders=encoder_sources(config, folder, image_encoder))
    return ref


def encoder_sources(config: GenerationConfig, folder: Path, image_encoder: bool) -> dict[str, dict[str, str]]:
    """The quantized T5 / CLIP files the config asks for (t5_quantized, clip_quantized), found as LightX2V finds
    them. CLIP only for a model that has the image encoder: LightX2V loads none for the others, so their
    clip_quantized is not read."""
    from .encoder_quant import quant_source

    out = {}
    for comp in ("text", *(("clip",) if image_encoder else ())):
        src = quant_source(config, folder, comp)
        if src:
            out[comp] = src
    return out


def model_cls_mismatch(model_cls: str | None, family: str, folder: Path) -> str | None:
    """model_cls (LightX2V's --model_cls) names the family the model folder must be: wan2.1* one DiT,
    wan2.2_moe* the two A14B experts."""
    if not model_cls:
        return None
    want = "wan2.2" if model_cls.startswith("wan2.2_moe") else "wan2.1"
    if want != family:
        return (f"config key 'model_cls': {model_cls} needs a {want} model, but {folder} is a {family} model "
                f"({'two experts' if family == 'wan2.2' else 'one DiT'})")
    return None


def image_encoder_refusal(folder: Path) -> str:
    return (f"config key 'use_image_encoder': false, but the DiT of {folder} takes CLIP image features "
            f"(Wan2.1 I2V); running it without them is not implemented")


# ---------------------------------------------------------------------------------------------- files
def _tree(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise CheckpointError(f"missing folder {folder}")
    return sorted(p for p in folder.rglob("*") if p.is_file())


def _with_sidecar(path: Path) -> list[Path]:
    side = path.with_name(path.name + ".config.json")
    return [path, side] if side.is_file() else [path]


def dit_weight_files(ref: ModelRef, expert: str) -> list[Path]:
    """The weight files of an expert (only the shards its index names), without reading them."""
    weights = Path(ref.dits[expert]["weights"])
    if weights.suffix == ".gguf":
        return [weights]
    from .checkpoint import safetensors_files

    files = safetensors_files(weights)
    if weights.is_dir():
        files += sorted(weights.glob("*.safetensors.index.json"))
    return files


def component_files(ref: ModelRef, component: str) -> list[Path]:
    folder = Path(ref.path)
    if component == "tae":
        if not ref.tae:
            raise CheckpointError(f"model {ref.path} has no tiny VAE (use_tae is not set)")
        return [Path(ref.tae)]
    if component in EXPERTS:
        if component not in ref.experts:
            raise CheckpointError(f"model {ref.path} has no {component} expert (it has {', '.join(ref.experts)})")
        return dit_weight_files(ref, component) + [Path(ref.dits[component]["config"])]
    if component in ref.encoders:  # the quantized file replaces the encoder's weights, not its tokenizer
        from .encoder_quant import arch_files, weight_files

        src = ref.encoders[component]
        return weight_files(src["weights"]) + arch_files(folder, ref.format, component, src)
    if ref.format == "diffusers":
        files: list[Path] = []
        for sub in COMPONENTS[component]:
            if not (folder / sub).is_dir():
                raise CheckpointError(f"model {ref.path} has no '{sub}' folder (needed for the {component} stage)")
            files += _tree(folder / sub)
        return files
    if component == "text":
        return _with_sidecar(folder / wl.T5_FILE) + _tree(folder / wl.T5_TOKENIZER)
    if component == "vae":
        return _with_sidecar(folder / wl.VAE_FILE)
    if component == "clip":
        return _with_sidecar(folder / wl.CLIP_FILE)
    raise ValueError(f"unknown component {component!r}")


_fingerprints: dict[tuple[str, str], str] = {}


def _file_identity(path: Path) -> list[Any]:
    try:
        st = path.stat()
    except FileNotFoundError:
        raise CheckpointError(f"missing file {path}") from None
    if st.st_size <= HASH_LIMIT:
        h = hashlib.sha256(path.read_bytes()).hexdigest()
        return [path.name, st.st_size, h]
    return [str(path.resolve()), st.st_size, st.st_mtime_ns]


def row_loras(items: list[dict[str, Any]], experts: tuple[str, ...]) -> dict[str, list[dict[str, Any]]]:
    """A manifest row's LoRA set (lora_configs items, absolute paths) -> ModelRef.loras. An item without a
    name goes to the high-noise expert of a two-expert model and to the DiT of a one-DiT model, as LightX2V's
    switch_lora(path, strength) applies it."""
    from .lora import parse_lora_configs

    default = "high_noise_model" if "high" in experts else None
    items = [dict(item, name=item.get("name") or default) if default else item for item in items]
    specs = parse_lora_configs(items, experts, lambda p: p)
    return {e: [s.to_dict() for s in group] for e, group in specs.items()}


def fingerprint(ref: ModelRef, component: str) -> str:
    """Short stable id of a component: its files' identities, plus for an expert its LoRAs (strength 0 is
    no LoRA) and quantization. Feeds the cache keys."""
    memo = (json.dumps(ref.to_dict(), sort_keys=True), component)
    if memo not in _fingerprints:
        items = [_file_identity(f) for f in component_files(ref, component)]
        doc: dict[str, Any] = {"format": ref.format, "component": component, "files": items}
        if component == "tae":  # one file whatever the model folder's layout: the same file, the same decoder
            doc = {"component": component, "files": items}
        if component in EXPERTS:
            doc["quant"] = ref.quant_scheme
            doc["loras"] = [[_file_identity(Path(s["path"])), s["strength"], s.get("alpha")]
                            for s in ref.loras.get(component, []) if s["strength"] != 0]
        elif component in ref.encoders:  # the weight format: every kernel suffix computes the same numbers
            doc["quant"] = ref.encoders[component]["kind"]
        _fingerprints[memo] = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]
    return _fingerprints[memo]


def estimate_bytes(ref: ModelRef, component: str) -> int:
    """Rough resident size of a component (its weight files' size), for the memory budget."""
    total = 0
    for f in component_files(ref, component):
        if f.suffix in (".safetensors", ".pth", ".gguf", ".bin"):
            total += f.stat().st_size
    return total


# ---------------------------------------------------------------------------------------------- loading
def dit_config(ref: ModelRef, expert: str) -> dict[str, Any]:
    """diffusers WanTransformer3DModel config of an expert (from the model folder, never from the weights)."""
    d = ref.dits[expert]
    raw = _read_json(Path(d["config"]))
    if d["config_format"] == "wan":
        return wl.dit_config_from_wan(raw, ref.family, d["config"])
    return {k: v for k, v in raw.items() if not k.startswith("_")}


def _plain_diffusers(ref: ModelRef, expert: str) -> bool:
    d = ref.dits[expert]
    return (ref.format == "diffusers" and not ref.quant_scheme
            and Path(d["weights"]) == Path(ref.path) / COMPONENTS[expert][0])


def load_dit(ref: ModelRef, expert: str, dtype: torch.dtype):
    from .dit import DitWeights, build_dit
    from .lora import LoraSpec, apply_loras

    if _plain_diffusers(ref, expert):
        from diffusers import WanTransformer3DModel

        from .dit import empty_model, expected_shapes

        # headers first: a missing key, a wrong shape or dtype is named here, not deep inside from_pretrained
        weights = DitWeights(ref.dits[expert]["weights"])
        problems = weights.check(expected_shapes(empty_model(dit_config(ref, expert))))
        weights.close()
        if problems:
            raise CheckpointError(f"{weights.path} does not fit its config: " + " | ".join(problems))
        model = WanTransformer3DModel.from_pretrained(ref.dits[expert]["weights"], torch_dtype=dtype)
    else:
        weights = DitWeights(ref.dits[expert]["weights"])
        found = weights.quant_scheme()
        problem = quant_mismatch(ref.quant_scheme, found, weights.path)
        if problem:
            raise CheckpointError(problem)
        model = build_dit(dit_config(ref, expert), weights, dtype)
    apply_loras(model, [LoraSpec(**s) for s in ref.loras.get(expert, [])], expert)
    return model


def _check_headers(folder: Path) -> None:
    """Read a diffusers component's safetensors headers: a truncated or damaged file is named before loading."""
    from .checkpoint import TensorFiles

    TensorFiles.open(folder).close()


def own_aligned_memory(module: torch.nn.Module) -> torch.nn.Module:
    """Copy CPU parameters/buffers that sit at an unaligned address (views into a checkpoint's read buffer)
    into fresh 64-byte-aligned tensors. CPU matmul kernels take alignment-dependent paths, so without this the
    same weights loaded from two formats can differ in the last bit."""
    done: dict[int, torch.Tensor] = {}  # tied parameters (UMT5's embeddings) stay one tensor
    for mod in module.modules():
        for table in (mod._parameters, mod._buffers):
            for name, t in list(table.items()):
                if t is None or id(t) in done:
                    if t is not None:
                        table[name] = done[id(t)]
                    continue
                # quantized raw data (GGUF bytes) stays memory-mapped: numpy dequantizes it either way
                if t.device.type != "cpu" or not t.is_floating_point() or t.data_ptr() % 64 == 0:
                    continue
                fresh = t.detach().clone(memory_format=torch.contiguous_format)
                new = torch.nn.Parameter(fresh, requires_grad=t.requires_grad) if isinstance(
                    t, torch.nn.Parameter) else fresh
                done[id(t)] = new
                table[name] = new
    return module


def load_component(ref: ModelRef, component: str, device: torch.device, dtype: torch.dtype) -> Any:
    """Load a component ready for inference. Returns the module (text: a (tokenizer, encoder) pair; clip: a
    (processor, encoder) pair)."""
    folder = Path(ref.path)
    try:
        if component in ref.encoders:  # t5_quantized / clip_quantized (CLIP in float32 as below)
            from . import encoder_quant

            load = encoder_quant.load_t5 if component == "text" else encoder_quant.load_clip
            first, encoder = load(folder, ref.format, ref.encoders[component],
                                  dtype if component == "text" else torch.float32)
            return first, own_aligned_memory(encoder.to(device).eval())
        if component == "text":
            if ref.format == "wan":
                tokenizer, encoder = wl.load_t5(folder, dtype)
            else:
                from transformers import AutoTokenizer, UMT5EncoderModel

                _check_headers(folder / "text_encoder")
                tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
                encoder = UMT5EncoderModel.from_pretrained(folder / "text_encoder", torch_dtype=dtype)
            return tokenizer, own_aligned_memory(encoder.to(device).eval())
        if component == "vae":
            # The Wan VAE runs in float32 in every reference pipeline: its decode is sensitive to bf16.
            if ref.format == "wan":
                return own_aligned_memory(wl.load_vae(folder).to(device))
            from diffusers import AutoencoderKLWan

            _check_headers(folder / "vae")
            vae = AutoencoderKLWan.from_pretrained(folder / "vae", torch_dtype=torch.float32)
            return own_aligned_memory(vae.to(device).eval())
        if component == "clip":
            # float32 like diffusers' Wan2.1 I2V example; the encoder is 0.6B parameters.
            if ref.format == "wan":
                processor, encoder = wl.load_clip(folder, torch.float32)
            else:
                from transformers import CLIPImageProcessor, CLIPVisionModel

                _check_headers(folder / "image_encoder")
                processor = CLIPImageProcessor.from_pretrained(folder / "image_processor")
                encoder = CLIPVisionModel.from_pretrained(folder / "image_encoder", torch_dtype=torch.float32)
            return processor, own_aligned_memory(encoder.to(device).eval())
        if component == "tae":
            from .tae import load_tae

            return load_tae(Path(component_files(ref, component)[0]), device, dtype)
        if component in EXPERTS:
            if component not in ref.experts:
                raise CheckpointError(f"model {ref.path} has no {component} expert")
            return own_aligned_memory(load_dit(ref, component, dtype).to(device).eval())
    except CheckpointError:
        raise
    except (OSError, ValueError, RuntimeError, KeyError, SafetensorError) as e:
        source = ref.tae if component == "tae" else folder
        raise CheckpointError(f"cannot load the {component} model from {source}: {e}") from e
    raise ValueError(f"unknown component {component!r}")


def vae_tiling(component: str, runtime: dict[str, Any]) -> bool:
    """LightX2V's use_tiling_vae: the VAE encodes and decodes in overlapping spatial tiles (less memory at
    large sizes; the blended seams differ from a whole-frame decode by a small error, see the tests)."""
    return component == "vae" and bool(runtime.get("use_tiling_vae"))


def with_tiling(module: Any, tiling: bool) -> Any:
    """Turn on diffusers' AutoencoderKLWan tiling (its default 256-pixel tiles, 192-pixel stride)."""
    if tiling:
        module.enable_tiling()
    return module


def scheduler_config(ref: ModelRef) -> dict[str, Any]:
    if ref.format == "diffusers":
        return _read_json(Path(ref.path) / "scheduler" / "scheduler_config.json")
    from diffusers import UniPCMultistepScheduler

    return {k: v for k, v in UniPCMultistepScheduler(**WAN_SCHEDULER).config.items() if not k.startswith("_")}
