"""The mixloop command line: parse, validate, call the library. User mistakes (and storage that
cannot be read or written) print one clear message and exit with a documented code; anything else is
a bug and keeps its traceback."""

from __future__ import annotations

import argparse
import errno
import io
import json
import sys
from pathlib import Path

from mixloop import __version__, api, jobs
from mixloop.errors import MixloopError, StorageError


def _workdir(target: str) -> str:
    """A workdir given directly (a path or URI), or the one a spec file names."""
    from mixloop.spec import load_spec

    if target.endswith((".yaml", ".yml")) or Path(target).is_file():
        return load_spec(target, files=False).workdir  # only its workdir is needed: no file checks
    if "://" in target:
        return target
    if not Path(target).is_dir():
        raise MixloopError(f"{target}: neither a pipeline spec nor a run directory")
    return str(Path(target).resolve())


def _spec(target: str, files: bool = True):
    """A pipeline spec file, or the copy a run directory keeps of the spec it last ran."""
    from mixloop.spec import load_spec
    from mixloop.storage import join

    is_spec = Path(target).is_file() or target.endswith((".yaml", ".yml"))
    return load_spec(target if is_spec else join(_workdir(target), "pipeline.yaml"), files=files)


def cmd_validate(args) -> int:
    from mixloop.errors import SpecError
    from mixloop.stages import edited_stages
    from mixloop.spec import format_problems, load_spec

    spec = load_spec(args.spec, args.overrides)
    edited = edited_stages(spec)  # against the versions its workdir already holds
    if edited:
        raise SpecError(format_problems(args.spec, edited))
    print(f"{args.spec}: valid pipeline {spec.pipeline.name!r} with stages {', '.join(spec.stage_names())}")
    return 0


def cmd_run(args) -> int:
    api.run(api.load(args.spec, args.overrides), args.address)
    return 0


def cmd_status(args) -> int:
    from mixloop.status import status_lines

    print("\n".join(status_lines(_spec(args.target, files=False))))
    return 0


def cmd_models_list(args) -> int:
    versions = api.versions(_workdir(args.target))
    if not versions:
        print("no versions yet")
        return 0
    # Trained tokens are the documents' own; the budget counts every slot of its steps, padding included.
    print(f"{'version':<20} {'parent':<20} {'trained tokens':>15} {'budget (slots)':>15}  finished")
    for lineage in versions:
        trained = sum((lineage.get("tokens_per_corpus") or {}).values())
        stage, steps = lineage.get("stage") or {}, (lineage.get("metrics") or {}).get("steps", 0)
        budget = steps * stage.get("global_batch_tokens", 0)
        print(f"{lineage['version']:<20} {lineage['parent'] or '-':<20} {trained:>15,.0f} {budget:>15,}  "
              f"{lineage['finished']}")
    return 0


def cmd_models_show(args) -> int:
    from mixloop.registry import read_lineage

    lineage = read_lineage(_workdir(args.target), args.version)
    if lineage is None:
        raise MixloopError(f"no version {args.version!r} in {args.target}. See `mixloop models list {args.target}`.")
    print(json.dumps(lineage, indent=2))
    return 0


def cmd_models_diff(args) -> int:
    from mixloop.registry import diff_lineages, read_lineage
    from mixloop.storage import join, read_json

    workdir = _workdir(args.target)
    lineages = [read_lineage(workdir, v) for v in (args.a, args.b)]
    for version, lineage in zip((args.a, args.b), lineages):
        if lineage is None:
            raise MixloopError(f"no version {version!r} in {args.target}. See `mixloop models list {args.target}`.")
    differences = diff_lineages(*lineages)
    matrix = read_json(join(workdir, "eval", "matrix.json")) or {}
    losses = [matrix.get(v) or {} for v in (args.a, args.b)]
    corpora = sorted(set(losses[0]) | set(losses[1]))
    width = max([len(key) for key, _, _ in differences] + [len(c) for c in corpora] + [16])
    print(f"{'eval loss':<{width}}  {args.a:>20}  {args.b:>20}  {'change':>9}")
    for corpus in corpora:
        a, b = ((row.get(corpus) or {}).get("loss") for row in losses)
        change = f"{b - a:+9.4f}" if a is not None and b is not None else f"{'-':>9}"
        print(f"{corpus:<{width}}  {_cell(a):>20}  {_cell(b):>20}  {change}")
    if not corpora:
        print("(no eval results yet: run `mixloop report` first)")
    print(f"\n{'setting':<{width}}  {args.a:>20}  {args.b:>20}")
    for key, left, right in differences:
        print(f"{key:<{width}}  {_cell(left):>20}  {_cell(right):>20}")
    return 0


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def cmd_models_export(args) -> int:
    from mixloop.export import export

    out = export(_workdir(args.target), args.version, args.dir, args.dtype, args.max_shard_size)
    print(f"exported {args.version} to {out} in {args.dtype}, with lineage.json and a model card README.md "
          "(load it with AutoModelForCausalLM.from_pretrained)")
    return 0


def cmd_chat(args) -> int:
    from mixloop.chat import chat
    from mixloop.registry import verified_version

    chat(verified_version(_workdir(args.target), args.version), max_new_tokens=args.max_new_tokens)
    return 0


def _shared_data(folder: str) -> Path:
    data = Path(folder)
    if not (data / "tokenizer" / "tokenizer.json").exists():
        raise MixloopError(f"{data}: not the shared data folder (tokenizer/, pretrain/, sft/, domain/, eval/). Fix: pass --data.")
    return data


def cmd_bench_continual(args) -> int:
    from mixloop.bench.continual import continual, format_continual

    result = continual(_shared_data(args.data), Path(args.workdir).resolve(), args.address)
    print(json.dumps(result, indent=2))
    print(format_continual(result))
    return 0


def cmd_bench_train(args) -> int:
    from mixloop.bench.train import format_train, train_benchmark

    result = train_benchmark(_shared_data(args.data), Path(args.workdir).resolve(), args.preset, args.steps,
                             args.seq_len, args.address)
    print(json.dumps(result, indent=2))
    print(format_train(result))
    return 0


def cmd_bench_data(args) -> int:
    from mixloop.bench.data import data_benchmark, format_data

    result = data_benchmark(_shared_data(args.data), Path(args.workdir).resolve(), args.replicas)
    print(json.dumps(result, indent=2))
    print(format_data(result))
    return 0


def cmd_report(args) -> int:
    api.evaluate(_spec(args.target), args.address)
    return 0


def cmd_data_preview(args) -> int:
    rows = api.preview(api.load(args.spec), args.stage, args.address)
    print(f"{'stage':<16}{'corpus':<18}{'documents':>10}{'tokens':>12}{'rows':>9}{'rejected':>9}{'blank':>7}"
          f"{'share':>8}{'passes':>8}  format")
    for r in rows:
        print(f"{r['stage']:<16}{r['corpus']:<18}{r['documents']:>10,}{r['tokens']:>12,}{r['rows']:>9,}"
              f"{r['rejected']:>9,}{r['blank_lines']:>7,}{r['share']:>8.1%}{r['epochs']:>8.2f}  {_shapes(r['formats'])}")
    for warning in (w for r in rows for w in r["warnings"]):
        print(f"warning: {warning}")
    return 0


def _shapes(formats: dict[str, int]) -> str:
    """The shapes records were read in: `sharegpt`, or `messages 60%,alpaca 40%` for a mix."""
    total = sum(formats.values())
    if len(formats) <= 1:
        return next(iter(formats), "-")
    return ",".join(f"{name} {count / total:.0%}" for name, count in sorted(formats.items(), key=lambda kv: -kv[1]))


def cmd_tune(args) -> int:
    from mixloop.tuning.runner import run_search

    run_search(args.search, args.address, apply=args.apply, trial=args.trial)
    return 0


def cmd_submit(args) -> int:
    client = jobs.JobClient(args.address)
    job = client.submit(args.spec)
    print(f"submitted {args.spec} to {client.address} as job {job}\n{client.commands(job)}", flush=True)
    if args.no_wait:
        return 0
    try:
        client.follow(job)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job} keeps running. Stop it with "
              f"`mixloop jobs stop {job} --address {client.address}`.", file=sys.stderr)
        return 130
    info = client.require(job)
    print(f"job {job}: {info.status}" + (f" ({info.message})" if info.message else ""))
    return 0 if str(info.status) == "SUCCEEDED" else 1


def cmd_jobs_list(args) -> int:
    client = jobs.JobClient(args.address)
    found = client.jobs()
    if not found:
        print(f"no mixloop jobs on {client.address}")
        return 0
    width = max(len(j.submission_id) for j in found)
    print(f"{'job':<{width}}  {'status':<9}  {'started':<19}  {'pipeline':<16}  spec")
    for j in found:
        print(f"{j.submission_id:<{width}}  {str(j.status):<9}  {jobs.job_time(j.start_time):<19}  "
              f"{j.metadata.get('pipeline', '-'):<16}  {j.metadata.get('spec', '-')}")
    return 0


def cmd_jobs_status(args) -> int:
    info = jobs.JobClient(args.address).require(args.job)
    print(f"{args.job}: {info.status}")
    if info.message:
        print(info.message)
    print(f"started {jobs.job_time(info.start_time)}, ended {jobs.job_time(info.end_time)}")
    return 0


def cmd_jobs_logs(args) -> int:
    client = jobs.JobClient(args.address)
    if args.follow:
        client.follow(args.job)
    else:
        sys.stdout.write(client.logs(args.job))
    return 0


def cmd_jobs_stop(args) -> int:
    client = jobs.JobClient(args.address)
    info = client.stop(args.job, args.timeout)
    print(f"{args.job} has already ended: {client.require(args.job).status}" if info is None
          else f"{args.job}: {info.status}")
    return 0


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

TARGET_HELP = "pipeline YAML, or its run directory (a path or URI such as s3://bucket/runs/x)"
OVERRIDES_HELP = ("settings over the file's, validated like it and kept in the workdir's pipeline.yaml and in "
                  "lineage, e.g. defaults.lr.peak=0.002 stages[1].tokens=2e5 stages.sft.workers=4")
ADDRESS_HELP = "Ray cluster address, e.g. ray://head:10001 or auto (default: a private local Ray on 127.0.0.1)"


def _command(commands, name: str, summary: str, example: str, func):
    """A subcommand with a one-line summary (shown in the list), and an example under its own --help."""
    parser = commands.add_parser(name, help=summary, description=summary[0].upper() + summary[1:] + ".",
                                 epilog=f"example:\n  {example}", formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.set_defaults(func=func)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixloop", description=DESCRIPTION, epilog=EXIT_CODES,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"mixloop {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of every error, not just a message")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = _command(commands, "run", "run or continue a pipeline: train the missing stages, evaluate, report",
                   "mixloop run jobs/quickstart.yaml defaults.workers=1", cmd_run)
    run.add_argument("spec", help="pipeline YAML")
    run.add_argument("overrides", nargs="*", metavar="KEY.PATH=VALUE", help=OVERRIDES_HELP)
    run.add_argument("--address", help=ADDRESS_HELP)

    tune = _command(commands, "tune", "search a stage's mix and LR re-warm with Ray Tune + Optuna (resumes)",
                    "mixloop tune tuning/quickstart.yaml --apply", cmd_tune)
    tune.add_argument("search", help="search YAML (see tuning/README.md)")
    tune.add_argument("--address", help=ADDRESS_HELP)
    tune.add_argument("--apply", action="store_true", help="append the best trial's stage to the pipeline spec")
    tune.add_argument("--trial", help="with several objectives, or to overrule the best: the trial whose stage to write")

    status = _command(commands, "status", "where a pipeline stands: versions done, what runs now, what is left",
                      "mixloop status jobs/quickstart.yaml", cmd_status)
    status.add_argument("target", help=TARGET_HELP)

    validate = _command(commands, "validate", "check a pipeline spec and its files; every problem at once",
                        "mixloop validate jobs/quickstart.yaml", cmd_validate)
    validate.add_argument("spec", help="pipeline YAML")
    validate.add_argument("overrides", nargs="*", metavar="KEY.PATH=VALUE", help=OVERRIDES_HELP)

    _add_model_commands(commands)

    chat = _command(commands, "chat", "talk to a version through its chat template (tokens stream; empty line ends)",
                    "mixloop chat jobs/quickstart.yaml sft", cmd_chat)
    chat.add_argument("target", help=TARGET_HELP)
    chat.add_argument("version", help="version name")
    chat.add_argument("--max-new-tokens", type=int, default=256, help="longest answer, in tokens (default 256)")

    data = commands.add_parser("data", help="look at the data before training",
                               description="Look at the data before training.")
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    preview = _command(data_commands, "preview", "per corpus: documents, tokens, rows, rejects, blank lines, shares, passes",
                       "mixloop data preview jobs/quickstart.yaml --stage sft", cmd_data_preview)
    preview.add_argument("spec", help="pipeline YAML")
    preview.add_argument("--stage", help="only this stage")
    preview.add_argument("--address", help=ADDRESS_HELP)

    for name, text in (("eval", "evaluate every version on every eval split (only what is missing) and print the table"),
                       ("report", "evaluate what is missing and write report/index.html")):
        command = _command(commands, name, text, f"mixloop {name} jobs/quickstart.yaml", cmd_report)
        command.add_argument("target", help=TARGET_HELP)
        command.add_argument("--address", help=ADDRESS_HELP)
    _add_bench_commands(commands)
    _add_job_commands(commands)
    return parser


def _add_job_commands(commands) -> None:
    address_help = "the Ray job server, http://HOST:8265 (default: $RAY_ADDRESS if it is an http address)"
    job_help = "submission id: mixloop-<pipeline name> (see `mixloop jobs list`)"
    submit = _command(commands, "submit", "run a pipeline as a Ray job on a cluster (one job per pipeline name)",
                      "mixloop submit jobs/quickstart.yaml --address http://127.0.0.1:8265", cmd_submit)
    submit.add_argument("spec", help="pipeline YAML")
    submit.add_argument("--address", help=address_help)
    submit.add_argument("--no-wait", action="store_true", help="return once submitted instead of following the logs")

    group = commands.add_parser("jobs", help="pipelines submitted as Ray jobs: list, status, logs, stop",
                                description="Pipelines submitted as Ray jobs: list, status, logs, stop.")
    job_commands = group.add_subparsers(dest="jobs_command", required=True, metavar="COMMAND")
    listing = _command(job_commands, "list", "mixloop's jobs on the cluster, oldest first",
                       "mixloop jobs list --address http://127.0.0.1:8265", cmd_jobs_list)
    status = _command(job_commands, "status", "a job's status and message",
                      "mixloop jobs status mixloop-quickstart", cmd_jobs_status)
    logs = _command(job_commands, "logs", "a job's driver log", "mixloop jobs logs mixloop-quickstart --follow",
                    cmd_jobs_logs)
    logs.add_argument("--follow", "-f", action="store_true", help="stream the log until the job ends")
    stop = _command(job_commands, "stop", "stop a job and wait until it has stopped",
                    "mixloop jobs stop mixloop-quickstart", cmd_jobs_stop)
    stop.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the job to stop (default 60)")
    for command in (status, logs, stop):
        command.add_argument("job", help=job_help)
    for command in (listing, status, logs, stop):
        command.add_argument("--address", help=address_help)


def _add_model_commands(commands) -> None:
    models = commands.add_parser("models", help="list, inspect, compare and export versions",
                                 description="List, inspect, compare and export versions.")
    models_commands = models.add_subparsers(dest="models_command", required=True, metavar="COMMAND")
    listing = _command(models_commands, "list", "the versions of a run, oldest first",
                       "mixloop models list jobs/quickstart.yaml", cmd_models_list)
    listing.add_argument("target", help=TARGET_HELP)
    show = _command(models_commands, "show", "a version's lineage: parent, stage settings, data, metrics",
                    "mixloop models show jobs/quickstart.yaml sft", cmd_models_show)
    show.add_argument("target", help=TARGET_HELP)
    show.add_argument("version", help="version name (a stage name, or base)")
    diff = _command(models_commands, "diff", "what changed between two versions: data mix, schedule, metrics",
                    "mixloop models diff jobs/quickstart.yaml sft astronomy", cmd_models_diff)
    diff.add_argument("target", help=TARGET_HELP)
    diff.add_argument("a", metavar="A", help="the first version")
    diff.add_argument("b", metavar="B", help="the version to compare with A")
    export = _command(models_commands, "export", "a version (checked against its hashes) as a Hugging Face folder "
                      "with lineage and a model card", "mixloop models export jobs/quickstart.yaml sft ./sft-hf --dtype bf16",
                      cmd_models_export)
    export.add_argument("target", help=TARGET_HELP)
    export.add_argument("version", help="version name")
    export.add_argument("dir", metavar="DIR", help="an empty or new local folder to write to")
    export.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default="fp32",
                        help="weights' dtype (default fp32, as versions are kept)")
    export.add_argument("--max-shard-size", help="split the weights into files of at most this size, e.g. 2GB")


def _add_bench_commands(commands) -> None:
    bench = commands.add_parser("bench", help="benchmarks on the real corpora (JSON and a table)",
                                description="Benchmarks on the real corpora (JSON and a table).")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True, metavar="COMMAND")
    shared = str(Path(__file__).resolve().parents[3] / "shared" / "data")
    data_help = "the folder of real corpora: tokenizer/, pretrain/, sft/, domain/, eval/ (default: ../shared/data)"
    continual = _command(bench_commands, "continual",
                         "absorb a new domain three ways (scratch, new data only, replay + re-warm)",
                         "mixloop bench continual --data ../shared/data", cmd_bench_continual)
    data = _command(bench_commands, "data",
                    "preparation tokens/s per core, mixed-loader rows/s against training, peak memory at 1x and 10x",
                    "mixloop bench data --replicas 10", cmd_bench_data)
    data.add_argument("--replicas", type=int, default=10, help="how many times the corpus grows for the memory test")
    train = _command(bench_commands, "train",
                     "useful tokens/s packed vs padded, step time split, Ray's per-step overhead, MFU on GPU",
                     "mixloop bench train --preset tiny --steps 30 --seq-len 512", cmd_bench_train)
    train.add_argument("--preset", default="tiny", help="model preset (default tiny; minimind-3 on a GPU)")
    train.add_argument("--steps", type=int, default=30, help="optimizer steps per variant (default 30)")
    train.add_argument("--seq-len", type=int, default=512, help="tokens per row (default 512)")
    for name, command in (("continual", continual), ("data", data), ("train", train)):
        command.add_argument("--data", default=shared, help=data_help)
        command.add_argument("--workdir", default=f"runs/bench-{name}", help="where the benchmark writes its runs")
        if name != "data":
            command.add_argument("--address", help=ADDRESS_HELP)


def main(argv: list[str] | None = None) -> int:
    # Runs last hours and their output goes to files (Ray Jobs' logs, nohup, tee): every line at once.
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)
    args = build_parser().parse_args(argv)
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
        return StorageError(f"{exc}. Fix: set AWS credentials (AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
                            "or a profile) for the s3:// paths of the spec.")
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
