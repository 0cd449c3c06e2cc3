"""The built-in evaluator's loop (`slowfast-vlm eval`): accuracy bookkeeping, failed videos,
resuming after a crash, and the real model end to end.

Bookkeeping tests drive a scripted stand-in for the model, so every response, and hence every
expected score, is fixed and hand-labelled here; the end-to-end test compares the evaluator's
answers with direct `generate` calls of a tiny saved model on prompts written out literally.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from evaluation_helpers import CASES, EXPECTED, OPTIONS, RESPONSES
from helpers import save_tiny_checkpoint, tiny_config, tiny_tokenizer, write_random_video

from slowfast_vlm.cli import main as cli_main
from slowfast_vlm.evaluation.dataset import load_samples
from slowfast_vlm.evaluation.evaluator import evaluate
from slowfast_vlm.evaluation.predictions import read_predictions
from slowfast_vlm.processing import processor as processor_module
from slowfast_vlm.processing.processor import SlowFastProcessor
from slowfast_vlm.processing.video import load_video

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where `slowfast-vlm eval` puts the model


class Interrupted(Exception):
    pass


class ScriptedModel:
    """Stands in for the model in `generate`: answers each prompt with the scripted response for the
    question it contains; raises `Interrupted` on call number `fail_on` (1-based)."""

    device, dtype = torch.device("cpu"), torch.float32

    def __init__(self, tokenizer, fail_on: int | None = None):
        self.tokenizer, self.fail_on = tokenizer, fail_on
        self.calls = 0
        self.questions: list[str] = []

    def generate(self, input_ids, attention_mask, pixel_values_videos, max_new_tokens, do_sample):
        self.calls += 1
        if self.calls == self.fail_on:
            raise Interrupted
        assert len(pixel_values_videos) == len(input_ids) and not do_sample
        rows = []
        for ids in input_ids:
            prompt = self.tokenizer.decode(ids)
            question = next(q for q in RESPONSES if q in prompt)
            self.questions.append(question)
            rows.append(self.tokenizer(RESPONSES[question] + "<|im_end|>")["input_ids"])
        width = max(len(row) for row in rows)
        new = torch.tensor([row + [self.tokenizer.pad_token_id] * (width - len(row)) for row in rows])
        return torch.cat([input_ids, new], dim=1)


@pytest.fixture(scope="module")
def processor():
    return SlowFastProcessor.from_model_config(tiny_config(), tiny_tokenizer())


def run(processor, dataset, output, model=None, **kwargs):
    samples = load_samples(dataset)
    model = model or ScriptedModel(processor.tokenizer)
    settings = dict(num_frames=4, batch_size=3, num_workers=2) | kwargs
    return evaluate(model, processor, samples, output, **settings)


# ----- accuracy and failures -----------------------------------------------------------------------
def test_accuracy_matches_an_independent_count_and_failures_are_not_scored(
    processor, dataset, tmp_path, caplog
):
    with caplog.at_level(logging.ERROR):
        metrics = run(processor, dataset, tmp_path)
    predictions = {r["id"]: r for r in read_predictions(tmp_path / "predictions.jsonl")}
    assert sorted(predictions) == sorted(EXPECTED)
    assert {i: r["correct"] for i, r in predictions.items()} == EXPECTED
    # the failed samples: reported with their error, logged with their id, never scored
    assert (
        "VideoDecodeError" in predictions["q7"]["error"] and "FileNotFoundError" in predictions["q8"]["error"]
    )
    assert predictions["q7"]["response"] is None and predictions["q1"]["error"] is None
    assert "sample q7" in caplog.text and "sample q8" in caplog.text
    assert predictions["q1"]["extracted"] == "B" and predictions["q4"]["extracted"] is None

    # the hand count: correct q1, q3, q5 of the six scored; q7, q8 failed; q4 names no option
    assert metrics == json.loads((tmp_path / "metrics.json").read_text())
    overall = {
        k: metrics[k] for k in ("num_samples", "num_scored", "num_failed", "num_correct", "num_unanswered")
    }
    assert overall == dict(num_samples=8, num_scored=6, num_failed=2, num_correct=3, num_unanswered=1)
    assert metrics["accuracy"] == 3 / 6 and metrics["accuracy_failed_as_wrong"] == 3 / 8
    assert set(metrics["failed"]) == {"q7", "q8"}
    per = {
        name: (m["num_scored"], m["num_correct"], m["num_failed"])
        for name, m in metrics["per_category"].items()
    }
    assert per == {"action": (2, 1, 1), "object": (2, 1, 1), "open": (2, 1, 0)}
    per = {
        name: (m["num_scored"], m["num_correct"], m["num_failed"])
        for name, m in metrics["per_duration"].items()
    }
    assert per == {"short": (3, 2, 1), "long": (3, 1, 1)}
    assert metrics["per_duration"]["short"]["accuracy"] == 2 / 3


# ----- resume ----------------------------------------------------------------------------------------
def test_resume_after_a_crash_predicts_each_sample_exactly_once(processor, dataset, tmp_path):
    crashing = ScriptedModel(processor.tokenizer, fail_on=2)
    with pytest.raises(Interrupted):
        run(processor, dataset, tmp_path, model=crashing, batch_size=2)
    path = tmp_path / "predictions.jsonl"
    assert [r["id"] for r in read_predictions(path)] == ["q1", "q2"]  # the first batch survived the crash
    with open(path, "a") as f:  # and a crash in the middle of writing a line
        f.write('{"id": "q3", "response": "The ans')

    with pytest.raises(FileExistsError, match="--resume"):
        run(processor, dataset, tmp_path)
    model = ScriptedModel(processor.tokenizer)
    metrics = run(processor, dataset, tmp_path, model=model, resume=True)
    assert model.questions == [
        "What is red?",
        "How many?",
        "Which animal?",
        "How many cats?",
    ]  # only the rest
    lines = path.read_text().splitlines()
    ids = [json.loads(line)["id"] for line in lines]  # every line is whole again
    assert sorted(ids) == sorted(EXPECTED)
    assert {r["id"]: r["correct"] for r in read_predictions(path)} == EXPECTED
    assert (metrics["num_correct"], metrics["num_scored"], metrics["num_failed"]) == (3, 6, 2)


def test_resume_of_a_finished_run_predicts_nothing(processor, dataset, tmp_path):
    first = run(processor, dataset, tmp_path)
    model = ScriptedModel(processor.tokenizer)
    assert run(processor, dataset, tmp_path, model=model, resume=True) == first
    assert model.calls == 0


# ----- the real model --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("model")
    save_tiny_checkpoint(path)
    return path


def literal_prompt(question: str) -> str:
    return (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        f"<|im_start|>user\n<video>\n{question}<|im_end|>\n<|im_start|>assistant\n"
    )


def direct_answers(saved_model, samples, num_frames=4):
    """Each sample alone through the processor and greedy `generate` (no batching, no evaluator)."""
    from slowfast_vlm import SlowFastForConditionalGeneration

    model = SlowFastForConditionalGeneration.from_pretrained(saved_model).to(DEVICE).eval()
    processor = SlowFastProcessor.from_pretrained(saved_model)
    answers = {}
    for sample in samples:
        frames, _ = load_video(sample.video, num_frames, fps=2.0)
        inputs = processor(text=literal_prompt(sample.prompt), videos=frames, return_tensors="pt").to(DEVICE)
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=6, do_sample=False)
        answers[sample.id] = processor.decode(
            out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        ).strip()
    return answers


def test_cli_eval_answers_as_the_model_does_alone(saved_model, dataset, tmp_path, capsys):
    output = tmp_path / "out"
    argv = ["eval", "--model", str(saved_model), "--data", str(dataset), "--output", str(output)]
    argv += ["--frames", "4", "--batch-size", "3", "--max-new-tokens", "6", "--dtype", "float32"]
    assert cli_main(argv) == 0
    predictions = {r["id"]: r for r in read_predictions(output / "predictions.jsonl")}
    ok = [s for s in load_samples(dataset) if s.id not in ("q7", "q8")]
    assert {s.id: predictions[s.id]["response"] for s in ok} == direct_answers(saved_model, ok)
    metrics = json.loads((output / "metrics.json").read_text())
    assert metrics["num_scored"] == 6 and metrics["num_failed"] == 2
    assert metrics["num_correct"] == sum(bool(predictions[s.id]["correct"]) for s in ok)
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["num_samples"] == 8


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() == 1, reason="two processes need two GPUs, or none (CPU)")
def test_two_processes_shard_and_merge(saved_model, dataset, tmp_path):
    # `accelerate launch --cpu` always starts a single process; torchrun starts two, which the
    # evaluator's PartialState joins (gloo on CPU) exactly as under `accelerate launch` on GPUs
    output = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    command += ["-m", "slowfast_vlm.cli", "eval", "--model", str(saved_model), "--data", str(dataset)]
    command += ["--output", str(output), "--frames", "4", "--batch-size", "2", "--max-new-tokens", "6"]
    command += ["--dtype", "float32"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "process 0 of 2: 4 of 8 pending" in done.stderr and "process 1 of 2: 4 of 8 pending" in done.stderr
    assert sorted(p.name for p in output.iterdir()) == ["metrics.json", "predictions.jsonl"]  # shards merged
    records = read_predictions(output / "predictions.jsonl")
    assert sorted(r["id"] for r in records) == sorted(EXPECTED)
    ok = [s for s in load_samples(dataset) if s.id not in ("q7", "q8")]
    assert {r["id"]: r["response"] for r in records if r["error"] is None} == direct_answers(saved_model, ok)
    assert json.loads((output / "metrics.json").read_text())["num_samples"] == 8
    assert Path(output / "predictions.jsonl").read_text().count("\n") == 8


# ----- questions grouped by video --------------------------------------------------------------------
VIDEO_OF = {"q1": "a", "q3": "a", "q5": "a", "q2": "b", "q4": "b", "q6": "b", "q7": "broken", "q8": "lost"}


@pytest.fixture(scope="module")
def shared_videos(tmp_path_factory):
    """The CASES with three questions on each of two videos (in the file, the videos alternate)."""
    root = tmp_path_factory.mktemp("shared")
    write_random_video(root / "a.mp4", num_frames=8, fps=4, seed=1)
    write_random_video(root / "b.mp4", num_frames=8, fps=4, seed=2)
    (root / "broken.mp4").write_bytes(b"this is not a video" * 20)
    records = []
    for record, _, _ in CASES:
        record = dict(record, video=f"{VIDEO_OF[record['id']]}.mp4")
        if record["answer"] in ("A", "B", "C", "D"):
            record["options"] = OPTIONS
        records.append(record)
    path = root / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture
def decoded(monkeypatch):
    """The list of video paths the evaluator decodes, one entry per decode."""
    paths: list[str] = []

    def counting(path, *args, **kwargs):
        paths.append(Path(path).name)
        return load_video(path, *args, **kwargs)

    monkeypatch.setattr(processor_module, "load_video", counting)  # what SlowFastProcessor.load_video calls
    return paths


def test_resume_in_the_middle_of_a_video_predicts_each_sample_once(
    processor, shared_videos, tmp_path, decoded
):
    crashing = ScriptedModel(processor.tokenizer, fail_on=2)
    with pytest.raises(Interrupted):  # the second batch, q5 (video a) + q2 (video b), crashes
        run(processor, shared_videos, tmp_path, model=crashing, batch_size=2, num_workers=1)
    assert [r["id"] for r in read_predictions(tmp_path / "predictions.jsonl")] == ["q1", "q3"]
    decoded.clear()
    model = ScriptedModel(processor.tokenizer)
    metrics = run(processor, shared_videos, tmp_path, model=model, batch_size=2, resume=True)
    # the groups in the order of their first pending question: all of video b's (q2 comes first now),
    # then video a's last one; each video decoded once
    assert model.questions == ["Who sleeps?", "How many?", "How many cats?", "Which animal?"]
    assert sorted(decoded) == ["a.mp4", "b.mp4", "broken.mp4", "lost.mp4"]
    assert {r["id"]: r["correct"] for r in read_predictions(tmp_path / "predictions.jsonl")} == EXPECTED
    assert (metrics["num_correct"], metrics["num_scored"], metrics["num_failed"]) == (3, 6, 2)


@pytest.mark.parametrize("group_by_video", [True, False])
def test_each_video_is_decoded_and_encoded_once_and_answers_are_those_alone(
    saved_model, shared_videos, tmp_path, decoded, group_by_video
):
    from slowfast_vlm.inference import load_model

    model, processor = load_model(saved_model, "cpu", "float32")
    encoded: list[int] = []  # frames of each vision-encoder call
    model.model.vision_tower.register_forward_hook(
        lambda module, args, out: encoded.append(out.last_hidden_state.shape[0])
    )
    samples = load_samples(shared_videos)
    settings = dict(num_frames=4, batch_size=2, max_new_tokens=6, group_by_video=group_by_video)
    evaluate(model, processor, samples, tmp_path, **settings)
    ok = [s for s in samples if s.id not in ("q7", "q8")]
    responses = {r["id"]: r["response"] for r in read_predictions(tmp_path / "predictions.jsonl")}
    assert {s.id: responses[s.id] for s in ok} == direct_answers(saved_model, ok)
    frames_per_video = len(load_video(shared_videos.parent / "a.mp4", 4, fps=2.0)[0])
    if group_by_video:
        assert sorted(decoded) == ["a.mp4", "b.mp4", "broken.mp4", "lost.mp4"]
        assert sum(encoded) == 2 * frames_per_video
    else:  # the old way: every question decodes its video; the cache still spares the encoder
        assert sorted(decoded) == sorted(f"{VIDEO_OF[s.id]}.mp4" for s in samples)
        assert sum(encoded) == 2 * frames_per_video


def test_eval_samples_frames_as_the_model_was_trained_unless_told(dataset, tmp_path, monkeypatch):
    # a model saved with its own sampling (as the synthetic experiment's models are: 64 frames at 8 fps)
    _, processor = save_tiny_checkpoint(tmp_path / "model")
    processor.video_defaults = {"num_frames": 6, "fps": 3.0, "sampling": "uniform"}
    processor.save_pretrained(tmp_path / "model")
    calls = []

    def recording(path, num_frames, **options):
        calls.append((num_frames, options["fps"], options["sampling"]))
        return load_video(path, num_frames, **options)

    monkeypatch.setattr(processor_module, "load_video", recording)
    argv = ["eval", "--model", str(tmp_path / "model"), "--data", str(dataset), "--max-new-tokens", "1"]
    assert cli_main([*argv, "--output", str(tmp_path / "own"), "--limit", "1"]) == 0
    assert calls == [(6, 3.0, "uniform")]
    calls.clear()
    assert cli_main([*argv, "--output", str(tmp_path / "told"), "--limit", "1", "--fps", "2"]) == 0
    assert calls == [(6, 2.0, "uniform")]  # only what was given replaces the model's own
