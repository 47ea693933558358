"""Helpers for tests that build pipelines (imported as `support`)."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


def write_spec(folder: Path, spec: dict, name: str = "pipeline.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(spec, sort_keys=False))
    return path


def generated_spec(workdir: Path, stages: list[dict], **defaults) -> dict:
    """A small pipeline on generated corpora: general text and chats, micro model, 2 workers."""
    settings = {"seq_len": 64, "global_batch_tokens": 1024, "micro_batch_rows": 4, "workers": 2,
                "cpus_per_worker": 1, "checkpoint_every": 5, "log_every": 5,
                "lr": {"peak": 0.003, "warmup": 0.1}}
    settings.update(defaults)
    return {
        "name": "test", "workdir": str(workdir), "seed": 0,
        "tokenizer": {"train": {"vocab_size": 384}},
        "model": {"preset": "micro"},
        "corpora": {
            "facts": {"kind": "text", "generate": {"topic": "general", "documents": 400, "eval_documents": 40}},
            "chats": {"kind": "chat", "generate": {"topic": "general", "documents": 300, "eval_documents": 40}},
        },
        "defaults": settings,
        "stages": stages,
        "eval_rows": 8,
    }


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
        images = tab.evaluate("Array.from(document.images).map(i => [i.getAttribute('src'), i.complete && i.naturalWidth > 0])")
        browser.close()
    return [tuple(image) for image in images], errors
