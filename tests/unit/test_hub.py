"""Models from the Hugging Face Hub by id: Llama, Qwen2 and Qwen3 tiny models saved in the real cache
layout and read with HF_HUB_OFFLINE=1; the spec's tokenizer comes from the model."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from transformers import (
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from mixloop.cli import main
from mixloop.config import load_spec
from mixloop.data.corpora import Corpora
from mixloop.data.packing import Packer, model_inputs
from mixloop.errors import SpecError
from mixloop.runs.stages import ensure_base
from mixloop.train.model import load_model
from support import cache_dataset

ARCHITECTURES = {
    "llama": (LlamaConfig, LlamaForCausalLM),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM),
    "qwen3": (Qwen3Config, Qwen3ForCausalLM),
}
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def cache_model(cache: Path, repo: str, architecture: str, tokenizer) -> Path:
    """A tiny model of `architecture` as huggingface_hub keeps a download: snapshots/<commit>/, refs/main."""
    config_class, model_class = ARCHITECTURES[architecture]
    config = config_class(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        rope_theta=5e4,
        tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    repo_folder = cache / f"models--{repo.replace('/', '--')}"
    snapshot = repo_folder / "snapshots" / COMMIT
    model_class(config).save_pretrained(snapshot)
    tokenizer.save_pretrained(snapshot)
    (repo_folder / "refs").mkdir(parents=True)
    (repo_folder / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def hub(tmp_path, monkeypatch, trained_tokenizer):
    cache = tmp_path / "hf-cache"
    for name in ARCHITECTURES:
        cache_model(cache, f"tiny-org/{name}", name, trained_tokenizer)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return cache


def spec_file(tmp_path: Path, model: dict) -> Path:
    (tmp_path / "web.jsonl").write_text('{"text": "the sun is far"}\n')
    spec = {
        "name": "hub",
        "workdir": str(tmp_path / "run"),
        "model": model,
        "corpora": {"web": {"kind": "text", "path": "web.jsonl"}},
        "defaults": {"seq_len": 32, "global_batch_tokens": 128, "micro_batch_rows": 4},
        "stages": [{"name": "s", "mixture": {"web": 1}, "tokens": 128}],
    }
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def row(documents: list[np.ndarray], seq_len: int, pad: int) -> dict:
    packer = Packer(seq_len, pad, split_documents=False)
    rows = [r for ids in documents for r in packer.add(ids, np.ones(len(ids), bool))] + list(packer.flush())
    inputs = model_inputs(*(a[None] for a in rows[0]))
    return {k: inputs[k] for k in ("input_ids", "attention_mask", "position_ids")}


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_a_hub_model_loads_offline_and_packed_documents_never_see_each_other(hub, tmp_path, architecture):
    spec = load_spec(spec_file(tmp_path, {"path": f"tiny-org/{architecture}"}))
    folder, commit = spec.model_folder()
    assert Path(folder) == hub / f"models--tiny-org--{architecture}" / "snapshots" / COMMIT and commit == COMMIT
    model = load_model(folder).eval()
    assert type(model).__name__ == ARCHITECTURES[architecture][1].__name__
    rng = np.random.default_rng(0)
    vocab, pad = model.config.vocab_size, model.config.pad_token_id
    second = rng.integers(3, vocab, 12).astype(np.int32)
    with torch.no_grad():
        logits = [
            model(**row([rng.integers(3, vocab, 10).astype(np.int32), second], 32, pad)).logits[0, 10:22]
            for _ in range(2)
        ]
        alone = model(input_ids=torch.as_tensor(second[None], dtype=torch.long)).logits[0]
    torch.testing.assert_close(logits[0], logits[1], atol=1e-5, rtol=0)  # the first document changed: not the second
    torch.testing.assert_close(logits[0], alone, atol=1e-4, rtol=0)


def test_the_base_version_copies_the_hub_model_with_its_tokenizer_and_commit(hub, tmp_path):
    spec = load_spec(spec_file(tmp_path, {"path": "tiny-org/qwen2", "revision": "main"}))
    corpora = Corpora(spec)
    lineage = ensure_base(spec, corpora.tokenizer())
    assert lineage.model["path"] == "tiny-org/qwen2" and lineage.model_commit == COMMIT
    copy_path = tmp_path / "elsewhere" / "pipeline.yaml"  # the workdir's own copy names the model by its id
    copy_path.parent.mkdir()
    copy_path.write_text(yaml.safe_dump(spec.portable()))
    assert spec.portable()["model"]["path"] == "tiny-org/qwen2"
    assert load_spec(copy_path).model_folder() == spec.model_folder()
    snapshot = hub / "models--tiny-org--qwen2" / "snapshots" / COMMIT
    texts = ["the sun is far", "hello world 42, why?"]  # no tokenizer section: the model's own
    assert [AutoTokenizer.from_pretrained(tmp_path / "run/models/base")(t)["input_ids"] for t in texts] == [
        AutoTokenizer.from_pretrained(snapshot)(t)["input_ids"] for t in texts
    ]
    base, original = load_model(str(tmp_path / "run/models/base")), load_model(str(snapshot))
    assert all(torch.equal(a, b) for a, b in zip(base.state_dict().values(), original.state_dict().values()))


def test_a_hub_model_missing_from_the_cache_offline_is_a_spec_problem_with_its_fix(hub, tmp_path, capsys):
    path = spec_file(tmp_path, {"path": "tiny-org/not-downloaded"})
    with pytest.raises(SpecError) as error:
        load_spec(path)
    assert "model.path: tiny-org/not-downloaded is not in the Hugging Face cache" in str(error.value)
    assert "Fix: download it once where there is a network (`hf download tiny-org/not-downloaded`)" in str(error.value)
    assert main(["validate", str(path)]) == 2 and "Traceback" not in capsys.readouterr().err
    with pytest.raises(SpecError, match="model.revision: only a hub id in model.path has revisions"):
        load_spec(spec_file(tmp_path, {"preset": "micro", "revision": "main"}))
    with pytest.raises(SpecError, match="tokenizer: required unless model.path gives the model's own"):
        load_spec(spec_file(tmp_path, {"preset": "micro"}))


def test_a_pipeline_chat_template_goes_into_the_workdirs_tokenizer_and_cannot_change_later(tmp_path):
    from mixloop.data.tokenizer import load_tokenizer
    from mixloop.errors import StageConflictError

    template = tmp_path / "template.jinja"
    template.write_text(
        "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}<|im_end|>{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    path = spec_file(tmp_path, {"preset": "micro"})
    data = yaml.safe_load(path.read_text())
    path.write_text(
        yaml.safe_dump({**data, "tokenizer": {"train": {"vocab_size": 300}}, "chat_template": "template.jinja"})
    )
    tokenizer_dir = Corpora(load_spec(path)).tokenizer()
    assert load_tokenizer(tokenizer_dir).chat_template == template.read_text()
    template.write_text("{{ messages }}")
    with pytest.raises(StageConflictError, match="was made from another tokenizer spec or files"):
        Corpora(load_spec(path)).tokenizer()
    path.write_text(
        yaml.safe_dump({**data, "tokenizer": {"train": {"vocab_size": 300}}, "chat_template": "none.jinja"})
    )
    with pytest.raises(SpecError, match="chat_template: no template in .*none.jinja"):
        load_spec(path)


GSM_README = """---
configs:
- config_name: main
  data_files:
  - split: train
    path: main/train-*.parquet
  - split: test
    path: main/test.parquet
- config_name: socratic
  data_files:
  - split: train
    path: socratic/train.jsonl
---
# a tiny dataset with two subsets, laid out as on the Hub
"""


def gsm_rows(split: str, count: int) -> list[dict]:
    return [{"question": f"{split} question {i}?", "answer": f"the answer is {i}."} for i in range(count)]


@pytest.fixture
def hub_dataset(hub):
    return cache_dataset(
        hub,
        "tiny-org/gsm",
        COMMIT,
        {
            "README.md": GSM_README,
            "main/train-00000-of-00002.parquet": gsm_rows("train", 4),
            "main/train-00001-of-00002.parquet": gsm_rows("train-b", 2),
            "main/test.parquet": gsm_rows("test", 3),
            "socratic/train.jsonl": "".join(json.dumps(row) + "\n" for row in gsm_rows("socratic", 3)),
        },
    )


def dataset_spec(tmp_path: Path, corpus: dict) -> Path:
    path = spec_file(tmp_path, {"preset": "micro"})
    data = yaml.safe_load(path.read_text())
    data["tokenizer"] = {"train": {"vocab_size": 300}}
    data["corpora"]["gsm"] = {
        "kind": "chat",
        "dataset": "tiny-org/gsm",
        "columns": {"instruction": "question", "output": "answer"},
        **corpus,
    }
    path.write_text(yaml.safe_dump(data))
    return path


def test_a_hub_dataset_split_is_read_from_the_cache_by_its_subsets_files(hub_dataset, tmp_path):
    from mixloop.data.files import iter_records, list_chunks
    from mixloop.data.records import checked
    from mixloop.storage.fs import expand_files

    corpora = Corpora(load_spec(dataset_spec(tmp_path, {"subset": "main", "eval": "test"})))
    files = corpora.files("gsm")
    assert files == {
        "train": tuple(str(hub_dataset / f"main/train-0000{i}-of-00002.parquet") for i in (0, 1)),
        "eval": (str(hub_dataset / "main/test.parquet"),),
    }
    chats = [
        checked(record, "chat", "auto", {"instruction": "question", "output": "answer"})
        for chunk in list_chunks(expand_files(files["train"]), None)
        for _, record in iter_records(chunk)
    ]
    assert [turns[0]["content"] for turns, shape in chats] == [f"train question {i}?" for i in range(4)] + [
        f"train-b question {i}?" for i in range(2)
    ]
    assert {shape for _, shape in chats} == {"alpaca"}
    copy = tmp_path / "elsewhere" / "pipeline.yaml"  # the workdir's copy keeps the split's name
    copy.parent.mkdir()
    copy.write_text(yaml.safe_dump(corpora.spec.portable()))
    assert Corpora(load_spec(copy)).files("gsm") == files
    assert Corpora(load_spec(dataset_spec(tmp_path, {"subset": "socratic"}))).files("gsm") == {
        "train": (str(hub_dataset / "socratic/train.jsonl"),)
    }


def test_hub_dataset_problems_name_the_yaml_path_and_the_fix(hub_dataset, tmp_path, capsys):
    problems = {
        "corpora.gsm.split: dataset tiny-org/gsm has no split 'validation' in the Hugging Face cache (it has "
        "train, test)": {"subset": "main", "split": "validation"},
        "corpora.gsm.eval: dataset tiny-org/gsm has no split 'dev'": {"subset": "main", "eval": "dev"},
        "corpora.gsm.split: dataset tiny-org/gsm: ": {"subset": "nope"},  # the known subsets follow
        "corpora.gsm.split: dataset tiny-org/elsewhere is not in the Hugging Face cache": {
            "dataset": "tiny-org/elsewhere"
        },
        "corpora.gsm.dataset: 'gsm' is not a hub id": {"dataset": "gsm"},
        "corpora.gsm: give exactly one of `path` (files), `dataset`": {"path": "web.jsonl"},
    }
    for expected, corpus in problems.items():
        with pytest.raises(SpecError) as error:
            load_spec(dataset_spec(tmp_path, corpus))
        assert expected in str(error.value), str(error.value)
    assert "`hf download tiny-org/elsewhere --repo-type dataset`" in str(
        pytest.raises(SpecError, load_spec, dataset_spec(tmp_path, {"dataset": "tiny-org/elsewhere"})).value
    )
    unknown_subset = pytest.raises(SpecError, load_spec, dataset_spec(tmp_path, {"subset": "nope"}))
    assert "'main', 'socratic'" in str(unknown_subset.value)
    with pytest.raises(SpecError, match="corpora.web.subset: only a hub dataset"):
        load_spec(_with_web(tmp_path, {"subset": "main"}))
    with pytest.raises(SpecError, match="corpora.web.split: only a hub dataset"):  # even the default's value
        load_spec(_with_web(tmp_path, {"split": "train"}))
    path = dataset_spec(tmp_path, {"dataset": "tiny-org/elsewhere"})
    assert main(["validate", str(path)]) == 2 and "Traceback" not in capsys.readouterr().err


def _with_web(tmp_path: Path, extra: dict) -> Path:
    path = spec_file(tmp_path, {"preset": "micro"})
    data = yaml.safe_load(path.read_text())
    data["tokenizer"] = {"train": {"vocab_size": 300}}
    data["corpora"]["web"].update(extra)
    path.write_text(yaml.safe_dump(data))
    return path
