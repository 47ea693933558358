"""Files as users have them: JSON arrays, CSV, Arrow files of a `save_to_disk` folder, beside JSON lines."""

from __future__ import annotations

import json

import pyarrow as pa

from mixloop.data.files import iter_records, list_chunks
from mixloop.data.records import BadRecord
from mixloop.storage.fs import expand_files


def records_of(path) -> list[tuple[str, object]]:
    return [item for chunk in list_chunks(expand_files(str(path)), None) for item in iter_records(chunk)]


def test_a_json_file_holds_an_array_or_json_lines(tmp_path):
    (tmp_path / "array.json").write_text('\ufeff [{"text": "a"},\n {"text": "b"}]')
    (tmp_path / "lines.json").write_text('{"text": "a"}\n{"text": "b"}\n')
    assert records_of(tmp_path / "array.json") == [
        (f"{tmp_path}/array.json[0]", {"text": "a"}),
        (f"{tmp_path}/array.json[1]", {"text": "b"}),
    ]
    assert [record for _, record in records_of(tmp_path / "lines.json")] == [{"text": "a"}, {"text": "b"}]
    (tmp_path / "broken.json").write_text('[{"text": "a"}, ')
    [(where, record)] = records_of(tmp_path / "broken.json")
    assert isinstance(record, BadRecord) and "cannot read the json file" in str(record)


def test_csv_fields_stay_text_and_rows_keep_their_line_numbers(tmp_path):
    (tmp_path / "chats.csv").write_text('instruction,input,output\n"multi\nline",,3.\nsecond,x,007\n')
    assert records_of(tmp_path / "chats.csv") == [
        (f"{tmp_path}/chats.csv:3", {"instruction": "multi\nline", "input": "", "output": "3."}),
        (f"{tmp_path}/chats.csv:4", {"instruction": "second", "input": "x", "output": "007"}),
    ]


def test_a_save_to_disk_folder_reads_as_its_arrow_files_in_order(tmp_path):
    for index in range(2):
        table = pa.Table.from_pylist([{"text": f"part {index} row {row}"} for row in range(2)])
        with pa.ipc.new_stream(str(tmp_path / f"data-0000{index}-of-00002.arrow"), table.schema) as writer:
            writer.write_table(table)
    files = [{"filename": f"data-0000{index}-of-00002.arrow"} for index in range(2)]
    (tmp_path / "state.json").write_text(json.dumps({"_data_files": files}))
    (tmp_path / "dataset_info.json").write_text("{}")
    assert [record["text"] for _, record in records_of(tmp_path)] == [
        "part 0 row 0",
        "part 0 row 1",
        "part 1 row 0",
        "part 1 row 1",
    ]
