"""Peak host memory per rank of 2-process training, DDP vs DeepSpeed ZeRO-3 vs FSDP2, at model build and
at the first optimizer step.

    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/training_memory.py   # a ~190M-parameter model (D=1024, 12 layers)
    python benchmarks/training_memory.py                # glibc's default allocator
    python benchmarks/training_memory.py --layers 2 --hidden 256   # a quick check of the script

The model (the tiny 32 px encoder, a random Qwen2-style LLM of the given size, fp32) is built in two
ways (`--sources`), 2 processes with gloo, by `build_trainer` / `train`:
- `checkpoint`: from a saved slow-fast checkpoint (`model.init_from`, how stage 2 starts), at the
  stage-2 rates (LLM, projector, cross-attention);
- `base`: a new model from a base LLM checkpoint and the encoder's (`model.llm` + `model.vision`, how
  stage 1 starts), at the stage-1 rates (projector, cross-attention).
Each rank reads its peak
resident set (`VmHWM` in /proc/self/status, the checkpoint's memory-mapped file pages included) and
its peak anonymous memory (`RssAnon`, sampled every 5 ms) after the imports, after `build_trainer` (the
model built) and after the first optimizer step (the engine set up, one step taken). Memory figures,
not timings: the load average is printed beside them. The environment reaches the ranks: glibc's
`MALLOC_MMAP_THRESHOLD_` (printed with the table) fixes the size above which freed blocks go straight back
to the system (by default the threshold grows with the blocks freed, up to 32 MiB, and freed
parameter-sized blocks stay in the heap).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENGINES = {
    "ddp": [],
    "zero3": ["training.deepspeed=configs/deepspeed/zero3.json"],
    "fsdp2": ["training.fsdp=full_shard auto_wrap", "training.fsdp_config=configs/fsdp/fsdp2.json"],
}
SOURCES = ("checkpoint", "base")


def peak_mib(field: str = "VmHWM") -> float:
    """This process's peak resident set so far (or another /proc/self/status field), in MiB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":")) / 1024


class AnonymousPeak:
    """The peak of this process's anonymous resident memory (`RssAnon`: not the file pages that reading a
    memory-mapped checkpoint adds to `VmHWM`), sampled every `interval` seconds in a thread."""

    def __init__(self, interval: float = 0.005):
        self.peak, self.interval = 0.0, interval
        threading.Thread(target=self._sample, daemon=True).start()

    def _sample(self) -> None:
        while True:
            self.peak = max(self.peak, peak_mib("RssAnon"))
            time.sleep(self.interval)

    def take(self) -> float:
        """The peak since the last `take`."""
        peak, self.peak = max(self.peak, peak_mib("RssAnon")), 0.0
        return peak


def write_checkpoint(folder: Path, hidden: int, layers: int) -> tuple[Path, dict[str, str], int]:
    """A random slow-fast checkpoint with its processor, the tiny data set; returns its parameter count."""
    import torch
    from transformers import AutoTokenizer

    from slowfast_vlm import SlowFastConfig, SlowFastForConditionalGeneration
    from slowfast_vlm.processing.processor import SlowFastProcessor
    from slowfast_vlm.training.build import _with_chatml
    from slowfast_vlm.training.tiny import write_tiny_setup

    tiny = write_tiny_setup(folder / "tiny")
    tokenizer = _with_chatml(AutoTokenizer.from_pretrained(tiny["llm"]))
    text = {"hidden_size": hidden, "intermediate_size": 4 * hidden, "num_hidden_layers": layers,
            "num_attention_heads": hidden // 64, "num_key_value_heads": hidden // 256,
            "vocab_size": len(tokenizer) + 2, "max_position_embeddings": 1024}  # fmt: skip
    config = SlowFastConfig.from_name("tiny", text_config=text, hybrid_every_n_layers=max(layers // 2, 1))
    torch.manual_seed(0)
    model = SlowFastForConditionalGeneration(config)
    processor = SlowFastProcessor.from_model_config(config, tokenizer)
    processor.prepare_model(model)
    model.save_pretrained(folder / "model")
    processor.save_pretrained(folder / "model")
    return folder / "model", tiny, sum(p.numel() for p in model.parameters())


def write_base_llm(folder: Path, checkpoint: Path) -> Path:
    """The slow-fast checkpoint's LLM saved as a base causal LM (Qwen2, its tokenizer), fp32 safetensors."""
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    from slowfast_vlm import SlowFastConfig

    config = SlowFastConfig.from_pretrained(checkpoint).text_config
    config.vocab_size -= 2  # without <video> / <image>, which the build adds (the embeddings are resized)
    Qwen2ForCausalLM(config).save_pretrained(folder / "llm")
    AutoTokenizer.from_pretrained(checkpoint).save_pretrained(folder / "llm")
    return folder / "llm"


def source_sets(
    source: str, checkpoint: Path, tiny: dict[str, str], llm: Path | None, layers: int
) -> list[str]:
    """The `--set` overrides that build the model from `source`."""
    if source == "checkpoint":
        return [f"model.init_from={checkpoint}", "model.llm=null", "model.vision=null", "stage=stage2"]
    return [f"model.llm={llm}", f"model.vision={tiny['vision']}", "stage=stage1",
            f"model.slowfast.hybrid_every_n_layers={max(layers // 2, 1)}"]  # fmt: skip


def worker(name: str, sets: list[str], tiny: dict[str, str], output: str) -> None:
    """One rank: build, then one step; writes its peaks to OUTPUT/NAME-rankR.json."""
    from transformers import TrainerCallback

    from slowfast_vlm.training.runner import build_trainer, leave_worker, load_train_config

    anonymous = AnonymousPeak()
    peaks = {"imports": peak_mib(), "anonymous imports": anonymous.take()}

    class FirstStep(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            peaks["first step"], peaks["anonymous first step"] = peak_mib(), anonymous.take()

    sets = [
        *sets, f"data.train=[{tiny['data']}]", f"data.media_root={tiny['media']}", f"training.output_dir={output}/{name}",
        "training.max_steps=1", "training.save_strategy='no'", "training.disable_tqdm=true",
    ]  # fmt: skip
    trainer = build_trainer(load_train_config(str(ROOT / "configs/tiny_cpu.yaml"), sets), [FirstStep()])
    peaks["build"], peaks["anonymous build"] = peak_mib(), anonymous.take()
    trainer.train()
    rank = trainer.args.process_index
    Path(output, f"{name}-rank{rank}.json").write_text(json.dumps(peaks))
    leave_worker(0)  # the figures are written; the exit the trainer's CLI takes (see its docstring)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=list(ENGINES))
    parser.add_argument("--sources", nargs="+", default=list(SOURCES), choices=list(SOURCES))
    parser.add_argument("--worker", nargs=4, metavar=("NAME", "SETS_JSON", "TINY_JSON", "OUTPUT"))
    args = parser.parse_args()
    if args.worker:
        name, sets, tiny, output = args.worker
        worker(name, json.loads(sets), json.loads(tiny), output)
        return

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as folder:
        checkpoint, tiny, params = write_checkpoint(Path(folder), args.hidden, args.layers)
        llm = write_base_llm(Path(folder), checkpoint) if "base" in args.sources else None
        full = params * 4 / 2**20
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
        rows = []
        for source in args.sources:
            for engine in args.engines:
                name, sets = f"{source}-{engine}", source_sets(source, checkpoint, tiny, llm, args.layers)
                command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           __file__, "--worker", name, json.dumps(sets + ENGINES[engine]), json.dumps(tiny), folder]  # fmt: skip
                result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
                if result.returncode != 0:
                    sys.exit(f"{name}: the 2-process run failed:\n{result.stderr[-8000:]}")
                for rank in (0, 1):
                    peaks = json.loads(Path(folder, f"{name}-rank{rank}.json").read_text())
                    rows.append((source, engine, rank, peaks))
    load_after = os.getloadavg()
    print(f"model: {params / 1e6:.0f}M parameters, {full:.0f} MiB in fp32 (1/2: {full / 2:.0f} MiB)")
    print(f"MALLOC_MMAP_THRESHOLD_: {os.environ.get('MALLOC_MMAP_THRESHOLD_', 'unset (glibc: dynamic)')}")
    print("| built from | engine | rank | VmHWM: imports / build / first step (MiB) "
          "| anonymous peak: imports / build / first step (MiB) | anonymous: build - imports |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for source, engine, rank, p in rows:
        anonymous = [p["anonymous imports"], p["anonymous build"], p["anonymous first step"]]
        print(f"| {source} | {engine} | {rank} | {p['imports']:.0f} / {p['build']:.0f} / {p['first step']:.0f} "
              f"| {' / '.join(f'{a:.0f}' for a in anonymous)} | {anonymous[1] - anonymous[0]:.0f} |")  # fmt: skip
    before, after = (", ".join(f"{x:.1f}" for x in load) for load in (load_before, load_after))
    print(f"load average (1, 5, 15 min): {before} before the runs, {after} after")


if __name__ == "__main__":
    main()
