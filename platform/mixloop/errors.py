"""User-facing errors.

Ray re-raises a worker's exception in the driver after pickling it, so every
error here keeps its message in ``args`` (the default ``__reduce__`` then
rebuilds it). The CLI prints these without a traceback; anything else is a bug
and keeps its traceback.
"""


class MixloopError(Exception):
    """A mistake the user can fix: bad spec, bad data, missing files."""

    exit_code = 1


class SpecError(MixloopError):
    """The pipeline spec is invalid; the message lists every problem."""

    exit_code = 2


class DataError(MixloopError):
    """A corpus cannot be used as it is (no files, too many bad records...)."""


class StageConflictError(MixloopError):
    """A finished stage was edited after it produced its version."""


class CorruptVersionError(MixloopError):
    """A published version's files no longer match the hashes in its lineage."""

    exit_code = 4


class WorkdirLockedError(MixloopError):
    """Another live process holds the workdir's lock (one run per workdir); the message names it
    (host, pid, command, since when, last heartbeat) and says how to proceed."""

    exit_code = 3
    holder: dict[str, object] | None = None
    """The holder's lock record, when the lock was read (storage.lock)."""


class StorageError(MixloopError):
    """A file or folder cannot be read or written: permissions, a read-only or full disk, credentials."""

    exit_code = 5
