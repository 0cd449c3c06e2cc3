"""Independent references for the serving tests: hand-written ChatML prompts through the processor
and `generate`, bypassing the serving code."""

import torch


def greedy_reference(model, processor, prompt: str, frames, max_new_tokens: int) -> tuple[str, int, int, str]:
    """Independent of the serving code: a hand-written ChatML prompt through the processor and
    `generate`. Returns (answer, prompt tokens, completion tokens, finish reason)."""
    inputs = processor(text=prompt, videos=None if frames is None else [frames], return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = ids[0, inputs["input_ids"].shape[1] :]
    text = processor.tokenizer.decode(new, skip_special_tokens=True).strip()
    finish = (
        "length" if len(new) == max_new_tokens and new[-1] != processor.tokenizer.eos_token_id else "stop"
    )
    return text, inputs["input_ids"].shape[1], len(new), finish


def chatml(*turns: tuple[str, str], video: bool = True) -> str:
    """The ChatML prompt for (role, text) turns; the first user turn carries the video placeholder."""
    prompt = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    for i, (role, text) in enumerate(turns):
        placeholder = "<video>\n" if video and i == 0 else ""
        prompt += f"<|im_start|>{role}\n{placeholder}{text}<|im_end|>\n"
    return prompt + "<|im_start|>assistant\n"
