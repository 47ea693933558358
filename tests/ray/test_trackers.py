"""Trackers against the real things: an MLflow tracking server (sqlite store, on 127.0.0.1, run from a
virtualenv of its own) queried with MlflowClient, W&B in offline mode read back from its run files; an
MLflow server that stops mid-stage does not stop the stage."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import threading
import time
import venv

import pytest
import requests
import yaml

from mixloop.config import load_spec
from mixloop.runs.pipeline import PipelineRunner
from support import SlowSteps, generated_spec, port_block, write_spec

pytestmark = pytest.mark.slow

S1 = {"name": "s1", "mixture": {"facts": 0.75, "chats": 0.25}, "tokens": 8192}  # 8 steps
S2 = {"name": "s2", "mixture": {"facts": 0.5, "chats": 0.5}, "tokens": 8192}


def wandb_run(path) -> tuple[str, set[str]]:
    """(run name, history keys) of an offline W&B run file: protobuf records in LevelDB's log format
    (32 KiB blocks of chunks: checksum, length, type, data) after a 7-byte ':W&B' header."""
    from wandb.proto import wandb_internal_pb2

    data, position, pending, name, keys = path.read_bytes(), 7, b"", None, set()
    assert data[:4] == b":W&B"
    while position + 7 <= len(data):
        left = 32768 - position % 32768
        length, kind = int.from_bytes(data[position + 4 : position + 6], "little"), data[position + 6]
        if left < 7 or (length == 0 and kind == 0):  # a block's padding
            position += left
            continue
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            pending = b""
            if record.HasField("run"):
                name = record.run.display_name
            if record.HasField("history"):
                keys |= {item.key or "/".join(item.nested_key) for item in record.history.item}
    return name, keys


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` (the full package, which mixloop's client does not need) in a throwaway venv."""
    folder = tmp_path_factory.mktemp("mlflow")
    venv.create(folder / "venv", with_pip=True)
    subprocess.run(
        [str(folder / "venv/bin/python"), "-m", "pip", "install", "-q", "--disable-pip-version-check", "mlflow"],
        check=True,
        timeout=900,
    )
    port = port_block(1)
    log = open(folder / "server.log", "w")
    process = subprocess.Popen(
        [
            str(folder / "venv/bin/mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{folder}/mlflow.db",
            "--artifacts-destination",
            str(folder / "artifacts"),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    uri, deadline = f"http://127.0.0.1:{port}", time.time() + 180
    while True:
        try:
            if requests.get(f"{uri}/health", timeout=2).ok:
                break
        except requests.ConnectionError:
            pass
        assert process.poll() is None and time.time() < deadline, (folder / "server.log").read_text()[-3000:]
        time.sleep(0.5)
    yield {"uri": uri, "process": process}
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    log.close()


def test_stages_reach_mlflow_and_wandb_and_a_server_gone_mid_stage_stops_nothing(
    ray_address, tmp_path, mlflow_server, monkeypatch, caplog
):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("WANDB_SILENT", "true")
    tracking = {
        "mlflow": {"tracking_uri": mlflow_server["uri"], "experiment": "trackers"},
        "wandb": {"project": "mixloop-test", "mode": "offline"},
    }
    spec = generated_spec(tmp_path / "run", [S1], workers=1, log_every=2, checkpoint_every=4) | {"tracking": tracking}
    caplog.set_level(logging.INFO, logger="mixloop")
    result = PipelineRunner(load_spec(write_spec(tmp_path, spec))).run()
    assert result.trained == ["s1"]

    client = MlflowClient(mlflow_server["uri"])
    experiment = client.get_experiment_by_name("trackers")
    runs = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}
    assert {"test", "s1", "base"} <= set(runs)
    parent = runs["test"].info.run_id
    assert runs["s1"].data.tags["mlflow.parentRunId"] == parent == runs["base"].data.tags["mlflow.parentRunId"]
    history = client.get_metric_history(runs["s1"].info.run_id, "train/loss")
    assert [m.step for m in history] == sorted(m.step for m in history) and len(history) == 4  # steps 2, 4, 6, 8
    assert history[-1].step == int(
        sum(json.loads((tmp_path / "run/models/s1/lineage.json").read_text())["tokens_per_corpus"].values())
    )  # the pipeline's token axis
    assert runs["s1"].data.params["lr.peak"] == "0.003" and runs["s1"].data.params["mixture.facts.from"] == "0.75"
    lineage = json.loads((tmp_path / "run/models/s1/lineage.json").read_text())
    assert runs["s1"].data.params["lineage.parent"] == "base"
    assert runs["s1"].data.params["lineage.stage_hash"] == lineage["stage_hash"]
    assert runs["s1"].data.metrics["eval/facts"] == pytest.approx(result.matrix["s1"]["facts"]["loss"])
    assert runs["s1"].data.metrics["uptake/facts"] > 0
    assert "report/index.html" in [a.path for a in client.list_artifacts(parent, "report")]

    wandb_runs = {
        name: keys for path in (tmp_path / "run" / "wandb").rglob("run-*.wandb") for name, keys in [wandb_run(path)]
    }
    assert {"train/loss", "train/loss/facts", "eval/facts"} <= wandb_runs["s1"] and "eval/facts" in wandb_runs["base"]

    # The next stage: the MLflow server goes while it trains, and the stage publishes all the same.
    write_spec(tmp_path, spec | {"stages": [S1, S2]})
    pipeline = PipelineRunner(load_spec(tmp_path / "pipeline.yaml"), hooks=SlowSteps(0.3))
    outcome = {}
    runner = threading.Thread(target=lambda: outcome.update(result=pipeline.run()))
    runner.start()
    deadline = time.time() + 240
    while '"stage": "s2"' not in (tmp_path / "run" / "metrics.jsonl").read_text():  # the log's own spacing
        assert runner.is_alive() and time.time() < deadline, "the run ended before s2 logged a step"
        time.sleep(0.2)
    os.killpg(mlflow_server["process"].pid, signal.SIGKILL)
    mlflow_server["process"].wait()
    runner.join(timeout=300)
    assert outcome["result"].trained == ["s2"] and (tmp_path / "run/models/s2/lineage.json").exists()
    warned = [line for line in caplog.messages if "warning: tracker MLflow failed" in line]
    assert len(warned) == 1, warned  # warned once, not at every report
    assert yaml.safe_load((tmp_path / "run" / "pipeline.yaml").read_text())["tracking"]["wandb"]["mode"] == "offline"
