"""What each mixloop command does: read its arguments, call the library (mostly mixloop.api), print.
The parser that maps the command line to these lives in cli.py."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import overload

from mixloop import api
from mixloop.config import format_problems, load_spec
from mixloop.errors import MixloopError, SpecError
from mixloop.evaluation.scores import read_score_matrix, score_summary
from mixloop.runs import jobs
from mixloop.runs.status import status_lines
from mixloop.storage import hub
from mixloop.storage.fs import read_json
from mixloop.storage.layout import Workdir
from mixloop.storage.lock import workdir_lock
from mixloop.version import __version__
from mixloop.versioning.export import export
from mixloop.versioning.gate import gate_summary, promote, rollback
from mixloop.versioning.lineage import Lineage, diff_lineages
from mixloop.versioning.registry import current_version, read_lineage, verified_version


def _workdir(target: str) -> str:
    """A workdir given directly (a path or URI), or the one a spec file names."""
    if target.endswith((".yaml", ".yml")) or Path(target).is_file():
        return load_spec(target, files=False).workdir  # only its workdir is needed: no file checks
    if "://" in target:
        return target
    if not Path(target).is_dir():
        raise MixloopError(f"{target}: neither a pipeline spec nor a run directory")
    return str(Path(target).resolve())


def _spec(target: str, files: bool = True):
    """A pipeline spec file, or the copy a run directory keeps of the spec it last ran."""
    is_spec = Path(target).is_file() or target.endswith((".yaml", ".yml"))
    return load_spec(target if is_spec else Workdir(_workdir(target)).pipeline_copy, files=files)


def cmd_validate(args) -> int:
    from mixloop.runs.stages import edited_stages  # lazy: torch, transformers (through data.corpora)

    spec = load_spec(args.spec, args.overrides)
    edited = edited_stages(spec)  # against the versions its workdir already holds
    if edited:
        raise SpecError(format_problems(args.spec, edited))
    print(f"{args.spec}: valid pipeline {spec.config.name!r} with stages {', '.join(spec.stage_names())}")
    return 0


def cmd_run(args) -> int:
    # In a terminal, a live bar per stage; in files and Ray jobs' logs, the workers' lines.
    api.run(api.load(args.spec, args.overrides), args.address, progress_bar=sys.stdout.isatty())
    return 0


def cmd_status(args) -> int:
    print("\n".join(status_lines(_spec(args.target, files=False))))
    return 0


def cmd_models_list(args) -> int:
    workdir = _workdir(args.target)
    versions, current = api.versions(workdir), current_version(workdir)
    if not versions:
        print("no versions yet")
        return 0
    scores = read_score_matrix(workdir)  # as the last report measured them
    # Trained tokens are the documents' own; the budget counts every slot of its steps, padding included.
    header = f"{'version':<20} {'parent':<20} {'trained tokens':>15} {'budget (slots)':>15}  {'finished':<25}"
    print(header + ("  knowledge (± stderr)" if scores else "") + "  gate")
    for lineage in versions:
        gate = ("CURRENT, " if lineage.version == current else "") + gate_summary(lineage)
        known = f"  {score_summary(scores.get(lineage.version, {})) or '-'}" if scores else ""
        print(
            f"{lineage.version:<20} {lineage.parent or '-':<20} {lineage.trained_tokens:>15,.0f} "
            f"{lineage.budget_slots:>15,}  {lineage.finished:<25}{known}  {gate}"
        )
    return 0


def cmd_models_path(args) -> int:
    print(verified_version(_workdir(args.target), args.version))
    return 0


def cmd_models_promote(args) -> int:
    workdir = _workdir(args.target)
    with workdir_lock(workdir, "mixloop models promote"):
        promote(workdir, args.version, args.reason)
    print(f"{args.version} is now the current version of {workdir}")
    return 0


def cmd_models_rollback(args) -> int:
    workdir = _workdir(args.target)
    with workdir_lock(workdir, "mixloop models rollback"):
        version = rollback(workdir, args.reason)
    print(f"{version} is the current version of {workdir} again")
    return 0


def _lineage(target: str, workdir: str, version: str) -> Lineage:
    lineage = read_lineage(workdir, version)
    if lineage is None:
        raise MixloopError(f"no version {version!r} in {target}. See `mixloop models list {target}`.")
    return lineage


def cmd_models_show(args) -> int:
    print(json.dumps(_lineage(args.target, _workdir(args.target), args.version).to_json(), indent=2))
    return 0


def cmd_models_diff(args) -> int:
    workdir = _workdir(args.target)
    differences = diff_lineages(*(_lineage(args.target, workdir, version) for version in (args.a, args.b)))
    matrix = read_json(Workdir(workdir).eval_matrix) or {}
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
    if (args.private or args.revision) and not args.push_to_hub:
        raise MixloopError("--private and --revision go with --push-to-hub. Fix: add --push-to-hub REPO, or drop them.")
    if args.push_to_hub:
        hub.check_push(args.push_to_hub)  # before the export: offline, a bad repo id, no token
    out = export(_workdir(args.target), args.version, args.dir, args.dtype, args.max_shard_size, args.license)
    print(
        f"exported {args.version} to {out} in {args.dtype}, with lineage.json and a model card README.md "
        "(load it with AutoModelForCausalLM.from_pretrained)"
    )
    if args.push_to_hub:
        url = hub.push(
            out,
            args.push_to_hub,
            args.private,
            args.revision,
            f"{args.version} in {args.dtype}, exported by mixloop {__version__}",
        )
        print(f"pushed {out} to {args.push_to_hub}{f' (branch {args.revision})' if args.revision else ''}: {url}")
    return 0


def cmd_chat(args) -> int:
    from mixloop.evaluation.chat import chat  # lazy: torch, transformers

    chat(verified_version(_workdir(args.target), args.version), max_new_tokens=args.max_new_tokens)
    return 0


def _shared_data(folder: str) -> Path:
    data = Path(folder)
    if not (data / "tokenizer" / "tokenizer.json").exists():
        raise MixloopError(
            f"{data}: not the shared data folder (tokenizer/, pretrain/, sft/, domain/, eval/). Fix: pass --data."
        )
    return data


def _print_bench(result: dict, formatted) -> int:
    """A benchmark's result as JSON (for scripts), then as a table (for people)."""
    print(json.dumps(result, indent=2))
    print(formatted(result))
    return 0


def cmd_bench_continual(args) -> int:
    from mixloop.bench.continual import continual, format_continual  # lazy: keeps `mixloop --help` fast

    result = continual(_shared_data(args.data), Path(args.workdir).resolve(), args.address, args.trials)
    return _print_bench(result, format_continual)


def cmd_bench_train(args) -> int:
    from mixloop.bench.train import format_train, train_benchmark  # lazy: keeps `mixloop --help` fast

    model = {"preset": args.preset, **({"config": args.config} if args.config else {})}
    result = train_benchmark(
        _shared_data(args.data),
        Path(args.workdir).resolve(),
        model,
        args.steps,
        {"text": args.text_seq_len, "sft": args.sft_seq_len},
        args.address,
    )
    return _print_bench(result, format_train)


def cmd_bench_data(args) -> int:
    from mixloop.bench.data import data_benchmark, format_data  # lazy: keeps `mixloop --help` fast

    result = data_benchmark(_shared_data(args.data), Path(args.workdir).resolve(), args.replicas)
    return _print_bench(result, format_data)


def cmd_report(args) -> int:
    api.evaluate(_spec(args.target), args.address)
    return 0


def cmd_data_preview(args) -> int:
    rows = api.preview(api.load(args.spec), args.stage, args.address)
    print(
        f"{'stage':<16}{'corpus':<18}{'documents':>10}{'tokens':>12}{'rows':>9}{'rejected':>9}{'blank':>7}"
        f"{'share':>8}{'passes':>8}  format"
    )
    for r in rows:
        print(
            f"{r.stage:<16}{r.corpus:<18}{r.documents:>10,}{r.tokens:>12,}{r.rows:>9,}"
            f"{r.rejected:>9,}{r.blank_lines:>7,}{r.share:>8.1%}{r.epochs:>8.2f}  {_shapes(r.formats)}"
        )
    for warning in (w for r in rows for w in r.warnings):
        print(f"warning: {warning}")
    return 0


def _shapes(formats: dict[str, int]) -> str:
    """The shapes records were read in: `sharegpt`, or `messages 60%,alpaca 40%` for a mix."""
    total = sum(formats.values())
    if len(formats) <= 1:
        return next(iter(formats), "-")
    return ",".join(f"{name} {count / total:.0%}" for name, count in sorted(formats.items(), key=lambda kv: -kv[1]))


def cmd_add(args) -> int:
    from mixloop.runs.iterate import NewCorpus, add  # lazy: keeps `mixloop --help` fast

    text, chat, eval_split = (_from_here(args.spec, value) for value in (args.text, args.chat, args.eval))
    add(
        args.spec,
        NewCorpus(args.name, text, chat, eval_split),
        dry_run=args.dry_run,
        tune=args.tune,
        address=args.address,
    )
    return 0


@overload
def _from_here(spec_path: str, value: str) -> str: ...
@overload
def _from_here(spec_path: str, value: None) -> None: ...
def _from_here(spec_path: str, value: str | None) -> str | None:
    """A path given on the command line (relative to here), as the spec names it: relative to its folder."""
    if value is None or "://" in value:
        return value
    return os.path.relpath(os.path.abspath(value), os.path.dirname(os.path.abspath(spec_path)))


def cmd_watch(args) -> int:
    from mixloop.runs.iterate import watch  # lazy: keeps `mixloop --help` fast

    try:
        watch(args.spec, args.inbox, args.address, args.poll_s, args.once)
    except KeyboardInterrupt:
        print(
            "\nstopped watching; what was added is in the spec, and `mixloop watch` again picks up from there.",
            file=sys.stderr,
        )
        return 130
    return 0


def cmd_tune(args) -> int:
    from mixloop.tuning.runner import run_search  # lazy: ray, torch, optuna

    run_search(args.search, args.address, apply=args.apply, trial=args.trial)
    return 0


def cmd_submit(args) -> int:
    client = jobs.JobClient(args.address)
    job = client.submit(args.spec, args.watch)
    print(f"submitted {args.spec} to {client.address} as job {job}\n{client.commands(job)}", flush=True)
    if args.no_wait:
        return 0
    try:
        client.follow(job)
    except KeyboardInterrupt:
        print(
            f"\nstopped following; job {job} keeps running. Stop it with "
            f"`mixloop jobs stop {job} --address {client.address}`.",
            file=sys.stderr,
        )
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
        print(
            f"{j.submission_id:<{width}}  {str(j.status):<9}  {jobs.job_time(j.start_time):<19}  "
            f"{j.metadata.get('pipeline', '-'):<16}  {j.metadata.get('spec', '-')}"
        )
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
    print(
        f"{args.job} has already ended: {client.require(args.job).status}"
        if info is None
        else f"{args.job}: {info.status}"
    )
    return 0
