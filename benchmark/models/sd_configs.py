"""Component configurations of Stable Diffusion v1.4 and of the tiny random test model.

The SD v1.4 values are those of the ``CompVis/stable-diffusion-v1-4`` diffusers folder. They
let the suite build a full-size SD v1.4-architecture model with random weights (slow tests)
and load a single-file ``.ckpt``/``.safetensors`` checkpoint without fetching configs.
"""

from __future__ import annotations

import json
from pathlib import Path

from benchmark.tokenizer import BOS_TOKEN_ID, EOS_TOKEN_ID, MAX_LENGTH, SD_VOCAB_SIZE

SD14_UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
    downsample_padding=1,
    flip_sin_to_cos=True,
    freq_shift=0,
    act_fn="silu",
    center_input_sample=False,
    mid_block_scale_factor=1,
    norm_eps=1e-5,
)

SD14_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    act_fn="silu",
    scaling_factor=0.18215,
)

# SD v1.4's text encoder is the text tower of OpenAI CLIP ViT-L/14. Its config keeps the old
# special-token ids (0, 2, 1); SD uses the 77 x 768 states, which do not depend on them.
SD14_TEXT_ENCODER = dict(
    vocab_size=SD_VOCAB_SIZE,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=MAX_LENGTH,
    hidden_act="quick_gelu",
    projection_dim=768,
    bos_token_id=0,
    eos_token_id=2,
    pad_token_id=1,
)

SD14_SCHEDULER = dict(
    _class_name="PNDMScheduler",
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    skip_prk_steps=True,
    steps_offset=1,
    prediction_type="epsilon",
)

TINY_UNET = dict(
    sample_size=8,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64),
    layers_per_block=1,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=32,
    attention_head_dim=4,
    norm_num_groups=32,
)

TINY_VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(32, 32, 32, 32),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=32,
    sample_size=64,
)

TINY_TEXT_ENCODER = dict(
    vocab_size=SD_VOCAB_SIZE,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=MAX_LENGTH,
    hidden_act="quick_gelu",
    projection_dim=32,
    bos_token_id=BOS_TOKEN_ID,
    eos_token_id=EOS_TOKEN_ID,
    pad_token_id=EOS_TOKEN_ID,
)


def write_sd14_config_folder(folder: Path) -> Path:
    """Write a configs-only SD v1.4 diffusers folder, as ``from_single_file(config=...)`` expects."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig

    from benchmark.tokenizer import build_sd_tokenizer

    folder = Path(folder)
    with torch.device("meta"):
        UNet2DConditionModel(**SD14_UNET).save_config(folder / "unet")
        AutoencoderKL(**SD14_VAE).save_config(folder / "vae")
    CLIPTextConfig(**SD14_TEXT_ENCODER, architectures=["CLIPTextModel"]).save_pretrained(folder / "text_encoder")
    build_sd_tokenizer().save_pretrained(folder / "tokenizer")

    (folder / "scheduler").mkdir(parents=True, exist_ok=True)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD14_SCHEDULER, indent=2))
    model_index = {
        "_class_name": "StableDiffusionPipeline",
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
        "safety_checker": [None, None],
        "scheduler": ["diffusers", "PNDMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
    }
    (folder / "model_index.json").write_text(json.dumps(model_index, indent=2))
    return folder
