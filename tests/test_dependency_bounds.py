"""`scripts/dependency_bounds.py`: which requirements are tested ranges, and the pins of their lower end."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import dependency_bounds  # noqa: E402

PYPROJECT = """
[project]
name = "demo"
dependencies = ["transformers>=5.16.1,<5.25", "numpy>=1.26"]
[project.optional-dependencies]
fast = ["deepspeed>=0.19.8,<0.20"]
test = ["pytest>=8", "demo[fast]"]
"""


def test_a_range_is_a_requirement_bounded_on_both_sides(tmp_path):
    (tmp_path / "pyproject.toml").write_text(PYPROJECT)
    assert dependency_bounds.tested_ranges(tmp_path / "pyproject.toml") == {
        "transformers": ("5.16.1", "5.25"),
        "deepspeed": ("0.19.8", "0.20"),
    }


def test_the_oldest_pins_hold_deepspeed_at_its_lower_bound():
    script = Path(__file__).resolve().parents[1] / "scripts" / "dependency_bounds.py"
    result = subprocess.run([sys.executable, str(script), "--oldest"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "deepspeed==0.19.8" in result.stdout.split()


def test_the_readme_table_states_every_tested_range_as_declared():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    table = readme.split("### Tested dependency ranges", 1)[1].split("\n\n`.ci/run`", 1)[0]
    # the first cell names the package bare ("transformers") or in backticks ("PyAV (`av`)")
    rows = [
        [cell.strip() for cell in line.split("|")[1:3]]
        for line in table.splitlines()
        if line.startswith("| ")
    ]
    rows = rows[1:]  # (the header)
    declared = dependency_bounds.tested_ranges()
    assert len(rows) == len(declared)
    for name, (lower, upper) in declared.items():
        assert any(
            (package.split()[0] == name or f"`{name}`" in package) and cell == f"`>={lower},<{upper}`"
            for package, cell in rows
        ), name


def test_the_vllm_venv_gets_the_declared_ranges_but_not_what_vllm_pins(tmp_path):
    (tmp_path / "pyproject.toml").write_text(
        PYPROJECT.replace('"numpy>=1.26"', '"numpy>=1.26", "torch>=2.5", "accelerate>=1.10,<1.17"').replace(
            '"pytest>=8"', '"pytest>=8", "ruff>=0.6", "httpx>=0.27"'
        )
    )
    assert dependency_bounds.vllm_venv_requirements(tmp_path / "pyproject.toml") == [
        "numpy>=1.26",
        "accelerate<1.17,>=1.10",
        "pytest>=8",
        "httpx>=0.27",
    ]
