"""Autoscaling from zero, on Ray's fake multi-node provider: a stage whose workers ask for what only GPU
nodes have makes the autoscaler add two of them, trains there and publishes its version, and the nodes
go away once idle.

The head is this test's own: RAY_FAKE_CLUSTER=1 and tests/ray/fake_cluster.yaml (cluster/aws.yaml in
miniature), its own ports, temp dir and HOME (token authentication on, as on a real cluster). Its
autoscaler starts each "node" as another raylet on this machine. The pipeline runs as `mixloop run
--address`, a driver of its own: this process may hold the test session's own Ray and never joins
this cluster. Everything is stopped by PID, never with `ray stop` (which stops every Ray on the machine).

Scale-up and scale-down times are printed and written to /tmp/mixloop-autoscaling-timings.json.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
import requests
import yaml

from support import generated_spec, marked_pids, port_block, stop_head, write_spec

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
FAKE_CLUSTER = Path(__file__).with_name("fake_cluster.yaml")
TIMINGS = Path(tempfile.gettempdir()) / "mixloop-autoscaling-timings.json"
STAGE, STEPS = "burst", 4
# What only the GPU node types declare (a real A10G node carries it too). Not GPU itself: Ray Train
# refuses GPU in resources_per_worker without use_gpu, and these fake GPUs cannot run CUDA.
ON_GPU_NODES = {"accelerator_type:A10G": 0.001}


def get(head: dict, path: str) -> dict:
    response = requests.get(head["dashboard"] + path, headers={"Authorization": f"Bearer {head['token']}"}, timeout=10)
    response.raise_for_status()
    return response.json()


def alive_nodes(head: dict) -> list[dict]:
    """The cluster's live nodes, from the state API (what `ray list nodes` shows)."""
    return [
        node
        for node in get(head, "/api/v0/nodes?limit=100&detail=1")["data"]["result"]["result"]
        if node["state"] == "ALIVE"
    ]


def gpu_nodes(head: dict) -> set[str]:
    return {node["node_id"] for node in alive_nodes(head) if node["resources_total"].get("GPU", 0) > 0}


def monitor_log(head: dict) -> str:
    """The autoscaler's log: what it launched and removed, and why."""
    path = head["logs"] / "monitor.log"
    return path.read_text() if path.exists() else "(none)"


@pytest.fixture
def fake_cluster(tmp_path):
    """A token-authenticated fake-multinode head: {'gcs', 'dashboard', 'token', 'env', 'logs'}; everything it
    started (fake nodes included) is killed after, and the autoscaler's logs are kept in tmp_path/cluster-logs."""
    temp = Path(tempfile.mkdtemp(prefix="mla-", dir="/tmp"))  # short: Ray's unix sockets live under it
    home = temp / "home"
    home.mkdir()
    marker = f"MIXLOOP_TEST_HEAD={uuid.uuid4().hex}"
    base = port_block(80)
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
    gcs = f"127.0.0.1:{ports['port']}"
    # The fake nodes join the GCS the provider config names; without one they would look for
    # <this machine's IP>:6379, which is any other Ray's default port.
    config = yaml.safe_load(FAKE_CLUSTER.read_text())
    config["provider"]["gcs_address"] = gcs
    (temp / "cluster.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    head_type = config["available_node_types"][config["head_node_type"]]

    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_", "AUTOSCALER_"))}
    env.update(
        HOME=str(home),
        PATH=f"{BIN}:{env.get('PATH', '')}",
        RAY_AUTH_MODE="token",
        RAY_USAGE_STATS_ENABLED="0",
        **dict([marker.split("=", 1)]),
        # Ray's own processes that look for "the" local cluster find this one, not another Ray's.
        RAY_ADDRESS=gcs,
    )
    token = subprocess.run(
        [BIN / "ray", "get-auth-token", "--generate"], env=env, check=True, capture_output=True, text=True
    ).stdout.strip()
    assert token and (home / ".ray" / "auth_token").exists()
    head_env = env | {
        "RAY_FAKE_CLUSTER": "1",
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",
        "AUTOSCALER_METRIC_PORT": str(base + 10),
    }
    command = [
        BIN / "ray",
        "start",
        "--head",
        "--block",
        "--node-ip-address",
        "127.0.0.1",
        "--autoscaling-config",
        str(temp / "cluster.yaml"),
        "--dashboard-host",
        "127.0.0.1",
        "--num-cpus",
        str(int(head_type["resources"]["CPU"])),
        "--object-store-memory",
        str(300 * 2**20),
        "--temp-dir",
        str(temp / "ray"),
        "--disable-usage-stats",
        "--min-worker-port",
        str(base + 20),
        "--max-worker-port",
        str(base + 79),
        *[arg for name, port in ports.items() for arg in (f"--{name}", str(port))],
    ]
    log = open(temp / "head.log", "w")
    process = subprocess.Popen(command, env=head_env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    head = {
        "gcs": gcs,
        "dashboard": f"http://127.0.0.1:{ports['dashboard-port']}",
        "token": token,
        "env": env | {"RAY_AUTH_TOKEN": token},
        "logs": temp / "ray" / "session_latest" / "logs",
    }
    try:
        deadline = time.time() + 90
        while True:
            assert process.poll() is None, f"ray start failed:\n{(temp / 'head.log').read_text()[-3000:]}"
            assert time.time() < deadline, (
                f"no state API at {head['dashboard']}:\n{(temp / 'head.log').read_text()[-3000:]}"
            )
            try:
                if alive_nodes(head) and (head["logs"] / "monitor.log").exists():
                    break
            except (OSError, requests.RequestException, KeyError):
                pass
            time.sleep(0.5)
        yield head
    finally:
        kept = tmp_path / "cluster-logs"
        kept.mkdir(exist_ok=True)
        for path in [temp / "head.log", temp / "cluster.yaml", *head["logs"].glob("monitor*")]:
            shutil.copy(path, kept)
        stop_head(process, marker, grace_s=1)  # no need to wait longer: the whole cluster and its temp dir go
        log.close()
        assert not marked_pids(marker), "processes of the fake cluster outlived it"
        shutil.rmtree(temp, ignore_errors=True)


def test_a_stage_brings_gpu_nodes_and_they_go_when_idle(fake_cluster, tmp_path, capsys, record_property):
    head = fake_cluster
    assert gpu_nodes(head) == set(), "GPU nodes before any stage asked for them"

    stage = {"name": STAGE, "mixture": {"facts": 0.75, "chats": 0.25}, "tokens": 1024 * STEPS}
    pipeline = generated_spec(
        tmp_path / "run",
        [stage],
        workers=2,
        cpus_per_worker=1,
        resources_per_worker=ON_GPU_NODES,
        use_gpu=False,
        checkpoint_every=STEPS,
        log_every=2,
    )
    for corpus in pipeline["corpora"].values():  # a few thousand tokens are all the stage takes
        corpus["generate"].update(documents=150, eval_documents=20)
    spec = write_spec(tmp_path, pipeline | {"eval_rows": 4, "chat_prompts": 0})
    output = tmp_path / "run.log"
    # Train waits this long for its workers' nodes before it retries; a slow machine may launch slowly.
    env = head["env"] | {"PYTHONUNBUFFERED": "1", "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "120"}
    started = time.time()
    with open(output, "w") as out:
        driver = subprocess.Popen(
            [BIN / "mixloop", "run", str(spec), "--address", head["gcs"]],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    events: dict[str, float] = {}  # seconds since `mixloop run` started
    seen: set[str] = set()  # every GPU node alive at some poll
    most = 0  # the most alive at once
    lines = {
        "training": f"stage {STAGE}: training ",  # the driver asks Ray Train for the workers
        "trained": f"[{STAGE}] step {STEPS}/{STEPS} ",  # the last step, from a worker
        "published": f"stage {STAGE}: published version {STAGE}",
    }
    try:
        deadline = started + 300
        while True:
            now = time.time() - started
            text = output.read_text()
            for event, line in lines.items():
                if event not in events and line in text:
                    events[event] = now
            try:
                nodes = gpu_nodes(head)
            except (OSError, requests.RequestException) as exc:  # a busy dashboard: ask again
                nodes = {f"unknown ({exc})"}
            else:
                seen |= nodes
                most = max(most, len(nodes))
                if len(nodes) >= 2:
                    events.setdefault("both_up", now)
                if "both_up" in events and not nodes:
                    events.setdefault("gone", now)
            if driver.poll() is not None:
                events.setdefault("exited", now)
                assert driver.returncode == 0, f"mixloop run failed:\n{text[-5000:]}"
            # Published and the nodes gone: what is left of the run (evaluating, the report) is not
            # this test's business, and the driver is stopped with the cluster.
            if "gone" in events and "published" in events:
                break
            assert time.time() < deadline, (
                f"{events} after {now:.0f} s, GPU nodes {nodes}:\n{text[-3000:]}\n"
                f"monitor.log:\n{monitor_log(head)[-4000:]}"
            )
            time.sleep(0.5)
    finally:
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)
            driver.wait()

    # Two workers that fit one per node: two nodes at once, launched by the fake provider (its node ids).
    assert most == 2 and len(seen) == 2 and all(node.startswith("fffff") for node in seen), seen
    assert events["training"] < events["both_up"] < events["trained"] < events["gone"], events
    lineage = json.loads((tmp_path / "run" / "models" / STAGE / "lineage.json").read_text())
    assert lineage["metrics"]["steps"] == STEPS
    # The nodes are gone (the state API says so); the autoscaler's log may say why a moment later.
    deadline = time.time() + 30
    while not re.search(r"Removing \d+ nodes of type gpu_spot \(idle\)", monitor_log(head)) and time.time() < deadline:
        time.sleep(1)
    monitor = monitor_log(head)
    # The autoscaler's own account: it launched GPU nodes, and removed them because they were idle.
    assert re.search(r"Adding \d+ node\(s\) of type gpu_spot", monitor), monitor[-3000:]
    assert re.search(r"Removing \d+ nodes of type gpu_spot \(idle\)", monitor), monitor[-3000:]

    timings = {
        "scale_up_s": round(events["both_up"] - events["training"], 1),  # stage asks -> both GPU nodes alive
        "run_to_both_up_s": round(events["both_up"], 1),  # `mixloop run` -> both alive
        "scale_down_s": round(events["gone"] - events["trained"], 1),  # last step -> GPU nodes gone
        "gpu_nodes_seen": len(seen),
        "idle_timeout_s": yaml.safe_load(FAKE_CLUSTER.read_text())["idle_timeout_minutes"] * 60,
        "events_s": {k: round(v, 1) for k, v in sorted(events.items(), key=lambda kv: kv[1])},
    }
    TIMINGS.write_text(json.dumps(timings, indent=1) + "\n")
    for key in ("scale_up_s", "scale_down_s"):
        record_property(key, timings[key])
    with capsys.disabled():
        print(
            f"\nfake cluster: scale-up {timings['scale_up_s']} s (stage asks -> 2 GPU nodes alive), "
            f"scale-down {timings['scale_down_s']} s (last step -> nodes gone, idle timeout "
            f"{timings['idle_timeout_s']:g} s); events {timings['events_s']}; written to {TIMINGS}"
        )
