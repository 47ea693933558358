"""Edits of a pipeline file that keep the user's comments, key order and layout: new entries appended
to a top-level section (`corpora:`, `stages:`, block or flow style) in ruamel.yaml's round-trip mode;
the result must validate before it replaces the file. What ruamel cannot keep: spaces that align
values (`web:   {...}`), and a flow collection written over several lines, which becomes one line
(an edit that would drop a comment inside one is refused)."""

from __future__ import annotations

import copy
import io
import re
from collections import Counter
from pathlib import Path
from typing import Any

import yaml as pyyaml
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import YAMLError
from ruamel.yaml.nodes import ScalarNode
from ruamel.yaml.representer import RoundTripRepresenter
from ruamel.yaml.tokens import CommentToken

from mixloop.config.load import load_spec
from mixloop.errors import MixloopError, SpecError

Collection = CommentedMap | CommentedSeq
Entries = dict[str, Any] | list[Any]  # a section's new entries: a mapping for `corpora`, a list for `stages`
STR = "tag:yaml.org,2002:str"


class _Representer(RoundTripRepresenter):
    """ruamel writes YAML 1.2; the spec is read with PyYAML (YAML 1.1), so new values are written as both
    read them the same way."""

    def _str(self, value: str) -> ScalarNode:
        plain_is_str = pyyaml.resolver.Resolver().resolve(pyyaml.ScalarNode, value, (True, False)) == STR
        return self.represent_scalar(STR, value, style=None if plain_is_str else "'")  # `no`, `on`: not booleans

    def _float(self, value: float) -> ScalarNode:
        text = repr(value)
        if "e" in text and "." not in text:  # PyYAML reads 1e-05 as a string, 1.0e-05 as a number
            return self.represent_scalar("tag:yaml.org,2002:float", text.replace("e", ".0e", 1))
        return self.represent_float(value)


_Representer.add_representer(str, _Representer._str)
_Representer.add_representer(float, _Representer._float)


def append_entries(pipeline_path: Path, additions: dict[str, Entries], note: str | None = None) -> str:
    """The file's text with `additions` (section name -> its new entries: a list for `stages`, a mapping
    for `corpora`) at the end of each section, styled as the section's last entry is; `note`, if given,
    a comment line before each block-style section's new entries."""
    text = pipeline_path.read_text()
    mapping, sequence, offset = _indents(text)
    yaml = YAML()
    yaml.Representer = _Representer
    yaml.preserve_quotes = True
    yaml.width = 10_000  # no line wrapped anew (a flow collection is written on one line)
    yaml.indent(mapping=mapping, sequence=sequence, offset=offset)
    try:
        document = yaml.load(text)
    except YAMLError as exc:
        raise MixloopError(f"{pipeline_path}: not YAML:\n{exc}") from None
    for section, entries in additions.items():
        if not entries:
            continue
        node = document.get(section) if isinstance(document, CommentedMap) else None
        kind = CommentedSeq if isinstance(entries, list) else CommentedMap
        if not isinstance(node, kind) or not node:
            raise MixloopError(
                f"{pipeline_path}: no `{section}:` {'list' if kind is CommentedSeq else 'mapping'} to add to. "
                f"Fix: give the spec its {section}, then add again."
            )
        _append(node, entries, note, offset if kind is CommentedSeq else mapping)
    out = io.StringIO()
    yaml.dump(document, out)
    _check_comments_kept(pipeline_path, text, out.getvalue())
    return out.getvalue()


def _append(node: Collection, entries: Entries, note: str | None, column: int) -> None:
    """Add the entries after the section's last one; the comment lines that followed the section (they
    belong to its last line in ruamel's model) move down to follow the new last line."""
    trailing = _take_trailing_comment(node)
    first: object
    if isinstance(node, CommentedMap) and isinstance(entries, dict):
        model, first = node[list(node)[-1]], next(iter(entries))
        node.update((key, _styled_like(value, model)) for key, value in entries.items())
    elif isinstance(node, CommentedSeq) and isinstance(entries, list):
        model, first = node[-1], len(node)
        node.extend(_styled_like(value, model) for value in entries)
    else:
        raise TypeError(f"entries {type(entries).__name__} for a section {type(node).__name__}")
    if note and not node.fa.flow_style():  # inside brackets it would be a comment the next edit cannot keep
        node.yaml_set_comment_before_after_key(first, before=note, indent=column)
    if trailing is not None:
        container, key = _last_line(node)
        slots = container.ca.items.setdefault(key, [None] * 4)
        slots[_comment_slot(container)] = trailing


def _styled_like(value: Any, model: Any) -> Any:
    """`value` as ruamel nodes, in flow style where `model` (the existing entry it follows, or its part
    under the same key) is, in block style elsewhere."""
    if not isinstance(value, dict | list):
        return value
    flow = isinstance(model, Collection) and bool(model.fa.flow_style())
    node: Collection
    if isinstance(value, dict):
        parts = model if isinstance(model, dict) else {}
        node = CommentedMap((key, _styled_like(part, parts.get(key))) for key, part in value.items())
    else:
        first = model[0] if isinstance(model, list) and model else None
        node = CommentedSeq(_styled_like(part, first) for part in value)
    node.fa.set_flow_style() if flow else node.fa.set_block_style()
    return node


def _last_line(node: Collection) -> tuple[Collection, object]:
    """(collection, key) whose comment slot holds what follows the node's last line: its deepest last
    block-style entry."""
    while True:
        key = list(node)[-1] if isinstance(node, CommentedMap) else len(node) - 1
        value = node[key]
        if not (isinstance(value, Collection) and value and not value.fa.flow_style()):
            return node, key
        node = value


def _comment_slot(container: Collection) -> int:
    return 2 if isinstance(container, CommentedMap) else 0  # ruamel's place for a comment after an entry


def _take_trailing_comment(node: Collection) -> CommentToken | None:
    """Remove the comment lines after the section's last line (its end-of-line comment stays) and return
    them, or None. A flow-style section keeps them after its closing bracket without help."""
    if node.fa.flow_style():
        return None
    container, key = _last_line(node)
    slots = container.ca.items.get(key)
    token: CommentToken | None = slots[_comment_slot(container)] if slots else None
    if token is None:
        return None
    end_of_line, _, rest = token.value.partition("\n")
    if not rest:
        return None  # only an end-of-line comment
    moved = copy.copy(token)
    moved.value = "\n" + rest
    if end_of_line.strip():
        token.value = end_of_line + "\n"
    else:
        slots[_comment_slot(container)] = None
    return moved


def _indents(text: str) -> tuple[int, int, int]:
    """(mapping indent, sequence indent, dash offset) of the file's block collections, so that ruamel
    writes the file as it is indented (defaults: PyYAML's)."""
    mapping, sequence, offset = None, None, None
    lines = [line for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    for above, line in zip(lines, lines[1:]):
        if not re.fullmatch(r"[^#]*:\s*(#.*)?", above.rstrip()):
            continue  # only a key whose value starts on the next line says how far it is indented
        key_column = len(above) - len(above.lstrip(" -"))
        if line.lstrip().startswith("- ") and sequence is None:
            dash = len(line) - len(line.lstrip())
            offset = dash - key_column
            sequence = len(line) - len(line.lstrip(" -")) - key_column
        elif not line.lstrip().startswith("- ") and mapping is None:
            mapping = len(line) - len(line.lstrip()) - key_column
    offset = max(offset or 0, 0)
    return mapping or 2, max(sequence or 2, offset + 2), offset


def _check_comments_kept(pipeline_path: Path, before: str, after: str) -> None:
    """ruamel drops comments inside a flow collection written over several lines: refuse such an edit
    rather than lose the user's notes."""
    lost = Counter(_comments(before)) - Counter(_comments(after))
    if lost:
        raise MixloopError(
            f"{pipeline_path}: adding to it would drop the comment {next(iter(lost))!r} (comments inside a "
            "[...] or {...} written over several lines cannot be kept). Fix: move the comment out of the "
            "brackets, or write that section one entry per line, then add again."
        )


def _comments(text: str) -> list[str]:
    """Each line's comment, as a plain reader sees one (a '#' at the start or after a space; one inside a
    quoted string counts too, and is kept like the string)."""
    return [match.group(1).strip() for match in re.finditer(r"(?:^|\s)(#.*)$", text, re.MULTILINE)]


def replace_validated(pipeline_path: Path, text: str, what: str, write: bool = True) -> None:
    """Write `text` over the pipeline file if it is a valid spec (checked next to the real file, so that
    its relative paths resolve the same way; `write=False` only checks); MixloopError naming `what`
    otherwise."""
    candidate = pipeline_path.with_name(f".{pipeline_path.name}.candidate")
    candidate.write_text(text)
    try:
        load_spec(candidate)
    except SpecError as exc:
        candidate.unlink()
        raise MixloopError(f"{what} would make {pipeline_path} invalid:\n{exc}") from None
    if write:
        candidate.replace(pipeline_path)
    else:
        candidate.unlink()
