"""experiments/synth: mixed question forms, exact resume, the plan runner, both forms' scoring, the
question-restricted attention peak, the verdict; on a tiny data set written to a temporary directory."""

import copy
import json
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

sys.path.insert(0, str(Path(__file__).parents[1] / "experiments" / "synth"))

import benchmark  # noqa: E402
import plan  # noqa: E402
import run  # noqa: E402
import scoring  # noqa: E402
from benchmark import FILLER_WORDS, FPS, FRAMES, SIZE, exercise, one_per_square, question_cue, without_digits  # noqa: E402

from slowfast_vlm.default_model import DEMO_MODEL_DIR  # noqa: E402
from slowfast_vlm.processing.video import load_video, write_video  # noqa: E402
from slowfast_vlm.synth import CATEGORIES, CRF, choice_question, find_digit, generate_clip, open_question  # noqa: E402
from slowfast_vlm.training.scratch import build_scratch_model  # noqa: E402

TRAIN_CLIPS, STEPS, BATCH = 3, 4, 2


def write_data(data: Path) -> None:
    """A tiny copy of `prepare`'s output: 3 train clips (records + decoded frames) and 1 test clip (mp4)."""
    (data / "videos").mkdir(parents=True)
    frames, lines = [], []
    for clip in range(TRAIN_CLIPS):
        rendered, records = generate_clip(clip, 0, "train", FRAMES, SIZE, FPS)
        frames.append(rendered)
        lines += records
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    np.save(data / "train_frames.npy", np.stack(frames))
    rendered, records = generate_clip(0, 0, "test", FRAMES, SIZE, FPS)
    write_video(data / records[0]["video"], rendered, FPS, crf=CRF)
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A working directory with the tiny data and a slow (c) stage-1 checkpoint, and one uninterrupted
    stage-2 run of model (c) in `uninterrupted/`."""
    root = tmp_path_factory.mktemp("synth")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        write_data(run.DATA)
        texts = [open_question(r) for clip in run.read_clips("train") for r in clip] + list("0123456789")
        model, processor = build_scratch_model(texts, **run.STAGE1_KNOBS["slow"])
        model.save_pretrained("stage1")
        processor.save_pretrained("stage1")
        run.train("c", 0, STEPS, BATCH, 1e-3, Path("uninterrupted"), Path("stage1"))
        yield root
    finally:
        os.chdir(cwd)


@pytest.mark.parametrize("choice_answers", ["letter", "reasoned"])
def test_training_batch_mixes_both_forms(choice_answers):
    clips = [generate_clip(clip, 0, "train", FRAMES, SIZE, FPS) for clip in range(2)]
    texts = [open_question(r) for _, records in clips for r in records] + list("0123456789")
    _, processor = build_scratch_model(texts)
    inputs, labels, _ = run.training_batch(
        processor,
        [records for _, records in clips],
        [frames for frames, _ in clips],
        np.random.default_rng(0),
        choice_answers,
    )
    tokenizer = processor.tokenizer
    forms = []
    for row, (ids, row_labels) in enumerate(zip(inputs["input_ids"], labels)):
        records = clips[row][1]
        text = tokenizer.decode(ids, skip_special_tokens=False)
        turns = re.findall(
            r"<\|im_start\|>user\n(.*?)<\|im_end\|>\n<\|im_start\|>assistant\n(.*?)<\|im_end\|>", text, re.S
        )
        assert len(turns) == 6
        expected = []
        for question, answer in turns:
            question = question.replace(processor.video_token, "").lstrip("\n")
            record = next(r for r in records if open_question(r).split("\n")[0] in question)
            form = "choice" if question == choice_question(record) else "open"
            assert question == (choice_question(record) if form == "choice" else open_question(record))
            choice_answer = {
                "letter": record["answer"],
                "reasoned": f"{record['answer_text']}; "
                + " ".join(f"{letter}. {option}" for letter, option in zip("ABCD", record["options"]))
                + f"; {record['answer']}",
            }
            assert answer == (choice_answer[choice_answers] if form == "choice" else record["answer_text"])
            forms.append(form)
            expected.append(answer + "<|im_end|>")
        # the labelled tokens: exactly each answer and its <|im_end|>, turn by turn
        labelled = (row_labels != -100).int()
        starts = torch.nonzero(torch.diff(labelled, prepend=torch.tensor([0])) == 1).flatten().tolist()
        ends = torch.nonzero(torch.diff(labelled, append=torch.tensor([0])) == -1).flatten().tolist()
        spans = [
            tokenizer.decode(row_labels[s : e + 1], skip_special_tokens=False) for s, e in zip(starts, ends)
        ]
        assert spans == expected
    assert set(forms) == {"open", "choice"}  # both forms occur in one step's batch


def test_exact_resume_after_stop_and_sigterm(workdir, monkeypatch, capsys):
    """A run stopped after step 1 (`--stop-after-steps`), then by SIGTERM during step 3, then resumed, ends
    with the weights and loss log of the uninterrupted run."""
    command = ["train", "--model", "c", "--steps", str(STEPS), "--batch", str(BATCH), "--stage1", "stage1"]
    command += ["--out", "chunked"]
    assert run.main([*command, "--stop-after-steps", "1"]) == 0
    assert (workdir / "chunked" / "checkpoint" / "state.pt").exists()
    assert not (workdir / "chunked" / "result.json").exists()

    batches = []
    training_batch = run.training_batch

    def signalling_batch(*args):
        batches.append(1)
        if len(batches) == 2:  # during the run's step 3 (its second step since resuming)
            os.kill(os.getpid(), signal.SIGTERM)
        return training_batch(*args)

    monkeypatch.setattr(run, "training_batch", signalling_batch)
    assert run.main(command) == 0
    monkeypatch.setattr(run, "training_batch", training_batch)
    assert torch.load(workdir / "chunked" / "checkpoint" / "state.pt", weights_only=False)["step"] == 3
    assert run.main(command) == 0
    assert not (workdir / "chunked" / "checkpoint").exists()

    for name in ("uninterrupted", "chunked"):
        assert len(json.loads((workdir / name / "loss_log.json").read_text())) == STEPS
    assert (workdir / "chunked" / "loss_log.json").read_text() == (
        workdir / "uninterrupted" / "loss_log.json"
    ).read_text()
    chunked, whole = (
        load_file(workdir / name / "model.safetensors") for name in ("chunked", "uninterrupted")
    )
    assert chunked.keys() == whole.keys()
    for key in whole:
        assert torch.equal(chunked[key], whole[key]), key
    result = json.loads((workdir / "chunked" / "result.json").read_text())
    assert 0 <= result["choice_accuracy"] <= 1 and 0 <= result["question_attention_peak_on_detail_frame"] <= 1

    capsys.readouterr()
    assert run.main(command) == 0  # finished: skipped
    assert "skipped" in capsys.readouterr().out


def test_stage1_resumes_exactly(workdir):
    """Stage 1 stopped after its first step and run again ends with the uninterrupted run's weights and loss."""
    run.write_frame_pool(2)
    run.pretrain_vision(1, 4, 1e-3)
    whole = run.pretrain_llm(3, 2, 1e-3, Path("stage1-whole"), "slow")
    assert run.pretrain_llm(3, 2, 1e-3, Path("stage1-chunked"), "slow", stop_after=1) is None
    assert torch.load(workdir / "stage1-chunked" / "checkpoint" / "state.pt", weights_only=False)["step"] == 1
    chunked = run.pretrain_llm(3, 2, 1e-3, Path("stage1-chunked"), "slow")
    assert chunked["final_loss"] == whole["final_loss"]
    assert not (workdir / "stage1-chunked" / "checkpoint").exists()
    weights = [load_file(workdir / name / "model.safetensors") for name in ("stage1-whole", "stage1-chunked")]
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key


def test_image_conversation_in_both_forms():
    """Without an rng the digit question is the open form; with one, about half are the multiple-choice
    form, answered by the record's letter; the colour and wall turns stay."""
    records = generate_clip(0, 0, "train", FRAMES, SIZE, FPS)[1]
    assert run.image_conversation(records[0])[0]["content"][1]["text"] == open_question(records[0])
    rng = np.random.default_rng(0)
    forms = []
    for record in records * 20:
        chat = run.image_conversation(record, rng)
        question, answer = chat[0]["content"][-1]["text"], chat[1]["content"][0]["text"]
        assert (question, answer) in {
            (open_question(record), record["answer_text"]),
            (choice_question(record), record["answer"]),
        }
        assert [turn["content"][-1]["text"] for turn in chat[2::2]] == list(run.IMAGE_QUESTIONS)
        forms.append(question == choice_question(record))
    assert 0.35 < np.mean(forms) < 0.65


def test_probe_scores_each_question_in_every_setting(workdir):
    result = run.probe(Path("uninterrupted"), clips=1)
    assert set(result) == {"image", "frame_repeated", "clip", "image_choice", "questions"}
    assert result["questions"] == 6
    for key in ("image", "frame_repeated", "clip", "image_choice"):
        assert result[key] * 6 == round(result[key] * 6)  # a share of the 6 questions


def test_score_on_fresh_clips_and_clips_without_digits(workdir):
    assert run.main(["score", "uninterrupted", "--seed", "7", "--clips", "1"]) == 0
    report = json.loads((workdir / "uninterrupted" / "score-seed7.json").read_text())
    assert report["questions"] == 6 and report["seed"] == 7
    for video in ("black", "squares_without_digits"):
        assert [len(report["no_digit"][video][form]) for form in ("open", "choice")] == [6, 6]
    with pytest.raises(SystemExit):
        run.main(["score", "uninterrupted", "--seed", "0"])


def test_without_digits_shows_no_digit():
    rendered, records = generate_clip(0, 7, "test", FRAMES, SIZE, FPS)
    assert all(find_digit(rendered, int(r["answer_text"])) for r in records)  # the detector sees them
    stripped = without_digits(rendered, records)
    assert not any(find_digit(stripped, digit) for digit in range(10))
    shown = {t for r in records for t in r["detail_frames"]}
    for t in range(FRAMES):  # only the digit frames changed, each into the frame before it
        np.testing.assert_array_equal(stripped[t], rendered[t - 1] if t in shown else rendered[t])


def test_a_single_event_clip_shows_only_the_kept_digit():
    rendered, records = generate_clip(0, 7, "test", FRAMES, SIZE, FPS)
    kept = records[4]
    single = without_digits(rendered, records, keep=[kept])
    assert [t for t, _, _ in find_digit(single, int(kept["answer_text"]))] == kept["detail_frames"]
    others = {int(r["answer_text"]) for r in records} - {int(kept["answer_text"])}
    assert not any(find_digit(single, digit) for digit in others)


def test_one_per_square_keeps_one_question_of_each_square():
    _, records = generate_clip(0, 7, "test", FRAMES, SIZE, FPS)
    picked = one_per_square(records, np.random.default_rng(0))
    colours = [r["conversations"][0]["value"].split()[2] for r in picked]  # "<video>\nThe red square ..."
    assert len(set(colours)) == 3 and all(any(r is p for r in records) for p in picked)
    for record, colour in zip(picked, colours):  # its square's other question: the distractor frame's
        sibling = next(r for r in records if r["detail_frames"] == record["distractor_frames"])
        assert sibling not in picked and sibling["conversations"][0]["value"].split()[2] == colour


def test_warm_up_steps_come_first_with_their_questions_and_digits(workdir, monkeypatch):
    """Of 4 steps, the first 2 train on single-event clips (one question per clip, whose digit is the only
    one in its video), the third on clips with one digit per square (3 questions, 3 digits), the last on
    whole clips (6 questions, 6 digits)."""
    calls = []
    training_batch = run.training_batch

    def recording_batch(processor, conversations, videos, rng, *options):
        calls.append((conversations, videos))
        return training_batch(processor, conversations, videos, rng, *options)

    monkeypatch.setattr(run, "training_batch", recording_batch)
    run.train("c", 0, 4, BATCH, 1e-3, Path("single-event"), Path("stage1"), None, 50, None, 2, 1)
    lengths = [[len(c) for c in conversations] for conversations, _ in calls]
    assert lengths == [[1] * BATCH] * 2 + [[3] * BATCH, [6] * BATCH]
    for conversations, videos in calls:
        for records, video in zip(conversations, videos):
            shown = {digit for digit in range(10) if find_digit(video, digit)}
            assert shown == {int(r["answer_text"]) for r in records}
    result = json.loads((workdir / "single-event" / "result.json").read_text())
    assert run.recipe(result) == "4 steps (2 single-event, 1 one per square)"
    run.train("c", 0, 2, BATCH, 1e-3, Path("continued"), Path("single-event"))  # 2 more steps, whole clips
    continued = json.loads((workdir / "continued" / "result.json").read_text())
    assert run.recipe(continued) == "6 steps (2 single-event, 1 one per square)"
    with pytest.raises(ValueError, match="single_event_steps"):
        run.train(
            "c", 0, 3, BATCH, 1e-3, Path("bad"), Path("stage1"), single_event_steps=2, one_per_square_steps=1
        )


def test_digit_first_answers_are_trained_and_named_in_the_recipe(workdir, monkeypatch):
    trained_answers = []
    training_batch = run.training_batch

    def recording_batch(processor, conversations, videos, rng, *options):
        inputs, labels, twin = training_batch(processor, conversations, videos, rng, *options)
        trained_answers.extend(processor.tokenizer.decode(row[row != -100]) for row in labels)
        return inputs, labels, twin

    rehearsed = []
    lookup_batch = run.lookup_batch

    def recording_lookup_batch(processor, exercises, videos):
        assert videos is None  # text alone unless rehearse_after_clip
        rehearsed.extend(exercises)
        return lookup_batch(processor, exercises, videos)

    monkeypatch.setattr(run, "training_batch", recording_batch)
    monkeypatch.setattr(run, "lookup_batch", recording_lookup_batch)
    run.train(
        "c",
        0,
        2,
        BATCH,
        1e-3,
        Path("digit-first"),
        Path("stage1"),
        lookup_rehearsal=3,
        choice_answers="reasoned",
    )
    # some multiple-choice turn of the 2 steps was answered "<digit>; A. x B. y C. z D. w; <letter>"
    listed_again = r"\d; A\. \d B\. \d C\. \d D\. \d; [A-D]<\|im_end\|>"
    assert any(re.search(listed_again, answers) for answers in trained_answers)
    # and every rehearsed exercise is the lookup that answer needs: the listed letter of the digit named
    assert len(rehearsed) == 6
    for question, answer, _ in rehearsed:
        named, listing, letter = re.fullmatch(r"(\d); (.*); ([A-D])", answer).groups()
        listed = parse_exercise(question)[1]
        assert listed[letter] == named and listing == " ".join(f"{k}. {v}" for k, v in listed.items())
    result = json.loads((workdir / "digit-first" / "result.json").read_text())
    assert result["choice_answers"] == "reasoned"
    assert run.recipe(result) == "2 steps (2 with lookup rehearsal, 2 digit-first)"
    assert 0 <= result["reasoned_choice_accuracy"] <= 1 and result["questions"] == 6


def test_rehearsal_after_a_clip_asks_each_exercise_after_one_of_the_steps_clips(workdir, monkeypatch):
    step_videos, rehearsal_calls = [], []
    training_batch, lookup_batch = run.training_batch, run.lookup_batch

    def recording_batch(processor, conversations, videos, rng, *options):
        step_videos.append(videos)
        return training_batch(processor, conversations, videos, rng, *options)

    def recording_lookup_batch(processor, exercises, videos=None):
        inputs, labels = lookup_batch(processor, exercises, videos)
        rehearsal_calls.append((exercises, videos, inputs, labels))
        return inputs, labels

    monkeypatch.setattr(run, "training_batch", recording_batch)
    monkeypatch.setattr(run, "lookup_batch", recording_lookup_batch)
    with pytest.raises(ValueError, match="need lookup_rehearsal >= 1"):
        run.train("c", 0, 2, BATCH, 1e-3, Path("no-exercises"), Path("stage1"), rehearse_after_clip=True)
    run.train(
        "c", 0, 2, BATCH, 1e-3, Path("after-clip"), Path("stage1"),
        lookup_rehearsal=3, choice_answers="reasoned", rehearse_after_clip=True,
    )  # fmt: skip
    assert len(rehearsal_calls) == 2
    tokenizer = run.SlowFastProcessor.from_pretrained(Path("stage1")).tokenizer
    for videos, (exercises, clips_in_front, inputs, labels) in zip(step_videos, rehearsal_calls):
        # exercise i after clip i % BATCH of the same step, the very frames its questions were asked about
        assert [id(clip) for clip in clips_in_front] == [id(videos[i % BATCH]) for i in range(3)]
        video_token = tokenizer.convert_tokens_to_ids("<video>")
        assert (
            all(video_token in row for row in inputs["input_ids"].tolist())
            and "pixel_values_videos" in inputs
        )
        # and only the exercise's answer is labelled
        for (_, answer, _), row in zip(exercises, labels):
            assert tokenizer.decode(row[row != -100]) == answer + "<|im_end|>"
    result = json.loads((workdir / "after-clip" / "result.json").read_text())
    assert result["rehearse_after_clip"] is True
    assert run.recipe(result) == "2 steps (2 with lookup rehearsal, 2 of them after a clip, 2 digit-first)"


def test_rehearsed_exercises_start_with_a_preamble_and_a_cued_run_answers_cued(workdir, monkeypatch):
    rehearsed, trained_answers = [], []
    lookup_batch, training_batch = run.lookup_batch, run.training_batch

    def recording_batch(processor, conversations, videos, rng, *options):
        inputs, labels, twin = training_batch(processor, conversations, videos, rng, *options)
        trained_answers.extend(processor.tokenizer.decode(row[row != -100]) for row in labels)
        return inputs, labels, twin

    def recording_lookup_batch(processor, exercises, videos=None):
        rehearsed.extend(exercises)
        return lookup_batch(processor, exercises, videos)

    monkeypatch.setattr(run, "lookup_batch", recording_lookup_batch)
    monkeypatch.setattr(run, "training_batch", recording_batch)
    with pytest.raises(ValueError, match="need lookup_rehearsal >= 1"):
        run.train("c", 0, 2, BATCH, 1e-3, Path("no-exercises"), Path("stage1"), lookup_preamble=4)
    with pytest.raises(ValueError, match="'restated' rehearses its opening: it needs lookup_preamble >= 1"):
        run.train(
            "c", 0, 2, BATCH, 1e-3, Path("no-preamble"), Path("stage1"),
            lookup_rehearsal=3, choice_answers="restated",
        )  # fmt: skip
    run.train(
        "c", 0, 2, BATCH, 1e-3, Path("preamble"), Path("stage1"),
        lookup_rehearsal=3, choice_answers="cued", lookup_preamble=4,
    )  # fmt: skip
    assert len(rehearsed) == 6
    for question, answer, _ in rehearsed:  # up to 4 filler words, a benchmark question, the exercise
        filler, sentence, rest = question.split("\n", 2)
        assert len(filler.split()) <= 4 and re.fullmatch(BENCHMARK_SENTENCE, sentence)
        # answered cued, as the run's multiple-choice turns are: "green, touching: 7; A. 3 ...; B"
        named, _, letter = re.fullmatch(
            r"(\d); (.*); ([A-D])", answer.removeprefix(question_cue(sentence))
        ).groups()
        assert parse_exercise(rest)[1][letter] == named
    cued_turn = r"[a-z]+, (not )?touching: \d; A\. \d B\. \d C\. \d D\. \d; [A-D]<\|im_end\|>"
    assert any(re.search(cued_turn, answers) for answers in trained_answers)
    result = json.loads((workdir / "preamble" / "result.json").read_text())
    assert result["lookup_preamble"] == 4 and 0 <= result["reasoned_digit_accuracy"] <= 1
    assert (
        run.recipe(result) == "2 steps (2 with lookup rehearsal, 2 of them after a preamble, 2 digit-first)"
    )


def test_listed_open_questions_list_random_digits_before_the_open_instruction():
    _, records = generate_clip(0, 0, "train", FRAMES, SIZE, FPS)
    rng = np.random.default_rng(3)
    counts, answer_listed_of_four, fours = [], 0, 0
    for i in range(2000):
        record = records[i % len(records)]
        question = benchmark.listed_open_question(record, rng, 4)
        sentence = open_question(record).split("\n")[0]
        listed = re.fullmatch(
            re.escape(sentence) + r"\n(?:Options:\n((?:[A-D]\. \d\n)+))?Answer with the digit\.", question
        )[1]
        lines = listed.splitlines() if listed else []
        letters, digits = [line[0] for line in lines], [line[3] for line in lines]
        assert letters == list("ABCD")[: len(lines)] and len(set(digits)) == len(digits)
        counts.append(len(lines))
        if len(lines) == 4:
            fours += 1
            answer_listed_of_four += record["answer_text"] in digits
    # 0 to 4 digits, each count about 1/5 of the time; 4 random digits of 10 hold the answer 2 times in 5,
    # not always as in the multiple-choice form (so naming a listed digit earns nothing)
    assert set(counts) == set(range(5)) and all(300 <= counts.count(k) <= 500 for k in range(5))
    assert abs(answer_listed_of_four / fours - 0.4) < 0.08


def test_a_listed_open_run_lists_digits_in_its_open_turns_only(workdir, monkeypatch):
    texts = []
    training_batch = run.training_batch

    def recording_batch(processor, conversations, videos, rng, *options):
        inputs, labels, twin = training_batch(processor, conversations, videos, rng, *options)
        texts.extend(processor.tokenizer.batch_decode(inputs["input_ids"]))
        return inputs, labels, twin

    monkeypatch.setattr(run, "training_batch", recording_batch)
    with pytest.raises(ValueError, match="listed_open must be in \\[0, 4\\]"):
        run.train("c", 0, 2, BATCH, 1e-3, Path("five"), Path("stage1"), listed_open=5)
    run.train("c", 0, 2, BATCH, 1e-3, Path("listed"), Path("stage1"), listed_open=2)
    turns = [t for text in texts for t in re.findall(r"<\|im_start\|>user\n(.*?)<\|im_end\|>", text, re.S)]
    open_turns = [t for t in turns if t.endswith("Answer with the digit.")]
    listed = [t for t in open_turns if "\nOptions:\n" in t]
    # some open turns list digits, never more than 2; the multiple-choice turns keep their 4 options
    assert 0 < len(listed) < len(open_turns)
    assert all(len(re.findall(r"\n[A-D]\. \d", t)) <= 2 for t in listed)
    assert all(len(re.findall(r"\n[A-D]\. \d", t)) == 4 for t in turns if t not in open_turns)
    result = json.loads((workdir / "listed" / "result.json").read_text())
    assert result["listed_open"] == 2
    assert run.recipe(result) == "2 steps (2 with digits listed in open questions)"


def test_lookup_rehearsal_adds_text_only_exercises_and_logs_the_video_loss(workdir, monkeypatch):
    """With `lookup_rehearsal=4` every step also trains on 4 text-only lookup exercises in both directions,
    labelled on their answers; the logged loss stays the video questions' (step 1, before any update,
    equals the run without rehearsal)."""
    batches = []
    lookup_batch = run.lookup_batch

    def recording_batch(processor, exercises, videos):
        assert videos is None  # text alone unless rehearse_after_clip
        inputs, labels = lookup_batch(processor, exercises, videos)
        batches.append((exercises, inputs, labels, processor.tokenizer))
        return inputs, labels

    monkeypatch.setattr(run, "lookup_batch", recording_batch)
    run.train("c", 0, 2, BATCH, 1e-3, Path("rehearsed"), Path("stage1"), lookup_rehearsal=4)
    assert [len(exercises) for exercises, *_ in batches] == [4, 4]
    questions = [question for exercises, *_ in batches for question, _, _ in exercises]
    assert {q.startswith("Options:") for q in questions} == {True, False}  # forward and reverse
    for exercises, inputs, labels, tokenizer in batches:
        assert "pixel_values_videos" not in inputs
        for (question, answer, _), ids, row_labels in zip(exercises, inputs["input_ids"], labels):
            assert question in tokenizer.decode(ids)
            assert tokenizer.decode(row_labels[row_labels != -100]) == answer + "<|im_end|>"
    log = json.loads((workdir / "rehearsed" / "loss_log.json").read_text())
    plain = json.loads((workdir / "uninterrupted" / "loss_log.json").read_text())
    assert log[0] == pytest.approx(plain[0], rel=1e-6)
    result = json.loads((workdir / "rehearsed" / "result.json").read_text())
    assert result["lookup_rehearsal"] == 4 and run.recipe(result) == "2 steps (2 with lookup rehearsal)"


def test_round_trip_gives_the_test_sets_frames(tmp_path):
    rendered, records = generate_clip(0, 0, "test", FRAMES, SIZE, FPS)
    write_video(tmp_path / "clip.mp4", rendered, FPS, crf=CRF)
    expected, _ = load_video(tmp_path / "clip.mp4", FRAMES, fps=FPS)
    _, processor = build_scratch_model(["0"], video_defaults=run.MODELS["c"][1])
    np.testing.assert_array_equal(scoring.round_trip(rendered, processor), expected)


def test_choice_scoring_picks_the_best_letter():
    record = generate_clip(0, 0, "test", FRAMES, SIZE, FPS)[1][0]
    letter = "ABCD".index(record["answer"])
    scores = torch.zeros(4)
    scores[letter] = 1.0
    assert scoring.chooses_letter(scores, record)
    scores[(letter + 1) % 4] = 2.0
    assert not scoring.chooses_letter(scores, record)
    digits = torch.zeros(10)
    digits[int(record["answer_text"])] = 1.0
    digits[[d for d in range(10) if str(d) not in record["options"]][0]] = 5.0  # not an option: ignored
    assert scoring.chooses_answer(digits, record)


def test_accuracy_report_counts_the_letters_named():
    lookups = [True, None, False, True]  # question 1 named a digit that is no option
    results = [
        {"category": CATEGORIES[i % 2], "open": i < 3, "choice": i == 0, "choice_letter": letter}
        | {"reasoned_digit": i != 1, "reasoned_choice": i in (0, 3), "reasoned_lookup": lookups[i]}
        for i, letter in enumerate("CCCA")
    ]
    report = scoring.accuracy_report(results)
    assert report["choice_letters"] == {"A": 0.25, "B": 0.0, "C": 0.75, "D": 0.0}
    assert (report["accuracy"], report["choice_accuracy"], report["questions"]) == (0.75, 0.25, 4)
    assert report[f"choice_{CATEGORIES[0]}"] == 0.5  # questions 0 and 2: one right
    assert (report["reasoned_choice_accuracy"], report["reasoned_digit_accuracy"]) == (0.5, 0.75)
    assert report["reasoned_lookup_accuracy"] == 2 / 3  # of the 3 answers naming an option's digit


def test_open_answer_kind_names_whose_digit_of_the_clip_was_answered():
    _, records = generate_clip(0, 0, "test", FRAMES, SIZE, FPS)
    asked = records[0]  # square 0's touching question; records 1-3: its other one, then square 1's two
    absent = next(str(d) for d in range(10) if all(r["answer_text"] != str(d) for r in records))
    named = [
        records[0]["answer_text"],
        records[1]["answer_text"],
        records[2]["answer_text"],
        records[3]["answer_text"],
        absent,
    ]
    kinds = [scoring.open_answer_kind(digit, asked, records) for digit in named]
    assert kinds == [
        "right",
        "same square",
        "other square, same wall",
        "other square, other wall",
        "not in clip",
    ]
    results = [
        {"category": CATEGORIES[0], "open": k == "right", "choice": False, "choice_letter": "A"}
        | {"reasoned_digit": False, "reasoned_choice": False, "reasoned_lookup": None, "open_answer": k}
        for k in kinds + ["right"]
    ]
    assert scoring.accuracy_report(results)["open_answers"]["right"] == 2 / 6


class ReasonedOracle(torch.nn.Module):
    """Reads each prompt back from its tokens; at its last real position the letter of the option holding
    the digit the prompt's answer starts with ("7; A. 3 B. 7 C. 1 D. 0; ") gets the best logit, at every
    other position "A" does."""

    def __init__(self, tokenizer):
        super().__init__()
        self.tokenizer = tokenizer

    def forward(self, input_ids, attention_mask, **visual_inputs):
        logits = torch.zeros(*input_ids.shape, len(self.tokenizer))
        logits[..., self.tokenizer.convert_tokens_to_ids("A")] = 1.0
        for b, (ids, mask) in enumerate(zip(input_ids, attention_mask)):
            text = self.tokenizer.decode(ids[mask.bool()])
            started = re.fullmatch(
                r"(?s).*assistant\n(?:\w+, [a-z ]+: |The [^\n]*\?\nAnswer with the digit\.\n)?"
                r"(\d); A\. \d B\. \d C\. \d D\. \d; ",
                text,
            )
            if started:  # (a digit that no option holds leaves "A")
                if listed := re.search(rf"^([A-D])\. {started[1]}$", text, re.M):
                    logits[b, int(mask.sum()) - 1, self.tokenizer.convert_tokens_to_ids(listed[1])] = 2.0
            else:
                self.first_token(text, logits[b, int(mask.sum()) - 1])
        return type("Output", (), {"logits": logits})

    def first_token(self, text: str, row: torch.Tensor) -> None:
        """Logits `(vocab,)` of an answer's first token after `text` (none here: "A" stays best)."""


class OpenedOracle(ReasonedOracle):
    """A `ReasonedOracle` that names, right after a multiple-choice prompt followed by the opening of the
    digit-first form `answers` (written out here from the question's text), the record's answer digit,
    and right after one without it digit 9 (never an answer here)."""

    def __init__(self, tokenizer, records, answers):
        super().__init__(tokenizer)
        self.config = type("Config", (), {"hybrid_layer_indices": []})
        self.model = type("Inner", (), {"visual_grid": staticmethod(lambda frames: (2, 2))})
        self.answers, self.openings = {}, {}
        for record in records:
            question = choice_question(record)
            sentence = question.split("\n")[0]
            colour, negation = re.search(r"The (\w+) square .* while (not )?touching", sentence).groups()
            cue = f"{colour}, {negation or ''}touching: "
            self.answers[question] = record["answer_text"]
            self.openings[question] = cue if answers == "cued" else f"{sentence}\nAnswer with the digit.\n"

    def first_token(self, text, row):
        question = next((q for q in self.answers if q in text), None)
        if question is None:  # an open-form prompt
            return
        opened = text.endswith(self.openings[question])
        row[self.tokenizer.convert_tokens_to_ids(self.answers[question] if opened else "9")] = 3.0


@pytest.mark.parametrize("answers", ["cued", "restated"])
def test_opened_scoring_reads_the_digit_after_the_opening_and_the_letter_after_the_list(answers):
    frames, records = generate_clip(0, 0, "test", FRAMES, SIZE, FPS)
    records = [r for r in records if "9" not in r["options"]]
    texts = [choice_question(r) for r in records] + [*"0123456789"]
    _, processor = build_scratch_model(texts, **run.STAGE1_KNOBS["slow"], video_defaults=run.MODELS["c"][1])
    oracle = OpenedOracle(processor.tokenizer, records, answers)
    opened = scoring.score_clip(oracle, processor, frames, records, answers)
    assert all(r["reasoned_digit"] and r["reasoned_choice"] for r in opened) and opened
    plain = scoring.score_clip(oracle, processor, frames, records)  # digit read at the answer's start: 9
    assert all(not r["reasoned_digit"] and r["reasoned_lookup"] is None for r in plain)


def test_reasoned_letters_read_the_position_after_the_models_own_digit():
    frames, records = generate_clip(0, 0, "test", FRAMES, SIZE, FPS)
    texts = [choice_question(r) for r in records] + [*"0123456789"]
    _, processor = build_scratch_model(texts, **run.STAGE1_KNOBS["slow"], video_defaults=run.MODELS["c"][1])
    prompts = [
        processor.apply_chat_template(run.conversation([choice_question(r)]), add_generation_prompt=True)
        for r in records
    ]
    # per question an option digit other than option A's: an oracle that read a wrong position names A
    named = [record["options"][1 + b % 3] for b, record in enumerate(records)]
    starts = [
        f"{digit}; " + " ".join(f"{k}. {v}" for k, v in zip("ABCD", record["options"])) + "; "
        for digit, record in zip(named, records)
    ]
    oracle = ReasonedOracle(processor.tokenizer)
    letters = scoring.reasoned_letters(oracle, processor, frames, prompts, starts)
    assert letters == ["ABCD"[1 + b % 3] for b in range(len(records))]
    # the text scored is what training puts before the letter: its tokens start the trained answer's
    tokenizer = processor.tokenizer
    trained = tokenizer(prompts[0] + f"{starts[0]}{records[0]['answer']})<|im_end|>")["input_ids"]
    start = tokenizer(prompts[0] + starts[0])["input_ids"]
    assert trained[: len(start)] == start


def test_question_prefixes_cut_around_the_question_words():
    record = generate_clip(0, 0, "test", FRAMES, SIZE, FPS)[1][3]
    prompt = f"<|im_start|>user\n<video>\n{open_question(record)}<|im_end|>\n"
    before, through = scoring.question_prefixes(prompt, record)
    assert before == "<|im_start|>user\n<video>\n"
    assert through[len(before) :] == record["conversations"][0]["value"].split("\n")[1]


def write_result(runs: Path, model: str, seed: int, accuracy: float, choice: float, flops: float) -> None:
    (runs / f"{model}-s{seed}").mkdir(parents=True)
    result = {"model": model, "seed": seed, "steps": 1500, "stage1": "nowhere", "llm_prefill_flops": flops}
    result |= {"accuracy": accuracy, "choice_accuracy": choice, "digit_touching_wall": accuracy}
    result |= {"digit_away_from_wall": accuracy}
    (runs / f"{model}-s{seed}" / "result.json").write_text(json.dumps(result))


def test_summarize_verdict(tmp_path):
    c_choice = [0.40, 0.45, 0.60]
    for seed in range(3):
        write_result(tmp_path / "met", "a", seed, 0.25, 0.25, 100e6)
        write_result(tmp_path / "met", "b", seed, 0.30, 0.28 + 0.01 * seed, 100e6)
        write_result(tmp_path / "met", "c", seed, 0.35, c_choice[seed], 105e6)
    table = run.summarize(tmp_path / "met")
    values = [100 * v for v in c_choice]
    half, sd = (max(values) - min(values)) / 2, statistics.stdev(values)
    assert f"{statistics.mean(values):.1f}% ± {half:.1f}, sd {sd:.1f} (40.0, 45.0, 60.0)" in table
    assert "Verdict at 1500 steps" in table and "bar MET" in table and "1.050x" in table

    for seed in range(3):  # (c)'s worst seed no better than (b)'s best in the open form
        write_result(tmp_path / "open", "a", seed, 0.25, 0.25, 100e6)
        write_result(tmp_path / "open", "b", seed, 0.30 + 0.05 * seed, 0.25, 100e6)
        write_result(tmp_path / "open", "c", seed, 0.40 - 0.05 * seed, 0.50, 105e6)
    assert "bar NOT MET" in run.summarize(tmp_path / "open")
    for seed in range(3):  # beats both, but at 1.2x the FLOPs
        write_result(tmp_path / "flops", "a", seed, 0.25, 0.25, 100e6)
        write_result(tmp_path / "flops", "b", seed, 0.25, 0.25, 100e6)
        write_result(tmp_path / "flops", "c", seed, 0.50, 0.50, 120e6)
    assert "bar NOT MET" in run.summarize(tmp_path / "flops")


class FakeChild:
    """A finished child: `poll` returns its exit status."""

    def __init__(self, returncode: int):
        self.returncode = returncode

    def poll(self):
        return self.returncode


def fake_stages(root: Path, models=("a", "c")) -> list:
    stage1_dir = lambda kind, seed: root / f"stage1-{kind}-s{seed}"  # noqa: E731
    return plan.stages(
        [0, 1],
        list(models),
        10,
        root / "data",
        root / "vision",
        root / "runs",
        run.stage1_kind,
        stage1_dir,
        ["--single-event-steps", "3"],
    )


def test_plan_skips_finished_stages_and_orders_the_rest(tmp_path):
    for done in (
        "data/frame_pool.jsonl",
        "vision/result.json",
        "stage1-plain-s0/result.json",
        "runs/a-s0/result.json",
    ):
        (tmp_path / done).parent.mkdir(parents=True)
        (tmp_path / done).write_text("{}")
    stages = fake_stages(tmp_path)
    assert [s.name for s in plan.pending(stages)] == [
        "stage1-slow-s0",
        "stage1-plain-s1",
        "stage1-slow-s1",
        "c-s0",
        "a-s1",
        "c-s1",
    ]
    assert next(s for s in stages if s.name == "c-s1").args == [
        "train", "--model", "c", "--seed", "1", "--steps", "10", "--stage1", str(tmp_path / "stage1-slow-s1"),
        "--out", str(tmp_path / "runs" / "c-s1"), "--single-event-steps", "3",
    ]  # fmt: skip
    assert next(s for s in stages if s.name == "stage1-slow-s1").args == [
        "pretrain-llm", "--kind", "slow", "--seed", "1", "--out", str(tmp_path / "stage1-slow-s1")
    ]  # fmt: skip

    started = []

    def start(stage):  # a child that finishes at once, writing its output
        assert not any(s.name in stage.after for s in plan.pending(stages))  # its inputs are finished
        started.append(stage.name)
        stage.done.parent.mkdir(parents=True, exist_ok=True)
        stage.done.write_text("{}")
        return FakeChild(0)

    assert plan.run_plan(stages, parallel=2, start=start, poll_seconds=0) == 0
    assert sorted(started) == sorted(
        ["stage1-slow-s0", "stage1-plain-s1", "stage1-slow-s1", "c-s0", "a-s1", "c-s1"]
    )
    assert plan.pending(stages) == []


def test_plan_continues_each_run_on_fresh_clips_after_it(tmp_path):
    stage1_dir = lambda kind, seed: tmp_path / f"stage1-{kind}-s{seed}"  # noqa: E731
    runs = tmp_path / "runs"
    stages = plan.stages(
        [1], ["c"], 10, tmp_path / "data", tmp_path / "vision", runs, run.stage1_kind, stage1_dir, [], 7
    )
    more = stages[-1]
    assert [s.name for s in stages[-2:]] == ["c-s1", "c-s1-more"]
    assert more.after == ["c-s1"] and more.done == runs / "c-s1-more" / "result.json"
    assert more.args == ["train", "--model", "c", "--seed", "1", "--steps", "7", "--stage1", str(runs / "c-s1"),
                         "--out", str(runs / "c-s1-more"), "--data-seed", "101"]  # fmt: skip
    parsed = run.build_parser().parse_args(more.args)  # the arguments are ones `train` takes
    assert (parsed.stage1, parsed.out, parsed.data_seed, parsed.steps) == (
        runs / "c-s1",
        runs / "c-s1-more",
        101,
        7,
    )


def test_plan_with_the_lookup_recipe_starts_every_llm_from_the_text_only_runs(tmp_path):
    import lookup

    stage1_dir = lambda kind, seed: tmp_path / f"stage1-{kind}-lookup-s{seed}"  # noqa: E731
    recipe = plan.Lookup(30, 6, tmp_path / "lookup")
    runs = tmp_path / "runs-lookup"
    stages = plan.stages(
        [2],
        ["a", "c"],
        10,
        tmp_path / "data",
        tmp_path / "vision",
        runs,
        run.stage1_kind,
        stage1_dir,
        [],
        0,
        recipe,
    )
    by_name = {s.name: s for s in stages}
    forward, reverse = by_name["lookup-forward-s2"], by_name["lookup-reverse-s2"]
    assert forward.script == reverse.script == plan.LOOKUP and reverse.after == ["lookup-forward-s2"]
    parsed = [lookup.build_parser().parse_args(stage.args) for stage in (forward, reverse)]
    assert [(a.direction, a.steps, a.seed, a.init, a.out) for a in parsed] == [
        ("forward", 30, 2, None, tmp_path / "lookup" / "forward-s2"),
        ("reverse", 6, 2, tmp_path / "lookup" / "forward-s2", tmp_path / "lookup" / "reverse-s2"),
    ]
    for kind in ("plain", "slow"):
        first = by_name[f"lookup-stage1-{kind}-s2"]
        assert first.after == ["pretrain-vision", "lookup-reverse-s2"]
        parsed = run.build_parser().parse_args(first.args)
        assert (parsed.kind, parsed.both_forms, parsed.init, parsed.out) == (
            kind, True, tmp_path / "lookup" / "reverse-s2", stage1_dir(kind, 2)
        )  # fmt: skip
    for model in ("a", "c"):
        second = by_name[f"lookup-{model}-s2"]
        assert second.after == [f"lookup-stage1-{run.stage1_kind(model)}-s2"] and second.script is None
        parsed = run.build_parser().parse_args(second.args)
        assert (parsed.stage1, parsed.out) == (stage1_dir(run.stage1_kind(model), 2), runs / f"{model}-s2")


def test_plan_does_not_start_what_a_failed_stage_feeds(tmp_path):
    stages = fake_stages(tmp_path, models=("a",))
    started = []

    def start(stage):  # prepare fails: writes nothing
        started.append(stage.name)
        return FakeChild(1)

    assert plan.run_plan(stages, start=start, poll_seconds=0) == 1
    assert started == ["prepare"]


def test_stopping_the_plan_stops_its_children(tmp_path):
    stages = fake_stages(tmp_path, models=("a",))
    child_code = (
        "import signal, sys, time; signal.signal(signal.SIGTERM, lambda *a: sys.exit(0)); time.sleep(60)"
    )
    children = []

    def start(stage):
        children.append(subprocess.Popen([sys.executable, "-c", child_code]))
        return children[-1]

    threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
    assert plan.run_plan(stages, start=start, poll_seconds=0.05) == 1
    assert [child.returncode for child in children] == [0]  # it ran its SIGTERM handler, and was waited for


def test_launch_runs_the_stage_with_one_thread_into_its_log(tmp_path, monkeypatch):
    """`launch` runs `RUN ARGS` (here a stand-in script) with one thread, its output in the stage's log;
    `run_plan` counts a stage that exits 0 without writing its output as failed."""
    script = tmp_path / "stand_in.py"
    script.write_text("import os, sys; print('args', sys.argv[1:], 'threads', os.environ['OMP_NUM_THREADS'])")
    monkeypatch.setattr(plan, "RUN", script)
    monkeypatch.chdir(tmp_path)
    stage = plan.Stage("table", ["summarize", "--x"], tmp_path / "never")
    assert plan.run_plan([stage], start=plan.launch, poll_seconds=0.05) == 1
    assert (tmp_path / plan.LOGS / "table.log").read_text() == "args ['summarize', '--x'] threads 1\n"


# ----- the text-only option lookup exercise (benchmark.exercise, lookup.py) -----
def parse_exercise(question: str) -> tuple[str | None, dict[str, str], str | None]:
    """(the digit asked about, letter -> option, the letter asked about), read back from the text."""
    listed = dict(re.findall(r"^([A-Z])\. (\d)$", question, flags=re.M))
    digit = re.search(r"the digit (\d)\?", question)
    letter = re.search(r"is option ([A-Z])\?", question)
    return digit and digit.group(1), listed, letter and letter.group(1)


@pytest.mark.parametrize("any_letters", [False, True])
@pytest.mark.parametrize("direction", ["reverse", "forward", "digit-first"])
def test_lookup_exercise_answers_from_its_own_list(direction, any_letters):
    rng = np.random.default_rng(3)
    seen_letters = set()
    for _ in range(50):
        question, answer, candidates = exercise(direction, rng, any_letters)
        digit, listed, letter = parse_exercise(question)
        assert len(listed) == 4 and len(set(listed.values())) == 4
        seen_letters |= set(listed)
        if direction == "reverse":
            assert question.endswith("Answer with the option's letter.") and letter is None
            assert listed[answer] == digit and candidates == list(listed)
        elif direction == "digit-first":  # "7; A. 3 B. 7 ...; B": an option's digit, the list, its letter
            named, listing, named_letter = re.fullmatch(r"(\d); (.*); ([A-Z])", answer).groups()
            assert digit is None and letter is None and listed[named_letter] == named
            assert listing == " ".join(f"{k}. {v}" for k, v in listed.items())
            assert candidates == [f"{named}; {listing}; {option_letter}" for option_letter in listed]
        else:
            assert digit is None and answer == listed[letter] and candidates == list(listed.values())
    assert (seen_letters == set("ABCD")) != any_letters  # random capitals: more than A-D over 50 lists


BENCHMARK_SENTENCE = (
    r"The (red|green|blue|orange|purple) square showed two digits near a wall\. "
    r"Which digit did it show while (not )?touching the wall\?"
)


@pytest.mark.parametrize("direction", ["reverse", "forward", "digit-first"])
def test_a_preamble_puts_filler_words_and_a_benchmark_question_before_the_exercise(direction):
    counts = set()
    rng = np.random.default_rng(5)
    for _ in range(80):
        question, answer, _ = exercise(direction, rng, preamble_words=6)
        filler, sentence, rest = question.split("\n", 2)
        counts.add(len(filler.split()))
        assert set(filler.split()) <= set(FILLER_WORDS) and re.fullmatch(BENCHMARK_SENTENCE, sentence)
        digit, listed, letter = parse_exercise(rest)
        # the rest is the exercise as without a preamble, answered from its own list
        assert (
            rest.startswith("Which option" if direction == "reverse" else "Options:\n") and len(listed) == 4
        )
        if (
            direction == "digit-first"
        ):  # then the benchmark's multiple-choice question, as the benchmark closes it
            named, _, named_letter = re.fullmatch(r"(\d); (.*); ([A-D])", answer).groups()
            assert listed[named_letter] == named and rest.endswith("\nAnswer with the option's letter.")
            assert exercise(direction, rng)[0].endswith("\nAnswer with an option's digit, then its letter.")
        elif direction == "reverse":
            assert listed[answer] == digit
        else:
            assert answer == listed[letter]
    assert counts == set(range(7))  # 0 to 6 filler words


def test_cued_answers_restate_the_square_and_the_wall_condition_asked_about():
    # the colour is read from the question text, the condition from the record's category
    for record in generate_clip(0, 0, "test", FRAMES, SIZE, FPS)[1]:
        colour = re.search(r"The (\w+) square", record["conversations"][0]["value"])[1]
        condition = "touching" if record["category"] == CATEGORIES[0] else "not touching"
        listed = " ".join(f"{k}. {v}" for k, v in zip("ABCD", record["options"]))
        expected = f"{colour}, {condition}: {record['answer_text']}; {listed}; {record['answer']}"
        assert benchmark.cued_choice_answer(record) == expected
    with pytest.raises(ValueError, match="not a benchmark question"):
        question_cue("Which digit is option B?")
    rng = np.random.default_rng(2)
    for _ in range(20):  # an exercise's cue restates its preamble's question; without a preamble, none
        question, answer, candidates = exercise("digit-first", rng, preamble_words=3, answers="cued")
        colour, negation = re.search(r"The (\w+) square .* while (not )?touching", question).groups()
        cue = f"{colour}, {negation or ''}touching: "
        assert answer.startswith(cue) and all(c.startswith(cue) for c in candidates)
        assert re.fullmatch(r"\d; .*; [A-D]", exercise("digit-first", rng, answers="cued")[1])


@pytest.mark.parametrize(
    "arguments",
    [
        ["--answers", "restated"],
        ["--answers", "cued", "--preamble-words", "4"],
        ["--answers", "restated", "--direction", "reverse", "--preamble-words", "4"],
    ],
)
def test_lookup_rejects_an_answer_opening_without_its_preamble_question(arguments, capsys):
    import lookup

    with pytest.raises(SystemExit) as exit_info:
        lookup.main(arguments)
    assert (
        exit_info.value.code == 2
        and "needs --direction digit-first and --preamble-words >= 1" in capsys.readouterr().err
    )


def test_restated_answers_restate_the_open_question_before_the_digit():
    for record in generate_clip(0, 0, "test", FRAMES, SIZE, FPS)[1]:
        sentence = record["conversations"][0]["value"].split("\n")[1]  # (after "<video>")
        listed = " ".join(f"{k}. {v}" for k, v in zip("ABCD", record["options"]))
        expected = (
            f"{sentence}\nAnswer with the digit.\n{record['answer_text']}; {listed}; {record['answer']}"
        )
        assert benchmark.restated_choice_answer(record) == expected
        # what the answer restates is the open form's own prompt
        assert open_question(record) + "\n" == expected[: expected.index("\n", len(sentence) + 1) + 1]
    rng = np.random.default_rng(4)
    for _ in range(20):  # an exercise restates its preamble's question before its digit
        question, answer, candidates = exercise("digit-first", rng, preamble_words=3, answers="restated")
        sentence = question.split("\n")[1]
        opening = f"{sentence}\nAnswer with the digit.\n"
        assert answer.startswith(opening) and all(c.startswith(opening) for c in candidates)
        named, listing, letter = re.fullmatch(r"(\d); (.*); ([A-D])", answer.removeprefix(opening)).groups()
        assert parse_exercise(question.split("\n", 2)[2])[1][letter] == named


def test_open_reading_target_is_the_open_twins_reading_among_the_listed_options():
    from open_reading import open_reading_loss

    clips = [generate_clip(clip, 0, "train", FRAMES, SIZE, FPS) for clip in range(2)]
    texts = [benchmark.restated_choice_answer(r) for _, records in clips for r in records] + list(
        "0123456789"
    )
    model, processor = build_scratch_model(texts)
    tokenizer = processor.tokenizer
    args = (processor, [records for _, records in clips], [frames for frames, _ in clips])
    inputs, labels, twin = run.training_batch(*args, np.random.default_rng(3), "restated", 0, True)
    # the same turns as without the twin (the same draws), and the twin asks each of them open
    plain, plain_labels, no_twin = run.training_batch(*args, np.random.default_rng(3), "restated")
    assert no_twin is None
    assert torch.equal(plain["input_ids"], inputs["input_ids"]) and torch.equal(plain_labels, labels)
    turn = r"<\|im_start\|>user\n(.*?)<\|im_end\|>\n<\|im_start\|>assistant\n(.*?)<\|im_end\|>"
    logits = torch.randn(*inputs["input_ids"].shape, len(tokenizer), requires_grad=True)
    twin_logits = torch.randn(*twin["input_ids"].shape, len(tokenizer))
    expected_grad = torch.zeros_like(logits)
    count, choice_turns, n = 0, 0, len(tokenizer.encode("<|im_start|>assistant\n"))
    for b, (_, records) in enumerate(clips):
        ids, twin_ids = inputs["input_ids"][b].tolist(), twin["input_ids"][b].tolist()
        starts, twin_starts = (
            [i + n for i in range(len(row)) if tokenizer.decode(row[i : i + n]) == "<|im_start|>assistant\n"]
            for row in (ids, twin_ids)
        )
        turns = re.findall(turn, tokenizer.decode(ids), re.S)
        twin_turns = re.findall(turn, tokenizer.decode(twin_ids), re.S)
        for (question, answer), (twin_question, twin_answer), start, twin_start in zip(
            turns, twin_turns, starts, twin_starts
        ):
            record = next(r for r in records if benchmark.question_words(r) in question)
            assert twin_question.replace(processor.video_token, "").lstrip("\n") == open_question(record)
            assert twin_answer == record["answer_text"]
            count += len(tokenizer.encode(answer)) + 1  # (and its <|im_end|>)
            if answer == record["answer_text"]:
                continue
            choice_turns += 1
            # the named digit: right after the restated open question
            named = start + len(tokenizer.encode(open_question(record) + "\n"))
            assert tokenizer.decode(ids[named]) == record["answer_text"]
            options = [tokenizer.convert_tokens_to_ids(o) for o in record["options"]]
            reading = twin_logits[b, twin_start - 1, options].softmax(-1)
            # d/dlogits of -sum(q log softmax) is softmax - q, where the right digit's label would add softmax - onehot
            expected_grad[b, named - 1] = logits[b, named - 1].softmax(-1).detach()
            expected_grad[b, named - 1, options] -= reading
        # every other answer token keeps its label: softmax - onehot at the position before it
        for position in range(1, len(ids)):
            if labels[b, position] != -100 and not expected_grad[b, position - 1].any():
                expected_grad[b, position - 1] = logits[b, position - 1].softmax(-1).detach()
                expected_grad[b, position - 1, ids[position]] -= 1
    assert choice_turns > 0
    loss = open_reading_loss(logits, labels, inputs["input_ids"], twin_logits, twin["input_ids"], tokenizer)
    loss.backward()
    torch.testing.assert_close(logits.grad * count, expected_grad)
    # with no multiple-choice turn, the loss is the model's own
    letter_inputs, letter_labels, letter_twin = run.training_batch(
        *args, np.random.default_rng(5), "letter", 0, True
    )
    with torch.no_grad():
        out = model(**letter_inputs, labels=letter_labels)
        own = open_reading_loss(
            out.logits, letter_labels, letter_inputs["input_ids"], model(**letter_twin).logits,
            letter_twin["input_ids"], tokenizer,
        )  # fmt: skip
    torch.testing.assert_close(own, out.loss)


def test_an_open_reading_target_needs_digit_first_answers(workdir, capsys):
    command = ["train", "--model", "c", "--steps", "2", "--stage1", "stage1", "--out", "open-reading"]
    assert run.main([*command, "--open-reading-target"]) == 2
    assert "open_reading_target trains the digit of a digit-first answer" in capsys.readouterr().err


class LookupOracle(torch.nn.Module):
    """Reads each prompt back from its tokens; at its last real position the right answer (or, `wrong`,
    another candidate) gets the best logit, at every other position the right answer does."""

    def __init__(self, tokenizer, wrong: bool):
        super().__init__()
        self.tokenizer, self.wrong = tokenizer, wrong

    def forward(self, input_ids, attention_mask):
        logits = torch.zeros(*input_ids.shape, len(self.tokenizer))
        for b, (ids, mask) in enumerate(zip(input_ids, attention_mask)):
            digit, listed, _ = parse_exercise(self.tokenizer.decode(ids[mask.bool()]))
            right = next(letter for letter, option in listed.items() if option == digit)
            pick = next(letter for letter in listed if letter != right) if self.wrong else right
            logits[b, :, self.tokenizer.convert_tokens_to_ids(right)] = 1.0
            logits[b, int(mask.sum()) - 1] = 0.0
            logits[b, int(mask.sum()) - 1, self.tokenizer.convert_tokens_to_ids(pick)] = 1.0
        return type("Output", (), {"logits": logits})


def test_lookup_accuracy_reads_the_answer_position():
    import lookup

    texts = [open_question(r) for r in generate_clip(0, 0, "train", FRAMES, SIZE, FPS)[1]] + [*"0123456789"]
    _, processor = build_scratch_model(texts, **run.STAGE1_KNOBS["plain"])
    for wrong, expected in ((False, 1.0), (True, 0.0)):
        model = LookupOracle(processor.tokenizer, wrong)
        assert lookup.accuracy(model, processor, "reverse", count=60) == expected


def test_digit_first_lookup_accuracy_reads_the_letter_after_the_given_digit():
    import lookup

    texts = [open_question(r) for r in generate_clip(0, 0, "train", FRAMES, SIZE, FPS)[1]] + [*"0123456789"]
    _, processor = build_scratch_model(texts, **run.STAGE1_KNOBS["plain"])
    # the oracle names, after "7; <the options>; ", the letter listed for 7, and "A" at every other position
    assert lookup.accuracy(ReasonedOracle(processor.tokenizer), processor, "digit-first", count=60) == 1.0


def test_chance_loss_counts_the_labelled_tokens_of_each_answer_form():
    import lookup

    texts = [open_question(r) for r in generate_clip(0, 0, "train", FRAMES, SIZE, FPS)[1]] + [*"0123456789"]
    _, processor = build_scratch_model(texts, **run.STAGE1_KNOBS["plain"])
    # "B" + <|im_end|>: one guess in 2 tokens; "7; A. 3 B. 7 C. 1 D. 0; B": 25 characters, one token
    # each (the tokenizer learnt no merge of them), + <|im_end|>: two guesses in 26 tokens
    assert lookup.chance_loss(processor, "reverse") == pytest.approx(np.log(4) / 2)
    assert lookup.chance_loss(processor, "digit-first") == pytest.approx(2 * np.log(4) / 26)
    # restated: the question (at least its 20 words, "The", "green", ..., "wall?") and "Answer with the
    # digit." (4 words) on their own lines come before those 26 tokens; each word is one token or more
    restated = lookup.chance_loss(processor, "digit-first", 4, "restated")
    assert restated < 2 * np.log(4) / (26 + 20 + 4 + 2)


def test_a_resumed_lookup_run_keeps_the_accuracy_curve_taken_before_it_stopped(tmp_path, monkeypatch):
    import lookup

    texts = [open_question(r) for r in generate_clip(0, 0, "train", FRAMES, SIZE, FPS)[1]] + [*"0123456789"]
    monkeypatch.setattr(lookup, "scratch_texts", lambda: texts)
    measured = iter([0.25, 0.5, 0.75])  # what each held-out evaluation "finds", in call order
    monkeypatch.setattr(lookup, "accuracy", lambda *args, **kwargs: next(measured))
    out = tmp_path / "forward"
    stopped = lookup.train_lookup("forward", 4, 2, 1e-3, 0, out, eval_every=2, stop_after=2)
    assert stopped is None and json.loads((out / "accuracy_curve.json").read_text()) == {"2": 0.25}
    result = lookup.train_lookup("forward", 4, 2, 1e-3, 0, out, eval_every=2)
    # step 2's point, taken before the stop, is still there beside step 4's; the end's is the third call
    assert result["accuracy_curve"] == {2: 0.25, 4: 0.5} and result["held_out_accuracy"] == 0.75


def test_stage1_can_start_from_a_text_only_llm(tmp_path):
    texts = [open_question(r) for r in generate_clip(0, 0, "train", FRAMES, SIZE, FPS)[1]] + [*"0123456789"]
    text_only, processor = build_scratch_model(texts, seed=1, **run.STAGE1_KNOBS["plain"])
    text_only.save_pretrained(tmp_path / "lookup")
    processor.save_pretrained(tmp_path / "lookup")
    slow, slow_processor = build_scratch_model(texts, seed=0, **run.STAGE1_KNOBS["slow"])
    before = {k: v.clone() for k, v in slow.state_dict().items()}
    run.start_from_text_only(slow, slow_processor, tmp_path / "lookup")
    after, source = slow.state_dict(), text_only.state_dict()
    for name, value in after.items():
        if "cross_attn" in name or not (".language_model." in name or name.startswith("lm_head")):
            assert torch.equal(value, before[name]), name  # hybrid-layer and visual weights: untouched
        else:
            assert torch.equal(value, source[name]), name
    assert any("cross_attn" in name for name in after)
    _, other = build_scratch_model(texts[:2], **run.STAGE1_KNOBS["slow"])
    with pytest.raises(ValueError, match="its tokenizer is not the experiment's"):
        run.start_from_text_only(slow, other, tmp_path / "lookup")


def test_lookup_score_loads_each_saved_model_and_rejects_a_missing_one(tmp_path, capsys):
    import lookup

    texts = [open_question(r) for r in generate_clip(0, 0, "train", FRAMES, SIZE, FPS)[1]] + [*"0123456789"]
    model, processor = build_scratch_model(texts, seed=2, **run.STAGE1_KNOBS["plain"])
    model.save_pretrained(tmp_path / "saved")
    processor.save_pretrained(tmp_path / "saved")
    expected = {
        d: lookup.accuracy(model, processor, d) for d in ("reverse", "forward", "digit-first")
    }  # the model in memory
    assert lookup.main(["--score", str(tmp_path / "saved")]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == {str(tmp_path / "saved"): expected}
    with pytest.raises(SystemExit) as exit_info:
        lookup.main(["--score", str(tmp_path / "saved"), str(tmp_path / "nothing")])
    assert exit_info.value.code == 2 and "nothing" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # training options beside --score would be ignored
        lookup.main(["--score", str(tmp_path / "saved"), "--steps", "5"])
    assert exit_info.value.code == 2 and "--steps would be ignored" in capsys.readouterr().err


def documented_commands() -> list[tuple[str, list[str]]]:
    """Every `python experiments/synth/<script>.py ...` command in a bash block of the docs, as (script,
    arguments): continuation lines joined, each command up to a `&&`, a comment or the line's end."""
    root = Path(__file__).parents[1]
    docs = [root / "README.md", root / "BENCHMARKS.md", root / "experiments/synth/README.md"]
    blocks = [
        b
        for path in docs + sorted((root / "docs").glob("*.md"))
        for b in re.findall(r"```bash\n(.*?)```", path.read_text(), re.S)
    ]
    command = r"python experiments/synth/(\w+)\.py([^&#\n]*)"
    return [(m[1], shlex.split(m[2])) for b in blocks for m in re.finditer(command, b.replace("\\\n", " "))]


def test_every_documented_experiment_command_parses():
    import add_hybrid_layer
    import binding
    import colour_match
    import lookup
    import widen_kv_heads

    parsers = {
        "run": run.build_parser(),
        "lookup": lookup.build_parser(),
        "binding": binding.build_parser(),
        "widen_kv_heads": widen_kv_heads.build_parser(),
        "add_hybrid_layer": add_hybrid_layer.build_parser(),
        "colour_match": colour_match.build_parser(),
    }
    commands = documented_commands()
    assert {script for script, _ in commands} == set(parsers) and len(commands) > 15
    for script, arguments in commands:
        parsers[script].parse_args(arguments)  # exits (status 2) on an unknown or malformed option


@pytest.mark.parametrize("model", sorted(run.MODELS))
def test_each_model_starts_from_a_stage_1_llm_with_its_own_hybrid_layers(model):
    """A model's stage-1 LLM has exactly its hybrid layers: (c) at layer 2, c-early at layer 1, the
    others none (c-nogate starts from the plain LLM: its branch is new in stage 2)."""
    hybrid = run.MODELS[model][0]["hybrid_layers"]
    stage1 = run.STAGE1_KNOBS[run.stage1_kind(model)]["hybrid_layers"]
    expected = {"c": [2], "c-early": [1]}.get(model, [])
    assert stage1 == expected and (hybrid == stage1 or model == "c-nogate")


def test_evidence_attention_targets_each_answers_digit_and_reads_the_blocks_own_attention():
    import evidence_attention

    rendered, records = generate_clip(0, 0, "test", FRAMES, SIZE, FPS)
    texts = [choice_question(r) for r in records] + [open_question(r) for r in records] + [*"0123456789"]
    model, processor = build_scratch_model(
        texts, **run.STAGE1_KNOBS["slow"], video_defaults=run.MODELS["c"][1]
    )
    videos = [run.select_frames(rendered, processor.sampling_defaults())] * 2
    inputs, _, _ = run.training_batch(
        processor, [records, records[:2]], videos, np.random.default_rng(0), choice_answers="restated"
    )
    targets = evidence_attention.evidence_targets(
        inputs["input_ids"], [records, records], processor.tokenizer
    )
    assert len(targets) == len(records) + 2  # every answer names its digit (open or restated)
    frame_of = {r["answer_text"]: r["detail_frames"][0] for r in records}
    for b, position, frame in targets:
        assert frame_of[processor.tokenizer.decode(inputs["input_ids"][b, position + 1])] == frame
    evidence = evidence_attention.EvidenceAttention(model.hybrid_attentions[0])
    b, position, frame = targets[3]
    only_there = torch.zeros_like(inputs["attention_mask"], dtype=torch.bool)
    only_there[b, position] = True  # the block records the attention of that one query
    with torch.no_grad():
        outputs = model(**inputs, slow_query_mask=only_there, record_slow_attention=True)
        tokens_per_frame = int(np.prod(model.model.visual_grid(len(videos[0]))))
        recorded = outputs.slow_cache.attention_map()[b, 0].mean(0).view(-1, tokens_per_frame).sum(-1)
        mine = evidence.frame_probabilities([(b, position, frame)], tokens_per_frame)[0]
        loss = evidence.loss([(b, position, frame)], tokens_per_frame)
    torch.testing.assert_close(mine, recorded, rtol=1e-4, atol=1e-6)
    assert abs(float(loss) + float(torch.log(recorded[frame]))) < 1e-4


def test_digit_choice_targets_the_shown_digits_patches_and_renormalises_the_blocks_attention():
    import evidence_attention

    from slowfast_vlm.synth import glyph, glyph_scale

    rendered, records = generate_clip(0, 0, "test", FRAMES, SIZE, FPS)
    texts = [open_question(r) for r in records] + [*"0123456789"]
    model, processor = build_scratch_model(
        texts, **run.STAGE1_KNOBS["slow"], video_defaults=run.MODELS["c"][1]
    )
    video = run.select_frames(rendered, processor.sampling_defaults())
    shown = [records, records[2:5]]  # the second sample asked about (and shown) 3 of the digits
    inputs, _, _ = run.training_batch(
        processor, shown, [video] * 2, np.random.default_rng(0), choice_answers="restated"
    )
    grid, patch = model.model.visual_grid(FRAMES), model.config.vision_config.patch_size
    targets = evidence_attention.digit_choice_targets(
        inputs["input_ids"], shown, processor.tokenizer, grid, patch
    )
    assert len(targets) == len(records) + 3

    def token_of_glyph(digit: int) -> int:  # from the pixels: where the digit's glyph is drawn
        ((frame, x, y),) = find_digit(rendered, digit)
        h, w = glyph(digit, glyph_scale(SIZE)).shape
        return frame * grid[0] * grid[1] + (y + h // 2) // patch * grid[1] + (x + w // 2) // patch

    for b, position, candidates, right in targets:
        assert candidates == [token_of_glyph(int(r["answer_text"])) for r in shown[b]]
        named = processor.tokenizer.decode(inputs["input_ids"][b, position + 1])
        assert shown[b][right]["answer_text"] == named
    evidence = evidence_attention.EvidenceAttention(model.hybrid_attentions[0])
    b, position, candidates, right = targets[-1]
    only_there = torch.zeros_like(inputs["attention_mask"], dtype=torch.bool)
    only_there[b, position] = True
    with torch.no_grad():
        outputs = model(**inputs, slow_query_mask=only_there, record_slow_attention=True)
        per_head = outputs.slow_cache.attention_map()[b, 0][:, candidates]  # (H, 3): the recorded softmax
        expected = (per_head / per_head.sum(-1, keepdim=True)).mean(0)[right]  # renormalised per head
        loss = evidence.digit_choice_loss([(b, position, candidates, right)])
    assert abs(float(loss) + float(torch.log(expected))) < 1e-4


def test_binding_probe_scores_a_linear_label_as_read_and_a_random_one_near_chance():
    import binding

    generator = torch.Generator().manual_seed(0)
    features = torch.randn(400, 16, generator=generator)
    linear = (features[:, 3] - features[:, 7] > 0).long()  # a label that one direction of the features holds
    unrelated = torch.randint(0, 5, (400,), generator=generator)  # 5 classes, independent of the features
    assert binding.held_out_accuracy(features, linear) > 0.9
    assert binding.held_out_accuracy(features, unrelated) < 0.35  # chance 0.2


def saved_scratch_model(path: Path, records: list[dict]):
    """A scratch (c) model whose tokenizer knows the records' open questions, saved in `path`."""
    model, processor = build_scratch_model(
        [open_question(r) for r in records], **run.STAGE1_KNOBS["slow"], video_defaults=run.MODELS["c"][1]
    )
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return model, processor


def test_binding_probes_run_on_a_saved_checkpoint(tmp_path):
    import binding

    _, records = generate_clip(0, 8, "test", FRAMES, SIZE, FPS)
    model, _ = saved_scratch_model(tmp_path, records)
    report = binding.binding_probes(tmp_path, seed=8, clips=4)
    assert report["questions"] == 4 * len(records)
    assert len(report["answer_position_entering_layer"]) == model.config.text_config.num_hidden_layers
    # (entering layer 0 the answer position is the same token for every question: nothing to read there)
    assert report["answer_position_entering_layer"][0]["contact"] <= 0.75


def test_bilinear_match_binds_a_planted_match_and_whitening_gives_unit_variance():
    import colour_match

    generator = torch.Generator().manual_seed(0)
    questions, candidates, width = 600, 6, 12
    s = torch.randn(questions, candidates, width, generator=generator)
    right = torch.arange(questions) % candidates
    h = s[torch.arange(questions), right] @ torch.randn(width, width, generator=generator)  # h = s_right A
    assert colour_match.bilinear_match_accuracy(h, s)["held_out"] > 0.9  # W = A^-1 scores s_right highest
    unrelated = torch.randn(questions, width, generator=generator)
    assert colour_match.bilinear_match_accuracy(unrelated, s)["held_out"] < 0.3  # chance 1/6

    # whitened: each covariance direction's variance v becomes v / (v + 1e-3 max v), whatever the mixing
    mixing = torch.tensor([[5.0, 0, 0], [2.0, 0.1, 0], [0, 0, 1.0]])
    skewed = torch.randn(4000, 3, generator=generator) @ mixing
    variances = torch.linalg.eigvalsh(torch.cov(skewed.T))  # ascending, as the whitened basis is ordered
    expected = torch.diag(variances / (variances + 1e-3 * variances.max()))
    torch.testing.assert_close(torch.cov(colour_match.whiten(skewed).T), expected, atol=1e-4, rtol=0)


def test_colour_match_features_are_the_hybrid_inputs_at_the_answer_and_the_digit_patches(tmp_path):
    import hybrid_inputs

    from slowfast_vlm.inference import load_model

    rendered, records = generate_clip(0, 8, "test", FRAMES, SIZE, FPS)
    model, _ = saved_scratch_model(tmp_path, records)
    h, s, attention = hybrid_inputs.match_features(
        *load_model(str(tmp_path), "cpu", "float32"), seed=8, clips=2
    )
    assert h.shape == (2 * len(records), model.config.text_config.hidden_size)
    assert s.shape == (2 * len(records), len(records), model.config.text_config.hidden_size)
    assert attention.shape == (2 * len(records), len(records))
    torch.testing.assert_close(attention.sum(-1), torch.ones(2 * len(records)))
    # the first clip's candidates, recomputed from the vision tower for the digits found in the pixels
    from slowfast_vlm.synth import glyph, glyph_scale

    model, processor = load_model(str(tmp_path), "cpu", "float32")
    frames = scoring.round_trip(rendered, processor)
    prompt = processor.apply_chat_template(
        benchmark.conversation([open_question(records[0])]), add_generation_prompt=True
    )
    inputs = processor(text=[prompt], videos=[frames], return_tensors="pt")
    with torch.no_grad():
        # h: the hidden state entering the hybrid layer (2) at the last prompt token, after its input norm
        entering = model(**inputs, output_hidden_states=True).hidden_states[2][0, -1]
        torch.testing.assert_close(
            h[0], model.model.language_model.layers[2].input_layernorm(entering), rtol=1e-4, atol=1e-5
        )
        tokens = model.model.encode_visual_items([inputs["pixel_values_videos"][0]])[0]  # (T, h*w, D)
        (_, width), patch = model.model.visual_grid(FRAMES), model.config.vision_config.patch_size
        for candidate, record in enumerate(records):
            ((frame, x, y),) = find_digit(rendered, int(record["answer_text"]))
            gh, gw = glyph(int(record["answer_text"]), glyph_scale(SIZE)).shape
            token = tokens[frame, (y + gh // 2) // patch * width + (x + gw // 2) // patch]
            expected = model.hybrid_attentions[0].slow_norm(token)
            torch.testing.assert_close(s[0, candidate], expected, rtol=1e-4, atol=1e-5)


def test_widened_kv_heads_compute_the_checkpoints_logits(tmp_path):
    import widen_kv_heads

    rendered, records = generate_clip(0, 8, "test", FRAMES, SIZE, FPS)
    model, processor = build_scratch_model(
        [open_question(r) for r in records], **run.STAGE1_KNOBS["slow"], video_defaults=run.MODELS["c"][1]
    )
    assert model.config.text_config.num_key_value_heads == 1  # (the experiment's LLM: one kv head)
    # 1 -> 2 heads, then two different heads (random key/value rows: a trained branch), so that going on
    # to 4 must send each query head the copy of its own kv head
    model = processor.prepare_model(widen_kv_heads.widen_kv_heads(model, 2))
    torch.manual_seed(0)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "cross_attn" in name or ".k_proj." in name or ".v_proj." in name:
                parameter.normal_(std=0.2)
    videos = [run.select_frames(rendered, processor.sampling_defaults())] * 2
    inputs, _, _ = run.training_batch(
        processor, [records[:1], records[1:2]], videos, np.random.default_rng(0)
    )
    widened = widen_kv_heads.widen_kv_heads(model, 4)
    # (the source's generation config is kept, not re-derived)
    assert widened.generation_config.eos_token_id == processor.tokenizer.eos_token_id
    processor.prepare_model(widened)
    widened.save_pretrained(tmp_path)
    reloaded = processor.prepare_model(type(model).from_pretrained(tmp_path, dtype=torch.float32).eval())
    no_slow = torch.zeros_like(inputs["attention_mask"], dtype=torch.bool)
    with torch.no_grad():
        expected = model(**inputs).logits
        without_branch = model(**inputs, slow_query_mask=no_slow).logits
        assert (without_branch - expected).abs().max() > 1e-2  # (the slow branch moves these logits)
        for candidate in (widened, reloaded):
            assert candidate.config.text_config.num_key_value_heads == 4
            block = candidate.hybrid_attentions[0]
            assert block.cross_attn_kv_proj.out_features == 2 * 4 * block.head_dim
            torch.testing.assert_close(candidate(**inputs).logits, expected, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="--kv-heads 3"):
        widen_kv_heads.widen_kv_heads(model, 3)


def hybrid_layers_of(model) -> list[int]:
    """The decoder layers that are built as hybrid layers (read off the modules, not the config)."""
    from slowfast_vlm.modeling.hybrid import HybridAttention

    layers = model.model.language_model.layers
    return [i for i, layer in enumerate(layers) if isinstance(layer.self_attn, HybridAttention)]


def test_an_added_hybrid_layer_keeps_the_logits_and_training_keeps_it(workdir, tmp_path):
    import add_hybrid_layer

    rendered, records = generate_clip(0, 8, "test", FRAMES, SIZE, FPS)
    model, processor = build_scratch_model(
        [open_question(r) for r in records], **run.STAGE1_KNOBS["slow"], video_defaults=run.MODELS["c"][1]
    )
    torch.manual_seed(0)
    with torch.no_grad():  # a trained branch: random key/value rows, so that the slow tokens move the logits
        for name, parameter in model.named_parameters():
            if "cross_attn" in name:
                parameter.normal_(std=0.2)
    videos = [run.select_frames(rendered, processor.sampling_defaults())] * 2
    inputs, _, _ = run.training_batch(
        processor, [records[:1], records[1:2]], videos, np.random.default_rng(0)
    )
    extended = add_hybrid_layer.add_hybrid_layer(model, 3)
    extended.save_pretrained(tmp_path / "extended")
    processor.save_pretrained(tmp_path / "extended")
    reloaded = type(model).from_pretrained(tmp_path / "extended", dtype=torch.float32).eval()
    with torch.no_grad():
        expected = model(**inputs).logits
        for candidate in (extended, reloaded):
            assert hybrid_layers_of(candidate) == [2, 3] and candidate.config.hybrid_layers == [2, 3]
            torch.testing.assert_close(candidate(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
        # the new layer is read: values of its own move the logits
        block = reloaded.model.language_model.layers[3].self_attn
        block.cross_attn_kv_proj.weight.normal_(std=0.2)
        assert (reloaded(**inputs).logits - expected).abs().max() > 1e-2
    for wrong in (2, 4):
        with pytest.raises(ValueError, match=f"--layer {wrong}"):
            add_hybrid_layer.add_hybrid_layer(model, wrong)
    # a (c) run continued from it trains both hybrid layers and saves them
    run.train("c", 0, 1, BATCH, 1e-3, tmp_path / "continued", tmp_path / "extended")
    continued = type(model).from_pretrained(tmp_path / "continued", dtype=torch.float32)
    assert hybrid_layers_of(continued) == [2, 3]
    new_layer = "model.language_model.layers.3.self_attn.cross_attn_kv_proj.weight"
    assert not torch.equal(continued.state_dict()[new_layer], extended.state_dict()[new_layer])


def test_kv_lr_scale_puts_the_hybrid_key_value_projection_alone_at_its_own_rate():
    model, _ = build_scratch_model(["0"], **run.STAGE1_KNOBS["slow"])
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert run.parameter_groups(model, trainable, 1e-3) == [{"params": trainable}]
    others, key_value = run.parameter_groups(model, trainable, 1e-3, kv_lr_scale=10.0)
    projection = model.hybrid_attentions[0].cross_attn_kv_proj
    assert {id(p) for p in key_value["params"]} == {id(projection.weight), id(projection.bias)}
    assert key_value["lr"] == pytest.approx(1e-2) and "lr" not in others
    assert len(others["params"]) + 2 == len(trainable)


def test_whitened_lr_scale_puts_the_whitened_projections_alone_at_their_own_rate():
    import whitened_training

    model, processor = build_scratch_model(
        [*"0123456789"], **run.STAGE1_KNOBS["slow"], video_defaults=run.MODELS["c"][1]
    )
    whitened_training.whiten_hybrid_projections(model, processor, clips=1)
    trainable = [p for p in model.parameters() if p.requires_grad]
    others, whitened = run.parameter_groups(model, trainable, 1e-3, whitened_lr_scale=10.0)
    block = model.hybrid_attentions[0]
    layers = (block.q_proj, block.cross_attn_kv_proj)
    assert {id(p) for p in whitened["params"]} == {
        id(p) for layer in layers for p in (layer.weight, layer.bias)
    }
    assert whitened["lr"] == pytest.approx(1e-2) and len(others["params"]) + 4 == len(trainable)
    with pytest.raises(ValueError, match="give one"):
        run.parameter_groups(model, trainable, 1e-3, kv_lr_scale=10.0, whitened_lr_scale=10.0)


def test_muon_trains_the_chosen_matrices_and_steps_schedules_and_resumes_as_one_optimizer():
    model, _ = build_scratch_model(["0"], **run.STAGE1_KNOBS["slow"])
    names = {id(p): n for n, p in model.named_parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = run.build_optimizer(model, trainable, 1e-3, 1.0, "hybrid", 0.02)
    adamw, muon = optimizer.parts
    hybrid = model.hybrid_attentions[0]
    assert {id(p) for p in muon.param_groups[0]["params"]} == {
        id(hybrid.q_proj.weight),
        id(hybrid.cross_attn_kv_proj.weight),
    }
    assert len(adamw.param_groups[0]["params"]) + 2 == len(trainable)
    decoder = run.build_optimizer(model, trainable, 1e-3, 1.0, "decoder", 0.02).parts[1]
    with pytest.raises(ValueError, match="its own rate"):  # a scale would otherwise be dropped silently
        run.build_optimizer(model, trainable, 1e-3, 10.0, "hybrid", 0.02)
    in_decoder = [names[id(p)] for p in decoder.param_groups[0]["params"]]
    assert in_decoder and all(".layers." in n and n.endswith(".weight") for n in in_decoder)
    assert not any("norm" in n or "embed" in n for n in in_decoder)

    # against the two optimizers stepped apart on a copy: the same weights after a scheduled step
    generator = torch.Generator().manual_seed(0)
    for p in trainable:
        p.grad = torch.randn(p.shape, generator=generator)
    twin = {id(p): p.detach().clone().requires_grad_() for p in trainable}
    for p in trainable:
        twin[id(p)].grad = p.grad.clone()
    reference = (
        torch.optim.AdamW(
            [twin[id(p)] for p in adamw.param_groups[0]["params"]],
            lr=0.5e-3,
            weight_decay=0.01,
            betas=(0.9, 0.98),
        ),
        torch.optim.Muon(
            [twin[id(p)] for p in muon.param_groups[0]["params"]],
            lr=0.01,
            weight_decay=0.01,
            adjust_lr_fn="match_rms_adamw",
        ),
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5)  # halves both parts' rates
    optimizer.step()
    for part in reference:
        part.step()
    for p in trainable:
        torch.testing.assert_close(p.detach(), twin[id(p)].detach())

    # a second step from the saved state equals the uninterrupted one
    saved = copy.deepcopy(
        {"optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()}
    )  # as saved
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer.step()
    uninterrupted = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(weights[n])
    resumed = run.build_optimizer(model, trainable, 1e-3, 1.0, "hybrid", 0.02)
    resumed_schedule = torch.optim.lr_scheduler.LambdaLR(resumed, lambda step: 0.5)
    resumed.load_state_dict(saved["optimizer"])
    resumed_schedule.load_state_dict(saved["schedule"])
    resumed.step()
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), uninterrupted[n])


def test_whitened_linear_computes_the_layer_folds_back_exactly_and_learns_on_whitened_inputs():
    import hybrid_inputs
    import whitened_training

    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(500, 8, generator=generator) @ torch.randn(8, 8, generator=generator) + 3.0
    linear = torch.nn.Linear(8, 5)
    whitened = whitened_training.WhitenedLinear(linear, *hybrid_inputs.whitening(inputs))
    with torch.no_grad():
        torch.testing.assert_close(whitened(inputs), linear(inputs), rtol=1e-4, atol=1e-4)
        # the layer's own gradient: the output gradient times the whitened input, (x - m) @ P
        mean, matrix = hybrid_inputs.whitening(inputs)
    whitened(inputs[:3]).sum().backward()
    expected = torch.ones(3, 5).T @ ((inputs[:3] - mean) @ matrix)
    torch.testing.assert_close(whitened.weight.grad, expected, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        whitened.weight.add_(0.1)  # a trained W' still folds into the plain layer that computes the same
        folded = whitened.fold()
        assert isinstance(folded, torch.nn.Linear)
        torch.testing.assert_close(folded(inputs), whitened(inputs), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="bias"):
        whitened_training.WhitenedLinear(torch.nn.Linear(8, 5, bias=False), mean, matrix)


def test_whitening_the_hybrid_projections_and_folding_them_back_restores_the_layers():
    import whitened_training

    def block_of(model):
        return model.hybrid_attentions[0]

    model, processor = build_scratch_model(
        [*"0123456789"], **run.STAGE1_KNOBS["slow"], video_defaults=run.MODELS["c"][1]
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    whitened_training.whiten_hybrid_projections(model, processor, clips=2)
    block = model.hybrid_attentions[0]
    assert isinstance(block.q_proj, whitened_training.WhitenedLinear)
    assert isinstance(block.cross_attn_kv_proj, whitened_training.WhitenedLinear)
    with torch.no_grad():
        block.q_proj.weight.add_(0.05)  # as trained
    state = copy.deepcopy(model.state_dict())  # a training checkpoint's "model"
    trained_query = block.q_proj.fold()  # (its bias moves too: b = b' - W m)
    whitened_training.fold_whitened(model)
    for name, value in model.state_dict().items():  # the same names and, but for the trained query, weights
        if ".layers.2.self_attn.q_proj." not in name:
            torch.testing.assert_close(value, before[name], rtol=1e-3, atol=1e-4)
    torch.testing.assert_close(block_of(model).q_proj.weight, trained_query.weight)
    torch.testing.assert_close(block_of(model).q_proj.bias, trained_query.bias)
    # the checkpoint restored on the starting model gives the same plain layers
    restored = type(model)(model.config)
    restored.load_state_dict(before)
    whitened_training.restore_training_state(restored, state)
    for name, value in restored.state_dict().items():
        torch.testing.assert_close(value, model.state_dict()[name], rtol=1e-4, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(
    not (DEMO_MODEL_DIR / "config.json").exists(), reason="this installation ships no demo model"
)
def test_readme_eval_of_the_demo_model_on_the_test_split_gives_the_figure_it_states(tmp_path):
    # README: `run.py prepare` (its test split: `write_split`), then `slowfast-vlm eval --model <demo model>
    # --data <test split> --output OUT` "scores **X%** (N of M;": the figure is read from the README itself
    from slowfast_vlm.cli import main

    readme = (Path(__file__).parents[1] / "README.md").read_text()
    stated = re.search(r"--output OUT`\), scores \*\*([\d.]+)%\*\* \((\d+) of (\d+);", readme)
    percent, correct, total = float(stated[1]), int(stated[2]), int(stated[3])
    run.write_split("test", tmp_path)
    argv = ["eval", "--model", str(DEMO_MODEL_DIR), "--data", str(tmp_path / "test.jsonl")]
    assert main([*argv, "--output", str(tmp_path / "out")]) == 0
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert (metrics["num_samples"], metrics["num_correct"]) == (total, correct)
    assert round(100 * correct / total, 1) == percent
