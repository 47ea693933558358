"""Build and load the models mixloop trains: transformers' Qwen3ForCausalLM.

MiniMind-3 exports to this architecture, so every version loads with
AutoModelForCausalLM.from_pretrained. Weights are read and written as
safetensors only.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoConfig, AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM
from transformers.utils import logging as transformers_logging

from mixloop.errors import MixloopError
from mixloop.storage.fs import local_copy

# Models of this scale load and save in milliseconds; transformers' progress bars for that would only
# interleave with the stages' progress lines, at every checkpoint of every worker and eval task.
transformers_logging.disable_progress_bar()

PRESETS: dict[str, dict] = {
    "minimind-3": dict(
        hidden_size=768,
        num_hidden_layers=8,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=2432,
        vocab_size=6400,
        rope_theta=1e6,
        max_position_embeddings=32768,
    ),
    "small": dict(
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=768,
        max_position_embeddings=4096,
    ),
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=192,
        max_position_embeddings=2048,
    ),
    "micro": dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        intermediate_size=64,
        max_position_embeddings=2048,
    ),
}


def model_config(preset: str | None, overrides: dict | None, tokenizer) -> Qwen3Config:
    """The Qwen3 config of a preset plus overrides, with the tokenizer's vocabulary and special ids."""
    fields: dict[str, Any] = dict(tie_word_embeddings=True, rope_theta=1e6, rms_norm_eps=1e-6, attention_dropout=0.0)
    fields.update(PRESETS[preset] if preset else {})
    fields.update(overrides or {})
    fields.setdefault("vocab_size", len(tokenizer))
    fields.setdefault("head_dim", fields["hidden_size"] // fields["num_attention_heads"])
    fields.update(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    config = Qwen3Config(**fields)
    check_vocabulary(config.vocab_size, tokenizer)
    return config


def check_vocabulary(vocab_size: int, tokenizer) -> None:
    if len(tokenizer) > vocab_size:
        raise MixloopError(
            f"the tokenizer has {len(tokenizer)} tokens but the model's vocabulary holds {vocab_size}. "
            "Fix: use the model's own tokenizer or raise model.config.vocab_size."
        )


def new_model(config: Qwen3Config, seed: int) -> Qwen3ForCausalLM:
    """A freshly initialised model; the same seed gives the same weights in every process."""
    torch.manual_seed(seed)
    config._attn_implementation = "sdpa"
    return Qwen3ForCausalLM(config).float()


def load_model(path: str, trust_remote_code: bool = False):
    """A causal LM from a Hugging Face directory or URI, in fp32, with SDPA attention (it takes our 4D masks)."""
    try:
        return AutoModelForCausalLM.from_pretrained(
            local_copy(path), dtype=torch.float32, attn_implementation="sdpa", trust_remote_code=trust_remote_code
        )
    except Exception as exc:  # noqa: BLE001  safetensors, torch and transformers each raise their own kinds
        first_line = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise MixloopError(
            f"cannot load a causal LM from {path}: {type(exc).__name__}: {first_line}. Fix: point "
            "at a complete Hugging Face model directory (config.json and model.safetensors), or "
            "retrain the version it was copied from."
        ) from None


def load_config(path: str, trust_remote_code: bool = False):
    return AutoConfig.from_pretrained(local_copy(path), trust_remote_code=trust_remote_code)
