"""Bad records get a reason (written to rejects/), never a crash."""

from __future__ import annotations

import re

import pytest

from mixloop.data.records import BadRecord, check_chat, check_text, normalize, parse_json_line


def test_good_records_pass():
    assert check_text(parse_json_line(b'{"text": "hello"}')) == "hello"
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello", "extra": 1}]
    assert check_chat({"conversations": turns}) == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
    ]
    assert parse_json_line('{"text": "héllo ✨"}'.encode()) == {"text": "héllo ✨"}


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b'{"text": "unterminated', "malformed JSON"),
        (b'{"text": "a",}', "malformed JSON"),
        (b"", "malformed JSON"),
        (b'{"text": "caf\xe9"}', "not UTF-8"),
        (b"\xff\xfe{}", "not UTF-8"),
        (b"[" * 100_000, "malformed JSON: nested too deeply"),
        (b'{"text": "a", "n": ' + b"7" * 5000 + b"}", "malformed JSON: Exceeds the limit"),
    ],
)
def test_unreadable_lines(raw, reason):
    with pytest.raises(BadRecord, match=reason):
        parse_json_line(raw)


@pytest.mark.parametrize(
    "raw, reason",
    [
        (b'{"text": "unterminated', "malformed JSON: Unterminated string starting at column 10"),
        (b'{"text": "a"} trailing', "malformed JSON: Extra data at column 15"),
        (b'{"text": "a",}', "malformed JSON: Expecting property name enclosed in double quotes at column 14"),
        (b"", "malformed JSON: Expecting value at column 1"),
        (b'{"text" "a"}', "malformed JSON: Expecting ':' delimiter at column 9"),
        (b'{"text": "a\tb"}', "malformed JSON: Invalid control character at column 12"),
        (b'{"text": "\\x"}', "malformed JSON: Invalid \\escape at column 11"),
        (b'{"text": "\\ud8"}', "malformed JSON: Invalid \\uXXXX escape at column 12"),
    ],
)
def test_json_reasons_read_well(raw, reason):
    """json's messages, some of which end with "at", read as one sentence with the column."""
    with pytest.raises(BadRecord) as info:
        parse_json_line(raw)
    assert str(info.value) == reason


def test_lone_surrogates_are_refused_before_the_tokenizer_sees_them():
    # Valid JSON, but no tokenizer encodes it (the Rust one raises an obscure TypeError).
    with pytest.raises(BadRecord, match=r"field 'text' holds a lone surrogate '\\ud800' at character 1"):
        check_text(parse_json_line(b'{"text": "a\\ud800b"}'))
    lone = {"conversations": [USER, {"role": "assistant", "content": "\udfff"}]}
    with pytest.raises(BadRecord, match="turn 1 content holds a lone surrogate"):
        check_chat(lone)
    assert check_text(parse_json_line(b'{"text": "\\ud83d\\ude00"}')) == "\U0001f600"  # a pair is fine


@pytest.mark.parametrize(
    "record, reason",
    [
        ({"txt": "hello"}, "missing field 'text'"),
        ({"text": ""}, "'text' is empty"),
        ({"text": "  \n\t"}, "'text' is empty"),
        ({"text": 42}, "must be a string, got int"),
        ({"text": None}, "must be a string, got NoneType"),
        (["hello"], "expected an object with a 'text' field, got list"),
        ("hello", "expected an object with a 'text' field, got str"),
    ],
)
def test_bad_text_records(record, reason):
    with pytest.raises(BadRecord, match=reason):
        check_text(record)


USER = {"role": "user", "content": "hi"}
ASSISTANT = {"role": "assistant", "content": "hello"}


@pytest.mark.parametrize(
    "record, reason",
    [
        ({"messages": [USER, ASSISTANT]}, "missing field 'conversations'"),
        ({"conversations": []}, "non-empty list"),
        ({"conversations": "hi"}, "non-empty list"),
        ({"conversations": [USER, "hello"]}, "turn 1 must be an object"),
        ({"conversations": [{"content": "hi"}, ASSISTANT]}, "turn 0 must be an object with 'role'"),
        ({"conversations": [USER, {"role": "bot", "content": "x"}]}, "turn 1 has unknown role 'bot'"),
        ({"conversations": [{"role": "user", "content": 3}, ASSISTANT]}, "turn 0 content must be a string, got int"),
        ({"conversations": [USER, {"role": "assistant"}]}, "turn 1 has no 'content'"),
        (
            {"conversations": [USER, {"role": "assistant", "content": None}]},
            "turn 1 content must be a string, got NoneType",
        ),
        ({"conversations": [USER, {"role": "assistant", "content": {"text": "x"}}]}, "must be a string, got dict"),
        ({"conversations": None}, "non-empty list"),
        ({"conversations": [{"role": "system", "content": "be nice"}]}, "no assistant turn with content"),
        ({"conversations": [USER]}, "no assistant turn with content"),
        ({"conversations": [USER, {"role": "assistant", "content": "  "}]}, "no assistant turn with content"),
        ([USER, ASSISTANT], "expected an object with a 'conversations' field, got list"),
    ],
)
def test_bad_chat_records(record, reason):
    with pytest.raises(BadRecord, match=reason):
        check_chat(record)


def test_unknown_role_reason_lists_the_allowed_roles():
    with pytest.raises(BadRecord) as info:
        check_chat({"conversations": [{"role": "tool", "content": "x"}, ASSISTANT]})
    for role in ("system", "user", "assistant"):
        assert role in str(info.value)


def test_bad_record_is_a_value_error_with_its_reason_as_message():
    with pytest.raises(ValueError) as info:
        check_text({})
    assert str(info.value) == "missing field 'text'"


def test_a_chat_may_open_with_the_assistant():
    """Turn order is the chat template's business: check_chat lets a greeting first through (see encode_chats)."""
    greeting = [{"role": "assistant", "content": "Hello! How can I help?"}, USER, ASSISTANT]
    assert check_chat({"conversations": greeting}) == greeting
    assert check_chat({"conversations": [{"role": "system", "content": "be nice"}, ASSISTANT]})


# ---------------------------------------------------------------- the shapes users bring

SHAPES = [  # (record, format it is read as)
    ({"conversations": [USER, ASSISTANT]}, "conversations"),
    ({"messages": [USER, ASSISTANT]}, "messages"),
    (
        {
            "conversations": [
                {"from": "human", "value": USER["content"]},
                {"from": "gpt", "value": ASSISTANT["content"]},
            ]
        },
        "sharegpt",
    ),
    ({"instruction": USER["content"], "input": "", "output": ASSISTANT["content"]}, "alpaca"),
]


@pytest.mark.parametrize("record, shape", SHAPES, ids=[shape for _, shape in SHAPES])
def test_every_chat_shape_reads_as_the_same_conversation(record, shape):
    for fmt in ("auto", shape):  # detected from its fields, or as the corpus says
        normalized, found = normalize(record, "chat", fmt)
        assert found == shape and check_chat(normalized) == [USER, ASSISTANT]


def test_alpaca_input_and_system_and_renamed_columns():
    record = {"q": "Add them.", "ctx": "2 and 3", "a": "5", "sys": "Be exact."}
    columns = {"instruction": "q", "input": "ctx", "output": "a", "system": "sys"}
    normalized, _ = normalize(record, "chat", "alpaca", columns)
    assert check_chat(normalized) == [
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": "Add them.\n\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ]
    dialog = {"dialog": [{"speaker": "user", "utterance": "hi"}, {"speaker": "assistant", "utterance": "yo"}]}
    columns = {"conversations": "dialog", "role": "speaker", "content": "utterance"}
    assert check_chat(normalize(dialog, "chat", "auto", columns)[0])[1] == {"role": "assistant", "content": "yo"}
    assert check_text(normalize({"body": "a document"}, "text", "auto", {"text": "body"})[0]) == "a document"


@pytest.mark.parametrize(
    "record, fmt, reason",
    [
        ({"prompt": "x", "completion": "y"}, "auto", "not a chat in a shape mixloop reads"),
        ({"conversations": [{"from": "alien", "value": "x"}]}, "auto", "unknown speaker 'alien'"),
        ({"messages": [USER, ASSISTANT]}, "sharegpt", "missing field 'conversations' (sharegpt format)"),
        ({"instruction": "x", "output": 3}, "auto", "field 'output' must be a string (alpaca format)"),
        ({"messages": "hello"}, "auto", "field 'messages' must be a non-empty list of turns"),
    ],
)
def test_a_record_in_no_known_shape_is_rejected_with_what_was_expected(record, fmt, reason):
    with pytest.raises(BadRecord, match=re.escape(reason)):
        check_chat(normalize(record, "chat", fmt)[0])


def test_a_text_corpus_field_named_in_columns_must_be_there():
    with pytest.raises(BadRecord, match="missing field 'body' \\(columns.text\\)"):
        normalize({"text": "x"}, "text", "auto", {"text": "body"})
