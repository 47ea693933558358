"""What users hit in their first week: a pipeline without eval splits, a finished stage edited, a
version whose weights went bad, and bad data: each a clear message, an exit code, nothing half-done."""

from __future__ import annotations

import json
import random
from pathlib import Path

import yaml

import mixloop
from mixloop.cli import main
from support import cache_dataset, write_spec

WORDS = "the a star planet orbit moon light far near cold hot sun ring dust gas rock ice".split()


def text_file(path: Path, documents: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    lines = [
        json.dumps({"text": " ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 30))) + "."})
        for _ in range(documents)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


def small_spec(tmp_path: Path, corpora: dict, stages: list[dict]) -> dict:
    return {
        "name": "edges",
        "workdir": str(tmp_path / "run"),
        "tokenizer": {"train": {"vocab_size": 300}},
        "model": {"preset": "micro"},
        "corpora": corpora,
        "defaults": {
            "seq_len": 32,
            "global_batch_tokens": 256,
            "micro_batch_rows": 4,
            "workers": 1,
            "checkpoint_every": 2,
            "log_every": 2,
        },
        "stages": stages,
        "chat_prompts": 0,
    }


def run_cli(capsys, *argv) -> tuple[int, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def test_no_eval_splits_edited_stage_and_corrupt_weights(ray_address, tmp_path, capsys):
    corpora = {"web": {"kind": "text", "path": str(text_file(tmp_path / "web.jsonl", 300))}}
    stage = {"name": "s1", "mixture": {"web": 1.0}, "tokens": 1024}
    spec = write_spec(tmp_path, small_spec(tmp_path, corpora, [stage]))
    workdir = tmp_path / "run"

    # No corpus has an eval split: the run trains, publishes and reports, and says what to add.
    # (Every step logged: an override on the command line, kept in the workdir's spec and in lineage.)
    code, out = run_cli(capsys, "run", str(spec), "stages.s1.log_every=1")
    assert code == 0, out
    assert "Traceback" not in out and "no eval split for corpora web" in out
    assert "pipeline: stage 1 of 1 (s1); 0 of 1,024 budgeted tokens done, 1,024 left" in out
    assert [m["step"] for m in map(json.loads, (workdir / "metrics.jsonl").read_text().splitlines())] == [1, 2, 3, 4]
    assert yaml.safe_load((workdir / "pipeline.yaml").read_text())["stages"][0]["log_every"] == 1
    assert json.loads((workdir / "models" / "s1" / "lineage.json").read_text())["overrides"] == [
        "stages.s1.log_every=1"
    ]
    assert [v.version for v in mixloop.versions(mixloop.load(str(spec)))] == ["base", "s1"]
    page = (workdir / "report" / "index.html").read_text()
    assert "No eval split for web" in page
    code, out = run_cli(capsys, "report", str(spec))
    assert code == 0 and "Traceback" not in out, out

    # A finished stage edited: validate and run refuse it, and the workdir's spec copy is untouched.
    kept = (workdir / "pipeline.yaml").read_text()
    edited = yaml.safe_load(spec.read_text())
    edited["stages"][0]["tokens"] = 2048
    spec.write_text(yaml.safe_dump(edited))
    code, out = run_cli(capsys, "validate", str(spec))
    assert code == 2 and "stages[0] (s1): changed after it produced version s1" in out and "Fix:" in out
    code, out = run_cli(capsys, "run", str(spec))
    assert code == 1 and "changed after it produced version s1" in out and "Traceback" not in out
    assert (workdir / "pipeline.yaml").read_text() == kept

    # The version's weights truncated: every command that would load them names the file and the fix.
    edited["stages"][0]["tokens"] = 1024
    edited["stages"].append({"name": "s2", "mixture": {"web": 1.0}, "tokens": 512})
    spec.write_text(yaml.safe_dump(edited))
    weights = workdir / "models" / "s1" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    for argv in (
        ["run", str(spec)],
        ["eval", str(spec)],
        ["chat", str(workdir), "s1"],
        ["models", "export", str(workdir), "s1", str(tmp_path / "out")],
    ):
        code, out = run_cli(capsys, *argv)
        assert code == 4, (argv, out)
        assert str(weights) in out and "corrupt" in out and "Fix:" in out and "Traceback" not in out, (argv, out)
    assert not (workdir / "models" / "s2").exists()
    assert not (tmp_path / "out").exists()


GOOD = [{"text": f"good document {i} about the {WORDS[i % len(WORDS)]}."} for i in range(8)]
TEXT_LINES = [  # (raw line, reason of its reject or None)
    (b"\xef\xbb\xbf" + json.dumps(GOOD[0]).encode(), None),  # a byte-order mark before the first row
    (json.dumps(GOOD[1]).encode() + b"\r", None),  # CRLF
    (b"", None),
    (b"   ", None),  # blank lines: counted, not rejected
    (b'{"text": "truncated', "Unterminated string"),
    (json.dumps(GOOD[2]).encode() + b' {"x"', "Extra data"),
    (b'{"text": 5}', "must be a string"),
    (b'{"text": {"nested": "object"}}', "must be a string"),
    (b"null", "got NoneType"),
    (b"{}", "missing field 'text'"),
    (b'["an", "array"]', "got list"),
    (b'{"text": "caf\xe9"}', "not UTF-8"),
    (json.dumps({"text": "long " * 400_000}).encode(), None),  # a 2 MB document
    (json.dumps(GOOD[3]).encode(), None),
]
CHAT_LINES = [
    ({"conversations": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}, None),
    ({"conversations": [{"role": "assistant", "content": "welcome aboard"}]}, None),  # assistant first: trains
    ({"conversations": [{"role": "robot", "content": "x"}, {"role": "assistant", "content": "y"}]}, "unknown role"),
    ({"conversations": [{"role": "user", "content": "q"}, {"role": "assistant"}]}, "has no 'content'"),
    ({"conversations": []}, "non-empty list"),
    ({"conversations": [{"role": "system", "content": "be nice"}]}, "no assistant turn"),
    ({"conversations": [{"role": "user", "content": "and?"}, {"role": "assistant", "content": "then."}]}, None),
]


def test_messy_files_lose_only_their_bad_records(ray_address, tmp_path, capsys):
    (tmp_path / "text.jsonl").write_bytes(b"\n".join(line for line, _ in TEXT_LINES) + b"\n")
    (tmp_path / "chat.jsonl").write_text("\n".join(json.dumps(record) for record, _ in CHAT_LINES) + "\n")
    corpora = {
        "text": {"kind": "text", "path": str(tmp_path / "text.jsonl"), "max_bad_fraction": 0.9},
        "chat": {"kind": "chat", "path": str(tmp_path / "chat.jsonl"), "max_bad_fraction": 0.9},
    }
    stage = {"name": "s1", "mixture": {"text": 1.0, "chat": 1.0}, "tokens": 1024}
    spec = write_spec(tmp_path, small_spec(tmp_path, corpora, [stage]))

    code, out = run_cli(capsys, "data", "preview", str(spec))
    assert code == 0 and "Traceback" not in out, out
    rows = {line.split()[1]: line.split() for line in out.splitlines() if line.startswith("s1 ")}
    for corpus, lines in (("text", TEXT_LINES), ("chat", CHAT_LINES)):
        good = sum(1 for line, reason in lines if reason is None and line not in (b"", b"   "))
        bad = {number: reason for number, (_, reason) in enumerate(lines, 1) if reason}
        documents, rejected, blank = int(rows[corpus][2].replace(",", "")), int(rows[corpus][5]), int(rows[corpus][6])
        assert (documents, rejected) == (good, len(bad)), (corpus, rows[corpus])
        assert blank == (2 if corpus == "text" else 0)
        rejects = [
            json.loads(line)
            for f in (tmp_path / "run" / "rejects").glob(f"{corpus}-train-*/*.jsonl")
            for line in f.read_text().splitlines()
        ]
        found = {int(r["where"].rsplit(":", 1)[1]): r["reason"] for r in rejects}
        assert set(found) == set(bad), (corpus, found)
        for number, reason in bad.items():
            assert reason in found[number], (corpus, number, found[number])


def test_datasets_in_the_shapes_and_files_users_have(ray_address, tmp_path, capsys, monkeypatch):
    import pyarrow as pa
    import pyarrow.csv
    import pyarrow.parquet as pq

    questions = [(f"what is {i} plus {i}?", f"{2 * i}.") for i in range(6)]
    sharegpt = [{"conversations": [{"from": "human", "value": q}, {"from": "gpt", "value": a}]} for q, a in questions]
    (tmp_path / "sharegpt.json").write_text(json.dumps(sharegpt))  # one JSON array, not JSON lines
    messages = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in questions
    ]
    pq.write_table(pa.Table.from_pylist(messages), tmp_path / "messages.parquet")
    alpaca = pa.Table.from_pylist([{"instruction": q, "input": "", "output": a} for q, a in questions])
    pyarrow.csv.write_csv(alpaca, tmp_path / "alpaca.csv")
    saved = tmp_path / "saved"  # the layout of Hugging Face datasets' save_to_disk: Arrow stream files, state.json
    saved.mkdir()
    texts = pa.Table.from_pylist([{"body": f"document {i} about the {WORDS[i]}."} for i in range(6)])
    with pa.ipc.new_stream(str(saved / "data-00000-of-00001.arrow"), texts.schema) as writer:
        writer.write_table(texts)
    (saved / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    # A Hugging Face Hub dataset, read offline from the cache: alpaca rows under other names, one of them
    # without its answer (rejected with its line like a local file's).
    hub_rows = [{"question": q, "answer": a} for q, a in questions] + [{"question": "no answer?"}]
    cache_dataset(
        tmp_path / "hf",
        "tiny-org/math",
        "f" * 40,
        {
            "data/train.jsonl": "".join(json.dumps(row) + "\n" for row in hub_rows),
            "data/test.jsonl": "".join(json.dumps(row) + "\n" for row in hub_rows[:2]),
        },
    )
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    corpora = {
        "hub": {
            "kind": "chat",
            "dataset": "tiny-org/math",
            "eval": "test",
            "max_bad_fraction": 0.2,
            "columns": {"instruction": "question", "output": "answer"},
        },
        "sharegpt": {"kind": "chat", "path": str(tmp_path / "sharegpt.json")},
        "messages": {"kind": "chat", "path": str(tmp_path / "messages.parquet"), "format": "messages"},
        "alpaca": {"kind": "chat", "path": str(tmp_path / "alpaca.csv")},
        "saved": {"kind": "text", "path": str(saved), "columns": {"text": "body"}},
    }
    stage = {"name": "s1", "mixture": {name: 1.0 for name in corpora}, "tokens": 1024}
    spec = write_spec(tmp_path, small_spec(tmp_path, corpora, [stage]))

    code, out = run_cli(capsys, "data", "preview", str(spec))
    assert code == 0 and "Traceback" not in out, out
    rows = {line.split()[1]: line.split() for line in out.splitlines() if line.startswith("s1 ")}
    assert {name: (row[2], row[5], row[9]) for name, row in rows.items()} == {
        "sharegpt": ("6", "0", "sharegpt"),
        "messages": ("6", "0", "messages"),
        "alpaca": ("6", "0", "alpaca"),
        "saved": ("6", "0", "text"),
        "hub": ("6", "1", "alpaca"),
    }
    rejects = [
        json.loads(line)
        for f in (tmp_path / "run" / "rejects").glob("hub-train-*/*.jsonl")
        for line in f.read_text().splitlines()
    ]
    snapshot = tmp_path / "hf" / "datasets--tiny-org--math" / "snapshots" / ("f" * 40)
    assert [r["where"] for r in rejects] == [f"{snapshot}/data/train.jsonl:7"]

    # A corpus whose records are not in the shape its format says: every record rejected, with why.
    corpora["alpaca"]["format"] = "sharegpt"
    spec = write_spec(tmp_path, small_spec(tmp_path, corpora, [stage]))
    code, out = run_cli(capsys, "data", "preview", str(spec))
    assert code == 1 and "corpus 'alpaca'" in out and "missing field 'conversations' (sharegpt format)" in out


def test_in_a_terminal_each_stage_shows_a_live_bar_instead_of_the_workers_lines(ray_address, tmp_path):
    import os
    import pty
    import subprocess
    import sys

    corpora = {
        "web": {
            "kind": "text",
            "path": str(text_file(tmp_path / "web.jsonl", 300)),
            "eval": str(text_file(tmp_path / "web-eval.jsonl", 20, seed=1)),
        }
    }
    spec = write_spec(
        tmp_path, small_spec(tmp_path, corpora, [{"name": "s1", "mixture": {"web": 1.0}, "tokens": 1024}])
    )
    terminal, child_side = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "mixloop.cli", "run", str(spec), "--address", ray_address],
        stdout=child_side,
        stderr=child_side,
        stdin=subprocess.DEVNULL,
    )
    os.close(child_side)
    output = b""
    while True:
        try:
            chunk = os.read(terminal, 65536)
        except OSError:  # the child closed the terminal
            break
        if not chunk:
            break
        output += chunk
    assert process.wait(timeout=300) == 0, output.decode(errors="replace")[-3000:]
    text = output.decode(errors="replace")
    assert "[s1]: 100%" in text and "4/4" in text and "tok/s" in text  # tqdm's bar, at its end
    assert "[prepare] chunks: 100%" in text and "[eval] versions: 100%" in text and "2/2" in text
    assert "[s1] step 2/4" not in text  # the workers' lines are for files and Ray jobs' logs
