"""Shared fixtures of the unit tests: MiniMind's tokenizer (no Ray here, nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mixloop.data.tokenizer import load_tokenizer

MINIMIND_TOKENIZER = Path(__file__).parents[3] / "shared/data/tokenizer"


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
