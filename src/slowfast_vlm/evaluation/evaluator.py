"""Evaluate a model on a local video QA set (multiple-choice or open-ended; JSON, JSONL or parquet).

Predictions are written sample by sample to OUTPUT/predictions.jsonl (a crash loses nothing; --resume
continues where it stopped); accuracy overall, per category and per duration goes to OUTPUT/metrics.json.
Videos that cannot be read are reported as failed samples, never scored. Under `accelerate launch`
each process evaluates a shard and the main process merges them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from accelerate import PartialState
from tqdm import tqdm

from ..modeling import SlowFastForConditionalGeneration
from ..processing.processor import SlowFastProcessor
from ..processing.video import load_video
from .answers import answer_letter, extract_choice, is_correct_free_form, parse_options

logger = logging.getLogger(__name__)

PREDICTIONS = "predictions.jsonl"
METRICS = "metrics.json"
_SHARD_PREDICTIONS = "predictions.rank{rank}.jsonl"
_SHARD_GLOB = "predictions.rank*.jsonl"

# Dataset field names, first match wins (VideoMME, MVBench, EgoSchema, NExT-QA, LLaVA-style records).
ID_KEYS = ("id", "question_id", "qid", "uid", "q_uid")
VIDEO_KEYS = ("video", "video_path", "video_id", "videoID", "video_name", "video_idx")
OPTION_KEYS = ("options", "candidates", "choices")
ANSWER_KEYS = ("answer", "answers", "gt_answer")
CATEGORY_KEYS = ("category", "task_type", "question_type")
VIDEO_SUFFIXES = (".mp4", ".mkv", ".webm", ".avi", ".mov")

MC_INSTRUCTION = "Answer with the option's letter from the given choices directly."
OPEN_INSTRUCTION = "Answer the question using a single word or phrase."

T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class QASample:
    """One question about one video. `answer` is an option letter (multiple choice) or reference texts."""

    id: str
    video: str
    prompt: str
    options: dict[str, str] | None
    answer: str | list[str]
    category: str | None = None
    duration: str | None = None


# ----- data ------------------------------------------------------------------------------------------
def read_records(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Rows of a `.json` (a list of objects), `.jsonl` or `.parquet` (needs pandas + pyarrow) file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such data file")
    if path.suffix == ".parquet":
        try:
            import pandas as pd
        except ImportError as e:
            raise ImportError(
                f"{path}: reading parquet needs pandas and pyarrow (pip install pandas pyarrow)"
            ) from e
        # through JSON so numpy scalars / arrays become plain Python values
        return json.loads(pd.read_parquet(path).to_json(orient="records"))
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    if path.suffix == ".json":
        records = json.loads(text)
        if not isinstance(records, list):
            raise ValueError(f"{path}: expected a JSON list of objects, got {type(records).__name__}")
        return records
    raise ValueError(f"{path}: unsupported data format {path.suffix!r} (use .json, .jsonl or .parquet)")


def _first(record: dict[str, Any], keys: Sequence[str]) -> Any:
    return next((record[k] for k in keys if record.get(k) is not None), None)


def _video_path(value: str, video_root: Path) -> str:
    """`video_root / value`; a name without a suffix (a VideoMME videoID) gets the first one that exists."""
    path = video_root / value
    if path.suffix or path.exists():
        return str(path)
    found = [path.with_suffix(s) for s in VIDEO_SUFFIXES if path.with_suffix(s).exists()]
    return str(found[0] if found else path)


def _options(record: dict[str, Any]) -> Any:
    options = _first(record, OPTION_KEYS)
    if options is None:  # EgoSchema: "option 0" ... "option 4"
        numbered = sorted((int(k.split()[1]), v) for k, v in record.items() if re.fullmatch(r"option \d+", k))
        options = [v for _, v in numbered] or None
    return options


def sample_from_record(record: dict[str, Any], index: int, video_root: Path) -> QASample:
    """A `QASample` from one dataset row (`index` names the row in errors and is the fallback id)."""
    sample_id = _first(record, ID_KEYS)
    where = f"record {index} (id {sample_id!r})"
    video = _first(record, VIDEO_KEYS)
    if video is None:
        raise ValueError(f"{where}: no video field (one of {', '.join(VIDEO_KEYS)})")
    answer = _first(record, ANSWER_KEYS)
    if answer is None:
        raise ValueError(f"{where}: no answer field (one of {', '.join(ANSWER_KEYS)})")
    raw_options = _options(record)
    options = parse_options(raw_options) if raw_options is not None else None
    if "question" in record:
        prompt = str(record["question"]).strip()
        if options:
            listed = "\n".join(f"{letter}. {text}" for letter, text in options.items())
            prompt = f"{prompt}\n{listed}\n{MC_INSTRUCTION}"
        else:
            prompt = f"{prompt}\n{OPEN_INSTRUCTION}"
    elif "conversations" in record:  # LLaVA-style: the human turn is the full prompt
        turn = next((t["value"] for t in record["conversations"] if t.get("from") == "human"), None)
        if turn is None:
            raise ValueError(f"{where}: conversations has no human turn")
        prompt = turn.replace("<video>", "").replace("<image>", "").strip()
    else:
        raise ValueError(f"{where}: no question field (question or conversations)")
    try:
        if options:
            answer = answer_letter(answer, options)
        else:
            answer = [str(a) for a in answer] if isinstance(answer, list) else str(answer)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e
    category, duration = _first(record, CATEGORY_KEYS), record.get("duration")
    return QASample(
        id=str(index if sample_id is None else sample_id),
        video=_video_path(str(video), video_root),
        prompt=prompt,
        options=options,
        answer=answer,
        category=None if category is None else str(category),
        duration=None if duration is None else str(duration),
    )


def load_samples(
    data: str | os.PathLike[str], video_root: str | os.PathLike[str] | None = None
) -> list[QASample]:
    """All samples of a data file; videos are resolved against `video_root` (default: the file's folder)."""
    root = Path(video_root) if video_root is not None else Path(data).parent
    samples = [sample_from_record(r, i, root) for i, r in enumerate(read_records(data))]
    seen: set[str] = set()
    for sample in samples:
        if sample.id in seen:
            raise ValueError(
                f"{data}: sample id {sample.id!r} occurs more than once (ids must be unique to resume)"
            )
        seen.add(sample.id)
    return samples


# ----- model -----------------------------------------------------------------------------------------
def resolve_dtype(dtype: str | torch.dtype, device: torch.device | str) -> torch.dtype:
    """The torch dtype for `dtype`; "auto" is bfloat16 on a CUDA device that supports it, else float32."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype == "auto":
        cuda = torch.device(device).type == "cuda"
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    if dtype not in ("bfloat16", "float16", "float32"):
        raise ValueError(f"dtype must be auto, bfloat16, float16 or float32, got {dtype!r}")
    return getattr(torch, dtype)


def load_model(
    path: str | os.PathLike[str], device: torch.device | str = "cpu", dtype: str | torch.dtype = "auto"
):
    """`(model, processor)` saved in `path`, the model in eval mode on `device`."""
    processor = SlowFastProcessor.from_pretrained(path)
    model = SlowFastForConditionalGeneration.from_pretrained(path, dtype=resolve_dtype(dtype, device))
    return processor.prepare_model(model).to(device).eval(), processor


def chat_prompt(processor, question: str, num_videos: int = 1, num_images: int = 0) -> str:
    """The chat-formatted prompt: visual placeholders first (unless `question` has its own), then the question."""
    if processor.video_token in question or processor.image_token in question:
        content: str | list[dict[str, str]] = question
    else:
        parts = [{"type": "video"}] * num_videos + [{"type": "image"}] * num_images
        content = [*parts, {"type": "text", "text": question}]
    return processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)


def to_device(inputs, device: torch.device | str, dtype: torch.dtype):
    """Move processor outputs to `device`; floating tensors (pixels) also to `dtype`. Lists stay lists."""

    def move(x):
        if isinstance(x, list):
            return [move(item) for item in x]
        if isinstance(x, torch.Tensor):
            return x.to(device, dtype) if x.is_floating_point() else x.to(device)
        return x

    return {key: move(value) for key, value in inputs.items()}


@torch.inference_mode()
def generate_responses(
    model,
    processor,
    prompts: list[str],
    videos: list[np.ndarray] | None = None,
    images: list | None = None,
    stop_strings: Sequence[str] | None = None,
    **generation,
) -> list[str]:
    """Generate one answer per prompt (chat-formatted, with placeholders), batched with left padding.

    `generation` goes to `model.generate` (`max_new_tokens`, `do_sample`, ...). Each answer is cut
    at the first of `stop_strings`.
    """
    inputs = processor(
        text=prompts,
        videos=videos or None,
        images=images or None,
        padding=True,
        padding_side="left",
        return_tensors="pt",
    )
    inputs = to_device(inputs, model.device, model.dtype)
    if stop_strings:
        generation.update(stop_strings=list(stop_strings), tokenizer=processor.tokenizer)
    output = model.generate(**inputs, **generation)
    texts = processor.batch_decode(output[:, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    for stop in stop_strings or ():
        texts = [text.split(stop, 1)[0] for text in texts]
    return [text.strip() for text in texts]


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


# ----- predictions file ------------------------------------------------------------------------------
class PredictionWriter:
    """Appends one JSON line per prediction, flushed and fsynced, so a crash loses nothing written."""

    def __init__(self, path: str | os.PathLike[str]):
        self.file = open(path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self.file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self.file.flush()
        os.fsync(self.file.fileno())

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> PredictionWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_predictions(path: str | os.PathLike[str], repair: bool = False) -> list[dict[str, Any]]:
    """Records of a predictions file; a truncated last line (a crash mid-write) is ignored.

    With `repair`, the truncated line is also cut from the file so that appending can go on.
    A bad line anywhere else is an error.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    records, good_end, offset = [], 0, 0
    for number, line in enumerate(lines, 1):
        end = offset + len(line)
        offset = end + 1
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
            good_end = min(end + 1, len(data))
        except json.JSONDecodeError as e:
            if number != len(lines):  # only an unterminated last line can be a cut-off write
                raise ValueError(
                    f"{path}: line {number} is not valid JSON ({e}); only the last line may be cut"
                ) from e
            logger.warning("%s: ignoring the truncated last line %d (interrupted write)", path, number)
    if repair and good_end < len(data):
        with open(path, "r+b") as f:
            f.truncate(good_end)
    if repair and good_end and not data[:good_end].endswith(b"\n"):
        with open(path, "ab") as f:  # a complete last record without its newline
            f.write(b"\n")
    return records


def prediction_files(output_dir: str | os.PathLike[str]) -> list[Path]:
    """The merged predictions file and any per-process shard files, in a fixed order."""
    output_dir = Path(output_dir)
    return [output_dir / PREDICTIONS, *sorted(output_dir.glob(_SHARD_GLOB))]


def merge_predictions(output_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Append the shard files' records not yet in predictions.jsonl to it, delete the shards, return all."""
    merged_path, *shards = prediction_files(output_dir)
    merged = read_predictions(merged_path, repair=True)
    seen = {record["id"] for record in merged}
    with PredictionWriter(merged_path) as writer:
        for shard in shards:
            for record in read_predictions(shard):
                if record["id"] not in seen:
                    writer.write(record)
                    merged.append(record)
                    seen.add(record["id"])
    for shard in shards:
        shard.unlink()
    return merged


# ----- evaluation ------------------------------------------------------------------------------------
def score(sample: QASample, response: str) -> tuple[str | None, bool]:
    """`(extracted answer, correct)`: the option letter for multiple choice, else the response itself."""
    if sample.options:
        letter = extract_choice(response, sample.options)
        return letter, letter == sample.answer
    return response, is_correct_free_form(response, sample.answer)


def _record(sample: QASample, response: str | None = None, error: str | None = None) -> dict[str, Any]:
    extracted, correct = score(sample, response) if error is None else (None, None)
    return {
        **asdict(sample),
        "response": response,
        "extracted": extracted,
        "correct": correct,
        "error": error,
    }


def predict(
    model,
    processor,
    samples: Sequence[QASample],
    writer: PredictionWriter,
    num_frames: int = 64,
    fps: float | None = 2.0,
    sampling: str = "fps",
    batch_size: int = 1,
    max_new_tokens: int = 32,
    num_workers: int = 2,
    progress: bool = True,
) -> None:
    """Answer every sample greedily and write one record each (in batch order) to `writer`.

    A video that is missing or cannot be decoded gives a record with `error` set and
    `correct: null`; it is logged with the sample id and the rest of its batch goes on.
    """

    def decode(sample: QASample) -> tuple[QASample, np.ndarray | None, str | None]:
        try:
            frames, _ = load_video(sample.video, num_frames, fps=fps, sampling=sampling)
            return sample, frames, None
        except (OSError, ValueError) as e:  # FileNotFoundError, VideoDecodeError
            return sample, None, f"{type(e).__name__}: {e}"

    with tqdm(total=len(samples), desc="eval", unit="sample", disable=not progress) as bar:
        for batch in prefetch(samples, decode, batch_size, num_workers):
            ok = [(sample, frames) for sample, frames, error in batch if error is None]
            for sample, _, error in batch:
                if error is not None:
                    logger.error("sample %s: video %s failed: %s", sample.id, sample.video, error)
                    writer.write(_record(sample, error=error))
            if ok:
                responses = generate_responses(
                    model,
                    processor,
                    [chat_prompt(processor, sample.prompt) for sample, _ in ok],
                    [frames for _, frames in ok],
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                )
                for (sample, _), response in zip(ok, responses):
                    writer.write(_record(sample, response))
            bar.update(len(batch))


def _accuracy(records: list[dict[str, Any]]) -> dict[str, Any]:
    failed = [r for r in records if r["error"] is not None]
    scored = [r for r in records if r["error"] is None]
    correct = sum(bool(r["correct"]) for r in scored)
    return {
        "num_samples": len(records),
        "num_scored": len(scored),
        "num_failed": len(failed),
        "num_correct": correct,
        "accuracy": correct / len(scored) if scored else None,
        "accuracy_failed_as_wrong": correct / len(records) if records else None,
    }


def compute_metrics(samples: Sequence[QASample], predictions: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Accuracy overall, per category and per duration; failed samples are counted, never scored.

    `accuracy` is over the scored samples; `accuracy_failed_as_wrong` counts failures as wrong.
    `num_unanswered` counts multiple-choice responses naming no option (scored wrong).
    """
    by_id = {record["id"]: record for record in predictions}
    missing = [s.id for s in samples if s.id not in by_id]
    if missing:
        raise RuntimeError(f"{len(missing)} samples have no prediction (first: {missing[:5]})")
    records = [by_id[s.id] for s in samples]
    metrics = _accuracy(records)
    metrics["num_unanswered"] = sum(
        r["error"] is None and bool(r["options"]) and r["extracted"] is None for r in records
    )
    for field in ("category", "duration"):
        groups: dict[str, list] = {}
        for record in records:
            if record[field] is not None:
                groups.setdefault(record[field], []).append(record)
        if groups:
            metrics[f"per_{field}"] = {name: _accuracy(group) for name, group in sorted(groups.items())}
    metrics["failed"] = {r["id"]: r["error"] for r in records if r["error"] is not None}
    return metrics


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
    shard = pending[state.process_index :: state.num_processes]
    logger.info(
        "process %d of %d: %d of %d pending samples",
        state.process_index,
        state.num_processes,
        len(shard),
        len(pending),
    )
    single = state.num_processes == 1
    path = output_dir / (PREDICTIONS if single else _SHARD_PREDICTIONS.format(rank=state.process_index))
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
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="folder of a saved model and its processor")
    parser.add_argument("--data", required=True, help="questions: .json, .jsonl or .parquet")
    parser.add_argument(
        "--video-root", help="folder the video paths are relative to (default: the data file's)"
    )
    parser.add_argument("--output", required=True, help="folder for predictions.jsonl and metrics.json")
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in --output")
    parser.add_argument("--frames", type=int, default=64, help="most frames per video (default 64)")
    parser.add_argument("--fps", type=float, default=2.0, help="frame sampling rate (default 2)")
    parser.add_argument("--sampling", choices=("fps", "uniform"), default="fps", help="frame sampling rule")
    parser.add_argument("--batch-size", type=int, default=1, help="questions per generate call (default 1)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="answer length cap (default 32)")
    parser.add_argument("--num-workers", type=int, default=2, help="video decoding threads (default 2)")
    parser.add_argument(
        "--dtype", default="auto", help="auto (bfloat16 on GPU, else float32), bfloat16, float16, float32"
    )
    parser.add_argument("--limit", type=int, help="evaluate only the first N samples")


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    samples = load_samples(args.data, args.video_root)[: args.limit]
    model, processor = load_model(args.model, process_state().device, args.dtype)
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
    )
    if metrics is not None:
        summary = {
            k: metrics[k] for k in ("num_samples", "num_scored", "num_failed", "num_correct", "accuracy")
        }
        print(json.dumps(summary))
    return 0
