"""Restores of one checkpoint on one node never touch each other's files (issue: SIGBUS in a restart)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch

from mixloop.train.checkpoint import restored
from mixloop.train.model import load_model, model_config, new_model


def weights_digest(model) -> float:
    return float(sum(p.detach().double().sum() * (i + 1) for i, p in enumerate(model.parameters())))


def test_staggered_restores_each_read_intact_weights_from_a_folder_of_their_own(tmp_path, trained_tokenizer):
    from ray.train import Checkpoint

    model = new_model(model_config("micro", None, trained_tokenizer), seed=3)
    model.save_pretrained(tmp_path / "checkpoint")
    expected = weights_digest(model)
    checkpoint = Checkpoint.from_directory(str(tmp_path / "checkpoint"))
    seen, errors = [], []
    # Restores are processes in production; as threads here, the loads themselves take turns, because
    # transformers' loading swaps a class attribute for its duration (not thread-safe) and a load racing
    # another can come back with its output layer untied. The folders still overlap in time.
    one_load_at_a_time = threading.Lock()

    def restore(delay: float) -> None:
        time.sleep(delay)  # arrive while earlier restores are still reading their (memory-mapped) files
        try:
            with restored(checkpoint) as folder:
                with one_load_at_a_time:
                    loaded = load_model(folder)
                time.sleep(0.3)
                seen.append((folder, weights_digest(loaded)))
        except Exception as exc:  # noqa: BLE001  reported below with the others
            errors.append(exc)

    threads = [threading.Thread(target=restore, args=(0.1 * i,)) for i in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert len({folder for folder, _ in seen}) == 5, "every restore has a folder of its own"
    assert all(torch.isclose(torch.tensor(d), torch.tensor(expected)) for _, d in seen)
    assert not any(Path(folder).exists() for folder, _ in seen), "restore folders are removed after loading"
