"""Validate raw records; a bad record gets a reason, never a crash.

Records arrive in the shapes users have (`normalize`: plain text under any field name; chats as
MiniMind's conversations, OpenAI messages, ShareGPT or Alpaca) and are checked in MiniMind's two:

text: {"text": "<non-empty string>"}
chat: {"conversations": [{"role": "system"|"user"|"assistant", "content": "<string>"}, ...]}
      with at least one assistant turn that has content: a chat without one (a system turn only,
      say) has nothing to learn from and is rejected. Turn order is the chat template's business:
      a chat that opens with the assistant (a greeting) trains on that turn too when the template
      renders it (MiniMind's does), and is rejected with the template's reason when it refuses it
      (mixloop.data.tokenizer.encode_chats; the preparation rejects such records one by one).

Strings must be valid Unicode: JSON's \\u escapes can hold a lone surrogate, which no tokenizer encodes.
"""

from __future__ import annotations

import json
from typing import Any

ROLES = ("system", "user", "assistant")
# The shapes of records users bring, by the name a corpus's `format` gives them.
TEXT_FORMATS = ("auto", "text")
CHAT_FORMATS = ("auto", "conversations", "messages", "sharegpt", "alpaca")
# ShareGPT's speakers, as chat roles.
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "bot": "assistant",
    "model": "assistant",
    "system": "system",
}


class BadRecord(ValueError):
    """A record that cannot be trained on; the message is the reason written to rejects/."""

    raw: str | None = None
    """The line as it was read, when a reader of JSON lines could not parse it (data.files)."""


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


def checked(record: Any, kind: str, fmt: str = "auto", columns: dict[str, str] | None = None) -> tuple[Any, str]:
    """A record as its kind trains on it (a text, or the chat's turns) and the shape it had; BadRecord
    with the reason for one that preparation rejects."""
    normalized, shape = normalize(record, kind, fmt, columns)
    return (check_text(normalized) if kind == "text" else check_chat(normalized)), shape


def normalize(record: Any, kind: str, fmt: str = "auto", columns: dict[str, str] | None = None) -> tuple[Any, str]:
    """A record of any shape a corpus's `format` allows, in MiniMind's shape for its kind ({"text"} or
    {"conversations": [{"role", "content"}]}) for check_text / check_chat, and the shape it had.

    text: the field `columns.text` (default "text"). chat, by its fields (format: auto) or as told:
    conversations (role/content turns), messages (OpenAI), sharegpt (from/value turns), alpaca
    (instruction, input, output, system). `columns` renames any of these fields."""
    columns = columns or {}
    if not isinstance(record, dict):
        return record, fmt  # the checks say what is wrong with it
    if kind == "text":
        field = columns.get("text", "text")
        if field != "text" and field not in record:
            raise BadRecord(f"missing field {field!r} (columns.text)")
        return ({"text": record[field]} if field != "text" else record), "text"
    shape = _chat_shape(record, columns) if fmt == "auto" else fmt
    if shape == "alpaca":
        return {"conversations": _alpaca_turns(record, columns)}, shape
    list_field = "messages" if shape == "messages" else "conversations"
    field = columns.get(list_field, list_field)
    if field not in record:
        raise BadRecord(f"missing field {field!r} ({shape} format)")
    turns = record[field]
    if not isinstance(turns, list) or not turns:
        raise BadRecord(f"field {field!r} must be a non-empty list of turns")
    if shape == "sharegpt":
        turns = [_sharegpt_turn(turn, index) for index, turn in enumerate(turns)]
    elif "role" in columns or "content" in columns:
        role, content = columns.get("role", "role"), columns.get("content", "content")
        turns = [{"role": t.get(role), "content": t.get(content)} if isinstance(t, dict) else t for t in turns]
    return {"conversations": turns}, shape


def _chat_shape(record: dict, columns: dict[str, str]) -> str:
    if columns.get("messages", "messages") in record:
        return "messages"
    if columns.get("conversations", "conversations") in record:
        turns = record[columns.get("conversations", "conversations")]
        first = turns[0] if isinstance(turns, list) and turns else None
        return "sharegpt" if isinstance(first, dict) and "from" in first and "value" in first else "conversations"
    if columns.get("instruction", "instruction") in record:
        return "alpaca"
    raise BadRecord(
        "not a chat in a shape mixloop reads: expected 'conversations' (role/content or ShareGPT "
        "from/value turns), 'messages' (OpenAI) or 'instruction'/'output' (Alpaca) fields"
    )


def _sharegpt_turn(turn: Any, index: int) -> Any:
    if not isinstance(turn, dict) or "from" not in turn:
        return turn  # check_chat names what is wrong
    speaker = turn["from"]
    if speaker not in SHAREGPT_ROLES:
        raise BadRecord(f"turn {index} has unknown speaker {speaker!r} (expected one of {', '.join(SHAREGPT_ROLES)})")
    return {"role": SHAREGPT_ROLES[speaker], "content": turn.get("value")}


def _alpaca_turns(record: dict, columns: dict[str, str]) -> list[dict]:
    """Alpaca's instruction (and input) as the user's turn, its output as the assistant's."""
    get: dict[str, Any] = {
        key: record.get(columns.get(key, key)) for key in ("instruction", "input", "output", "system")
    }
    for key in ("instruction", "output"):
        if not isinstance(get[key], str):
            raise BadRecord(
                f"field {columns.get(key, key)!r} must be a string (alpaca format), got {type(get[key]).__name__}"
            )
    prompt = get["instruction"] + (
        f"\n\n{get['input']}" if isinstance(get["input"], str) and get["input"].strip() else ""
    )
    system = [{"role": "system", "content": get["system"]}] if isinstance(get["system"], str) and get["system"] else []
    return [*system, {"role": "user", "content": prompt}, {"role": "assistant", "content": get["output"]}]


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
