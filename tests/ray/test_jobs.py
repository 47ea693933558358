"""`mixloop submit` and `mixloop jobs` against a real `ray start --head` on 127.0.0.1 with token auth on.

The head is this test's own: its own ports, temp dir and HOME (so the token it generates never touches
the user's ~/.ray), started from this venv (the job's `mixloop` and python are this checkout's), and
stopped by PID: never `ray stop`, which would stop every Ray on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import requests
import yaml

from mixloop import cli
from mixloop.errors import MixloopError
from mixloop.runs import jobs
from mixloop.storage.lock import workdir_lock
from support import generated_spec, port_block, stop_head, write_spec

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def ready(address: str, token: str, agent_port: int) -> bool:
    """The job server answers and the head's job agent listens (submits before that are refused)."""
    try:
        socket.create_connection(("127.0.0.1", agent_port), timeout=1).close()
        return requests.get(f"{address}/api/version", headers={"Authorization": f"Bearer {token}"}, timeout=2).ok
    except (OSError, requests.RequestException):
        return False


@pytest.fixture(scope="module")
def head():
    """A token-authenticated Ray head: {'address', 'token', 'home'}; everything it started is killed after."""
    temp = Path(tempfile.mkdtemp(prefix="mlj-", dir="/tmp"))  # short: Ray's unix sockets live under it
    home = temp / "home"
    home.mkdir()
    marker = f"MIXLOOP_TEST_HEAD={uuid.uuid4().hex}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    base = port_block(120)
    env.update(
        HOME=str(home),
        PATH=f"{BIN}:{env.get('PATH', '')}",
        RAY_AUTH_MODE="token",
        RAY_USAGE_STATS_ENABLED="0",
        **dict([marker.split("=", 1)]),
        # Ray's own processes (Train's placement-group cleaner queries the state API) look for
        # "the" local cluster when they have no address; on a machine that runs other Rays they
        # find several and fail. A real head does not need this; a head beside others does.
        RAY_ADDRESS=f"127.0.0.1:{base}",
    )
    # Ray's own way to make a token: written to $HOME/.ray/auth_token, where the head reads it.
    token = subprocess.run(
        [BIN / "ray", "get-auth-token", "--generate"], env=env, check=True, capture_output=True, text=True
    ).stdout.strip()
    assert token and (home / ".ray" / "auth_token").exists()
    ports = dict(
        zip(
            [
                "port",
                "dashboard-port",
                "ray-client-server-port",
                "node-manager-port",
                "object-manager-port",
                "dashboard-agent-listen-port",
                "dashboard-agent-grpc-port",
                "runtime-env-agent-port",
                "metrics-export-port",
            ],
            range(base, base + 9),
        )
    )
    command = [
        BIN / "ray",
        "start",
        "--head",
        "--block",
        "--node-ip-address",
        "127.0.0.1",
        "--dashboard-host",
        "127.0.0.1",
        "--num-cpus",
        "3",
        "--object-store-memory",
        str(300 * 2**20),
        "--temp-dir",
        str(temp / "ray"),
        "--disable-usage-stats",
        "--min-worker-port",
        str(base + 20),
        "--max-worker-port",
        str(base + 119),
        *[arg for name, port in ports.items() for arg in (f"--{name}", str(port))],
    ]
    log = open(temp / "head.log", "w")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{ports['dashboard-port']}"
    try:
        started = time.time()
        deadline = started + 90
        while True:
            assert process.poll() is None, f"ray start failed:\n{(temp / 'head.log').read_text()[-3000:]}"
            assert time.time() < deadline, f"no job server at {address}:\n{(temp / 'head.log').read_text()[-3000:]}"
            if ready(address, token, ports["dashboard-agent-listen-port"]):
                break
            time.sleep(0.5)
        print(f"\nhead ready {time.time() - started:.1f} s after `ray start`")
        yield {"address": address, "token": token, "home": home}
    finally:
        stop_head(
            process, marker, grace_s=3
        )  # `ray start --block` outlives a SIGTERM by ~30 s: its processes are killed anyway
        log.close()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def mixloop(head, monkeypatch):
    """`mixloop ...` in this process, as the user holding the cluster's token."""
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(head["home"].parent / "client-home"))  # never the user's ~/.ray/auth_token
    monkeypatch.setenv("RAY_AUTH_TOKEN", head["token"])
    monkeypatch.setenv("RAY_ADDRESS", head["address"])  # the default --address
    return cli.main


def spec_file(folder: Path, steps: int) -> Path:
    stage = {"name": "short", "mixture": {"facts": 0.75, "chats": 0.25}, "tokens": 1024 * steps}
    return write_spec(
        folder,
        generated_spec(folder / "run", [stage], workers=1, cpus_per_worker=1, checkpoint_every=4, log_every=2)
        | {"eval_rows": 4, "chat_prompts": 2, "chat_max_new_tokens": 8},
    )


def wait_status(client, job: str, wanted: set[str], timeout: float) -> str:
    deadline = time.time() + timeout
    while (status := str(client.get_job_status(job))) not in wanted:
        assert time.time() < deadline, f"{job} still {status}:\n{client.get_job_logs(job)[-4000:]}"
        time.sleep(0.5)
    return status


def test_submit_runs_the_pipeline_and_jobs_commands_follow_it(mixloop, head, tmp_path, capsys):
    spec = spec_file(tmp_path, steps=8)
    started = time.time()
    assert mixloop(["submit", str(spec), "--no-wait"]) == 0
    out = capsys.readouterr().out
    job = "mixloop-test"
    assert f"as job {job}" in out and f"mixloop jobs logs {job} --follow --address {head['address']}" in out

    client = jobs.JobClient(None).sdk
    timeline, seen = [], 0  # (seconds since submit, line) as each line first shows in the job's logs
    deadline = time.time() + 240
    while (status := str(client.get_job_status(job))) not in TERMINAL:
        logs = client.get_job_logs(job)
        timeline += [(time.time() - started, line) for line in logs[seen:].splitlines() if line.strip()]
        seen = len(logs)
        assert time.time() < deadline, logs[-4000:]
        time.sleep(0.5)
    total = time.time() - started
    logs = client.get_job_logs(job)
    timeline += [(total, line) for line in logs[seen:].splitlines() if line.strip()]
    assert status == "SUCCEEDED", logs[-4000:]
    first_step = next(t for t, line in timeline if "] step " in line)
    with capsys.disabled():  # for the record: where a submitted pipeline spends its time on this machine
        print(
            "\n".join(
                f"{t:6.1f} s  {line[:150]}"
                for t, line in timeline
                if "] step " in line or not line.lstrip().startswith(("(", "\x1b"))
            )
        )
        print(f"submit -> first step line in the job's logs: {first_step:.1f} s; submit -> SUCCEEDED: {total:.1f} s")

    lineage = json.loads((tmp_path / "run" / "models" / "short" / "lineage.json").read_text())
    assert lineage["metrics"]["steps"] == 8

    capsys.readouterr()
    assert mixloop(["jobs", "logs", job]) == 0
    out = capsys.readouterr().out
    assert "[short] step 8/8" in out and "[short] step 2/8" in out
    assert mixloop(["jobs", "logs", job, "--follow"]) == 0  # a finished job: the whole log, then it returns
    assert "[short] step 8/8" in capsys.readouterr().out
    assert mixloop(["jobs", "status", job]) == 0
    assert capsys.readouterr().out.startswith(f"{job}: SUCCEEDED")
    assert mixloop(["jobs", "list"]) == 0
    listed = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith(job)]
    assert listed and listed[0][1] == "SUCCEEDED" and listed[0][4] == "test" and listed[0][5] == str(spec)
    assert mixloop(["jobs", "status", "mixloop-nosuch"]) == 1
    assert "no job 'mixloop-nosuch'" in capsys.readouterr().err


def test_second_submit_is_refused_while_running_and_stop_stops_it(mixloop, head, tmp_path, capsys):
    spec = spec_file(tmp_path, steps=400)
    # After the first test, mixloop-test has finished: this submit replaces it.
    assert mixloop(["submit", str(spec), "--no-wait", "--address", head["address"]]) == 0
    job = "mixloop-test"
    client = jobs.JobClient(head["address"]).sdk
    assert wait_status(client, job, {"RUNNING"} | TERMINAL, timeout=60) == "RUNNING", client.get_job_logs(job)
    capsys.readouterr()

    assert mixloop(["submit", str(spec), "--no-wait"]) == 1
    err = capsys.readouterr().err
    assert f"already runs on {head['address']} as job {job}" in err
    assert f"mixloop jobs stop {job} --address {head['address']}" in err

    assert mixloop(["jobs", "stop", job]) == 0
    assert capsys.readouterr().out.strip().endswith(f"{job}: STOPPED")
    assert str(client.get_job_status(job)) == "STOPPED"
    # This run's log alone, though Ray appends a reused id's log to the finished run's file.
    for follow in ([], ["--follow"]):
        assert mixloop(["jobs", "logs", job, *follow]) == 0
        out = capsys.readouterr().out
        assert out.count(f"Running entrypoint for job {job}") == 1 and "] step 8/8" not in out, out
    assert mixloop(["jobs", "stop", job]) == 0
    assert "already ended: STOPPED" in capsys.readouterr().out

    # A workdir that another run holds is refused before a job is made for it.
    with workdir_lock(str(tmp_path / "run"), "mixloop tune search.yaml"):
        assert mixloop(["submit", str(spec), "--no-wait"]) == 3
    err = capsys.readouterr().err
    assert f"workdir {tmp_path / 'run'} is in use by 'mixloop tune search.yaml' (pid {os.getpid()}" in err


def test_a_client_without_the_token_is_refused_clearly(mixloop, head, tmp_path, monkeypatch, capsys):
    spec = spec_file(tmp_path, steps=8)
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    # A fresh process, as a user's shell: this one may hold the token of the tests' own local Ray.
    for command in (["submit", str(spec), "--no-wait"], ["jobs", "list"]):
        result = subprocess.run(
            [sys.executable, "-m", "mixloop.cli", *command],
            env=dict(os.environ),
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 1, result.stdout + result.stderr
        assert "requires an authentication token" in result.stderr, result.stderr
        assert "RAY_AUTH_TOKEN" in result.stderr and "RAY_AUTH_MODE" in result.stderr

    monkeypatch.setenv("RAY_AUTH_MODE", "token")  # token mode on this side, and still no token anywhere
    with pytest.raises(MixloopError, match="RAY_AUTH_MODE=token but no Ray authentication token"):
        jobs.JobClient(None)

    monkeypatch.setenv("RAY_AUTH_TOKEN", "not-the-token")
    with pytest.raises(MixloopError, match="refused the authentication token.*RAY_AUTH_TOKEN"):
        jobs.JobClient(None)

    # The token in ~/.ray/auth_token is found the way Ray finds it.
    monkeypatch.delenv("RAY_AUTH_TOKEN")
    monkeypatch.setenv("HOME", str(head["home"]))
    assert mixloop(["jobs", "list"]) == 0

    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    with pytest.raises(MixloopError, match="not the HTTP address of a Ray job server"):
        jobs.JobClient(None)


def test_the_embedded_rays_own_processes_find_its_state_api_beside_another_ray(ray_address, head):
    """Ray Train's placement-group cleaner asks the state API without an address. With a second Ray on
    the machine (this head), auto-detection finds two and fails, and a stopped trial's CPUs stay
    reserved; mixloop's embedded Ray names its own API server in its processes' environment."""
    import ray
    from ray.util.state import list_nodes

    @ray.remote(num_cpus=0)
    def nodes_seen_from_a_worker() -> list[str]:
        return [node.node_id for node in list_nodes()]

    assert ray.get(nodes_seen_from_a_worker.remote()) == [ray.get_runtime_context().get_node_id()]


def test_a_watch_job_adds_what_lands_in_the_inbox_and_a_later_submit_takes_it_up(mixloop, head, tmp_path, capsys):
    from test_hard_edges import text_file

    spec = spec_file(tmp_path, steps=8)
    data = yaml.safe_load(spec.read_text())
    data["iterate"] = {"finetune": {"chats": []}}  # continued pretraining only: no fine-tune stage
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    corpus = tmp_path / "inbox" / "notes"
    corpus.mkdir(parents=True)
    text_file(corpus / "text.jsonl", 60)
    (corpus / "_READY").write_text("")
    assert mixloop(["submit", str(spec), "--no-wait", "--watch", str(tmp_path / "inbox")]) == 0
    job, state = "mixloop-test", tmp_path / "run" / "inbox.json"
    client = jobs.JobClient(None).sdk
    deadline = time.time() + 300
    while not (state.exists() and json.loads(state.read_text())["corpora"][str(corpus)]["status"] == "done"):
        assert str(client.get_job_status(job)) not in TERMINAL, client.get_job_logs(job)[-4000:]
        assert time.time() < deadline, client.get_job_logs(job)[-4000:]
        time.sleep(1)
    assert str(client.get_job_status(job)) == "RUNNING"  # still watching
    assert mixloop(["jobs", "stop", job]) == 0
    copy = yaml.safe_load((tmp_path / "run" / "pipeline.yaml").read_text())
    assert [stage["name"] for stage in copy["stages"]] == ["short", "notes"]
    assert json.loads((tmp_path / "run" / "current.json").read_text())["version"] == "notes"
    capsys.readouterr()
    assert mixloop(["submit", str(spec), "--no-wait", "--watch", str(tmp_path / "inbox")]) == 0
    assert "holds stages a watch added (notes); the job watches from that copy" in capsys.readouterr().err
    assert mixloop(["jobs", "stop", job]) == 0
