"""Shared fixtures. Ray starts once per test session, and only for tests that ask for it."""

from __future__ import annotations

import random

import pytest

from mixloop.data.tokenizer import load_tokenizer, train_tokenizer


@pytest.fixture(scope="session")
def ray_address():
    """A real local Ray cluster (4 logical CPUs on a 2-core machine is fine); its GCS address."""
    import ray

    from mixloop.runs.ray_setup import init_ray

    init_ray(num_cpus=4)
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


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
