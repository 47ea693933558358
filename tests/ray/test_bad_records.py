"""Bad records are counted, quarantined with file, line and reason, and stop the run past the limit."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mixloop.config import load_spec
from mixloop.data.store import PackedCorpus, read_manifest
from mixloop.errors import DataError, MixloopError, SpecError
from mixloop.runs.pipeline import PipelineRunner
from support import write_spec

GOOD_TEXT = [json.dumps({"text": f"document number {i} is fine."}).encode() for i in range(12)]
BAD_TEXT = [
    (b'{"text": "unterminated', "malformed JSON"),
    (b'{"text": "caf\xe9"}', "not UTF-8"),
    (b'{"body": "wrong field"}', "missing field 'text'"),
    (b'{"text": "   "}', "is empty"),
    (b'{"text": 42}', "must be a string"),
]
GOOD_CHAT = [
    json.dumps(
        {"conversations": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"a{i}"}]}
    ).encode()
    for i in range(8)
]
BAD_CHAT = [
    (
        json.dumps(
            {"conversations": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}
        ).encode(),
        "unknown role 'robot'",
    ),
    (json.dumps({"conversations": [{"role": "user", "content": "only a question"}]}).encode(), "no assistant turn"),
]


def corpus_file(path, good, bad):
    lines = good[:3] + [line for line, _ in bad] + good[3:]
    if not path.exists():  # rewriting would change the files' identity and so the packed cache key
        path.write_bytes(b"\n".join(lines) + b"\n")
    return {reason: 4 + index for index, (_, reason) in enumerate(bad)}  # 1-based line numbers


def spec_for(tmp_path, max_bad_fraction):
    text_lines = corpus_file(tmp_path / "text.jsonl", GOOD_TEXT, BAD_TEXT)
    chat_lines = corpus_file(tmp_path / "chat.jsonl", GOOD_CHAT, BAD_CHAT)
    spec = {
        "name": "bad",
        "workdir": str(tmp_path / "run"),
        "tokenizer": {"train": {"vocab_size": 300}},
        "model": {"preset": "micro"},
        "corpora": {
            "text": {"kind": "text", "path": str(tmp_path / "text.jsonl"), "max_bad_fraction": max_bad_fraction},
            "chat": {"kind": "chat", "path": str(tmp_path / "chat.jsonl"), "max_bad_fraction": max_bad_fraction},
        },
        "defaults": {"seq_len": 32, "global_batch_tokens": 128, "micro_batch_rows": 4},
        "stages": [{"name": "s", "mixture": {"text": 1, "chat": 1}, "tokens": 128}],
    }
    return load_spec(write_spec(tmp_path, spec)), text_lines, chat_lines


def test_every_bad_record_is_quarantined_with_its_line_and_reason(ray_address, tmp_path):
    spec, text_lines, chat_lines = spec_for(tmp_path, max_bad_fraction=0.5)
    PipelineRunner(spec).corpora.prepare(spec.resolved_stages())
    for corpus, expected, good in (("text", text_lines, GOOD_TEXT), ("chat", chat_lines, GOOD_CHAT)):
        rejects = [
            json.loads(line)
            for f in (tmp_path / "run" / "rejects").glob(f"{corpus}-train-*/*.jsonl")
            for line in f.read_text().splitlines()
        ]
        assert len(rejects) == len(expected)
        for reason, line in expected.items():
            match = [r for r in rejects if reason in r["reason"]]
            assert len(match) == 1, (reason, rejects)
            assert match[0]["where"].endswith(f"{corpus}.jsonl:{line}")
        manifest = json.loads(next((tmp_path / "run" / "cache").glob(f"{corpus}-train-*/manifest.json")).read_text())
        assert manifest["documents"] == len(good)
        assert manifest["rejected"] == len(expected)


def test_too_many_bad_records_stop_before_training(ray_address, tmp_path):
    spec, _, _ = spec_for(tmp_path, max_bad_fraction=0.1)
    with pytest.raises(DataError) as error:
        PipelineRunner(spec).run()
    message = str(error.value)
    assert "corpus 'text'" in message or "corpus 'chat'" in message
    assert "max_bad_fraction" in message and "rejects" in message
    assert "text.jsonl:4" in message or "chat.jsonl:4" in message  # first examples with their lines
    assert not (tmp_path / "run" / "train").exists()

    # The limit is checked on every run, also when the packed corpus comes from the cache.
    spec, _, _ = spec_for(tmp_path, max_bad_fraction=0.1)
    with pytest.raises(DataError):
        PipelineRunner(spec).run()
    spec, _, _ = spec_for(tmp_path, max_bad_fraction=0.5)
    PipelineRunner(spec).corpora.prepare(spec.resolved_stages())
    assert len((tmp_path / "run" / "cache" / "prepare.jsonl").read_text().splitlines()) == 2, "tokenized twice"


def long_document_spec(tmp_path, long_text):
    lines = GOOD_TEXT[:4] + [json.dumps({"text": long_text}).encode()] + GOOD_TEXT[4:]
    (tmp_path / "long.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    limited = {"kind": "text", "path": str(tmp_path / "long.jsonl"), "max_document_tokens": 20, "max_bad_fraction": 0.2}
    spec = {
        "name": "long",
        "workdir": str(tmp_path / "run"),
        "tokenizer": {"train": {"vocab_size": 300}},
        "model": {"preset": "micro"},
        "corpora": {
            "whole": {"kind": "text", "path": str(tmp_path / "long.jsonl")},
            "split": {**limited, "long_documents": "split"},
            "dropped": {**limited, "long_documents": "drop"},
        },
        "defaults": {"seq_len": 64, "global_batch_tokens": 128, "micro_batch_rows": 2},
        "stages": [{"name": "s", "mixture": {"whole": 1, "split": 1, "dropped": 1}, "tokens": 128}],
    }
    return load_spec(write_spec(tmp_path, spec))


def test_long_documents_are_split_or_dropped_as_the_spec_says(ray_address, tmp_path):
    long_text = " ".join(f"word{i}" for i in range(60))
    spec = long_document_spec(tmp_path, long_text)
    packed = PipelineRunner(spec).corpora.prepare(spec.resolved_stages()).for_stage(spec.resolved_stages()[0])
    manifests = {name: read_manifest(packed[name]) for name in ("whole", "split", "dropped")}
    long_tokens = manifests["whole"]["tokens"] - manifests["dropped"]["tokens"]
    assert long_tokens > 40, "the long document must be well over the limit for this test to mean anything"

    # split: every token kept, counted as split, and no piece longer than the limit
    assert manifests["split"]["tokens"] == manifests["whole"]["tokens"]
    assert manifests["split"]["split_documents"] == 1 and manifests["split"]["rejected"] == 0
    _, _, segments = PackedCorpus(packed["split"]).read(np.arange(manifests["split"]["rows"]))
    assert max(np.bincount(row[row > 0]).max() for row in segments) <= 20
    _, _, whole_segments = PackedCorpus(packed["whole"]).read(np.arange(manifests["whole"]["rows"]))
    assert max(np.bincount(row[row > 0]).max() for row in whole_segments) > 20

    # drop: quarantined with its line and length, the other documents kept
    assert manifests["dropped"]["documents"] == len(GOOD_TEXT) and manifests["dropped"]["rejected"] == 1
    reject = json.loads(next((tmp_path / "run" / "rejects").glob("dropped-train-*/*.jsonl")).read_text())
    assert reject["where"].endswith("long.jsonl:5") and "max_document_tokens 20" in reject["reason"]
    assert long_text[:100] in reject["record"]


def test_empty_or_all_bad_corpus_stops_and_leaves_the_workdir_as_it_was(ray_address, tmp_path):
    def spec_with(empty_lines):
        return write_spec(
            tmp_path,
            {
                "name": "empty",
                "workdir": str(tmp_path / "run"),
                "tokenizer": {"train": {"vocab_size": 300}},
                "model": {"preset": "micro"},
                "corpora": {
                    "good": {"kind": "text", "path": str(corpus_path(tmp_path, "good", GOOD_TEXT))},
                    "empty": {"kind": "chat", "path": str(corpus_path(tmp_path, "empty", empty_lines))},
                },
                "defaults": {"seq_len": 32, "global_batch_tokens": 128, "micro_batch_rows": 4},
                "stages": [{"name": "s", "mixture": {"good": 1, "empty": 1}, "tokens": 128}],
            },
        )

    # A file of no bytes is found by validation, before Ray or any file in the workdir.
    with pytest.raises(SpecError, match=r"corpora\.empty\.path: every file matching .* is empty"):
        load_spec(spec_with([]))
    assert not (tmp_path / "run").exists()

    # Blank lines and bad records only: found once the corpus is read, and nothing stays published.
    (tmp_path / "empty.jsonl").unlink()
    spec = load_spec(spec_with([b"", b"   ", b'{"conversations": []}', b""]))
    with pytest.raises(DataError, match="corpus 'empty' .*no usable document"):
        PipelineRunner(spec).run()
    run = tmp_path / "run"
    leftovers = {p.name for p in run.iterdir()} - {"cache", "rejects", "generated"}
    assert leftovers == set(), leftovers  # no tokenizer, no models/base, no pipeline.yaml, no lock
    manifest = json.loads(next((run / "cache").glob("empty-train-*/manifest.json")).read_text())
    assert manifest["blank_lines"] == 3 and manifest["rejected"] == 1 and manifest["documents"] == 0


def test_a_tokenizer_larger_than_the_model_vocabulary_stops_before_training(tmp_path):
    spec = load_spec(
        write_spec(
            tmp_path,
            {
                "name": "vocab",
                "workdir": str(tmp_path / "run"),
                "tokenizer": {"train": {"vocab_size": 300}},
                "model": {"preset": "micro", "config": {"vocab_size": 100}},
                "corpora": {"good": {"kind": "text", "path": str(corpus_path(tmp_path, "good", GOOD_TEXT))}},
                "defaults": {"seq_len": 32, "global_batch_tokens": 128, "micro_batch_rows": 4},
                "stages": [{"name": "s", "mixture": {"good": 1}, "tokens": 128}],
            },
        )
    )
    with pytest.raises(MixloopError, match="tokenizer has .* tokens but the model's vocabulary holds 100"):
        PipelineRunner(spec).run()
    assert not (tmp_path / "run" / "models").exists() and not (tmp_path / "run" / "train").exists()


def corpus_path(tmp_path, name, lines):
    path = tmp_path / f"{name}.jsonl"
    path.write_bytes(b"".join(line + b"\n" for line in lines))
    return path
