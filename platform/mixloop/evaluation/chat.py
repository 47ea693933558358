"""`mixloop chat`: an interactive conversation with a version, streaming its tokens."""

from __future__ import annotations

import sys

import torch
from transformers import TextStreamer

from mixloop.data.tokenizer import load_tokenizer
from mixloop.train.model import load_model


def chat(model_dir: str, max_new_tokens: int = 256) -> None:
    """Read user turns from stdin until EOF or an empty line; /reset forgets the conversation."""
    model, tokenizer = load_model(model_dir).eval(), load_tokenizer(model_dir)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    history: list[dict] = []
    interactive = sys.stdin.isatty()
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = sys.stdin.readline()
        if not line.strip():
            return
        if line.strip() == "/reset":
            history.clear()
            continue
        history.append({"role": "user", "content": line.rstrip("\n")})
        ids = tokenizer.apply_chat_template(history, add_generation_prompt=True, return_tensors="pt", return_dict=True)[
            "input_ids"
        ]
        print("model> ", end="", flush=True)
        with torch.no_grad():
            out = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                streamer=streamer,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        history.append({"role": "assistant", "content": answer})
