"""Shared fixtures of the unit tests: tokenizers only (no Ray here, nothing downloaded)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from mixloop.tokenizer import load_tokenizer, train_tokenizer

MINIMIND_TOKENIZER = Path(__file__).parents[3] / "shared/data/tokenizer"

_WORDS = (
    "the a cat dog sat ran on under mat far near sun moon star planet orbit light dark "
    "why how what is are hello world yes no 1 2 3 42 7 , . ? !"
).split()


@pytest.fixture(scope="session")
def trained_tokenizer(tmp_path_factory):
    """A byte-level BPE of about 330 tokens trained by mixloop on a few hundred tiny strings."""
    rng = random.Random(0)
    texts = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(3, 12))) for _ in range(300)]
    texts += ["user\nhello<|im_end|>", "assistant\nthe sun is far.\n"] * 20
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(texts, vocab_size=350, out_dir=str(out))
    return load_tokenizer(str(out))


@pytest.fixture(scope="session")
def minimind_tokenizer_dir() -> str:
    """MiniMind's tokenizer folder (../shared/data/tokenizer); tests that need it skip where it is absent."""
    if not (MINIMIND_TOKENIZER / "tokenizer.json").exists():
        pytest.skip(f"MiniMind's tokenizer is not at {MINIMIND_TOKENIZER} (the shared data folder is absent)")
    return str(MINIMIND_TOKENIZER)


@pytest.fixture(scope="session")
def minimind_tokenizer(minimind_tokenizer_dir):
    """MiniMind's real tokenizer (vocab 6400), whose template adds an empty <think> block."""
    return load_tokenizer(minimind_tokenizer_dir)
