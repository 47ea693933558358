"""`mixloop tune` on a real local Ray: a search is interrupted (driver killed) and resumed, its best
stage is appended to the pipeline, and the pipeline then trains it to the trial's result."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mixloop.config import load_spec
from mixloop.runs.pipeline import PipelineRunner
from support import generated_spec, write_spec

STAGES = [{"name": "pretrain", "mixture": {"facts": 1.0}, "tokens": 5120}]
SEARCH = {  # a new stage for the new data (chats), replaying facts
    "name": "mixed-tuned",
    "pipeline": "pipeline.yaml",
    "new_stage": {"mixture": {"facts": 0.75, "chats": 0.25}, "tokens": 10240, "lr": {"peak": 0.002}},
    "space": {"mixture": {"corpora": ["facts", "chats"], "min_share": 0.1}, "lr_peak": [0.0005, 0.005]},
    "objective": "loss.chats + 2 * forgetting.facts",
    "trials": {"count": 3, "evals": 2, "workers": 1, "max_concurrent": 2},
}
TRIALS = 3


def run_state(workdir: Path, trial: str) -> dict:
    """The files a trial's training writes (its stage, metrics, final weights and result), with
    modification times: a trial that trained again, even for zero steps, changes them. (A finished trial
    that Tune starts again, having missed its end, appends to starts.jsonl and reports its result.json.)"""
    folder = workdir / "tune" / "mixed-tuned" / "trials" / trial
    return {
        str(p): (p.stat().st_mtime_ns, p.read_bytes())
        for p in folder.rglob("*")
        if p.is_file() and p.name not in ("starts.jsonl", "tracked.json")
    }


def tune_command(search: Path, ray_address: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "mixloop.cli", "tune", str(search), "--address", ray_address, *extra]


@pytest.fixture(scope="module")
def search(ray_address, tmp_path_factory):
    """A search killed once two trials have finished, then run again with --apply: its folders and
    what each run saw."""
    folder = tmp_path_factory.mktemp("tuning")
    workdir = folder / "run"
    write_spec(folder, {**generated_spec(workdir, STAGES), "chat_prompts": 0})
    path = write_spec(folder, SEARCH, name="search.yaml")
    trials = workdir / "tune" / "mixed-tuned" / "trials"

    started = time.time()
    first = subprocess.Popen(
        tune_command(path, ray_address),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        text=True,
    )
    deadline = time.time() + 300
    try:
        while len(list(trials.glob("*/result.json"))) < 2:
            assert first.poll() is None, f"the search ended before it was interrupted:\n{first.stdout.read()[-3000:]}"
            assert time.time() < deadline, "two trials did not finish within 5 minutes"
            time.sleep(0.2)
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
    finished_before = {p.parent.name: run_state(workdir, p.parent.name) for p in trials.glob("*/result.json")}

    interrupted = time.time()
    second = subprocess.run(tune_command(path, ray_address, "--apply"), capture_output=True, text=True, timeout=600)
    print(f"search: interrupted after {interrupted - started:.0f} s, resumed run {time.time() - interrupted:.0f} s")
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]
    return {
        "folder": folder,
        "workdir": workdir,
        "trials": trials,
        "output": second.stdout,
        "finished_before": finished_before,
        "results": json.loads((workdir / "tune" / "mixed-tuned" / "results.json").read_text()),
    }


@pytest.mark.tuning
def test_resumed_search_does_not_rerun_finished_trials(search):
    assert len(search["finished_before"]) >= 2
    assert "resuming from" in search["output"]
    for trial, state in search["finished_before"].items():
        assert any(name.endswith("final/model.safetensors") for name in state), "no final weights for a finished trial"
        assert run_state(search["workdir"], trial) == state, f"trial {trial} trained again"
    rows = search["results"]["trials"]
    assert len(rows) == TRIALS
    assert set(search["finished_before"]) <= {row["trial"] for row in rows}
    assert all(row["status"] in ("finished", "stopped") for row in rows), rows


@pytest.mark.tuning
def test_baselines_run_and_the_table_names_the_winner_against_stratified(search):
    rows = search["results"]["trials"]
    assert sorted(row["arm"] for row in rows) == ["current", "search", "stratified"]
    baselines = {row["arm"]: row for row in rows if row["arm"] != "search"}
    assert all(row["status"] == "finished" for row in baselines.values()), "ASHA must not stop a baseline"
    assert baselines["current"]["mixture"] == {"facts": {"from": 0.75, "to": 0.75}, "chats": {"from": 0.25, "to": 0.25}}
    # Stratified: weights proportional to the packed corpora's tokens.
    manifests = [json.loads(p.read_text()) for p in search["workdir"].glob("cache/*-train-*/manifest.json")]
    tokens = {m["corpus"]: m["tokens"] for m in manifests}
    share = tokens["facts"] / (tokens["facts"] + tokens["chats"])
    assert baselines["stratified"]["mixture"]["facts"]["from"] == pytest.approx(share, abs=1e-3)
    for row in rows:
        assert row["trained_tokens"] > 0 and row["wall_s"] > 0 and set(row["loss"]) == {"facts", "chats"}
    verdict = search["results"]["verdict"]
    assert verdict.startswith(("winner: trial", "the stratified baseline won")) and verdict in search["output"]
    assert "trial" in search["output"] and "objective" in search["output"]
    assert "Configuration for experiment" not in search["output"] and "TensorBoard" not in search["output"]
    folder = search["workdir"] / "tune" / "mixed-tuned"
    assert len((folder / "results.csv").read_text().splitlines()) == TRIALS + 1
    assert (folder / "objective.png").stat().st_size > 1000

    # Each trial is a run of the pipeline's trackers (TensorBoard here), on the pipeline's token axis.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    for row in rows:
        run = EventAccumulator(str(search["workdir"] / "tensorboard" / "mixed-tuned" / row["trial"]))
        run.Reload()
        [objective] = run.Scalars("objective")  # sent once, though the search ran twice
        assert objective.value == pytest.approx(row["objective"], rel=1e-5)
        assert [e.step for e in run.Scalars("train/loss")][0] > 5120 * 0.5  # after pretrain's tokens


@pytest.mark.tuning
def test_no_trial_tokenizes(search):
    """Every corpus was packed once, before the first trial started; no trial packed anything."""
    prepared = [json.loads(line) for line in (search["workdir"] / "cache" / "prepare.jsonl").read_text().splitlines()]
    starts = [
        json.loads(line)["time"] for p in search["trials"].glob("*/starts.jsonl") for line in p.read_text().splitlines()
    ]
    assert len(starts) >= TRIALS
    assert max(entry["finished"] for entry in prepared) < min(starts)
    assert len({(e["corpus"], e["split"], e["key"]) for e in prepared}) == len(prepared)


@pytest.mark.tuning
def test_best_stage_round_trips_into_the_pipeline_as_the_trials_model(search):
    """--apply appends the best stage and publishes the trial's model as its version: the pipeline
    validates, and runs without training it again (the stage hashes to the trial's trajectory)."""
    rows = search["results"]["trials"]
    best = min((row for row in rows if row["status"] == "finished"), key=lambda row: row["objective"])
    spec = load_spec(search["folder"] / "pipeline.yaml")
    assert spec.stage_names() == ["pretrain", "mixed-tuned"]
    assert yaml.safe_load((search["workdir"] / "tune" / "mixed-tuned" / "best-stage.yaml").read_text()) == [
        best["stage"]
    ]

    result = PipelineRunner(spec).run()
    assert result.trained == []
    lineage = json.loads((search["workdir"] / "models" / "mixed-tuned" / "lineage.json").read_text())
    assert lineage["parent"] == "pretrain" and lineage["stage"]["mixture"] == best["mixture"]
    assert lineage["metrics"]["tuned_by"]["trial"] == best["trial"]
    for corpus, loss in best["loss"].items():
        assert result.matrix["mixed-tuned"][corpus]["loss"] == pytest.approx(loss, abs=1e-5)


@pytest.mark.tuning
def test_trials_of_two_workers_run_on_ray_train_and_train_what_one_worker_trials_train(search, ray_address):
    """A search whose trials need two workers runs each as a Ray Train run (one-worker trials train in
    their Tune trial's process): its baselines end where the first search's did (training does not
    depend on the number of workers)."""
    two = {
        **SEARCH,
        "name": "on-two",
        "start_from": "pretrain",
        "trials": {"count": 3, "evals": 2, "workers": 2, "cpus_per_worker": 0.5, "max_concurrent": 3},
    }
    path = write_spec(search["folder"], two, name="on-two.yaml")
    run = subprocess.run(tune_command(path, ray_address), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    folder = search["workdir"] / "tune" / "on-two"
    rows = json.loads((folder / "results.json").read_text())["trials"]
    one = {row["arm"]: row for row in search["results"]["trials"] if row["arm"] != "search"}
    assert sorted(row["arm"] for row in rows) == ["current", "search", "stratified"]
    for row in rows:
        assert (folder / "train" / row["trial"]).is_dir()
        assert (folder / "trials" / row["trial"] / "final").is_dir() == (row["status"] == "finished")
        logged = [
            json.loads(line) for line in (folder / "trials" / row["trial"] / "metrics.jsonl").read_text().splitlines()
        ]
        assert {m["workers"] for m in logged} == {2}
        if row["arm"] in one:
            assert row["objective"] == pytest.approx(one[row["arm"]]["objective"], rel=1e-3)
    assert not (search["workdir"] / "tune" / "mixed-tuned" / "train").exists(), (
        "one-worker trials start no Ray Train run"
    )
