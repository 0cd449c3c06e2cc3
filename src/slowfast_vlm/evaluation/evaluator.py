"""Evaluate a model on a local video QA set (multiple-choice or open-ended; JSON, JSONL or parquet).

Predictions are written sample by sample to OUTPUT/predictions.jsonl (a crash loses nothing; --resume
continues where it stopped); accuracy overall, per category and per duration goes to OUTPUT/metrics.json.
The questions of one video are asked together: each video is decoded once, and encoded once while the
run's `VisualCache` (`--visual-cache-mb`) holds it.
Videos that cannot be read are reported as failed samples, never scored. Under `accelerate launch`
each process evaluates a shard and the main process merges them.

This module is the loop and the command line; the data is read by `dataset`, the predictions files
are kept by `predictions`, and the answers are scored by `scoring`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from accelerate import PartialState
from tqdm import tqdm

from ..inference import build_conversation, first_line, generate_responses, load_model
from ..visual_cache import VisualCache
from .dataset import QASample, load_samples
from .predictions import (
    PredictionWriter,
    merge_predictions,
    prediction_files,
    predictions_path,
    read_predictions,
)
from .scoring import compute_metrics, prediction_record

logger = logging.getLogger(__name__)

METRICS = "metrics.json"

T = TypeVar("T")
R = TypeVar("R")


def prefetch(
    items: Sequence[T], load: Callable[[T], R], batch_size: int, workers: int = 2, lookahead: int = 2
) -> Iterator[list[R]]:
    """`[load(x) for x in batch]` per batch of `items`, computed by `workers` background threads.

    Up to `lookahead` batches are loaded ahead, so decoding the next videos overlaps the model's work
    on the current batch (PyAV decodes outside the GIL).
    """
    batches = [items[i : i + batch_size] for i in range(0, len(items), batch_size)]
    pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="video-prefetch")
    pending: deque = deque()
    try:
        for batch in batches:
            pending.append([pool.submit(load, item) for item in batch])
            if len(pending) > lookahead:
                yield [future.result() for future in pending.popleft()]
        while pending:
            yield [future.result() for future in pending.popleft()]
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def by_video(samples: Sequence[QASample]) -> list[list[QASample]]:
    """`samples` grouped by video, groups in order of their video's first question, questions in order."""
    groups: dict[str, list[QASample]] = {}
    for sample in samples:
        groups.setdefault(str(sample.video), []).append(sample)
    return list(groups.values())


def predict(
    model,
    processor,
    samples: Sequence[QASample],
    writer: PredictionWriter,
    num_frames: int | None = None,
    fps: float | None = None,
    sampling: str | None = None,
    batch_size: int = 1,
    max_new_tokens: int = 128,
    num_workers: int = 2,
    progress: bool = True,
    group_by_video: bool = True,
    visual_cache_mb: float = 1024,
) -> None:
    """Answer every sample greedily and write one record each (in batch order) to `writer`.

    With `group_by_video`, the questions of a video follow each other and its video is decoded once;
    encoded videos are kept in a `VisualCache` of `visual_cache_mb` MiB (0: encoded for each batch).
    A video that is missing or cannot be decoded gives a record with `error` set and
    `correct: null` for each of its questions; it is logged with the sample id and the rest goes on.
    `num_frames`, `fps`, `sampling`: None takes the model's own (`processor.sampling_options`).
    """
    options = processor.sampling_options(num_frames, fps, sampling)
    groups = by_video(samples) if group_by_video else [[sample] for sample in samples]
    cache = VisualCache.from_megabytes(visual_cache_mb) if visual_cache_mb > 0 else None

    def decode(group: list[QASample]) -> tuple[list[QASample], np.ndarray | None, str | None]:
        try:
            frames, _ = processor.load_video(
                group[0].video, options["num_frames"], fps=options["fps"], sampling=options["sampling"]
            )
            return group, frames, None
        except (OSError, ValueError) as e:  # FileNotFoundError, VideoDecodeError
            return group, None, f"{type(e).__name__}: {e}"

    def answer(batch: list[tuple[QASample, np.ndarray]]) -> None:
        responses = generate_responses(
            model,
            processor,
            # the question is text (a <video> in it is not a placeholder): one video, then it
            [
                processor.apply_chat_template(build_conversation(sample.prompt), add_generation_prompt=True)
                for sample, _ in batch
            ],
            [frames for _, frames in batch],
            max_new_tokens=max_new_tokens,
            do_sample=False,
            visual_cache=cache,
        )
        for (sample, _), response in zip(batch, responses):
            writer.write(prediction_record(sample, response))
        bar.update(len(batch))

    # videos are decoded ahead (a few groups at a time); questions go to the model `batch_size` at a time
    pending: list[tuple[QASample, np.ndarray]] = []
    with tqdm(total=len(samples), desc="eval", unit="sample", disable=not progress) as bar:
        for decoded in prefetch(groups, decode, max(1, batch_size), num_workers):
            for group, frames, error in decoded:
                if error is not None:
                    for sample in group:
                        logger.error("sample %s: video %s failed: %s", sample.id, sample.video, error)
                        writer.write(prediction_record(sample, error=error))
                    bar.update(len(group))
                    continue
                pending.extend((sample, frames) for sample in group)
                while len(pending) >= batch_size:
                    answer(pending[:batch_size])
                    pending = pending[batch_size:]
        if pending:
            answer(pending)


def process_state() -> PartialState:
    """This process's place in an `accelerate launch` / `torchrun` run (one process when not launched)."""
    # without GPUs only cpu=True lets PartialState join a multi-process launch (gloo backend)
    return PartialState(cpu=not torch.cuda.is_available())


def evaluate(
    model,
    processor,
    samples: Sequence[QASample],
    output_dir: str | os.PathLike[str],
    resume: bool = False,
    **settings,
) -> dict[str, Any] | None:
    """Predict every sample not yet predicted, merge, and write metrics.json; return the metrics.

    Runs on every process of an `accelerate launch`: each takes every `num_processes`-th pending
    sample and writes its own shard file; the main process merges them and returns the metrics
    (other processes return None). `settings` go to :func:`predict`.
    """
    state = process_state()
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    existing = [path for path in prediction_files(output_dir) if path.exists()]
    if existing and not resume:
        raise FileExistsError(
            f"{existing[0]} exists: pass --resume to continue it, or choose another --output"
        )
    if state.is_main_process:
        for path in existing:
            read_predictions(path, repair=True)
    state.wait_for_everyone()
    done = {record["id"] for path in existing for record in read_predictions(path)}
    pending = [sample for sample in samples if sample.id not in done]
    state.wait_for_everyone()  # every process has read the same state before any writes

    if state.is_main_process and done:
        logger.info("resuming: %d of %d samples already predicted", len(samples) - len(pending), len(samples))
    # each process takes whole videos (every `num_processes`-th), so that each video is decoded once
    shard = [s for group in by_video(pending)[state.process_index :: state.num_processes] for s in group]
    logger.info(
        "process %d of %d: %d of %d pending samples",
        state.process_index,
        state.num_processes,
        len(shard),
        len(pending),
    )
    path = predictions_path(output_dir, state.process_index, state.num_processes)
    with PredictionWriter(path) as writer:
        predict(model, processor, shard, writer, progress=state.is_main_process, **settings)
    state.wait_for_everyone()
    if not state.is_main_process:
        return None
    metrics = compute_metrics(samples, merge_predictions(output_dir))
    if metrics["num_failed"]:
        logger.warning("%d samples failed (not scored): %s", metrics["num_failed"], list(metrics["failed"]))
    tmp = output_dir / (METRICS + ".tmp")
    tmp.write_text(json.dumps(metrics, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, output_dir / METRICS)
    return metrics


# ----- command line ----------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> int:
    """`slowfast-vlm eval`; exit 2 with a one-line reason for bad data, a missing model or output clash."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return _run(args)
    except (OSError, ValueError, ImportError) as error:
        print(f"slowfast-vlm eval: {first_line(error)}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.video_root is not None and not Path(args.video_root).is_dir():
        raise FileNotFoundError(f"--video-root {args.video_root}: no such directory")
    samples = load_samples(args.data, args.video_root)[: args.limit]
    try:
        model, processor = load_model(args.model, process_state().device, args.dtype)
    except (OSError, ValueError) as error:
        raise OSError(f"cannot load model {args.model!r}: {first_line(error)}") from error
    metrics = evaluate(
        model,
        processor,
        samples,
        args.output,
        resume=args.resume,
        num_frames=args.frames,
        fps=args.fps,
        sampling=args.sampling,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        num_workers=args.num_workers,
        visual_cache_mb=args.visual_cache_mb,
    )
    if metrics is not None:
        summary = {
            k: metrics[k] for k in ("num_samples", "num_scored", "num_failed", "num_correct", "accuracy")
        }
        print(json.dumps(summary))
    return 0
