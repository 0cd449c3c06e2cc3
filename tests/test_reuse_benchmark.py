"""`benchmarks/reuse.py --quick` runs and prints its three tables and its plot (numbers are measured by
the script, never asserted here), and `--visual-cache-mb` is checked while parsing."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from slowfast_vlm.cli import main as cli_main

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root holds `benchmarks/`


@pytest.mark.slow
def test_the_reuse_benchmark_runs_quick(tmp_path, capsys):
    import torch

    from benchmarks import reuse

    threads = torch.get_num_threads()
    try:
        reuse.main(["--quick", "--allow-load", "--out", str(tmp_path)])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert (tmp_path / "reuse.png").read_bytes()[:4] == b"\x89PNG"
    for table in (
        "| model | frames | first turn |",
        "| model | one at a time, no cache: wall |",
        "| model | budget MiB |",
    ):
        assert table in out
    # every follow-up of the quick run continued its first turn (it reused tokens)
    rows = [line for line in out.splitlines() if line.startswith("| ") and " 16 | " in line]
    assert len(rows) == 2 and all(not row.split("|")[7].strip().startswith("0 /") for row in rows)


@pytest.mark.parametrize("command", ["eval", "serve", "demo"])
def test_a_negative_visual_cache_budget_is_refused_while_parsing(command, capsys):
    argv = [command, "--visual-cache-mb", "-1"]
    if command == "eval":
        argv += ["--model", "m", "--data", "d.jsonl", "--output", "out"]
    with pytest.raises(SystemExit) as exit_:
        cli_main(argv)
    assert exit_.value.code == 2 and "--visual-cache-mb" in capsys.readouterr().err
