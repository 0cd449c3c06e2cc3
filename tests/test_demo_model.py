"""The shipped demo model (the slow-fast model trained in experiments/synth) answers its sample clip."""

import json

import pytest
import torch

from slowfast_vlm.cli import main
from slowfast_vlm.default_model import DEMO_CLIP, DEMO_MODEL_DIR, default_model_path
from slowfast_vlm.processing.video import load_video
from slowfast_vlm.synth import check_detail, generate_clip, open_question

pytestmark = pytest.mark.skipif(
    not (DEMO_MODEL_DIR / "config.json").exists(), reason="this installation ships no demo model"
)
DEMO_RECORD = DEMO_CLIP.with_suffix(".json")


def test_demo_model_is_small():
    assert default_model_path() == DEMO_MODEL_DIR
    size = sum(f.stat().st_size for f in DEMO_MODEL_DIR.iterdir())
    assert size < 5 * 2**20


def test_demo_record_matches_the_rendered_clip():
    # The expected answer comes from the benchmark generator, independently of any model.
    record = json.loads(DEMO_RECORD.read_text())
    split, seed, clip, question = record["id"].split("-")
    frames, records = generate_clip(int(clip), int(seed), split, size=32)
    assert records[int(question.removeprefix("q"))] == record
    decoded, _ = load_video(DEMO_CLIP, 64, fps=8)
    check_detail(decoded, record)  # the answer digit is drawn where the record says, in the mp4 too


def test_ask_without_model_answers_the_demo_clip(capsys):
    record = json.loads(DEMO_RECORD.read_text())
    assert main(["ask", str(DEMO_CLIP), open_question(record), "--max-new-tokens", "4"]) == 0
    assert capsys.readouterr().out.strip() == record["answer_text"]


def test_demo_model_reads_the_asked_about_frame():
    # Where the asked-about digit is drawn comes from the generator; the map from the model's cross-attention.
    from slowfast_vlm.inference import answer, compute_attention_map, load_model

    record = json.loads(DEMO_RECORD.read_text())
    model, processor = load_model(str(DEMO_MODEL_DIR), "cpu", "float32")
    frames, _ = load_video(DEMO_CLIP, **processor.sampling_defaults())
    with torch.inference_mode():
        reply = answer(model, processor, frames, open_question(record), max_new_tokens=4)
        per_frame = compute_attention_map(model, reply.output, reply.video).per_layer.mean(0).sum((1, 2))
    assert reply.text == record["answer_text"]
    assert int(per_frame.argmax()) == record["detail_frames"][0]


def test_eval_on_the_benchmark_form_answers_as_the_model_does(tmp_path):
    # README: `slowfast-vlm eval --model <demo model> --data <test split>`; here on the demo question,
    # against `answer` on the same multiple-choice prompt with the model's own frame sampling
    from slowfast_vlm.inference import answer, load_model

    record = json.loads(DEMO_RECORD.read_text()) | {"video": str(DEMO_CLIP)}
    (tmp_path / "test.jsonl").write_text(json.dumps(record) + "\n")
    argv = ["eval", "--model", str(DEMO_MODEL_DIR), "--data", str(tmp_path / "test.jsonl")]
    assert main([*argv, "--output", str(tmp_path / "out"), "--dtype", "float32"]) == 0
    predicted = json.loads((tmp_path / "out" / "predictions.jsonl").read_text())
    model, processor = load_model(str(DEMO_MODEL_DIR), "cpu", "float32")
    frames, _ = load_video(DEMO_CLIP, **processor.sampling_defaults())
    question = record["conversations"][0]["value"].removeprefix("<video>\n")
    with torch.inference_mode():
        expected = answer(model, processor, frames, question, max_new_tokens=32).text
    assert predicted["response"] == expected
