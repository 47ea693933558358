"""Connecting to Ray, and keeping its output to what a user of mixloop needs to read.

Ray prints lines at error level that are no errors (an actor "has constructor arguments in the
object store", a kill of an actor that had already exited), a warning that token authentication
is on, INFO lines for every dataset, and colour codes even into log files. mixloop's own progress
lines travel through the same channel (workers' prints reach the driver), so the channel stays on
and only the known noise is dropped.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections.abc import Callable
from typing import Any

# A custom resource that tuning trials' drivers take, so they never hold the CPUs training workers need.
TRIAL_RESOURCE = "mixloop_trial"

# Lines of Ray's own processes that look like errors but report nothing wrong.
NOISE = (
    "has constructor arguments in the object store and max_restarts > 0",  # every Train controller
    "Failed to kill actor",  # the GCS, killing an actor that had already exited
)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Connect to a cluster, or start a private local one bound to 127.0.0.1."""
    # lazy: ray, imported when Ray starts
    import ray
    import ray.data

    # Ray Train's reports wait for the controller's poll; the default 2 s interval makes them slow.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.3")
    if not sys.stdout.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # no colour codes in files and pipes
    if ray.is_initialized():
        return
    ray.data.DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)  # one INFO line per dataset and stage
    logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)  # "Progress bars disabled": we did
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
    else:
        # Token authentication stays on (Ray's default for a new local cluster); only its notice goes.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        # The dashboard process also serves the state API that Ray Train polls; it listens on loopback only.
        # Ray's own processes (Train's placement-group cleaner) call that API without an address: with
        # another Ray on this machine they would find two and fail, so ours is named in their environment.
        dashboard_port = _free_port()
        os.environ["RAY_API_SERVER_ADDRESS"] = f"http://127.0.0.1:{dashboard_port}"
        ray.init(
            dashboard_host="127.0.0.1",
            dashboard_port=dashboard_port,
            include_dashboard=True,
            num_cpus=num_cpus,
            resources={TRIAL_RESOURCE: 1000},
            logging_level=logging.WARNING,
        )
    _drop_noise_from_worker_lines()


def _drop_noise_from_worker_lines() -> None:
    """Wrap the handler that prints the lines Ray forwards from workers, dropping the known noise.
    Ray has no public filter for them; without the handler (log_to_driver off) nothing is wrapped."""
    from ray._private import worker  # lazy: ray

    dispatcher = worker.global_worker_stdstream_dispatcher
    handler = dict(getattr(dispatcher, "handlers", [])).get("ray_print_logs")
    if handler is None or isinstance(handler, _WithoutNoise):
        return
    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", _WithoutNoise(handler))


class _WithoutNoise:
    """Ray's handler of the lines forwarded from workers, the known noise dropped first."""

    def __init__(self, handler: Callable[[dict[str, Any]], None]):
        self.handler = handler

    def __call__(self, data: dict[str, Any]) -> None:
        lines = [line for line in data.get("lines", []) if not any(noise in line for noise in NOISE)]
        if lines:
            self.handler({**data, "lines": lines})


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
