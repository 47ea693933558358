"""The mixloop command line: parse, validate, call the library. User mistakes print one
clear message and exit non-zero; anything else is a bug and keeps its traceback."""

from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

from mixloop import __version__, jobs
from mixloop.errors import MixloopError


def _workdir(target: str) -> str:
    """A workdir given directly (a path or URI), or the one a spec file names."""
    from mixloop.spec import load_spec

    if target.endswith((".yaml", ".yml")) or Path(target).is_file():
        return load_spec(target).workdir
    if "://" in target:
        return target
    if not Path(target).is_dir():
        raise MixloopError(f"{target}: neither a pipeline spec nor a run directory")
    return str(Path(target).resolve())


def _spec(target: str):
    """A pipeline spec file, or the copy a run directory keeps of the spec it last ran."""
    from mixloop.spec import load_spec
    from mixloop.storage import join

    is_spec = Path(target).is_file() or target.endswith((".yaml", ".yml"))
    return load_spec(target if is_spec else join(_workdir(target), "pipeline.yaml"))


def cmd_validate(args) -> int:
    from mixloop.spec import load_spec

    spec = load_spec(args.spec)
    print(f"{args.spec}: valid pipeline {spec.pipeline.name!r} with stages {', '.join(spec.stage_names())}")
    return 0


def cmd_run(args) -> int:
    from mixloop.pipeline import Pipeline, init_ray
    from mixloop.spec import load_spec

    spec = load_spec(args.spec)
    init_ray(args.address)
    Pipeline(spec).run()
    return 0


def cmd_models_list(args) -> int:
    from mixloop.registry import list_versions

    versions = list_versions(_workdir(args.target))
    if not versions:
        print("no versions yet")
    for lineage in versions:
        tokens = sum((lineage.get("tokens_per_corpus") or {}).values())
        print(f"{lineage['version']:<20} parent={str(lineage['parent']):<20} tokens={tokens:>12,.0f} "
              f"finished={lineage['finished']}")
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

    workdir = _workdir(args.target)
    lineages = [read_lineage(workdir, v) for v in (args.a, args.b)]
    for version, lineage in zip((args.a, args.b), lineages):
        if lineage is None:
            raise MixloopError(f"no version {version!r} in {args.target}. See `mixloop models list {args.target}`.")
    differences = diff_lineages(*lineages)
    width = max([len(key) for key, _, _ in differences] + [10])
    print(f"{'':<{width}}  {args.a:>20}  {args.b:>20}")
    for key, left, right in differences:
        print(f"{key:<{width}}  {_cell(left):>20}  {_cell(right):>20}")
    return 0


def _cell(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def cmd_models_export(args) -> int:
    from mixloop.registry import export

    try:
        export(_workdir(args.target), args.version, args.dir)
    except (FileNotFoundError, FileExistsError) as exc:
        raise MixloopError(str(exc)) from None
    print(f"exported {args.version} to {args.dir} (load it with AutoModelForCausalLM.from_pretrained)")
    return 0


def cmd_chat(args) -> int:
    from mixloop.chat import chat
    from mixloop.registry import read_lineage, version_dir

    workdir = _workdir(args.target)
    if read_lineage(workdir, args.version) is None:
        raise MixloopError(f"no version {args.version!r} in {args.target}")
    chat(version_dir(workdir, args.version), max_new_tokens=args.max_new_tokens)
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
    from mixloop.pipeline import Pipeline, init_ray

    pipeline = Pipeline(_spec(args.target))
    init_ray(args.address)
    pipeline.prepare_all(pipeline.tokenizer_dir())
    pipeline.report()
    return 0


def cmd_data_preview(args) -> int:
    from mixloop.pipeline import Pipeline, init_ray
    from mixloop.spec import load_spec

    pipeline = Pipeline(load_spec(args.spec))
    if args.stage and args.stage not in pipeline.spec.stage_names():
        raise MixloopError(f"no stage {args.stage!r}; stages: {', '.join(pipeline.spec.stage_names())}")
    init_ray(args.address)
    print(f"{'stage':<16}{'corpus':<18}{'documents':>10}{'tokens':>12}{'rows':>9}{'rejected':>9}{'share':>8}{'passes':>8}")
    rows = pipeline.preview(args.stage)
    for r in rows:
        print(f"{r['stage']:<16}{r['corpus']:<18}{r['documents']:>10,}{r['tokens']:>12,}{r['rows']:>9,}"
              f"{r['rejected']:>9,}{r['share']:>8.1%}{r['epochs']:>8.2f}")
    for warning in (w for r in rows for w in r["warnings"]):
        print(f"warning: {warning}")
    return 0


def cmd_tune(args) -> int:
    from mixloop.tuning.runner import run_search

    run_search(args.search, args.address, apply=args.apply, trial=args.trial)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mixloop", description=__doc__.split("\n")[0])
    parser.add_argument("--version", action="version", version=f"mixloop {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)

    run = commands.add_parser("run", help="run or continue a pipeline")
    run.add_argument("spec", help="pipeline YAML")
    run.add_argument("--address", help="Ray cluster address (default: a private local Ray)")
    run.set_defaults(func=cmd_run)

    tune = commands.add_parser("tune", help="search a stage's mix and LR re-warm with Ray Tune + Optuna (resumes)")
    tune.add_argument("search", help="search YAML (see tuning/)")
    tune.add_argument("--address", help="Ray cluster address (default: a private local Ray)")
    tune.add_argument("--apply", action="store_true", help="append the best trial's stage to the pipeline spec")
    tune.add_argument("--trial", help="with several objectives, or to overrule the best: the trial whose stage to write")
    tune.set_defaults(func=cmd_tune)

    validate = commands.add_parser("validate", help="check a pipeline spec; every problem at once")
    validate.add_argument("spec")
    validate.set_defaults(func=cmd_validate)

    models = commands.add_parser("models", help="list and inspect versions")
    models_commands = models.add_subparsers(dest="models_command", required=True)
    listing = models_commands.add_parser("list", help="versions of a run, oldest first")
    listing.add_argument("target", help="pipeline YAML or run directory")
    listing.set_defaults(func=cmd_models_list)
    show = models_commands.add_parser("show", help="a version's lineage")
    show.add_argument("target", help="pipeline YAML or run directory")
    show.add_argument("version")
    show.set_defaults(func=cmd_models_show)
    diff = models_commands.add_parser("diff", help="what changed between two versions: data mix, schedule, metrics")
    diff.add_argument("target", help="pipeline YAML or run directory")
    diff.add_argument("a")
    diff.add_argument("b")
    diff.set_defaults(func=cmd_models_diff)
    export = models_commands.add_parser("export", help="copy a version to a clean Hugging Face directory")
    export.add_argument("target", help="pipeline YAML or run directory")
    export.add_argument("version")
    export.add_argument("dir")
    export.set_defaults(func=cmd_models_export)

    chat = commands.add_parser("chat", help="talk to a version through its chat template (tokens stream)")
    chat.add_argument("target", help="pipeline YAML or run directory")
    chat.add_argument("version")
    chat.add_argument("--max-new-tokens", type=int, default=256)
    chat.set_defaults(func=cmd_chat)

    data = commands.add_parser("data", help="look at the data before training")
    data_commands = data.add_subparsers(dest="data_command", required=True)
    preview = data_commands.add_parser("preview", help="per corpus: documents, tokens, rows, rejects, shares, passes")
    preview.add_argument("spec")
    preview.add_argument("--stage", help="only this stage")
    preview.add_argument("--address")
    preview.set_defaults(func=cmd_data_preview)

    for name, text in (("eval", "evaluate every version on every eval split (only what is missing) and print the table"),
                       ("report", "evaluate what is missing and write report/index.html")):
        command = commands.add_parser(name, help=text)
        command.add_argument("target", help="pipeline YAML or run directory")
        command.add_argument("--address")
        command.set_defaults(func=cmd_report)
    bench = commands.add_parser("bench", help="benchmarks (JSON and a table)")
    bench_commands = bench.add_subparsers(dest="bench_command", required=True)
    shared = str(Path(__file__).resolve().parents[3] / "shared" / "data")
    continual = bench_commands.add_parser(
        "continual", help="absorb a new domain three ways (scratch, new data only, replay + re-warm)")
    continual.add_argument("--data", default=shared, help="the real corpora (default: ../shared/data beside the checkout)")
    continual.add_argument("--workdir", default="runs/bench-continual")
    continual.add_argument("--address")
    continual.set_defaults(func=cmd_bench_continual)
    data = bench_commands.add_parser(
        "data", help="preparation tokens/s per core, mixed-loader rows/s against training, peak memory at 1x and 10x")
    data.add_argument("--data", default=shared, help="the real corpora (default: ../shared/data beside the checkout)")
    data.add_argument("--workdir", default="runs/bench-data")
    data.add_argument("--replicas", type=int, default=10, help="how many times the corpus grows for the memory test")
    data.set_defaults(func=cmd_bench_data)
    train = bench_commands.add_parser(
        "train", help="useful tokens/s packed vs padded, step time split, Ray's per-step overhead, MFU on GPU")
    train.add_argument("--data", default=shared, help="the real corpora (default: ../shared/data beside the checkout)")
    train.add_argument("--workdir", default="runs/bench-train")
    train.add_argument("--preset", default="tiny", help="model preset (minimind-3 on a GPU)")
    train.add_argument("--steps", type=int, default=30)
    train.add_argument("--seq-len", type=int, default=512)
    train.add_argument("--address")
    train.set_defaults(func=cmd_bench_train)
    jobs.add_commands(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Runs last hours and their output goes to files (Ray Jobs' logs, nohup, tee): every line at once.
    if isinstance(sys.stdout, io.TextIOWrapper):
        sys.stdout.reconfigure(line_buffering=True)
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except MixloopError as exc:
        print(f"mixloop: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("mixloop: interrupted; run the same command again to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
