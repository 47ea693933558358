"""Edits of a pipeline file that keep its comments and layout: entries appended, as text, at the end
of a top-level block section (`corpora:`, `stages:`); the result must validate before it replaces
the file."""

from __future__ import annotations

import re
from pathlib import Path

from mixloop.config.load import load_spec
from mixloop.errors import MixloopError, SpecError


def append_entries(pipeline_path: Path, additions: dict[str, str]) -> str:
    """The file's text with `additions` (section name -> YAML text of its new entries: list items for
    `stages`, keys for `corpora`) at the end of each section, indented as its entries are."""
    lines = pipeline_path.read_text().splitlines()
    for section, text in additions.items():
        top_level = [i for i, line in enumerate(lines) if re.match(r"[A-Za-z_]", line)]
        start = next((i for i in top_level if re.fullmatch(rf"{section}:\s*(#.*)?", lines[i])), None)
        if start is None:
            raise MixloopError(
                f"{pipeline_path}: no block-style `{section}:` section to add to. "
                f"Fix: write {section} one entry per line, then add again."
            )
        end = next((i for i in top_level if i > start), len(lines))
        while end > start + 1 and (not lines[end - 1].strip() or lines[end - 1].startswith("#")):
            end -= 1  # blank lines and column-0 comments before the next section belong to it
        first = next(
            (line for line in lines[start + 1 : end] if line.strip() and not line.lstrip().startswith("#")), "  "
        )
        indent = first[: len(first) - len(first.lstrip())]  # the first entry's: list items may sit at column 0
        block = [f"{indent}{line}" if line else "" for line in text.splitlines()]
        lines = lines[:end] + [""] + block + lines[end:]
    return "\n".join(lines) + "\n"


def replace_validated(pipeline_path: Path, text: str, what: str, write: bool = True) -> None:
    """Write `text` over the pipeline file if it is a valid spec (checked next to the real file, so that
    its relative paths resolve the same way; `write=False` only checks); MixloopError naming `what`
    otherwise."""
    candidate = pipeline_path.with_name(f".{pipeline_path.name}.candidate")
    candidate.write_text(text)
    try:
        load_spec(candidate)
    except SpecError as exc:
        candidate.unlink()
        raise MixloopError(f"{what} would make {pipeline_path} invalid:\n{exc}") from None
    if write:
        candidate.replace(pipeline_path)
    else:
        candidate.unlink()
