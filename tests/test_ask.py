"""`slowfast-vlm ask` end to end on a tiny saved model and real mp4 files."""

import torch
from helpers import save_tiny_checkpoint, write_random_video

from slowfast_vlm import load_video
from slowfast_vlm.cli import main


def test_ask_streams_the_greedy_answer(tmp_path, capsys):
    model, processor = save_tiny_checkpoint(tmp_path / "model")
    write_random_video(tmp_path / "clip.mp4", num_frames=12)
    capsys.readouterr()  # saving may print (deepspeed's first import announces its accelerator on stdout)
    code = main(
        [
            "ask",
            "--model",
            str(tmp_path / "model"),
            str(tmp_path / "clip.mp4"),
            "What happens?",
            "--frames",
            "8",
            "--fps",
            "8",
            "--max-new-tokens",
            "6",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0
    assert "decoding" in err and "done" in err  # progress goes to stderr

    # independent path: decode, build the prompt by hand, greedy-generate with the in-memory model
    frames, _ = load_video(tmp_path / "clip.mp4", 8, fps=8)
    prompt = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<video>\nWhat happens?<|im_end|>\n<|im_start|>assistant\n"
    )
    inputs = processor(text=prompt, videos=[frames], return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    expected = processor.batch_decode(ids[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)[0]
    assert out.strip() == expected.strip()


def test_ask_uses_the_processors_video_defaults(tmp_path, capsys):
    _, processor = save_tiny_checkpoint(tmp_path / "model")
    processor.video_defaults = {"num_frames": 6, "fps": 3.0, "sampling": "uniform"}
    processor.save_pretrained(tmp_path / "model")
    write_random_video(tmp_path / "clip.mp4", num_frames=12)
    assert (
        main(
            [
                "ask",
                "--model",
                str(tmp_path / "model"),
                str(tmp_path / "clip.mp4"),
                "q",
                "--max-new-tokens",
                "1",
            ]
        )
        == 0
    )
    assert "(6 frames, uniform sampling at 3.0 fps)" in capsys.readouterr().err


def test_ask_attention_map(tmp_path, capsys):
    save_tiny_checkpoint(tmp_path / "model")
    write_random_video(tmp_path / "clip.mp4", num_frames=8)
    code = main(
        [
            "ask",
            "--model",
            str(tmp_path / "model"),
            str(tmp_path / "clip.mp4"),
            "What?",
            "--frames",
            "8",
            "--max-new-tokens",
            "2",
            "--attention-map",
            str(tmp_path / "map.png"),
        ]
    )
    assert code == 0
    assert (tmp_path / "map.png").stat().st_size > 1000
    assert "attention map" in capsys.readouterr().err


def test_ask_reports_bad_inputs(tmp_path, capsys):
    save_tiny_checkpoint(tmp_path / "model")
    (tmp_path / "notes.mp4").write_text("not a video")
    cases = [
        (["--model", str(tmp_path / "model"), str(tmp_path / "missing.mp4"), "q"], "missing.mp4"),
        (["--model", str(tmp_path / "model"), str(tmp_path / "notes.mp4"), "q"], "notes.mp4"),
        (["--model", str(tmp_path / "nowhere"), str(tmp_path / "notes.mp4"), "q"], "cannot load model"),
        (["--model", "some-org/not-cached-model", str(tmp_path / "notes.mp4"), "q"], "cannot load model"),
        (["--model", str(tmp_path / "model"), "--device", "gpu0", str(tmp_path / "notes.mp4"), "q"], "gpu0"),
    ]
    for args, needle in cases:
        assert main(["ask", *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert needle in err[-1]
