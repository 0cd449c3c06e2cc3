"""The data-file reader shared by training and evaluation (`record_files`): every record named by file and
line (JSONL) or index (JSON list, parquet), bad records reported in place, unreadable files refused."""

from __future__ import annotations

import json

import pytest

from slowfast_vlm.record_files import Row, read_record_file


def test_jsonl_rows_are_named_by_line_and_bad_lines_say_why(tmp_path):
    path = tmp_path / "d.jsonl"
    # line 2 blank, line 3 cut, line 4 a list; CRLF endings; a U+2028 inside a string is not a line break
    path.write_bytes('{"id": "a"}\r\n\r\n{"id": \r\n[1, 2]\r\n{"id": "b\u2028c"}\r\n'.encode())
    rows = read_record_file(path)
    assert [row.where for row in rows] == [f"{path}:{n}" for n in (1, 3, 4, 5)]
    assert rows[0] == Row(f"{path}:1", {"id": "a"}, None)
    assert rows[1].record is None and rows[1].problem.startswith("malformed JSON (Expecting value")
    assert rows[2] == Row(f"{path}:4", None, "expected a JSON object, got list")
    assert rows[3].record == {"id": "b\u2028c"}


def test_json_and_parquet_rows_are_named_by_index(tmp_path):
    records = [{"id": "a", "n": 1}, {"id": "b", "n": 2}]
    path = tmp_path / "d.json"
    path.write_text(json.dumps([records[0], "text", records[1]]))
    assert read_record_file(path) == [
        Row(f"{path}[0]", records[0]),
        Row(f"{path}[1]", None, "expected a JSON object, got str"),
        Row(f"{path}[2]", records[1]),
    ]
    pd = pytest.importorskip("pandas", reason="parquet support is optional (pandas + pyarrow)")
    pytest.importorskip("pyarrow", reason="parquet support is optional (pandas + pyarrow)")
    table = tmp_path / "d.parquet"
    pd.DataFrame(records).to_parquet(table)
    assert read_record_file(table) == [Row(f"{table}[0]", records[0]), Row(f"{table}[1]", records[1])]


@pytest.mark.parametrize(
    "name, content, error, message",
    [
        ("gone.jsonl", None, FileNotFoundError, "gone.jsonl: no such data file"),
        (
            "d.csv",
            b"id\na\n",
            ValueError,
            r"d.csv: unsupported data format '.csv' \(use .json, .jsonl, .parquet\)",
        ),
        ("d.json", b'[{"id": 1},', ValueError, r"d.json: malformed JSON \("),
        ("d.json", b'{"id": 1}', ValueError, "d.json: expected a JSON list of objects, got dict"),
        ("d.jsonl", b'{"id": "\xff"}\n', ValueError, "d.jsonl: not UTF-8 text"),
        ("d.jsonl", b"\n  \n", ValueError, "d.jsonl: no records"),
        ("d.json", b"[]", ValueError, "d.json: no records"),
    ],
)
def test_unreadable_files_are_refused_with_their_name(tmp_path, name, content, error, message):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(error, match=message):
        read_record_file(path)
