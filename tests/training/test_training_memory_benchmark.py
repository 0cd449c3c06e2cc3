"""`benchmarks/training_memory.py` runs its 2-process trainings on a small model and prints its table (the
figures are measured by the script, not checked here). CI runs the base LLM + encoder build under the three
engines (the saved-checkpoint build differs only in the `--set` lines that name the model)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.slow
@pytest.mark.engines
def test_training_memory_benchmark_prints_a_row_per_engine_and_rank():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    command = [
        sys.executable,
        "benchmarks/training_memory.py",
        "--layers",
        "2",
        "--hidden",
        "256",
        "--sources",
        "base",
    ]
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert "MALLOC_MMAP_THRESHOLD_: 65536" in lines
    rows = [line.split("|")[1:4] for line in lines if line.startswith("| ") and "engine" not in line]
    assert [tuple(cell.strip() for cell in row) for row in rows] == [
        ("base", engine, rank) for engine in ("ddp", "zero3", "fsdp2") for rank in ("0", "1")
    ]
    assert lines[-1].startswith("load average (1, 5, 15 min): ")
