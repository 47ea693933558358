"""Tokenizers: load a Hugging Face one, or train a byte-level BPE with a ChatML template.

Also the two encoders every stage uses: text documents (all tokens supervised,
ending with the end-of-text token) and conversations (only assistant tokens
supervised, each closing end-of-turn token included).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from mixloop.errors import DataError
from mixloop.storage.fs import local_copy

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


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | None = None) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (pad, bos, eos as MiniMind names them) with a ChatML template; saved in
    out_dir when given."""
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
    if out_dir is not None:
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
    # Padding or truncation saved in tokenizer.json stays on in the Rust tokenizer, which the encoders
    # call directly: documents would be cut, or padded with tokens marked as targets.
    tokenizer.backend_tokenizer.no_truncation()
    tokenizer.backend_tokenizer.no_padding()
    return tokenizer


def tokenizer_fingerprint(path: str) -> str:
    """Hash of the files that decide token ids, for content-addressed caches."""
    digest, folder = hashlib.sha256(), Path(local_copy(path))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        file = folder / name
        if file.exists():
            digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def encode_texts(tokenizer, texts: list[str]) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """Each text as one document: its ids followed by the end-of-text token, every token supervised
    (in a list, as encode_chats gives the documents of each conversation)."""
    # The Rust tokenizer itself: transformers' wrapper converts every encoding to Python objects first,
    # a fifth of the time on top of the encoding (mixloop bench data compares preparation with this call).
    encoded = tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    eos = tokenizer.eos_token_id
    out = []
    for encoding in encoded:
        ids = np.append(np.asarray(encoding.ids, dtype=np.int32), np.int32(eos))
        out.append([(ids, np.ones(len(ids), dtype=bool))])
    return out


def encode_chats(tokenizer, conversations: list[list[dict]]) -> list[list[tuple[np.ndarray, np.ndarray]]]:
    """The documents of each conversation rendered by the chat template; supervised tokens are the
    assistant's.

    Assistant spans are found by rendering the conversation prefix by prefix, so
    any template works, with or without {% generation %} markers: a turn's span
    runs from the end of the generation prompt before it to the end-of-turn
    token that closes it (what follows it, such as a newline, is not supervised).
    A conversation is one document when the template renders its history the same
    as it grows. Templates that render earlier turns differently later (Qwen3's
    drops earlier answers' reasoning) make one document per assistant turn: the
    conversation up to that turn as the template renders it then, that turn
    supervised, as the model will see it when it answers.
    A conversation the template refuses, or whose assistant tokens cannot be
    located, raises DataError with the reason (the preparation then encodes the
    batch record by record and rejects that conversation alone).
    """
    if GENERATION_MARKER.search(tokenizer.chat_template or ""):
        return [[document] for document in _marked(tokenizer, conversations)]
    documents = [_rendered_documents(tokenizer, conv) for conv in conversations]
    flat = [document for conversation in documents for document in conversation]
    encoded = tokenizer.backend_tokenizer.encode_batch([text for text, _ in flat], add_special_tokens=False)
    masked = iter(zip(flat, encoded))
    return [
        [
            _masked(encoding.ids, encoding.offsets, spans)
            for (_, spans), encoding in (next(masked) for _ in conversation)
        ]
        for conversation in documents
    ]


# A template that marks what the assistant says ({% generation %} ... {% endgeneration %}) says itself
# which tokens train; transformers reads the markers (return_assistant_tokens_mask).
GENERATION_MARKER = re.compile(r"{%-?\s*generation\s*-?%}")


def _marked(tokenizer, conversations: list[list[dict]]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Each conversation's ids, and its assistant tokens as the template's generation markers mark them
    (one batched call; the error is the batch's, so a caller finds the conversation by encoding it alone)."""
    try:
        out = tokenizer.apply_chat_template(
            conversations, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
    except Exception as exc:  # jinja2's TemplateError (the template's own raise_exception too), or transformers'
        raise DataError(f"chat template failed: {exc}") from exc
    masks = [np.asarray(mask, dtype=bool) for mask in out["assistant_masks"]]
    if not all(mask.any() for mask in masks):
        raise DataError("the chat template's {% generation %} markers mark no token of this conversation")
    return [(np.asarray(ids, dtype=np.int32), mask) for ids, mask in zip(out["input_ids"], masks)]


def _masked(ids: list[int], offsets, spans: list[tuple[int, int]]) -> tuple[np.ndarray, np.ndarray]:
    """The ids and which of them lie inside the character spans."""
    offsets = np.asarray(offsets, dtype=np.int64).reshape(-1, 2)
    mask = np.zeros(len(ids), dtype=bool)
    for start, end in spans:
        mask |= (offsets[:, 0] >= start) & (offsets[:, 1] <= end) & (offsets[:, 1] > offsets[:, 0])
    return np.asarray(ids, dtype=np.int32), mask


class _HistoryChanges(DataError):
    """The template renders earlier turns differently as the conversation grows."""


def _rendered_documents(tokenizer, conversation: list[dict]) -> list[tuple[str, list[tuple[int, int]]]]:
    """(text, assistant spans) of the documents a conversation becomes (see encode_chats)."""
    try:
        return [_assistant_spans(tokenizer, conversation)]
    except _HistoryChanges:
        return [
            _assistant_spans(tokenizer, conversation[: turn + 1], only_last=True)
            for turn, message in enumerate(conversation)
            if message["role"] == "assistant"
        ]


def _assistant_spans(tokenizer, conversation: list[dict], only_last: bool = False) -> tuple[str, list[tuple[int, int]]]:
    full = _render(tokenizer, conversation)
    eos = tokenizer.eos_token
    spans = []
    for turn, message in enumerate(conversation):
        if message["role"] != "assistant" or (only_last and turn != len(conversation) - 1):
            continue
        if turn:
            prompt = _render(tokenizer, conversation[:turn], add_generation_prompt=True)
        else:
            prompt = _opening_prompt(tokenizer)
        through = full if turn == len(conversation) - 1 else _render(tokenizer, conversation[: turn + 1])
        # Both are per-conversation reasons (MiniMind's template opens an answer that holds a <think> block
        # unlike its generation prompt), so the conversation is rejected, not the template.
        if not full.startswith(prompt):
            raise DataError(
                f"the chat template opens assistant turn {turn} differently from its generation "
                "prompt, so the turn's tokens cannot be located"
            )
        if not full.startswith(through):
            raise _HistoryChanges(
                f"the chat template renders the turns up to {turn} differently as the conversation goes on"
            )
        end = through.rfind(eos, len(prompt))
        spans.append((len(prompt), end + len(eos) if end >= 0 else len(through)))
    return full, spans


def _render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    try:
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    except Exception as exc:  # jinja2's TemplateError (the template's own raise_exception too), or transformers'
        raise DataError(f"chat template failed: {exc}") from exc


def _opening_prompt(tokenizer) -> str:
    """The generation prompt of an empty conversation, before an assistant turn that opens one (a greeting).

    Transformers renders no empty conversation, so it is what add_generation_prompt
    appends to a one-turn conversation; a template that also renders something before
    the first turn (a default system prompt) then fails the prefix check, as it should.
    """
    probe = [{"role": "user", "content": ""}]
    before, after = _render(tokenizer, probe), _render(tokenizer, probe, add_generation_prompt=True)
    if not after.startswith(before):
        raise DataError(
            "the chat template's generation prompt changes the turns before it, "
            "so the assistant's tokens cannot be located"
        )
    return after[len(before) :]
