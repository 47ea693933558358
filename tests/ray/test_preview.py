"""`mixloop data preview`: what a stage will train on, before training."""

from __future__ import annotations

from mixloop.cli import main
from support import generated_spec, write_spec


def test_preview_shows_shares_passes_and_rows_without_training(ray_address, tmp_path, capsys):
    stage = {"name": "mixed", "mixture": {"facts": 0.75, "chats": 0.25}, "tokens": 204800, "max_repeats": 2}
    spec = write_spec(tmp_path, generated_spec(tmp_path / "run", [stage]))
    assert main(["data", "preview", str(spec), "--address", ray_address]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert ["stage", "corpus", "documents", "tokens", "rows", "rejected", "blank", "share", "passes", "format"] in [
        line.split() for line in lines
    ]
    rows = {line.split()[1]: line.split() for line in lines if line.startswith("mixed ")}
    assert set(rows) == {"facts", "chats"}
    assert rows["facts"][2] == "400" and rows["chats"][2] == "300"  # documents generated
    assert rows["facts"][6] == "0"  # blank lines
    assert (rows["facts"][9], rows["chats"][9]) == ("text", "conversations")  # the records' shapes
    assert abs(float(rows["facts"][7].rstrip("%")) - 75.0) <= 1.0
    assert float(rows["facts"][8]) > 1.0, "200k tokens of a ~25k-token corpus need repeats"
    warned = {line.split("'")[1] for line in lines if line.startswith("warning:")}
    assert warned == {name for name, row in rows.items() if float(row[8]) > 2} and warned
    assert not (tmp_path / "run" / "train").exists()
    assert main(["data", "preview", str(spec), "--stage", "nope"]) == 1
