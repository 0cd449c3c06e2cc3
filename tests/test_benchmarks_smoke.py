"""Each benchmark script runs with `--quick` and produces its table and its PNG (numbers are not checked:
performance is measured by the scripts, never asserted in tests)."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from slowfast_vlm import SlowFastConfig

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root holds `benchmarks/`

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(autouse=True)
def keep_torch_threads():
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def table_rows(text: str, header_start: str) -> list[list[str]]:
    """Cells of the markdown table whose header row starts with `header_start`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {header_start} |"))
    rows = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip("|").split("|")])
    return rows


def run(name: str, tmp_path: Path, capsys, *extra: str) -> str:
    importlib.import_module(f"benchmarks.{name}").main(["--quick", "--out", str(tmp_path), *extra])
    png = tmp_path / f"{name}.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 5_000
    return capsys.readouterr().out


def positive(cell: str) -> float:
    value = float(re.sub(r"[,x]", "", cell))
    assert value > 0, cell
    return value


@pytest.mark.slow
def test_prefill(tmp_path, capsys):
    out = run("prefill", tmp_path, capsys, "--allow-load")
    rows = table_rows(out, "frames")
    assert [(r[0], r[1]) for r in rows] == [
        ("16", "self-attention"),
        ("16", "slowfast"),
        ("128", "self-attention"),
        ("128", "slowfast"),
    ]
    for row in rows:
        for cell in row[5:7]:  # latency, peak memory
            positive(cell)
    # quick LLM (64-token prompt, 16 slow tokens per frame): self-attention at 128 frames has 64 + 2048 tokens
    assert rows[2][2] == "2,112" and rows[3][3] == "2,048"
    assert "Equal prefill budget" in out


def test_decoding(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("benchmarks.common.STARTUP_LOAD", 3.5)  # the script's start-up raised it to 3.5
    monkeypatch.setattr("benchmarks.common.os.getloadavg", lambda: (3.25, 2.0, 1.0))
    out = run("decoding", tmp_path, capsys, "--allow-load")
    rows = table_rows(out, "frames")
    assert [(r[0], r[1]) for r in rows] == [("16", "1"), ("16", "2")]
    for row in rows:
        for cell in row[4:7]:  # cached, re-projected, text-only ms/step
            positive(cell)
        assert row[8] == "3.25 / 3.25"  # the load average before / after, beside the ratio
    assert "TAKEN UNDER LOAD (above 0.5 before the run)" in out
    assert len(table_rows(out.split("released 7B geometry")[1], "frames")) == 6


def test_decoding_back_to_back(tmp_path, capsys):
    out = run("decoding", tmp_path, capsys, "--allow-load", "--interleave", "request")
    assert "variants alternated at every request" in out
    assert [(r[0], r[1]) for r in table_rows(out, "frames")] == [("16", "1"), ("16", "2")]


def test_video_decoding(tmp_path, capsys):
    out = run("video_decoding", tmp_path, capsys, "--cache-dir", str(tmp_path))
    rows = table_rows(out, "frames sampled")
    decoders = ["PyAV, seek", "PyAV, decode all"]
    if importlib.util.find_spec("decord") is not None:
        decoders.append("decord")
    else:
        assert "decord is not installed" in out
    assert [(r[0], r[1]) for r in rows] == [(n, d) for n in ("16", "64") for d in decoders]
    assert "300 frames" in out  # the quick clip: 10 s at 30 fps
    for row in rows:
        positive(row[2])


def test_training(tmp_path, capsys):
    out = run("training", tmp_path, capsys)
    rows = table_rows(out, "frames")
    assert [(r[0], r[1]) for r in rows] == [
        ("16", "self-attention"),
        ("16", "slowfast"),
        ("32", "self-attention"),
        ("32", "slowfast"),
    ]
    for row in rows:
        for cell in row[4:6]:  # step time, samples/s
            positive(cell)


@pytest.mark.parametrize("name", ["decoding", "prefill"])
def test_timing_benchmarks_refuse_a_loaded_machine(name, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("benchmarks.common.STARTUP_LOAD", 1.5)
    monkeypatch.setattr("benchmarks.common.os.getloadavg", lambda: (1.5, 1.0, 1.0))
    with pytest.raises(SystemExit) as refused:
        importlib.import_module(f"benchmarks.{name}").main(["--quick", "--out", str(tmp_path)])
    assert refused.value.code == 2
    assert "load average is 1.50, above --max-load 0.5" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())  # refused before measuring anything


def test_load_gate_reads_the_load_before_torch_is_imported(monkeypatch):
    """A script's "before" load is read when the `benchmarks` package is imported, before torch (whose
    import and the model's build would count against `--max-load`), or now if that is lower."""
    code = "import sys, benchmarks; print('torch' in sys.modules, benchmarks.STARTUP_LOAD >= 0)"
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert result.stdout.split() == ["False", "True"]

    from benchmarks.common import LoadRecord, add_load_arguments

    parser = argparse.ArgumentParser()
    add_load_arguments(parser)
    monkeypatch.setattr("benchmarks.common.os.getloadavg", lambda: (0.9, 0.0, 0.0))
    monkeypatch.setattr("benchmarks.common.STARTUP_LOAD", 0.25)  # quiet at the start: accepted
    assert LoadRecord(parser.parse_args([]), parser).before == 0.25
    monkeypatch.setattr("benchmarks.common.STARTUP_LOAD", 2.0)  # loaded at the start, quiet now
    assert LoadRecord(parser.parse_args(["--max-load", "1"]), parser).before == 0.9


@pytest.mark.parametrize("variant", ["cached", "re-projected", "text-only"])
def test_decoding_loop_is_generates_greedy_loop(variant):
    from benchmarks.common import build_model
    from benchmarks.decoding import GreedyDecoder, generation_inputs

    model = build_model(SlowFastConfig.from_name("bench-quick"), torch.float32)
    inputs = generation_inputs(model, variant, frames=16, batch=2, prompt_tokens=8)
    decoder = GreedyDecoder(model, inputs)
    decoder.start()
    for _ in range(4):
        decoder.step()
    expected = model.generate(**inputs, max_new_tokens=5, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert torch.equal(torch.cat(decoder.tokens, dim=1), expected[:, inputs["input_ids"].shape[1] :])


@pytest.mark.slow
def test_memory_ask_reports_a_peak_per_size(capsys):
    importlib.import_module("benchmarks.memory").main(["ask", "--quick", "--frames", "2"])
    rows = table_rows(capsys.readouterr().out, "source")
    assert [(r[0], r[1]) for r in rows] == [("320x180", "2"), ("1280x960", "2")]
    for row in rows:
        assert positive(row[3]) > 100 and positive(row[4]) > 100  # MiB: torch alone takes more


@pytest.mark.parametrize("comparison", ["decoding", "prefill"])
def test_profile_ops_attributes_each_hybrid_layers_attention(comparison, capsys):
    """The slow-fast call runs one more attention call per hybrid layer than its baseline (the cross-attention
    over the slow tokens; in a bf16 decoding step on a CPU with AVX512-BF16, the CPU decoding kernel's):
    the profile's per-call counts must say so."""
    args = ["--quick", "--allow-load", "--rows", "1000"]
    importlib.import_module("benchmarks.profile_ops").main([comparison, *args])
    rows = {row[0]: row for row in table_rows(capsys.readouterr().out, "operator")}
    hybrid = len(SlowFastConfig.from_name("bench-quick").hybrid_layer_indices)
    sdpa = rows["aten::scaled_dot_product_attention"]
    kernel = rows.get("slowfast_vlm::cpu_decode_attention", [0] * 6)
    expected_kernel = hybrid if comparison == "decoding" and torch.cpu._is_avx512_bf16_supported() else 0
    assert (float(kernel[4]), float(kernel[5])) == (expected_kernel, 0)
    assert float(sdpa[4]) == float(sdpa[5]) + hybrid - expected_kernel


@pytest.mark.parametrize("interleave", ["step", "request"])
def test_decoding_schedule(interleave):
    """`step`: every decoder advances one step per round; `request`: one decoder's prefill and all its
    steps back to back. Either way each decoder yields `new_tokens - 1` timed steps per measured request."""
    from benchmarks.decoding import step_seconds

    calls = []

    class Recorder:
        def __init__(self, name):
            self.name = name

        def start(self):
            calls.append((self.name, "start"))

        def step(self):
            calls.append((self.name, "step"))
            return 1.0

    decoders = {name: Recorder(name) for name in "abc"}
    seconds = step_seconds(decoders, new_tokens=4, repeats=2, interleave=interleave)
    assert {name: len(values) for name, values in seconds.items()} == {"a": 6, "b": 6, "c": 6}
    first_request = calls[:12]  # 3 starts + 3 x 3 steps
    if interleave == "request":
        for i in range(0, 12, 4):  # start, then its 3 steps
            assert first_request[i][1] == "start"
            assert {c for c in first_request[i : i + 4]} == {
                (first_request[i][0], "start"),
                (first_request[i][0], "step"),
            }
    else:
        assert [c[1] for c in first_request[:3]] == ["start"] * 3
        for i in range(3, 12, 3):  # each round: one step of every decoder
            assert sorted(c[0] for c in first_request[i : i + 3]) == ["a", "b", "c"]


def test_machine_note_names_the_cpu_and_its_bf16_units(tmp_path, monkeypatch):
    from benchmarks import common

    cpuinfo = "processor\t: 0\nmodel name\t: Some CPU 9000\nflags\t\t: fpu avx512f avx512_bf16 amx_bf16\n"
    real_read_text = Path.read_text
    monkeypatch.setattr(
        Path,
        "read_text",
        lambda self, *a, **k: cpuinfo if str(self) == "/proc/cpuinfo" else real_read_text(self, *a, **k),
    )
    assert common.cpu_model() == ["Some CPU 9000", "bf16 units: AMX + AVX512-BF16"]
    assert "Some CPU 9000, bf16 units: AMX + AVX512-BF16, " in common.machine_note(1, "bfloat16")
