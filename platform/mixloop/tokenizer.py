"""Tokenizers: load a Hugging Face one, or train a byte-level BPE with a ChatML template.

Also the two encoders every stage uses: text documents (all tokens supervised,
ending with the end-of-text token) and conversations (only assistant tokens
supervised, each closing end-of-turn token included).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from mixloop.errors import DataError
from mixloop.storage import local_copy

PAD, BOS, EOS = "<|endoftext|>", "<|im_start|>", "<|im_end|>"

# ChatML, with {% generation %} markers so transformers' return_assistant_tokens_mask works too.
CHATML_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|im_start|>' + message['role'] + '\\n' }}"
    "{%- if message['role'] == 'assistant' -%}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{%- else -%}{{ message['content'] + '<|im_end|>\\n' }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|im_start|>assistant\\n' }}{%- endif -%}"
)


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (pad, bos, eos as MiniMind names them) and save it with a ChatML template."""
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=PAD
    )
    tokenizer.chat_template = CHATML_TEMPLATE
    tokenizer.save_pretrained(out_dir)
    return tokenizer


def load_tokenizer(path: str):
    """A fast tokenizer (from a folder or URI) with a chat template and an end-of-sequence token, or a clear error."""
    tokenizer = AutoTokenizer.from_pretrained(local_copy(path), trust_remote_code=False)
    if not tokenizer.is_fast:
        raise DataError(f"{path}: mixloop needs a fast (tokenizer.json) tokenizer.")
    if tokenizer.eos_token_id is None:
        raise DataError(f"{path}: the tokenizer has no eos_token. Fix: set eos_token in tokenizer_config.json.")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def tokenizer_fingerprint(path: str) -> str:
    """Hash of the files that decide token ids, for content-addressed caches."""
    digest, folder = hashlib.sha256(), Path(local_copy(path))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        file = folder / name
        if file.exists():
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def encode_texts(tokenizer, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each document's ids followed by the end-of-text token; every token is supervised."""
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    out = []
    for ids in encoded:
        ids = np.asarray(ids + [eos], dtype=np.int32)
        out.append((ids, np.ones(len(ids), dtype=bool)))
    return out


def encode_chats(tokenizer, conversations: list[list[dict]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each conversation rendered by the chat template; supervised tokens are the assistant's.

    Assistant spans are found by rendering the conversation prefix by prefix, so
    any template works, with or without {% generation %} markers: a turn's span
    runs from the end of the generation prompt before it to the end-of-turn
    token that closes it (what follows it, such as a newline, is not supervised).
    """
    rendered = [_assistant_spans(tokenizer, conv) for conv in conversations]
    encoded = tokenizer(
        [text for text, _ in rendered], add_special_tokens=False, return_offsets_mapping=True
    )
    out = []
    for (_, spans), ids, offsets in zip(rendered, encoded["input_ids"], encoded["offset_mapping"]):
        offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
        mask = np.zeros(len(ids), dtype=bool)
        for start, end in spans:
            mask |= (offsets[:, 0] >= start) & (offsets[:, 1] <= end) & (offsets[:, 1] > offsets[:, 0])
        out.append((np.asarray(ids, dtype=np.int32), mask))
    return out


def _assistant_spans(tokenizer, conversation: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    full = tokenizer.apply_chat_template(conversation, tokenize=False)
    eos = tokenizer.eos_token
    spans = []
    for turn, message in enumerate(conversation):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(conversation[:turn], tokenize=False, add_generation_prompt=True)
        through = tokenizer.apply_chat_template(conversation[: turn + 1], tokenize=False)
        if not (full.startswith(prompt) and full.startswith(through)):
            raise DataError(
                "the tokenizer's chat template renders earlier turns differently as a conversation grows, "
                "so assistant tokens cannot be located. Fix: use a template that renders history unchanged."
            )
        end = through.rfind(eos, len(prompt))
        spans.append((len(prompt), end + len(eos) if end >= 0 else len(through)))
    return full, spans
