"""One stage on two Ray Train workers, and resuming a stage from its checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support import generated_spec, write_spec
from transformers import AutoModelForCausalLM, AutoTokenizer

from mixloop.cli import main
from mixloop.pipeline import Pipeline
from mixloop.spec import load_spec

MIXED = {"name": "mixed", "mixture": {"facts": 0.75, "chats": 0.25}, "tokens": 20480}


def metrics(workdir: Path, stage: str) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [m for m in map(json.loads, lines) if m["stage"] == stage]


def test_one_stage_on_two_workers(ray_address, tmp_path, capsys):
    workdir = tmp_path / "run"
    spec = load_spec(write_spec(tmp_path, generated_spec(workdir, [MIXED])))
    result = Pipeline(spec, log=lambda line: None).run()
    assert result["trained"] == ["mixed"]

    version = workdir / "models" / "mixed"
    lineage = json.loads((version / "lineage.json").read_text())
    assert lineage["parent"] == "base"
    assert lineage["metrics"]["steps"] == 20
    rows = lineage["rows_per_corpus"]
    assert abs(rows["facts"] / (rows["facts"] + rows["chats"]) - 0.75) <= 0.01
    assert set(lineage["tokens_per_corpus"]) == {"facts", "chats"}

    logged = metrics(workdir, "mixed")
    assert [m["step"] for m in logged] == [5, 10, 15, 20]
    assert logged[-1]["loss"] < logged[0]["loss"]
    for loss in result["matrix"]["mixed"].values():
        assert loss is not None
    assert all(result["matrix"]["mixed"][c]["loss"] < result["matrix"]["base"][c]["loss"] for c in ("facts", "chats"))

    assert main(["models", "list", str(workdir)]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in listing] == ["base", "mixed"]
    assert main(["models", "show", str(workdir), "mixed"]) == 0
    assert json.loads(capsys.readouterr().out)["parent"] == "base"

    # The version is an ordinary Hugging Face model with a chat template.
    model = AutoModelForCausalLM.from_pretrained(version)
    tokenizer = AutoTokenizer.from_pretrained(version)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What does the fox eat?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert output.shape[1] > prompt["input_ids"].shape[1]
    assert isinstance(tokenizer.decode(output[0]), str)


@pytest.mark.slow
def test_killed_run_resumes_from_checkpoint_and_matches_uninterrupted(ray_address, tmp_path):
    stage = {**MIXED, "tokens": 40960}  # 40 steps, a checkpoint every 5
    interrupted = tmp_path / "interrupted"
    spec_path = write_spec(tmp_path / "a", generated_spec(interrupted, [stage]))
    driver = subprocess.Popen(
        [sys.executable, "-m", "mixloop.cli", "run", str(spec_path), "--address", ray_address],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        deadline = time.time() + 240
        while not list(interrupted.glob("train/*/step-0000010")):
            assert driver.poll() is None, "the run ended before it could be interrupted"
            assert time.time() < deadline, "no checkpoint at step 10 within 4 minutes"
            time.sleep(0.2)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    assert not (interrupted / "models" / "mixed").exists()

    Pipeline(load_spec(spec_path), log=lambda line: None).run()
    lineage = json.loads((interrupted / "models" / "mixed" / "lineage.json").read_text())
    assert lineage["metrics"]["resumed_from"] >= 10
    assert [m["step"] for m in metrics(interrupted, "mixed")].count(5) == 1, "the resumed run started again at step 0"

    uninterrupted = tmp_path / "uninterrupted"
    Pipeline(load_spec(write_spec(tmp_path / "b", generated_spec(uninterrupted, [stage]))), log=lambda l: None).run()
    resumed = load_file(interrupted / "models" / "mixed" / "model.safetensors")
    straight = load_file(uninterrupted / "models" / "mixed" / "model.safetensors")
    assert resumed.keys() == straight.keys()
    for name in resumed:
        torch.testing.assert_close(resumed[name], straight[name], atol=1e-5, rtol=1e-4)
