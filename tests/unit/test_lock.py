"""One run per workdir: the workdir lock refuses a second run, names its holder, survives a killed
holder (taken over), keeps its heartbeat fresh, and never deletes a lock that is someone else's."""

from __future__ import annotations

import json
import logging
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import uuid

import fsspec
import pytest

from mixloop.errors import WorkdirLockedError
from mixloop.storage import lock as lockmod
from mixloop.storage.lock import read_lock, workdir_lock

LOCK_NAME = ".lock"  # where a user finds a workdir's lock


@pytest.fixture(autouse=True)
def quick_settle(monkeypatch):
    monkeypatch.setattr(lockmod, "SETTLE_S", 0.05)
    monkeypatch.delenv("MIXLOOP_LOCK_TIMEOUT_S", raising=False)


def eventually(condition, timeout_s: float = 5.0) -> bool:
    """Poll: timing assertions must hold on a loaded machine too."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def foreign_lock(heartbeat_age_s: float, host: str = "other-host.example", pid: int = 4242) -> dict:
    now = time.time()
    return {
        "host": host,
        "pid": pid,
        "pid_namespace": None,
        "command": "mixloop tune lr-search",
        "started": now - 3600,
        "heartbeat": now - heartbeat_age_s,
        "heartbeat_every_s": 0.2,
        "token": "f" * 32,
    }


def test_acquire_records_the_holder_and_release_removes_the_lock(tmp_path):
    workdir = tmp_path / "run"  # not created yet: taking the lock creates it
    with workdir_lock(str(workdir), command="mixloop run") as lock:
        record = json.loads((workdir / LOCK_NAME).read_text())
        assert record["host"] == socket.gethostname() and record["pid"] == os.getpid()
        assert record["command"] == "mixloop run" and record["token"] == lock.record["token"]
        assert read_lock(str(workdir)) == record
    assert not (workdir / LOCK_NAME).exists()
    assert read_lock(str(workdir)) is None
    with workdir_lock(str(workdir)):  # free again
        pass


def test_a_second_run_is_refused_with_who_holds_it_and_how_to_proceed(tmp_path):
    with workdir_lock(str(tmp_path), command="mixloop tune lr"):
        with pytest.raises(WorkdirLockedError) as refused:
            with workdir_lock(str(tmp_path), command="mixloop run"):
                pytest.fail("a second holder entered the block")
        message = str(refused.value)
        assert socket.gethostname() in message and f"pid {os.getpid()}" in message
        assert "'mixloop tune lr'" in message and "running since" in message
        assert f"kill {os.getpid()} on {socket.gethostname()}" in message
        assert "30 s after its last heartbeat" in message
        assert str(tmp_path / LOCK_NAME) in message
        assert refused.value.exit_code == 3
        assert str(pickle.loads(pickle.dumps(refused.value))) == message  # crosses Ray intact
        assert (tmp_path / LOCK_NAME).exists(), "the refused run must not touch the holder's lock"
    assert not (tmp_path / LOCK_NAME).exists()


HOLDER = """
import sys, time
from mixloop.storage.lock import workdir_lock
with workdir_lock(sys.argv[1], command="mixloop run"):
    print("held", flush=True)
    time.sleep(60)
"""


def test_a_lock_of_a_killed_process_on_this_host_is_taken_over_at_once(tmp_path, caplog):
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(WorkdirLockedError, match=f"pid {holder.pid} "):
            with workdir_lock(str(tmp_path)):
                pass
    finally:
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait()
    caplog.set_level(logging.INFO, logger="mixloop")
    started = time.monotonic()
    with workdir_lock(str(tmp_path), command="mixloop run") as lock:
        assert time.monotonic() - started < 5, "a dead pid on this host needs no timeout"
        assert lock.took_over_from["pid"] == holder.pid
        assert read_lock(str(tmp_path))["pid"] == os.getpid()
    notes = caplog.messages
    assert len(notes) == 1 and f"pid {holder.pid}" in notes[0] and "no longer exists" in notes[0]
    assert not (tmp_path / LOCK_NAME).exists()


def test_another_hosts_lock_is_taken_over_only_after_its_heartbeat_times_out(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("MIXLOOP_LOCK_TIMEOUT_S", "2")
    path = tmp_path / LOCK_NAME
    path.write_text(json.dumps(foreign_lock(heartbeat_age_s=0.5)))
    with pytest.raises(WorkdirLockedError) as refused:
        with workdir_lock(str(tmp_path)):
            pass
    assert "pid 4242 on other-host.example" in str(refused.value)
    assert "'mixloop tune lr-search'" in str(refused.value)
    assert "2 s after its last heartbeat" in str(refused.value)  # the timeout from the environment
    assert json.loads(path.read_text())["token"] == "f" * 32

    path.write_text(json.dumps(foreign_lock(heartbeat_age_s=10)))
    caplog.set_level(logging.INFO, logger="mixloop")
    with workdir_lock(str(tmp_path)) as lock:
        assert lock.took_over_from["host"] == "other-host.example"
        assert json.loads(path.read_text())["pid"] == os.getpid()
    assert "other-host.example" in caplog.messages[0] and "10 s old" in caplog.messages[0]


def test_of_two_racing_takers_only_the_last_writer_holds_the_lock(tmp_path, monkeypatch):
    path = tmp_path / LOCK_NAME
    path.write_text(json.dumps(foreign_lock(heartbeat_age_s=10)))
    racer = foreign_lock(heartbeat_age_s=0, host="racer.example", pid=777) | {"token": "r" * 32}
    real_sleep = time.sleep

    def racer_writes_during_our_pause(seconds):  # the racer also judged the old lock dead
        path.write_text(json.dumps(racer))
        real_sleep(seconds)

    monkeypatch.setattr(lockmod.time, "sleep", racer_writes_during_our_pause)
    with pytest.raises(WorkdirLockedError, match="pid 777 on racer.example"):
        with workdir_lock(str(tmp_path), timeout_s=1):
            pass
    assert json.loads(path.read_text())["token"] == "r" * 32


def test_a_slow_beating_holder_is_not_declared_dead_by_a_short_timeout(tmp_path):
    record = foreign_lock(heartbeat_age_s=4) | {"heartbeat_every_s": 5.0}  # beats every 5 s: alive
    (tmp_path / LOCK_NAME).write_text(json.dumps(record))
    with pytest.raises(WorkdirLockedError, match="15 s after its last heartbeat"):
        with workdir_lock(str(tmp_path), timeout_s=1):
            pass


def test_the_heartbeat_keeps_the_lock_fresh(tmp_path):
    with workdir_lock(str(tmp_path), timeout_s=0.6) as lock:  # beats every 0.2 s
        first = read_lock(str(tmp_path))["heartbeat"]
        assert eventually(lambda: read_lock(str(tmp_path))["heartbeat"] > first + 0.3)
        later = read_lock(str(tmp_path))
        assert later["started"] == lock.record["started"] and later["token"] == lock.record["token"]
        # Another process judging with the same timeout finds the holder alive.
        assert lockmod.gone_reason(later, timeout_s=0.6) is None
        assert not lock.lost


def test_release_leaves_alone_a_lock_someone_else_took_over(tmp_path, caplog):
    path = tmp_path / LOCK_NAME
    caplog.set_level(logging.INFO, logger="mixloop")
    with workdir_lock(str(tmp_path), timeout_s=0.6) as lock:
        path.write_text(json.dumps(foreign_lock(heartbeat_age_s=0)))  # e.g. after this process hung
        assert eventually(lambda: lock.lost), "the heartbeat notices the lock is someone else's"
        assert eventually(lambda: any("other-host.example" in note for note in caplog.messages))
    assert json.loads(path.read_text())["token"] == "f" * 32


def test_release_checks_the_token_even_before_a_heartbeat_notices(tmp_path):
    path = tmp_path / LOCK_NAME
    with workdir_lock(str(tmp_path)) as lock:
        path.write_text(json.dumps(foreign_lock(heartbeat_age_s=0)))
    assert lock.lost and json.loads(path.read_text())["token"] == "f" * 32


def test_a_run_that_lost_its_lock_stops_before_publishing(tmp_path):
    path = tmp_path / LOCK_NAME
    with workdir_lock(str(tmp_path)) as lock:
        lock.ensure_held()  # still ours: nothing happens
        path.write_text(json.dumps(foreign_lock(heartbeat_age_s=0)))  # another run took it over
        with pytest.raises(WorkdirLockedError) as error:
            lock.ensure_held()
    message = str(error.value)
    assert f"lost the lock of workdir {tmp_path}" in message and "other-host.example" in message
    assert "Fix:" in message and json.loads(path.read_text())["token"] == "f" * 32


def test_an_empty_lock_left_by_a_holder_that_died_before_writing_times_out(tmp_path):
    path = tmp_path / LOCK_NAME
    path.write_text("")
    with pytest.raises(WorkdirLockedError, match="unreadable lock"):
        with workdir_lock(str(tmp_path), timeout_s=1):
            pass
    old = time.time() - 60
    os.utime(path, (old, old))
    with workdir_lock(str(tmp_path), timeout_s=1) as lock:
        assert lock.took_over_from["unreadable"]


def test_a_bad_timeout_in_the_environment_is_a_user_error(tmp_path, monkeypatch):
    monkeypatch.setenv("MIXLOOP_LOCK_TIMEOUT_S", "soon")
    with pytest.raises(lockmod.MixloopError, match="MIXLOOP_LOCK_TIMEOUT_S"):
        with workdir_lock(str(tmp_path)):
            pass
    assert not (tmp_path / LOCK_NAME).exists()


def test_on_object_storage_the_lock_refuses_takes_over_and_releases(caplog):
    workdir = f"memory://runs/{uuid.uuid4().hex}"
    fs = fsspec.filesystem("memory")
    inner = f"/{workdir.removeprefix('memory://')}/{LOCK_NAME}"
    with workdir_lock(workdir, command="mixloop run", timeout_s=0.6) as lock:
        assert json.loads(fs.cat_file(inner))["token"] == lock.record["token"]
        with pytest.raises(WorkdirLockedError, match=f"pid {os.getpid()}"):
            with workdir_lock(workdir):
                pass
        first = read_lock(workdir)["heartbeat"]
        assert eventually(lambda: read_lock(workdir)["heartbeat"] > first), "remote locks beat too"
    assert not fs.exists(inner)

    fs.pipe_file(inner, json.dumps(foreign_lock(heartbeat_age_s=100)).encode())
    caplog.set_level(logging.INFO, logger="mixloop")
    with workdir_lock(workdir, timeout_s=1) as lock:
        assert lock.took_over_from["host"] == "other-host.example"
        assert read_lock(workdir)["token"] == lock.record["token"]
    assert not fs.exists(inner) and "other-host.example" in caplog.messages[0]


def test_a_command_inside_another_uses_the_held_lock_and_leaves_it_held(tmp_path):
    """`mixloop add` under `watch`, a pipeline inside a search: no second acquire, no early release."""
    with workdir_lock(str(tmp_path), "mixloop watch") as outer:
        with workdir_lock(str(tmp_path), "mixloop add", held=outer) as inner:
            assert inner is outer
        assert read_lock(str(tmp_path))["command"] == "mixloop watch", "the inner block released the outer hold"
    assert not (tmp_path / LOCK_NAME).exists()
