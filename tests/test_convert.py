"""`slowfast-vlm convert`: a reference checkpoint saved in this library's format with its processor, bad
input, a tower named by a local directory, and a converted ConvNeXt tower against a plain-torch
re-computation of the reference's timm tower."""

import re

import torch
import torch.nn.functional as F
from helpers import VIDEO_TOKEN_ID, tiny_model, tiny_tokenizer
from reference_helpers import (
    REFERENCE_TOWER,
    original_model,
    reference_state_dict,
    video_logits,
    write_reference,
)

from slowfast_vlm import SlowFastForConditionalGeneration, cli
from slowfast_vlm.modeling.vision import encoder_grids
from slowfast_vlm.processing.processor import SlowFastProcessor


def test_cli_converts_with_tokenizer(tmp_path, capsys):
    original = original_model("siglip", seed=6)
    src = write_reference(tmp_path / "reference", original, "siglip")
    tiny_tokenizer().save_pretrained(src)
    dst = tmp_path / "converted"
    assert cli.main(["convert", str(src), str(dst), "--vision-config", '{"num_attention_heads": 2}']) == 0
    assert "wrote" in capsys.readouterr().err

    model = SlowFastForConditionalGeneration.from_pretrained(dst)
    processor = SlowFastProcessor.from_pretrained(dst)
    tokenizer = processor.tokenizer
    assert model.config.video_token_id == tokenizer.convert_tokens_to_ids("<video>") == 300
    assert model.config.image_token_id == tokenizer.convert_tokens_to_ids("<image>") == 301
    # the embeddings grew to the tokenizer (300 + 2 tokens); the original rows are untouched
    assert model.get_input_embeddings().num_embeddings == len(tokenizer) == 302
    ids = torch.tensor([[5, 17, 42, 99, 127]])
    with torch.no_grad():
        torch.testing.assert_close(
            model(input_ids=ids).logits[..., :128], original(input_ids=ids).logits, rtol=0, atol=1e-6
        )
    video = torch.randint(0, 255, (4, 40, 48, 3), dtype=torch.uint8)
    inputs = processor(text="<video>\nWhat happens?", videos=video, return_tensors="pt")
    with torch.no_grad():
        assert model(**inputs).logits.shape == (1, inputs["input_ids"].shape[1], 302)


def test_cli_rejects_bad_input(tmp_path, capsys):
    assert cli.main(["convert", str(tmp_path / "missing"), str(tmp_path / "out")]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a reference checkpoint" in err[0]

    original = tiny_model(vision="convnext")
    src = write_reference(
        tmp_path / "reference", original, "convnext", cross_attn_gating_type="channel-wise-dynamic-sigmoid"
    )
    assert cli.main(["convert", str(src), str(tmp_path / "out")]) != 0
    assert "unknown cross_attn_gating_type 'channel-wise-dynamic-sigmoid'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


# ----- the vision tower's config from its name --------------------------------------------------------


def test_tower_named_by_a_local_directory_needs_no_vision_config(tmp_path):
    original = original_model("siglip", seed=7)
    tower = tmp_path / "siglip-tower"
    original.config.vision_config.save_pretrained(tower)  # holds the head count the weights cannot tell
    src = write_reference(tmp_path / "reference", original, "siglip", mm_vision_tower=str(tower))
    assert cli.main(["convert", str(src), str(tmp_path / "converted")]) == 0
    model = SlowFastForConditionalGeneration.from_pretrained(tmp_path / "converted")
    model.config.video_token_id = VIDEO_TOKEN_ID
    assert model.config.vision_config.num_attention_heads == 2
    torch.testing.assert_close(video_logits(model), video_logits(original), rtol=0, atol=1e-6)


TOWER_SCALES = (
    (r"^stem\.0\.|\.conv_dw\.", 1e-3),
    (r"^stem\.1\.|^stages\.0\.blocks\.\d+\.weight$", 3e-3),
    (r"", 0.3),
)


def small_variance_tower(state: dict, seed: int = 0) -> dict:
    """`state` with random tower weights (timm names below `model.vision_tower.vision_tower.`) at `TOWER_SCALES`."""
    generator = torch.Generator().manual_seed(seed)
    state = dict(state)
    for key in [k for k in state if k.startswith(REFERENCE_TOWER)]:
        name = key[len(REFERENCE_TOWER) :]
        scale = next(s for pattern, s in TOWER_SCALES if re.search(pattern, name))
        state[key] = torch.randn(state[key].shape, generator=generator) * scale
        if re.search(r"(\.norm|downsample\.0)\.weight$", name):
            state[key] += 1
    return state


def channel_layer_norm(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the channels of `(N, C, H, W)`."""
    centred = x - x.mean(1, keepdim=True)
    variance = centred.pow(2).mean(1, keepdim=True)
    return centred / torch.sqrt(variance + eps) * weight[:, None, None] + bias[:, None, None]


def timm_convnext_features(tower: dict, pixels: torch.Tensor, eps: float) -> torch.Tensor:
    """The reference tower's output, recomputed from its timm weights: timm's ConvNeXt stem and stages
    as the reference's `forward_features` runs them, the last stage taken with no final norm -> `(N, C, h, w)`."""
    stem = tower["stem.0.weight"]
    x = F.conv2d(pixels, stem, tower["stem.0.bias"], stride=stem.shape[-1])
    x = channel_layer_norm(x, tower["stem.1.weight"], tower["stem.1.bias"], eps)
    num_stages = 1 + max(int(name.split(".")[1]) for name in tower if name.startswith("stages."))
    for i in range(num_stages):
        stage = f"stages.{i}."
        if stage + "downsample.0.weight" in tower:
            x = channel_layer_norm(
                x, tower[stage + "downsample.0.weight"], tower[stage + "downsample.0.bias"], eps
            )
            x = F.conv2d(
                x, tower[stage + "downsample.1.weight"], tower[stage + "downsample.1.bias"], stride=2
            )
        num_blocks = 1 + max(int(n.split(".")[3]) for n in tower if n.startswith(stage + "blocks."))
        for j in range(num_blocks):
            block = f"{stage}blocks.{j}."
            y = F.conv2d(
                x,
                tower[block + "conv_dw.weight"],
                tower[block + "conv_dw.bias"],
                padding=3,
                groups=x.shape[1],
            )
            y = channel_layer_norm(y, tower[block + "norm.weight"], tower[block + "norm.bias"], eps)
            y = y.permute(0, 2, 3, 1)  # (N, h, w, C): the MLP runs over channels
            y = F.gelu(F.linear(y, tower[block + "mlp.fc1.weight"], tower[block + "mlp.fc1.bias"]))
            y = F.linear(y, tower[block + "mlp.fc2.weight"], tower[block + "mlp.fc2.bias"])
            x = x + (y * tower[block + "weight"]).permute(0, 3, 1, 2)  # layer scale (timm's gamma), residual
    return x


def test_converted_convnext_tower_computes_the_reference_features(tmp_path):
    original = original_model("convnext", seed=9)
    state = small_variance_tower(reference_state_dict(original, "convnext"), seed=9)
    src = write_reference(tmp_path / "reference", original, "convnext", state=state)
    assert cli.main(["convert", str(src), str(tmp_path / "converted")]) == 0
    model = SlowFastForConditionalGeneration.from_pretrained(tmp_path / "converted", dtype=torch.float32)
    assert model.config.vision_norm_eps == 1e-5
    norms = [m for m in model.model.vision_tower.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 5 and {m.eps for m in norms} == {1e-5}  # stem, 2 blocks, downsampling, final

    tower = {k[len(REFERENCE_TOWER) :]: v for k, v in state.items() if k.startswith(REFERENCE_TOWER)}
    frames = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        features = encoder_grids(model.model.vision_tower, frames, model.config.vision_feature_layer)
        (slow,) = model.model.encode_visual_items([frames])
    expected = timm_convnext_features(tower, frames, eps=1e-5).permute(0, 2, 3, 1)  # (T, h, w, C)
    torch.testing.assert_close(features, expected, rtol=0, atol=1e-5)
    # transformers' own eps (1e-6) is far outside the tolerance: the comparison tells them apart
    wrong = timm_convnext_features(tower, frames, eps=1e-6).permute(0, 2, 3, 1)
    assert (wrong - expected).abs().max() > 1e-2

    # the slow tokens: the reference's mlp2x_gelu projector, then 2x2 average pooling of every frame
    w0, b0, w2, b2 = (state[f"model.mm_projector.{i}.{p}"] for i in (0, 2) for p in ("weight", "bias"))
    projected = F.linear(F.gelu(F.linear(expected, w0, b0)), w2, b2)  # (T, h, w, D)
    pooled = F.avg_pool2d(projected.permute(0, 3, 1, 2), kernel_size=2)  # (T, D, h / 2, w / 2)
    torch.testing.assert_close(slow, pooled.flatten(2).transpose(1, 2), rtol=0, atol=1e-5)
