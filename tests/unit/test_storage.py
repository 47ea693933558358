"""Run-directory files on local disks and fsspec URIs (memory:// stands in for object storage)."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import fsspec
import pytest

from mixloop.data.prepare import FORMAT_VERSION, CorpusRequest, corpus_key
from mixloop.storage.fs import LogFollower, append_line, local_copy, read_lines, upload, write_json


def test_a_remote_folder_rewritten_with_same_sizes_is_fetched_again():
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/versions/v1/model.bin", b"old weights")
    first = Path(local_copy("memory://versions/v1"))
    assert (first / "model.bin").read_bytes() == b"old weights"
    assert local_copy("memory://versions/v1") == str(first), "an unchanged folder is fetched once"
    time.sleep(0.01)
    fs.rm("/versions/v1", recursive=True)
    fs.pipe_file("/versions/v1/model.bin", b"new weights")  # same size
    assert (Path(local_copy("memory://versions/v1")) / "model.bin").read_bytes() == b"new weights"


def test_upload_puts_the_completion_marker_last(tmp_path):
    (tmp_path / "lineage.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"w")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "z.txt").write_text("z")
    order = []
    fs = fsspec.filesystem("memory")
    original = fs.put_file
    fs.put_file = lambda source, target, **kw: (order.append(Path(target).name), original(source, target, **kw))
    try:
        upload(str(tmp_path), "memory://published/v", last="lineage.json")
    finally:
        del fs.put_file
    assert order[-1] == "lineage.json" and set(order) == {"lineage.json", "model.safetensors", "z.txt"}
    assert fs.cat_file("/published/v/sub/z.txt") == b"z"


def test_json_and_log_lines_on_a_remote_workdir():
    write_json("memory://run/eval/matrix.json", {"a": 1})
    assert json.loads(fsspec.filesystem("memory").cat_file("/run/eval/matrix.json")) == {"a": 1}
    append_line("memory://run/metrics.jsonl", "one")
    append_line("memory://run/metrics.jsonl", "two")
    assert read_lines("memory://run/metrics.jsonl") == ["one", "two"]


def test_remote_log_appends_write_only_the_new_line_and_read_back_in_order():
    """Object stores cannot append: rewriting the log at each line would make a long pipeline's
    metrics cost more at every log. Each append is one small object instead."""
    fs = fsspec.filesystem("memory")
    fs.pipe_file("/aged/metrics.jsonl", b"".join(b'{"old": %d}\n' % i for i in range(2000)))  # written whole
    written = []
    original = fs.pipe_file
    fs.pipe_file = lambda target, data, **kw: (written.append(len(data)), original(target, data, **kw))
    try:
        for i in range(12):
            append_line("memory://aged/metrics.jsonl", json.dumps({"step": i}))
    finally:
        del fs.pipe_file
    assert max(written) == len(json.dumps({"step": 10})) + 1, "an append uploaded more than its line"
    lines = read_lines("memory://aged/metrics.jsonl")
    assert len(lines) == 2012 and lines[1999] == '{"old": 1999}'
    assert [json.loads(line)["step"] for line in lines[2000:]] == list(range(12))


@pytest.mark.parametrize("where", ["local", "memory"])
def test_a_followed_log_gives_each_whole_line_once(tmp_path, where):
    """Trackers poll metrics.jsonl every few seconds while a stage trains: each poll reads only what is
    new (not the whole pipeline's history again), and a line still being written waits for the next."""
    path = str(tmp_path / "metrics.jsonl") if where == "local" else f"memory://{tmp_path.name}/metrics.jsonl"
    follower = LogFollower(path)
    assert follower.new_lines() == []
    append_line(path, "one")
    append_line(path, "two")
    assert follower.new_lines() == ["one", "two"]
    assert follower.new_lines() == []
    if where == "local":
        with open(path, "a") as f:
            f.write('{"half": ')  # a writer between two writes
        assert follower.new_lines() == [] and read_lines(path) == ["one", "two"]
        with open(path, "a") as f:
            f.write("1}\n")
        assert follower.new_lines() == ['{"half": 1}']
    append_line(path, "three")
    assert follower.new_lines() == ["three"]


def test_packed_corpus_keys_from_before_the_packing_options_still_hold(tmp_path):
    """A cache key names packed rows and, through the run name, a stage's checkpoints: an upgrade
    must not change it for corpora whose new options stay at their defaults."""
    corpus = tmp_path / "a.jsonl"
    corpus.write_text('{"text": "x"}\n')
    fs, inner = fsspec.core.url_to_fs(str(corpus))
    before = {
        "files": [[str(corpus), fs.ukey(inner)]],
        "kind": "text",
        "tokenizer": "fp",
        "seq_len": 64,
        "format": FORMAT_VERSION,
    }  # the payload of mixloop 0.1.0
    request = CorpusRequest("a", "train", str(corpus), None, "text", 0.01, 64)
    assert (
        corpus_key([str(corpus)], request, "fp")
        == hashlib.sha256(json.dumps(before, sort_keys=True).encode()).hexdigest()[:16]
    )
    assert corpus_key([str(corpus)], request._replace(packing=False), "fp") != corpus_key([str(corpus)], request, "fp")
    assert corpus_key([str(corpus)], request._replace(max_document_tokens=100), "fp") != corpus_key(
        [str(corpus)], request, "fp"
    )
