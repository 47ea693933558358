"""A version loads the same under transformers 4.57 (what many serving stacks still pin) as under 5.x:
the RoPE base, the tokenizer class and its extra special tokens, checked by logits and token ids in a
throwaway virtualenv."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
import sysconfig
import venv

import pytest
import torch

from mixloop.train.model import model_config, new_model
from mixloop.versioning.export import export
from mixloop.versioning.registry import publish
from support import lineage_of

pytestmark = pytest.mark.slow

LOGITS = """
import json, sys, torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
ids = tokenizer.apply_chat_template([{"role": "user", "content": "the sun is far"}], add_generation_prompt=True,
                                    return_tensors="pt", return_dict=True)["input_ids"]
with torch.no_grad():
    logits = model(ids).logits[0]
print(json.dumps({"version": transformers.__version__, "rope_theta": model.config.rope_theta if hasattr(model.config, "rope_theta") else None,
                  "ids": ids[0].tolist(), "logits": logits.tolist(), "special": sorted(tokenizer.all_special_tokens),
                  "tool_ids": tokenizer("<tool_call>the sun</tool_call>")["input_ids"]}))
"""


@pytest.fixture(scope="module")
def transformers_457(tmp_path_factory) -> str:
    """A virtualenv whose transformers is 4.57 (from PyPI), with torch and the rest from this one."""
    folder = tmp_path_factory.mktemp("transformers-4.57")
    venv.create(folder, with_pip=True)
    python = str(folder / "bin" / "python")
    site = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    # Appended after the new venv's own site-packages: transformers 4.57 and what it pins shadow ours.
    (folder / site.split(str(folder))[-1].lstrip("/")).joinpath("zz-parent.pth").write_text(
        sysconfig.get_paths()["purelib"] + "\n"
    )
    subprocess.run(
        [python, "-m", "pip", "install", "-q", "--disable-pip-version-check", "transformers==4.57.*"],
        check=True,
        timeout=600,
    )
    return python


def run_logits(python: str, folder) -> dict:
    done = subprocess.run([python, "-c", LOGITS, str(folder)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_an_exported_version_gives_the_same_logits_under_transformers_4_57(
    transformers_457, tmp_path, trained_tokenizer
):
    config = model_config("micro", {"rope_theta": 5e5}, trained_tokenizer)  # not 4.x's default base (1e4)
    new_model(config, seed=0).save_pretrained(tmp_path / "weights")
    tokenizer = copy.deepcopy(trained_tokenizer)  # 5.x saves these as a list 4.57 cannot read, as MiniMind's
    tokenizer.add_special_tokens({"extra_special_tokens": ["<tool_call>", "</tool_call>"]})
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    publish(str(tmp_path / "run"), str(tmp_path / "weights"), str(tmp_path / "tokenizer"), lineage_of("v1"))
    export(str(tmp_path / "run"), "v1", str(tmp_path / "exported"))

    older, newer = (
        run_logits(transformers_457, tmp_path / "exported"),
        run_logits(sys.executable, tmp_path / "exported"),
    )
    assert older["version"].startswith("4.57.") and newer["version"].startswith("5.")
    assert older["rope_theta"] == 5e5
    assert older["ids"] == newer["ids"]  # the same tokens, through the same chat template
    assert older["special"] == newer["special"] and "<tool_call>" in older["special"]
    assert (
        older["tool_ids"] == newer["tool_ids"] and tokenizer.convert_tokens_to_ids("<tool_call>") in older["tool_ids"]
    )
    torch.testing.assert_close(torch.tensor(older["logits"]), torch.tensor(newer["logits"]), atol=1e-4, rtol=0)
    config_json = json.loads((tmp_path / "run/models/v1/config.json").read_text())
    assert config_json["rope_theta"] == config_json["rope_parameters"]["rope_theta"] == 5e5  # GGUF converters read it
