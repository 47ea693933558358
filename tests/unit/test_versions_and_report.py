"""Versions are verified before use and readable by others; an export reaches a (local, fake) Hugging
Face Hub byte for byte; the report copes with missing eval splits; user-caused errors become one line
with a documented exit code."""

from __future__ import annotations

import copy
import errno
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from mixloop.cli import as_user_error, build_parser, main
from mixloop.errors import CorruptVersionError, SpecError, StorageError
from mixloop.evaluation.report import write_report
from mixloop.versioning.export import export
from mixloop.versioning.registry import remove_partial_publishes, verified_version, version_dir
from support import lineage_of, lineages_of, metrics_line, micro_versions


@pytest.fixture
def version(tmp_path, trained_tokenizer):
    """A published micro model `v1` in tmp_path/run."""
    return micro_versions(tmp_path, trained_tokenizer, [("v1", None)])


def truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def test_a_version_records_its_weights_hash_and_a_corrupt_file_is_named_with_the_fix(version, tmp_path):
    lineage = json.loads((version / "models/v1/lineage.json").read_text())
    assert len(lineage["weights_sha256"]["model.safetensors"]) == 64
    assert verified_version(str(version), "v1") == version_dir(str(version), "v1")
    truncate(version / "models/v1/model.safetensors")
    with pytest.raises(CorruptVersionError) as error:
        verified_version(str(version), "v1")
    message = str(error.value)
    assert str(version / "models/v1/model.safetensors") in message and "Fix:" in message
    with pytest.raises(CorruptVersionError):
        export(str(version), "v1", str(tmp_path / "out"))
    assert not (tmp_path / "out").exists(), "nothing is exported from a corrupt version"


def test_cli_export_and_chat_refuse_a_corrupt_version_without_a_traceback(version, tmp_path, capsys):
    truncate(version / "models/v1/model.safetensors")
    for argv in (["models", "export", str(version), "v1", str(tmp_path / "out")], ["chat", str(version), "v1"]):
        assert main(argv) == CorruptVersionError.exit_code
        err = capsys.readouterr().err
        assert err.startswith("mixloop: error: ") and "model.safetensors" in err and "Traceback" not in err


def test_versions_are_readable_under_the_umask_and_killed_publishes_are_cleaned_up(version):
    mode = stat.S_IMODE(os.stat(version / "models/v1").st_mode)
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o777 & ~umask, oct(mode)
    files = [stat.S_IMODE(p.stat().st_mode) for p in (version / "models/v1").iterdir()]
    assert all(m & 0o044 == 0o044 & ~umask for m in files)
    leftover = version / "models" / ".v2.partial-12345"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    assert remove_partial_publishes(str(version)) == [str(leftover)]
    assert not leftover.exists() and (version / "models/v1").exists()


def test_report_without_eval_splits_renders_and_names_what_to_add(tmp_path):
    lineages = lineages_of(lineage_of("base"), lineage_of("s", "base", ["web"]))
    page = Path(write_report(str(tmp_path), lineages, {"base": {}, "s": {}}, {}, {}, ["web", "chats"]))
    text = page.read_text()
    assert "No eval split for web, chats" in text and "eval: &lt;held-out file&gt;" in text
    assert not (tmp_path / "report" / "eval_matrix.png").exists()
    assert (tmp_path / "report" / "lineage.png").exists()


def test_report_with_eval_splits_on_some_corpora_draws_them(tmp_path):
    lineages = lineages_of(lineage_of("base"))
    matrix = {"base": {"web": {"loss": 2.0}}}
    page = Path(write_report(str(tmp_path), lineages, matrix, {}, {}, ["chats"]))
    assert (tmp_path / "report" / "eval_matrix.png").stat().st_size > 0
    assert "No eval split for chats" in page.read_text() and "2.0000" in page.read_text()


@pytest.mark.parametrize(
    "code, words", [(errno.EACCES, "write access"), (errno.EROFS, "read-only"), (errno.ENOSPC, "disk is full")]
)
def test_storage_errors_become_one_line_with_the_path_and_a_fix(code, words):
    error = as_user_error(OSError(code, os.strerror(code), "/data/run/models"))
    assert isinstance(error, StorageError) and error.exit_code == 5
    assert str(error).startswith("/data/run/models: ") and words in str(error)


def test_a_bug_keeps_its_traceback():
    assert as_user_error(KeyError("x")) is None


def test_debug_shows_the_traceback_of_a_user_error(tmp_path, capsys):
    missing = str(tmp_path / "nope.yaml")
    assert main(["validate", missing]) == 2
    assert "no such spec file" in capsys.readouterr().err
    with pytest.raises(SpecError, match="no such spec file"):  # raised: Python prints its traceback
        main(["--debug", "validate", missing])


def _commands(parser, path=()):
    for action in parser._actions:
        if hasattr(action, "choices") and isinstance(action.choices, dict) and action.choices:
            for name, sub in action.choices.items():
                yield from _commands(sub, (*path, name))
            return
    yield path, parser


def test_every_command_has_a_description_an_example_and_help_for_every_argument():
    commands = list(_commands(build_parser()))
    assert len(commands) >= 18
    for path, parser in commands:
        assert parser.description and parser.description.endswith("."), path
        assert parser.epilog and f"mixloop {path[0]}" in parser.epilog, path
        for action in parser._actions:
            assert action.help, (path, action.dest)


def test_the_top_level_help_is_whole_sentences_and_lists_exit_codes(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "reports what each\nversion gained and forgot." in out or "version gained and forgot." in out
    assert "exit codes:" in out and "3  another run holds the workdir's lock" in out


def test_export_in_bf16_sharded_with_lineage_and_a_model_card(version, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from mixloop.versioning.registry import read_lineage, write_lineage

    (version / "eval").mkdir()
    (version / "eval" / "matrix.json").write_text(json.dumps({"v1": {"web": {"loss": 2.5}}}))
    scores = {"v1": {"astronomy": {"metric": "acc", "value": 0.75, "stderr": 0.09, "samples": 24}}}
    (version / "eval" / "scores.json").write_text(json.dumps(scores))
    # v1 trained on a Hub dataset and a local file: the card's metadata names the dataset.
    (version / "pipeline.yaml").write_text(
        yaml.safe_dump(
            {
                "corpora": {
                    "gsm": {"kind": "chat", "dataset": "openai/gsm8k"},
                    "web": {"kind": "text", "path": "/data/web.jsonl"},
                }
            }
        )
    )
    trained = lineage_of("v1", mixture=["gsm", "web"])
    write_lineage(str(version), read_lineage(str(version), "v1").model_copy(update={"stage": trained.stage}))
    out = tmp_path / "exported"
    assert main(["models", "export", str(version), "v1", str(out), "--dtype", "bf16", "--max-shard-size", "40KB"]) == 0
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 1 and (out / "model.safetensors.index.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    assert next(model.parameters()).dtype == torch.bfloat16 and AutoTokenizer.from_pretrained(out).chat_template
    original = AutoModelForCausalLM.from_pretrained(version / "models" / "v1")
    ids = torch.tensor([[5, 9, 33, 40, 41]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits.float(), original(ids).logits, atol=0.05, rtol=0.05)
    assert json.loads((out / "lineage.json").read_text())["version"] == "v1"
    card = (out / "README.md").read_text()
    assert "# v1" in card and "| web | 2.5000 |" in card
    metadata = card_metadata(out)
    assert metadata["library_name"] == "transformers" and metadata["datasets"] == ["openai/gsm8k"]
    # The benchmark scores are the card's model-index (the Hub shows them), with their standard errors.
    result = metadata["model-index"][0]["results"][0]
    assert metadata["model-index"][0]["name"] == "v1" and result["dataset"]["name"] == "astronomy"
    assert result["metrics"][0] == {"type": "acc", "value": 0.75, "name": "acc (0.750±0.090, 24 questions)"}
    assert "| astronomy | acc | 0.750±0.090 | - |" in card
    assert main(["models", "export", str(version), "v1", str(out)]) == 1  # never over an export
    assert "exists and is not empty" in capsys.readouterr().err


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask-022", "umask-027"])
def test_every_exported_file_has_the_mode_the_umask_gives(version, tmp_path, umask):
    # The umask is read once per process, so each export runs in a process started with its own.
    out = tmp_path / "exported"
    script = "import sys; from mixloop.cli import main; sys.exit(main(sys.argv[1:]))"
    argv = [sys.executable, "-c", script, "models", "export", str(version), "v1", str(out), "--max-shard-size", "40KB"]
    result = subprocess.run(argv, capture_output=True, text=True, umask=umask, timeout=300)
    assert result.returncode == 0, result.stderr
    modes = {path.name: oct(stat.S_IMODE(path.stat().st_mode)) for path in out.iterdir()}
    assert {"model.safetensors.index.json", "tokenizer.json", "README.md", "lineage.json"} <= modes.keys()
    assert any(name.startswith("model-0") for name in modes)  # the shards too
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes


def test_an_exported_tokenizer_with_extra_special_tokens_is_written_as_transformers_4_57_reads_it(
    tmp_path, trained_tokenizer
):
    """transformers 5 lists extra special tokens in tokenizer_config.json's `extra_special_tokens`; 4.57
    reads that key as a mapping of named tokens (`_set_model_specific_special_tokens` calls `.keys()`:
    AttributeError on a list) and takes the list from `additional_special_tokens`. This checks the
    written JSON against what 4.57's tokenization_utils_base requires, and that 5.x reads the same tokens
    back; the load under a real 4.57 is tests/integration/test_older_transformers.py."""
    from transformers import AutoTokenizer

    tokenizer = copy.deepcopy(trained_tokenizer)
    tokenizer.add_special_tokens({"extra_special_tokens": ["<tool_call>", "</tool_call>"]})
    tokenizer.save_pretrained(tmp_path / "as-saved")
    assert json.loads((tmp_path / "as-saved/tokenizer_config.json").read_text())["extra_special_tokens"] == [
        "<tool_call>",
        "</tool_call>",
    ]  # what 4.57 cannot read

    export(str(micro_versions(tmp_path, tokenizer, [("v1", None)])), "v1", str(tmp_path / "out"))
    settings = json.loads((tmp_path / "out/tokenizer_config.json").read_text())
    named = settings.get("extra_special_tokens", {})
    assert isinstance(named, dict) and all(isinstance(token, str) for token in named.values())
    assert settings["additional_special_tokens"] == ["<tool_call>", "</tool_call>"]
    assert settings["tokenizer_class"] == "PreTrainedTokenizerFast"  # a class 4.57 has

    exported = AutoTokenizer.from_pretrained(tmp_path / "out")
    text = "<tool_call>the sun</tool_call>"
    assert exported.extra_special_tokens == ["<tool_call>", "</tool_call>"]
    assert exported(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert exported.tokenize(text)[0] == "<tool_call>" and exported.tokenize(text)[-1] == "</tool_call>"


def card_metadata(folder: Path) -> dict:
    return yaml.safe_load((folder / "README.md").read_text().split("---\n")[1])


def test_the_card_license_is_the_base_models_and_apache_only_for_a_model_made_from_scratch(
    tmp_path, trained_tokenizer, monkeypatch, capsys
):
    from mixloop.versioning.registry import read_lineage, write_lineage

    run = micro_versions(tmp_path, trained_tokenizer, [("base", None)])
    lineage = read_lineage(str(run), "base")

    def export_base(model: dict, *options: str, **more) -> dict:
        write_lineage(str(run), lineage.model_copy(update={"model": model, **more}))
        out = tmp_path / f"out-{len(list(tmp_path.glob('out-*')))}"
        assert main(["models", "export", str(run), "base", str(out), *options]) == 0
        return card_metadata(out)

    assert export_base({"preset": "micro"})["license"] == "apache-2.0"
    assert "license: apache-2.0 (mixloop's own, for a model it created from scratch)" in capsys.readouterr().out

    folder = tmp_path / "their-model"  # a model.path folder whose card declares its license
    folder.mkdir()
    (folder / "README.md").write_text("---\nlicense: mit\ntags: [x]\n---\n# Their model\n")
    assert export_base({"path": str(folder)})["license"] == "mit"
    assert f"license: mit (from the model card of {folder}, the base model)" in capsys.readouterr().out

    (folder / "README.md").write_text("# Their model, no metadata\n")
    assert "license" not in export_base({"path": str(folder)})
    assert "the model card names no license: the base model" in capsys.readouterr().out
    assert export_base({"path": str(folder)}, "--license", "cc-by-4.0")["license"] == "cc-by-4.0"

    # A hub model's card, read from the Hugging Face cache offline at the commit the base was copied from.
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = tmp_path / "hf-cache/models--their-org--model/snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "README.md").write_text("---\nlicense: other\nlicense_name: their-terms\nlicense_link: LICENSE\n---\n")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    metadata = export_base({"path": "their-org/model"}, model_commit=commit)
    assert (metadata["license"], metadata["license_name"], metadata["license_link"]) == (
        "other",
        "their-terms",
        "LICENSE",
    )
    assert metadata["base_model"] == "their-org/model"


def test_gains_and_losses_read_the_same_in_the_cli_the_page_and_the_plot(tmp_path):
    from mixloop.evaluation.evaluate import delta_bars, format_deltas

    # v2 brought in `new` (its loss fell by 0.5) and, on earlier corpora, improved `old` (loss fell 0.2)
    # and forgot `older` (loss rose 0.3).
    deltas = {
        "v2": {
            "parent": "v1",
            "uptake": {"new": 0.5},
            "forgetting": {"old": -0.2, "older": 0.3},
            "forgetting_vs_best": {"old": -0.1, "older": 0.3},
        }
    }
    line = format_deltas(deltas).splitlines()[1]
    assert line == "v2 (from v1): uptake new +0.500; forgetting old -0.200, older +0.300"
    lineages = lineages_of(lineage_of("v1"), lineage_of("v2", "v1"))
    page = Path(write_report(str(tmp_path), lineages, {"v1": {}, "v2": {}}, deltas, {})).read_text()
    assert "<td>new +0.500</td><td>old -0.200, older +0.300</td>" in page
    assert "uptake &gt; 0: loss fell on the new corpora; forgetting &gt; 0: loss rose on earlier ones" in page
    bars = {label: (value, better) for label, value, better in delta_bars(deltas)}
    assert bars == {"v2\nnew (new)": (0.5, True), "v2\nold": (0.2, True), "v2\nolder": (-0.3, False)}


def test_the_report_shows_answers_side_by_side_and_the_tuning_searches(tmp_path):
    health = {
        v: {
            "chats": {
                "ended": 1.0,
                "repetition": 0.0,
                "length": 3.0,
                "examples": [
                    {"prompt": "hi?", "answer": f"{v} says hi"},
                    {"prompt": "bye?", "answer": f"{v} says bye"},
                ],
            }
        }
        for v in ("sft", "sft2")
    }
    search = tmp_path / "tune" / "mix-search"
    search.mkdir(parents=True)
    trials = [
        {
            "trial": "t1",
            "arm": "current",
            "status": "finished",
            "objective": 0.61,
            "lr_peak": 0.001,
            "mixture": {"web": {"from": 0.3, "to": 0.3}, "new": {"from": 0.7, "to": 0.7}},
            "tokens": 20480,
        }
    ]
    (search / "results.json").write_text(
        json.dumps({"verdict": "t1 beat the stratified mix by 0.2.", "trials": trials})
    )
    import matplotlib.pyplot as plt

    plt.figure().savefig(search / "objective.png")
    lineages = lineages_of(lineage_of("sft"), lineage_of("sft2", "sft"))
    page = Path(write_report(str(tmp_path), lineages, {}, {}, health)).read_text()
    assert "<th>chat set</th><th>prompt</th><th>sft</th><th>sft2</th>" in page
    assert "<td>chats</td><td>bye?</td><td>sft says bye</td><td>sft2 says bye</td>" in page
    assert "<h3>mix-search</h3><p>t1 beat the stratified mix by 0.2.</p>" in page
    assert "<td>t1</td><td>current</td><td>finished</td><td>0.6100</td><td>web 30%, new 70%</td>" in page
    assert "src='tune-mix-search.png'" in page and (tmp_path / "report" / "tune-mix-search.png").exists()


def test_plots_keep_every_label_and_arc_inside_the_image(tmp_path):
    """Nothing drawn touches an image's edge: a label or an arc that ran off it would (a branch from
    an early version arcs over the later ones; the first stage's label sits at the left edge)."""
    import matplotlib.image

    versions = ["base", "pretrain", "sft", "astronomy", "astronomy-sft", "redo-from-pretrain"]
    lineages = lineages_of(
        *(
            lineage_of(v, p, ["web"] if p else None, {"web": 100.0})
            for v, p in zip(versions, [None, "base", "pretrain", "sft", "astronomy", "pretrain"])
        )
    )
    metrics = [
        metrics_line(s, step, {"web": 50.0 * step}, {"web": 3.0 / step}) for s in versions[1:] for step in (1, 2)
    ]
    (tmp_path / "metrics.jsonl").write_text("\n".join(metrics) + "\n")
    write_report(str(tmp_path), lineages, {}, {}, {})
    for name in ("lineage.png", "training.png"):
        image = matplotlib.image.imread(tmp_path / "report" / name)[:, :, :3]
        edges = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        assert (edges > 0.95).all(), f"{name}: something runs off the image"


@pytest.fixture
def hub_server(monkeypatch):
    """A fake Hugging Face Hub on 127.0.0.1 (hubserver.py) that huggingface_hub talks to, with our token."""
    import huggingface_hub.constants
    from hubserver import FakeHub

    with FakeHub(token="hf_test_write_token", namespaces=("me",)) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.url)
        monkeypatch.setenv("HF_TOKEN", hub.token)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)  # as read when it was imported
        yield hub


def files_in(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_export_pushes_the_folder_to_the_hub_and_prints_the_commit(version, tmp_path, hub_server, capsys):
    out = tmp_path / "bf16"
    argv = ["models", "export", str(version), "v1", str(out), "--dtype", "bf16", "--push-to-hub", "me/tiny"]
    assert main([*argv, "--private"]) == 0
    repo = hub_server.repos["me/tiny"]
    exported = files_in(out)
    assert {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "lineage.json",
        "README.md",
    } <= exported.keys()
    assert repo.private and repo.branches["main"] == exported, "the Hub holds exactly the exported bytes"
    assert repo.commits[0]["summary"].startswith("v1 in bf16, exported by mixloop")
    assert f"pushed {out} to me/tiny: {repo.commits[0]['url']}\n" in capsys.readouterr().out
    # Again in fp16 and sharded, onto a new branch (from main) of the repo that now exists: the branch
    # holds the new shards and not main's model.safetensors, and main stays as it was.
    again = tmp_path / "fp16"
    assert (
        main(
            [
                "models",
                "export",
                str(version),
                "v1",
                str(again),
                "--dtype",
                "fp16",
                "--max-shard-size",
                "40KB",
                "--push-to-hub",
                "me/tiny",
                "--revision",
                "fp16",
            ]
        )
        == 0
    )
    assert "model.safetensors" not in files_in(again) and (again / "model.safetensors.index.json").exists()
    assert repo.branches["fp16"] == files_in(again) and repo.branches["main"] == exported
    assert f"to me/tiny (branch fp16): {repo.commits[1]['url']}" in capsys.readouterr().out


def closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize(
    "case, repo, cause",
    [
        ("wrong token", "me/tiny", "the Hub refused your token (401). Fix: set HF_TOKEN to a valid token"),
        ("another's namespace", "someone-else/tiny", "your token may not create or write to it (403)"),
        ("no network", "me/tiny", "cannot reach the Hub at http://127.0.0.1:"),
    ],
)
def test_a_failed_push_says_why_in_one_line_and_keeps_the_export(
    version, tmp_path, hub_server, monkeypatch, capsys, case, repo, cause
):
    if case == "wrong token":
        monkeypatch.setenv("HF_TOKEN", "hf_not_this_one")
    if case == "no network":
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    out = tmp_path / "exported"
    assert main(["models", "export", str(version), "v1", str(out), "--push-to-hub", repo, "--private"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"mixloop: error: --push-to-hub {repo}: {cause}") and err.count("\n") == 1, err
    retry = f"hf upload {repo} {out} . --private --delete '*.safetensors' --delete '*.safetensors.index.json'"
    assert "Fix: " in err and f"then upload the export kept in {out}: `{retry}`." in err
    assert (out / "model.safetensors").exists() and not hub_server.repos


@pytest.mark.parametrize(
    "case, argv, message",
    [
        ("offline", ["--push-to-hub", "me/tiny"], "HF_HUB_OFFLINE is set, so nothing can be uploaded. Fix: unset"),
        ("no token", ["--push-to-hub", "me/tiny"], "no Hugging Face token. Fix: log in with `hf auth login`"),
        ("bad id", ["--push-to-hub", "me/tiny/v1"], "--push-to-hub me/tiny/v1: not a repo id"),
        ("no repo", ["--private"], "--private and --revision go with --push-to-hub. Fix:"),
    ],
)
def test_a_push_that_cannot_work_is_refused_before_the_export(
    version, tmp_path, hub_server, monkeypatch, capsys, case, argv, message
):
    import huggingface_hub.constants

    if case == "offline":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    if case == "no token":
        monkeypatch.delenv("HF_TOKEN")
        monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))  # no login
    out = tmp_path / "exported"
    assert main(["models", "export", str(version), "v1", str(out), *argv]) == 1
    assert message in capsys.readouterr().err
    assert not out.exists() and not hub_server.requests
