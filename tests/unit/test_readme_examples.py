"""Every YAML example of the READMEs is a valid spec: pipeline specs (or fragments of one) and search specs.

The examples name files that do not exist here (s3://bucket/..., data/web/*.jsonl), so pipeline specs
are checked without their files: structure and every check that needs only the spec. Ray cluster
configs and Kubernetes manifests are left to test_cluster_configs.py.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from mixloop.config import PipelineConfig, check_spec_data
from mixloop.tuning.search import load_search

REPO = Path(__file__).parents[2]
READMES = [REPO / "README.md", REPO / "tuning" / "README.md", REPO / "cluster" / "README.md"]
FENCE = re.compile(r"^```yaml[ \t]*\n(.*?)^```", re.DOTALL | re.MULTILINE)
REQUIRED = [field.alias or name for name, field in PipelineConfig.model_fields.items() if field.is_required()]


def yaml_blocks() -> list[tuple[str, str]]:
    """(README:line, text) of every ```yaml block."""
    blocks = []
    for readme in (r for r in READMES if r.is_file()):
        text = readme.read_text()
        for match in FENCE.finditer(text):
            line = text.count("\n", 0, match.start()) + 1
            blocks.append((f"{readme.relative_to(REPO)}:{line}", match.group(1)))
    return blocks


BLOCKS = yaml_blocks()


def kind_of(data: dict) -> str:
    if {"cluster_name", "provider", "available_node_types"} & data.keys() or {"apiVersion", "kind"} <= data.keys():
        return "cluster"
    if "pipeline" in data and {"space", "objective"} & data.keys():
        return "search"
    return "pipeline" if all(key in data for key in REQUIRED) else "pipeline fragment"


def test_the_readmes_have_yaml_examples():
    assert any(where.startswith("README.md") for where, _ in BLOCKS)


@pytest.mark.parametrize("where, text", BLOCKS, ids=[where for where, _ in BLOCKS])
def test_yaml_example_is_valid(where, text, tmp_path):
    data = yaml.safe_load(text)
    assert isinstance(data, dict), f"{where}: an example should be a mapping"
    kind = kind_of(data)
    if kind == "cluster":
        pytest.skip("Ray cluster configs are checked by test_cluster_configs.py")
    if kind == "search":
        # A search spec lives in tuning/ and names its pipeline relative to it.
        data["pipeline"] = str((REPO / "tuning" / data["pipeline"]).resolve())
        (tmp_path / "search.yaml").write_text(yaml.safe_dump(data))
        load_search(tmp_path / "search.yaml")
        return
    readme_dir = str((REPO / where.split(":")[0]).parent)
    problems = check_spec_data(data, readme_dir, files=False)
    if kind == "pipeline fragment":  # a few keys shown on their own: what the others would say is left out
        problems = [
            p
            for p in problems
            if not re.fullmatch(r"\w+: required but missing\..*", p) and re.split(r"[.\[:]", p)[0] in data
        ]
    assert problems == [], f"{where} ({kind}):\n" + "\n".join(problems)


def test_the_main_example_writes_token_budgets_as_2e9_and_means_them():
    """YAML 1.1 reads 2.0e9 as a string: the spec takes it as the whole number it stands for."""
    main = next(text for where, text in BLOCKS if where.startswith("README.md") and "stages:" in text)
    data = yaml.safe_load(main)
    assert data["stages"][0]["tokens"] == "2.0e9"
    assert PipelineConfig.model_validate(data).stages[0].tokens == 2_000_000_000
