"""Run one elastic stage on a multi-node local cluster and change the cluster under it.

Run as a script by test_stage.py (a `ray.cluster_utils.Cluster` needs its own process: the
session's Ray is another cluster, and nodes can only be added from the main thread). The pipeline
runs in a thread; the main thread waits for training milestones in metrics.jsonl and:
  1. gives node B a preemption notice (a drain with a deadline), then removes it after the deadline;
  2. adds node C back.
Prints one JSON line: when each event happened and when training went on afterwards.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

# Read by Ray Train's controller and by the node processes: set before anything starts.
os.environ.update(
    {
        "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25",
        "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "5",
        "RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S": "0.5",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
    }
)

import ray  # noqa: E402
from ray.cluster_utils import Cluster  # noqa: E402

from mixloop.config import load_spec  # noqa: E402
from mixloop.runs.pipeline import PipelineRunner  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/, for support
from support import SlowSteps  # noqa: E402

NODE = {"num_cpus": 1}
PREEMPTION_NOTICE_S = 4.0


def metrics(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_for(condition, what: str, timeout: float = 240.0) -> float:
    deadline = time.time() + timeout
    while not condition():
        if time.time() > deadline:
            raise TimeoutError(f"timed out waiting for {what}")
        time.sleep(0.1)
    return time.time()


def training_with(workdir: Path, workers: int, after: float) -> bool:
    """A step finished by `workers` workers, logged after time `after`."""
    return any(m["workers"] == workers and m["time"] > after for m in metrics(workdir))


def last_step(workdir: Path) -> int:
    return max((m["step"] for m in metrics(workdir)), default=0)


def kick_coordinator(stop: threading.Event) -> None:
    """Ray Data's autoscaling coordinator, which Train asks how many workers fit, refreshes its view
    of the cluster every 20 s (a class constant in 2.60); ask it to recompute every second instead."""
    while not stop.wait(1.0):
        try:
            coordinator = ray.get_actor("AutoscalingCoordinator", namespace="AutoscalingCoordinator")
            ray.get(coordinator.get_reserved_resources.remote("mixloop-test", recompute=True), timeout=5)
        except Exception:  # noqa: BLE001 - the actor exists only while a stage runs
            pass


def preempt(cluster: Cluster, node, seconds: float) -> None:
    from ray._raylet import GcsClient
    from ray.core.generated import autoscaler_pb2

    reason = autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION")
    accepted, message = GcsClient(address=cluster.address).drain_node(
        node.node_id, reason, "spot instance reclaimed (test)", int((time.time() + seconds) * 1000)
    )
    assert accepted, message


def main(spec_path: str) -> None:
    cluster = Cluster(
        initialize_head=True,
        connect=True,
        head_node_args={
            "num_cpus": 0,
            "include_dashboard": False,
            "_system_config": {"health_check_period_ms": 1000, "health_check_failure_threshold": 5},
        },
    )
    node_a, node_b = cluster.add_node(**NODE), cluster.add_node(**NODE)
    cluster.wait_for_nodes()
    stop = threading.Event()
    threading.Thread(target=kick_coordinator, args=(stop,), daemon=True).start()
    spec = load_spec(spec_path)
    workdir = Path(spec.workdir)
    outcome: dict = {}

    # The pipeline's lines on stderr: stdout is for the JSON line.
    logging.getLogger("mixloop").addHandler(logging.StreamHandler(sys.stderr))
    logging.getLogger("mixloop").setLevel(logging.INFO)

    def run() -> None:
        try:
            # Steps slowed down, so the cluster changes while the stage trains.
            PipelineRunner(spec, hooks=SlowSteps(0.3)).run()
            outcome["finished"] = True
        except BaseException as exc:  # noqa: BLE001 - reported to the test
            outcome["error"] = repr(exc)

    trainer = threading.Thread(target=run)
    trainer.start()
    events = {}
    wait_for(lambda: last_step(workdir) >= 8 and training_with(workdir, 2, 0), "two workers at step 8")
    events["notice"] = time.time()
    events["notice_step"] = last_step(workdir)
    preempt(cluster, node_b, PREEMPTION_NOTICE_S)
    time.sleep(PREEMPTION_NOTICE_S + 1.0)
    events["preempted"] = time.time()
    cluster.remove_node(node_b)
    events["shrunk"] = wait_for(lambda: training_with(workdir, 1, events["preempted"]), "one worker after preemption")

    wait_for(lambda: last_step(workdir) >= 20, "step 20")
    node_c = cluster.add_node(**NODE)
    events["added"] = time.time()
    events["grown"] = wait_for(lambda: training_with(workdir, 2, events["added"]), "two workers after adding a node")

    trainer.join(timeout=300)
    stop.set()
    print(json.dumps({"events": events, **outcome}), flush=True)
    ray.shutdown()
    cluster.shutdown()
    del node_a, node_c


if __name__ == "__main__":
    main(sys.argv[1])
