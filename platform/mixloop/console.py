"""How mixloop's messages reach people.

The library reports through `logging`: every module that has something to say keeps
`logger = logging.getLogger(__name__)` (under "mixloop") and logs the whole line its reader sees,
progress at INFO and warnings at WARNING (their "warning: " prefix stays in the text). The library
installs no handler. From Python the messages show once the caller configures logging
(`logging.basicConfig(level=logging.INFO)`, or a handler on "mixloop"); without that, only warnings
reach stderr (logging's last resort).

The command line installs `cli_output` for the whole command: each message alone on stdout, as the
lines were printed before the library logged them. Ray's worker processes print instead (train.loop):
Ray forwards their stdout to the driver, and a worker has none of the driver's handlers.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator
from contextlib import contextmanager

LOGGER = "mixloop"
TO_STDERR = {"stderr": True}
"""`extra=` of a record the command line writes to stderr, not stdout: a note beside a command's own output."""


class LineHandler(logging.Handler):
    """Each record's message alone as a line on stdout (on stderr with TO_STDERR). The stream is looked
    up at every record, so one replaced meanwhile (a redirect, pytest's capsys) is the one written to."""

    def __init__(self, level: int = logging.INFO):
        super().__init__(level)
        self.setFormatter(logging.Formatter("%(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            stream = sys.stderr if getattr(record, "stderr", False) else sys.stdout
            stream.write(self.format(record) + "\n")
            stream.flush()
        except Exception:  # noqa: BLE001 -- logging's own policy: report it, never raise into the caller
            self.handleError(record)


@contextmanager
def cli_output(level: int = logging.INFO) -> Iterator[LineHandler]:
    """For the block, the "mixloop" loggers' messages at `level` and above as lines (LineHandler), and
    only there: not also to handlers the root logger may have, so each line shows once. Undone after."""
    logger = logging.getLogger(LOGGER)
    handler = LineHandler(level)
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]


@contextmanager
def quiet(*kept: str) -> Iterator[None]:
    """No mixloop message for the block (warnings included) but those of the loggers named in `kept`,
    at INFO: a benchmark shows its numbers, not the pipelines it runs. Also a decorator."""
    loggers = [logging.getLogger(LOGGER), *map(logging.getLogger, kept)]
    saved = [logger.level for logger in loggers]
    for logger, level in zip(loggers, [logging.CRITICAL + 1] + [logging.INFO] * len(kept)):
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, level in zip(loggers, saved):
            logger.setLevel(level)
