"""Build a tiny random slow-fast model and generate from a random video tensor (CPU, seconds)."""

import torch

from slowfast_vlm import SlowFastConfig, SlowFastForConditionalGeneration, fast_token_count

config = SlowFastConfig(
    text_config=dict(
        model_type="qwen2",
        num_hidden_layers=4,
        hidden_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=1000,
    ),
    vision_config=dict(
        model_type="siglip_vision_model",
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=64,
        patch_size=8,
    ),
    hybrid_every_n_layers=2,  # layers 0 and 2 become hybrid layers
    video_token_id=999,
)
model = SlowFastForConditionalGeneration(config).eval()

video = torch.randn(1, 32, 3, 64, 64)  # (B, T, 3, H, W): 32 frames
grid = model.model.visual_grid(num_frames=32)  # 8x8 patches, pooled by 2 -> (4, 4)
num_fast = fast_token_count(32, grid, config)  # 32 frames -> 16 fast frames x 16 = 256 fast tokens
input_ids = torch.tensor([[1, 2, 3] + [config.video_token_id] * num_fast + [4, 5]])

output = model.generate(input_ids=input_ids, pixel_values_videos=video, max_new_tokens=8, do_sample=False)
print(f"{num_fast} fast tokens in the sequence, {32 * 16} slow tokens via cross-attention")
print("generated ids:", output[0, input_ids.shape[1] :].tolist())
