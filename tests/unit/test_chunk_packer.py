"""One bad record never stops a job: ChunkPacker.pack_chunk on real jsonl files, without Ray.

Each corpus below lists its lines with what must become of them: packed (None), skipped
as blank ("blank"), or rejected with a reason that contains the given text.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from mixloop.data import files, prepare
from mixloop.data.prepare import ChunkPacker, CorpusRequest, RejectWriter, encode_each, request_chunks
from mixloop.data.store import MANIFEST, PackedCorpus
from mixloop.errors import DataError
from mixloop.storage.fs import write_json

BOM = b"\xef\xbb\xbf"
EOS = "<|im_end|>"  # MiniMind's end-of-text and end-of-turn token


def text(value: str) -> bytes:
    return json.dumps({"text": value}, ensure_ascii=False).encode()


def chat(*turns: tuple[str, str]) -> bytes:
    return json.dumps({"conversations": [{"role": role, "content": content} for role, content in turns]}).encode()


TEXT_LINES = [  # (line without its end, line end, expected)
    (BOM + text("the first row, after a byte-order mark"), b"\r\n", None),
    (text("a line that ends with CRLF"), b"\r\n", None),
    (b"", b"\n", "blank"),
    (b"  \t ", b"\r\n", "blank"),
    (b'{"text": "truncated', b"\n", "malformed JSON: Unterminated string starting at column 10"),
    (text("trailing garbage") + b" garbage", b"\n", "malformed JSON: Extra data at column 30"),
    (b'{"text": 42}', b"\n", "field 'text' must be a string, got int"),
    (b'{"text": {"nested": {"object": "x"}}}', b"\n", "field 'text' must be a string, got dict"),
    (b"null", b"\n", "expected an object with a 'text' field, got NoneType"),
    (b"{}", b"\n", "missing field 'text'"),
    (b'["an", "array"]', b"\n", "expected an object with a 'text' field, got list"),
    (b'{"text": "caf\xe9"}', b"\n", "not UTF-8: invalid continuation byte at byte 13"),
    (b"[" * 5000 + b"]" * 5000, b"\n", "malformed JSON: nested too deeply"),
    (b'{"text": "lone \\ud800"}', b"\n", "field 'text' holds a lone surrogate"),
    (b'{"text": "   "}', b"\n", "field 'text' is empty"),
    (text("héllo ✨ 日本, the last good row"), b"", None),  # no final newline
]

GREETING = "Hello! What would you like to know?"
CHAT_LINES = [
    (BOM + chat(("user", "What is the capital of France?"), ("assistant", "Paris.")), b"\r\n", None),
    (chat(("assistant", GREETING), ("user", "The moon?"), ("assistant", "It orbits the earth.")), b"\r\n", None),
    (chat(("system", "You are a helpful assistant.")), b"\n", "no assistant turn with content"),
    (b"\r", b"\n", "blank"),
    (chat(("robot", "beep"), ("assistant", "x")), b"\n", "turn 0 has unknown role 'robot'"),
    (b'{"conversations": [{"role": "user", "content": "q"}, {"role": "assistant"}]}', b"\n", "turn 1 has no 'content'"),
    (b'{"conversations": []}', b"\n", "'conversations' must be a non-empty list"),
    (b'{"conversations": null}', b"\n", "'conversations' must be a non-empty list"),
    (b'{"conversations": [{"role": "user", "content": "q"}, ["assistant", "a"]]}', b"\n", "turn 1 must be an object"),
    (
        chat(("user", "q"), ("assistant", "<think>hm</think>a"), ("user", "q2"), ("assistant", "b")),
        b"\n",
        "chat template opens assistant turn 1 differently from its generation prompt",
    ),
    (b'{"messages": []}', b"\n", "field 'messages' must be a non-empty list"),
    (b'{"conversations": [{"role": "user", "content": "', b"\n", "malformed JSON: Unterminated string"),
    (chat(("system", "Be brief."), ("user", "Sun?"), ("assistant", "A star.")), b"\n", None),
]


@pytest.fixture(scope="module")
def packer(minimind_tokenizer_dir):
    return ChunkPacker(minimind_tokenizer_dir)


def pack(packer, folder, lines: list[tuple[bytes, bytes, object]], kind: str, seq_len: int = 64, **options):
    """Pack a jsonl file made of lines as prepare_corpora does, one chunk after another: manifest, rejects."""
    folder.mkdir(exist_ok=True)
    path = folder / f"{kind}.jsonl"
    path.write_bytes(b"".join(line + end for line, end, _ in lines))
    request = CorpusRequest(kind, "train", str(path), None, kind, 1.0, seq_len, **options)
    chunks = request_chunks(request, 0, [str(path)], str(folder / "packed"), str(folder / "rejects"))
    summaries = [packer.pack_chunk(chunk) for chunk in chunks]
    manifest = prepare._manifest(request, "key", [str(path)], summaries)
    write_json(str(folder / "packed" / MANIFEST), manifest)
    rejects = [
        json.loads(line) for f in sorted((folder / "rejects").glob("*.jsonl")) for line in f.read_text().splitlines()
    ]
    return manifest, {r["where"].removeprefix(f"{path}:"): r["reason"] for r in rejects}


def expected_rejects(lines) -> dict[str, str]:
    return {str(number): what for number, (_, _, what) in enumerate(lines, 1) if what not in (None, "blank")}


def assert_rejects(rejects: dict[str, str], lines) -> None:
    expected = expected_rejects(lines)
    assert set(rejects) == set(expected), rejects
    for where, reason in expected.items():
        assert reason in rejects[where], (where, rejects[where])


def packed_rows(folder) -> tuple[np.ndarray, ...]:
    corpus = PackedCorpus(str(folder / "packed"))
    return corpus.read(np.arange(corpus.manifest["rows"]))


def test_every_bad_text_line_is_rejected_with_its_line_and_every_good_one_is_packed(packer, tmp_path):
    manifest, rejects = pack(packer, tmp_path, TEXT_LINES, "text")
    assert_rejects(rejects, TEXT_LINES)
    good = [json.loads(line.removeprefix(BOM))["text"] for line, _, what in TEXT_LINES if what is None]
    assert manifest["documents"] == len(good) == 3
    assert manifest["rejected"] == len(expected_rejects(TEXT_LINES)) == 11
    assert manifest["blank_lines"] == 2

    tokens, supervised, segments = packed_rows(tmp_path)
    assert manifest["tokens"] == int((segments > 0).sum())
    decoded = packer.tokenizer.decode(tokens[segments > 0].tolist(), skip_special_tokens=False)
    assert decoded == "".join(document + EOS for document in good)  # the BOM row is whole and first
    assert supervised[segments > 0].all()


def test_every_bad_chat_is_rejected_and_a_greeting_first_chat_trains(packer, tmp_path):
    manifest, rejects = pack(packer, tmp_path, CHAT_LINES, "chat")
    assert_rejects(rejects, CHAT_LINES)
    assert manifest["documents"] == 3 and manifest["rejected"] == 9 and manifest["blank_lines"] == 1

    tokens, supervised, segments = packed_rows(tmp_path)
    trained = packer.tokenizer.decode(tokens[supervised].tolist(), skip_special_tokens=False)
    answers = ["Paris.", GREETING, "It orbits the earth.", "A star."]
    assert trained == "".join(answer + EOS for answer in answers)
    assert manifest["supervised_tokens"] == int(supervised.sum())


def test_a_chat_the_template_refuses_is_rejected_with_the_templates_reason(trained_tokenizer, tmp_path):
    strict = "{{ raise_exception('conversations open with the user') if messages[0]['role'] == 'assistant' }}"
    trained_tokenizer.save_pretrained(tmp_path / "tokenizer")
    tokenizer = ChunkPacker(str(tmp_path / "tokenizer")).tokenizer
    tokenizer.chat_template = strict + tokenizer.chat_template
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    lines = [
        (chat(("user", "why"), ("assistant", "yes")), b"\n", None),
        (
            chat(("assistant", "hello"), ("user", "why"), ("assistant", "yes")),
            b"\n",
            "chat template failed: conversations open with the user",
        ),
        (chat(("user", "how"), ("assistant", "no")), b"\n", None),
    ]
    manifest, rejects = pack(ChunkPacker(str(tmp_path / "tokenizer")), tmp_path, lines, "chat")
    assert rejects == {"2": "chat template failed: conversations open with the user"}
    assert manifest["documents"] == 2


def test_a_multi_megabyte_document_is_packed_whole_or_split(packer, tmp_path):
    big = "以下是一些建议 " * 272_000  # 3 MB; repeated words keep the tokenizer fast
    lines = [(text("before"), b"\n", None), (text(big), b"\n", None), (text("after"), b"\n", None)]
    manifest, rejects = pack(packer, tmp_path, lines, "text", seq_len=512, max_document_tokens=65536)
    assert rejects == {} and manifest["documents"] == 3 and manifest["split_documents"] == 1
    assert manifest["tokens"] > 200_000 and manifest["rows"] == math.ceil(manifest["tokens"] / 512)
    tokens, _, segments = packed_rows(tmp_path)
    assert max(np.bincount(row[row > 0]).max() for row in segments) <= 512
    decode = packer.tokenizer.decode
    assert decode(tokens[0][:8].tolist(), skip_special_tokens=False).startswith("before" + EOS + "以下是")
    assert decode(tokens[-1][segments[-1] > 0].tolist(), skip_special_tokens=False).endswith(EOS + "after" + EOS)


def test_chunk_boundaries_keep_every_line_once_with_a_bom_and_blank_lines(packer, tmp_path, monkeypatch):
    lines = [(BOM + text("zero"), b"\r\n", None)]
    for i in range(1, 30):
        bad = i % 3 == 0
        lines.append(
            (b'{"text": 7}' if bad else text(f"row {i}"), b"\n" if i % 2 else b"\r\n", "got int" if bad else None)
        )
        if i % 5 == 0:
            lines.append((b" ", b"\n", "blank"))
    good = "zero" + EOS + "".join(f"row {i}{EOS}" for i in range(1, 30) if i % 3)
    for chunk_bytes in range(16, 56):  # boundaries at every offset of the lines, the BOM's first line too
        monkeypatch.setattr(files, "CHUNK_BYTES", chunk_bytes)
        folder = tmp_path / str(chunk_bytes)
        manifest, rejects = pack(packer, folder, lines, "text")
        assert (manifest["documents"], manifest["rejected"], manifest["blank_lines"]) == (21, 9, 5), chunk_bytes
        content = (folder / "text.jsonl").read_bytes()
        for where in rejects:  # chunks after the first name the byte offset of the line
            offset = int(where.split("@byte ")[1]) if "@byte" in where else None
            line = content[offset:].split(b"\n")[0] if offset is not None else content.split(b"\n")[int(where) - 1]
            assert line.rstrip(b"\r") == b'{"text": 7}', (chunk_bytes, where)
        tokens, _, segments = packed_rows(folder)
        assert packer.tokenizer.decode(tokens[segments > 0].tolist(), skip_special_tokens=False) == good


def test_an_all_bad_file_packs_nothing_and_stops_the_run_with_examples(packer, tmp_path):
    lines = [
        (b"{", b"\n", "malformed JSON: Expecting property name"),
        (b"", b"\n", "blank"),
        (b'{"text": ""}', b"\n", "'text' is empty"),
        (b"[1, 2]", b"", "got list"),
    ]
    manifest, rejects = pack(packer, tmp_path, lines, "text")
    assert_rejects(rejects, lines)
    assert (manifest["documents"], manifest["rows"], manifest["rejected"], manifest["blank_lines"]) == (0, 0, 3, 1)
    request = CorpusRequest("all-bad", "train", "", None, "text", 1.0, 64)
    with pytest.raises(DataError, match=r"no usable document in 1 file\(s\)\n.*text.jsonl:1: malformed JSON"):
        prepare._check_quality(request, manifest, str(tmp_path / "rejects"))


def test_a_failed_batch_is_encoded_again_record_by_record(tmp_path):
    def encode(tokenizer, items):
        if "bad" in items:
            raise RuntimeError("boom")
        return [(np.arange(len(item)), np.ones(len(item), dtype=bool)) for item in items]

    rejects = RejectWriter(str(tmp_path / "rejects.jsonl"))
    pending = [("f:1", "ok", "ok"), ("f:2", "bad", "bad"), ("f:3", "fine", "fine")]
    encoded = encode_each(None, encode, pending, rejects)
    rejects.close()
    assert [item[0] for item, _ in encoded] == ["f:1", "f:3"]
    assert [(r["where"], r["reason"]) for r in rejects.first] == [("f:2", "tokenizer failed: RuntimeError: boom")]


def test_a_manifest_from_before_blank_lines_is_still_checked():
    """blank_lines is not part of the corpus key, so cached corpora keep manifests without it."""
    old = {"corpus": "c", "split": "train", "documents": 3, "rejected": 0, "files": ["f"], "reject_examples": []}
    prepare._check_quality(CorpusRequest("c", "train", "", None, "text", 0.0, 64), old, "rejects")


def test_a_reject_preview_never_fails():
    deep: list = []
    for _ in range(5000):
        deep = [deep]
    assert prepare._preview(deep) == "<a list nested too deeply to show>"
    assert prepare._preview({"text": "lone \ud800"}) == '{"text": "lone \\ud800"}'  # written as UTF-8 later


def test_a_corpus_template_renders_its_chats_and_the_next_corpus_gets_the_tokenizers_again(packer, tmp_path):
    from mixloop.data.tokenizer import CHATML_TEMPLATE

    question = chat(("user", "The moon?"), ("assistant", "It orbits the earth."))
    own, _ = pack(packer, tmp_path / "own", [(question, b"\n", None)], "chat", chat_template=CHATML_TEMPLATE)
    default, _ = pack(packer, tmp_path / "default", [(question, b"\n", None)], "chat")

    def decode(folder):
        return packer.tokenizer.decode(PackedCorpus(str(folder)).read(np.arange(1))[0][0].tolist())

    assert decode(tmp_path / "own" / "packed").startswith(
        "<|im_start|>user\nThe moon?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert "<think>" in decode(tmp_path / "default" / "packed")  # MiniMind's template, back for the next chunk
    assert own["documents"] == default["documents"] == 1
