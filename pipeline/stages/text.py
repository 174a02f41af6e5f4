"""Stage `text` (Luigi task EncodeText): prompt -> UMT5 context, zero-padded to text_len exactly as Wan's
pipelines do. Needs the text encoder; writes `context` [1, text_len, dim] and the true token count."""
from __future__ import annotations

import logging
import time

import torch
from diffusers.pipelines.wan.pipeline_wan import prompt_clean

from ..runtime import get_model
from .common import check_finite, sidecar
from .registry import Stage

log = logging.getLogger(__name__)


def count_tokens(tokenizer, prompt: str) -> int:
    return len(tokenizer(prompt_clean(prompt), add_special_tokens=True).input_ids)


@torch.no_grad()
def encode_text(tokenizer, encoder, prompt: str, text_len: int) -> tuple[torch.Tensor, int]:
    """Returns (context [1, text_len, dim], number of real tokens). Longer prompts are truncated (warned)."""
    cleaned = prompt_clean(prompt)
    n_tokens = count_tokens(tokenizer, prompt)
    if n_tokens > text_len:
        log.warning("prompt has %d tokens, more than text_len=%d: truncated (%r...)", n_tokens, text_len,
                    cleaned[:60])
    inputs = tokenizer([cleaned], padding="max_length", max_length=text_len, truncation=True,
                       add_special_tokens=True, return_attention_mask=True, return_tensors="pt")
    device = next(encoder.parameters()).device
    ids, mask = inputs.input_ids.to(device), inputs.attention_mask.to(device)
    seq_len = int(mask.gt(0).sum())
    hidden = encoder(ids, mask).last_hidden_state[0]
    context = torch.zeros_like(hidden)
    context[:seq_len] = hidden[:seq_len]
    return context.unsqueeze(0), seq_len


VERSION = 1


def run(spec, store, run_id: str = "", on_step=None) -> dict:
    t0 = time.perf_counter()
    tokenizer, encoder = get_model(spec, spec.params["model"])
    context, seq_len = encode_text(tokenizer, encoder, spec.params["prompt"], spec.params["text_len"])
    check_finite("context", context, spec)
    return store.write_tensors(spec.ref, {"context": context},
                               sidecar(spec, VERSION, run_id, time.perf_counter() - t0, {"seq_len": seq_len}))


STAGE = Stage(name="text", family="text", version=VERSION, priority=50, component="text",
              fingerprint_param="model", task="EncodeText", run=run,
              roles={"text": "text", "text_null": "text-negative"})
