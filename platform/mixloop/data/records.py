"""Validate raw records of MiniMind's two formats; a bad record gets a reason, never a crash.

text: {"text": "<non-empty string>"}
chat: {"conversations": [{"role": "system"|"user"|"assistant", "content": "<string>"}, ...]}
      with at least one assistant turn that has content.
"""

from __future__ import annotations

import json
from typing import Any

ROLES = ("system", "user", "assistant")


class BadRecord(ValueError):
    """A record that cannot be trained on; the message is the reason written to rejects/."""


def parse_json_line(raw: bytes) -> Any:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadRecord(f"not UTF-8: {exc.reason} at byte {exc.start}") from None
    try:
        return json.loads(line)
    except json.JSONDecodeError as exc:
        raise BadRecord(f"malformed JSON: {exc.msg} at column {exc.colno}") from None


def check_text(record: Any) -> str:
    if not isinstance(record, dict):
        raise BadRecord(f"expected an object with a 'text' field, got {type(record).__name__}")
    if "text" not in record:
        raise BadRecord("missing field 'text'")
    text = record["text"]
    if not isinstance(text, str):
        raise BadRecord(f"field 'text' must be a string, got {type(text).__name__}")
    if not text.strip():
        raise BadRecord("field 'text' is empty")
    return text


def check_chat(record: Any) -> list[dict]:
    if not isinstance(record, dict):
        raise BadRecord(f"expected an object with a 'conversations' field, got {type(record).__name__}")
    if "conversations" not in record:
        raise BadRecord("missing field 'conversations'")
    turns = record["conversations"]
    if not isinstance(turns, list) or not turns:
        raise BadRecord("field 'conversations' must be a non-empty list of turns")
    clean = []
    for index, turn in enumerate(turns):
        if not isinstance(turn, dict) or not isinstance(turn.get("role"), str):
            raise BadRecord(f"turn {index} must be an object with 'role' and 'content'")
        if turn["role"] not in ROLES:
            raise BadRecord(f"turn {index} has unknown role {turn['role']!r} (expected one of {', '.join(ROLES)})")
        if not isinstance(turn.get("content"), str):
            raise BadRecord(f"turn {index} content must be a string, got {type(turn.get('content')).__name__}")
        clean.append({"role": turn["role"], "content": turn["content"]})
    if not any(t["role"] == "assistant" and t["content"].strip() for t in clean):
        raise BadRecord("no assistant turn with content: nothing to learn from")
    return clean
