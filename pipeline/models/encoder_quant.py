"""Quantized T5 / CLIP encoders (t5_quantized, clip_quantized): the files LightX2V's converter writes, found
where LightX2V finds them, loaded into the classes the bf16 encoders load into.

The files: `tools/convert/converter.py --model_type wan_t5 | wan_clip --quantized --linear_type fp8 | int8`
keeps Wan's key names; each 2-D tensor whose key part number `key_idx` names a target module becomes
float8_e4m3fn / int8 [out, in] plus `<key>_scale` [out, 1] (one scale per output channel, in the source
file's dtype); every other tensor is cast to `--non_linear_dtype`; CLIP's text tower is dropped. T5:
blocks.{i}.attn.{q,k,v,o} and blocks.{i}.ffn.{gate.0,fc1,fc2}; CLIP: visual.transformer.{i}.attn.{to_qkv,proj}
and .mlp.{0,2} (their biases stay float). Written as .pth (the name LightX2V looks for) or .safetensors.
Where: the config's `t5_quantized_ckpt` / `clip_quantized_ckpt`, else models_t5_umt5-xxl-enc-{fp8|int8}.pth /
models_clip_open-clip-xlm-roberta-large-vit-huge-14-{fp8|int8}.pth (the scheme's part before '-') in the model
folder's distill_int8/, distill_fp8/, distill_models/, int8/, fp8/, original/, then the folder itself
(lightx2v/utils/utils.py find_torch_model_path, in its order).
The modules: UMT5EncoderModel / CLIPVisionModel with those linears as W8A8Linear (LightX2V's q_linear.py
math: the activation is quantized per token too). The tokenizer, processor and architecture come from the
model folder, as for the bf16 encoders.
"""
from __future__ import annotations

from pathlib import Path
import torch

from ..config_keys import ENCODER_SCHEMES
from ..errors import CheckpointError
from . import wan_layout as wl

NAMES = {"text": "T5 text encoder", "clip": "CLIP image encoder"}
# component -> (flag, scheme key, checkpoint key)
KEYS = {"text": ("t5_quantized", "t5_quant_scheme", "t5_quantized_ckpt"),
        "clip": ("clip_quantized", "clip_quant_scheme", "clip_quantized_ckpt")}
FILE_NAMES = {"text": "models_t5_umt5-xxl-enc-{}.pth",
              "clip": "models_clip_open-clip-xlm-roberta-large-vit-huge-14-{}.pth"}
SEARCH_DIRS = ("distill_int8", "distill_fp8", "distill_models", "int8", "fp8", "original")  # LightX2V's order
# converter.py's model_type_keys_map: a 2-D tensor is quantized when key.split(".")[key_idx] is a target
CONVERTER_TARGETS = {"text": (2, ("attn", "ffn")), "clip": (3, ("attn", "mlp"))}
WEIGHT_DTYPES = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}


# ------------------------------------------------------------------------------------------------ where
def quant_source(config, folder: Path, component: str) -> dict[str, str] | None:
    """{'scheme', 'kind' (fp8 | int8), 'weights', 'found'} of a component's quantized file, None when its flag
    is off. A missing file raises naming every place looked at."""
    flag, scheme_key, ckpt_key = KEYS[component]
    if config.get(flag) is not True:
        return None
    scheme = config.get(scheme_key)
    if scheme not in ENCODER_SCHEMES:  # parse_config refuses these; a hand-built config gets the same answer
        raise CheckpointError(f"config key '{scheme_key}': {scheme!r} is not an implemented scheme")
    name = FILE_NAMES[component].format(scheme.split("-")[0])
    what = f"quantized {NAMES[component]} checkpoint"
    if config.get(ckpt_key):
        path, how = config.locate(config[ckpt_key])
        if not Path(path).exists():
            raise CheckpointError(f"{what} not found: {path} (from {ckpt_key})")
        found = f"{ckpt_key}, {how}"
    else:
        candidates = [folder / d / name for d in SEARCH_DIRS] + [folder / name]
        hit = next((c for c in candidates if c.is_file()), None)
        if hit is None:
            raise CheckpointError(f"{what} not found: {name} is neither in {folder} nor in its "
                                  f"{', '.join(d + '/' for d in SEARCH_DIRS)}, where LightX2V looks (from "
                                  f"{flag}); {ckpt_key} names the file")
        path, found = str(hit), "found in the model folder, as LightX2V looks"
    return {"scheme": scheme, "kind": ENCODER_SCHEMES[scheme], "weights": str(path), "found": found}


def weight_files(weights: str) -> list[Path]:
    path = Path(weights)
    if path.suffix in (".pth", ".pt"):
        return [path]
    from .checkpoint import safetensors_files

    return safetensors_files(path)


def read_state(weights: str, meta: bool = False) -> dict[str, torch.Tensor]:
    """The file's tensors: a .pth memory-mapped (weights_only), safetensors read, or with `meta` only their
    shapes and dtypes (meta tensors, for checks)."""
    from .checkpoint import TensorFiles, load_pth

    path = Path(weights)
    if path.suffix in (".pth", ".pt"):
        return load_pth(path)
    with TensorFiles.open(path) as files:
        if meta:
            return {k: torch.empty(files.shape(k), dtype=files.dtype(k), device="meta") for k in files.keys()}
        return {k: files.get(k) for k in files.keys()}


# --------------------------------------------------------------------------------------------- the file
def split_state(state: dict[str, torch.Tensor], component: str, src: dict[str, str]
                ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(float tensors, {weight key: (quantized weight, scale)}) of a converter-written file, checked against
    what the converter writes: each target tensor in the scheme's dtype with an [out, 1] scale, nothing else
    quantized. CLIP's text tower is skipped (LightX2V's loader drops it too)."""
    idx, targets = CONVERTER_TARGETS[component]
    want = WEIGHT_DTYPES[src["kind"]]
    scheme_key = KEYS[component][1]
    where = Path(src["weights"]).name
    plain: dict[str, torch.Tensor] = {}
    quant: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    unquantized, wrong, problems = [], [], []
    for k, v in state.items():
        if k.endswith(".weight_scale") or (component == "clip" and "textual" in k):
            continue  # scales are read with their weight (CLIP's `log_scale` is no weight scale)
        parts = k.split(".")
        if v.dim() == 2 and len(parts) > idx and parts[idx] in targets:
            scale = state.get(k + "_scale")
            if v.dtype not in WEIGHT_DTYPES.values() or scale is None:
                unquantized.append(f"{k} ({str(v.dtype).replace('torch.', '')})")
            elif v.dtype != want:
                wrong.append(str(v.dtype).replace("torch.", ""))
            elif scale.numel() != v.shape[0] or not scale.is_floating_point():
                problems.append(f"{k}_scale is {str(scale.dtype).replace('torch.', '')} {list(scale.shape)}, "
                                f"expected one float scale per output channel ([{v.shape[0]}, 1])")
            else:
                quant[k] = (v, scale)
        elif v.dtype in WEIGHT_DTYPES.values():
            problems.append(f"{k} is {v.dtype} but LightX2V's converter leaves it unquantized")
        else:
            plain[k] = v
    orphans = [k for k in state if k.endswith(".weight_scale") and k[: -len("_scale")] not in state]
    if orphans:
        problems.append(f"scale(s) without a weight: {', '.join(orphans[:4])}")
    if wrong:
        problems.insert(0, f"{scheme_key} is {src['scheme']} but {where} holds {wrong[0]} weights")
    if unquantized and not quant and not wrong:
        problems.insert(0, f"{KEYS[component][0]} is true ({scheme_key} {src['scheme']}) but {where} holds no "
                           f"quantized weights (e.g. {unquantized[0]}): name LightX2V's quantized file, or set "
                           f"{KEYS[component][0]} false")
    elif unquantized:
        problems.append(f"{len(unquantized)} layer(s) LightX2V's converter quantizes are not quantized: "
                        f"{', '.join(unquantized[:4])}")
    if problems:
        raise CheckpointError(f"{src['weights']}: " + "; ".join(problems))
    return plain, quant


def _linear_path(key: str) -> str:
    return key[: -len(".weight")]


def t5_entries(state: dict[str, torch.Tensor], cfg, src: dict[str, str]
               ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """(UMT5EncoderModel float tensors by name, {linear module path: (q, scale)}), checked against the
    architecture: every key, every shape."""
    plain, quant = split_state(state, "text", src)
    named: dict[str, torch.Tensor] = {}
    linears: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    unknown = []
    for k, v in plain.items():
        new = wl.T5_MAP.forward(k)
        if new is None:
            unknown.append(k)
        else:
            named[new] = v
    for k, pair in quant.items():
        new = wl.T5_MAP.forward(k)
        if new is None:
            unknown.append(k)
        else:
            linears[_linear_path(new)] = pair
    if unknown:
        raise CheckpointError(f"{src['weights']}: {len(unknown)} key(s) are not Wan T5 encoder keys, "
                              f"e.g. {unknown[:5]}")
    if "shared.weight" in named:
        named["encoder.embed_tokens.weight"] = named["shared.weight"]
    found = {**named, **{p + ".weight": q for p, (q, _) in linears.items()}}
    wl.check_shapes(found, wl.expected_t5_shapes(cfg), src["weights"])
    return named, linears


def clip_entries(state: dict[str, torch.Tensor], model, src: dict[str, str]
                 ) -> tuple[dict[str, torch.Tensor], dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """The CLIP counterpart: to_qkv's rows (and their scales) split into q_proj, k_proj, v_proj."""
    plain, quant = split_state(state, "clip", src)
    named = wl.map_clip(plain, model)
    pre = wl.clip_prefix(model)
    linears: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for k, (q, s) in quant.items():
        m = wl.CLIP_QKV.match(k)
        if m:
            base = f"{pre}encoder.layers.{m.group(1)}.self_attn."
            for name, qq, ss in zip(("q_proj", "k_proj", "v_proj"), q.chunk(3), s.reshape(-1, 1).chunk(3)):
                linears[base + name] = (qq, ss)
            continue
        new = wl.CLIP_MAP.forward(k)
        if new is None:
            raise CheckpointError(f"{src['weights']}: {k} is not a key of Wan's CLIP visual tower")
        linears[pre + _linear_path(new)] = (q, s)
    found = {**named, **{p + ".weight": q for p, (q, _) in linears.items()}}
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wl.check_shapes(found, expected, src["weights"])
    return named, linears


# ----------------------------------------------------------------------------------------- the modules
class GatedFFN(torch.nn.Module):
    """UMT5's gated-GELU feed-forward, act(wi_0 x) * wi_1 x -> wo, without its cast of the input to
    wo.weight's dtype (kept for bitsandbytes; with an fp8 wo it would make the activation fp8). LightX2V's
    T5FeedForward has no such cast either."""

    def __init__(self, ffn: torch.nn.Module):
        super().__init__()
        self.wi_0, self.wi_1, self.wo, self.act = ffn.wi_0, ffn.wi_1, ffn.wo, ffn.act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(self.act(self.wi_0(x)) * self.wi_1(x))


def _install(model: torch.nn.Module, named: dict[str, torch.Tensor],
             linears: dict[str, tuple[torch.Tensor, torch.Tensor]], dtype: torch.dtype, source: str) -> None:
    """Put W8A8 layers at `linears` (a linear's bias, if any, comes from `named`) and assign the float tensors
    (in `dtype`) to a model built on the meta device; every tensor must end up real."""
    from .quant import W8A8Linear

    cast: dict[int, torch.Tensor] = {}  # one copy per tensor: UMT5's tied embeddings stay one tensor
    for v in named.values():
        if id(v) not in cast:
            cast[id(v)] = v.to(dtype) if v.is_floating_point() else v
    named = {k: cast[id(v)] for k, v in named.items()}
    for path, (q, s) in linears.items():
        parent, _, child = path.rpartition(".")
        bias = named.pop(path + ".bias", None)
        model.get_submodule(parent).register_module(child, W8A8Linear(q, s.float(), bias))
    model.load_state_dict(named, strict=False, assign=True)
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise CheckpointError(f"{source}: no tensor for {', '.join(left[:5])}")
    model.requires_grad_(False)


def load_t5(folder: Path, fmt: str, src: dict[str, str], dtype: torch.dtype):
    """(tokenizer, UMT5EncoderModel with W8A8 attention and FFN linears)."""
    from accelerate import init_empty_weights
    from transformers import AutoTokenizer, UMT5EncoderModel

    cfg = t5_config(folder, fmt, src)
    named, linears = t5_entries(read_state(src["weights"]), cfg, src)
    with init_empty_weights():
        model = UMT5EncoderModel(cfg)
    _install(model, named, linears, dtype, src["weights"])
    model.encoder.embed_tokens.weight = model.shared.weight  # one tensor, as from_pretrained ties them
    for block in model.encoder.block:
        block.layer[1].DenseReluDense = GatedFFN(block.layer[1].DenseReluDense)
    tok = tokenizer_dir(folder, fmt)
    if not tok.is_dir():
        raise CheckpointError(f"missing tokenizer folder {tok}")
    return AutoTokenizer.from_pretrained(tok), model.eval()


def load_clip(folder: Path, fmt: str, src: dict[str, str], dtype: torch.dtype):
    """(CLIPImageProcessor, CLIPVisionModel with W8A8 attention and MLP linears)."""
    from accelerate import init_empty_weights
    from transformers import CLIPImageProcessor, CLIPVisionModel

    cfg = clip_config(folder, fmt, src)
    with init_empty_weights():
        model = CLIPVisionModel(cfg)
    named, linears = clip_entries(read_state(src["weights"]), model, src)
    _install(model, named, linears, dtype, src["weights"])
    if fmt == "wan":
        processor = wl.clip_processor(cfg.image_size)
    else:
        processor = CLIPImageProcessor.from_pretrained(folder / "image_processor")
    return processor, model.eval()


# ------------------------------------------------------------------------------------- architecture
def t5_config(folder: Path, fmt: str, src: dict[str, str]):
    from transformers import UMT5Config

    if fmt == "diffusers":
        return UMT5Config.from_pretrained(folder / "text_encoder")
    arch = wl.arch_override(Path(src["weights"])) or wl.arch_override(folder / wl.T5_FILE) or wl.UMT5_XXL
    return UMT5Config(**arch)


def clip_config(folder: Path, fmt: str, src: dict[str, str]):
    from transformers import CLIPVisionConfig

    if fmt == "diffusers":
        return CLIPVisionConfig.from_pretrained(folder / "image_encoder")
    arch = wl.arch_override(Path(src["weights"])) or wl.arch_override(folder / wl.CLIP_FILE) or wl.CLIP_VIT_H14
    return CLIPVisionConfig(**arch)


def tokenizer_dir(folder: Path, fmt: str) -> Path:
    return folder / ("tokenizer" if fmt == "diffusers" else wl.T5_TOKENIZER)


def arch_files(folder: Path, fmt: str, component: str, src: dict[str, str]) -> list[Path]:
    """The files besides the weights that decide a quantized encoder (for its fingerprint): architecture
    config, tokenizer or processor."""
    if fmt == "diffusers":
        sub = ("text_encoder", "tokenizer") if component == "text" else ("image_encoder", "image_processor")
        files = [folder / sub[0] / "config.json"]
        files += sorted(p for p in (folder / sub[1]).rglob("*") if p.is_file())
        return files
    base = wl.T5_FILE if component == "text" else wl.CLIP_FILE
    sides = [p for p in (Path(src["weights"] + ".config.json"), folder / (base + ".config.json")) if p.is_file()]
    if component == "text":
        sides += sorted(p for p in tokenizer_dir(folder, fmt).rglob("*") if p.is_file())
    return sides


def describe(folder: Path, fmt: str, component: str, src: dict[str, str]) -> tuple[int, str]:
    """(tensor count, report line) of a quantized encoder, checked without building it."""
    from accelerate import init_empty_weights

    state = read_state(src["weights"], meta=True)
    path = Path(src["weights"])
    shown = path.relative_to(folder) if path.is_relative_to(folder) else path
    head = f"{shown} ({src['found']}) [LightX2V {src['kind']} ({src['scheme']})"
    if component == "text":
        cfg = t5_config(folder, fmt, src)
        _, linears = t5_entries(state, cfg, src)
        tok = tokenizer_dir(folder, fmt)
        if not any(tok.glob("tokenizer*")) and not any(tok.glob("spiece.model")):
            raise CheckpointError(f"tokenizer folder {tok} has no tokenizer files")
        return len(state), (f"{head} -> UMT5EncoderModel, {len(linears)} W8A8 linears, {cfg.num_layers} blocks, "
                            f"d_model {cfg.d_model}] + tokenizer {tok.name}/")
    from transformers import CLIPVisionModel

    cfg = clip_config(folder, fmt, src)
    with init_empty_weights():
        model = CLIPVisionModel(cfg)
    _, linears = clip_entries(state, model, src)
    return len(state), f"{head} -> CLIPVisionModel, {len(linears)} W8A8 linears, {cfg.num_hidden_layers} layers]"
