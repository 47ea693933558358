"""Chat health: do a version's greedy answers end their turn, and do they repeat themselves?

Continued pretraining of a fine-tuned model is known to damage its chat format and make
it repeat itself (arXiv 2401.03129); the next fine-tune should repair it. These numbers
show both, next to the losses.
"""

from __future__ import annotations

import json

import torch

from mixloop.data.files import iter_records, list_chunks
from mixloop.data.records import BadRecord, checked
from mixloop.data.tokenizer import load_tokenizer
from mixloop.storage.fs import expand_files


def repetition_rate(tokens: list[int], n: int = 4) -> float:
    """Share of the n-grams of a sequence that already occurred earlier in it."""
    grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if grams else 0.0


def summarise(generations: list[list[int]], eos_id: int, max_new_tokens: int) -> dict:
    """ended: share that emit the end-of-turn token within the limit; repetition: mean share of
    repeated 4-grams; length: mean generated tokens (up to and including the end-of-turn token)."""
    ended = [eos_id in g for g in generations]
    lengths = [g.index(eos_id) + 1 if eos_id in g else len(g) for g in generations]
    trimmed = [g[:length] for g, length in zip(generations, lengths)]
    count = max(len(generations), 1)
    return {
        "ended": sum(ended) / count,
        "repetition": sum(repetition_rate(g) for g in trimmed) / count,
        "length": sum(lengths) / count,
        "max_new_tokens": max_new_tokens,
        "samples": len(generations),
    }


def eval_prompts(
    pattern: str | tuple[str, ...],
    count: int,
    file_format: str | None = None,
    record_format: str = "auto",
    columns: dict[str, str] | None = None,
) -> list[list[dict]]:
    """The first `count` valid conversations of a chat eval split (files and records read as
    preparation reads them), each cut before its last assistant turn."""
    prompts = []
    for chunk in list_chunks(expand_files(pattern), file_format):
        for _, record in iter_records(chunk):
            try:
                turns, _ = checked(record, "chat", record_format, columns)
            except BadRecord:
                continue
            last = max(i for i, t in enumerate(turns) if t["role"] == "assistant")
            if turns[:last]:  # a chat that opens with the assistant has no prompt before it
                prompts.append(turns[:last])
            if len(prompts) == count:
                return prompts
    return prompts


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int) -> list[list[int]]:
    """Greedy continuations (new tokens only) of each prompt, through the chat template."""
    outputs = []
    for messages in prompts:
        ids = tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        outputs.append(out[0, ids.shape[1] :].tolist())
    return outputs


def chat_health(model_dir: str, prompts: dict[str, list[list[dict]]], max_new_tokens: int) -> dict:
    """Per chat corpus: summary metrics and the first few decoded answers."""
    # lazy: the model code of transformers; data.corpora imports this module for eval_prompts
    from mixloop.train.model import load_model

    torch.set_num_threads(1)
    model, tokenizer = load_model(model_dir).eval(), load_tokenizer(model_dir)
    result = {}
    for corpus, corpus_prompts in prompts.items():
        generations = generate(model, tokenizer, corpus_prompts, max_new_tokens)
        result[corpus] = summarise(generations, tokenizer.eos_token_id, max_new_tokens)
        result[corpus]["examples"] = [
            {
                "prompt": json.dumps(p[-1]["content"], ensure_ascii=False)[1:-1][:300],
                "answer": tokenizer.decode(g, skip_special_tokens=False)[:500],
            }
            for p, g in zip(corpus_prompts[:3], generations[:3])
        ]
    return result
