"""The whole experiment as one resumable plan: every stage not finished yet, in dependency order, at most
`parallel` child processes at a time (one thread each), each logging to `LOGS/<stage>.log`.

A stage is finished when its last output exists (what its command writes last): `prepare` the frame
pool's records, `pretrain-vision` and `pretrain-llm` their `result.json`, a stage-2 run its `result.json`.
Stopping the plan (SIGTERM, SIGINT) sends SIGTERM to its children, which save their checkpoint, and
waits for them; running the plan again resumes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

RUN = Path(__file__).parent / "run.py"
LOOKUP = Path(__file__).parent / "lookup.py"
LOGS = Path("outputs/synth/logs")
CONTINUE_DATA_SEED = 100  # a continued run's clips: seed + 100, none of which any first run draws


@dataclass
class Stage:
    """One command of the plan: `SCRIPT ARGS` (default `run.py`), finished once `done` exists, started
    after `after` finish."""

    name: str
    args: list[str]
    done: Path
    after: list[str] = field(default_factory=list)
    script: Path | None = None


@dataclass(frozen=True)
class Lookup:
    """Every LLM starts from the text-only option lookup (`lookup.py`): per seed, `forward_steps` of the
    forward exercise from scratch into `root/forward-s<seed>`, then `reverse_steps` of the reverse one
    from it into `root/reverse-s<seed>`; stage 1 then asks both question forms from that LLM."""

    forward_steps: int
    reverse_steps: int
    root: Path

    def reverse_dir(self, seed: int) -> Path:
        """The LLM stage 1 starts from: the reverse run of `seed`."""
        return self.root / f"reverse-s{seed}"

    def stages(self, seed: int) -> list[Stage]:
        forward, reverse = self.root / f"forward-s{seed}", self.reverse_dir(seed)
        common = ["--seed", str(seed)]
        return [
            Stage(f"lookup-forward-s{seed}", ["--direction", "forward", "--steps", str(self.forward_steps),
                  *common, "--out", str(forward)], forward / "result.json", script=LOOKUP),
            Stage(f"lookup-reverse-s{seed}", ["--direction", "reverse", "--steps", str(self.reverse_steps),
                  *common, "--init", str(forward), "--out", str(reverse)], reverse / "result.json",
                  [f"lookup-forward-s{seed}"], script=LOOKUP),
        ]  # fmt: skip


def stages(
    seeds: list[int],
    models: list[str],
    steps: int,
    data: Path,
    vision: Path,
    runs: Path,
    stage1_kind,
    stage1_dir,
    train_options: list[str] = (),
    continue_steps: int = 0,
    lookup: Lookup | None = None,
) -> list[Stage]:
    """Every stage of the experiment for `seeds` x `models` (stage 2 with `steps` steps and
    `train_options`, e.g. its warm-up), in order. With `continue_steps`, each stage-2 run is then continued
    for that many steps on fresh clips (data seed `seed + CONTINUE_DATA_SEED`) into `<run>-more`.

    `stage1_kind(model)` is the stage-1 kind a model starts from, `stage1_dir(kind, seed)` its checkpoint.
    With `lookup`, each seed's LLMs start from its text-only lookup runs, and every stage-1 and stage-2
    stage's name begins with "lookup-" (their logs apart from the plain recipe's)."""
    plan = [
        Stage("prepare", ["prepare"], data / "frame_pool.jsonl"),
        Stage("pretrain-vision", ["pretrain-vision"], vision / "result.json", ["prepare"]),
    ]
    kinds = sorted({stage1_kind(model) for model in models})
    tag = "" if lookup is None else "lookup-"
    for seed in seeds:
        stage1_args, stage1_after = [], ["pretrain-vision"]
        if lookup is not None:
            plan += lookup.stages(seed)
            stage1_args = ["--both-forms", "--init", str(lookup.reverse_dir(seed))]
            stage1_after.append(plan[-1].name)
        for kind in kinds:
            args = ["pretrain-llm", "--kind", kind, "--seed", str(seed), "--out", str(stage1_dir(kind, seed))]
            done = stage1_dir(kind, seed) / "result.json"
            plan.append(Stage(f"{tag}stage1-{kind}-s{seed}", args + stage1_args, done, stage1_after))
    for seed in seeds:
        for model in models:
            run = runs / f"{model}-s{seed}"
            args = ["train", "--model", model, "--seed", str(seed), "--steps", str(steps),
                    "--stage1", str(stage1_dir(stage1_kind(model), seed)), "--out", str(run)]  # fmt: skip
            args += list(train_options)
            after = [f"{tag}stage1-{stage1_kind(model)}-s{seed}"]
            plan.append(Stage(f"{tag}{model}-s{seed}", args, run / "result.json", after))
            if continue_steps:
                more = runs / f"{model}-s{seed}-more"
                args = ["train", "--model", model, "--seed", str(seed), "--steps", str(continue_steps),
                        "--stage1", str(run), "--out", str(more),
                        "--data-seed", str(seed + CONTINUE_DATA_SEED)]  # fmt: skip
                plan.append(
                    Stage(f"{tag}{model}-s{seed}-more", args, more / "result.json", [f"{tag}{model}-s{seed}"])
                )
    return plan


def pending(plan: list[Stage]) -> list[Stage]:
    """The stages whose output does not exist yet."""
    return [stage for stage in plan if not stage.done.exists()]


def launch(stage: Stage) -> subprocess.Popen:
    """Start a stage's script (`run.py` unless it names another), one thread, output appended to its
    log, in its own session (the plan alone receives a terminal's Ctrl-C, and passes it on as SIGTERM)."""
    LOGS.mkdir(parents=True, exist_ok=True)
    env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(LOGS / f"{stage.name}.log", "a") as log:
        return subprocess.Popen(
            [sys.executable, str(stage.script or RUN), *stage.args],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def run_plan(plan: list[Stage], parallel: int = 1, start=launch, poll_seconds: float = 5.0) -> int:
    """Run the pending stages of `plan`, each once its `after` stages are finished, at most `parallel` at a
    time. Returns 0 when every stage finished, 1 when one failed (its dependants are not started) or
    the plan was stopped."""
    stopping = []

    def stop(signum, frame):
        stopping.append(signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    todo, running, failed = pending(plan), {}, set()
    try:
        while todo or running:
            if stopping:
                for process in running.values():
                    process.send_signal(signal.SIGTERM)  # each saves its checkpoint at the end of its step
                for name, process in running.items():
                    process.wait()
                    print(f"plan: stopped {name}", flush=True)
                return 1
            for name, process in list(running.items()):
                if process.poll() is not None:
                    del running[name]
                    finished = next(s for s in plan if s.name == name).done.exists()
                    print(
                        f"plan: {name} {'finished' if finished else f'failed (exit {process.returncode})'}",
                        flush=True,
                    )
                    if not finished:
                        failed.add(name)
            unfinished = {stage.name for stage in pending(plan)}
            for stage in list(todo):
                if any(name in failed for name in stage.after):
                    failed.add(stage.name)
                    todo.remove(stage)
                    print(f"plan: {stage.name} skipped: {', '.join(stage.after)} failed", flush=True)
                elif len(running) < parallel and not unfinished & set(stage.after):
                    print(
                        f"plan: starting {stage.name}: {(stage.script or RUN).name} {' '.join(stage.args)} "
                        f"(log {LOGS / stage.name}.log)",
                        flush=True,
                    )
                    running[stage.name] = start(stage)
                    todo.remove(stage)
            if todo or running:
                time.sleep(poll_seconds)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(
        "plan: every stage finished" if not failed else f"plan: failed: {', '.join(sorted(failed))}",
        flush=True,
    )
    return 1 if failed else 0
