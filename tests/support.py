"""Helpers for tests that build pipelines (imported as `support`)."""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import ray.cloudpickle
import yaml

from mixloop.train.step import StepHooks

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


class _Lines(logging.Handler):
    def __init__(self, lines: list[str]):
        super().__init__(logging.INFO)
        self.lines = lines

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextmanager
def logged_lines() -> Iterator[list[str]]:
    """The messages mixloop's loggers log at INFO and above during the block, in order: caplog for a
    fixture of wider scope than a test (caplog's are per test), or a block in a script."""
    lines: list[str] = []
    logger, handler = logging.getLogger("mixloop"), _Lines(lines)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield lines
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


class NanLoss(StepHooks):
    """The loss of the batches of these steps (1-based) is NaN."""

    def __init__(self, steps: list[int]):
        self.steps = set(steps)

    def loss(self, step, ce):
        return ce * float("nan") if step + 1 in self.steps else ce


class SlowSteps(StepHooks):
    """Every step takes `seconds` longer, so a test can act while a stage trains."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def before_step(self, step):
        time.sleep(self.seconds)


# Ray's workers cannot import this module (tests/ is not on their path): its hooks travel by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def write_spec(folder: Path, spec: dict, name: str = "pipeline.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def generated_spec(workdir: Path, stages: list[dict], **defaults) -> dict:
    """A small pipeline on generated corpora: general text and chats, micro model, 2 workers."""
    settings = {
        "seq_len": 64,
        "global_batch_tokens": 1024,
        "micro_batch_rows": 4,
        "workers": 2,
        "cpus_per_worker": 1,
        "checkpoint_every": 5,
        "log_every": 5,
        "lr": {"peak": 0.003, "warmup": 0.1},
    }
    settings.update(defaults)
    return {
        "name": "test",
        "workdir": str(workdir),
        "seed": 0,
        "tokenizer": {"train": {"vocab_size": 384}},
        "model": {"preset": "micro"},
        "corpora": {
            "facts": {"kind": "text", "generate": {"topic": "general", "documents": 400, "eval_documents": 40}},
            "chats": {"kind": "chat", "generate": {"topic": "general", "documents": 300, "eval_documents": 40}},
        },
        "defaults": settings,
        "stages": stages,
        "eval_rows": 8,
        "chat_prompts": 2,  # chat health for every version is generation: keep it short in tests
        "chat_max_new_tokens": 16,
    }


def cache_dataset(cache: Path, repo: str, commit: str, files: dict[str, object]) -> Path:
    """A dataset repository as huggingface_hub keeps a download: datasets--org--name/snapshots/<commit>/.
    `files`: path in the repository -> text, or rows (a list of dicts) for a parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    repo_folder = cache / f"datasets--{repo.replace('/', '--')}"
    snapshot = repo_folder / "snapshots" / commit
    for name, content in files.items():
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, list):
            pq.write_table(pa.Table.from_pylist(content), snapshot / name)
        else:
            (snapshot / name).write_text(content)
    (repo_folder / "refs").mkdir(parents=True)
    (repo_folder / "refs" / "main").write_text(commit)
    return snapshot


def micro_versions(folder: Path, tokenizer, chain: list[tuple[str, str | None]]) -> Path:
    """Versions of one untrained micro model published in `chain` order (name, parent) in folder/run."""
    from mixloop.train.model import model_config, new_model
    from mixloop.versioning.registry import publish

    model_dir, tokenizer_dir = folder / "weights", folder / "tokenizer"
    new_model(model_config("micro", None, tokenizer), seed=0).save_pretrained(model_dir)
    tokenizer.save_pretrained(tokenizer_dir)
    for index, (version, parent) in enumerate(chain):
        if index:
            time.sleep(1.1)  # versions are ordered by their finish time, in seconds
        publish(str(folder / "run"), str(model_dir), str(tokenizer_dir), lineage_of(version, parent))
    return folder / "run"


def port_block(size: int, low: int = 20000, high: int = 30000) -> int:
    """The first port of `size` consecutive free loopback ports, away from Ray's defaults."""
    for _ in range(200):
        base = random.randrange(low, high - size)
        sockets = []
        try:
            for port in range(base, base + size):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no block of free ports")


def marked_pids(marker: str) -> list[int]:
    """Processes whose environment carries `marker` (NAME=VALUE): everything a test's Ray started,
    whatever its process group."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if marker.encode() in (entry / "environ").read_bytes():
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def stop_head(process, marker: str, grace_s: float) -> None:
    """Stop a `ray start --head` the test started: SIGTERM its process group, then SIGKILL whatever
    carries the test's marker (workers, drivers and fake nodes run in process groups of their own)."""
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=grace_s)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        pass
    for _ in range(2):
        for pid in [process.pid, *marked_pids(marker)]:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
    process.wait()


def open_in_browser(page: Path) -> tuple[list[tuple[str, bool]], list[str]]:
    """Load a page in headless Chromium: (src, loaded) of every image, and console/page errors."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"],
        )
        tab = browser.new_page()
        errors: list[str] = []
        tab.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
        tab.on("pageerror", lambda error: errors.append(str(error)))
        tab.goto(page.as_uri(), wait_until="load")
        images = tab.evaluate(
            "Array.from(document.images).map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0])"
        )
        browser.close()
    return [tuple(image) for image in images], errors


# A resolved stage's every setting, for lineages that tests write by hand (they name what matters).
_STAGE_SETTINGS = {
    "tokens": 1000, "start_from": None, "seed": 0, "seq_len": 64, "packing": True, "global_batch_tokens": 256,
    "micro_batch_rows": 2, "balance": "corpus", "weight_decay": 0.0, "grad_clip": 1.0, "checkpoint_every": 10,
    "log_every": 1, "min_workers": 1, "max_workers": 1, "resize_every_s": 60.0, "cpus_per_worker": 1.0,
    "use_gpu": False, "resources_per_worker": {}, "max_failures": 0, "max_repeats": 4.0, "nonfinite": "stop",
    "lr": {"peak": 1e-3, "warmup": 0.0, "warmup_from": "zero", "decay": "cosine", "floor": 0.1, "wsd_decay": 0.2},
}  # fmt: skip


def lineage_of(version: str, parent: str | None = None, mixture=None, tokens: dict | None = None, **fields):
    """A Lineage as a published version would have it; `mixture`: corpus names (equal shares) or
    {corpus: (from, to)}; a version without one is a base."""
    from mixloop.config import ResolvedStage
    from mixloop.versioning.lineage import Lineage

    stage = None
    if mixture is not None:
        shares = mixture if isinstance(mixture, dict) else {c: (1 / len(mixture),) * 2 for c in mixture}
        stage = ResolvedStage.model_validate(
            {
                **_STAGE_SETTINGS,
                "name": version,
                "mixture": {c: {"from": a, "to": b} for c, (a, b) in shares.items()},
                "loss_weights": dict.fromkeys(shares, 1.0),
            }
        )
    defaults = {"stage_hash": version, "started": "2026-01-01T00:00:00+00:00", "metrics": {"final_lr": 0.0}}
    return Lineage.model_validate(
        {"version": version, "parent": parent, "stage": stage, "tokens_per_corpus": tokens or {}, **defaults, **fields}
    )


def lineages_of(*lineages):
    from mixloop.versioning.lineage import Lineages

    return Lineages(list(lineages))


def metrics_line(stage: str, step: int, tokens: dict, loss_per_corpus: dict, **fields) -> str:
    """A metrics.jsonl line as a worker writes it, with what a test does not care about filled in."""
    from mixloop.train.metrics import MetricsRecord

    values = {
        "stage": stage, "step": step, "total_steps": 10, "lr": 1e-3, "loss_per_corpus": loss_per_corpus,
        "loss": sum(loss_per_corpus.values()) / max(len(loss_per_corpus), 1), "grad_norm": 1.0, "skipped_steps": 0,
        "tokens_per_s": 100.0, "step_seconds": 1.0, "tokens": tokens, "time": 0.0, "peak_memory_mb": 1.0,
        "row_hashes": {}, "workers": 1, **fields,
    }  # fmt: skip
    return json.dumps(MetricsRecord(**values).model_dump(mode="json"))
