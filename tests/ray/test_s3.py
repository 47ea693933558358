"""A pipeline whose corpora and run directory live on S3: a real S3 server (moto) on 127.0.0.1.

`mixloop run` runs as its own process with its own local Ray, as a user would start it, with
the S3 endpoint and credentials in its environment. Nothing is mocked inside any process.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import fsspec
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from mixloop.data import synthetic
from mixloop.storage.fs import read_lines
from support import write_spec

BUCKET = "mixloop-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_env():
    """Start moto's S3 server on a free loopback port; the environment a client needs to reach it."""
    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    env = {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert server.poll() is None and time.time() < deadline, "moto_server did not start"
            time.sleep(0.2)
    yield env
    server.terminate()
    server.wait(timeout=10)


@pytest.fixture
def s3(s3_env, monkeypatch):
    """An s3fs filesystem on the test server, with this process's environment pointing at it."""
    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    fs = fsspec.filesystem("s3", skip_instance_cache=True)
    if not fs.exists(BUCKET):
        fs.mkdir(BUCKET)
    return fs


def mixloop(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mixloop.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.mark.slow
def test_pipeline_with_corpora_and_workdir_on_s3(s3, s3_env, tmp_path):
    for kind, topic in (("text", "general"), ("chat", "general")):
        local = synthetic.write_corpus(str(tmp_path / kind), kind, topic, 300, 30, seed=0)
        for split, path in local.items():
            s3.put_file(path, f"{BUCKET}/data/{kind}/{split}.jsonl")
    workdir = f"s3://{BUCKET}/runs/s3test"
    spec = {
        "name": "s3test",
        "workdir": workdir,
        "tokenizer": {"train": {"vocab_size": 320}},
        "model": {"preset": "micro"},
        "corpora": {
            "facts": {
                "kind": "text",
                "path": f"s3://{BUCKET}/data/text/train.jsonl",
                "eval": f"s3://{BUCKET}/data/text/eval.jsonl",
            },
            "chats": {
                "kind": "chat",
                "path": f"s3://{BUCKET}/data/chat/train*.jsonl",
                "eval": f"s3://{BUCKET}/data/chat/eval.jsonl",
            },
        },
        "defaults": {
            "seq_len": 64,
            "global_batch_tokens": 512,
            "micro_batch_rows": 4,
            "workers": 1,
            "checkpoint_every": 4,
            "log_every": 4,
        },
        "stages": [{"name": "sft", "mixture": {"chats": 0.8, "facts": 0.2}, "tokens": 4096}],
        "eval_rows": 4,
        "chat_prompts": 2,
        "chat_max_new_tokens": 8,
    }
    spec_path = write_spec(tmp_path / "spec", spec)

    first = mixloop("run", str(spec_path), env=s3_env)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    root = f"{BUCKET}/runs/s3test"
    for version in ("base", "sft"):
        assert s3.exists(f"{root}/models/{version}/lineage.json")
        assert s3.exists(f"{root}/models/{version}/model.safetensors")
    for written in (
        "pipeline.yaml",
        "tokenizer/tokenizer.json",
        "eval/matrix.json",
        "report/index.html",
        "report/eval_matrix.png",
    ):
        assert s3.exists(f"{root}/{written}"), written
    # Logs on S3: one object per append, read back in order.
    steps = [json.loads(line)["step"] for line in read_lines(f"s3://{root}/metrics.jsonl")]
    assert steps == [4, 8], steps  # 8 steps, logged every 4
    assert len(s3.ls(f"{root}/metrics.jsonl.d")) == len(steps)
    assert s3.glob(f"{root}/train/*/*.step-*/model.safetensors"), "checkpoints are stored in the S3 workdir"
    assert not (spec_path.parent / "runs").exists() and not Path("runs", "s3test").exists()
    matrix = json.loads(s3.cat_file(f"{root}/eval/matrix.json"))
    assert matrix["sft"]["chats"]["loss"] < matrix["base"]["chats"]["loss"]

    # A version on S3 loads with transformers once exported.
    export = tmp_path / "exported"
    exported = mixloop("models", "export", workdir, "sft", str(export), env=s3_env)
    assert exported.returncode == 0, exported.stderr[-3000:]
    model, tokenizer = AutoModelForCausalLM.from_pretrained(export), AutoTokenizer.from_pretrained(export)
    assert model.config.vocab_size >= len(tokenizer)

    # Continue: nothing to train and nothing tokenized again.
    tokenized = len(read_lines(f"s3://{root}/cache/prepare.jsonl"))
    assert tokenized > 0
    again = mixloop("run", str(spec_path), env=s3_env)
    assert again.returncode == 0 and "nothing to train" in again.stdout, again.stderr[-3000:]
    assert len(read_lines(f"s3://{root}/cache/prepare.jsonl")) == tokenized
    assert f"{workdir}/report/index.html" in again.stdout
