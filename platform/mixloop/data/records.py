"""Validate raw records of MiniMind's two formats; a bad record gets a reason, never a crash.

text: {"text": "<non-empty string>"}
chat: {"conversations": [{"role": "system"|"user"|"assistant", "content": "<string>"}, ...]}
      with at least one assistant turn that has content: a chat without one (a system turn only,
      say) has nothing to learn from and is rejected. Turn order is the chat template's business:
      a chat that opens with the assistant (a greeting) trains on that turn too when the template
      renders it (MiniMind's does), and is rejected with the template's reason when it refuses it
      (mixloop.tokenizer.encode_chats; the preparation rejects such records one by one).

Strings must be valid Unicode: JSON's \\u escapes can hold a lone surrogate, which no tokenizer encodes.
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
        # Some of json's messages end with "at" ("Unterminated string starting at"): the column completes them.
        raise BadRecord(f"malformed JSON: {exc.msg.removesuffix(' at')} at column {exc.colno}") from None
    except RecursionError:
        raise BadRecord("malformed JSON: nested too deeply") from None
    except ValueError as exc:  # an integer of more than 4300 digits
        raise BadRecord(f"malformed JSON: {exc}") from None


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
    return _unicode(text, "field 'text'")


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
        if "content" not in turn:
            raise BadRecord(f"turn {index} has no 'content'")
        if not isinstance(turn["content"], str):
            raise BadRecord(f"turn {index} content must be a string, got {type(turn['content']).__name__}")
        clean.append({"role": turn["role"], "content": _unicode(turn["content"], f"turn {index} content")})
    if not any(t["role"] == "assistant" and t["content"].strip() for t in clean):
        raise BadRecord("no assistant turn with content: nothing to learn from")
    return clean


def _unicode(value: str, what: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise BadRecord(f"{what} holds a lone surrogate {value[exc.start]!r} at character {exc.start}") from None
    return value
