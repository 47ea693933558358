"""Pipelines as Ray jobs (`mixloop submit`, `mixloop jobs ...`): a JobClient for one Ray job server.

The spec travels in the job's runtime environment (its portable form, every path absolute, as
pipeline.yaml in the working_dir); the cluster runs `mixloop run pipeline.yaml --address auto`, so
its nodes need mixloop installed (the cluster/ configs do that) and the workdir on storage they all
reach (s3://, gs://). One job per pipeline at a time: the submission id is derived from its name.

Ray 2.60 token authentication: the job server answers 401 without a token. Ray's own SDK sends its
token only when this process runs with RAY_AUTH_MODE=token, so mixloop finds the token where Ray's
loader looks (RAY_AUTH_TOKEN, else the file RAY_AUTH_TOKEN_PATH names, else ~/.ray/auth_token) and
sends it itself, as `ray.init` does for a cluster address.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shlex
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import yaml

from mixloop.config import load_spec
from mixloop.config.resolve import path_keys
from mixloop.console import TO_STDERR
from mixloop.errors import MixloopError, SpecError, WorkdirLockedError
from mixloop.storage.fs import exists
from mixloop.storage.layout import Workdir
from mixloop.storage.lock import describe, live_holder
from mixloop.version import __version__

logger = logging.getLogger(__name__)

JOB_PREFIX = "mixloop-"
AGENT_WAIT_S = 60
TOKEN_HELP = (
    "Set RAY_AUTH_TOKEN to the cluster's token (print it on the head with `ray get-auth-token`), "
    "or put it in ~/.ray/auth_token or a file named by RAY_AUTH_TOKEN_PATH; RAY_AUTH_MODE=disabled "
    "only for a cluster started without token authentication."
)


def _with_added_iterations(spec) -> dict | None:
    """The workdir's copy of the spec when iterations were added to it (by a watch job) since the given
    spec was written: it holds every stage of the given spec, and more."""
    copy_path = Workdir(spec.workdir).pipeline_copy
    try:
        copy = load_spec(copy_path) if exists(copy_path) else None
    except SpecError:
        return None
    names = spec.stage_names()
    if copy is None or copy.stage_names()[: len(names)] != names or len(copy.stage_names()) == len(names):
        return None
    logger.warning(
        f"note: {copy_path} holds stages a watch added ({', '.join(copy.stage_names()[len(names) :])}); the job "
        "watches from that copy",
        extra=TO_STDERR,
    )
    return copy.portable()


def submission_id(pipeline_name: str) -> str:
    """The job id of a pipeline: one job per pipeline name on a cluster."""
    return JOB_PREFIX + re.sub(r"[^A-Za-z0-9_.-]", "-", pipeline_name)


def job_address(address: str | None) -> str:
    """The job server's HTTP address: --address, else $RAY_ADDRESS when it is an http(s) address."""
    given = address or os.environ.get("RAY_ADDRESS")
    if not given:
        raise MixloopError(
            "no Ray job server address. Fix: pass --address http://HOST:8265 (the head's "
            "dashboard port; through an SSH tunnel or port-forward for a remote cluster) "
            "or set RAY_ADDRESS to it."
        )
    if not given.startswith(("http://", "https://")):
        source = "--address" if address else "RAY_ADDRESS"
        raise MixloopError(
            f"{source}={given!r} is not the HTTP address of a Ray job server. "
            "Fix: pass --address http://HOST:8265 (the head's dashboard port)."
        )
    return given.rstrip("/")


def auth_token() -> str | None:
    """The token Ray's clients would use, in Ray's order; None when there is none or auth is disabled."""
    mode = os.environ.get("RAY_AUTH_MODE", "").strip().lower()
    if mode == "disabled":
        return None
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token and os.environ.get("RAY_AUTH_TOKEN_PATH"):
        path = Path(os.environ["RAY_AUTH_TOKEN_PATH"]).expanduser()
        token = _first_line(path)
        if not token:
            raise MixloopError(f"RAY_AUTH_TOKEN_PATH={path} cannot be read or is empty. {TOKEN_HELP}")
    if not token:
        token = _first_line(Path.home() / ".ray" / "auth_token")
    if not token and mode == "token":
        raise MixloopError(f"RAY_AUTH_MODE=token but no Ray authentication token was found. {TOKEN_HELP}")
    return token or None


def _first_line(path: Path) -> str:
    """The token in a file, as Ray reads it: its first line, trimmed ('' when unreadable)."""
    try:
        return (path.read_text().splitlines() or [""])[0].strip()
    except OSError:
        return ""


@contextlib.contextmanager
def _ray_errors(address: str, job: str | None = None):
    """Ray's SDK errors for what a user can fix, as one clear MixloopError."""
    # lazy: Ray's job SDK and its HTTP clients, kept out of `mixloop --help`
    import aiohttp
    import requests
    from ray.exceptions import AuthenticationError

    try:
        yield
    except AuthenticationError as exc:
        if "Forbidden" in str(exc) or "invalid" in str(exc).lower():
            problem = "refused the authentication token (it is not this cluster's)"
        else:
            problem = "requires an authentication token, and none was sent (Ray token authentication is on)"
        raise MixloopError(f"the Ray job server at {address} {problem}. {TOKEN_HELP}") from None
    except (ConnectionError, requests.ConnectionError, aiohttp.ClientConnectionError):
        raise MixloopError(
            f"cannot reach a Ray job server at {address}. Fix: check that the cluster is up and "
            "that its dashboard port (8265) is reachable from here (for a remote cluster: "
            "`ray dashboard cluster.yaml`, an SSH tunnel or `kubectl port-forward`)."
        ) from None
    except RuntimeError as exc:
        if job is not None and "status code 404" in str(exc):
            raise MixloopError(f"no job {job!r} on {address}. See `mixloop jobs list --address {address}`.") from None
        raise


@contextlib.contextmanager
def _address_not_overridden():
    # JobSubmissionClient silently prefers $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS to the address it is
    # given; the --address the user typed must win.
    saved = {name: os.environ.pop(name) for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS") if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


class JobClient:
    """mixloop's jobs on one Ray job server: Ray's JobSubmissionClient with the token sent and its
    errors turned into messages a user can act on. `sdk` is Ray's client itself."""

    def __init__(self, address: str | None):
        from ray.job_submission import JobSubmissionClient  # lazy: Ray's job SDK, kept out of `mixloop --help`

        self.address = job_address(address)
        token = auth_token()
        headers = {"Authorization": f"Bearer {token}"} if token else None
        with _ray_errors(self.address), _address_not_overridden():
            self.sdk = JobSubmissionClient(self.address, headers=headers)

    def info(self, job: str):
        """The job's details, or None when the cluster has no job with that id."""
        try:
            with _ray_errors(self.address):
                return self.sdk.get_job_info(job)
        except RuntimeError as exc:
            if "status code 404" in str(exc):
                return None
            raise

    def require(self, job: str):
        info = self.info(job)
        if info is None:
            raise MixloopError(f"no job {job!r} on {self.address}. See `mixloop jobs list --address {self.address}`.")
        return info

    def commands(self, job: str) -> str:
        """How to follow, inspect and stop a job, as commands to copy."""
        return (
            f"  follow: mixloop jobs logs {job} --follow --address {self.address}\n"
            f"  status: mixloop jobs status {job} --address {self.address}\n"
            f"  stop:   mixloop jobs stop {job} --address {self.address}"
        )

    def submit(self, spec_path: str, inbox: str | None = None) -> str:
        """Validate the spec and submit it as a Ray job; its submission id. With `inbox`, the job is
        `mixloop watch` on it; the iterations it adds go into the workdir's copy of the spec, which a
        later submit takes up when it holds every stage of the given spec and more."""
        spec = load_spec(spec_path)
        job = submission_id(spec.config.name)
        earlier = self._make_room(job, spec.config.name, spec.workdir)
        data = (_with_added_iterations(spec) if inbox else None) or spec.portable()
        host = self.address.split("://", 1)[1].split(":")[0].split("/")[0]
        if host not in ("127.0.0.1", "localhost", "::1") and _local_paths(data):
            logger.warning(
                f"note: {', '.join(_local_paths(data))}: local path(s); every node of the cluster must see them "
                "(use s3:// or gs:// for the workdir and corpora of a remote cluster)",
                extra=TO_STDERR,
            )
        spec_source = spec_path if "://" in str(spec_path) else str(Path(spec_path).resolve())
        with tempfile.TemporaryDirectory(prefix="mixloop-submit-") as folder:
            Path(folder, "pipeline.yaml").write_text(yaml.safe_dump(data, sort_keys=False))
            self._submit(
                spec.config.name,
                dict(
                    entrypoint=(
                        f"mixloop watch pipeline.yaml --inbox {shlex.quote(inbox)} --address auto"
                        if inbox
                        else "mixloop run pipeline.yaml --address auto"
                    ),
                    submission_id=job,
                    runtime_env={"working_dir": folder},
                    metadata={
                        "mixloop": __version__,
                        "pipeline": spec.config.name,
                        "spec": spec_source,
                        "workdir": data["workdir"],
                        "log_offset": str(len(earlier)),
                        "log_tail": earlier[-80:],
                    },
                    entrypoint_num_cpus=0,
                ),
            )
        return job

    def _make_room(self, job: str, name: str, workdir: str) -> str:
        """Refuse a pipeline that runs (as a job, or anywhere its workdir is held); remove the record of
        its finished job. The finished job's driver log, which the new run appends to."""
        info = self.info(job)
        if info is not None and not info.status.is_terminal():
            raise MixloopError(
                f"pipeline {name!r} already runs on {self.address} as job {job} ({info.status}). "
                f"Follow it with `mixloop jobs logs {job} --follow --address {self.address}`, or "
                f"stop it first with `mixloop jobs stop {job} --address {self.address}`."
            )
        _refuse_held_workdir(workdir)
        if info is None:
            return ""
        # Ray refuses a submission id it still knows, even for a finished job. The finished job is only
        # a record (status and driver log); its results live in the workdir, and running the pipeline
        # again continues from them (finished stages are skipped). So the record goes and the id is
        # reused, which keeps "one job per pipeline" checkable by id, and a race between two submits
        # of one pipeline is settled by Ray (the second is refused). delete_job keeps the driver log
        # file, and the new run appends to it: its length is kept so `jobs logs` shows this run only.
        with _ray_errors(self.address, job):
            earlier = self.sdk.get_job_logs(job)
            self.sdk.delete_job(job)
        return earlier

    def _submit(self, name: str, request: dict) -> None:
        job, deadline = request["submission_id"], time.time() + AGENT_WAIT_S
        while True:
            try:
                with _ray_errors(self.address):
                    self.sdk.submit_job(**request)
                return
            except RuntimeError as exc:
                if "already exists" in str(exc):  # another submit of the same pipeline won the race
                    raise MixloopError(
                        f"pipeline {name!r} was just submitted to {self.address} as job {job} by "
                        f"someone else. Follow it with `mixloop jobs logs {job} --follow "
                        f"--address {self.address}`."
                    ) from None
                # A head that has just started serves HTTP before its job agent has registered.
                if "No available agent" not in str(exc):
                    raise
                if time.time() > deadline:
                    raise MixloopError(
                        f"the Ray cluster at {self.address} has no job agent ready after "
                        f"{AGENT_WAIT_S} s (has its head just started?). Try again."
                    ) from None
                time.sleep(1)

    def jobs(self) -> list:
        """mixloop's jobs on the cluster, oldest first."""
        with _ray_errors(self.address):
            found = [j for j in self.sdk.list_jobs() if j.submission_id and "mixloop" in (j.metadata or {})]
        return sorted(found, key=lambda j: j.start_time or 0)

    def logs(self, job: str) -> str:
        """This run's part of the job's driver log."""
        info = self.require(job)
        with _ray_errors(self.address, job):
            return _this_run(self.sdk.get_job_logs(job), info)

    def follow(self, job: str) -> None:
        """Stream the job's log (this run's part) until it ends."""
        info = self.require(job)
        offset = int((info.metadata or {}).get("log_offset", 0))

        async def tail():
            held: str | None = ""  # the first `offset` characters, until it is known whether they are an earlier run's
            async for chunk in self.sdk.tail_job_logs(job):
                if offset and held is not None:
                    held += chunk
                    if len(held) < offset:
                        continue
                    chunk, held = _this_run(held, info), None
                sys.stdout.write(chunk)
                sys.stdout.flush()
            if held:
                sys.stdout.write(held)

        try:
            with _ray_errors(self.address, job):
                asyncio.run(tail())
        except RuntimeError as exc:
            raise MixloopError(
                f"lost the log stream of job {job} ({exc}); the job is unaffected: "
                f"run `mixloop jobs logs {job} --follow --address {self.address}` again"
            ) from None

    def stop(self, job: str, timeout_s: float):
        """Stop a job and wait until it has; its final details (None if it had already ended)."""
        if self.require(job).status.is_terminal():
            return None
        with _ray_errors(self.address, job):
            self.sdk.stop_job(job)
        deadline = time.time() + timeout_s
        while not (info := self.require(job)).status.is_terminal() and time.time() < deadline:
            time.sleep(0.5)
        if not info.status.is_terminal():
            raise MixloopError(
                f"{job} is still {info.status} {timeout_s:.0f} s after the stop request. "
                f"See `mixloop jobs status {job} --address {self.address}`."
            )
        return info


def _this_run(logs: str, info) -> str:
    """The part of a driver log written by this run of the job (see `submit`: a reused id's log
    continues the earlier run's file); all of it when it does not start with the earlier run's."""
    offset, tail = int((info.metadata or {}).get("log_offset", 0)), (info.metadata or {}).get("log_tail", "")
    return logs[offset:] if offset and len(logs) >= offset and logs[:offset].endswith(tail) else logs


def _local_paths(data: dict) -> list[str]:
    sections = (data["tokenizer"], data["model"], *data["corpora"].values())
    paths = [data["workdir"]] + [section[key] for section in sections for key in path_keys(section)]
    benchmarks = data.get("benchmarks") or {}  # probe files and task YAMLs are read where versions are scored
    paths += [
        *benchmarks.get("probes", {}).values(),
        *([benchmarks["include_path"]] if benchmarks.get("include_path") else []),
    ]
    return [p for p in paths if "://" not in p]


def _refuse_held_workdir(workdir: str) -> None:
    """A workdir that a live run holds (here or on the cluster, when it is shared storage) would only
    make the job fail once it started: refuse the submission instead."""
    holder = live_holder(workdir)
    if holder is not None:
        raise WorkdirLockedError(
            f"workdir {workdir} is in use by {describe(holder)}. One run per workdir: wait "
            "for it to finish or stop it, then submit again."
        )


def job_time(ms: int | None) -> str:
    return datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S") if ms else "-"
