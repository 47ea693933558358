"""One run per workdir: a lock file, ``<workdir>/.lock``, held while a command works on a workdir.

The file is JSON: ``{"host", "pid", "pid_namespace", "command", "started", "heartbeat",
"heartbeat_every_s", "token"}``, times in seconds since the epoch. A daemon thread rewrites
"heartbeat" every few seconds. A lock whose heartbeat is older than the timeout belongs to a dead
owner and is taken over; so is one whose pid no longer exists on this very machine.

Taking it: a local file is created with O_CREAT|O_EXCL, which the kernel (and NFS) make atomic.
Object stores have no such call everywhere: fsspec's create mode is a conditional PUT on S3
(If-None-Match) but a mere exists-then-write on other backends, so there we pause after writing and
read the lock back: of racing writers, only the last one finds its own token. Taking over a dead
owner's lock is an overwrite, checked the same way. A heartbeat's age is read against this host's
clock, so hosts sharing a workdir need clocks that agree to a few seconds (NTP).
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime

import fsspec

from mixloop.errors import MixloopError, WorkdirLockedError
from mixloop.storage.fs import is_local, makedirs, write_text
from mixloop.storage.layout import Workdir

HEARTBEAT_S = 5.0  # how often a holder rewrites its heartbeat
STALE_AFTER_S = 30.0  # a heartbeat older than this: the holder is dead and its lock is taken over
TIMEOUT_ENV = "MIXLOOP_LOCK_TIMEOUT_S"  # overrides STALE_AFTER_S, read when a lock is taken
SETTLE_S = 0.5  # pause before reading back a lock written without an atomic create

logger = logging.getLogger(__name__)


def lock_path(workdir: str) -> str:
    return Workdir(str(workdir)).lock


def read_lock(workdir: str) -> dict | None:
    """Who holds the workdir: the lock's record, or None when nobody does."""
    return _read(lock_path(workdir))


def live_holder(workdir: str) -> dict | None:
    """The lock's record while its holder may be alive (by the rule `mixloop run` takes a lock over by,
    $MIXLOOP_LOCK_TIMEOUT_S included), or None."""
    holder = read_lock(workdir)
    return holder if holder is not None and gone_reason(holder, _timeout(None)) is None else None


def describe(record: dict, now: float | None = None) -> str:
    """One line on a lock's holder, for errors and status."""
    now = time.time() if now is None else now
    beat = f"last heartbeat {now - record['heartbeat']:.0f} s ago"
    if record.get("unreadable"):
        return f"an unreadable lock ({beat})"
    since = datetime.fromtimestamp(record["started"]).astimezone().isoformat(timespec="seconds")
    return f"'{record['command']}' (pid {record['pid']} on {record['host']}), running since {since}, {beat}"


def gone_reason(record: dict, timeout_s: float = STALE_AFTER_S, now: float | None = None) -> str | None:
    """Why a lock's holder is dead (its lock may be taken over), or None while it may be alive."""
    now = time.time() if now is None else now
    pid = record.get("pid")
    if _same_machine(record) and isinstance(pid, int) and not _pid_alive(pid):
        return f"pid {pid} no longer exists on {record['host']}"
    age, limit = now - record["heartbeat"], _limit(record, timeout_s)
    return f"its last heartbeat is {age:.0f} s old (timeout {limit:g} s)" if age > limit else None


class WorkdirLock:
    """A held workdir lock. ``lost`` turns True when the lock turns out deleted or someone else's
    (then release leaves it alone); ``took_over_from`` is the dead holder's record after a takeover."""

    def __init__(self, workdir: str, command: str, timeout_s: float):
        self.workdir, self.path, self.timeout_s = str(workdir), lock_path(workdir), timeout_s
        self.every_s = min(HEARTBEAT_S, timeout_s / 3)  # a short (test) timeout needs faster beats
        self.lost = False
        self.took_over_from: dict | None = None
        now = time.time()
        self.record = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "pid_namespace": _pid_namespace(),
            "command": command,
            "started": now,
            "heartbeat": now,
            "heartbeat_every_s": self.every_s,
            "token": secrets.token_hex(16),
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def acquire(self) -> None:
        makedirs(self.workdir)
        for _ in range(3):  # a lock released or taken over meanwhile calls for another look
            if self._create():
                return self._start()
            holder = _read(self.path)
            if holder is None:
                continue
            reason = gone_reason(holder, self.timeout_s)
            if reason is None:
                raise self._locked(holder)
            if self._take_over(holder):
                self.took_over_from = holder
                logger.info(f"took over the lock {self.path} from {describe(holder)}: {reason}")
                return self._start()
        holder = _read(self.path)
        raise (
            self._locked(holder)
            if holder
            else WorkdirLockedError(
                f"could not take the lock {self.path}: other processes keep taking and releasing it; try again"
            )
        )

    def release(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join()
        try:
            if self._ours():
                fs, inner = fsspec.core.url_to_fs(self.path)
                fs.rm_file(inner)
            elif not self.lost:
                self.lost = True
                logger.warning(f"left the lock {self.path} alone: it is no longer this process's")
        except Exception as exc:  # noqa: BLE001 -- must not hide the error that ends the run
            logger.warning(
                f"could not remove the lock {self.path} ({exc}); "
                f"it is taken over {self.timeout_s:g} s after its last heartbeat"
            )

    def _create(self) -> bool:
        data = json.dumps(self.record, indent=2).encode()
        fs, inner = fsspec.core.url_to_fs(self.path)
        if is_local(self.path):
            try:
                fd = os.open(inner, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                return False
            # Until this write lands, readers see an empty lock: _read dates it by its mtime.
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            return True
        try:
            fs.pipe_file(inner, data, mode="create")
        except FileExistsError:
            return False
        return self._ours_after_pause()

    def _take_over(self, holder: dict) -> bool:
        # Overwrite only the very lock judged dead (not one taken over or beaten meanwhile). Racing
        # takers all overwrite; reading back after a pause leaves the last writer alone holding it.
        if _read(self.path) != holder:
            return False
        write_text(self.path, json.dumps(self.record, indent=2))
        return self._ours_after_pause()

    def ensure_held(self) -> None:
        """Raise before writing what only the holder may write (a version), when another run has
        taken the lock over (this one's heartbeat stalled past the timeout) or it was deleted."""
        if self.lost or not self._ours():
            self.lost = True
            holder = _read(self.path)
            raise WorkdirLockedError(
                f"this run lost the lock of workdir {self.workdir}"
                + (f" to {describe(holder)}" if holder else " (it was deleted)")
                + f": its heartbeat stalled for more than {self.timeout_s:g} s. It stops before publishing, so "
                "the two runs do not write the same versions. Fix: let the other run finish, then run again."
            )

    def _ours(self) -> bool:
        return (_read(self.path) or {}).get("token") == self.record["token"]

    def _ours_after_pause(self) -> bool:
        time.sleep(SETTLE_S)
        return self._ours()

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._beat, name=f"lock-heartbeat {self.path}", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                current = _read(self.path)
                if (current or {}).get("token") != self.record["token"]:
                    self.lost = True
                    logger.warning(
                        f"lost the lock {self.path}: "
                        + (f"it is now held by {describe(current)}" if current else "it was deleted")
                    )
                    return
                self.record["heartbeat"] = time.time()
                write_text(self.path, json.dumps(self.record, indent=2))
            except Exception as exc:  # noqa: BLE001 -- a storage blip: the next beat tries again
                logger.warning(f"could not refresh the lock {self.path}: {exc}")

    def _locked(self, holder: dict) -> WorkdirLockedError:
        stop = "" if holder.get("unreadable") else f"stop it (kill {holder['pid']} on {holder['host']}), "
        error = WorkdirLockedError(
            f"workdir {self.workdir} is in use by {describe(holder)}. One run per workdir: wait for it to "
            f"finish, {stop}or, if that process is gone, the lock is taken over automatically "
            f"{_limit(holder, self.timeout_s):g} s after its last heartbeat; or delete {self.path}."
        )
        error.holder = holder
        return error


@contextmanager
def workdir_lock(
    workdir: str,
    command: str = "mixloop run",
    timeout_s: float | None = None,
    held: WorkdirLock | None = None,
) -> Iterator[WorkdirLock]:
    """Hold the workdir's lock for the block, or raise WorkdirLockedError naming who holds it.
    timeout_s: when another holder counts as dead (default: $MIXLOOP_LOCK_TIMEOUT_S, else STALE_AFTER_S).
    held: the lock when the caller holds it already (a command inside another): it is used as it is."""
    if held is not None:
        yield held
        return
    lock = WorkdirLock(workdir, command, _timeout(timeout_s))
    lock.acquire()
    try:
        yield lock
    finally:
        lock.release()


def _timeout(timeout_s: float | None) -> float:
    raw = os.environ.get(TIMEOUT_ENV) if timeout_s is None else timeout_s
    if raw in (None, ""):
        return STALE_AFTER_S
    try:
        value = float(raw)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise MixloopError(f"lock timeout {raw!r} ({TIMEOUT_ENV} or timeout_s): expected seconds above 0")
    return value


def _limit(record: dict, timeout_s: float) -> float:
    # A holder that beats slowly is not dead for missing a short timeout: it gets three beats.
    return max(timeout_s, 3 * record.get("heartbeat_every_s", HEARTBEAT_S))


def _read(path: str) -> dict | None:
    fs, inner = fsspec.core.url_to_fs(path)
    try:
        data = fs.cat_file(inner)
    except FileNotFoundError:
        return None
    try:
        record = json.loads(data)
        if isinstance(record, dict) and "token" in record:
            return record
    except ValueError:
        pass
    # Empty (caught between its create and its write) or damaged: it lives by its mtime, so a
    # holder that died before writing is taken over after the timeout.
    try:
        written = fs.modified(inner).timestamp()
    except (OSError, NotImplementedError):
        written = time.time()
    return {"unreadable": True, "heartbeat": written}


def _pid_namespace() -> str | None:
    # Containers may share a host name but not their pids: compare pids only within one namespace.
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _same_machine(record: dict) -> bool:
    return record.get("host") == socket.gethostname() and record.get("pid_namespace") == _pid_namespace()


def _pid_alive(pid: int) -> bool:
    if pid <= 0:  # os.kill(0 or negative) would signal process groups
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True
