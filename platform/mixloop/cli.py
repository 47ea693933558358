"""The mixloop command line: parse, validate, call the library. User mistakes (and storage that
cannot be read or written) print one clear message and exit with a documented code; anything else is
a bug and keeps its traceback."""

from __future__ import annotations

import argparse
import errno
import io
import sys

from mixloop import subcommands
from mixloop.console import cli_output
from mixloop.errors import MixloopError, StorageError
from mixloop.version import __version__

DESCRIPTION = """mixloop keeps small decoder LLMs current as data arrives: pretrain, fine-tune, then keep going.
One YAML file describes the model's life; `mixloop run` trains what is missing and reports what each
version gained and forgot."""

EXIT_CODES = """exit codes:
  0  done
  1  a problem you can fix: bad data, an edited finished stage, a missing version (the message says how)
  2  the spec is invalid (every problem is listed with its YAML path and a fix)
  3  another run holds the workdir's lock
  4  a version's files are corrupt (they no longer match the hashes in its lineage)
  5  a file or folder cannot be read or written (permissions, read-only or full disk, storage credentials)
  130 interrupted: run the same command again to continue
Use --debug to see the traceback of any error."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mixloop", description=DESCRIPTION, epilog=EXIT_CODES, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"mixloop {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of every error, not just a message")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (
        subcommands.add_run_commands,
        subcommands.add_iteration_commands,
        subcommands.add_spec_commands,
        subcommands.add_model_commands,
        subcommands.add_evaluation_commands,
        subcommands.add_bench_commands,
        subcommands.add_job_commands,
    ):
        add(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Runs last hours and their output goes to files (Ray Jobs' logs, nohup, tee): every line at once.
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)
    args = build_parser().parse_args(argv)
    # The library logs its progress and warnings; a command shows them as lines on stdout (console.py).
    with cli_output():
        try:
            return args.func(args)
        except KeyboardInterrupt:
            print("mixloop: interrupted; run the same command again to continue", file=sys.stderr)
            return 130
        except Exception as exc:
            user_error = as_user_error(exc)
            if user_error is None or args.debug:
                raise
            print(f"mixloop: error: {user_error}", file=sys.stderr)
            return user_error.exit_code


def as_user_error(exc: BaseException) -> MixloopError | None:
    """The user-facing form of an error the user can fix; None for a bug (which keeps its traceback)."""
    if isinstance(exc, MixloopError):
        return exc
    if isinstance(exc, OSError) and exc.errno in STORAGE_FIXES:
        where = exc.filename or "a file"
        return StorageError(f"{where}: {exc.strerror or exc}. Fix: {STORAGE_FIXES[exc.errno]}.")
    if type(exc).__name__ in ("NoCredentialsError", "PartialCredentialsError"):  # botocore, for s3://
        return StorageError(
            f"{exc}. Fix: set AWS credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "or a profile) for the s3:// paths of the spec."
        )
    return None


STORAGE_FIXES = {
    errno.EACCES: "give your user write access to it, or choose a workdir you can write to",
    errno.EPERM: "give your user access to it, or choose another path",
    errno.EROFS: "the filesystem is read-only: choose a workdir on a writable disk",
    errno.ENOSPC: "the disk is full: free space, or choose a workdir on a larger disk",
    errno.EDQUOT: "your disk quota is used up: free space, or choose another disk",
    errno.ENOENT: "check the path",
}


if __name__ == "__main__":
    sys.exit(main())
