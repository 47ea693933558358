"""`mixloop watch`: corpora dropped in an inbox become gated iterations, one at a time, in order;
a version that fails its gate is kept but does not become current; a restart does nothing twice."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml
from test_hard_edges import small_spec, text_file

from mixloop.cli import main
from support import write_spec


def wait_for(predicate, what: str, process, timeout_s: float = 420.0) -> None:
    deadline = time.time() + timeout_s
    while not predicate():
        assert process.poll() is None, f"watch stopped ({process.returncode}) while waiting for {what}"
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(1.0)


def drop(inbox: Path, name: str, seed: int) -> None:
    folder = inbox / name
    folder.mkdir(parents=True)
    text_file(folder / "text.jsonl", 120, seed=seed)
    text_file(folder / "eval.jsonl", 20, seed=seed + 100)
    (folder / "_READY").write_text("")  # last: the corpus is complete


def iteration_done(workdir: Path, count: int):
    def done() -> bool:
        state = json.loads((workdir / "inbox.json").read_text()) if (workdir / "inbox.json").exists() else {}
        return sum(entry["status"] == "done" for entry in state.get("corpora", {}).values()) >= count

    return done


def test_watch_turns_two_arrivals_into_gated_iterations_and_a_restart_does_nothing_twice(ray_address, tmp_path, capsys):
    corpora = {
        "web": {
            "kind": "text",
            "path": str(text_file(tmp_path / "web.jsonl", 200)),
            "eval": str(text_file(tmp_path / "web-eval.jsonl", 20, seed=1)),
        }
    }
    data = small_spec(tmp_path, corpora, [{"name": "s1", "mixture": {"web": 1.0}, "tokens": 1024}])
    data["gate"] = {"max_forgetting": 10.0}  # the first iteration passes
    spec = write_spec(tmp_path, data)
    workdir, inbox = tmp_path / "run", tmp_path / "inbox"
    inbox.mkdir()
    log = (tmp_path / "watch.log").open("w")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mixloop.cli",
            "watch",
            str(spec),
            "--inbox",
            str(inbox),
            "--poll-s",
            "1",
            "--address",
            ray_address,
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        drop(inbox, "court", seed=2)
        wait_for(iteration_done(workdir, 1), "the first iteration", process)
        # The second corpus must show an uptake it cannot reach: it fails its gate.
        data = yaml.safe_load(spec.read_text())
        data["gate"] = {"max_forgetting": 10.0, "min_uptake": 100.0}
        spec.write_text(yaml.safe_dump(data, sort_keys=False))
        drop(inbox, "market", seed=3)
        wait_for(iteration_done(workdir, 2), "the second iteration", process)
    finally:
        process.terminate()
        process.wait(timeout=60)
        log.close()
    output = (tmp_path / "watch.log").read_text()
    assert "Traceback" not in output, output[-3000:]
    assert output.index("adding it as corpus court") < output.index("adding it as corpus market")

    spec_data = yaml.safe_load(spec.read_text())
    assert [s["name"] for s in spec_data["stages"]] == ["s1", "court", "market"]
    assert spec_data["stages"][1]["mixture"] == {"court": 0.5, "web": 0.5}  # the template's replay
    assert spec_data["corpora"]["court"]["eval"].endswith("court/eval.jsonl")
    lineage = {v: json.loads((workdir / "models" / v / "lineage.json").read_text()) for v in ("s1", "court", "market")}
    assert lineage["court"]["gate"]["passed"] and lineage["court"]["gate"]["against"] == "s1"
    market = lineage["market"]["gate"]
    assert not market["passed"] and market["against"] == "court"
    assert market["failed"][0].startswith("uptake on market: +") and "(at least 100.0000)" in market["failed"][0]
    assert json.loads((workdir / "current.json").read_text())["version"] == "court"
    assert os.readlink(workdir / "models" / "current") == "court"
    assert "gate: market failed against court" in output and "court stays the current version" in output
    page = (workdir / "report" / "index.html").read_text()
    assert "court (current)" in page and "failed against court: uptake on market" in page

    # A restart finds both corpora done: nothing is added or trained again.
    before = spec.read_text()
    assert main(["watch", str(spec), "--inbox", str(inbox), "--once", "--address", ray_address]) == 0
    out = capsys.readouterr().out
    assert "every stage is done; nothing to train" in out and "adding it as corpus" not in out
    assert spec.read_text() == before
    assert main(["status", str(spec)]) == 0
    assert "current: court (passed against s1)" in capsys.readouterr().out
    assert sorted(p.name for p in (workdir / "models").iterdir() if not p.name.startswith(".")) == [
        "base",
        "court",
        "current",
        "market",
        "s1",
    ]

    # After the rejected iteration, the next starts from the current version; --tune searches its replay
    # share and re-warm (the template's stage, the stratified mix and one proposal) and keeps the winner.
    data = yaml.safe_load(spec.read_text())
    data["gate"] = {"max_forgetting": 10.0}
    spec.write_text(yaml.safe_dump(data, sort_keys=False))
    drop(inbox, "law", seed=4)
    assert (
        main(
            [
                "add",
                str(spec),
                "law",
                "--text",
                str(inbox / "law/text.jsonl"),
                "--eval",
                str(inbox / "law/eval.jsonl"),
                "--tune",
                "3",
                "--address",
                ray_address,
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    law = yaml.safe_load(spec.read_text())["stages"][-1]
    assert law["name"] == "law" and law["from"] == "court" and set(law["mixture"]) == {"law", "web", "court"}
    lineage = json.loads((workdir / "models" / "law" / "lineage.json").read_text())
    assert lineage["parent"] == "court" and lineage["metrics"]["tuned_by"]["trial"]
    assert json.loads((workdir / "current.json").read_text())["version"] == "law"
    assert "gate: law is now the current version (passed against court)" in out
    assert not list(tmp_path.glob(".pipeline.*"))  # the search spec it wrote is gone
