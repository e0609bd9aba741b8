"""Component configurations of the embedded default world's text-to-image model.

The model has Stable Diffusion v1's layout with small components: an AutoencoderKL that maps
32 x 32 RGB images to 16 x 16 x 4 latents, a UNet2DConditionModel with cross-attention at the
8 x 8 and 4 x 4 resolutions, and a CLIPTextModel of width 128 over the full SD v1 vocabulary.
The noise schedule is SD's: 1,000 steps, scaled-linear betas from 0.00085 to 0.012.
"""

from __future__ import annotations

from benchmark.tokenizer import BOS_TOKEN_ID, EOS_TOKEN_ID, MAX_LENGTH, SD_VOCAB_SIZE

TEXT_WIDTH = 128

VAE_CONFIG = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
    up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
    block_out_channels=(32, 64),
    layers_per_block=1,
    latent_channels=4,
    norm_num_groups=16,
    sample_size=32,
    mid_block_add_attention=False,
)

UNET_CONFIG = dict(
    sample_size=16,
    in_channels=4,
    out_channels=4,
    block_out_channels=(32, 64, 64),
    layers_per_block=1,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    cross_attention_dim=TEXT_WIDTH,
    # diffusers' legacy name: for SD-style UNets this is the number of attention heads.
    attention_head_dim=4,
    norm_num_groups=16,
)

TEXT_ENCODER_CONFIG = dict(
    vocab_size=SD_VOCAB_SIZE,
    hidden_size=TEXT_WIDTH,
    intermediate_size=4 * TEXT_WIDTH,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=MAX_LENGTH,
    hidden_act="quick_gelu",
    projection_dim=TEXT_WIDTH,
    bos_token_id=BOS_TOKEN_ID,
    eos_token_id=EOS_TOKEN_ID,
    pad_token_id=EOS_TOKEN_ID,
)

# SD v1.4's noise schedule, shared by training (DDPM) and sampling (DDIM).
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    prediction_type="epsilon",
)


def build_components(seed: int = 0):
    """Build randomly initialised (vae, unet, text_encoder) with the world's configurations."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(**VAE_CONFIG)
    unet = UNet2DConditionModel(**UNET_CONFIG)
    text_encoder = CLIPTextModel(CLIPTextConfig(**TEXT_ENCODER_CONFIG))
    return vae, unet, text_encoder
