"""The model parts of `gpu_check.py`: correctness of the kernels on the device, and the 7B geometry's cost.

correctness: the tiny models (`SlowFastConfig.from_name("tiny")`, and "tiny-llama-convnext" for a
convolutional encoder), warm-up gates open, built once in CPU fp32 with eager attention: the reference.
Each variant (attention implementation x dtype, on the device) loads the same weights and is compared:

- logits of a video prompt against the reference's;
- cached generation against recomputation: `generate` (KV and slow caches, 6 greedy tokens) against one
  forward over the generated sequence without a cache, step by step (teacher-forced, so a near tie in
  bf16 cannot make the two continue from different tokens); in fp32 the tokens must be its argmaxes;
- a right-padded batch mixing two videos, an image and text against each sample alone (flash-attention
  takes its variable-length path there).

Errors are max |x - reference| / max |reference|, against `TOLERANCE` per dtype. TF32 is off, so fp32
on the GPU is fp32.

geometry: random weights at the released 128-frame model's geometry ("reference-7b-s2t4": Qwen2-7B,
ConvNeXt-XXL at 576 px, 81 slow tokens per frame, s2t4), built directly on the device in bf16 (no CPU
copy, no download); the dry-run uses "bench-quick" on CPU. As `benchmarks/prefill.py` and
`benchmarks/decoding.py` measure them, with the device synchronized around every timed call and one
model for both designs (the self-attention design is the same LLM with every slow token in its
sequence and none cross-attended: a hybrid layer without slow tokens is a plain decoder layer):

- prefill latency, achieved TFLOP/s (FLOPs from `slowfast_vlm.compute.estimate`) and peak device memory
  (allocator peak above what was allocated before the call) at each frame count, both designs;
- the headline pair: self-attention at 16 frames against slow-fast at 128;
- decoding ms per token at batch 1 and 16 (the video encoded beforehand, as a visual cache would keep
  it): cached slow keys/values, re-projected at every step, and a text-only prompt of the same length;
- the vision encoder's ms per frame on one chunk of frames.
"""

from __future__ import annotations

import gc
import statistics
import time

import torch

from benchmarks.common import build_model, synchronizer, timed, visual_tokens
from benchmarks.decoding import VARIANTS, GreedyDecoder, token_counts
from benchmarks.prefill import Prefill
from slowfast_vlm import SlowFastConfig, SlowFastForConditionalGeneration, fast_token_count
from slowfast_vlm.compute import estimate
from slowfast_vlm.modeling.model import EncodedVisual

# max |x - reference| / max |reference| of the logits. fp32: sums in another order (1e-5 seen on CPU);
# bf16: weights and activations rounded to 8 significant bits, through 4 layers and an LM head.
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 5e-2}
ATTENTION = ("eager", "sdpa", "flash_attention_2")
CORRECTNESS_MODELS = {False: ("tiny", "tiny-llama-convnext"), True: ("tiny",)}  # GPU, dry-run
GEOMETRY = {  # dry-run: the CPU benchmarks' quick model at tiny sizes
    False: dict(name="reference-7b-s2t4", frames=(16, 128, 512, 1536), batches=(1, 16), decode_frames=128,
                new_tokens=32, repeats=3, encoder_frames=16),
    True: dict(name="bench-quick", frames=(16, 128), batches=(1, 2), decode_frames=16, new_tokens=4,
               repeats=1, encoder_frames=4),
}  # fmt: skip
PROMPT_TOKENS = 64
HEADLINE = (16, 128)  # self-attention at 16 frames vs slow-fast at 128: the paper's headline pair


def relative_error(value: torch.Tensor, reference: torch.Tensor) -> float:
    value, reference = value.detach().float().cpu(), reference.detach().float().cpu()
    return float((value - reference).abs().max() / reference.abs().max())


def variants(device: torch.device) -> tuple[list[tuple[str, torch.dtype]], list[dict]]:
    """The (attention, dtype) pairs this device runs, and a skip row for each one it cannot."""
    from transformers.utils import is_flash_attn_2_available

    run, skipped = [], []
    for attention in ATTENTION:
        for dtype in (torch.float32, torch.bfloat16):
            name = f"{attention} {str(dtype).removeprefix('torch.')} {device.type}"
            if attention == "flash_attention_2" and dtype == torch.float32:
                continue  # flash-attention computes in fp16/bf16 only
            if attention == "flash_attention_2" and not (
                device.type == "cuda" and is_flash_attn_2_available()
            ):
                skipped.append({"variant": name, "skipped": "needs a CUDA device and the flash_attn package"})
            elif device.type == "cpu" and (attention, dtype) == ("eager", torch.float32):
                continue  # the reference itself
            else:
                run.append((attention, dtype))
    return run, skipped


def video_prompt(model, frames: int, before=(3, 4), after=(5, 6, 7)) -> list[int]:
    count = fast_token_count(frames, model.model.visual_grid(frames), model.config)
    return [*before, *[model.config.video_token_id] * count, *after]


def image_prompt(model) -> list[int]:
    count = fast_token_count(1, model.model.visual_grid(1), model.config)
    return [8, *[model.config.image_token_id] * count, 9, 10]


def correctness_inputs(model) -> dict:
    """Fixed random inputs: one 8-frame video prompt, and a mixed batch of four samples."""
    generator = torch.Generator().manual_seed(0)
    size = model.config.vision_config.image_size
    video, short, long, image = (
        torch.randn(*shape, 3, size, size, generator=generator) for shape in ((1, 8), (4,), (9,), ())
    )
    samples = [
        (video_prompt(model, 4), {"pixel_values_videos": [short]}),
        (image_prompt(model), {"pixel_values": [image]}),
        ([11, 12, 13, 14], {}),
        (video_prompt(model, 9, before=(2,)), {"pixel_values_videos": [long]}),
    ]
    return {"ids": torch.tensor([video_prompt(model, 8)]), "video": video, "samples": samples}


def on(device: torch.device, dtype: torch.dtype, inputs: dict) -> dict:
    """`inputs` with every floating tensor in `dtype` on `device` (lists of tensors too)."""

    def move(value):
        if isinstance(value, list):
            return [move(item) for item in value]
        if isinstance(value, torch.Tensor):
            return value.to(device, dtype) if value.is_floating_point() else value.to(device)
        return value

    return {key: move(value) for key, value in inputs.items()}


@torch.inference_mode()
def logits_of(model, ids: torch.Tensor, visual: dict, dtype: torch.dtype, device: torch.device):
    return model(input_ids=ids.to(device), **on(device, dtype, visual)).logits


@torch.inference_mode()
def cached_vs_recomputed(model, inputs: dict, dtype: torch.dtype, device: torch.device) -> tuple[float, bool]:
    """(error of `generate`'s step logits against one uncached forward, tokens = the forward's argmaxes)."""
    ids, video = inputs["ids"].to(device), inputs["video"].to(device, dtype)
    out = model.generate(
        input_ids=ids,
        pixel_values_videos=video,
        max_new_tokens=6,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    steps = torch.stack(out.logits, 1)  # (1, 6, V)
    full = model(input_ids=out.sequences[:, :-1], pixel_values_videos=video, use_cache=False).logits
    recomputed = full[:, ids.shape[1] - 1 :]  # (1, 6, V): the positions that predicted each new token
    greedy = torch.equal(recomputed.argmax(-1), out.sequences[:, ids.shape[1] :])
    return relative_error(steps, recomputed), greedy


@torch.inference_mode()
def batched_vs_alone(model, samples: list, dtype: torch.dtype, device: torch.device) -> float:
    """Largest error of a right-padded mixed batch's logits against each sample alone."""
    width = max(len(ids) for ids, _ in samples)
    ids = torch.zeros(len(samples), width, dtype=torch.long)
    mask = torch.zeros(len(samples), width, dtype=torch.long)
    for i, (sample, _) in enumerate(samples):
        ids[i, : len(sample)], mask[i, : len(sample)] = torch.tensor(sample), 1
    videos = [v for _, visual in samples for v in visual.get("pixel_values_videos", [])]
    images = [v for _, visual in samples for v in visual.get("pixel_values", [])]
    batch = on(device, dtype, {"pixel_values_videos": videos, "pixel_values": images})
    batched = model(input_ids=ids.to(device), attention_mask=mask.to(device), **batch).logits
    errors = []
    for i, (sample, visual) in enumerate(samples):
        alone = logits_of(model, torch.tensor([sample]), visual, dtype, device)[0]
        errors.append(relative_error(batched[i, : len(sample)], alone))
    return max(errors)


def tiny_reference(name: str):
    """The reference: a tiny model in CPU fp32, eager attention, gates open."""
    return build_model(SlowFastConfig.from_name(name), torch.float32, attn_implementation="eager")


def correctness(context) -> dict:
    device = context.device
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    run, rows = variants(device)
    for name in CORRECTNESS_MODELS[context.dry_run]:
        reference = tiny_reference(name)
        inputs = correctness_inputs(reference)
        expected = logits_of(
            reference,
            inputs["ids"],
            {"pixel_values_videos": inputs["video"]},
            torch.float32,
            torch.device("cpu"),
        )
        for attention, dtype in run:
            if context.time_left() < 0:
                rows.append({"model": name, "variant": f"{attention} {dtype}", "skipped": "out of time"})
                continue
            model = SlowFastForConditionalGeneration._from_config(
                reference.config, attn_implementation=attention, dtype=dtype
            )  # built in `dtype`: flash-attention refuses fp32 weights
            model.load_state_dict(reference.state_dict())  # the reference's weights, rounded to `dtype`
            model = model.to(device).eval()
            variant = f"{attention} {str(dtype).removeprefix('torch.')} {device.type}"
            tolerance = TOLERANCE[dtype]
            logits = logits_of(model, inputs["ids"], {"pixel_values_videos": inputs["video"]}, dtype, device)
            cached, greedy = cached_vs_recomputed(model, inputs, dtype, device)
            batched = batched_vs_alone(model, inputs["samples"], dtype, device)
            for check, error, against in (
                ("logits", relative_error(logits, expected), "CPU fp32 eager"),
                ("cached generation", cached, "recomputation"),
                ("mixed batch", batched, "each sample alone"),
            ):
                passed = error <= tolerance and (
                    check != "cached generation" or greedy or dtype != torch.float32
                )
                rows.append(
                    dict(
                        model=name,
                        variant=variant,
                        check=check,
                        against=against,
                        error=error,
                        tolerance=tolerance,
                        passed=passed,
                    )
                )
                if check == "cached generation":
                    rows[-1]["tokens_are_argmaxes"] = greedy
            del model
    failed = [row for row in rows if row.get("passed") is False]
    status = "failed" if failed else "passed"
    reason = f"{len(failed)} check(s) beyond tolerance" if failed else None
    return {"status": status, "reason": reason, "checks": rows}


def measure(call, device: torch.device, repeats: int, deadline: float) -> tuple[float, int | None, int]:
    """(median seconds, peak device bytes above the start or None on CPU, rounds timed) of `call`: one
    untimed call (warm-up and memory), then up to `repeats` timed ones while `deadline` allows."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
    sync = synchronizer(device)
    first = timed(call, sync)
    peak = torch.cuda.max_memory_allocated(device) - before if device.type == "cuda" else None
    seconds = []
    for _ in range(repeats):
        if seconds and time.time() + first > deadline:
            break
        seconds.append(timed(call, sync))
    return statistics.median(seconds), peak, len(seconds)


def decode_inputs(model, variant: str, frames: int, batch: int, device: torch.device) -> dict:
    """Forward kwargs of `batch` copies of one prompt: half the text, the video's placeholders, the rest
    (text-only: as many text tokens instead); the video already encoded (`EncodedVisual`)."""
    config = model.config
    fast_count, _ = token_counts(config, frames)
    generator = torch.Generator().manual_seed(0)
    text = torch.randint(0, config.video_token_id, (PROMPT_TOKENS + fast_count,), generator=generator)
    if variant == "text-only":
        return {"input_ids": text.expand(batch, -1).to(device)}
    half = PROMPT_TOKENS // 2
    placeholders = torch.full((fast_count,), config.video_token_id)
    ids = torch.cat([text[:half], placeholders, text[half:PROMPT_TOKENS]]).expand(batch, -1)
    slow, fast = visual_tokens(config, frames, model.dtype)
    encoded = EncodedVisual(slow.view(frames, -1, slow.shape[-1]).to(device), fast.to(device))
    return {
        "input_ids": ids.to(device),
        "encoded_videos": [encoded] * batch,
        "cache_slow_kv": variant != "re-projected",
    }


def decode_ms(model, inputs: dict, new_tokens: int, device: torch.device) -> float:
    """Median ms of the decoding steps after the prefill (`GreedyDecoder`), the device synchronized."""
    decoder = GreedyDecoder(model, inputs, synchronizer(device))
    decoder.start()
    return statistics.median(decoder.step() for _ in range(new_tokens - 1)) * 1e3


def geometry(context) -> dict:
    device, sizes = context.device, GEOMETRY[context.dry_run]
    dtype = torch.bfloat16
    start = time.perf_counter()
    model = build_model(SlowFastConfig.from_name(sizes["name"]), dtype, device=device)
    config = model.config
    built_s = time.perf_counter() - start
    parameters = sum(p.numel() for p in model.parameters())
    prefill, skipped = [], []
    for frames in sizes["frames"]:
        video = tuple(tokens.to(device) for tokens in visual_tokens(config, frames, dtype))
        for design in ("self-attention", "slowfast"):
            if context.time_left() < 0:
                skipped.append(f"prefill {design} at {frames} frames: out of time")
                continue
            try:
                seconds, peak, rounds = measure(
                    Prefill(model, design, video, PROMPT_TOKENS),
                    device,
                    sizes["repeats"],
                    context.deadline,
                )
            except torch.OutOfMemoryError:  # one point's failure keeps the others' figures
                skipped.append(f"prefill {design} at {frames} frames: out of device memory")
                continue
            finally:
                gc.collect()
            record = estimate(config, frames, PROMPT_TOKENS, design, "bfloat16")
            prefill.append(
                dict(frames=frames, design=design, sequence=record.sequence_length,
                     slow_tokens=record.slow_tokens if design == "slowfast" else 0,
                     gflops=record.llm_prefill_flops / 1e9, ms=seconds * 1e3,
                     tflops_per_s=record.llm_prefill_flops / seconds / 1e12,
                     peak_mib=None if peak is None else peak / 2**20, rounds=rounds)
            )  # fmt: skip
        del video
    by_point = {(row["design"], row["frames"]): row for row in prefill}
    headline = None
    base, ours = by_point.get(("self-attention", HEADLINE[0])), by_point.get(("slowfast", HEADLINE[1]))
    if base and ours:
        headline = {
            "gflops_ratio": ours["gflops"] / base["gflops"],
            "latency_ratio": ours["ms"] / base["ms"],
            "memory_ratio": None if base["peak_mib"] is None else ours["peak_mib"] / base["peak_mib"],
        }
    decoding = []
    for batch in sizes["batches"]:
        row = {"frames": sizes["decode_frames"], "batch": batch}
        for variant in VARIANTS:
            if context.time_left() < 0:
                skipped.append(f"decoding {variant} at batch {batch}: out of time")
                continue
            inputs = decode_inputs(model, variant, sizes["decode_frames"], batch, device)
            row[variant] = decode_ms(model, inputs, sizes["new_tokens"], device)
        decoding.append(row)
    frames = torch.randn(
        sizes["encoder_frames"], 3, config.vision_config.image_size, config.vision_config.image_size
    )
    frames = frames.to(device, dtype)
    with torch.inference_mode():
        seconds, peak, _ = measure(
            lambda: model.model.encode_visual_items([frames]), device, sizes["repeats"], context.deadline
        )
    encoder = dict(frames=sizes["encoder_frames"], ms_per_frame=seconds * 1e3 / sizes["encoder_frames"],
                   peak_mib=None if peak is None else peak / 2**20)  # fmt: skip
    return {
        "status": "passed",
        "reason": "; ".join(skipped) or None,
        "model": f"{sizes['name']}: {parameters / 1e6:,.1f} M parameters, bf16, built in {built_s:.1f} s",
        "prefill": prefill,
        "headline": headline,
        "decoding": decoding,
        "encoder": encoder,
    }
