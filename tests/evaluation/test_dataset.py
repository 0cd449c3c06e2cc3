"""Reading video QA data files (`evaluation.dataset`): JSON, JSONL and parquet, the field names of
the public benchmarks, and named errors for bad records."""

from __future__ import annotations

import json

import pytest
from evaluation_helpers import OPTIONS

from slowfast_vlm.evaluation.dataset import MC_INSTRUCTION, OPEN_INSTRUCTION, load_samples
from slowfast_vlm.record_files import read_record_file


def test_samples_from_videomme_mvbench_egoschema_and_llava_records(tmp_path):
    (tmp_path / "abc.mkv").write_bytes(b"")
    records = [
        # VideoMME: videoID without suffix, "A. ..." options, letter answer, task_type
        dict(
            question_id="001-1",
            videoID="abc",
            question="What?",
            options=["A. x", "B. y"],
            answer="B",
            task_type="OCR",
            duration="short",
        ),
        # MVBench: candidates, answer given as the option text
        dict(video="m.mp4", question="Where?", candidates=["left", "right"], answer="right"),
        # EgoSchema: "option N" fields, answer index
        {
            "q_uid": "e1",
            "video_idx": "e1.mp4",
            "question": "Why?",
            "option 0": "p",
            "option 1": "q",
            "answer": 1,
        },
        # open-ended, no id: the row number is the id
        dict(video="o.mp4", question="Color?", answer="red"),
        # LLaVA-style conversations: the human turn is the prompt as is
        dict(
            id="s1",
            video="s.mp4",
            conversations=[{"from": "human", "value": "<video>\nDigit?\nA. 1\nB. 2"}],
            options=["1", "2"],
            answer="A",
        ),
    ]
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records))
    samples = load_samples(path)
    assert [s.id for s in samples] == ["001-1", "1", "e1", "3", "s1"]
    assert samples[0].video == str(tmp_path / "abc.mkv")
    assert samples[0].prompt == f"What?\nA. x\nB. y\n{MC_INSTRUCTION}"
    assert (samples[0].answer, samples[0].category, samples[0].duration) == ("B", "OCR", "short")
    assert samples[1].prompt == f"Where?\nA. left\nB. right\n{MC_INSTRUCTION}" and samples[1].answer == "B"
    assert samples[2].options == {"A": "p", "B": "q"} and samples[2].answer == "B"
    assert samples[2].video == str(tmp_path / "e1.mp4")
    assert samples[3].prompt == f"Color?\n{OPEN_INSTRUCTION}" and samples[3].answer == "red"
    assert samples[3].options is None
    assert samples[4].prompt == "Digit?\nA. 1\nB. 2" and samples[4].answer == "A"


def test_json_jsonl_and_parquet_give_the_same_samples(dataset, tmp_path):
    pd = pytest.importorskip("pandas", reason="parquet support is optional (pandas + pyarrow)")
    pytest.importorskip("pyarrow", reason="parquet support is optional (pandas + pyarrow)")
    # a parquet column has one type: q6's list answer becomes a string in all three files
    records = [json.loads(line) for line in dataset.read_text().splitlines()]
    records = [dict(r, answer="two") if r["id"] == "q6" else r for r in records]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "qa.json").write_text(json.dumps(records))
    pd.DataFrame(records).to_parquet(tmp_path / "qa.parquet")
    expected = load_samples(tmp_path / "qa.jsonl", dataset.parent)
    assert len(expected) == 8 and expected[1].options == dict(zip("ABCD", OPTIONS))
    assert load_samples(tmp_path / "qa.json", dataset.parent) == expected
    assert load_samples(tmp_path / "qa.parquet", dataset.parent) == expected


def test_unreadable_data_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl: no such data file"):
        read_record_file(tmp_path / "nowhere.jsonl")
    (tmp_path / "one.json").write_text(json.dumps({"id": "a"}))
    with pytest.raises(ValueError, match="one.json: expected a JSON list of objects, got dict"):
        read_record_file(tmp_path / "one.json")
    (tmp_path / "qa.csv").write_text("id\na\n")
    with pytest.raises(ValueError, match="unsupported data format '.csv'"):
        read_record_file(tmp_path / "qa.csv")


@pytest.mark.parametrize(
    "record, message",
    [
        (dict(id="x", video="v.mp4", answer="A"), "bad.jsonl:1 \\(id 'x'\\): no question field"),
        (dict(id="x", question="Q?", answer="A"), "bad.jsonl:1 \\(id 'x'\\): no video field"),
        (dict(id="x", video="v.mp4", question="Q?"), "bad.jsonl:1 \\(id 'x'\\): no answer field"),
        (
            dict(id="x", video="v.mp4", question="Q?", options=["a", "b"], answer="C"),
            "bad.jsonl:1 \\(id 'x'\\): answer 'C'",
        ),
    ],
)
def test_bad_records_are_named(tmp_path, record, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(ValueError, match=message):
        load_samples(path)


def test_duplicate_ids_are_refused(tmp_path):
    path = tmp_path / "dup.jsonl"
    path.write_text(json.dumps(dict(id="a", video="v.mp4", question="Q?", answer="x")) + "\n")
    path.write_text(path.read_text() * 2)
    with pytest.raises(ValueError, match="sample id 'a' occurs more than once"):
        load_samples(path)
