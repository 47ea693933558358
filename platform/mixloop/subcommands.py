"""The command line's subcommands: each one's summary (the list under `mixloop --help`), example,
arguments and handler in commands.py, added group by group in the order the list shows them."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from mixloop import commands as handlers
from mixloop.versioning.export import DTYPES

TARGET_HELP = "pipeline YAML, or its run directory (a path or URI such as s3://bucket/runs/x)"
OVERRIDES_HELP = (
    "settings over the file's, validated like it and kept in the workdir's pipeline.yaml and in "
    "lineage, e.g. defaults.lr.peak=0.002 stages[1].tokens=2e5 stages.sft.workers=4"
)
ADDRESS_HELP = "Ray cluster address, e.g. ray://head:10001 or auto (default: a private local Ray on 127.0.0.1)"


def _command(commands, name: str, summary: str, example: str, func):
    """A subcommand with a one-line summary (shown in the list), and an example under its own --help."""
    parser = commands.add_parser(
        name,
        help=summary,
        description=summary[0].upper() + summary[1:] + ".",
        epilog=f"example:\n  {example}",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(func=func)
    return parser


def add_run_commands(commands) -> None:
    """run and tune: train a pipeline's missing stages, or search one stage's settings."""
    run = _command(
        commands,
        "run",
        "run or continue a pipeline: train the missing stages, evaluate, report",
        "mixloop run jobs/quickstart.yaml defaults.workers=1",
        handlers.cmd_run,
    )
    run.add_argument("spec", help="pipeline YAML")
    run.add_argument("overrides", nargs="*", metavar="KEY.PATH=VALUE", help=OVERRIDES_HELP)
    run.add_argument("--address", help=ADDRESS_HELP)

    tune = _command(
        commands,
        "tune",
        "search a stage's mix and LR re-warm with Ray Tune + Optuna (resumes)",
        "mixloop tune tuning/quickstart.yaml --apply",
        handlers.cmd_tune,
    )
    tune.add_argument("search", help="search YAML (see tuning/README.md)")
    tune.add_argument("--address", help=ADDRESS_HELP)
    tune.add_argument("--apply", action="store_true", help="append the best trial's stage to the pipeline spec")
    tune.add_argument(
        "--trial", help="with several objectives, or to overrule the best: the trial whose stage to write"
    )


def add_iteration_commands(commands) -> None:
    """add and watch: a new corpus as an iteration, by hand or from an inbox."""
    add = _command(
        commands,
        "add",
        "add a new corpus as an iteration (continued pretraining with replay, then a "
        "fine-tune) and run it; the gate decides if it becomes current",
        "mixloop add jobs/quickstart.yaml law --text data/law.jsonl --eval data/law-eval.jsonl",
        handlers.cmd_add,
    )
    add.add_argument("spec", help="pipeline spec YAML (the stages are appended to it, comments kept)")
    add.add_argument("name", help="the new corpus's name, which also names its stages (NAME, NAME-sft)")
    add.add_argument("--text", required=True, help="the new text: a path, glob or URI")
    add.add_argument("--chat", help="its chats, for the fine-tune")
    add.add_argument("--eval", help="its held-out text, to measure uptake (and gate on it)")
    add.add_argument("--dry-run", action="store_true", help="print and validate the stages; write and train nothing")
    add.add_argument(
        "--tune",
        type=int,
        default=0,
        metavar="N",
        help="first search the replay share and re-warm in "
        "N trials (Ray Tune + Optuna; needs --eval) and keep the winner",
    )
    add.add_argument("--address", help=ADDRESS_HELP)
    watch = _command(
        commands,
        "watch",
        "wait for corpora in an inbox and add each as an iteration, one at a time",
        "mixloop watch jobs/quickstart.yaml --inbox s3://bucket/inbox",
        handlers.cmd_watch,
    )
    watch.add_argument("spec", help="pipeline spec YAML")
    watch.add_argument(
        "--inbox",
        required=True,
        help="a folder or object-store prefix; each corpus is a folder "
        "with text.jsonl (and chat.*, eval.*) or a manifest.json, ready once _READY is in it",
    )
    watch.add_argument("--poll-s", type=float, default=30.0, help="seconds between looks at the inbox (default 30)")
    watch.add_argument("--once", action="store_true", help="add what is ready now, then stop")
    watch.add_argument("--address", help=ADDRESS_HELP)


def add_spec_commands(commands) -> None:
    """status and validate: where a pipeline stands, and whether its spec holds."""
    status = _command(
        commands,
        "status",
        "where a pipeline stands: versions done, what runs now, what is left",
        "mixloop status jobs/quickstart.yaml",
        handlers.cmd_status,
    )
    status.add_argument("target", help=TARGET_HELP)

    validate = _command(
        commands,
        "validate",
        "check a pipeline spec and its files; every problem at once",
        "mixloop validate jobs/quickstart.yaml",
        handlers.cmd_validate,
    )
    validate.add_argument("spec", help="pipeline YAML")
    validate.add_argument("overrides", nargs="*", metavar="KEY.PATH=VALUE", help=OVERRIDES_HELP)


def add_model_commands(commands) -> None:
    """models: the versions of a run, one subcommand each way of looking at or handling them."""
    models = commands.add_parser(
        "models",
        help="list, inspect, compare and export versions",
        description="List, inspect, compare and export versions.",
    )
    models_commands = models.add_subparsers(dest="models_command", required=True, metavar="COMMAND")
    _add_version_lookups(models_commands)
    _add_version_changes(models_commands)
    _add_export(models_commands)


def _add_version_lookups(commands) -> None:
    """models list, show, diff: what the versions of a run are."""
    listing = _command(
        commands,
        "list",
        "the versions of a run, oldest first",
        "mixloop models list jobs/quickstart.yaml",
        handlers.cmd_models_list,
    )
    listing.add_argument("target", help=TARGET_HELP)
    show = _command(
        commands,
        "show",
        "a version's lineage: parent, stage settings, data, metrics",
        "mixloop models show jobs/quickstart.yaml sft",
        handlers.cmd_models_show,
    )
    show.add_argument("target", help=TARGET_HELP)
    show.add_argument("version", help="version name (a stage name, or base)")
    diff = _command(
        commands,
        "diff",
        "what changed between two versions: data mix, schedule, metrics",
        "mixloop models diff jobs/quickstart.yaml sft astronomy",
        handlers.cmd_models_diff,
    )
    diff.add_argument("target", help=TARGET_HELP)
    diff.add_argument("a", metavar="A", help="the first version")
    diff.add_argument("b", metavar="B", help="the version to compare with A")


def _add_version_changes(commands) -> None:
    """models path, promote, rollback: a version's folder, and which version is current."""
    path = _command(
        commands,
        "path",
        "the folder of a version (checked against its hashes), for tools that load a path",
        "mixloop models path jobs/quickstart.yaml current",
        handlers.cmd_models_path,
    )
    promote = _command(
        commands,
        "promote",
        "make a version current by hand, whatever its gate said",
        "mixloop models promote jobs/quickstart.yaml astronomy --reason 'checked by hand'",
        handlers.cmd_models_promote,
    )
    rollback = _command(
        commands,
        "rollback",
        "make the version that was current before current again",
        "mixloop models rollback jobs/quickstart.yaml --reason 'worse answers'",
        handlers.cmd_models_rollback,
    )
    for command in (path, promote, rollback):
        command.add_argument("target", help=TARGET_HELP)
    for command in (path, promote):
        command.add_argument("version", help="version name (or current)")
    for command in (promote, rollback):
        command.add_argument("--reason", default="by hand", help="why, kept in lineage and current.json")


def _add_export(commands) -> None:
    """models export: a version as a Hugging Face folder, optionally pushed to the Hub."""
    export = _command(
        commands,
        "export",
        "a version (checked against its hashes) as a Hugging Face folder with lineage and a model card",
        "mixloop models export jobs/quickstart.yaml sft ./sft-hf --dtype bf16",
        handlers.cmd_models_export,
    )
    export.add_argument("target", help=TARGET_HELP)
    export.add_argument("version", help="version name (or current)")
    export.add_argument("dir", metavar="DIR", help="an empty or new local folder to write to")
    export.add_argument(
        "--dtype", choices=tuple(DTYPES), default="fp32", help="weights' dtype (default fp32, as versions are kept)"
    )
    export.add_argument("--max-shard-size", help="split the weights into files of at most this size, e.g. 2GB")
    export.add_argument(
        "--license",
        metavar="ID",
        help="the model card's license, a Hub license id such as mit or cc-by-4.0 (default: the one the base "
        "model's card declares; apache-2.0 for a model mixloop created from scratch)",
    )
    export.add_argument(
        "--push-to-hub",
        metavar="REPO",
        help="then upload the folder to this Hugging Face Hub repo "
        "(org/name), created if missing; the token is HF_TOKEN's or `hf auth login`'s",
    )
    export.add_argument(
        "--private",
        action="store_true",
        help="with --push-to-hub: create the repo private (a repo that exists keeps its visibility)",
    )
    export.add_argument(
        "--revision",
        metavar="BRANCH",
        help="with --push-to-hub: commit to this branch, created from main if missing (default main)",
    )


def add_evaluation_commands(commands) -> None:
    """chat, data preview, eval and report: look at the data and at the versions."""
    chat = _command(
        commands,
        "chat",
        "talk to a version through its chat template (tokens stream; empty line ends)",
        "mixloop chat jobs/quickstart.yaml sft",
        handlers.cmd_chat,
    )
    chat.add_argument("target", help=TARGET_HELP)
    chat.add_argument("version", help="version name")
    chat.add_argument("--max-new-tokens", type=int, default=256, help="longest answer, in tokens (default 256)")

    data = commands.add_parser(
        "data", help="look at the data before training", description="Look at the data before training."
    )
    data_commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    preview = _command(
        data_commands,
        "preview",
        "per corpus: documents, tokens, rows, rejects, blank lines, shares, passes",
        "mixloop data preview jobs/quickstart.yaml --stage sft",
        handlers.cmd_data_preview,
    )
    preview.add_argument("spec", help="pipeline YAML")
    preview.add_argument("--stage", help="only this stage")
    preview.add_argument("--address", help=ADDRESS_HELP)

    for name, text in (
        ("eval", "evaluate every version on every eval split (only what is missing) and print the table"),
        ("report", "evaluate what is missing and write report/index.html"),
    ):
        command = _command(commands, name, text, f"mixloop {name} jobs/quickstart.yaml", handlers.cmd_report)
        command.add_argument("target", help=TARGET_HELP)
        command.add_argument("--address", help=ADDRESS_HELP)


def add_bench_commands(commands) -> None:
    """bench continual, data, train: benchmarks on the real corpora."""
    bench = commands.add_parser(
        "bench",
        help="benchmarks on the real corpora (JSON and a table)",
        description="Benchmarks on the real corpora (JSON and a table).",
    )
    bench_commands = bench.add_subparsers(dest="bench_command", required=True, metavar="COMMAND")
    shared = str(Path(__file__).resolve().parents[3] / "shared" / "data")
    data_help = "the folder of real corpora: tokenizer/, pretrain/, sft/, domain/, eval/ (default: ../shared/data)"
    continual = _command(
        bench_commands,
        "continual",
        "absorb a new domain four ways (scratch, new data only, the iterate template, tuned)",
        "mixloop bench continual --data ../shared/data",
        handlers.cmd_bench_continual,
    )
    continual.add_argument("--trials", type=int, default=4, help="trials of the tuned strategy's search (default 4)")
    data = _command(
        bench_commands,
        "data",
        "preparation tokens/s per core, mixed-loader rows/s against training, peak memory at 1x and 10x",
        "mixloop bench data --replicas 10",
        handlers.cmd_bench_data,
    )
    data.add_argument("--replicas", type=int, default=10, help="how many times the corpus grows for the memory test")
    train = _command(
        bench_commands,
        "train",
        "useful tokens/s of packed, padded and in-process runs against a plain loop, on pretraining "
        "text and SFT chats; step time split, Ray's per-step overhead, MFU on GPU",
        "mixloop bench train --preset tiny --steps 30",
        handlers.cmd_bench_train,
    )
    train.add_argument("--preset", default="tiny", help="model preset (default tiny; minimind-3 on a GPU)")
    train.add_argument(
        "--config",
        type=json.loads,
        metavar="JSON",
        help='Qwen3Config fields over the preset, e.g. \'{"hidden_size": 256, "intermediate_size": 832}\'',
    )
    train.add_argument("--steps", type=int, default=30, help="optimizer steps per variant (default 30)")
    train.add_argument(
        "--text-seq-len", type=int, default=340, help="tokens per row of pretraining text (default 340, MiniMind's)"
    )
    train.add_argument(
        "--sft-seq-len", type=int, default=768, help="tokens per row of SFT chats (default 768, MiniMind's)"
    )
    for name, command in (("continual", continual), ("data", data), ("train", train)):
        command.add_argument("--data", default=shared, help=data_help)
        command.add_argument("--workdir", default=f"runs/bench-{name}", help="where the benchmark writes its runs")
        if name != "data":
            command.add_argument("--address", help=ADDRESS_HELP)


def add_job_commands(commands) -> None:
    """submit, and jobs list, status, logs, stop: pipelines as Ray jobs on a cluster."""
    address_help = "the Ray job server, http://HOST:8265 (default: $RAY_ADDRESS if it is an http address)"
    job_help = "submission id: mixloop-<pipeline name> (see `mixloop jobs list`)"
    submit = _command(
        commands,
        "submit",
        "run a pipeline as a Ray job on a cluster (one job per pipeline name)",
        "mixloop submit jobs/quickstart.yaml --address http://127.0.0.1:8265",
        handlers.cmd_submit,
    )
    submit.add_argument("spec", help="pipeline YAML")
    submit.add_argument("--address", help=address_help)
    submit.add_argument("--no-wait", action="store_true", help="return once submitted instead of following the logs")
    submit.add_argument(
        "--watch",
        metavar="INBOX",
        help="run `mixloop watch` on this inbox (a URI every node sees) instead of `mixloop run`",
    )

    group = commands.add_parser(
        "jobs",
        help="pipelines submitted as Ray jobs: list, status, logs, stop",
        description="Pipelines submitted as Ray jobs: list, status, logs, stop.",
    )
    job_commands = group.add_subparsers(dest="jobs_command", required=True, metavar="COMMAND")
    listing = _command(
        job_commands,
        "list",
        "mixloop's jobs on the cluster, oldest first",
        "mixloop jobs list --address http://127.0.0.1:8265",
        handlers.cmd_jobs_list,
    )
    status = _command(
        job_commands,
        "status",
        "a job's status and message",
        "mixloop jobs status mixloop-quickstart",
        handlers.cmd_jobs_status,
    )
    logs = _command(
        job_commands,
        "logs",
        "a job's driver log",
        "mixloop jobs logs mixloop-quickstart --follow",
        handlers.cmd_jobs_logs,
    )
    logs.add_argument("--follow", "-f", action="store_true", help="stream the log until the job ends")
    stop = _command(
        job_commands,
        "stop",
        "stop a job and wait until it has stopped",
        "mixloop jobs stop mixloop-quickstart",
        handlers.cmd_jobs_stop,
    )
    stop.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the job to stop (default 60)")
    for command in (status, logs, stop):
        command.add_argument("job", help=job_help)
    for command in (listing, status, logs, stop):
        command.add_argument("--address", help=address_help)
