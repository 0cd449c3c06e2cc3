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
    # Where the asked-about digit is drawn comes from the generator; the map from the model's cross-attention,
    # restricted to the question's own tokens as `ask --attention-map` draws it.
    from slowfast_vlm.inference import answer, compute_attention_map, load_model, text_span

    record = json.loads(DEMO_RECORD.read_text())
    model, processor = load_model(str(DEMO_MODEL_DIR), "cpu", "float32")
    frames, _ = load_video(DEMO_CLIP, **processor.sampling_defaults())
    question = open_question(record)
    with torch.inference_mode():
        reply = answer(model, processor, frames, question, max_new_tokens=4)
        span = text_span(processor, reply.prompt, question, len(frames))
        per_frame = (
            compute_attention_map(model, reply.output, reply.video, span).per_layer.mean(0).sum((1, 2))
        )
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
        expected = answer(model, processor, frames, question, max_new_tokens=128).text  # (eval's default cap)
    assert predicted["response"] == expected


# Clips of a seed the experiment never renders (`run.py prepare` renders every split from seed 0; a run's
# data seed only orders those clips), sent through an mp4 as `slowfast-vlm ask` would read them.
FRESH_SEED, FRESH_CLIPS = 7, 16


def chance_floor(questions: int, chance: float = 0.25, level: float = 0.001) -> int:
    """The fewest right answers that guessing (each right with probability `chance`) reaches with
    probability below `level`: the binomial tail, summed directly."""
    from math import comb

    tail = 0.0
    for right in range(questions, -1, -1):
        tail += comb(questions, right) * chance**right * (1 - chance) ** (questions - right)
        if tail >= level:
            return right + 1
    return 0


def test_shipped_model_answers_fresh_clips_well_above_chance_in_both_forms(tmp_path):
    # Right answers come from the generator; the multiple-choice reply is read as `slowfast-vlm eval` reads it.
    from slowfast_vlm.evaluation.answers import extract_choice, parse_options
    from slowfast_vlm.inference import chat_prompt, generate_responses, load_model
    from slowfast_vlm.processing.video import write_video
    from slowfast_vlm.synth import CRF, choice_question

    model, processor = load_model(str(DEMO_MODEL_DIR), "cpu", "float32")
    right = {"open": 0, "choice": 0}
    questions = 0
    for index in range(FRESH_CLIPS):
        rendered, records = generate_clip(index, FRESH_SEED, "test", size=32)
        clip = write_video(tmp_path / f"{index}.mp4", rendered, 8.0, crf=CRF)
        frames, _ = load_video(clip, **processor.sampling_defaults())
        for form, ask in (("open", open_question), ("choice", choice_question)):
            prompts = [chat_prompt(processor, ask(record)) for record in records]
            with torch.inference_mode():
                replies = generate_responses(
                    model, processor, prompts, [frames] * len(prompts), max_new_tokens=128, do_sample=False
                )
            for record, reply in zip(records, replies):
                if form == "open":
                    right[form] += reply.strip() == record["answer_text"]
                else:
                    right[form] += extract_choice(reply, parse_options(record["options"])) == record["answer"]
        questions += len(records)
    # guessing names the exact digit 1 time in 10, and one of 4 letters 1 time in 4
    floors = {"open": chance_floor(questions, 0.1), "choice": chance_floor(questions, 0.25)}
    assert all(right[form] >= floors[form] for form in right), (right, questions, floors)
