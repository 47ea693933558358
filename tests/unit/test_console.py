"""The library's messages go through `logging` (console.py): the command line shows each as the line it
is, on stdout; from Python they are LogRecords on "mixloop.*" loggers, printed by nobody unless the
caller configures logging."""

from __future__ import annotations

import inspect
import json
import logging
import time

import pytest

import mixloop
from mixloop.cli import main
from mixloop.console import TO_STDERR, cli_output
from mixloop.errors import StageConflictError
from mixloop.versioning.registry import write_lineage
from support import generated_spec, lineage_of, write_spec


def dead_holders_lock(workdir) -> str:
    """A lock left by a run on another host whose heartbeat stopped long ago: the next command takes it
    over and says so (a message of the library's lock module, not of the command)."""
    workdir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    record = {"host": "other-host.example", "pid": 4242, "pid_namespace": None, "command": "mixloop run"}
    record |= {"started": now - 3600, "heartbeat": now - 600, "heartbeat_every_s": 5.0, "token": "f" * 32}
    (workdir / ".lock").write_text(json.dumps(record))
    return f"took over the lock {workdir / '.lock'} from 'mixloop run' (pid 4242 on other-host.example)"


def test_the_cli_prints_the_librarys_messages_on_stdout_as_they_are(tmp_path, capsys):
    workdir = tmp_path / "run"
    write_lineage(str(workdir), lineage_of("v1"))
    took_over = dead_holders_lock(workdir)
    assert main(["models", "promote", str(workdir), "v1"]) == 0
    out, err = capsys.readouterr()
    lines = out.splitlines()
    assert len(lines) == 2 and lines[0].startswith(took_over) and "its last heartbeat is 600 s old" in lines[0]
    assert lines[1] == f"v1 is now the current version of {workdir}"  # the command's own line, after
    assert err == ""


def test_the_cli_handler_routes_notes_to_stderr_and_is_gone_after_the_command(capsys):
    logger = logging.getLogger("mixloop")
    before = logger.level, logger.propagate, list(logger.handlers)
    with cli_output():
        logging.getLogger("mixloop.runs.jobs").warning("note: beside the output", extra=TO_STDERR)
        logging.getLogger("mixloop.runs.pipeline").info("report: page")
        logging.getLogger("mixloop.runs.pipeline").debug("not shown")
    assert capsys.readouterr() == ("report: page\n", "note: beside the output\n")
    assert (logger.level, logger.propagate, logger.handlers) == before


def test_from_python_messages_are_log_records_and_nothing_is_printed(tmp_path, caplog, capsys):
    for function in (mixloop.run, mixloop.evaluate, mixloop.preview):
        assert "log" not in inspect.signature(function).parameters
    workdir = tmp_path / "run"
    spec = mixloop.load(
        str(write_spec(tmp_path, generated_spec(workdir, [{"name": "s1", "mixture": {"facts": 1}, "tokens": 2048}])))
    )
    write_lineage(str(workdir), lineage_of("base", stage_hash="b"))
    write_lineage(str(workdir), lineage_of("s1", "base", ["facts"], stage_hash="edited since"))
    took_over = dead_holders_lock(workdir)
    caplog.set_level(logging.INFO, logger="mixloop")
    with pytest.raises(StageConflictError):  # after the lock is taken, before anything starts Ray
        mixloop.run(spec)
    [record] = [r for r in caplog.records if r.name.startswith("mixloop")]
    assert record.name == "mixloop.storage.lock" and record.levelno == logging.INFO
    assert record.getMessage().startswith(took_over)
    assert capsys.readouterr() == ("", "")
