"""Two stages trained in turn by one group of two Ray Train workers, and resuming them from checkpoints."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from mixloop.cli import main
from mixloop.config import load_spec
from mixloop.runs.pipeline import PipelineRunner
from support import SlowSteps, generated_spec, logged_lines, write_spec

MIXED = {"name": "mixed", "mixture": {"facts": 0.75, "chats": 0.25}, "tokens": 40960}  # 40 steps
# The second stage, on the same workers: the group that trained `mixed` trains it next.
AFTER = {"name": "after", "mixture": {"chats": 1.0}, "tokens": 30720, "lr": {"peak": 0.002, "warmup_from": "current"}}
# Micro steps take about 0.06 s, less than a stage's whole 40 steps take to start: slowed down, the run
# is still going when a test interrupts it.
STEP_DELAY_S = 0.1
# `mixloop run` of a spec, with the steps slowed down (as STEP_DELAY_S says).
SLOW_DRIVER = f"""
import sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r})
from support import SlowSteps
from mixloop.runs.pipeline import PipelineRunner
from mixloop.config import load_spec
from mixloop.console import cli_output
with cli_output():  # the driver's lines as `mixloop run` shows them
    PipelineRunner(load_spec(sys.argv[1]), address=sys.argv[2], hooks=SlowSteps({STEP_DELAY_S})).run()
"""


def metrics(workdir: Path, stage: str) -> list[dict]:
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [m for m in map(json.loads, lines) if m["stage"] == stage]


def row_hashes(workdir: Path, stage: str) -> dict[int, str]:
    """The rows each global step trained (a step redone after a restart counts once, as redone)."""
    hashes = {}
    for m in metrics(workdir, stage):
        hashes.update({int(step): h for step, h in m["row_hashes"].items()})
    return hashes


def assert_same_training(workdir: Path, reference: Path, stages: tuple[str, ...] = ("mixed", "after")) -> None:
    """Same rows in the same order at every step, and the same final weights (CPU float tolerance)."""
    for stage in stages:
        assert row_hashes(workdir, stage) == row_hashes(reference, stage)
        assert len(row_hashes(workdir, stage)) == {"mixed": 40, "after": 30}[stage]
        resumed = load_file(workdir / "models" / stage / "model.safetensors")
        straight = load_file(reference / "models" / stage / "model.safetensors")
        assert resumed.keys() == straight.keys()
        for name in resumed:
            torch.testing.assert_close(resumed[name], straight[name], atol=1e-5, rtol=1e-4)


def wait_for_checkpoint(workdir: Path, stage: str, step: int, still_running) -> None:
    """Until Ray Train has registered the checkpoint of `stage` at `step` (its snapshot of the run's checkpoints
    names it). A checkpoint folder exists before Ray registers it, and reports closer together than the
    controller's poll can be dropped (docs/ARCHITECTURE.md, "Ray 2.60"), so a failure right after the
    folder appears may resume from an earlier one: tests expect at least `step` - checkpoint_every."""
    deadline = time.time() + 240
    while (stage, step) not in registered_steps(workdir):
        assert still_running(), "the run ended before it could be interrupted"
        assert time.time() < deadline, f"no checkpoint of {stage} at step {step} within 4 minutes"
        time.sleep(0.1)


def registered_steps(workdir: Path) -> set[tuple[str, int]]:
    steps = set()
    for snapshot in workdir.glob("train/*/checkpoint_manager_snapshot.json"):
        try:
            results = json.loads(snapshot.read_text())["checkpoint_results"]
        except (ValueError, KeyError):  # being written
            continue
        names = [r["checkpoint_dir_name"].rsplit(".step-", 1) for r in results]  # <stage's run>.step-N
        steps |= {(run.split(".")[-3], int(step)) for run, step in names}
    return steps


@pytest.fixture(scope="module")
def uninterrupted(ray_address, tmp_path_factory):
    """Two stages run start to finish by one group of two workers: (workdir, run result, log lines)."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    spec = load_spec(write_spec(folder, generated_spec(folder / "run", [MIXED, AFTER])))
    with logged_lines() as lines:
        result = PipelineRunner(spec).run()
    return folder / "run", result, lines


def test_two_stages_in_turn_on_one_group_of_two_workers(uninterrupted, capsys):
    workdir, result, lines = uninterrupted
    assert result.trained == ["mixed", "after"]
    assert "stages mixed, after: one worker group trains them in turn" in lines
    assert len(list((workdir / "train").iterdir())) == 1, "one Ray Train run for the group"
    after = json.loads((workdir / "models" / "after" / "lineage.json").read_text())
    mixed = json.loads((workdir / "models" / "mixed" / "lineage.json").read_text())
    assert after["parent"] == "mixed" and after["metrics"]["steps"] == 30 and after["metrics"]["resumed_from"] is None
    assert 0 < after["metrics"]["wall_seconds"] < mixed["metrics"]["wall_seconds"], "the group's start-up is paid once"
    assert mixed["started"] <= after["started"] <= after["finished"] and set(after["tokens_per_corpus"]) == {"chats"}
    # Re-warmed from where `mixed` ended, as if it had started from the published version.
    assert mixed["metrics"]["final_lr"] < metrics(workdir, "after")[0]["lr"] < 0.002

    version = workdir / "models" / "mixed"
    lineage = json.loads((version / "lineage.json").read_text())
    assert lineage["parent"] == "base"
    assert lineage["metrics"]["steps"] == 40
    rows = lineage["rows_per_corpus"]
    assert abs(rows["facts"] / (rows["facts"] + rows["chats"]) - 0.75) <= 0.01
    assert set(lineage["tokens_per_corpus"]) == {"facts", "chats"}

    logged = metrics(workdir, "mixed")
    assert [m["step"] for m in logged] == list(range(5, 41, 5))
    assert logged[-1]["loss"] < logged[0]["loss"]
    assert set(result.matrix["mixed"]) == {"facts", "chats"}
    assert all(result.matrix["mixed"][c]["loss"] < result.matrix["base"][c]["loss"] for c in ("facts", "chats"))

    capsys.readouterr()  # Ray's log monitor may still print worker lines: read only our own below
    assert main(["models", "list", str(workdir)]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].split()[:4] == ["version", "parent", "trained", "tokens"]
    rows = {line.split()[0]: line.split() for line in listing[1:]}
    assert list(rows) == ["base", "mixed", "after"] and rows["mixed"][1] == "base" and rows["after"][1] == "mixed"
    budget = int(rows["mixed"][3].replace(",", ""))
    assert budget == 40 * 1024 and 0 < int(rows["mixed"][2].replace(",", "")) <= budget  # trained <= slots
    assert main(["models", "show", str(workdir), "mixed"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("{") : out.rindex("}") + 1])["parent"] == "base"
    assert main(["models", "diff", str(workdir), "base", "mixed"]) == 0
    diff = capsys.readouterr().out.splitlines()
    assert diff[0].split() == ["eval", "loss", "base", "mixed", "change"]  # the eval change leads
    changes = {line.split()[0]: float(line.split()[-1]) for line in diff[1:3]}
    assert set(changes) == {"chats", "facts"} and all(change < 0 for change in changes.values())
    assert any(line.startswith("stage.mixture.facts.from") for line in diff)

    # The version is an ordinary Hugging Face model with a chat template.
    model = AutoModelForCausalLM.from_pretrained(version)
    tokenizer = AutoTokenizer.from_pretrained(version)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What does the fox eat?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    output = model.generate(**prompt, max_new_tokens=8, do_sample=False)
    assert output.shape[1] > prompt["input_ids"].shape[1]
    assert isinstance(tokenizer.decode(output[0]), str)


def test_a_stage_trained_alone_from_its_parents_version_matches_the_group(uninterrupted, tmp_path, caplog):
    """The group hands `after` the model `mixed` ended with, in memory: the same as loading the version."""
    reference = uninterrupted[0]
    workdir = tmp_path / "run"
    shutil.copytree(reference, workdir, ignore=lambda folder, names: {"after", "train", "metrics.jsonl"} & set(names))
    caplog.set_level(logging.INFO, logger="mixloop")
    PipelineRunner(load_spec(write_spec(tmp_path, generated_spec(workdir, [MIXED, AFTER])))).train()
    lines = caplog.messages
    assert "stage mixed: done (version mixed), skipping" in lines and not any(
        "one worker group" in line for line in lines
    )
    assert_same_training(workdir, reference, stages=("after",))


@pytest.mark.slow
def test_killed_run_resumes_from_checkpoint_and_matches_uninterrupted(
    ray_address, uninterrupted, tmp_path, capsys, caplog
):
    """Killed in the group's second stage, after the first was published. Also: while the first run
    trains, a second run of the spec is refused at once (one run per workdir); after its kill -9 the next
    run takes its lock over; its output, written to a file, is only mixloop's lines (no colour codes,
    nothing at error level)."""
    interrupted = tmp_path / "interrupted"
    spec_path = write_spec(tmp_path, generated_spec(interrupted, [MIXED, AFTER]))
    with open(tmp_path / "driver.log", "w") as log:
        driver = subprocess.Popen(
            [sys.executable, "-c", SLOW_DRIVER, str(spec_path), ray_address],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        wait_for_checkpoint(interrupted, "mixed", 15, lambda: driver.poll() is None)
        started = time.time()
        assert main(["run", str(spec_path)]) == 3
        refused_after = time.time() - started
        err = capsys.readouterr().err
        assert refused_after < 5, refused_after
        assert f"pid {driver.pid} on" in err and "'mixloop run'" in err and "One run per workdir" in err
        assert main(["status", str(spec_path)]) == 0
        status = capsys.readouterr().out
        assert f"running: 'mixloop run' (pid {driver.pid} on" in status and "stage mixed at step" in status
        assert "done:    base" in status and "left:    mixed (40 steps of 1,024 tokens), after (30 steps" in status
        wait_for_checkpoint(interrupted, "after", 5, lambda: driver.poll() is None)
        assert (interrupted / "models" / "mixed" / "lineage.json").exists(), "published as soon as it ended"
    finally:
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
    assert main(["status", str(interrupted)]) == 0  # the run directory alone tells it too
    assert "stopped: stage after at step" in capsys.readouterr().out
    assert not (interrupted / "models" / "after").exists()
    output = (tmp_path / "driver.log").read_text()
    assert "[mixed] step 10/40" in output  # (the kill may come before Ray forwards after's lines)
    assert "\x1b[" not in output and "Traceback" not in output
    assert not [line for line in output.splitlines() if " E " in line[:40] or "ERROR" in line or "WARNING" in line]

    caplog.set_level(logging.INFO, logger="mixloop")
    PipelineRunner(load_spec(spec_path)).run()
    lines = caplog.messages
    assert any(
        f"took over the lock {interrupted / '.lock'}" in line and f"pid {driver.pid}" in line for line in lines
    ), lines
    assert "stage mixed: done (version mixed), skipping" in lines
    assert not (interrupted / ".lock").exists(), "the lock is released when the run ends"
    lineage = json.loads((interrupted / "models" / "after" / "lineage.json").read_text())
    assert lineage["metrics"]["resumed_from"] >= 5, "the group's run resumed where the stage stopped"
    assert [m["step"] for m in metrics(interrupted, "after")].count(5) == 1, "the resumed run started again at step 0"

    assert_same_training(interrupted, uninterrupted[0])


@pytest.mark.slow
def test_killed_worker_restarts_the_group_and_changes_nothing(ray_address, uninterrupted, tmp_path):
    """SIGKILL of a training worker process, found through Ray's state API."""
    from ray.util.state import list_actors

    workdir = tmp_path / "run"
    spec = load_spec(write_spec(tmp_path, generated_spec(workdir, [MIXED, AFTER])))
    outcome = {}
    pipeline = PipelineRunner(spec, hooks=SlowSteps(STEP_DELAY_S))
    runner = threading.Thread(target=lambda: outcome.update(result=pipeline.run()))
    runner.start()
    wait_for_checkpoint(workdir, "mixed", 15, runner.is_alive)
    workers = list_actors(address=ray_address, filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")])
    assert len(workers) == 2
    os.kill(workers[-1]["pid"], signal.SIGKILL)
    runner.join(timeout=300)
    assert outcome["result"].trained == ["mixed", "after"]
    lineage = json.loads((workdir / "models" / "mixed" / "lineage.json").read_text())
    assert lineage["metrics"]["resumed_from"] >= 10
    assert_same_training(workdir, uninterrupted[0])


def test_export_and_chat_with_a_version(uninterrupted, tmp_path):
    workdir = uninterrupted[0]
    assert main(["models", "export", str(workdir), "mixed", str(tmp_path / "exported")]) == 0
    assert json.loads((tmp_path / "exported" / "lineage.json").read_text())["version"] == "mixed"
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "exported")
    assert model.num_parameters() > 0

    chat = subprocess.run(
        [sys.executable, "-m", "mixloop.cli", "chat", str(workdir), "mixed", "--max-new-tokens", "6"],
        input="What does the fox eat?\n/reset\nWhere does Ada live?\n",
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert chat.returncode == 0, chat.stderr
    assert chat.stdout.count("model> ") == 2


@pytest.mark.slow
def test_elastic_stage_shrinks_on_preemption_and_node_loss_grows_back_and_changes_nothing(uninterrupted, tmp_path):
    """A head plus two one-CPU nodes (ray.cluster_utils.Cluster, in its own process): node B gets a
    preemption notice and goes, then node C joins (elastic_driver.py)."""
    workdir = tmp_path / "run"
    stage = {**MIXED, "workers": {"min": 1, "max": 2, "resize_every_s": 1}, "max_failures": 5}
    spec_path = write_spec(tmp_path, {**generated_spec(workdir, [stage], log_every=1), "chat_prompts": 0})
    driver = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("elastic_driver.py")), str(spec_path)],
        env={**os.environ, "RAY_ADDRESS": ""},
        capture_output=True,
        text=True,
        timeout=900,
    )
    output = driver.stdout + driver.stderr  # workers' lines reach the driver's console through Ray
    assert driver.returncode == 0, output[-4000:]
    report = json.loads(next(line for line in output.splitlines() if line.startswith('{"events"')))
    assert report.get("finished"), report
    events = report["events"]
    print(
        "elastic timings (s): preemption notice -> node gone",
        round(events["preempted"] - events["notice"], 1),
        "| node gone -> training on 1 worker",
        round(events["shrunk"] - events["preempted"], 1),
        "| node added -> training on 2 workers",
        round(events["grown"] - events["added"], 1),
    )

    logged = metrics(workdir, "mixed")
    # The notice made the loop checkpoint at its next report, off the 5-step cadence, so the restart after
    # the node went lost at most the steps trained after the notice, not those since a cadence checkpoint.
    assert "preemption notice" in output and "checkpointing at step" in output
    notice_step = int(output.split("checkpointing at step ")[1].split()[0])
    assert notice_step >= events["notice_step"]
    resumed = [int(part.split("/")[0]) for part in output.split("resumed from checkpoint at step ")[1:]]
    assert len(resumed) >= 2 and resumed[0] >= notice_step
    sizes = [m["workers"] for m in logged]
    assert sizes[0] == 2 and 1 in sizes and sizes[-1] == 2
    assert any(a == 1 and b == 2 for a, b in zip(sizes, sizes[1:])), "never grew back to two workers"
    assert_same_training(workdir, uninterrupted[0], stages=("mixed",))
