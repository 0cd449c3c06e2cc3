"""Training loops that survive a stop: a run continues exactly where it stopped.

`resumable_steps` runs a stage's steps, saving `out/checkpoint/` every `save_every` steps, after the last
one, after step `stop_after`, and at the end of the step in which SIGTERM or SIGINT arrived. Run again
with the same settings, it loads the checkpoint (weights, optimizer, schedule, both RNGs, loss log,
elapsed time) and goes on, so a stopped and resumed run ends bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import shutil
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


def save_checkpoint(out: Path, state: dict) -> None:
    """Write `out/checkpoint/state.pt` atomically: into a new directory, then renamed over the old one."""
    new, current, old = out / "checkpoint.new", out / "checkpoint", out / "checkpoint.old"
    shutil.rmtree(new, ignore_errors=True)
    new.mkdir(parents=True)
    torch.save(state, new / "state.pt")
    shutil.rmtree(old, ignore_errors=True)
    if current.exists():
        current.rename(old)
    new.rename(current)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(out: Path) -> dict | None:
    """The state `save_checkpoint` saved last in `out` (also when it was stopped between its two renames)."""
    for path in (out / "checkpoint" / "state.pt", out / "checkpoint.old" / "state.pt"):
        if path.exists():
            return torch.load(path, weights_only=False)  # our own file: numpy's generator state is a dict
    return None


def stop_requests() -> list[int]:
    """Catch SIGTERM and SIGINT from now on: each appends its number to the returned list."""
    received: list[int] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: received.append(signum))
    return received


def resumable_steps(
    out: Path,
    settings: dict,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    schedule: torch.optim.lr_scheduler.LRScheduler,
    rng: np.random.Generator,
    steps: int,
    one_step: Callable[[int], float],
    label: str,
    print_every: int = 10,
    save_every: int = 50,
    stop_after: int | None = None,
) -> tuple[list[float], float] | None:
    """Run `one_step(step) -> loss` for the steps not done yet, resuming `out/checkpoint/` if there is one
    (it must have been saved with the same `settings`). Returns the whole loss log and the seconds spent
    over every part of the run, or None when stopped (by `stop_after` or a signal) with its checkpoint saved.
    """
    first, log, elapsed = 0, [], 0.0
    state = load_checkpoint(out)
    if state is not None:
        if state["settings"] != settings:
            raise ValueError(f"{out}/checkpoint was saved by a run with {state['settings']}, not {settings}")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        rng.bit_generator.state = state["data_rng"]
        torch.set_rng_state(state["torch_rng"])
        first, log, elapsed = state["step"], state["log"], state["seconds"]
        print(f"{label}: resuming {out} at step {first}", flush=True)
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    stops = stop_requests()
    started = time.time() - elapsed
    try:
        for step in range(first, steps):
            log.append(one_step(step))
            done = step + 1
            if step % print_every == 0 or done == steps:
                mean = np.mean(log[-print_every:])
                print(f"{label} step {step} loss {mean:.3f} {time.time() - started:.0f}s", flush=True)
            halt = bool(stops) or done == stop_after
            if done % save_every == 0 or done == steps or halt:
                save_checkpoint(out, {
                    "settings": settings, "step": done, "model": model.state_dict(),
                    "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
                    "data_rng": rng.bit_generator.state, "torch_rng": torch.get_rng_state(),
                    "log": log, "seconds": time.time() - started,
                })  # fmt: skip
            if halt:
                print(f"{label}: stopped after step {done}; {out}/checkpoint saved", flush=True)
                return None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return log, time.time() - started
