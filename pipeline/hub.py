"""`wan-batch download`: fetch a model (and optionally a distilled/quantized DiT or distill LoRAs) from the
Hugging Face Hub with huggingface_hub's snapshot_download, into `<dir>/<owner>/<repo>` (the layout the configs
in configs/ expect: `models/Wan-AI/Wan2.2-I2V-A14B`, `models/lightx2v/...`, `models/QuantStack/...`).

When a separate DiT is chosen (fp8, int8, distill, gguf-*), the base repo's bf16 DiT shards are skipped but its
`high_noise_model/*.json` / `low_noise_model/*.json` (or Wan2.1's top-level config.json) are kept: the loaders
read the architecture from them. snapshot_download resumes interrupted downloads and skips complete files.
The repo file names below are the ones published when this was written; the patterns use wildcards where the
publishers add date suffixes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .errors import WanBatchError

ALIASES = {
    "wan2.2-t2v": "Wan-AI/Wan2.2-T2V-A14B", "wan2.2-i2v": "Wan-AI/Wan2.2-I2V-A14B",
    "wan2.2-t2v-diffusers": "Wan-AI/Wan2.2-T2V-A14B-Diffusers",
    "wan2.2-i2v-diffusers": "Wan-AI/Wan2.2-I2V-A14B-Diffusers",
    "wan2.1-i2v-480p": "Wan-AI/Wan2.1-I2V-14B-480P", "wan2.1-i2v-720p": "Wan-AI/Wan2.1-I2V-14B-720P",
    "wan2.1-i2v-480p-diffusers": "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers",
    "wan2.1-i2v-720p-diffusers": "Wan-AI/Wan2.1-I2V-14B-720P-Diffusers",
}
KNOWN = set(ALIASES.values())
NON_MODEL = ["assets/*", "examples/*", "*.mp4", "*.png", "*.jpg", "*.gif"]
DIT_CHOICES = "bf16 (default: the repo's own DiT), distill, fp8, int8, gguf-Q4_K_M, gguf-Q8_0, gguf-<TYPE>"


@dataclass
class Fetch:
    repo: str
    allow: list[str] | None = None
    ignore: list[str] = field(default_factory=list)

    def describe(self) -> str:
        parts = [self.repo]
        if self.allow:
            parts.append("only " + ", ".join(self.allow))
        if self.ignore:
            parts.append("skipping " + ", ".join(self.ignore))
        return "; ".join(parts)


def _facts(repo: str) -> tuple[str, str, str]:
    """(family wan2.2|wan2.1, task t2v|i2v, resolution tag for Wan2.1 '480p'|'720p'|'')."""
    name = repo.split("/")[-1].lower()
    family = "wan2.2" if "wan2.2" in name else "wan2.1"
    task = "i2v" if "i2v" in name else "t2v"
    res = "720p" if "720p" in name else "480p" if "480p" in name else ""
    return family, task, res


def plan_download(model: str, dit: str = "bf16", lora: str | None = None) -> list[Fetch]:
    """The repos and patterns `wan-batch download` fetches (no network)."""
    repo = ALIASES.get(model.lower(), model)
    if "/" not in repo:
        raise WanBatchError(f"unknown model {model!r}: give a Hugging Face repo id (owner/name) or one of "
                            f"{', '.join(sorted(ALIASES))}")
    family, task, res = _facts(repo)
    diffusers = repo.lower().endswith("-diffusers")
    dit = (dit or "bf16").strip()
    if dit != "bf16" and diffusers:
        raise WanBatchError(f"--dit {dit} goes with Wan's original layout (e.g. {repo[:-len('-Diffusers')]}), "
                            f"not the diffusers layout")
    if dit != "bf16" and repo not in KNOWN:
        raise WanBatchError(f"--dit {dit} is only known for {', '.join(sorted(KNOWN))}")
    base = Fetch(repo, ignore=list(NON_MODEL))
    fetches = [base]
    if dit == "bf16":
        pass
    elif family == "wan2.2":
        base.ignore += ["high_noise_model/*.safetensors", "low_noise_model/*.safetensors"]
        if dit in ("distill", "fp8", "int8"):
            kind = {"distill": "lightx2v_4step", "fp8": "scaled_fp8_e4m3_lightx2v_4step",
                    "int8": "int8_lightx2v_4step"}[dit]
            fetches.append(Fetch("lightx2v/Wan2.2-Distill-Models",
                                 allow=[f"wan2.2_{task}_A14b_{n}_{kind}*.safetensors"
                                        for n in ("high_noise", "low_noise")], ignore=["*comfyui*"]))
        elif dit.startswith("gguf-"):
            quant = dit[len("gguf-"):]
            gguf_repo = f"QuantStack/Wan2.2-{task.upper()}-A14B-GGUF"
            fetches.append(Fetch(gguf_repo, allow=[f"HighNoise/*-{quant}.gguf", f"LowNoise/*-{quant}.gguf"]))
        else:
            raise WanBatchError(f"unknown --dit {dit!r}; choose {DIT_CHOICES}")
    else:
        if not res:
            raise WanBatchError(f"--dit {dit} for Wan2.1 needs a 480P or 720P model (got {repo})")
        base.ignore += ["diffusion_pytorch_model*.safetensors", "diffusion_pytorch_model*.index.json"]
        kind = {"distill": "lightx2v_4step", "fp8": "scaled_fp8_e4m3_lightx2v_4step",
                "int8": "int8_lightx2v_4step"}.get(dit)
        if kind is None:
            raise WanBatchError(f"--dit {dit!r} is not available for Wan2.1 here; choose bf16, distill, fp8 or int8")
        fetches.append(Fetch("lightx2v/Wan2.1-Distill-Models", allow=[f"wan2.1_i2v_{res}_{kind}*.safetensors"],
                             ignore=["*comfyui*"]))
    if lora == "distill":
        if family != "wan2.2":
            raise WanBatchError("--lora distill is for the Wan2.2 A14B models")
        fetches.append(Fetch("lightx2v/Wan2.2-Distill-Loras",
                             allow=[f"wan2.2_{task}_A14b_{n}_lora_rank64_lightx2v_4step*.safetensors"
                                    for n in ("high_noise", "low_noise")]))
    elif lora:
        raise WanBatchError(f"unknown --lora {lora!r}; the choice is 'distill'")
    return fetches


def offline_message(repo: str, target: Path, error: Exception) -> str:
    return (f"cannot download {repo}: the Hugging Face Hub is not reachable ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''}).\n"
            f"Check the network (or unset HF_HUB_OFFLINE); files already in {target} are kept and the same "
            f"command resumes where it stopped. To use a model fetched elsewhere, copy it to {target}.")


def download(fetches: list[Fetch], root: Path, revision: str | None = None) -> list[Path]:
    """Run the fetches into `<root>/<owner>/<repo>`; raise WanBatchError with a clear message offline."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, OfflineModeIsEnabled

    unreachable = (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError, TimeoutError,
                   *_transport_errors())
    out = []
    for f in fetches:
        target = Path(root) / f.repo
        target.mkdir(parents=True, exist_ok=True)
        try:
            snapshot_download(repo_id=f.repo, local_dir=str(target), allow_patterns=f.allow,
                              ignore_patterns=f.ignore or None, revision=revision if f is fetches[0] else None)
        except unreachable as e:
            raise WanBatchError(offline_message(f.repo, target, e)) from None
        except HfHubHTTPError as e:
            raise WanBatchError(f"cannot download {f.repo}: {e}") from None
        out.append(target)
    return out


def _transport_errors() -> tuple[type[Exception], ...]:
    """Network errors of the HTTP client huggingface_hub uses (httpx in 1.x+, requests before)."""
    out: list[type[Exception]] = []
    try:
        import httpx

        out.append(httpx.TransportError)
    except ImportError:
        pass
    try:
        import requests

        out += [requests.ConnectionError, requests.Timeout]
    except ImportError:
        pass
    return tuple(out)
